#!/usr/bin/env bash
# Start a local sdserve stack on MODEL, generate demo.png through the gateway
# (with a progress bar), and stop the stack.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: demo.sh MODEL_DIR}
BIN=target/release
PORT=${SD_DEMO_PORT:-50051}
LOG=$(mktemp)

"$BIN/sdctl" up --model "$MODEL" --port "$PORT" --http-port "${SD_DEMO_HTTP_PORT:-0}" >"$LOG" 2>&1 &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null || true; rm -f "$LOG"' EXIT

echo "demo: starting the stack on $MODEL ..."
for _ in $(seq 1 600); do
    grep -q "gateway ready on" "$LOG" && break
    kill -0 $UP 2>/dev/null || { cat "$LOG"; echo "demo: the stack failed to start" >&2; exit 1; }
    sleep 0.5
done
URL=$(grep -o "http://[^ ]*" "$LOG" | tail -1)
echo "demo: gateway ready on $URL"
STEPS=${SD_DEMO_STEPS:-50}
"$BIN/sdctl" generate --gateway "$URL" --steps "$STEPS" --seed 42 \
    --prompt "a photograph of an astronaut riding a horse" --output demo.png
echo "demo: wrote demo.png"
