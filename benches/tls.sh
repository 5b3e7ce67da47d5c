#!/usr/bin/env bash
# TLS benchmark: weir, nginx and HAProxy terminating TLS with the same certificate (ECDSA
# P-256, TLS 1.3) in front of the same backend, one worker each, interleaved rounds.
#   benches/tls.sh [ROUNDS]     (default 3)
# Two loads per proxy:
#   keep-alive  wrk -c 50 over TLS, connections reused: requests per proxy CPU-second;
#   handshakes  wrk with `Connection: close`, so every request is a new TCP connection and a
#               full handshake (wrk does not resume sessions): handshakes/s and per CPU-second.
# Needs: nginx-light haproxy wrk bc openssl (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${1:-3}
SHARED=${SHARED:-$ROOT/../shared/bench}
[ -d "$SHARED" ] || { echo "need ../shared/bench (backend config)"; exit 1; }
need=""
for b in nginx haproxy wrk bc openssl; do command -v $b >/dev/null || need=1; done
if [ -n "$need" ]; then
  apt-get update -qq && apt-get install -y -qq nginx-light haproxy wrk bc openssl >/dev/null
fi
cargo build --release -q -p weir-proxy --bin weir
OUT=$(mktemp -d)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=bench.local -addext subjectAltName=DNS:bench.local \
  -keyout "$OUT/key.pem" -out "$OUT/cert.pem" 2>/dev/null
cat "$OUT/cert.pem" "$OUT/key.pem" > "$OUT/combined.pem"

cat > "$OUT/nginx.conf" <<NGX
worker_processes 1;
pid $OUT/nginx.pid;
error_log $OUT/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream be { server 127.0.0.1:18080; keepalive 128; }
  server {
    listen 127.0.0.1:18481 ssl backlog=4096;
    ssl_certificate $OUT/cert.pem;
    ssl_certificate_key $OUT/key.pem;
    ssl_protocols TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGX
cat > "$OUT/haproxy.cfg" <<HAP
global
  nbthread 1
  maxconn 8000
  ssl-default-bind-options ssl-min-ver TLSv1.3
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:18482 ssl crt $OUT/combined.pem no-tls-tickets
  default_backend be
backend be
  http-reuse always
  server s1 127.0.0.1:18080
HAP
cat > "$OUT/weir.yaml" <<WEIR
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 18991}}
static_resources:
  listeners:
  - name: https
    address: {socket_address: {address: 127.0.0.1, port_value: 18483}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          disable_stateless_session_resumption: true
          common_tls_context:
            tls_params: {tls_minimum_protocol_version: TLSv1_3}
            tls_certificates:
            - certificate_chain: {filename: $OUT/cert.pem}
              private_key: {filename: $OUT/key.pem}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          generate_request_id: false
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
          route_config:
            name: bench
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{match: {prefix: /}, route: {cluster: backend}}]
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18080}}}
WEIR

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
pids=()
cleanup() {
  for f in /tmp/bench-backend.pid "$OUT/nginx.pid" "$OUT/haproxy.pid"; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
nginx -c "$SHARED/backend-nginx.conf"
nginx -c "$OUT/nginx.conf"
haproxy -D -n 7000 -f "$OUT/haproxy.cfg" -p "$OUT/haproxy.pid"
./target/release/weir -c "$OUT/weir.yaml" --concurrency 1 --log-level warn & WEIR=$!; pids+=($WEIR)
sleep 1
NGINX=$(cat "$OUT/nginx.pid"); HAPROXY=$(cat "$OUT/haproxy.pid")

cpus() { local t=0; for p in $1 $(pgrep -P "$1" || true); do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }
run() { # name port pid mode
  local c0 c1 out extra=()
  [ "$4" = handshake ] && extra=(-H "Connection: close")
  c0=$(cpus "$3")
  out=$(wrk -t1 -c50 -d6s --latency "${extra[@]}" "https://127.0.0.1:$2/" 2>&1)
  c1=$(cpus "$3")
  local rps total cpusec p50 p99 errs
  rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
  total=$(echo "$out" | awk '/requests in/{print $1}')
  p50=$(echo "$out" | awk '$1=="50%"{print $2}'); p99=$(echo "$out" | awk '$1=="99%"{print $2}')
  errs=$(echo "$out" | awk '/Socket errors/{print $0}')
  cpusec=$(echo "scale=3; ($c1-$c0)/$(getconf CLK_TCK)" | bc)
  echo "$1 mode=$4 rps=$rps p50=$p50 p99=$p99 proxy_cpu_s=$cpusec per_cpu_s=$(echo "scale=0; $total/$cpusec" | bc 2>/dev/null || echo 0) ${errs:+errors=\"$errs\"}"
}
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r" | tee -a "$OUT/results"
  for m in keepalive handshake; do
    run haproxy 18482 "$HAPROXY" $m | tee -a "$OUT/results"
    run weir 18483 "$WEIR" $m | tee -a "$OUT/results"
    run nginx 18481 "$NGINX" $m | tee -a "$OUT/results"
  done
done
python3 - "$OUT/results" <<'PY'
import re, statistics, sys, collections
vals = collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = re.match(r"(\w+) mode=(\w+) rps=([0-9.]+) .*per_cpu_s=([0-9]+)", line)
    if m:
        vals[(m.group(1), m.group(2), "rps")].append(float(m.group(3)))
        vals[(m.group(1), m.group(2), "cpu")].append(float(m.group(4)))
med = {k: statistics.median(v) for k, v in vals.items()}
print("\n| metric | haproxy | nginx | weir | weir/haproxy | weir/nginx |")
print("|---|---|---|---|---|---|")
for mode, label in [("keepalive", "TLS keep-alive"), ("handshake", "TLS new connection (full handshake)")]:
    for kind, unit in [("rps", "req/s"), ("cpu", "req per proxy CPU-s")]:
        h, n, w = (med.get((p, mode, kind)) for p in ("haproxy", "nginx", "weir"))
        f = lambda x: f"{x:.0f}" if x else "-"
        r = lambda a, b: f"{a/b:.2f}" if a and b else "-"
        print(f"| {label} {unit} | {f(h)} | {f(n)} | {f(w)} | {r(w, h)} | {r(w, n)} |")
PY
echo "raw results in $OUT"
