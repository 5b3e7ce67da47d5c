#!/usr/bin/env bash
# The mesh quickstart: build weir and weir-cp, then run on 127.0.0.1
#   - two demo upstreams (a weir serving direct responses on :18081 and :18082),
#   - weir-cp (xDS on :18000, config API on :18001, state in a temporary directory),
#     loaded with examples/mesh/xds.yaml (listener :10000 -> routes by RDS -> EDS cluster),
#   - weir (examples/mesh/weir.yaml), configured over ADS by weir-cp; admin on :9901.
# Needs a Rust toolchain; installs protoc and curl (Debian packages) if missing. Ctrl-C stops
# everything.
#
# `./scripts/quickstart.sh --static` runs the single-proxy example (examples/quickstart.yaml)
# instead, with no control plane.
set -euo pipefail
cd "$(dirname "$0")/.."
# weir-cp's etcd backend (etcd-client) compiles etcd's protos at build time with `protoc`.
if ! command -v protoc >/dev/null 2>&1; then
  echo "quickstart: installing protobuf-compiler (protoc) for the build" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler) >/dev/null
fi
if ! command -v curl >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl) >/dev/null
fi
cargo build --release -p weir-proxy --bin weir -p weir-control-plane --bin weir-cp
if [[ "${1:-}" == "--static" ]]; then
  shift
  echo "weir is starting with examples/quickstart.yaml: curl -i http://127.0.0.1:10000/"
  exec ./target/release/weir -c examples/quickstart.yaml --concurrency 2 "$@"
fi

bin=./target/release
data=$(mktemp -d -t weir-quickstart.XXXXXX)
pids=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$data"
}
trap cleanup EXIT INT TERM

wait_http() { # URL: wait until it answers (bounded: 10 s)
  for _ in $(seq 1 100); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "quickstart: $1 did not come up" >&2
  return 1
}

echo "== demo upstreams (:18081, :18082)"
"$bin/weir" -c examples/mesh/upstreams.yaml --concurrency 1 --log-level warn &
pids+=($!)

echo "== weir-cp (xDS :18000, API :18001) -- open on 127.0.0.1 only: this is a demo, not a deployment"
"$bin/weir-cp" serve --xds-address 127.0.0.1:18000 --api-address 127.0.0.1:18001 \
  --data-dir "$data/cp" --log-level warn &
pids+=($!)
wait_http http://127.0.0.1:18001/healthz
"$bin/weir-cp" config apply -f examples/mesh/xds.yaml

echo "== weir (listener :10000, admin :9901), configured over ADS"
"$bin/weir" -c examples/mesh/weir.yaml --concurrency 2 "$@" &
pids+=($!)
wait_http http://127.0.0.1:9901/ready

cat <<'MSG'

The mesh is up. In another terminal:

  for i in 1 2 3 4; do curl -s http://127.0.0.1:10000/; done    # round robin over a and b
  ./target/release/weir-cp config apply -f examples/mesh/xds-weights.yaml   # b gets 9 of 10
  for i in $(seq 10); do curl -s http://127.0.0.1:10000/; done
  ./target/release/weir-cp status                     # the proxy, its ACKed versions, NACKs
  ./target/release/weir-cp config history
  curl -s http://127.0.0.1:9901/config_dump | head -60  # dynamic resources with versions
  curl -s http://127.0.0.1:9901/stats | grep -E 'control_plane|cds|lds|rds'

Ctrl-C stops everything.
MSG
wait -n "${pids[@]}"
