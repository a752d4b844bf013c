#!/usr/bin/env bash
# Set up a fresh machine for sdserve: a project-local venv with the pinned
# torch wheel (libtorch for tch) and the reference implementation used by the
# tests. Idempotent: a second run only checks a stamp.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
REQ=scripts/requirements.txt
STAMP="$VENV/.sdserve-setup"
WANT="$(cat "$REQ" "$0" | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    exit 0
fi

command -v cargo >/dev/null || { echo "setup: cargo is required (https://rustup.rs)" >&2; exit 1; }
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "setup: $PYTHON lacks venv/ensurepip; installing python3-venv" >&2
    apt-get update -qq && apt-get install -y -qq python3-venv
fi

echo "setup: creating $VENV with pinned torch/diffusers/transformers (a few minutes the first time)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --no-cache-dir --upgrade pip
# --no-cache-dir: the torch wheel and its CUDA libraries are ~3 GB that a
# cache would hold a second copy of.
"$VENV/bin/python" -m pip install -q --no-cache-dir -r "$REQ"
# open-clip-torch only for its copy of the CLIP BPE vocabulary; --no-deps keeps
# torchvision and friends out.
"$VENV/bin/python" -m pip install -q --no-cache-dir --no-deps open-clip-torch==3.3.0

# kubectl renders the Kubernetes manifests in the tests (kustomize built in).
if ! command -v kubectl >/dev/null; then
    echo "setup: installing kubectl" >&2
    apt-get update -qq && { apt-get install -y -qq kubectl || apt-get install -y -qq kubernetes-client; }
fi

# tcmalloc: sdctl up preloads it into the model services (10-20% faster
# forwards on CPUs; docs/BENCHMARKS.md). Without it they use glibc's malloc.
if ! ls /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
    echo "setup: installing libtcmalloc-minimal4" >&2
    { apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4; } \
        || echo "setup: could not install libtcmalloc-minimal4; the model services will use glibc's malloc" >&2
fi

# Chromium for the web page's tests (playwright drives it; nothing is
# downloaded by playwright itself).
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    echo "setup: installing chromium (the web page's tests)" >&2
    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium
fi

# Redis: the store of the async jobs API under way (its tests will start
# real redis-servers on free ports).
if ! command -v redis-server >/dev/null; then
    echo "setup: installing redis-server (the async jobs' store)" >&2
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server; } \
        || echo "setup: could not install redis-server; the jobs API will need --redis URL" >&2
fi

"$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
print(f"setup: torch {torch.__version__} ready")
PY
echo "$WANT" > "$STAMP"
