"""ControlNets through clients nobody here wrote: the PyPI `webuiapi`
client's ControlNetUnit on A1111's txt2img (the extension's fields and its
own window rule), its /controlnet/* calls, and the official `openai`
package with the `controlnets` extension field. Run by
tests/tests/controlnet.rs with the gateway's HTTP URL and a folder holding
`hint.png`, `a1111.png` (gRPC's image for the A1111 request, with A1111's
window rule), `diffusers.png` (the same window by diffusers' rule) and
`weight.png` (diffusers' reference for the OpenAI request); exits non-zero
on the first thing that is not as those clients expect.

Usage: python controlnet_clients.py http://127.0.0.1:PORT DIR
"""

import base64
import io
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import openai
import requests
import webuiapi
from PIL import Image

URL, DIR = sys.argv[1], Path(sys.argv[2])
PROMPT = "a photograph of an astronaut riding a horse"


def px(img):
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def from_b64(s):
    return Image.open(io.BytesIO(base64.b64decode(s)))


def check_webuiapi():
    u = urlparse(URL)
    api = webuiapi.WebUIApi(host=u.hostname, port=u.port)
    assert api.controlnet_version() == 3, api.controlnet_version()
    models = api.controlnet_model_list()
    assert any(m.startswith("edges [") for m in models) and any(m.startswith("depth [") for m in models), models
    assert "canny" in api.controlnet_module_list()
    hint = Image.open(DIR / "hint.png")
    unit = webuiapi.ControlNetUnit(image=hint, module="none", model="edges", weight=0.8, guidance_end=0.5,
                                   resize_mode="Just Resize")
    r = api.txt2img(prompt=PROMPT, steps=8, seed=7, cfg_scale=7, width=32, height=32, sampler_name="Euler",
                    controlnet_units=[unit])
    got, want = px(r.image), px(Image.open(DIR / "a1111.png"))
    assert (got == want).all(), f"webuiapi's ControlNet differs from gRPC's with A1111's rule: max {np.abs(got - want).max()}"
    other = px(Image.open(DIR / "diffusers.png"))
    assert (got != other).any(), "A1111's window rule gave diffusers' image"
    assert 'ControlNet 0: "Module: none, Model: edges, Weight: 0.8, Resize Mode: Just Resize' in r.info["infotexts"][0], \
        r.info["infotexts"][0]
    # The extension's detected map follows the image: here the hint itself.
    assert len(r.images) == 2, len(r.images)
    assert (px(r.images[1]) == px(hint)).all(), "the detected map is not the hint"
    # The model by a partial name, any case, as the extension matches it.
    unit.model = "EDG"
    r2 = api.txt2img(prompt=PROMPT, steps=8, seed=7, cfg_scale=7, width=32, height=32, sampler_name="Euler",
                     controlnet_units=[unit])
    assert (px(r2.image) == got).all(), "a partial model name matched another ControlNet"
    # A unit that cannot work: 400 naming it, as the API's clients read errors.
    bad = webuiapi.ControlNetUnit(image=hint, model="nope").to_dict()
    resp = requests.post(f"{URL}/sdapi/v1/txt2img", json={
        "prompt": PROMPT, "steps": 2, "width": 32, "height": 32,
        "alwayson_scripts": {"ControlNet": {"args": [bad]}}})
    assert resp.status_code == 400, resp.text
    assert "args[0].model" in resp.text and "model not found" in resp.text, resp.text
    # A disabled unit is no unit.
    off = dict(bad, enabled=False)
    resp = requests.post(f"{URL}/sdapi/v1/txt2img", json={
        "prompt": PROMPT, "steps": 2, "width": 32, "height": 32,
        "alwayson_scripts": {"ControlNet": {"args": [off]}}})
    assert resp.status_code == 200, resp.text


def check_openai():
    client = openai.OpenAI(base_url=f"{URL}/v1", api_key="unused", max_retries=0)
    hint = base64.b64encode((DIR / "hint.png").read_bytes()).decode()
    extra = {"steps": 8, "seed": 1, "guidance_scale": 7.5,
             "controlnets": [{"name": "edges", "image": hint, "weight": 0.7}]}
    r = client.images.generate(prompt=PROMPT, size="32x32", extra_body=extra)
    got, want = px(from_b64(r.data[0].b64_json)), px(Image.open(DIR / "weight.png"))
    diff = np.abs(got - want)
    assert diff.max() <= 2, f"the OpenAI route's ControlNet differs from diffusers': max {diff.max()}"
    try:
        client.images.generate(prompt=PROMPT, size="32x32",
                               extra_body={"controlnets": [{"name": "edges", "image": hint, "weight": 5}]})
        raise AssertionError("a weight of 5 was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "controlnets[0].weight", e.body


check_webuiapi()
check_openai()
print("ok")
