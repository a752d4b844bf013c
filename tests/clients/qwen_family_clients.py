"""Clients nobody here wrote, against a live sdserve gateway serving a tiny
FLUX.2 Klein or Z-Image fixture: the official `openai` package and the PyPI
`webuiapi` A1111 client, each image compared with the one diffusers'
pipeline made for the same parameters (within 2/255); the model listing;
and the family's refusals by field.

Usage: python qwen_family_clients.py http://127.0.0.1:PORT MODEL_NAME E2E_DIR FAMILY
"""

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import openai
import webuiapi
from PIL import Image

URL, MODEL, E2E, FAMILY = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
CASES = {c["name"]: c for c in json.loads((E2E / "cases.json").read_text())["cases"]}


def pixels(img):
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def same_as(img, case):
    want = Image.open(E2E / CASES[case]["files"][0])
    d = np.abs(pixels(img) - pixels(want)).max()
    assert d <= 2, f"{case}: {d}/255 from diffusers' image"


def check_openai(case):
    client = openai.OpenAI(base_url=f"{URL}/v1", api_key="unused", max_retries=0)
    p = CASES[case]["params"]
    extra = {"steps": p["steps"], "seed": p["seed"], "guidance_scale": p["guidance"]}
    if "negative_prompt" in p:
        extra["negative_prompt"] = p["negative_prompt"]
    r = client.images.generate(prompt=p["prompt"], size=f"{p['width']}x{p['height']}",
                               response_format="b64_json", extra_body=extra)
    same_as(Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))), case)
    models = {m.id: m for m in client.models.list()}
    assert models[MODEL].model_extra["sdserve"]["family"] == FAMILY, models[MODEL]
    # FLUX.1's true CFG is not these families' guidance.
    try:
        client.images.generate(prompt="x", size="64x64", extra_body={"steps": 1, "true_cfg_scale": 4})
        raise AssertionError("true_cfg_scale was accepted")
    except openai.BadRequestError as e:
        assert e.body.get("param") == "true_cfg_scale", e.body


def check_openai_references(case):
    """FLUX.2 Klein: several `image` files to /v1/images/edits are the
    pipeline's reference images (as gpt-image-1 takes several)."""
    client = openai.OpenAI(base_url=f"{URL}/v1", api_key="unused", max_retries=0)
    c = CASES[case]
    p = c["params"]
    files = [(f, (E2E / f).read_bytes(), "image/png") for f in p["references"]]
    size = f"{p['width']}x{p['height']}" if "width" in p else "auto"
    r = client.images.edit(image=files, prompt=p["prompt"], size=size, n=p.get("num_images", 1),
                           response_format="b64_json",
                           extra_body={"steps": p["steps"], "seed": p["seed"], "guidance_scale": p["guidance"]})
    assert len(r.data) == len(c["files"]), r.data
    for d, f in zip(r.data, c["files"]):
        got = Image.open(io.BytesIO(base64.b64decode(d.b64_json)))
        want = Image.open(E2E / f)
        assert got.size == want.size, (got.size, want.size)
        diff = np.abs(pixels(got) - pixels(want)).max()
        assert diff <= 2, f"{case} {f}: {diff}/255 from diffusers' image"
    # With a mask, the first image is the one repainted and the rest are
    # references: the image comes back at the first one's size.
    first = Image.open(E2E / p["references"][0]).convert("RGB")
    base, mask = io.BytesIO(), io.BytesIO()
    picture = first.resize((64, 64))
    picture.save(base, format="PNG")
    hole = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    hole.paste((0, 0, 0, 0), (16, 16, 48, 48))
    hole.save(mask, format="PNG")
    r = client.images.edit(image=[("base.png", base.getvalue(), "image/png"), files[0]], mask=("m.png", mask.getvalue(), "image/png"),
                           prompt=p["prompt"], response_format="b64_json",
                           extra_body={"steps": 2, "seed": 3, "guidance_scale": 1.0})
    got = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).convert("RGB")
    assert got.size == (64, 64), got.size
    kept = np.abs(pixels(got)[:8, :8] - pixels(picture)[:8, :8]).max()
    changed = np.abs(pixels(got)[24:40, 24:40] - pixels(picture)[24:40, 24:40]).max()
    assert changed > kept, (changed, kept)
    # A reference below the pipeline's 64 pixels a side is refused, by field.
    tiny = io.BytesIO()
    Image.new("RGB", (32, 96)).save(tiny, format="PNG")
    try:
        client.images.edit(image=[("tiny.png", tiny.getvalue(), "image/png")], prompt="x",
                           extra_body={"steps": 1})
        raise AssertionError("a 32x96 reference was accepted")
    except openai.BadRequestError as e:
        assert e.body.get("param") == "image" and "too small" in e.body.get("message", ""), e.body


def check_webuiapi(case):
    host, port = URL.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    assert [x["name"] for x in api.get_samplers()] == ["Euler"], api.get_samplers()
    p = CASES[case]["params"]
    # cfg_scale is the pipeline's own guidance on these families.
    r = api.txt2img(prompt=p["prompt"], negative_prompt=p.get("negative_prompt", ""), seed=p["seed"],
                    steps=p["steps"], cfg_scale=p["guidance"], width=p["width"], height=p["height"],
                    sampler_name="Euler")
    same_as(r.image, case)
    text = r.info["infotexts"][0]
    assert f"CFG scale: {p['guidance']:g}" in text and "Distilled" not in text, text


def main():
    first = next(iter(CASES))
    check_openai(first)
    check_webuiapi(first)
    if not FAMILY.startswith("klein"):
        # One picture to change: several are Klein's reference images.
        client = openai.OpenAI(base_url=f"{URL}/v1", api_key="unused", max_retries=0)
        two = [(f"{i}.png", (E2E / CASES[first]["files"][0]).read_bytes(), "image/png") for i in range(2)]
        try:
            client.images.edit(image=two, prompt="x", extra_body={"steps": 1})
            raise AssertionError("two images were accepted")
        except openai.BadRequestError as e:
            assert e.body.get("param") == "image" and "Klein" in e.body.get("message", ""), e.body
    with_references = [n for n, c in CASES.items() if "references" in c["params"]]
    for case in with_references:
        check_openai_references(case)
    print(f"{FAMILY}: openai and webuiapi images equal diffusers' "
          f"({len(with_references)} edits from reference images)")


if __name__ == "__main__":
    main()
