#!/usr/bin/env bash
# Build target/gpu-bundle/: what the GPU machine we measure on needs to run
# the stack's checks in one command, with no Rust toolchain and no network
# there (docs/GPU.md).
#
# That machine has PyTorch 2.11.0+cu130 at /opt/torch/.venv (Python 3.12).
# So the binaries are built here against the PyPI torch==2.11.0 wheel, in a
# venv of their own (.venv-gpu), with tch 0.24 (the release for libtorch
# 2.11; the default build stays on tch 0.26 and torch 2.13). The switch is a
# copy of the workspace whose manifest names tch 0.24, built into a target
# directory of its own, so the default build is never touched.
#
# The binaries carry an rpath to that machine's torch/lib as well as to the
# local venv's, are stripped, and travel xz-compressed with the diffusers
# wheel (the one package the reference needs that the machine lacks), the
# open-clip wheel (for its CLIP vocabulary, which the fixture scripts read),
# the fixture scripts and run-checks.sh. The bundle must stay under 48 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

TORCH=2.11.0
TCH=0.24.0
REMOTE_TORCH_LIB=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
VENV=${GPU_VENV:-$ROOT/.venv-gpu}
SRC=$ROOT/target/gpu-src
BUILD=$ROOT/target/gpu-build
BUNDLE=$ROOT/target/gpu-bundle
WHEELS=$ROOT/target/gpu-wheels
LIMIT_MIB=48
BINS=(sd-text-encoder sd-denoiser sd-autoencoder sd-gateway sdctl sd-bench)
PACKAGES=(-p text-encoder -p denoiser -p autoencoder -p sd-gateway -p sdctl -p sd-bench)
# The reference's wheels: pure Python, for any Python 3.
WHEEL_PINS=(diffusers==0.42.1 open-clip-torch==3.3.0)

# 1. The torch 2.11 venv: libtorch to build against here, and the Python
#    that `run-checks.sh --device cpu` uses here (transformers at the GPU
#    machine's version; diffusers comes from the bundle, as it does there).
STAMP="$VENV/.sdserve-gpu-setup"
WANT="torch==$TORCH transformers==5.17.0 huggingface_hub==1.33.0 requests numpy==2.4.6 pillow==13.0.0 safetensors==0.8.0 scipy==1.17.1 importlib_metadata"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
    echo "gpu-bundle: creating $VENV with $WANT (a few minutes the first time)"
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --no-cache-dir --upgrade pip
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q --no-cache-dir $WANT
    echo "$WANT" > "$STAMP"
fi
"$VENV/bin/python" - "$TORCH" <<'PY'
import sys, torch
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
PY

# 2. The workspace with tch switched to 0.24. A file is copied only when
#    its content changed, and then with a fresh time (a copied old time
#    could be older than the last build, which cargo would take as built).
mkdir -p "$SRC"
while IFS= read -r -d '' f; do
    [[ -f "$f" && "$f" != Cargo.toml && "$f" != Cargo.lock ]] || continue
    if ! cmp -s "$f" "$SRC/$f"; then
        mkdir -p "$SRC/$(dirname "$f")"
        cp "$f" "$SRC/$f"
    fi
done < <(git ls-files -z --cached --others --exclude-standard)
sed -e "s/^tch = \"=[0-9.]*\"/tch = \"=$TCH\"/" \
    -e "s/^torch-sys = \"=[0-9.]*\"/torch-sys = \"=$TCH\"/" Cargo.toml > "$SRC/Cargo.toml.new"
grep -q "^tch = \"=$TCH\"" "$SRC/Cargo.toml.new" && grep -q "^torch-sys = \"=$TCH\"" "$SRC/Cargo.toml.new" \
    || { echo "gpu-bundle: could not switch tch to $TCH in Cargo.toml" >&2; exit 1; }
if cmp -s "$SRC/Cargo.toml.new" "$SRC/Cargo.toml"; then rm "$SRC/Cargo.toml.new"; else mv "$SRC/Cargo.toml.new" "$SRC/Cargo.toml"; fi
# The default build's lock, from which cargo moves only tch and torch-sys.
cmp -s Cargo.lock "$SRC/Cargo.lock.default" || { cp Cargo.lock "$SRC/Cargo.lock.default"; cp Cargo.lock "$SRC/Cargo.lock"; }

# 3. Release binaries against torch 2.11, stripped, with both rpaths.
echo "gpu-bundle: building release binaries against torch $TORCH with tch $TCH (long the first time)"
(
    cd "$SRC"
    export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" LIBTORCH_USE_PYTORCH=1
    export CARGO_TARGET_DIR="$BUILD"
    export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols
    export RUSTFLAGS="-C link-arg=-Wl,-rpath,$REMOTE_TORCH_LIB"
    cargo build --release "${PACKAGES[@]}" --bins
)

# 4. The wheels the GPU machine lacks (cached between builds).
mkdir -p "$WHEELS"
for pin in "${WHEEL_PINS[@]}"; do
    name=${pin%%==*}; version=${pin##*==}
    if ! ls "$WHEELS"/"${name//-/_}"-"$version"-*.whl >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$WHEELS" "$pin"
    fi
done

# 5. Assemble.
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/wheels" "$BUNDLE/fixtures"
cp tools/sd-bench/diffusers_bench.py "$BUILD/release/"
tar -C "$BUILD/release" -cf - "${BINS[@]}" diffusers_bench.py | xz -T0 -6 > "$BUNDLE/bin.tar.xz"
for pin in "${WHEEL_PINS[@]}"; do
    name=${pin%%==*}; version=${pin##*==}
    cp "$WHEELS"/"${name//-/_}"-"$version"-*.whl "$BUNDLE/wheels/"
done
cp tests/fixtures/make_tiny_models.py tests/fixtures/make_sd15_random.py tests/fixtures/make_xl_models.py \
    tests/fixtures/make_sdxl_random.py tests/fixtures/make_flux_models.py tests/fixtures/make_flux_random.py \
    tests/fixtures/make_single_file.py tests/fixtures/make_qwen3_reference.py tests/fixtures/make_klein_models.py \
    tests/fixtures/make_zimage_models.py \
    "$BUNDLE/fixtures/"
mkdir -p "$BUNDLE/bench"
cp tools/bench/klein_pipeline.py tools/bench/grpc_stubs.py "$BUNDLE/bench/"
cp scripts/gpu-run-checks.sh "$BUNDLE/run-checks.sh"
chmod +x "$BUNDLE/run-checks.sh"
{
    echo "sdserve GPU bundle"
    echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' (with local changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "torch: $TORCH (PyPI wheel), tch: $TCH"
    echo "rpath: $REMOTE_TORCH_LIB and $VENV/lib/python*/site-packages/torch/lib"
} > "$BUNDLE/VERSION"

bytes=$(du -sb "$BUNDLE" | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "gpu-bundle: $BUNDLE is $mib MiB (limit $LIMIT_MIB MiB):"
du -ah "$BUNDLE" | sort -k2
if (( bytes > LIMIT_MIB * 1048576 )); then
    echo "gpu-bundle: over $LIMIT_MIB MiB" >&2
    exit 1
fi
