"""Clients nobody here wrote, against a live sdserve gateway's HTTP door:
the official `openai` package and the PyPI `webuiapi` (AUTOMATIC1111)
client. Run by tests/tests/http.rs with the gateway's base URL; exits
non-zero (an assertion) on the first thing that does not work as those
clients expect.

Usage: python http_clients.py http://127.0.0.1:PORT MODEL_NAME
"""

import base64
import io
import sys
import threading
import time
import urllib.request
from urllib.parse import urlparse

import numpy as np
import openai
import webuiapi
from PIL import Image

URL, MODEL = sys.argv[1], sys.argv[2]
SIZE = 64


def pixels(img):
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def from_b64(s):
    return Image.open(io.BytesIO(base64.b64decode(s)))


def check_openai():
    client = openai.OpenAI(base_url=f"{URL}/v1", api_key="unused", max_retries=0)
    models = [m.id for m in client.models.list()]
    assert MODEL in models, models

    r = client.images.generate(
        prompt="a red cube on a blue table", n=2, size=f"{SIZE}x{SIZE}", response_format="b64_json",
        extra_body={"steps": 4, "seed": 7, "scheduler": "euler-a", "guidance_scale": 7.0},
    )
    assert r.created > 0 and len(r.data) == 2, r
    a, b = (from_b64(d.b64_json) for d in r.data)
    assert a.size == b.size == (SIZE, SIZE), (a.size, b.size)
    assert (pixels(a) != pixels(b)).any(), "n=2 gave the same image twice"

    # response_format=url: an http URL this gateway serves.
    r = client.images.generate(prompt="a cat", size=f"{SIZE}x{SIZE}", response_format="url",
                               extra_body={"steps": 2, "seed": 1})
    url = r.data[0].url
    assert urlparse(url).scheme == "http" and "/v1/images/files/" in url, url
    with urllib.request.urlopen(url) as resp:
        assert resp.headers["Content-Type"] == "image/png"
        assert Image.open(io.BytesIO(resp.read())).size == (SIZE, SIZE)

    # Edits: image-to-image from an upload.
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (200, 30, 30)).save(buf, format="PNG")
    r = client.images.edit(image=("red.png", buf.getvalue(), "image/png"), prompt="a red cube",
                           size=f"{SIZE}x{SIZE}", extra_body={"steps": 4, "strength": 0.5, "seed": 3})
    assert from_b64(r.data[0].b64_json).size == (SIZE, SIZE)

    # A bad size is a 400 naming the field.
    try:
        client.images.generate(prompt="x", size="63x64")
        raise AssertionError("63x64 was accepted")
    except openai.BadRequestError as e:
        assert "width" in str(e), str(e)
    return pixels(from_b64(client.images.generate(
        prompt="a lighthouse", n=1, size=f"{SIZE}x{SIZE}",
        extra_body={"steps": 4, "seed": 12, "scheduler": "euler-a", "guidance_scale": 7.0},
    ).data[0].b64_json))


def check_webuiapi(reference):
    host = urlparse(URL)
    api = webuiapi.WebUIApi(host=host.hostname, port=host.port, sampler="Euler a", steps=4)
    assert "Euler a" in [s["name"] for s in api.get_samplers()]
    assert MODEL in api.util_get_model_names(), api.util_get_model_names()
    api.util_set_model(MODEL)
    assert api.get_options()["sd_model_checkpoint"] == MODEL

    r = api.txt2img(prompt="a lighthouse", width=SIZE, height=SIZE, seed=11, batch_size=2, cfg_scale=7)
    assert len(r.images) == 2 and all(i.size == (SIZE, SIZE) for i in r.images)
    assert r.info["all_seeds"] == [11, 12], r.info
    assert r.info["sampler_name"] == "Euler a" and r.info["steps"] == 4
    assert "Seed: 12" in r.info["infotexts"][1], r.info["infotexts"]
    # Image i of a batch is seed + i with a generator of its own: the second
    # equals a lone generation with seed 12 (through the OpenAI door).
    assert (pixels(r.images[1]) == reference).all(), "batch image 1 is not seed 12's image"

    init = Image.new("RGB", (SIZE, SIZE), (30, 30, 200))
    r = api.img2img(images=[init], prompt="a blue cube", width=SIZE, height=SIZE, seed=4,
                    denoising_strength=0.6)
    assert len(r.images) == 1 and r.images[0].size == (SIZE, SIZE)
    assert r.info["denoising_strength"] == 0.6

    check_progress_and_interrupt(api)


def check_progress_and_interrupt(api):
    """A long generation reports progress, then stops on interrupt and still
    answers with its (partial) image."""
    out = {}

    def run():
        t = time.time()
        out["result"] = api.txt2img(prompt="a long one", width=SIZE, height=SIZE, seed=2, steps=1000)
        out["seconds"] = time.time() - t

    worker = threading.Thread(target=run)
    worker.start()
    seen = None
    deadline = time.time() + 60
    while time.time() < deadline and worker.is_alive():
        p = api.get_progress()
        if p["state"]["sampling_step"] >= 10 and p["current_image"]:
            seen = p
            break
        time.sleep(0.05)
    assert seen is not None, "no progress seen"
    assert 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 1000, seen
    assert seen["state"]["job_count"] == 1
    from_b64(seen["current_image"]).load()
    assert api.interrupt() == {}
    worker.join(60)
    assert not worker.is_alive(), "the interrupted generation did not answer"
    r = out["result"]
    assert len(r.images) == 1 and r.images[0].size == (SIZE, SIZE)
    # It stopped early: the same request run to its end draws another image.
    full = api.txt2img(prompt="a long one", width=SIZE, height=SIZE, seed=2, steps=1000)
    assert (pixels(full.images[0]) != pixels(r.images[0])).any(), "the interrupt did not stop it"
    idle = api.get_progress()
    assert idle["state"]["job_count"] == 0 and idle["progress"] == 0, idle


def main():
    reference = check_openai()
    check_webuiapi(reference)
    print("http clients: ok")


if __name__ == "__main__":
    main()
