#!/usr/bin/env bash
# Build weir and run the quickstart config (examples/quickstart.yaml) in the foreground.
# Needs only a Rust toolchain. Ctrl-C (or SIGTERM) drains and exits.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p weir-proxy --bin weir
cat <<'MSG'

weir is starting with examples/quickstart.yaml. In another terminal:

  curl -i http://127.0.0.1:10000/                         # answered by weir itself
  curl -i http://127.0.0.1:10000/old                      # a redirect
  curl -s http://127.0.0.1:10000/admin/stats | grep quickstart   # proxied to weir's admin
  curl -s http://127.0.0.1:9901/stats/prometheus | grep envoy_http_downstream_rq
  curl -s http://127.0.0.1:9901/clusters
  curl -s http://127.0.0.1:9901/config_dump | head -40

MSG
exec ./target/release/weir -c examples/quickstart.yaml --concurrency 2 "$@"
