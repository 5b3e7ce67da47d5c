#!/usr/bin/env bash
# What access logs plus tracing cost: weir plain (benches/weir-bench.yaml, port 18083) beside
# weir with a file access log (Envoy's default format) and every request traced and exported
# by OTLP/gRPC (benches/weir-bench-obs.yaml, port 18085) to a stub collector (nginx h2c on
# 18095 answering grpc-status 0), same backend, one worker each, interleaved rounds. Reports
# medians of requests per proxy CPU-second and their ratio (target: obs/plain >= 0.90).
# Where the cost goes: three more weir processes run the same rounds, generated from
# weir-bench-obs.yaml: the access log only ("log"), tracing only ("trace", 100 % sampled and
# exported) and both with 1 % random sampling ("obs1"); each row is against plain.
# The headline comes from one more process ("same"): the plain listener and the obs listener
# in ONE weir process (one worker), measured back to back in every round. Two processes
# running identical code differ by up to ~10 % in CPU per request on this kind of VM (memory
# layout, placement); inside one process that difference cancels, and each round gives a
# paired obs/plain ratio. The separate-process rows stay for the breakdown.
# With two or more cores, every weir process is pinned to core 0 and the load generators,
# the backend and the collector to core 1 (taskset), so the proxies never share a core with
# the load and the scheduler's placement does not move the numbers.
#   benches/obs.sh [ROUNDS]     (default 5 rounds)
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
# Pinning: PROXY runs the weirs, LOAD the rest (wrk is found through PATH by measure.sh).
PROXY=() LOAD=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  PROXY=(taskset -c 0) LOAD=(taskset -c 1)
  mkdir -p "$OUT/bin"
  printf '#!/bin/sh\nexec taskset -c 1 %s "$@"\n' "$(command -v wrk)" > "$OUT/bin/wrk"
  chmod +x "$OUT/bin/wrk"
  export PATH="$OUT/bin:$PATH"
fi
cat > "$OUT/collector.conf" <<NGX
worker_processes 1;
pid $OUT/collector.pid;
error_log $OUT/collector.err;
events { worker_connections 1024; }
http {
  access_log off;
  server {
    listen 127.0.0.1:18095 http2;
    location / { default_type application/grpc; add_header grpc-status 0; return 200 ""; }
  }
}
NGX
pids=()
cleanup() {
  [ -f /tmp/bench-backend.pid ] && kill "$(cat /tmp/bench-backend.pid)" 2>/dev/null || true
  [ -f "$OUT/collector.pid" ] && kill "$(cat "$OUT/collector.pid")" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -f /tmp/weir-bench-access.log /tmp/weir-bench-access-1.log /tmp/weir-bench-access-same.log
}
trap cleanup EXIT
${LOAD[@]+"${LOAD[@]}"} nginx -c "$SHARED/backend-nginx.conf"
${LOAD[@]+"${LOAD[@]}"} nginx -c "$OUT/collector.conf"
# Variants of weir-bench-obs.yaml on their own ports (listener, admin, tcp + OFFSET).
python3 - "$OUT" <<'PY'
import sys
out = sys.argv[1]
src = open("benches/weir-bench-obs.yaml").read()
def without(s, first, last):
    keep, skip = [], False
    for l in s.split("\n"):
        t = l.strip()
        if not skip and t.startswith(first):
            skip = True
            continue
        if skip:
            skip = not t.startswith(last)
            continue
        keep.append(l)
    return "\n".join(keep)
def ports(s, off):
    for p in (18085, 18993, 18096):
        s = s.replace(f"port_value: {p}}}", f"port_value: {p + off}}}")
    return s
