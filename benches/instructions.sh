#!/usr/bin/env bash
# Instructions per request, counted by callgrind (repeatable whatever else the machine does):
# weir plain (benches/weir-bench.yaml) and weir with the resilience features
# (benches/weir-bench-resilience.yaml), each run twice with N and 3N requests (HTTP/1.1 and
# HTTP/2, h2load); the difference divided by the extra requests removes start-up and
# shutdown. Prints both and their ratio.
#   benches/instructions.sh [N]        (default 3000; ~4 minutes)
# Needs: valgrind nginx-light nghttp2-client curl (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
N=${1:-3000}
SHARED=${SHARED:-$ROOT/../shared/bench}
need=""
for b in valgrind nginx h2load curl; do command -v $b >/dev/null || need=1; done
if [ -n "$need" ]; then
  apt-get update -qq && apt-get install -y -qq valgrind nginx-light nghttp2-client curl >/dev/null
fi
cargo build --release -q -p weir-proxy --bin weir
OUT=$(mktemp -d)
trap '[ -f /tmp/bench-backend.pid ] && kill "$(cat /tmp/bench-backend.pid)" 2>/dev/null || true' EXIT
nginx -c "$SHARED/backend-nginx.conf"

# run CONFIG PORT REQUESTS -> total instructions
run() {
  local out="$OUT/cg.$2.$3"
  valgrind --tool=callgrind --callgrind-out-file="$out" ./target/release/weir -c "$1" \
    --concurrency 1 --log-level error >/dev/null 2>"$out.log" &
  local v=$!
  for _ in $(seq 1 120); do curl -s -o /dev/null "http://127.0.0.1:$2/" && break; sleep 0.5; done
  h2load --h1 -n "$3" -c 4 -t 1 "http://127.0.0.1:$2/" >/dev/null 2>&1
  h2load -n "$3" -c 4 -m 8 -t 1 "http://127.0.0.1:$2/" >/dev/null 2>&1
  kill -TERM "$v"; wait "$v" || true
  awk '/^summary:/{print $2}' "$out"
}
per_request() { # config port
  local a b; a=$(run "$1" "$2" "$N"); b=$(run "$1" "$2" $((3 * N)))
  echo $(( (b - a) / (4 * N) ))
}
plain=$(per_request benches/weir-bench.yaml 18083)
res=$(per_request benches/weir-bench-resilience.yaml 18084)
echo "| instructions per request | plain | resilience | resilience/plain |"
echo "|---|---|---|---|"
echo "| HTTP/1.1 + HTTP/2 (h2load) | $plain | $res | $(echo "scale=3; $res/$plain" | bc) |"
