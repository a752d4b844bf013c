"""Train sdserve's default model: a small text-to-image latent diffusion
model in the standard diffusers Stable Diffusion layout, on emoji rendered
from Debian's fonts-noto-color-emoji with their CLDR names as captions.

Stages, each checkpointed under WORK_DIR (training may be interrupted;
`--resume` goes on from the last checkpoint of the stage in progress):

  data       render the chosen emoji to 32×32 RGB on white; captions.tsv
  tokenizer  a byte-level BPE (CLIP's format: vocab.json + merges.txt)
             learned from the captions
  vae        AutoencoderKL (16, 32, 32) to 8×8×4 latents
  unet       CLIPTextModel (hidden 64, 2 layers) and UNet2DConditionModel
             (32, 64, 64) with cross-attention, trained together on
             epsilon prediction, captions dropped 10% of the time (so
             guidance works), EMA of both
  export     the pipeline in fp16 safetensors, training/captions.tsv,
             NOTICE, SHA256SUMS and the model's defaults (sdserve.json)

Deterministic: fixed seeds and step counts, one or two threads. A GPU
(--device cuda) trains the same model far faster.

Usage:
  python scripts/train_default_model.py --work target/emoji-train --out models/emoji [--resume]
"""

import argparse
import hashlib
import json
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SIDE = 32
SEED = 1234

# Unicode blocks of clear, single-codepoint emoji: faces, hearts, animals,
# plants, food, weather, vehicles, objects. Sequences (ZWJ, skin tones,
# flags, keycaps) are left out: they draw as several glyphs at 32×32.
BLOCKS = [
    (0x1F600, 0x1F64F),  # faces
    (0x1F400, 0x1F43F),  # animals
    (0x1F980, 0x1F9AE),  # more animals
    (0x1F330, 0x1F37F),  # plants, food
    (0x1F950, 0x1F96F),  # more food
    (0x1F680, 0x1F6C5),  # vehicles, transport
    (0x1F300, 0x1F32F),  # weather, sky
    (0x1F493, 0x1F49F),  # hearts
    (0x2600, 0x26FF),    # weather symbols, objects
    (0x1F380, 0x1F3C4),  # celebrations, sports
    (0x1F4A0, 0x1F4FF),  # objects
]
TEMPLATES = ["{}", "a {}", "an emoji of {}", "{} emoji", "a picture of {}"]


# Captions from the training set the model draws well: what the web page
# proposes first (sdserve.json's example_prompts).
EXAMPLE_PROMPTS = ["grinning face with big eyes", "smiling face with horns", "crying face",
                   "winking face with tongue"]

