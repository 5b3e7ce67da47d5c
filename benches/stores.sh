#!/usr/bin/env bash
# weir-cp's stores against their references (not a test): embedded KV vs a single-node etcd
# (same gRPC loopback, same keys and value sizes, durable puts), embedded objects vs raw disk.
# Usage: benches/stores.sh [OPS=5000] [OBJECT_MIB=256]; results go to stdout as Markdown.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v etcd >/dev/null 2>&1 || ! command -v protoc >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    etcd-server protobuf-compiler) >/dev/null
fi
command -v taskset >/dev/null 2>&1 || (apt-get install -y -qq util-linux >/dev/null)
cargo build --release -q -p weir-control-plane --bin weir-cp --example store_bench
exec target/release/examples/store_bench "${1:-5000}" "${2:-256}"