open(f"{out}/log.yaml", "w").write(ports(without(src, "tracing:", "service_name:"), 100))
trace = without(src, "access_log:", "path: /tmp/weir-bench-access.log")
open(f"{out}/trace.yaml", "w").write(ports(trace, 200))
obs1 = src.replace("random_sampling: {value: 100}", "random_sampling: {value: 1}")
obs1 = obs1.replace("/tmp/weir-bench-access.log", "/tmp/weir-bench-access-1.log")
open(f"{out}/obs1.yaml", "w").write(ports(obs1, 300))
# One process with both: weir-bench.yaml's plain listener (as "plain", port 18483) beside
# the obs listener (18485).
plain = open("benches/weir-bench.yaml").read()
pl = plain[plain.index("  - name: http\n"):plain.index("  - name: tcp\n")]
pl = pl.replace("name: http\n", "name: plain\n", 1).replace("port_value: 18083}", "port_value: 18483}")
same = ports(src, 400).replace("  listeners:\n", "  listeners:\n" + pl, 1)
same = same.replace("/tmp/weir-bench-access.log", "/tmp/weir-bench-access-same.log")
open(f"{out}/same.yaml", "w").write(same)
PY
grep -q "port_value: 18483}" "$OUT/same.yaml" || { echo "same variant has no plain listener"; exit 1; }
grep -q "tracing:" "$OUT/log.yaml" && { echo "log variant still traces"; exit 1; }
grep -q "access_log:" "$OUT/trace.yaml" && { echo "trace variant still logs"; exit 1; }
${PROXY[@]+"${PROXY[@]}"} ./target/release/weir -c benches/weir-bench.yaml --concurrency 1 --log-level warn & PLAIN=$!; pids+=($PLAIN)
${PROXY[@]+"${PROXY[@]}"} ./target/release/weir -c benches/weir-bench-obs.yaml --concurrency 1 --log-level warn & OBS=$!; pids+=($OBS)
${PROXY[@]+"${PROXY[@]}"} ./target/release/weir -c "$OUT/log.yaml" --concurrency 1 --log-level warn & LOG=$!; pids+=($LOG)
${PROXY[@]+"${PROXY[@]}"} ./target/release/weir -c "$OUT/trace.yaml" --concurrency 1 --log-level warn & TRACE=$!; pids+=($TRACE)
${PROXY[@]+"${PROXY[@]}"} ./target/release/weir -c "$OUT/obs1.yaml" --concurrency 1 --log-level warn & OBS1=$!; pids+=($OBS1)
${PROXY[@]+"${PROXY[@]}"} ./target/release/weir -c "$OUT/same.yaml" --concurrency 1 --log-level warn & SAME=$!; pids+=($SAME)
sleep 2

cpu_of() { awk '{print $14+$15}' "/proc/$1/stat"; }
h2() { # name port pid
  local c0 c1 out total cpus
  c0=$(cpu_of "$3"); out=$(${LOAD[@]+"${LOAD[@]}"} h2load -D 6 -c 10 -m 32 -t 1 "http://127.0.0.1:$2/" 2>&1); c1=$(cpu_of "$3")
  total=$(echo "$out" | awk '/^requests:/{print $8}')
  cpus=$(echo "scale=3; ($c1-$c0)/$(getconf CLK_TCK)" | bc)
  echo "$1 req_per_cpu_s=$(echo "scale=0; $total/$cpus" | bc 2>/dev/null || echo 0)"
}
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r"
  # Same process, back to back; the order alternates between rounds.
  if [ $((r % 2)) -eq 1 ]; then order="plain:18483 obs:18485"; else order="obs:18485 plain:18483"; fi
  for t in $order; do
    bash "$SHARED/measure.sh" "same_${t%%:*}" "${t#*:}" "$SAME" | tee -a "$OUT/h1"
  done
  for t in $order; do
    h2 "same_${t%%:*}" "${t#*:}" "$SAME" | tee -a "$OUT/h2"
  done
  bash "$SHARED/measure.sh" plain 18083 "$PLAIN" | tee -a "$OUT/h1"
  bash "$SHARED/measure.sh" obs 18085 "$OBS" | tee -a "$OUT/h1"
  bash "$SHARED/measure.sh" log 18185 "$LOG" | tee -a "$OUT/h1"
  bash "$SHARED/measure.sh" trace 18285 "$TRACE" | tee -a "$OUT/h1"
  bash "$SHARED/measure.sh" obs1 18385 "$OBS1" | tee -a "$OUT/h1"
  h2 plain 18083 "$PLAIN" | tee -a "$OUT/h2"
  h2 obs 18085 "$OBS" | tee -a "$OUT/h2"
  h2 log 18185 "$LOG" | tee -a "$OUT/h2"
  h2 trace 18285 "$TRACE" | tee -a "$OUT/h2"
  h2 obs1 18385 "$OBS1" | tee -a "$OUT/h2"