def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def font_path(work):
    """Debian's Noto Color Emoji, unpacked (not installed) under WORK."""
    ttf = work / "font/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
    if not ttf.exists():
        deb_dir = work / "deb"
        deb_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", "fonts-noto-color-emoji"], cwd=deb_dir, check=True)
        deb = next(deb_dir.glob("fonts-noto-color-emoji_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "font")], check=True)
    return ttf


def render(char, font):
    from PIL import Image, ImageDraw
    canvas = Image.new("RGBA", (160, 160), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((10, 10), char, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    white = Image.new("RGBA", square.size, (255, 255, 255, 255))
    white.alpha_composite(square)
    return white.convert("RGB").resize((SIDE, SIDE), Image.LANCZOS)


def stage_data(args, work):
    import emoji
    from PIL import ImageFont
    font = ImageFont.truetype(str(font_path(work)), 109)
    chosen = []
    for lo, hi in BLOCKS:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            data = emoji.EMOJI_DATA.get(ch) or emoji.EMOJI_DATA.get(ch + "\ufe0f")
            if not data or data.get("status") != emoji.STATUS["fully_qualified"]:
                continue
            key = ch if ch in emoji.EMOJI_DATA else ch + "\ufe0f"
            name = data["en"].strip(":").replace("_", " ")
            if any(c.isdigit() for c in name) or "button" in name or "sign" in name:
                continue
            chosen.append((key, name))
    images, rows = [], []
    for ch, name in chosen:
        im = render(ch, font)
        if im is None:
            continue
        a = np.asarray(im, dtype=np.uint8)
        if (a < 250).mean() < 0.05:  # nearly blank at this size
            continue
        images.append(a)
        rows.append((ch, name))
    rng = random.Random(SEED)
    order = list(range(len(rows)))
    rng.shuffle(order)
    keep = sorted(order[: args.emoji])
    images = np.stack([images[i] for i in keep])
    rows = [rows[i] for i in keep]
    np.save(work / "images.npy", images)
    (work / "captions.tsv").write_text("".join(f"{c}\t{n}\n" for c, n in rows))
    log(f"data: {len(rows)} emoji rendered to {SIDE}×{SIDE}")


def captions(work):
    return [line.split("\t")[1] for line in (work / "captions.tsv").read_text().splitlines()]


def stable_ids(vocab, merges, special):
    """Token ids in an order that does not depend on hashing: the special
    tokens, the single symbols sorted, then each merge's result in merge
    order (the trainer numbers its end-of-word symbols in hash order, which
    changes from run to run)."""
    merged = ["".join(m.split(" ")) for m in merges]
    made = set(merged)
    order = list(special) + sorted(t for t in vocab if t not in made and t not in special)
    seen = set(order)
    for t in merged:
        if t not in seen:
            seen.add(t)
            order.append(t)
    assert seen == set(vocab), "every token placed once"
    return {t: i for i, t in enumerate(order)}


def stage_tokenizer(args, work):
    """CLIP's tokenizer format, learned from the captions and templates."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    texts = [t.format(n) for n in captions(work) for t in TEMPLATES]
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), "removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, min_frequency=1, end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|startoftext|>", "<|endoftext|>"])
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab = stable_ids(model["vocab"], merges, ["<|startoftext|>", "<|endoftext|>"])
    out = work / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = dict(special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer",
                  add_prefix_space=False, errors="replace")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    from transformers import CLIPTokenizer
    t = CLIPTokenizer.from_pretrained(out)
    sample = t("an emoji of cat face").input_ids
    log(f"tokenizer: {len(vocab)} tokens; 'an emoji of cat face' → {sample}")


class Interrupted(Exception):
    """A stage stopped early on purpose (--for-steps)."""


class loss_log:
    """The stage's loss log, cut back to `step` (a resumed run logs again
    what its interrupted run logged after its last checkpoint)."""

    def __init__(self, path, step):
        self.path, self.step = path, step

    def __enter__(self):
        kept = []
        if self.path.exists() and self.step > 0:
            kept = [l for l in self.path.read_text().splitlines(keepends=True) if int(l.split("\t")[0]) <= self.step]
        self.path.write_text("".join(kept))
        self.f = self.path.open("a")
        return self.f

    def __exit__(self, *exc):
        self.f.close()


def checkpoint(path, state):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def images_tensor(work):
    a = np.load(work / "images.npy").astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def make_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=SIDE,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def augment(x, g):
    """Small shifts (±1 px) so the models do not learn pixel positions by rote."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def stage_vae(args, work):
    torch.manual_seed(SEED)
    vae = make_vae().to(args.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr)
    ck = work / "vae.pt"
    step = 0
    # One random stream for the whole stage, saved in every checkpoint: a
    # run resumed from any checkpoint draws what an uninterrupted run draws.
    g = torch.Generator().manual_seed(SEED)
    if args.resume and ck.exists():
        s = torch.load(ck, weights_only=False)
        vae.load_state_dict(s["model"]); opt.load_state_dict(s["opt"]); step = s["step"]
        g.set_state(s["rng"])
        log(f"vae: resumed at step {step}")
    x_all = images_tensor(work)
    stop = min(args.vae_steps, step + args.for_steps) if args.for_steps else args.vae_steps
    with loss_log(work / "loss_vae.tsv", step) as lf:
        while step < stop:
            idx = torch.randint(0, len(x_all), (args.batch,), generator=g)
            x = augment(x_all[idx], g).to(args.device)
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(args.device)
            rec = vae.decode(z).sample
            recon = (rec - x).abs().mean() + ((rec - x) ** 2).mean()
            kl = post.kl().mean() / (x[0].numel())
            loss = recon + args.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % args.log_every == 0:
                lf.write(f"{step}\t{recon.item():.5f}\t{kl.item():.5f}\n"); lf.flush()
            if step % args.checkpoint_every == 0 or step == stop:
                log(f"vae: step {step}/{args.vae_steps} recon {recon.item():.4f} kl {kl.item():.3f}")
                checkpoint(ck, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "rng": g.get_state()})
    if step < args.vae_steps:
        raise Interrupted(f"vae: stopped at step {step} of {args.vae_steps}; go on with --resume")
    torch.save(vae.state_dict(), work / "vae-final.pt")


def make_text(vocab_size, eos_id):
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=eos_id, pad_token_id=eos_id, projection_dim=64,
    ))


