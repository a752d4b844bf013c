"""Benchmark: what a FLUX.1 ControlNet (diffusers' `FluxControlNetModel`,
InstantX layout: D double- and S single-stream blocks, a "zero" Linear
after each, a `controlnet_x_embedder` for the control latents) costs per
denoising step against the FLUX.1 transformer it steers, at FLUX.1-dev's
real width, on this machine's CPU — where the 12B transformer in fp32 does
not fit in memory, so the pieces are timed one at a time and the whole
step is derived from them.

Every piece is diffusers' own class at FLUX.1-dev's shapes, with random
weights (the cost does not depend on the values): `FluxTransformerBlock`
and `FluxSingleTransformerBlock` 3072 wide (24 heads of 128), rotary
embeddings from `FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])` with
the text ids zero and the image ids as `FluxPipeline._prepare_latent_image_ids`
makes them; the embedders both nets run once per step (`x_embedder`
Linear(64, 3072) on the image tokens, `context_embedder` Linear(4096, 3072)
on the 512 T5 tokens, `CombinedTimestepGuidanceTextProjEmbeddings` and the
rotary table), one ControlNet zero Linear(3072, 3072) on the image tokens,
and the transformer's `norm_out` + `proj_out`. fp32, `torch.no_grad`,
batch 1; each timing is the best of `--runs` after one warm-up.

Per step, derived:
  transformer       = embedders + 19 double + 38 single + out
  ControlNet (D, S) = embedders + controlnet_x_embedder (Linear(64, 3072))
                      + D double + S single + (D + S) zero Linears
and a controlled step costs transformer + ControlNet.

Usage: python tools/bench/flux_controlnet_cost.py [--side 512] [--runs 3] [--threads 2]
(`--side` is the image side in pixels: (side/16)² image tokens, 1024 at 512).
Prints two Markdown tables: the measured pieces with the machine, and the
ControlNet/transformer ratio for a few (D, S) shapes.
"""

import argparse
import platform
import resource
import time

import diffusers
import torch
from diffusers.models.embeddings import CombinedTimestepGuidanceTextProjEmbeddings
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.models.transformers.transformer_flux import (
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from torch import nn

# FLUX.1-dev's transformer config.
DIM = 3072
HEADS = 24
HEAD_DIM = 128
IN_CHANNELS = 64  # 16 latent channels packed 2×2
JOINT_DIM = 4096  # T5-XXL width
POOLED_DIM = 768  # CLIP-L pooled width
AXES_DIM = [16, 56, 56]
DOUBLE = 19
SINGLE = 38
TEXT_TOKENS = 512

# (D, S) ControlNet shapes: InstantX's Canny/Union (5 double, 10 single),
# a 6-double-only net, a 2-double net and a 4+1 net.
SHAPES = [(5, 10), (6, 0), (2, 0), (4, 1)]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def best_of(fn, runs: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", type=int, default=512, help="image side in pixels (default 512)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per piece, best taken (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    a = ap.parse_args()
    if a.side % 16:
        ap.error("--side must be a multiple of 16")

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    grid = a.side // 16  # VAE /8, then 2×2 packing
    img_tokens = grid * grid

    hidden = torch.randn(1, img_tokens, DIM)
    context = torch.randn(1, TEXT_TOKENS, DIM)
    temb = torch.randn(1, DIM)
    latents = torch.randn(1, img_tokens, IN_CHANNELS)
    t5 = torch.randn(1, TEXT_TOKENS, JOINT_DIM)
    pooled = torch.randn(1, POOLED_DIM)
    timestep = torch.tensor([0.5]) * 1000
    guidance = torch.tensor([3.5]) * 1000
    txt_ids = torch.zeros(TEXT_TOKENS, 3)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, grid, grid, torch.device("cpu"), torch.float32)

    pos_embed = FluxPosEmbed(theta=10000, axes_dim=AXES_DIM)
    x_embedder = nn.Linear(IN_CHANNELS, DIM)
    context_embedder = nn.Linear(JOINT_DIM, DIM)
    time_text_embed = CombinedTimestepGuidanceTextProjEmbeddings(embedding_dim=DIM, pooled_projection_dim=POOLED_DIM)
    controlnet_x_embedder = nn.Linear(IN_CHANNELS, DIM)
    zero_linear = nn.Linear(DIM, DIM)
    norm_out = AdaLayerNormContinuous(DIM, DIM, elementwise_affine=False, eps=1e-6)
    proj_out = nn.Linear(DIM, IN_CHANNELS)
    double = FluxTransformerBlock(dim=DIM, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM).eval()
    single = FluxSingleTransformerBlock(dim=DIM, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM).eval()

    with torch.no_grad():
        rotary = pos_embed(torch.cat((txt_ids, img_ids), dim=0))

        def embedders():
            x_embedder(latents)
            time_text_embed(timestep, guidance, pooled)
            context_embedder(t5)
            pos_embed(torch.cat((txt_ids, img_ids), dim=0))

        t = {
            "double": best_of(lambda: double(hidden, context, temb, rotary), a.runs),
            "single": best_of(lambda: single(hidden, context, temb, rotary), a.runs),
            "zero": best_of(lambda: zero_linear(hidden), a.runs),
            "cx": best_of(lambda: controlnet_x_embedder(latents), a.runs),
            "embed": best_of(embedders, a.runs),
            "out": best_of(lambda: proj_out(norm_out(hidden, temb)), a.runs),
        }
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    transformer = t["embed"] + DOUBLE * t["double"] + SINGLE * t["single"] + t["out"]

    def controlnet(d, s):
        return t["embed"] + t["cx"] + d * t["double"] + s * t["single"] + (d + s) * t["zero"]

    print(f"FLUX.1-dev width, {a.side}×{a.side} ({img_tokens} image tokens) + {TEXT_TOKENS} T5 tokens, "
          f"fp32, batch 1, best of {a.runs} after one warm-up")
    print(f"machine: {cpu_model()}, {a.threads} threads, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}; peak RSS {peak_mib:.0f} MiB")
    print()
    print("| piece | seconds |")
    print("|---|---|")
    print(f"| double-stream block (FluxTransformerBlock) | {t['double']:.3f} |")
    print(f"| single-stream block (FluxSingleTransformerBlock) | {t['single']:.3f} |")
    print(f"| ControlNet zero Linear(3072, 3072), image tokens | {t['zero']:.4f} |")
    print(f"| controlnet_x_embedder Linear(64, 3072), image tokens | {t['cx']:.4f} |")
    print(f"| embedders (x_embedder, context_embedder, time/guidance/text, rotary) | {t['embed']:.4f} |")
    print(f"| norm_out + proj_out | {t['out']:.4f} |")
    print(f"| transformer step (embedders + {DOUBLE} double + {SINGLE} single + out) | {transformer:.2f} |")
    print()
    print("| ControlNet (double, single) | ControlNet s/step | ControlNet ÷ transformer "
          "| controlled step ÷ uncontrolled |")
    print("|---|---|---|---|")
    for d, s in SHAPES:
        c = controlnet(d, s)
        print(f"| ({d}, {s}) | {c:.2f} | {c / transformer:.3f} | {(transformer + c) / transformer:.3f} "
              f"(+{100 * c / transformer:.1f}%) |")


if __name__ == "__main__":
    main()
