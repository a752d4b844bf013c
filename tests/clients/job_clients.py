"""Clients nobody here wrote, on the async jobs API of a stack started with
`sdctl up --jobs`:

- grpcio stubs generated from proto/ at run time: SubmitJob, WatchJob (a
  progress event per step, then the result), GetJob (the same image),
  CancelJob of a running job (it ends cancelled, without images), a bad
  request refused naming its field;
- plain HTTP (urllib): POST /v1/jobs with a webhook_url and an
  Idempotency-Key (the same key gives the same job), GET until completed;
- the Standard Webhooks reference library (`standardwebhooks`, from PyPI)
  verifies every webhook the gateway sends, on a receiver of our own.

Usage: job_clients.py GRPC_HOST:PORT HTTP_BASE PROTO_DIR SECRET
"""

import base64
import http.server
import io
import json
import pathlib
import sys
import tempfile
import threading
import time
import urllib.request

import grpc
from grpc_tools import protoc
from PIL import Image
from standardwebhooks import Webhook

TARGET, HTTP, PROTO, SECRET = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]), sys.argv[4]


def stubs(out):
    import grpc_tools

    files = [str(p.relative_to(PROTO)) for p in sorted((PROTO / "sd" / "v1").glob("*.proto"))]
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{PROTO}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", *files])
    assert rc == 0, f"protoc failed ({rc})"
    sys.path.insert(0, out)
    from sd.v1 import generation_pb2, generation_pb2_grpc  # noqa: E402

    return generation_pb2, generation_pb2_grpc


class Hooks(http.server.BaseHTTPRequestHandler):
    verified = []
    refused = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        try:
            payload = Webhook(SECRET).verify(body, dict(self.headers))
            Hooks.verified.append((self.headers["webhook-id"], payload))
            self.send_response(204)
        except Exception as e:  # a delivery that does not verify
            Hooks.refused.append(str(e))
            self.send_response(400)
        self.end_headers()

    def log_message(self, *args):
        pass


def http_json(method, path, body=None, headers=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(HTTP + path, data=data, method=method,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), dict(e.headers)


def png_size(data):
    return Image.open(io.BytesIO(data)).size


def grpc_part(pb, rpc):
    ch = grpc.insecure_channel(TARGET)
    stub = rpc.GenerationStub(ch)
    req = pb.GenerateRequest(prompt="a red bicycle", width=64, height=64, steps=8, seed=11)
    job = stub.SubmitJob(pb.SubmitJobRequest(request=req))
    assert job.status in (pb.JOB_STATUS_QUEUED, pb.JOB_STATUS_IN_PROGRESS), job
    progress, result = 0, None
    for ev in stub.WatchJob(pb.JobRequest(id=job.id)):
        kind = ev.WhichOneof("event")
        if kind == "progress":
            progress += 1
        elif kind == "result":
            result = ev.result
    assert progress >= 1 and result is not None, (progress, result)
    got = stub.GetJob(pb.JobRequest(id=job.id))
    assert got.status == pb.JOB_STATUS_COMPLETED, got.status
    assert got.result.images[0].data == result.images[0].data
    assert got.result.parameters.seed == 11
    sync = stub.Generate(req)
    a = Image.open(io.BytesIO(sync.images[0].data)).convert("RGB").tobytes()
    b = Image.open(io.BytesIO(result.images[0].data)).convert("RGB").tobytes()
    assert a == b, "the job's image differs from Generate's"
    # Cancel a running job.
    long = pb.GenerateRequest(prompt="a long one", width=256, height=256, steps=150, seed=3)
    job = stub.SubmitJob(pb.SubmitJobRequest(request=long))
    deadline = time.time() + 30
    while stub.GetJob(pb.JobRequest(id=job.id)).progress == 0:
        assert time.time() < deadline, "never started"
        time.sleep(0.05)
    c = stub.CancelJob(pb.JobRequest(id=job.id))
    assert c.status == pb.JOB_STATUS_CANCELLED
    try:
        for _ in stub.WatchJob(pb.JobRequest(id=job.id)):
            pass
        raise AssertionError("watching a cancelled job ended without its status")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.CANCELLED, e
    # Bad input, named.
    try:
        stub.SubmitJob(pb.SubmitJobRequest(request=pb.GenerateRequest(prompt="x", width=65)))
        raise AssertionError("a bad width was queued")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "width" in e.details(), e
    return progress


def http_part(hook_url):
    body = {"prompt": "a green teapot", "size": "64x64", "steps": 6, "webhook_url": hook_url}
    status, job, headers = http_json("POST", "/v1/jobs", body, {"Idempotency-Key": "teapot-1"})
    assert status == 202 and job["status"] == "queued", (status, job)
    assert headers.get("location") == f"/v1/jobs/{job['id']}" or headers.get("Location") == f"/v1/jobs/{job['id']}"
    status2, again, _ = http_json("POST", "/v1/jobs", body, {"Idempotency-Key": "teapot-1"})
    assert again["id"] == job["id"], (job, again)
    deadline = time.time() + 60
    while True:
        _, j, _ = http_json("GET", f"/v1/jobs/{job['id']}")
        if j["status"] in ("completed", "failed", "cancelled"):
            break
        assert time.time() < deadline, j
        time.sleep(0.1)
    assert j["status"] == "completed", j
    assert png_size(base64.b64decode(j["data"][0]["b64_json"])) == (64, 64)
    status, e, _ = http_json("POST", "/v1/jobs", {"prompt": "x", "n": 0})
    assert status == 400 and e["error"]["param"] == "n", (status, e)
    status, e, _ = http_json("GET", "/v1/jobs/job_00000000")
    assert status == 404, (status, e)
    # The webhook, verified by the reference library.
    deadline = time.time() + 30
    while not any(p["id"] == job["id"] for _, p in Hooks.verified):
        assert time.time() < deadline, f"no verified webhook (refused: {Hooks.refused})"
        time.sleep(0.1)
    (msg_id, payload), = [(m, p) for m, p in Hooks.verified if p["id"] == job["id"]]
    assert payload["status"] == "completed" and "data" not in payload, payload
    assert not Hooks.refused, Hooks.refused
    return job["id"], msg_id


def main():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    with tempfile.TemporaryDirectory() as out:
        pb, rpc = stubs(out)
        steps = grpc_part(pb, rpc)
        job, msg = http_part(hook_url)
    print(json.dumps({"grpc_progress_events": steps, "http_job": job, "webhook_id": msg,
                      "webhooks_verified": len(Hooks.verified)}))
    print("job clients ok")


if __name__ == "__main__":
    main()
