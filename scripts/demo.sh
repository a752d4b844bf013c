#!/usr/bin/env bash
# Start a local sdserve stack, generate demo.png through the gateway, and
# stop the stack. With no MODEL: sdserve's default model (models/emoji,
# 32×32 emoji trained by the project) draws a sheet of prompts, upscaled
# nearest-neighbour for viewing (nothing is invented); with MODEL (a
# diffusers-layout directory): one image of the classic prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-}
BIN=target/release
PORT=${SD_DEMO_PORT:-50051}
LOG=$(mktemp)
OUTDIR=$(mktemp -d)

MODEL_FLAGS=()
[[ -n "$MODEL" ]] && MODEL_FLAGS=(--model "$MODEL")
"$BIN/sdctl" up "${MODEL_FLAGS[@]}" --port "$PORT" --http-port "${SD_DEMO_HTTP_PORT:-0}" >"$LOG" 2>&1 &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null || true; rm -rf "$LOG" "$OUTDIR"' EXIT

echo "demo: starting the stack on ${MODEL:-the default model, models/emoji} ..."
for _ in $(seq 1 600); do
    grep -q "gateway ready on" "$LOG" && break
    kill -0 $UP 2>/dev/null || { cat "$LOG"; echo "demo: the stack failed to start" >&2; exit 1; }
    sleep 0.5
done
URL=$(grep -o "http://[^ ]*" "$LOG" | tail -1)
echo "demo: gateway ready on $URL"

if [[ -n "$MODEL" ]]; then
    STEPS=${SD_DEMO_STEPS:-50}
    "$BIN/sdctl" generate --gateway "$URL" --steps "$STEPS" --seed 42 \
        --prompt "a photograph of an astronaut riding a horse" --output demo.png
    echo "demo: wrote $PWD/demo.png"
    exit 0
fi

# The default model: a sheet of its own captions, its own defaults for
# steps and guidance.
PROMPTS=("cat face" "pizza" "yellow heart" "sun with face" "frog" "strawberry" "full moon" "ambulance")
i=0
for p in "${PROMPTS[@]}"; do
    "$BIN/sdctl" generate --gateway "$URL" --seed $((100 + i)) --prompt "$p" \
        --output "$OUTDIR/$(printf %02d $i).png" >/dev/null
    i=$((i + 1))
done
.venv/bin/python - "$OUTDIR" demo.png "${PROMPTS[@]}" <<'PY'
import sys
from pathlib import Path
from PIL import Image, ImageDraw

src, out, prompts = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
scale, pad, label = 6, 8, 16
tiles = [Image.open(p).convert("RGB") for p in sorted(src.glob("*.png"))]
w, h = tiles[0].size
cols = 4
rows = (len(tiles) + cols - 1) // cols
sheet = Image.new("RGB", (cols * (w * scale + pad) + pad, rows * (h * scale + pad + label) + pad), "white")
draw = ImageDraw.Draw(sheet)
for i, (t, p) in enumerate(zip(tiles, prompts)):
    x = pad + (i % cols) * (w * scale + pad)
    y = pad + (i // cols) * (h * scale + pad + label)
    sheet.paste(t.resize((w * scale, h * scale), Image.NEAREST), (x, y))
    draw.text((x, y + h * scale + 2), p, fill="black")
sheet.save(out)
PY
echo "demo: wrote $PWD/demo.png — sdserve's default model (32×32 emoji, upscaled ${#PROMPTS[@]} prompts nearest-neighbour)"