def make_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=SIDE // 4, in_channels=4, out_channels=4,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8,
    )


def noise_schedule():
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon")


@torch.no_grad()
def latents_of(args, work):
    vae = make_vae()
    vae.load_state_dict(torch.load(work / "vae-final.pt"))
    vae.eval()
    x = images_tensor(work)
    z = vae.encode(x).latent_dist.mean
    scaling = float(1.0 / z.flatten().std())
    return z, scaling


def stage_unet(args, work):
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(work / "tokenizer")
    torch.manual_seed(SEED + 1)
    text = make_text(len(tok), tok.eos_token_id).to(args.device)
    unet = make_unet().to(args.device)
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    z_all, scaling = latents_of(args, work)
    z_all = z_all * scaling
    names = captions(work)
    sched = noise_schedule()
    ck = work / "unet.pt"
    step = 0
    g = torch.Generator().manual_seed(SEED + 2)
    rnd = random.Random(SEED)
    if args.resume and ck.exists():
        s = torch.load(ck, weights_only=False)
        text.load_state_dict(s["text"]); unet.load_state_dict(s["unet"]); opt.load_state_dict(s["opt"])
        ema = s["ema"]; step = s["step"]
        g.set_state(s["rng"]); rnd.setstate(s["py_rng"])
        log(f"unet: resumed at step {step}")
    n_params = sum(p.numel() for p in params)
    log(f"unet: text encoder + UNet {n_params / 1e6:.2f}M parameters, latents scaled by {scaling:.4f}")
    total = args.steps
    stop = min(total, step + args.for_steps) if args.for_steps else total
    alphas = sched.alphas_cumprod
    with loss_log(work / "loss_unet.tsv", step) as lf:
        while step < stop:
            lr = args.lr * min(1.0, (step + 1) / 500) * (0.5 * (1 + math.cos(math.pi * step / total)) * 0.9 + 0.1)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = torch.randint(0, len(z_all), (args.batch,), generator=g)
            prompts = ["" if rnd.random() < 0.1 else rnd.choice(TEMPLATES).format(names[i]) for i in idx.tolist()]
            ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            z0 = augment(z_all[idx], g)
            t = torch.randint(0, 1000, (args.batch,), generator=g)
            noise = torch.randn(z0.shape, generator=g)
            a = alphas[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            ctx = text(ids.to(args.device))[0]
            pred = unet(zt.to(args.device), t.to(args.device), encoder_hidden_states=ctx).sample
            loss = ((pred - noise.to(args.device)) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            with torch.no_grad():
                d = min(args.ema, (1 + step) / (10 + step))
                for e, p in zip(ema, params):
                    e.mul_(d).add_(p.detach(), alpha=1 - d)
            if step % args.log_every == 0:
                lf.write(f"{step}\t{loss.item():.5f}\t{lr:.6f}\n"); lf.flush()
            if step % args.checkpoint_every == 0 or step == stop:
                log(f"unet: step {step}/{total} loss {loss.item():.4f} lr {lr:.5f}")
                checkpoint(ck, {"text": text.state_dict(), "unet": unet.state_dict(), "opt": opt.state_dict(),
                                "ema": ema, "step": step, "rng": g.get_state(), "py_rng": rnd.getstate()})
    if step < total:
        raise Interrupted(f"unet: stopped at step {step} of {total}; go on with --resume")
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    torch.save({"text": text.state_dict(), "unet": unet.state_dict(), "scaling": scaling}, work / "unet-final.pt")


NOTICE = """sdserve's default emoji model
==============================

Trained by sdserve's scripts/train_default_model.py on emoji images rendered
from the Noto Color Emoji font (Debian package fonts-noto-color-emoji):
  - the emoji images: Apache License 2.0, Copyright Google Inc.
  - the font: SIL Open Font License 1.1
Captions: CLDR short names, from the emoji Python package (BSD License).
The model weights are released under the project's license (Apache-2.0).
"""


def stage_export(args, work):
    from diffusers import EulerAncestralDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(work / "tokenizer")
    s = torch.load(work / "unet-final.pt")
    text = make_text(len(tok), tok.eos_token_id)
    text.load_state_dict(s["text"])
    unet = make_unet()
    unet.load_state_dict(s["unet"])
    vae = make_vae()
    vae.load_state_dict(torch.load(work / "vae-final.pt"))
    vae.register_to_config(scaling_factor=round(s["scaling"], 5))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    if args.scheduler == "euler-a":
        # Euler ancestral draws this model's captions best, and best in few
        # steps (prompt-following over all 320 captions, guidance 3: 8 steps
        # top-1 44.1%, top-5 63.4%; 10 steps 40.0% / 60.3%; 15 steps 38.1% /
        # 58.1%; PNDM at 25 steps about 30% / 50%); same betas.
        scheduler = EulerAncestralDiscreteScheduler.from_config(scheduler.config)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    # The tokenizer as SD 1.5 publishes it (vocab.json + merges.txt), the
    # files it was learned as.
    shutil.rmtree(out / "tokenizer")
    shutil.copytree(work / "tokenizer", out / "tokenizer")
    (out / "training").mkdir(exist_ok=True)
    shutil.copy(work / "captions.tsv", out / "training" / "captions.tsv")
    # The renders it was trained on, 32×32 tiles in captions.tsv's order,
    # 20 to a row: what the prompt-following test compares against.
    from PIL import Image
    imgs = np.load(work / "images.npy")
    cols = 20
    rows = (len(imgs) + cols - 1) // cols
    sheet = np.full((rows * SIDE, cols * SIDE, 3), 255, dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        sheet[r * SIDE:(r + 1) * SIDE, c * SIDE:(c + 1) * SIDE] = im
    Image.fromarray(sheet).save(out / "training" / "emoji.png", optimize=True)
    for f in ("loss_vae.tsv", "loss_unet.tsv"):
        shutil.copy(work / f, out / "training" / f)
    recipe = json.loads((work / "recipe.json").read_text())
    recipe.update({k: getattr(args, k) for k in RECIPE["export"]})
    recipe["command"] = "python scripts/train_default_model.py " + " ".join(
        f"--{k.replace('_', '-')} {recipe[k]}" for k in sorted(recipe) if k not in ("command", "device"))
    (out / "training" / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    (out / "NOTICE").write_text(NOTICE)
    (out / "sdserve.json").write_text(json.dumps({
        "default_steps": args.default_steps, "default_guidance": args.default_guidance,
        "example_prompts": EXAMPLE_PROMPTS,
        "about": "sdserve's default model: 32x32 emoji, trained by scripts/train_default_model.py",
    }, indent=2) + "\n")
    sums = []
    for f in sorted(out.rglob("*")):
        if f.is_file() and f.name != "SHA256SUMS":
            sums.append(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(out)}")
    (out / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"export: {out} ({size / 1e6:.1f} MB)")


STAGES = ["data", "tokenizer", "vae", "unet", "export"]
# The arguments each stage's result depends on, recorded as it completes
# and shipped with the model (training/recipe.json).
RECIPE = {
    "data": ["emoji"],
    "tokenizer": ["vocab"],
    "vae": ["vae_steps", "vae_lr", "kl_weight", "batch", "threads", "device"],
    "unet": ["steps", "lr", "ema", "batch", "threads", "device"],
    "export": ["default_steps", "default_guidance", "scheduler"],
}


def record(work, stage, args):
    path = work / "recipe.json"
    recipe = json.loads(path.read_text()) if path.exists() else {}
    recipe.update({k: getattr(args, k) for k in RECIPE[stage]})
    path.write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="target/emoji-train")
    p.add_argument("--out", default="models/emoji")
    p.add_argument("--from-stage", choices=STAGES, default="data")
    p.add_argument("--to-stage", choices=STAGES, default="export")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (VAE and UNet stages)")
    p.add_argument("--log-every", type=int, default=50, help="steps between lines of the loss logs")
    p.add_argument("--for-steps", type=int, default=0,
                   help="stop the stage in progress after this many steps of this run (go on later with --resume)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--emoji", type=int, default=320)
    p.add_argument("--vocab", type=int, default=1200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--default-steps", type=int, default=8)
    p.add_argument("--scheduler", choices=["euler-a", "pndm"], default="euler-a", help="the model's scheduler")
    p.add_argument("--default-guidance", type=float, default=3.0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "args.json").write_text(json.dumps(vars(args), indent=2))
    run = STAGES[STAGES.index(args.from_stage): STAGES.index(args.to_stage) + 1]
    for stage in run:
        t0 = time.time()
        log(f"stage {stage}")
        try:
            globals()[f"stage_{stage}"](args, work)
        except Interrupted as e:
            log(str(e))
            return
        record(work, stage, args)
        log(f"stage {stage} done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
