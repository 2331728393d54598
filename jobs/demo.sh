#!/usr/bin/env bash
# `make demo`: toy shards -> toy model accuracy -> a local Ray head -> the build as a Ray job -> its extension
# with more shards as a Ray job -> the nearest prototypes of a few tokens -> pruning vs baselines.
# Everything Ray starts listens on 127.0.0.1 only and is stopped on exit, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$PWD/out/demo"
MODEL="${VRC_DEMO_MODEL:-toy}"  # or a LLaVA checkpoint directory
mkdir -p "$OUT"
# A demo run starts from an empty codebook: a second run must not stack versions on the first one's.
rm -rf "$OUT/codebook" "$OUT/metrics" "$OUT/metrics-more"

echo "== toy shards"
# Train-split images the model never saw (it was trained on the train shards of seed 0), and a held-out eval split.
vrc toy make-shards --out "$OUT/shards/train" --shards 4 --per-shard 25 --seed 1 --split train
vrc toy make-shards --out "$OUT/shards/more" --shards 2 --per-shard 25 --seed 2 --split train
vrc toy make-shards --out "$OUT/shards/eval" --shards 1 --per-shard 60 --seed 100 --split eval

echo "== toy model, held-out accuracy"
vrc toy eval --model "$MODEL" --shards "$OUT/shards/eval"

free_port() {  # the usual port if it is free, else any free one: other Ray instances may be running
  python - "$1" <<'EOF'
import socket, sys
for port in (int(sys.argv[1]), 0):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(s.getsockname()[1])
        break
EOF
}
GCS_PORT=$(free_port 6379)
DASHBOARD_PORT=$(free_port 8265)
ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"
RAY_TMP=$(mktemp -d /tmp/vrc-demo-ray.XXXX)  # short path: Ray's socket paths have a length limit

# Ray swaps 127.0.0.1 for the machine's routable address unless told this is not a cluster node.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# A token of our own: the job API then answers only to this script, and ~/.ray/auth_token plays no part.
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
export RAY_AUTH_TOKEN
unset RAY_ADDRESS

# `ray start --block` in the background, stopped through its own process tree: `ray stop` would also
# kill every other Ray instance of this user on the machine.
descendants() { local c; for c in $(pgrep -P "$1" || true); do echo "$c"; descendants "$c"; done; }
stop_ray() {
  [[ -n "${RAY_PID:-}" ]] || return 0
  local pids; pids="$RAY_PID $(descendants "$RAY_PID")"
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 30); do kill -0 $pids 2>/dev/null || break; sleep 0.5; done
  kill -KILL $pids 2>/dev/null || true
  rm -rf "$RAY_TMP"
  echo "== ray stopped"
}
trap stop_ray EXIT INT TERM

echo "== ray head on 127.0.0.1 (dashboard $ADDRESS)"
ray start --head --block --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true \
  --dashboard-agent-listen-port="$(free_port 52365)" --ray-client-server-port="$(free_port 10001)" \
  --num-cpus=2 --num-gpus=0 --object-store-memory=200000000 --temp-dir="$RAY_TMP" \
  --disable-usage-stats >"$OUT/ray-head.log" 2>&1 &
RAY_PID=$!
disown "$RAY_PID"  # stopped by stop_ray; no shell job-status noise when it goes
for _ in $(seq 120); do
  ray job list --address "$ADDRESS" >/dev/null 2>&1 && break
  kill -0 "$RAY_PID" 2>/dev/null || { tail -20 "$OUT/ray-head.log"; exit 1; }
  sleep 1
done

echo "== build job (2 probe actors)"  # the job's summary ends with images/s; a failed job fails the demo
ray job submit --address "$ADDRESS" --working-dir . -- \
  python jobs/build_codebook.py --config vrc_dist/configs/toy.yaml --model "$MODEL" \
  --shards "$OUT/shards/train/*.tar" --out "$OUT/metrics" --codebook "$OUT/codebook" --actors 2 --overwrite \
  --set cluster.min_images=8 \
  2>&1 | tee "$OUT/build.log" | grep -v -e "^\s*$" -e "Loading weights"

echo "== extend job: the same codebook with 50 more images (only the new ones are probed)"
ray job submit --address "$ADDRESS" --working-dir . -- \
  python jobs/extend_codebook.py --codebook "$OUT/codebook" --shards "$OUT/shards/more/*.tar" \
  --out "$OUT/metrics-more" --actors 2 \
  2>&1 | tee "$OUT/extend.log" | grep -v -e "^\s*$" -e "Loading weights"

stop_ray  # what follows needs no cluster; give its CPUs back
RAY_PID=

echo "== versions of the new codebook"
vrc codebook list "$OUT/codebook"

echo "== nearest prototypes of a few tokens of a held-out image, with their provenance"
vrc toy make-image --out "$OUT/query.png" --seed 100 --split eval
vrc codebook query --codebook "$OUT/codebook" --model "$MODEL" --image "$OUT/query.png" --k 3 > "$OUT/query.txt"
head -n 9 "$OUT/query.txt"
echo "   ... ($(wc -l < "$OUT/query.txt") lines in $OUT/query.txt)"

echo "== pruning with the new codebook vs baselines, held-out eval split"
vrc eval --model "$MODEL" --codebook "$OUT/codebook" --shards "$OUT/shards/eval" \
  --keep 1.0,0.5,0.25,0.111,0.056 --methods codebook,codebook-null,codebook-diverse,random,fastv,oracle \
  --out "$OUT/eval"

echo "== demo done: metrics in $OUT/metrics, codebook in $OUT/codebook, eval table in $OUT/eval"
