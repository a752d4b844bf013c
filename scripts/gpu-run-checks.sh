#!/usr/bin/env bash
# The GPU bundle's one command (docs/GPU.md):
#
#   bash target/gpu-bundle/run-checks.sh --device cuda    # on the GPU machine
#   bash target/gpu-bundle/run-checks.sh --device cpu     # here, tiny models
#
# Unpacks the bundle's binaries, installs its wheels beside the machine's
# Python (nothing is fetched), writes the fixtures with diffusers there,
# checks the stack's images against diffusers' on the device (fp32, then
# half precision), then benchmarks the SD 1.5 architecture (on CUDA: fp16,
# 512², 20 steps; stack vs in-process vs diffusers with SDPA, batching at
# concurrency 1-8, VRAM per service). `--family sdxl` checks the SDXL family
# instead: tiny SDXL pipelines, and on CUDA the SDXL architecture at 1024²
# in fp16 (parity and seconds per image); `--family all` runs both, the
# large models' checks first. `--family bench` runs the benchmarks alone
# (no parity): SD 1.5, run-time LoRA on the SD 1.5 UNet, and the SDXL
# architecture's stack against in process. `--family flux`: the tiny FLUX.1
# dev and schnell pipelines' parity in fp32 and bf16, then on CUDA the full
# FLUX.1-dev architecture with random weights (12B transformer, T5-XXL) at
# 1024², 28 steps, bf16: stack vs in-process (vs diffusers where the GPU
# holds all three copies: 120 GiB or more, an H200), VRAM per service.
# `--family klein` / `--family zimage`: the tiny FLUX.2 Klein (base and
# step-distilled) / Z-Image pipelines' parity in fp32 and bf16, then on
# CUDA the Klein-4B architecture with random weights (all 5 + 20 blocks,
# the Qwen3-4B-wide encoder's 27 layers) at 1024², 4 steps, bf16: stack vs
# in-process vs diffusers, VRAM per service.
# Everything lands in $OUT (default
# target/gpu-checks) as gpu-checks.md, with the full log beside it. Each
# step has a time limit and a failed step does not stop the others; the
# exit status says whether all passed.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DEVICE=cuda
PYTHON=""
OUTDIR=${OUT:-}
THREADS=""
FAMILY=sd
while (($#)); do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --python) PYTHON=$2; shift 2 ;;
        --out) OUTDIR=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --family) FAMILY=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "run-checks: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cuda|cuda:*|cpu) ;; *) echo "run-checks: --device cuda or cpu" >&2; exit 2 ;; esac
case "$FAMILY" in sd|sdxl|all|bench|flux|klein|zimage) ;; *) echo "run-checks: --family sd, sdxl, all, bench, flux, klein or zimage" >&2; exit 2 ;; esac
if [[ -z "$PYTHON" ]]; then
    if [[ -x /opt/torch/.venv/bin/python3 ]]; then PYTHON=/opt/torch/.venv/bin/python3; else PYTHON=python3; fi
fi
OUTDIR=${OUTDIR:-$HERE/../gpu-checks}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
REPORT=$OUTDIR/gpu-checks.md
LOG=$OUTDIR/run-checks.log
WORK=${TMPDIR:-/tmp}/sdserve-gpu-checks
rm -rf "$WORK"
mkdir -p "$WORK/bin" "$WORK/site" "$WORK/fixtures"
: > "$LOG"
STARTED=$SECONDS
FAILED=()

say() { echo "$*" | tee -a "$REPORT"; }
log() { echo "run-checks [$((SECONDS - STARTED)) s]: $*" | tee -a "$LOG" >&2; }

# Run a step with a time limit; its output to the log, its stdout's tables
# (lines from the first blank or Markdown line on) to the report.
step() {
    local name=$1 limit=$2; shift 2
    log "$name"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$WORK/step.out" 2>> "$LOG"
    local rc=$?
    cat "$WORK/step.out" >> "$LOG"
    grep -E '^(\||#|Tolerance|Targets|VRAM|$)' "$WORK/step.out" >> "$REPORT"
    if ((rc == 0)); then
        log "$name: passed in $((SECONDS - t0)) s"
    else
        log "$name: FAILED (exit $rc$( ((rc == 124)) && echo ', time limit'), after $((SECONDS - t0)) s)"
        FAILED+=("$name")
        say ""
        say "**$name failed** (exit $rc), after $((SECONDS - t0)) s; see run-checks.log."
    fi
    return 0
}

