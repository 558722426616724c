#!/usr/bin/env bash
# Interactive latency with and without a batch running: starts the gateway B on core 1
# with CONFIG (a fresh SQLite file per run is up to the config), runs the open-loop bench
# at 200 req/s for 15 s against it and the mock directly, then starts a 50,000-line batch
# and runs the same bench 5 s later; prints both P50/P99 lines and the batch's rate.
#
#   B=target/release/switchyard bash bench/batch_vs_interactive.sh CONFIG LABEL
#
# Needs the mock on 127.0.0.1:9000 (`taskset -c 0 $B mock-upstream --listen
# 127.0.0.1:9000`), the gateway on 127.0.0.1:8080 and an alias `plain` for `mock-model`.
set -euo pipefail
config="$1"; label="$2"
cd "$(dirname "$0")/.."
(taskset -c 1 "$B" serve --config "$config" > "/tmp/gateway-$label.log" 2>&1 &)
trap 'pkill -f "serve --config $config" || true' EXIT
sleep 3
bench() {
  taskset -c 0 "$B" bench --target http://127.0.0.1:8080 --model plain --rate 200 --duration 15s \
    --compare-direct http://127.0.0.1:9000 --direct-model mock-model 2>&1 | grep -E 'p50|p99 '
}
echo "== $label, no batch"; bench
taskset -c 0 python3 bench/batches.py 50000 http://127.0.0.1:8080 > "/tmp/batch-$label.log" 2>&1 &
batch=$!
sleep 5
echo "== $label, with a batch"; bench
wait "$batch"
cat "/tmp/batch-$label.log"
