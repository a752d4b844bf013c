"""IP-Adapters through clients nobody here wrote: the official `openai`
package with the `ip_adapters` extension field (equal to diffusers'
reference), and the PyPI `webuiapi` client's ControlNetUnit with an
`ip-adapter_clip_sd15` module on A1111's txt2img (as the ControlNet
extension maps it: the unit's model the adapter, its weight the scale).
Run by tests/tests/ip_adapter.rs with the gateway's HTTP URL and a folder
holding `ref.png` (the picture), `scale.png` (diffusers' reference for the
OpenAI request) and `a1111.png` (gRPC's image for the A1111 request);
exits non-zero on the first thing that is not as those clients expect.

Usage: python ip_adapter_clients.py http://127.0.0.1:PORT DIR
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


def check_openai():
    client = openai.OpenAI(base_url=f"{URL}/v1", api_key="unused", max_retries=0)
    picture = base64.b64encode((DIR / "ref.png").read_bytes()).decode()
    extra = {"steps": 8, "seed": 1, "guidance_scale": 7.5,
             "ip_adapters": [{"name": "face", "image": picture, "scale": 0.7}]}
    r = client.images.generate(prompt=PROMPT, size="32x32", extra_body=extra)
    got = px(Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))))
    diff = np.abs(got - px(Image.open(DIR / "scale.png")))
    assert diff.max() <= 2, f"the OpenAI route's IP-Adapter differs from diffusers': max {diff.max()}"


def check_webuiapi():
    u = urlparse(URL)
    api = webuiapi.WebUIApi(host=u.hostname, port=u.port)
    assert any(m.startswith("face [") for m in api.controlnet_model_list()), api.controlnet_model_list()
    assert "ip-adapter_clip_sd15" in api.controlnet_module_list()
    unit = webuiapi.ControlNetUnit(image=Image.open(DIR / "ref.png"), module="ip-adapter_clip_sd15",
                                   model="face", weight=0.7)
    r = api.txt2img(prompt=PROMPT, steps=6, seed=3, cfg_scale=7, width=32, height=32, sampler_name="Euler",
                    controlnet_units=[unit])
    got, want = px(r.image), px(Image.open(DIR / "a1111.png"))
    assert (got == want).all(), f"webuiapi's IP-Adapter differs from gRPC's: max {np.abs(got - want).max()}"
    # An adapter kind that is not served: 400 naming the unit's module.
    bad = webuiapi.ControlNetUnit(image=Image.open(DIR / "ref.png"), module="ip-adapter_face_id",
                                  model="face").to_dict()
    resp = requests.post(f"{URL}/sdapi/v1/txt2img", json={
        "prompt": PROMPT, "steps": 2, "width": 32, "height": 32,
        "alwayson_scripts": {"ControlNet": {"args": [bad]}}})
    assert resp.status_code == 400 and "args[0].module" in resp.text, resp.text


check_openai()
check_webuiapi()
print("ok")