: > "$REPORT"
say "# sdserve GPU bundle checks: --device $DEVICE --family $FAMILY"
say ""
log "unpacking binaries and wheels into $WORK"
tar -xJf "$HERE/bin.tar.xz" -C "$WORK/bin" || { log "cannot unpack bin.tar.xz"; exit 1; }
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$HERE"/wheels/*.whl >> "$LOG" 2>&1 \
    || { log "cannot install the bundle's wheels with $PYTHON"; exit 1; }
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
TORCH_LIB=$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') \
    || { log "$PYTHON has no torch"; exit 1; }
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RUST_BACKTRACE=0
BENCH=$WORK/bin/sd-bench
if [[ -z "$THREADS" ]]; then
    cores=$(nproc)
    if [[ "$DEVICE" == cpu ]]; then THREADS=$cores; else THREADS=$((cores < 8 ? cores : 8)); fi
fi

say "| | |"
say "|---|---|"
say "| date | $(date -u +%Y-%m-%d) |"
say "| bundle | $(head -2 "$HERE/VERSION" | tail -1) |"
say "| python | $("$PYTHON" -c 'import sys, torch, diffusers, transformers; print(f"{sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}, transformers {transformers.__version__}")' 2>>"$LOG") |"
say "| CPU | $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $THREADS libtorch threads |"
if [[ "$DEVICE" != cpu ]]; then
    say "| GPU | $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>>"$LOG") |"
fi
say ""

if [[ "$DEVICE" == cpu ]]; then HALF=bf16; else HALF=fp16; fi
parity() { # MODEL PRECISION [sd-bench flags]
    local model=$1 precision=$2; shift 2
    step "parity $model $precision $*" 300 "$BENCH" --model "$WORK/fixtures/$model" --parity-check \
        --device "$DEVICE" --precision "$precision" --threads "$THREADS" --python "$PYTHON" "$@"
}

# The SDXL-architecture model (7 GB in fp16) is written in the background
# with --family all, while the SD checks run; the benchmark waits for it, so
# no timing shares the machine with it.
XL_PID=""
XL_T0=0
start_xl_writer() {
    log "SDXL-architecture random model: writing in the background"
    XL_T0=$SECONDS
    timeout --kill-after=10 400 "$PYTHON" "$HERE/fixtures/make_sdxl_random.py" "$WORK/fixtures/sdxl-random" \
        > "$WORK/xl-writer.out" 2>&1 &
    XL_PID=$!
}
wait_xl_writer() {
    [[ -n "$XL_PID" ]] || return 0
    wait "$XL_PID"
    local rc=$?
    XL_PID=""
    cat "$WORK/xl-writer.out" >> "$LOG"
    if ((rc == 0)); then
        log "SDXL-architecture random model: passed in $((SECONDS - XL_T0)) s"
    else
        log "SDXL-architecture random model: FAILED (exit $rc)"
        FAILED+=("SDXL-architecture random model")
        say ""
        say "**SDXL-architecture random model failed** (exit $rc); see run-checks.log."
    fi
}