done
echo "== access log lines and spans (sent / dropped):"
wc -l < /tmp/weir-bench-access.log || true
for a in obs:18993 log:19093 trace:19193 obs1:19293 same:19393; do
  curl -s "http://127.0.0.1:${a#*:}/stats" | grep -E 'tracing.opentelemetry|filesystem' | sed "s/^/${a%%:*} /" || true
done
python3 - "$OUT" <<'PY'
import re, statistics, sys, collections
out = sys.argv[1]
def med(file):
    vals = collections.defaultdict(list)
    for line in open(f"{out}/{file}"):
        m = re.match(r"(\w+) .*\breq_per_cpu_s=([0-9.]+)", line)
        if m: vals[m.group(1)].append(float(m.group(2)))
    return {k: statistics.median(v) for k, v in vals.items()}
def pairs(file):
    # Per-round obs/plain of the same process (two lines per round, in round order).
    seen, res = {}, []
    for line in open(f"{out}/{file}"):
        m = re.match(r"same_(plain|obs) .*\breq_per_cpu_s=([0-9.]+)", line)
        if not m:
            continue
        seen[m.group(1)] = float(m.group(2))
        if len(seen) == 2:
            res.append(seen["obs"] / seen["plain"])
            seen = {}
    return res
print("\n**Headline: the plain and the obs listener in one process**, back to back in each round")
print("\n| req per proxy CPU-s | plain | access log + tracing | obs/plain of the medians | per-round obs/plain: median (min–max) |")
print("|---|---|---|---|---|")
for name, f in [("HTTP/1.1", "h1"), ("HTTP/2", "h2")]:
    d, p = med(f), pairs(f)
    print(f"| {name} | {d['same_plain']:.0f} | {d['same_obs']:.0f} | {d['same_obs']/d['same_plain']:.3f} | "
          f"{statistics.median(p):.3f} ({min(p):.3f}–{max(p):.3f}) |")
print("\n**Separate processes** (one per configuration)")
print("\n| req per proxy CPU-s | plain | access log + tracing | obs/plain |")
print("|---|---|---|---|")
for name, f in [("HTTP/1.1", "h1"), ("HTTP/2", "h2")]:
    d = med(f)
    print(f"| {name} | {d['plain']:.0f} | {d['obs']:.0f} | {d['obs']/d['plain']:.3f} |")
print("\n| variant / plain (separate processes) | HTTP/1.1 | HTTP/2 |")
print("|---|---|---|")
h1, h2 = med("h1"), med("h2")
for v, label in [("log", "access log only"), ("trace", "tracing only (100 %)"),
                 ("obs", "access log + tracing (100 %)"), ("obs1", "access log + tracing (1 %)")]:
    print(f"| {label} | {h1[v]/h1['plain']:.3f} | {h2[v]/h2['plain']:.3f} |")
print("\nProcess-to-process spread, same plain code (the one-process run's plain listener / the plain process):"
      f" HTTP/1.1 {h1['same_plain']/h1['plain']:.3f}, HTTP/2 {h2['same_plain']/h2['plain']:.3f}")
PY
echo "raw results in $OUT"
