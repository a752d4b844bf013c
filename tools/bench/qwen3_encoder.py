"""Benchmark: a Qwen3 prompt encoder at Qwen3-4B's width (FLUX.2 Klein-4B's
and Z-Image's text encoder: hidden 2560, 32 query / 8 key-value heads of
128, SwiGLU 9728, vocabulary 151936) with random weights, reading one
prompt padded to 512 tokens as Z-Image's pipeline does (the chat template,
the penultimate hidden state) — sdserve's text-encoder service (a gRPC
Encode through stubs generated from our proto) against transformers'
encode as `ZImagePipeline._encode_prompt` runs it, in turns (stack,
transformers, stack) since both copies need not fit at once. `--layers`
keeps the model shallow enough for the machine (Qwen3-4B has 36; the
width, hence each layer's cost, is the real one). Prints a table.

Usage: python tools/bench/qwen3_encoder.py WORK_DIR [--layers N] [--runs N] [--precision fp32|bf16]
(run from the repository root after `cargo build --release -p text-encoder`)
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from make_qwen3_reference import tokenizer as qwen_tokenizer  # noqa: E402
from grpc_stubs import free_port, stubs  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon, dramatic light, 35mm"


def write_model(out: Path, layers: int, dtype):
    """A ZImagePipeline-shaped directory holding just the text encoder and
    its tokenizer (what the text-encoder service loads)."""
    if (out / "text_encoder" / "config.json").exists():
        return
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = qwen_tokenizer(out / "tokenizer")
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    with torch.device("cpu"):
        model = Qwen3ForCausalLM(config).to(dtype).eval()
    model.save_pretrained(out / "text_encoder")
    (out / "model_index.json").write_text(
        '{"_class_name": "ZImagePipeline", "text_encoder": ["transformers", "Qwen3ForCausalLM"], '
        '"tokenizer": ["transformers", "Qwen2Tokenizer"]}')
    del model, tok


def stack_seconds(model: Path, precision: str, runs: int, threads: int, pb, pb_grpc):
    import grpc

    port = free_port()
    binary = ROOT / "target" / "release" / "sd-text-encoder"
    env = dict(os.environ, SD_TORCH_THREADS=str(threads))
    proc = subprocess.Popen([str(binary), "--model", str(model), "--precision", precision,
                             "--listen", f"127.0.0.1:{port}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        stub = pb_grpc.TextEncoderStub(grpc.insecure_channel(f"127.0.0.1:{port}",
                                                             options=[("grpc.max_receive_message_length", 1 << 28)]))
        deadline = time.time() + 600
        while True:
            try:
                stub.Info(pb.TextEncoderInfoRequest(), timeout=5)
                break
            except grpc.RpcError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the text encoder did not come up")
                time.sleep(1)
        req = pb.EncodeTextRequest(prompts=[PROMPT], max_sequence_length=512)
        stub.Encode(req, timeout=600)  # warm-up
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            stub.Encode(req, timeout=600)
            times.append(time.perf_counter() - t)
        return times
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def transformers_seconds(model: Path, dtype, runs: int, threads: int):
    from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model / "tokenizer")
    te = Qwen3ForCausalLM.from_pretrained(model / "text_encoder", dtype=dtype).eval()
    fake = types.SimpleNamespace(tokenizer=tok, text_encoder=te, _execution_device=torch.device("cpu"))
    with torch.no_grad():
        ZImagePipeline._encode_prompt(fake, [PROMPT], device=torch.device("cpu"), max_sequence_length=512)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            ZImagePipeline._encode_prompt(fake, [PROMPT], device=torch.device("cpu"), max_sequence_length=512)
            times.append(time.perf_counter() - t)
    del te
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    dtype = torch.float32 if a.precision == "fp32" else torch.bfloat16
    model = a.work / f"qwen3-4b-width-{a.layers}l-{a.precision}"
    write_model(model, a.layers, dtype)
    with tempfile.TemporaryDirectory(prefix="sd-bench-stubs-") as out:
        pb, pb_grpc = stubs(out, "text_encoder")
        first = stack_seconds(model, a.precision, a.runs, a.threads, pb, pb_grpc)
        reference = transformers_seconds(model, dtype, a.runs, a.threads)
        second = stack_seconds(model, a.precision, a.runs, a.threads, pb, pb_grpc)
    ours = statistics.median(first + second)
    theirs = statistics.median(reference)
    print(f"Qwen3 encoder, Qwen3-4B width, {a.layers} layers, {a.precision}, 512 tokens, "
          f"{a.threads} threads, median of {a.runs} (stack: two turns)")
    print("| encoder | seconds per prompt |")
    print("|---|---|")
    print(f"| sdserve text-encoder (gRPC Encode) | {ours:.3f} |")
    print(f"| transformers (ZImagePipeline._encode_prompt) | {theirs:.3f} |")
    print(f"| ratio (sdserve ÷ transformers) | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