sd_tiny_parity() {
    for model in sd1-tiny sd2-tiny; do
        for precision in fp32 "$HALF"; do parity "$model" "$precision" --steps 10; done
    done
}
sd15_fixture() {
    step "SD 1.5-architecture random model" 300 "$PYTHON" "$HERE/fixtures/make_sd15_random.py" "$WORK/fixtures/sd15-random"
}
sd15_parity() { parity sd15-random fp16 --size 512 --steps 20; }
sd_bench() {
    if [[ "$DEVICE" == cpu ]]; then
        # One thread per process: the tiny UNet's operators are too small to
        # split (docs/BENCHMARKS.md, "Threads per service").
        step "bench sd1-tiny fp32" 300 "$BENCH" --model "$WORK/fixtures/sd1-tiny" --device cpu --precision fp32 \
            --steps 10 --threads 1 --runs 2 --concurrency 1,2 --requests-per-worker 2 --forward-rows 2,4 \
            --python "$PYTHON"
    else
        step "bench sd15-random fp16 512²" 420 "$BENCH" --model "$WORK/fixtures/sd15-random" --device "$DEVICE" \
            --precision fp16 --size 512 --steps 20 --threads "$THREADS" --runs 3 --concurrency 1,2,4,8 \
            --requests-per-worker 2 --forward-rows 2,4,8,16 --python "$PYTHON"
    fi
}
lora_bench() {
    if [[ "$DEVICE" == cpu ]]; then
        step "LoRA bench sd1-tiny fp32" 300 "$BENCH" --model "$WORK/fixtures/sd1-tiny" --device cpu --precision fp32 \
            --threads 1 --runs 2 --forward-rows 2,4 --lora-bench 8
    else
        step "LoRA bench sd15-random fp16 512²" 300 "$BENCH" --model "$WORK/fixtures/sd15-random" --device "$DEVICE" \
            --precision fp16 --size 512 --threads "$THREADS" --runs 10 --forward-rows 2,4,8,16 --lora-bench 32
    fi
}
xl_tiny_fixtures() { step "SDXL tiny fixtures" 300 "$PYTHON" "$HERE/fixtures/make_xl_models.py" "$WORK/fixtures"; }
xl_tiny_parity() {
    for precision in fp32 "$HALF"; do parity sdxl-tiny "$precision" --size 32 --steps 6; done
    parity sdxl-turbo-tiny "$HALF" --size 32 --steps 2
}
xl_big_parity() { parity sdxl-random fp16 --size 1024 --steps 20; }
xl_bench() {
    step "bench sdxl-random fp16 1024²" 420 "$BENCH" --model "$WORK/fixtures/sdxl-random" --device "$DEVICE" \
        --precision fp16 --size 1024 --steps 20 --threads "$THREADS" --runs 2 --concurrency 1,2,4 \
        --requests-per-worker 2 --forward-rows 2,4,8 --no-diffusers --python "$PYTHON"
}

flux_tiny() {
    step "FLUX tiny fixtures" 300 "$PYTHON" "$HERE/fixtures/make_flux_models.py" "$WORK/fixtures"
    # FLUX runs in bf16 (it overflows fp16), on the CPU too.
    for precision in fp32 bf16; do parity flux-dev-tiny "$precision" --size 32 --steps 4; done
    parity flux-schnell-tiny bf16 --size 32 --steps 4
    # fp8 block weights (issue 30): off, upcast and scaled through the stack.
    step "fp8 check flux-dev-tiny" 300 "$BENCH" --model "$WORK/fixtures/flux-dev-tiny" --device "$DEVICE" \
        --precision "$([[ "$DEVICE" == cpu ]] && echo fp32 || echo bf16)" --size 32 --steps 4 --threads "$THREADS" \
        --fp8-check
}
flux_big() {
    step "FLUX.1-dev-architecture random model" 600 "$PYTHON" "$HERE/fixtures/make_flux_random.py" \
        "$WORK/fixtures/flux-random" --full
    local vram diffusers=()
    vram=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>>"$LOG" | head -1)
    # Three copies (stack, in process, diffusers) need ~105 GiB in bf16.
    if [[ -z "$vram" ]] || ((vram < 120000)); then diffusers=(--no-diffusers); fi
    step "bench flux-random bf16 1024² 28 steps" 600 "$BENCH" --model "$WORK/fixtures/flux-random" \
        --device "$DEVICE" --precision bf16 --size 1024 --steps 28 --threads "$THREADS" --runs 1 \
        --concurrency 1 --requests-per-worker 1 --forward-rows 1,2 "${diffusers[@]}" --python "$PYTHON"
    # The blocks in fp8 e4m3 (per-tensor scales), upcast per layer and as
    # scaled fp8 products: seconds per image, the denoiser's VRAM, PSNR
    # against the bf16 image.
    step "fp8 check flux-random 1024² 28 steps" 600 "$BENCH" --model "$WORK/fixtures/flux-random" \
        --device "$DEVICE" --precision bf16 --size 1024 --steps 28 --threads "$THREADS" --fp8-check
}

