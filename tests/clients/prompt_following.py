"""Does the default model draw what it is asked? For captions drawn at
random (seeded) from the model's own list (training/captions.tsv),
generate through a running stack's HTTP door, find the generated image's
nearest emoji in pixel space among all the model's emoji (training/emoji.png,
the 32×32 renders it was trained on), and report top-1 and top-5; then the
same with diffusers on the same weights and seeds, which must agree (it is
the same model). Chance is 1/len(emoji).

Usage: python prompt_following.py HTTP_BASE MODEL_DIR [N] [--min-top1 F --min-top5 F]
Prints a Markdown table; exits 1 below the minimums or on disagreement.
"""

import argparse
import base64
import io
import json
import random
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def emoji_table(model):
    rows = [l.split("\t") for l in (model / "training" / "captions.tsv").read_text().splitlines()]
    sheet = np.asarray(Image.open(model / "training" / "emoji.png").convert("RGB"), dtype=np.float32)
    side, cols = 32, sheet.shape[1] // 32
    tiles = np.stack([sheet[(i // cols) * side:(i // cols + 1) * side, (i % cols) * side:(i % cols + 1) * side]
                      for i in range(len(rows))])
    return [r[1] for r in rows], tiles


def rank(image, tiles, target):
    d = ((tiles - image[None]) ** 2).reshape(len(tiles), -1).sum(1)
    order = np.argsort(d, kind="stable")
    return int(np.nonzero(order == target)[0][0])


def via_stack(base, prompt, seed):
    body = json.dumps({"prompt": prompt, "seed": seed, "response_format": "b64_json"}).encode()
    req = urllib.request.Request(base + "/v1/images/generations", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        data = json.load(r)["data"][0]["b64_json"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), dtype=np.float32)


def via_diffusers(pipe, prompt, seed, steps, guidance):
    g = torch.Generator("cpu").manual_seed(seed)
    im = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=g).images[0]
    return np.asarray(im, dtype=np.float32)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("base")
    p.add_argument("model")
    p.add_argument("n", type=int, nargs="?", default=40)
    p.add_argument("--min-top1", type=float, default=0.0)
    p.add_argument("--min-top5", type=float, default=0.0)
    a = p.parse_args()
    model = Path(a.model)
    names, tiles = emoji_table(model)
    defaults = json.loads((model / "sdserve.json").read_text())
    picks = random.Random(7).sample(range(len(names)), min(a.n, len(names)))
    from diffusers import StableDiffusionPipeline
    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    results = {"stack": [], "diffusers": []}
    worst = 0.0
    for k, i in enumerate(picks):
        seed = 1000 + k
        ours = via_stack(a.base, names[i], seed)
        theirs = via_diffusers(pipe, names[i], seed, defaults["default_steps"], defaults["default_guidance"])
        worst = max(worst, float(np.abs(ours - theirs).max()))
        results["stack"].append(rank(ours, tiles, i))
        results["diffusers"].append(rank(theirs, tiles, i))
    print(f"| pipeline | top-1 | top-5 | captions | emoji (chance {100 / len(names):.1f}%) |")
    print("|---|---:|---:|---:|---:|")
    score = {}
    for who, ranks in results.items():
        r = np.array(ranks)
        score[who] = ((r == 0).mean(), (r < 5).mean())
        print(f"| {who} | {100 * score[who][0]:.1f}% | {100 * score[who][1]:.1f}% | {len(r)} | {len(names)} |")
    print(f"\nlargest pixel difference, stack against diffusers: {worst:.0f}/255")
    agree = all(abs(score["stack"][j] - score["diffusers"][j]) <= 1.5 / len(picks) for j in (0, 1))
    ok = agree and score["stack"][0] >= a.min_top1 and score["stack"][1] >= a.min_top5
    if not agree:
        print("the stack and diffusers disagree")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
