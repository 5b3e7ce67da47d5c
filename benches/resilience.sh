#!/usr/bin/env bash
# What the resilience features cost: weir plain (benches/weir-bench.yaml, port 18083) beside
# weir with an HTTP health check, outlier detection, circuit breakers and a local rate limit
# filter (benches/weir-bench-resilience.yaml, port 18084), same backend, one worker each,
# interleaved rounds. Reports medians of requests per proxy CPU-second and their ratio.
#   benches/resilience.sh [ROUNDS]     (default 5 rounds; ~3 minutes)
# Needs: nginx-light wrk nghttp2-client bc (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${1:-5}
SHARED=${SHARED:-$ROOT/../shared/bench}
[ -d "$SHARED" ] || { echo "need ../shared/bench (backend config)"; exit 1; }
need=""
for b in nginx wrk h2load bc; do command -v $b >/dev/null || need=1; done
if [ -n "$need" ]; then
  apt-get update -qq && apt-get install -y -qq nginx-light wrk nghttp2-client bc >/dev/null
fi
cargo build --release -q -p weir-proxy --bin weir
OUT=$(mktemp -d)
pids=()
cleanup() {
  [ -f /tmp/bench-backend.pid ] && kill "$(cat /tmp/bench-backend.pid)" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
nginx -c "$SHARED/backend-nginx.conf"
./target/release/weir -c benches/weir-bench.yaml --concurrency 1 --log-level warn & PLAIN=$!; pids+=($PLAIN)
./target/release/weir -c benches/weir-bench-resilience.yaml --concurrency 1 --log-level warn & RES=$!; pids+=($RES)
sleep 2
curl -sf http://127.0.0.1:18991/clusters | grep -q 'backend::127.0.0.1:18080::health_flags::healthy' \
  || { echo "resilience weir: backend not healthy"; exit 1; }

cpu_of() { awk '{print $14+$15}' "/proc/$1/stat"; }
h2() { # name port pid
  local c0 c1 out total cpus
  c0=$(cpu_of "$3"); out=$(h2load -D 6 -c 10 -m 32 -t 1 "http://127.0.0.1:$2/" 2>&1); c1=$(cpu_of "$3")
  total=$(echo "$out" | awk '/^requests:/{print $8}')
  cpus=$(echo "scale=3; ($c1-$c0)/$(getconf CLK_TCK)" | bc)
  echo "$1 req_per_cpu_s=$(echo "scale=0; $total/$cpus" | bc 2>/dev/null || echo 0)"
}
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r"
  bash "$SHARED/measure.sh" plain 18083 "$PLAIN" | tee -a "$OUT/h1"
  bash "$SHARED/measure.sh" resilience 18084 "$RES" | tee -a "$OUT/h1"
  h2 plain 18083 "$PLAIN" | tee -a "$OUT/h2"
  h2 resilience 18084 "$RES" | tee -a "$OUT/h2"
done
echo "== rate limit filter and health checks were active:"
curl -s http://127.0.0.1:18991/stats | grep -E 'http_local_rate_limit.ok|health_check.success' || true
python3 - "$OUT" <<'PY'
import re, statistics, sys, collections
out = sys.argv[1]
def med(file):
    vals = collections.defaultdict(list)
    for line in open(f"{out}/{file}"):
        m = re.match(r"(\w+) .*\breq_per_cpu_s=([0-9.]+)", line)
        if m: vals[m.group(1)].append(float(m.group(2)))
    return {k: statistics.median(v) for k, v in vals.items()}
print("\n| req per proxy CPU-s | plain | resilience | resilience/plain |")
print("|---|---|---|---|")
for name, f in [("HTTP/1.1", "h1"), ("HTTP/2", "h2")]:
    d = med(f)
    print(f"| {name} | {d['plain']:.0f} | {d['resilience']:.0f} | {d['resilience']/d['plain']:.3f} |")
PY
echo "raw results in $OUT"
