"""Clients nobody here wrote, against a live sdserve gateway serving the
tiny FLUX.1-dev fixture: the official `openai` package (FLUX's extension
fields in `extra_body`) and the PyPI `webuiapi` A1111 client (a FLUX model
on the A1111 routes as Forge serves it), each image compared with the one
diffusers' FluxPipeline made for the same parameters (within 2/255).

Usage: python flux_clients.py http://127.0.0.1:PORT MODEL_NAME E2E_DIR
"""

import base64
import io
import json
import sys
import urllib.request
from pathlib import Path

import numpy as np
import openai
import webuiapi
from PIL import Image

URL, MODEL, E2E = sys.argv[1], sys.argv[2], Path(sys.argv[3])
CASES = {c["name"]: c for c in json.loads((E2E / "cases.json").read_text())["cases"]}


def pixels(img):
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def from_b64(s):
    return Image.open(io.BytesIO(base64.b64decode(s)))


def same_as(img, case):
    want = Image.open(E2E / CASES[case]["files"][0])
    d = np.abs(pixels(img) - pixels(want)).max()
    assert d <= 2, f"{case}: {d}/255 from diffusers' image"


def check_openai():
    client = openai.OpenAI(base_url=f"{URL}/v1", api_key="unused", max_retries=0)
    for case in ("g3.5", "true-cfg", "long-prompt"):
        p = CASES[case]["params"]
        extra = {"steps": p["steps"], "seed": p["seed"], "guidance_scale": p["guidance"],
                 "max_sequence_length": p["max_sequence_length"]}
        if "negative_prompt" in p:
            extra.update(negative_prompt=p["negative_prompt"], true_cfg_scale=p["true_cfg_scale"])
        r = client.images.generate(prompt=p["prompt"], size=f"{p['width']}x{p['height']}",
                                   response_format="b64_json", extra_body=extra)
        same_as(from_b64(r.data[0].b64_json), case)
    # A size that is no multiple of 16: 400, naming `size` (the OpenAI field).
    try:
        client.images.generate(prompt="x", size="40x40", extra_body={"steps": 1})
        raise AssertionError("a 40×40 FLUX image was accepted")
    except openai.BadRequestError as e:
        assert e.body.get("param") == "size" and "multiple of 16" in e.body["message"], e.body
    models = {m.id: m for m in client.models.list()}
    assert models[MODEL].model_extra["sdserve"]["family"] == "flux-dev", models[MODEL]


def check_webuiapi():
    host, port = URL.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    # A FLUX model's one sampler, as Forge lists it.
    assert [x["name"] for x in api.get_samplers()] == ["Euler"], api.get_samplers()
    p = CASES["a1111-default"]["params"]
    # Forge's FLUX defaults: cfg_scale 1 (no real CFG), distilled 3.5.
    r = api.txt2img(prompt=p["prompt"], seed=p["seed"], steps=p["steps"], cfg_scale=1.0,
                    width=p["width"], height=p["height"], sampler_name="Euler")
    same_as(r.image, "a1111-default")
    info = r.info
    assert "Distilled CFG Scale: 3.5" in info["infotexts"][0], info["infotexts"][0]
    assert info["distilled_cfg_scale"] == 3.5, info
    # Forge's own field, as a raw body: the distilled guidance.
    p = CASES["default-length"]["params"]
    body = {"prompt": p["prompt"], "seed": p["seed"], "steps": p["steps"], "cfg_scale": 1,
            "distilled_cfg_scale": p["guidance"], "width": p["width"], "height": p["height"],
            "sampler_name": "Euler"}
    req = urllib.request.Request(f"{URL}/sdapi/v1/txt2img", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    out = json.loads(urllib.request.urlopen(req).read())
    same_as(from_b64(out["images"][0]), "default-length")
    assert "Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 2" in \
        json.loads(out["info"])["infotexts"][0]
    # Attention weights are refused on a T5 prompt, naming it.
    body["prompt"] = "a (red:1.3) cube"
    req = urllib.request.Request(f"{URL}/sdapi/v1/txt2img", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req)
        raise AssertionError("a weighted FLUX prompt was accepted")
    except urllib.error.HTTPError as e:
        assert e.code in (400, 422), e.code
        assert "prompt" in e.read().decode()


check_openai()
check_webuiapi()
print("openai and webuiapi: FLUX images equal diffusers'")
