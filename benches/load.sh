#!/usr/bin/env bash
# Load benchmark: weir beside nginx and HAProxy on the same backend, one worker each, in one
# run, interleaved rounds. Reports medians and ratios (see benches/README.md for the method).
#   benches/load.sh [ROUNDS]        (default 3 rounds; ~6 minutes)
# Needs: nginx-light haproxy wrk nghttp2-client iperf3 bc python3 (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${1:-3}
SHARED=${SHARED:-$ROOT/../shared/bench}
[ -d "$SHARED" ] || { echo "need ../shared/bench (peer configs)"; exit 1; }
need=""
for b in nginx haproxy wrk h2load iperf3 bc; do command -v $b >/dev/null || need=1; done
if [ -n "$need" ]; then
  apt-get update -qq && apt-get install -y -qq nginx-light haproxy wrk nghttp2-client iperf3 bc >/dev/null
fi
cargo build --release -q -p weir-proxy --bin weir
# HAProxy (maxconn 8000) and the 5000 idle connections need more descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
OUT=$(mktemp -d)
pids=()
cleanup() {
  for f in /tmp/bench-backend.pid /tmp/bench-pnginx.pid /tmp/bench-pnginx2.pid /tmp/bench-haproxy.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
nginx -c "$SHARED/backend-nginx.conf"
nginx -c "$SHARED/nginx-h1.conf"
nginx -c "$SHARED/nginx-h2.conf"
# -n caps maxconn below what the descriptor hard limit (often 20000) allows.
haproxy -D -n 7000 -f "$SHARED/haproxy.cfg" -p /tmp/bench-haproxy.pid
iperf3 -s -p 18301 >/dev/null 2>&1 & pids+=($!)
./target/release/weir -c benches/weir-bench.yaml --concurrency 1 --log-level warn & WEIR=$!; pids+=($WEIR)
sleep 1
BACKEND=$(cat /tmp/bench-backend.pid); NGINX=$(cat /tmp/bench-pnginx.pid)
NGINX2=$(cat /tmp/bench-pnginx2.pid); HAPROXY=$(cat /tmp/bench-haproxy.pid)

cpu_of() { local t=0; for p in $1 $(pgrep -P "$1" || true); do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }
h2() { # name port pid
  local c0 c1 out; c0=$(cpu_of "$3")
  out=$(h2load -D 6 -c 10 -m 32 -t 1 "http://127.0.0.1:$2/" 2>&1); c1=$(cpu_of "$3")
  local rps total cpus
  rps=$(echo "$out" | awk '/^finished in/{print $4}')
  total=$(echo "$out" | awk '/^requests:/{print $8}')
  cpus=$(echo "scale=3; ($c1-$c0)/$(getconf CLK_TCK)" | bc)
  local p50 p99; p50=$(echo "$out" | awk '/time for request:/{print $6}'); p99=$(echo "$out" | awk '/time for request:/{print $5}')
  echo "$1 rps=$rps mean=$p50 max=$p99 proxy_cpu_s=$cpus req_per_cpu_s=$(echo "scale=0; $total/$cpus" | bc 2>/dev/null || echo 0)"
}
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r" | tee -a "$OUT/h1"
  bash "$SHARED/measure.sh" direct 18080 "$BACKEND" | tee -a "$OUT/h1"
  bash "$SHARED/measure.sh" haproxy 18082 "$HAPROXY" | tee -a "$OUT/h1"
  bash "$SHARED/measure.sh" weir 18083 "$WEIR" | tee -a "$OUT/h1"
  bash "$SHARED/measure.sh" nginx 18081 "$NGINX" | tee -a "$OUT/h1"
  h2 haproxy 18092 "$HAPROXY" | tee -a "$OUT/h2"
  h2 weir 18083 "$WEIR" | tee -a "$OUT/h2"
  h2 nginx 18091 "$NGINX2" | tee -a "$OUT/h2"
  for t in direct:18301 haproxy:18093 weir:18094; do
    g=$(iperf3 -c 127.0.0.1 -p "${t#*:}" -t 5 -J | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9,2))')
    echo "${t%%:*} tcp_gbps=$g" | tee -a "$OUT/tcp"
  done
done
echo "== idle keep-alive connections (5000)"
python3 "$SHARED/idle_conns.py" 18082 "$HAPROXY" 5000 | sed 's/^/haproxy /' | tee "$OUT/idle"
python3 "$SHARED/idle_conns.py" 18083 "$WEIR" 5000 | sed 's/^/weir /' | tee -a "$OUT/idle"
python3 "$SHARED/idle_conns.py" 18081 "$NGINX" 5000 | sed 's/^/nginx /' | tee -a "$OUT/idle"
python3 - "$OUT" <<'PY'
import re, statistics, sys, collections
out = sys.argv[1]
def med(file, key):
    vals = collections.defaultdict(list)
    for line in open(f"{out}/{file}"):
        m = re.match(r"(\w+) .*\b" + key + r"=([0-9.]+)", line)
        if m: vals[m.group(1)].append(float(m.group(2)))
    return {k: statistics.median(v) for k, v in vals.items()}
h1 = med("h1", "req_per_cpu_s"); h1rps = med("h1", "rps")
h2 = med("h2", "req_per_cpu_s"); h2rps = med("h2", "rps")
tcp = med("tcp", "tcp_gbps")
print("\n| metric | " + " | ".join(["direct", "haproxy", "nginx", "weir", "weir/haproxy"]) + " |")
print("|---|---|---|---|---|---|")
def row(name, d):
    w, h = d.get("weir"), d.get("haproxy")
    ratio = f"{w/h:.2f}" if w and h else "-"
    print(f"| {name} | " + " | ".join(f"{d[k]:.0f}" if k in d else "-" for k in ["direct", "haproxy", "nginx", "weir"]) + f" | {ratio} |")
row("HTTP/1.1 req/s", h1rps); row("HTTP/1.1 req per proxy CPU-s", h1)
row("HTTP/2 req/s", h2rps); row("HTTP/2 req per proxy CPU-s", h2)
print(f"| TCP Gbit/s | {tcp.get('direct','-')} | {tcp.get('haproxy','-')} | - | {tcp.get('weir','-')} | {tcp['weir']/tcp['haproxy']:.2f} |" if 'weir' in tcp and 'haproxy' in tcp else "")
PY
echo "raw results in $OUT"
