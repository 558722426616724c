#!/usr/bin/env bash
# Switchyard against nginx, the floor for an L7 proxy, side by side in one run.
#
# Both proxy the same mock upstream, each pinned in turn to the same core (core 1); the
# mock and the load driver share the other (core 0). nginx runs one worker process with a
# keep-alive upstream pool and `proxy_buffering off` (streams pass through as they come);
# Switchyard runs with every feature on: auth with a key that has request and token rates
# and a budget, the usage log in SQLite, JSON access log, metrics.
#
# For each round it measures, alternating gateway and nginx:
#   - the proxy's CPU (share of its core) at a fixed open-loop rate neither saturates;
#   - the latency each adds over calling the mock directly, at 1,000 req/s (interleaved);
#   - the capacity of one core: closed loop with enough users to saturate it.
#
# Usage: bench/compare-nginx.sh            (after `cargo build --release`)
# Knobs: RATE (2500), ROUNDS (3), DURATION (15s), USERS (64), OUT (target/compare-nginx)
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${SWITCHYARD_BIN:-target/release/switchyard}
RATE=${RATE:-2500}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-15s}
USERS=${USERS:-64}
OUT=${OUT:-target/compare-nginx}
MOCK_PORT=19000 GATEWAY_PORT=18080 NGINX_PORT=18081

command -v nginx >/dev/null || { echo "nginx is not installed (apt-get install nginx-light)"; exit 1; }
[ -x "$BIN" ] || { echo "$BIN is missing: cargo build --release"; exit 1; }
rm -rf "$OUT" && mkdir -p "$OUT/nginx/logs"
OUT=$(cd "$OUT" && pwd)

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_port() {
  for _ in $(seq 100); do
    (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1"; exit 1
}

taskset -c 0 "$BIN" mock-upstream --listen "127.0.0.1:$MOCK_PORT" > "$OUT/mock.log" 2>&1 &
pids+=($!)

cat > "$OUT/gateway.toml" <<TOML
[server]
listen = "127.0.0.1:$GATEWAY_PORT"
[database]
url = "sqlite://$OUT/usage.db"
[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
api_key = "sk-bench"
[models.bench]
provider = "mock"
model = "mock-model"
TOML
KEY=$("$BIN" keys create --config "$OUT/gateway.toml" --name compare-nginx \
  --rpm 100000000 --tpm 100000000000 --budget 1000000000000000 | tail -n1)
taskset -c 1 "$BIN" serve --config "$OUT/gateway.toml" > "$OUT/gateway.log" 2>&1 &
GATEWAY_PID=$!
pids+=($GATEWAY_PID)

cat > "$OUT/nginx/nginx.conf" <<NGINX
daemon off;
master_process off;
worker_processes 1;
error_log $OUT/nginx/logs/error.log warn;
pid $OUT/nginx/nginx.pid;
events { worker_connections 20000; }
http {
  access_log $OUT/nginx/logs/access.log;
  upstream mock { server 127.0.0.1:$MOCK_PORT; keepalive 256; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
NGINX
taskset -c 1 nginx -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" &
NGINX_PID=$!
pids+=($NGINX_PID)
wait_port $MOCK_PORT; wait_port $GATEWAY_PORT; wait_port $NGINX_PORT

# bench <proxy> <args...>: one JSON report. The gateway knows the alias `bench`; nginx
# forwards the path as is, so it is sent the upstream's own model name.
bench() {
  local proxy=$1; shift
  if [ "$proxy" = gateway ]; then
    taskset -c 0 "$BIN" bench --json --target "http://127.0.0.1:$GATEWAY_PORT" --model bench \
      --api-key "$KEY" --target-pid $GATEWAY_PID "$@"
  else
    taskset -c 0 "$BIN" bench --json --target "http://127.0.0.1:$NGINX_PORT" --model mock-model \
      --api-key unused --target-pid $NGINX_PID "$@"
  fi
}

# Warm both: pools filled, SQLite file created, pages touched.
for proxy in gateway nginx; do bench $proxy --users 8 --duration 3s --warmup 1s > /dev/null; done

printf 'round\tproxy\tcpu%%@%s\tcapacity_rps\tcpu%%@capacity\tadded_p50_ms\tadded_p99_ms\terrors\n' "$RATE" | tee "$OUT/results.tsv"
for round in $(seq "$ROUNDS"); do
  for proxy in gateway nginx; do
    cpu=$(bench $proxy --rate "$RATE" --duration "$DURATION" | tee "$OUT/$proxy-rate-$round.json" \
      | jq -r '.rss.cpu_percent')
    cap=$(bench $proxy --users "$USERS" --duration "$DURATION" | tee "$OUT/$proxy-capacity-$round.json" \
      | jq -r '[.target.achieved_rps, .rss.cpu_percent] | @tsv')
    added=$(bench $proxy --rate 1000 --duration "$DURATION" \
      --compare-direct "http://127.0.0.1:$MOCK_PORT" --direct-model mock-model \
      | tee "$OUT/$proxy-latency-$round.json" \
      | jq -r '[.added_latency.latency_ms.p50, .added_latency.latency_ms.p99, .target.error_count] | @tsv')
    printf '%s\t%s\t%.1f\t%s\t%s\n' "$round" "$proxy" "$cpu" "$cap" "$added" | tee -a "$OUT/results.tsv"
  done
done
echo "JSON reports and logs: $OUT"
