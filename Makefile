# sdserve — the two commands the README promises: `make demo`, `make test`.
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
export PATH := $(VENV)/bin:$(PATH)
export VIRTUAL_ENV := $(VENV)
export LIBTORCH_USE_PYTORCH := 1
export SD_FIXTURES ?= $(CURDIR)/target/sd-fixtures
CARGO ?= cargo

.PHONY: setup fixtures build test demo check fmt clippy fuzz bench chaos gpu-bundle gpu-bundle-check

## setup: project-local venv with pinned torch (libtorch for tch) and the reference implementation
setup:
	@scripts/setup.sh

## fixtures: tiny random-weight pipelines in diffusers layout + reference outputs
fixtures: setup
	@python tests/fixtures/make_tiny_models.py $(SD_FIXTURES)
	@python tests/fixtures/make_xl_models.py $(SD_FIXTURES)
	@python tests/fixtures/make_sampling_reference.py $(SD_FIXTURES)
	@python tests/fixtures/make_e2e_reference.py $(SD_FIXTURES)
	@python tests/fixtures/make_a1111_reference.py $(SD_FIXTURES)
	@python tests/fixtures/make_bf16_reference.py $(SD_FIXTURES)
	@python tests/fixtures/make_resize_reference.py $(SD_FIXTURES)
	@python tests/fixtures/make_single_file.py $(SD_FIXTURES)
	@python tests/fixtures/make_lora.py $(SD_FIXTURES)
	@python tests/fixtures/make_flux_models.py $(SD_FIXTURES)
	@python tests/fixtures/make_inpaint_reference.py $(SD_FIXTURES)
	@python tests/fixtures/make_ti_reference.py $(SD_FIXTURES)
	@python tests/fixtures/make_qwen3_reference.py $(SD_FIXTURES)
	@python tests/fixtures/make_klein_models.py $(SD_FIXTURES)
	@python tests/fixtures/make_zimage_models.py $(SD_FIXTURES)
	@python tests/fixtures/make_controlnet_reference.py $(SD_FIXTURES)
	@python tests/fixtures/make_flux_controlnet_reference.py $(SD_FIXTURES)
	@python tests/fixtures/make_ip_adapter_reference.py $(SD_FIXTURES)

## build: release binaries into target/release/
build: setup
	$(CARGO) build --release --workspace

## test: set up, build and run every test (end-to-end tests start the built binaries)
test: setup fixtures
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast
	python -m pytest -q tests/deploy tests/training

## demo: set up, build, start the stack on the default model (or SD_MODEL), generate demo.png, stop
demo: build
	@scripts/demo.sh "$${SD_MODEL:-}"

## bench: the stack against in-process Rust and diffusers (SD_MODEL, default the tiny model); prints Markdown
## (BENCH_ARGS: sd-bench flags; the default is the tiny-model run in docs/BENCHMARKS.md)
BENCH_ARGS ?= --steps 20 --threads 1 --runs 20 --concurrency 1,2,4,8 --requests-per-worker 4 --unet-workers 1,2
bench: build fixtures
	target/release/sd-bench --model $${SD_MODEL:-$(SD_FIXTURES)/sd1-tiny} --python $(VENV)/bin/python $(BENCH_ARGS)

## chaos: the chaos run (faults under load), async jobs under faults (gateway, Redis, denoiser SIGKILLed) and a
## 1,000-generation soak on the tiny model (SD_MODEL to change), through `sdctl up` with two denoiser replicas;
## prints Markdown and fails if a target is missed
## (CHAOS_ARGS, JOBS_ARGS, SOAK_ARGS: sd-chaos flags; debug binaries, as `make test` builds them)
CHAOS_ARGS ?=
JOBS_ARGS ?= --jobs
SOAK_ARGS ?= --soak 1000 --unique-prompts 0
chaos: setup fixtures
	$(CARGO) build --workspace --bins
	target/debug/sd-chaos --model $${SD_MODEL:-$(SD_FIXTURES)/sd1-tiny} --check $(CHAOS_ARGS)
	target/debug/sd-chaos --model $${SD_MODEL:-$(SD_FIXTURES)/sd1-tiny} --check $(JOBS_ARGS)
	target/debug/sd-chaos --model $${SD_MODEL:-$(SD_FIXTURES)/sd1-tiny} --check $(SOAK_ARGS)

## gpu-bundle: release binaries against PyPI torch==2.11.0 (tch 0.24, venv .venv-gpu) with the wheels,
## fixture scripts and run-checks.sh into target/gpu-bundle/ (< 48 MiB), for the GPU machine (docs/GPU.md)
gpu-bundle:
	@scripts/gpu-bundle.sh

## gpu-bundle-check: the bundle's checks here on CPU (tiny models), against the torch 2.11 venv
gpu-bundle-check: gpu-bundle
	bash target/gpu-bundle/run-checks.sh --device cpu --python $(CURDIR)/.venv-gpu/bin/python --out target/gpu-checks

## fuzz: run a fuzz target for a minute (FUZZ=init_image, generate_request or http_request); needs cargo-fuzz
FUZZ ?= init_image
fuzz:
	cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $(FUZZ) -- -max_total_time=60

check: fmt clippy
fmt:
	$(CARGO) fmt --all -- --check
clippy: setup
	$(CARGO) clippy --workspace --all-targets -- -D warnings
