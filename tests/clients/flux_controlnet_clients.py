"""FLUX.1 ControlNets through clients nobody here wrote, against a running
gateway serving flux-dev-tiny with the fixtures' FLUX ControlNets:

- grpcio stubs generated from proto/ at run time (grpc_clients.py's): every
  case of make_flux_controlnet_reference.py's references (weight, window, a
  union's control type, two nets, true CFG, plain) within 2/255 (max) and
  99.9% within 1/255; ListControlNets with a union's control types; a
  union unit without its type refused naming `controlnets[0].union_mode`;
- the official `openai` package: the union case through the `controlnets`
  extension field (with `union_mode`) equal to diffusers' image, and a
  control type past the union's refused with `param`.

Usage: flux_controlnet_clients.py HOST:PORT FIXTURES_DIR PROTO_DIR HTTP_URL
"""

import base64
import json
import pathlib
import sys
import tempfile

import grpc
import openai

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import grpc_clients as g  # noqa: E402 (reads HOST:PORT FIXTURES_DIR PROTO_DIR from argv)

HTTP = sys.argv[4]


def check_grpcio(out, control, refs):
    pb, pb_grpc = g.stubs(out)
    stub = pb_grpc.GenerationStub(grpc.insecure_channel(g.TARGET))
    g.cases(stub, pb, control, refs, "")
    from sd.v1 import tensor_pb2  # noqa: E402 (generated above)

    listed = stub.ListControlNets(tensor_pb2.ListControlNetsRequest(check=["canny", "union"]), timeout=60)
    assert [(c.name, c.union_modes) for c in listed.controlnets] == [("canny", 0), ("union", 3)], listed
    hint = (control / "control-flux.png").read_bytes()
    g.refused(stub, pb.GenerateRequest(prompt="x", width=32, height=32, steps=2, seed=1,
                                       controlnets=[pb.ControlUnit(name="union", image=hint)]),
              "controlnets[0].union_mode")
    print("grpcio: FLUX ControlNet cases equal diffusers'; a union's types listed; a unit without one named")


def check_openai(control, refs):
    case = next(c for c in json.loads((refs / "cases.json").read_text())["cases"] if c["name"] == "union")
    p, unit = case["params"], case["params"]["controlnets"][0]
    hint = base64.b64encode((control / unit["image"]).read_bytes()).decode()
    client = openai.OpenAI(base_url=f"{HTTP}/v1", api_key="unused", max_retries=0)
    extra = {"steps": p["steps"], "seed": p["seed"], "guidance_scale": p["guidance"],
             "max_sequence_length": p["max_sequence_length"],
             "controlnets": [{"name": unit["name"], "image": hint, "weight": unit["weight"],
                              "union_mode": unit["union_mode"]}]}
    r = client.images.generate(prompt=p["prompt"], size=f"{p['width']}x{p['height']}", extra_body=extra)
    worst = g.compare("openai union", g.rgb(base64.b64decode(r.data[0].b64_json)), refs / case["files"][0])
    bad = dict(extra, controlnets=[dict(extra["controlnets"][0], union_mode=3)])
    try:
        client.images.generate(prompt=p["prompt"], size="32x32", extra_body=bad)
        raise AssertionError("a control type past the union's was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "controlnets[0].union_mode", e.body
    print(f"openai: the union case equals diffusers' (max diff {worst}/255); a bad type named")


if __name__ == "__main__":
    control = g.FIXTURES / "controlnet"
    refs = control / "flux-dev-tiny"
    with tempfile.TemporaryDirectory(prefix="sd-grpc-stubs-") as out:
        check_grpcio(out, control, refs)
    check_openai(control, refs)
    print("ok")
