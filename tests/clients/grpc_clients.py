"""A client nobody here wrote: grpcio stubs generated from proto/ at run
time (grpc_tools.protoc), against a running gateway serving sd1-tiny (with
textual-inversion embeddings) and sd1-inpaint-tiny.

- inpainting on an ordinary UNet and on a 9-channel one, and textual
  inversion: each case of the fixtures' diffusers references, within 2/255
  (max) and 99.9% within 1/255, as the Rust tests compare;
- hires fix: the image at twice the size, its parameters echoed;
- bad masks: INVALID_ARGUMENT naming `mask`;
- ControlNets and IP-Adapters (the fixtures' diffusers references, each
  within the same bounds), ListControlNets, and a bad unit named
  (`controlnets[0].weight`).

Usage: grpc_clients.py HOST:PORT FIXTURES_DIR PROTO_DIR
"""

import io
import json
import pathlib
import sys
import tempfile

import grpc
import numpy as np
from grpc_tools import protoc
from PIL import Image

TARGET, FIXTURES, PROTO = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])


def stubs(out):
    files = [str(p.relative_to(PROTO)) for p in sorted((PROTO / "sd" / "v1").glob("*.proto"))]
    # protoc's own well-known types (grpc_tools ships them).
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{PROTO}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", *files])
    assert rc == 0, f"protoc failed ({rc})"
    sys.path.insert(0, out)
    from sd.v1 import generation_pb2, generation_pb2_grpc  # noqa: E402

    return generation_pb2, generation_pb2_grpc


def rgb(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def compare(name, got, want_path):
    want = np.asarray(Image.open(want_path).convert("RGB"), dtype=np.int16)
    assert got.shape == want.shape, f"{name}: size {got.shape} vs {want.shape}"
    d = np.abs(got - want)
    within = float((d <= 1).mean())
    assert d.max() <= 2 and within >= 0.999, f"{name}: max {d.max()}/255, {within:.4%} within 1/255"
    return int(d.max())


def request(pb, params, inputs, model):
    r = pb.GenerateRequest(prompt=params.get("prompt", ""), negative_prompt=params.get("negative_prompt", ""),
                           width=params.get("width", 0), height=params.get("height", 0),
                           steps=params.get("steps", 0), scheduler=params.get("scheduler", ""),
                           num_images=params.get("num_images", 0), model=model)
    if "guidance" in params:
        r.guidance_scale = params["guidance"]
    if "seed" in params:
        r.seed = params["seed"]
    if "strength" in params:
        r.strength = params["strength"]
    for field in ("true_cfg_scale", "max_sequence_length"):
        if field in params:
            setattr(r, field, params[field])
    for field in ("init_image", "mask"):
        if field in params:
            setattr(r, field, (inputs / params[field]).read_bytes())
    for u in params.get("controlnets", []):
        unit = r.controlnets.add(name=u["name"], image=(inputs / u["image"]).read_bytes())
        for k in ("weight", "start", "end", "union_mode"):
            if k in u:
                setattr(unit, k, u[k])
    for u in params.get("ip_adapters", []):
        r.ip_adapters.add(name=u["name"], image=(inputs / u["image"]).read_bytes(), scale=u.get("scale", 1.0))
    return r


def cases(stub, pb, inputs, refs, model):
    spec = json.loads((refs / "cases.json").read_text())
    worst = 0
    for case in spec["cases"]:
        r = stub.Generate(request(pb, case["params"], inputs, model), timeout=300)
        assert len(r.images) == len(case["files"]), case["name"]
        for image, f in zip(r.images, case["files"]):
            worst = max(worst, compare(f"{model}/{case['name']}", rgb(image.data), refs / f))
    print(f"{model} {refs.name}: {len(spec['cases'])} cases equal diffusers' (max diff {worst}/255)")


def refused(stub, req, field):
    try:
        stub.Generate(req, timeout=60)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, e.code(), e.details())
        assert e.details().startswith(field), (field, e.details())
        return
    raise AssertionError(f"accepted: expected INVALID_ARGUMENT naming {field}")


def main(out):
    pb, pb_grpc = stubs(out)
    stub = pb_grpc.GenerationStub(grpc.insecure_channel(TARGET))
    inpaint = FIXTURES / "inpaint"
    cases(stub, pb, inpaint, inpaint / "sd1-tiny", "sd1-tiny")
    cases(stub, pb, inpaint, inpaint / "sd1-inpaint-tiny", "sd1-inpaint-tiny")
    ti = FIXTURES / "ti" / "sd1"
    cases(stub, pb, ti, ti, "sd1-tiny")

    # Hires fix: a latent second pass at twice the size.
    r = stub.Generate(pb.GenerateRequest(prompt="a lighthouse", width=32, height=32, steps=3, seed=4,
                                         model="sd1-tiny",
                                         hires=pb.Hires(scale=2, upscaler="Latent", steps=2, strength=0.6)),
                      timeout=300)
    assert (r.images[0].width, r.images[0].height) == (64, 64), r.images[0]
    assert rgb(r.images[0].data).shape == (64, 64, 3)
    h = r.parameters.hires
    assert (h.width, h.height, h.upscaler, h.steps) == (64, 64, "Latent", 2), h
    print("hires fix: 32x32 then 64x64, parameters echoed")

    # Bad masks, named.
    init = (inpaint / "init-sd1.png").read_bytes()
    black = io.BytesIO()
    Image.new("L", (32, 32), 0).save(black, format="PNG")
    base = dict(prompt="x", steps=2, seed=1)
    refused(stub, pb.GenerateRequest(**base, model="sd1-tiny", mask=(inpaint / "mask-sd1.png").read_bytes()),
            "mask")
    refused(stub, pb.GenerateRequest(**base, model="sd1-tiny", init_image=init, mask=b"not an image"), "mask")
    refused(stub, pb.GenerateRequest(**base, model="sd1-tiny", init_image=init, mask=black.getvalue()), "mask")
    refused(stub, pb.GenerateRequest(**base, model="sd1-inpaint-tiny", init_image=init), "mask")
    print("bad masks refused naming mask")

    # ControlNets and IP-Adapters, equal to diffusers'.
    control, ip = FIXTURES / "controlnet", FIXTURES / "ip-adapter"
    cases(stub, pb, control, control / "sd1-tiny", "sd1-tiny")
    cases(stub, pb, ip, ip / "sd1-tiny", "sd1-tiny")
    from sd.v1 import tensor_pb2  # noqa: E402 (generated above)

    listed = stub.ListControlNets(tensor_pb2.ListControlNetsRequest(model="sd1-tiny"), timeout=60)
    assert sorted((c.name, c.layout) for c in listed.controlnets) == [("depth", "file"), ("edges", "folder")], listed
    hint = (control / "control-sd1.png").read_bytes()
    refused(stub, pb.GenerateRequest(**base, model="sd1-tiny",
                                     controlnets=[pb.ControlUnit(name="edges", image=hint, weight=7)]),
            "controlnets[0].weight")
    print("ControlNets and IP-Adapters equal diffusers'; a bad unit refused naming it")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="sd-grpc-stubs-") as out:
        main(out)
