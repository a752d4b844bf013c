"""Benchmark: FLUX.2 Klein-4B's architecture with random weights, whole
generations at 512² on this machine — the sdserve stack (`sdctl up`,
release build: text-encoder, denoiser, autoencoder and gateway as their own
processes, a gRPC Generate through stubs generated from our proto) against
diffusers' `Flux2KleinPipeline`, in turns (stack, diffusers, stack: the two
need not fit in memory at once), with each process's peak resident memory
(the kernel's VmHWM) and how far the two images are apart.

The widths are Klein-4B's: a Qwen3 of Qwen3-4B's width (hidden 2560, 32/8
heads of 128, SwiGLU 9728, vocabulary 151936) with the 27 layers Klein
reads (hidden states 9, 18 and 27; the released encoder has 36, which the
pipeline runs but never reads), a Flux2 transformer 3072 wide (24 heads of
128, joint attention 7680, 128 channels, SwiGLU ×3) and the FLUX.2 VAE as
diffusers' defaults build it. `--double`/`--single` set how many of the
transformer's 5 double- and 20 single-stream blocks are built: on an
AVX2-only CPU bf16 is emulated (slower than fp32) and the whole model in
fp32 does not fit 24 GB, so the default keeps 1 and 4 — each block's cost
is the real one. Step-distilled (as the released Klein-4B): 4 steps, no
classifier-free guidance.

Usage: python tools/bench/klein_pipeline.py WORK_DIR [--double N] [--single N] [--runs N] [--threads N] [--write-only]
(run from the repository root after `cargo build --release --bins`)
"""

import argparse
import base64
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The fixture scripts: in the repository, or beside this script in the GPU
# bundle (`fixtures/`, whose `run-checks.sh` writes the model with
# `--write-only`).
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from grpc_stubs import free_port, stubs  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon, dramatic light, 35mm"
SIZE = 512
SEED = 42

QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
                tie_word_embeddings=True)
KLEIN_4B = dict(patch_size=1, in_channels=128, num_attention_heads=24, attention_head_dim=128,
                joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
                axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False)


