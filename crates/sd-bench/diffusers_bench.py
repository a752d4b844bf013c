"""Seconds per image for diffusers' StableDiffusionPipeline on CPU, for
sd-bench: MODEL STEPS SIZE THREADS RUNS (SIZE 0: the model's default)."""

import sys
import time

import torch
from diffusers import StableDiffusionPipeline

model, steps, size, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
kwargs = dict(num_inference_steps=steps, guidance_scale=7.5)
if size:
    kwargs.update(height=size, width=size)
with torch.inference_mode():
    pipe("warm up", generator=torch.Generator("cpu").manual_seed(1), **kwargs)
    times = []
    for i in range(runs):
        t = time.perf_counter()
        pipe("a lighthouse at dusk", generator=torch.Generator("cpu").manual_seed(100 + i), **kwargs)
        times.append(time.perf_counter() - t)
print(f"seconds_per_image {sum(times) / len(times):.6f}")
