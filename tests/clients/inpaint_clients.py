"""Inpainting and outpainting through clients nobody here wrote: the official
`openai` package's images.edit with a mask (OpenAI's convention: alpha 0
repaints) and the PyPI `webuiapi` client's img2img with a mask (A1111's
fields). Run by tests/tests/inpaint.rs with the gateway's HTTP URL and a
folder holding `init.png`, `mask.png` (white repaints) and `grpc.png` (the
gRPC result for the same request); exits non-zero on the first thing that
is not as those clients expect.

Usage: python inpaint_clients.py http://127.0.0.1:PORT DIR
"""

import base64
import io
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import openai
import webuiapi
from PIL import Image

URL, DIR = sys.argv[1], Path(sys.argv[2])
SEED, STEPS = 31, 6


def px(img):
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def from_b64(s):
    return Image.open(io.BytesIO(base64.b64decode(s)))


def check_openai():
    client = openai.OpenAI(base_url=f"{URL}/v1", api_key="unused", max_retries=0)
    init, mask = Image.open(DIR / "init.png"), Image.open(DIR / "mask.png").convert("L")
    size = f"{init.width}x{init.height}"
    # OpenAI's mask: transparent where to repaint.
    rgba = Image.new("RGBA", init.size, (0, 0, 0, 255))
    rgba.putalpha(Image.eval(mask, lambda v: 255 - v))
    extra = {"steps": STEPS, "seed": SEED, "guidance_scale": 7.5}
    r = client.images.edit(image=("init.png", png(init), "image/png"), mask=("mask.png", png(rgba), "image/png"),
                           prompt="a red cube", size=size, extra_body=extra)
    got = px(from_b64(r.data[0].b64_json))
    want = px(Image.open(DIR / "grpc.png"))
    assert (got == want).all(), f"the OpenAI edit differs from gRPC's: max {np.abs(got - want).max()}"

    # No mask, but a picture with transparency: its transparent part is the mask.
    holed = init.convert("RGBA")
    holed.putalpha(rgba.getchannel("A"))
    r = client.images.edit(image=("holed.png", png(holed), "image/png"), prompt="a red cube", size=size,
                           extra_body=extra)
    assert (px(from_b64(r.data[0].b64_json)) == want).all(), "the image's own alpha is not the mask"

    # A mask of another size is refused, naming it.
    try:
        client.images.edit(image=("init.png", png(init), "image/png"),
                           mask=("m.png", png(rgba.resize((init.width // 2, init.height // 2))), "image/png"),
                           prompt="x", extra_body=extra)
        raise AssertionError("a mask of another size was accepted")
    except openai.BadRequestError as e:
        assert e.body.get("param") == "mask" or "mask" in str(e), str(e)


def check_webuiapi():
    host = urlparse(URL)
    api = webuiapi.WebUIApi(host=host.hostname, port=host.port, sampler="Euler a", steps=STEPS)
    init, mask = Image.open(DIR / "init.png").convert("RGB"), Image.open(DIR / "mask.png").convert("L")
    w, h = init.size
    keep = np.asarray(mask) < 128

    # Whole picture, no blur, original content: the original outside the
    # mask, a new picture inside.
    r = api.img2img(images=[init], mask_image=mask, prompt="a red cube", width=w, height=h, seed=SEED,
                    denoising_strength=0.9, mask_blur=0, inpainting_fill=1, inpaint_full_res=False)
    out = px(r.images[0])
    assert (out[keep] == px(init)[keep]).all(), "the kept part changed"
    assert (out[~keep] != px(init)[~keep]).any(), "the masked part was not repainted"

    # Only masked (the API's default), with padding and blur: the result has
    # the picture's size; outside the padded region it is the picture.
    r = api.img2img(images=[init], mask_image=mask, prompt="a red cube", width=w, height=h, seed=SEED,
                    denoising_strength=0.9, mask_blur=2, inpainting_fill=0, inpaint_full_res=True,
                    inpaint_full_res_padding=4)
    out = px(r.images[0])
    assert out.shape[:2] == (h, w), out.shape
    ys, xs = np.nonzero(~keep)
    far = np.ones_like(keep)
    far[max(ys.min() - 12, 0): ys.max() + 13, max(xs.min() - 12, 0): xs.max() + 13] = False
    assert (out[far] == px(init)[far]).all(), "outside the crop the picture changed"
    info = r.info["infotexts"][0]
    for want in ("Mask blur: 2", "Inpaint area: Only masked", "Masked area padding: 4", "Masked content: fill"):
        assert want in info, info

    # Outpainting: a wide picture on a square canvas (resize_mode 2, resize
    # and fill), the new bands masked.
    wide = init.resize((w, h // 2))
    band = np.zeros((h, w), np.uint8)
    band[: h // 4] = 255
    band[h - h // 4:] = 255
    r = api.img2img(images=[wide], mask_image=Image.fromarray(band, "L"), prompt="a landscape", width=w, height=h,
                    seed=SEED, denoising_strength=1.0, mask_blur=0, inpainting_fill=2, inpaint_full_res=False,
                    resize_mode=2)
    out = px(r.images[0])
    assert out.shape[:2] == (h, w), out.shape
    assert (out[h // 4: h - h // 4] == px(wide)).all(), "the picture inside the canvas changed"
    top = out[: h // 4]
    assert (top != top[-1:]).any(), "the new band is only the picture's edge stretched"

    # A mask of another size is resized (A1111 resizes it with the picture).
    r = api.img2img(images=[init], mask_image=mask.resize((w // 2, h // 2)), prompt="a red cube", width=w,
                    height=h, seed=SEED, mask_blur=0, inpaint_full_res=False, inpainting_fill=1)
    assert r.images[0].size == (w, h)


def check_hires():
    """Hires fix from webuiapi's txt2img: the image at the larger size, the
    infotext saying how, the upscalers A1111 lists; a model upscaler is
    refused naming hr_upscaler."""
    host = urlparse(URL)
    api = webuiapi.WebUIApi(host=host.hostname, port=host.port, sampler="Euler", steps=4)
    w = Image.open(DIR / "init.png").width
    plain = api.txt2img(prompt="a lighthouse", width=w, height=w, seed=5, cfg_scale=7)
    r = api.txt2img(prompt="a lighthouse", width=w, height=w, seed=5, cfg_scale=7, enable_hr=True, hr_scale=1.5,
                    hr_upscaler="Latent (nearest-exact)", hr_second_pass_steps=2, denoising_strength=0.5)
    assert r.images[0].size == (w * 3 // 2, w * 3 // 2), r.images[0].size
    info = r.info["infotexts"][0]
    for want in ("Hires upscale: 1.5", "Hires steps: 2", "Hires upscaler: Latent (nearest-exact)",
                 "Denoising strength: 0.5", f"Size: {w}x{w}"):
        assert want in info, info
    small = r.images[0].resize(plain.images[0].size)
    assert (px(small) != px(plain.images[0])).any(), "the second pass changed nothing"
    r = api.txt2img(prompt="a lighthouse", width=w, height=w, seed=5, enable_hr=True, hr_resize_x=w * 2,
                    hr_upscaler="Lanczos", hr_second_pass_steps=2)
    assert r.images[0].size == (w * 2, w * 2), r.images[0].size
    assert "Latent (nearest)" in [m["name"] for m in api.get_latent_upscale_modes()]
    assert "Lanczos" in [u["name"] for u in api.get_upscalers()]
    try:
        api.txt2img(prompt="x", width=w, height=w, enable_hr=True, hr_upscaler="R-ESRGAN 4x+")
        raise AssertionError("a model upscaler was accepted")
    except RuntimeError as e:
        assert "hr_upscaler" in str(e), str(e)


def main():
    check_openai()
    check_webuiapi()
    check_hires()
    print("inpaint clients: ok")


if __name__ == "__main__":
    main()