def write_model(out: Path, double: int, single: int):
    """A Flux2KleinPipeline directory, written one component at a time so
    that only one is in memory."""
    if (out / "model_index.json").exists():
        return
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from make_klein_models import SCHEDULER
    from make_qwen3_reference import tokenizer as qwen_tokenizer
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    qwen_tokenizer(tmp / "tokenizer")
    torch.manual_seed(0)
    config = Qwen3Config(**QWEN3_4B, num_hidden_layers=27,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    te = Qwen3ForCausalLM(config).eval()
    te.save_pretrained(tmp / "text_encoder", max_shard_size="20GB")
    del te
    t = Flux2Transformer2DModel(**KLEIN_4B, num_layers=double, num_single_layers=single).eval()
    t.save_pretrained(tmp / "transformer", max_shard_size="20GB")
    del t
    AutoencoderKLFlux2().eval().save_pretrained(tmp / "vae")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "Flux2KleinPipeline", "_diffusers_version": "0.42.1", "is_distilled": True,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
    tmp.rename(out)


def children(pid: int):
    """The processes whose parent is `pid`, by name."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid:
            out[name] = int(p.name)
    return out


def peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stack_turn(model: Path, runs: int, threads: int, pb, pb_grpc):
    """Start the stack, generate `runs` images; seconds per image, the
    first image's PNG and each service's peak memory (MiB)."""
    import grpc

    port = free_port()
    env = dict(os.environ, SD_TORCH_THREADS=str(threads), SD_CALIBRATION_SECONDS="0")
    proc = subprocess.Popen([str(ROOT / "target" / "release" / "sdctl"), "up", "--model", str(model),
                             "--port", str(port), "--no-http", "--load-timeout", "1800"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        stub = pb_grpc.GenerationStub(grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 1 << 28)]))
        deadline = time.time() + 1800
        while True:
            try:
                stub.ListModels(pb.ListModelsRequest(), timeout=5)
                break
            except grpc.RpcError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the stack did not come up: {proc.stderr.read() if proc.poll() else ''}")
                time.sleep(2)
        req = pb.GenerateRequest(prompt=PROMPT, width=SIZE, height=SIZE, seed=SEED, steps=4)
        times, png = [], None
        for _ in range(runs):
            t = time.perf_counter()
            reply = stub.Generate(req, timeout=3600)
            times.append(time.perf_counter() - t)
            png = png or reply.images[0].data
        peaks = {name: peak_mib(pid) for name, pid in children(proc.pid).items() if name.startswith("sd-")}
        return times, png, peaks
    finally:
        proc.terminate()
        proc.wait(timeout=120)


DIFFUSERS = r"""
import io, json, sys, time, torch
from diffusers import Flux2KleinPipeline
model, runs, threads, prompt, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
pipe = Flux2KleinPipeline.from_pretrained(model, torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
times, png = [], None
for _ in range(runs):
    t = time.perf_counter()
    # The step count given: the pipeline's default is 50 even for a
    # step-distilled model (is_distilled only turns guidance off).
    image = pipe(prompt=prompt, height=size, width=size, num_inference_steps=4,
                 generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    times.append(time.perf_counter() - t)
    if png is None:
        buf = io.BytesIO(); image.save(buf, format="PNG"); png = buf.getvalue()
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0] / 1024
sys.stdout.write(json.dumps({"times": times, "peak": peak, "png": __import__("base64").b64encode(png).decode()}))
"""


def diffusers_turn(model: Path, runs: int, threads: int):
    out = subprocess.run([sys.executable, "-c", DIFFUSERS, str(model), str(runs), str(threads), PROMPT,
                          str(SIZE), str(SEED)], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout)
    return r["times"], base64.b64decode(r["png"]), r["peak"]


def apart(a: bytes, b: bytes):
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float64)
    mse = ((x - y) ** 2).mean()
    psnr = float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)
    return int(np.abs(x - y).max()), psnr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--write-only", action="store_true", help="write the model directory and stop")
    a = ap.parse_args()
    model = a.work / f"klein-4b-width-{a.double}d{a.single}s"
    write_model(model, a.double, a.single)
    if a.write_only:
        print(f"wrote {model}")
        return
    with tempfile.TemporaryDirectory(prefix="sd-bench-stubs-") as out:
        pb, pb_grpc = stubs(out, "generation")
        first, ours_png, peaks = stack_turn(model, a.runs, a.threads, pb, pb_grpc)
        print(f"stack turn 1: {first}", file=sys.stderr)
        theirs, theirs_png, their_peak = diffusers_turn(model, a.runs, a.threads)
        print(f"diffusers: {theirs}", file=sys.stderr)
        second, _, peaks2 = stack_turn(model, a.runs, a.threads, pb, pb_grpc)
        print(f"stack turn 2: {second}", file=sys.stderr)
    ours = statistics.mean(first + second)
    ref = statistics.mean(theirs)
    diff, psnr = apart(ours_png, theirs_png)
    print(f"FLUX.2 Klein-4B width ({a.double} of 5 double, {a.single} of 20 single blocks; Qwen3-4B width, "
          f"27 layers), fp32, {SIZE}², 4 steps (distilled), {a.threads} threads; "
          f"stack {a.runs}+{a.runs} images in two turns, diffusers {a.runs} between them")
    print("| pipeline | seconds per image | peak memory (MiB) |")
    print("|---|---|---|")
    mem = {k: max(peaks.get(k, 0), peaks2.get(k, 0)) for k in sorted(set(peaks) | set(peaks2))}
    total = sum(mem.values())
    print(f"| sdserve stack (gRPC Generate) | {ours:.1f} | {total:.0f} in all: "
          + ", ".join(f"{k} {v:.0f}" for k, v in mem.items()) + " |")
    print(f"| diffusers Flux2KleinPipeline | {ref:.1f} | {their_peak:.0f} |")
    print(f"| ratio (stack ÷ diffusers) | {ours / ref:.2f} | |")
    print(f"images apart: max {diff}/255, PSNR {psnr:.1f} dB")


if __name__ == "__main__":
    main()
