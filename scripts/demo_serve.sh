#!/usr/bin/env bash
# Last step of `make demo`: serve the demo build with BentoML, send one real image with curl, print the
# answer, stop the service.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
BUILD=build/demo/digits
PORT=${DEMO_PORT:-3917}
IMAGES=(build/demo/data/7/*.png)
IMAGE=${IMAGES[0]}
export BENTOML_HOME="$PWD/build/demo/bentoml" BENTOML_DO_NOT_TRACK=true

"$BIN/tl-models" bento serve "$BUILD" --port "$PORT" > build/demo/bentoml.log 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 180); do
  curl -sf "localhost:$PORT/readyz" > /dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { cat build/demo/bentoml.log; exit 1; }
  sleep 1
done
echo "== curl -F image=@$IMAGE localhost:$PORT/classify"
curl -sf -F "image=@$IMAGE" -F top_k=3 "localhost:$PORT/classify"
echo
