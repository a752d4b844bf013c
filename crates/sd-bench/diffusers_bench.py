"""diffusers' StableDiffusionPipeline on CPU, timed image by image for
sd-bench: MODEL STEPS SIZE THREADS (SIZE 0: the model's default).

After loading and one warm-up image it prints `ready`; then, for each line
`SEED<TAB>PROMPT` on stdin, it generates that image and prints
`seconds_per_image S`. sd-bench interleaves these with its own images so
that a change in the machine's speed during the run weighs on all alike."""

import sys
import time

import torch
from diffusers import StableDiffusionPipeline

model, steps, size, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
kwargs = dict(num_inference_steps=steps, guidance_scale=7.5)
if size:
    kwargs.update(height=size, width=size)
with torch.inference_mode():
    pipe("warm up", generator=torch.Generator("cpu").manual_seed(1), **kwargs)
    print("ready", flush=True)
    for line in sys.stdin:
        seed, prompt = line.rstrip("\n").split("\t", 1)
        t = time.perf_counter()
        pipe(prompt, generator=torch.Generator("cpu").manual_seed(int(seed)), **kwargs)
        print(f"seconds_per_image {time.perf_counter() - t:.6f}", flush=True)
