#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: deterministic for the
# same binary and inputs, whatever else the machine is doing.
#
# The gateway (one tokio worker) runs under callgrind with auth on (a key with request and
# token rates and a budget), the usage log in SQLite, the JSON access log and metrics;
# 2 closed-loop users send non-stream chat for 5 s of warm-up, the counters are zeroed,
# 10 s more are counted and dumped, and the dump's total is divided by the requests served.
#
# Usage: bench/instructions.sh [BINARY] [LABEL]   (default target/release/switchyard)
set -euo pipefail
cd "$(dirname "$0")/.."
B=$(realpath "${1:-target/release/switchyard}")
L=${2:-current}
D=$(realpath -m "target/instructions/$L")
rm -rf "$D" && mkdir -p "$D" && cd "$D"
cat > gateway.toml <<TOML
[server]
listen = "127.0.0.1:18402"
[database]
url = "sqlite://$D/usage.db"
[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:18401/v1"
api_key = "sk-bench"
[models.bench]
provider = "mock"
model = "mock-model"
TOML
KEY=$("$B" keys create --config gateway.toml --name instructions --rpm 100000000 \
  --tpm 100000000000 --budget 1000000000000000 | tail -n1)
"$B" mock-upstream --listen 127.0.0.1:18401 > mock.log 2>&1 & MOCK=$!
TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$D/callgrind.out" \
  "$B" serve --config gateway.toml > gateway.log 2> valgrind.log & VG=$!
trap 'kill $VG $MOCK 2>/dev/null || true' EXIT
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/18402) 2>/dev/null && break; sleep 0.5; done
sleep 2
"$B" bench --target http://127.0.0.1:18402 --model bench --api-key "$KEY" --users 2 \
  --duration 5s --warmup 0s > /dev/null
callgrind_control -z $VG > /dev/null
"$B" bench --json --target http://127.0.0.1:18402 --model bench --api-key "$KEY" --users 2 \
  --duration 10s --warmup 0s > bench.json
callgrind_control -d $VG > /dev/null
N=$(jq -r '.target.ok' bench.json)
I=$(callgrind_annotate "$D/callgrind.out.1" 2>/dev/null | grep -m1 "PROGRAM TOTALS" | tr -d , | awk '{print $1}')
echo "$L: $N requests, $I instructions, $((I / N)) per request (profile: $D/callgrind.out.1)"
