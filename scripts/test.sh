#!/usr/bin/env bash
# Install what the tests need, then run every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
# `kill` (procps) is used by the lifecycle tests to send SIGTERM.
if ! command -v kill >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq procps) >/dev/null
  fi
fi
cargo test --workspace --all-targets "$@"
