"""diffusers' text-to-image pipeline for the model (StableDiffusionPipeline,
StableDiffusionXLPipeline for the SDXL family, FluxPipeline for FLUX,
Flux2KleinPipeline, ZImagePipeline), timed image by image for
sd-bench:
MODEL STEPS SIZE THREADS [DEVICE [PRECISION]] (SIZE 0: the model's default;
DEVICE cpu, cuda or cuda:N; PRECISION fp32, fp16 or bf16).

After loading and one warm-up image it prints `ready`; then, for each line
`SEED<TAB>PROMPT[<TAB>PNG]` on stdin, it generates that image (saving it
to PNG when a path is given) and prints
`seconds_per_image S mean_step T`, T being the mean time between step
callbacks (one UNet forward with guidance plus the scheduler step; on a GPU
from CUDA events, so the timing does not stall the pipeline). sd-bench interleaves these with its own images so that
a change in the machine's speed during the run weighs on all alike."""

import sys
import time

import torch
from diffusers import AutoPipelineForText2Image, DiffusionPipeline

model, steps, size, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
device = sys.argv[5] if len(sys.argv) > 5 else "cpu"
dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
    sys.argv[6] if len(sys.argv) > 6 else "fp32"
]
torch.set_num_threads(threads)
extra = {}
pipeline_class = __import__("json").load(open(f"{model}/model_index.json"))["_class_name"]
flux = pipeline_class.startswith("Flux")
klein = pipeline_class == "Flux2KleinPipeline"
zimage = pipeline_class == "ZImagePipeline"
if "XL" in pipeline_class:
    extra["add_watermarker"] = False
elif not flux:
    extra.update(safety_checker=None, requires_safety_checker=False)
# Models stored in fp16 only (`*.fp16.safetensors`, as the random benchmark
# models are) load as that variant.
unet_dir = __import__("pathlib").Path(model) / "unet"
if not (unet_dir / "diffusion_pytorch_model.safetensors").exists() and (
    unet_dir / "diffusion_pytorch_model.fp16.safetensors"
).exists():
    extra["variant"] = "fp16"
loader = DiffusionPipeline if klein or zimage else AutoPipelineForText2Image
pipe = loader.from_pretrained(model, dtype=dtype, **extra).to(device)
pipe.set_progress_bar_config(disable=True)
kwargs = dict(num_inference_steps=steps, guidance_scale=7.5)
if size:
    kwargs.update(height=size, width=size)
cuda = device.startswith("cuda")


def wait():
    if cuda:
        torch.cuda.synchronize(device)


# Step ends: CUDA events on a GPU (recorded in stream order, so timing them
# adds no synchronisation that would slow diffusers down), clock readings on
# the CPU.
marks = []


def on_step_end(_pipe, _i, _t, callback_kwargs):
    if cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append(event)
    else:
        marks.append(time.perf_counter())
    return callback_kwargs


def gap_seconds(a, b):
    return a.elapsed_time(b) / 1e3 if cuda else b - a


def initial_noise(generator):
    """The first latents, drawn in fp32 from the CPU generator and cast, as
    sdserve draws them. diffusers draws them in the pipeline's dtype, which
    is the same on torch >= 2.13; torch 2.11 (the GPU machine's) draws
    half-precision normals differently on the CPU, so they are drawn here
    and passed in. The generator goes on to the pipeline in the state this
    leaves it, as if the pipeline had drawn them itself."""
    if klein or zimage:
        # FLUX.2: the 2×2 patches' 4·C channels at a sixteenth of the side;
        # Z-Image: C channels at an eighth. Both take them unpacked.
        f = pipe.vae_scale_factor * 2
        side = (size or getattr(pipe, "default_sample_size", 128) * pipe.vae_scale_factor) // f
        c = pipe.transformer.config.in_channels
        shape = (1, c, side, side) if klein else (1, c, 2 * side, 2 * side)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
    if flux:
        # FLUX: 16 channels drawn unpacked, then packed into 2×2 patches.
        side = (size or pipe.default_sample_size * pipe.vae_scale_factor) // pipe.vae_scale_factor
        noise = torch.randn((1, 16, side, side), generator=generator, dtype=torch.float32).to(dtype)
        return pipe._pack_latents(noise, 1, 16, side, side)
    side_h = (size or pipe.unet.config.sample_size * pipe.vae_scale_factor) // pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, side_h, side_h)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)


def generate(seed, prompt, png=None):
    marks.clear()
    wait()
    t = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(
        prompt=prompt,
        generator=generator,
        latents=initial_noise(generator),
        callback_on_step_end=on_step_end,
        **kwargs,
    )
    wait()
    per_image = time.perf_counter() - t
    if png:
        out.images[0].save(png)
    # Intervals between step ends: the first step's start also holds the
    # prompt encoding and set-up, so it is left out.
    gaps = [gap_seconds(a, b) for a, b in zip(marks, marks[1:])]
    return per_image, sum(gaps) / max(len(gaps), 1)


with torch.inference_mode():
    generate(1, "warm up")
    print("ready", flush=True)
    for line in sys.stdin:
        seed, prompt, *png = line.rstrip("\n").split("\t")
        per_image, step = generate(int(seed), prompt, png[0] if png else None)
        print(f"seconds_per_image {per_image:.6f} mean_step {step:.6f}", flush=True)