klein_tiny() {
    step "FLUX.2 Klein tiny fixtures" 300 "$PYTHON" "$HERE/fixtures/make_klein_models.py" "$WORK/fixtures"
    for precision in fp32 bf16; do parity klein-tiny "$precision" --size 64 --steps 4; done
    parity klein-distilled-tiny bf16 --size 64 --steps 4
}
klein_big() {
    step "Klein-4B-architecture random model" 900 "$PYTHON" "$HERE/bench/klein_pipeline.py" "$WORK/fixtures" \
        --double 5 --single 20 --write-only
    step "bench Klein-4B random bf16 1024² 4 steps" 600 "$BENCH" --model "$WORK/fixtures/klein-4b-width-5d20s" \
        --device "$DEVICE" --precision bf16 --size 1024 --steps 4 --threads "$THREADS" --runs 2 \
        --concurrency 1,2,4 --requests-per-worker 2 --forward-rows 1,2,4 --python "$PYTHON"
}
zimage_tiny() {
    step "Z-Image tiny fixtures" 300 "$PYTHON" "$HERE/fixtures/make_zimage_models.py" "$WORK/fixtures"
    for precision in fp32 bf16; do parity zimage-tiny "$precision" --size 64 --steps 4; done
}

# 1. Fixtures, written by diffusers on this machine.
step "tiny fixtures" 300 "$PYTHON" "$HERE/fixtures/make_tiny_models.py" "$WORK/fixtures"

case "$FAMILY" in
sd)
    # 2. Parity with diffusers on the device; 3. speed.
    if [[ "$DEVICE" != cpu ]]; then sd15_fixture; fi
    sd_tiny_parity
    if [[ "$DEVICE" != cpu ]]; then sd15_parity; fi
    sd_bench
    ;;
sdxl)
    # Tiny SDXL pipelines, parity on the device; on a GPU also the SDXL
    # architecture at 1024², fp16, 20 steps (parity and time).
    xl_tiny_fixtures
    xl_tiny_parity
    if [[ "$DEVICE" != cpu ]]; then
        step "SDXL-architecture random model" 400 "$PYTHON" "$HERE/fixtures/make_sdxl_random.py" "$WORK/fixtures/sdxl-random"
        xl_big_parity
        xl_bench
    fi
    ;;
all)
    # Both families in one call, the most telling checks first, so that a
    # call cut short by its time limit still has them: the SD 1.5
    # architecture's parity and benchmark, the SDXL architecture's parity,
    # then the tiny pipelines of both families.
    if [[ "$DEVICE" != cpu ]]; then
        start_xl_writer
        sd15_fixture
        sd15_parity
    fi
    wait_xl_writer
    sd_bench
    if [[ "$DEVICE" != cpu ]]; then xl_big_parity; fi
    xl_tiny_fixtures
    xl_tiny_parity
    sd_tiny_parity
    ;;
flux)
    flux_tiny
    if [[ "$DEVICE" != cpu ]]; then flux_big; fi
    ;;
klein)
    klein_tiny
    if [[ "$DEVICE" != cpu ]]; then klein_big; fi
    ;;
zimage)
    zimage_tiny
    ;;
bench)
    # The benchmarks alone, the SDXL model written while the SD 1.5 one is
    # and waited for before any timing.
    if [[ "$DEVICE" != cpu ]]; then
        start_xl_writer
        sd15_fixture
    fi
    wait_xl_writer
    sd_bench
    lora_bench
    if [[ "$DEVICE" != cpu ]]; then xl_bench; fi
    ;;
esac

say ""
if ((${#FAILED[@]})); then
    say "Failed: ${FAILED[*]}. Total $((SECONDS - STARTED)) s."
    log "done with failures: ${FAILED[*]}"
    exit 1
fi
say "All checks passed. Total $((SECONDS - STARTED)) s."
log "done: $REPORT"
