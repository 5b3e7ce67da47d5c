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
# gRPC's own xDS client (Python grpcio) is a real peer for weir-cp's xDS server test.
if ! python3 -c 'import grpc' >/dev/null 2>&1; then
  python3 -m pip install -q grpcio
fi
export WEIR_REQUIRE_GRPCIO=1
# weir-cp's etcd backend: `protoc` to build etcd-client, and a real etcd (Debian's
# etcd-server) that the etcd tests start on free ports; WEIR_REQUIRE_ETCD=1 makes a
# missing binary a failure instead of a skip.
if ! command -v protoc >/dev/null 2>&1 || ! command -v etcd >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      protobuf-compiler etcd-server) >/dev/null
  fi
fi
export WEIR_REQUIRE_ETCD=1
# Real S3 clients for weir-cp's S3 endpoint tests: boto3 and the AWS CLI (PyPI, installed
# together so pip picks one botocore for both) and rclone (Debian). WEIR_REQUIRE_BOTO3=1
# makes any of them missing a failure instead of a skip.
if ! python3 -c 'import boto3' >/dev/null 2>&1 || ! command -v aws >/dev/null 2>&1; then
  python3 -m pip install -q boto3 awscli
fi
if ! command -v rclone >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rclone) >/dev/null
  fi
fi
export WEIR_REQUIRE_BOTO3=1
# moto's server is the local S3-compatible store the `--objects s3://` backend is tested
# against (started by the tests on a free port); WEIR_REQUIRE_S3=1 makes a missing moto a
# failure instead of a skip.
if ! python3 -c 'import moto.server, flask, werkzeug' >/dev/null 2>&1; then
  python3 -m pip install -q 'moto[server]'
fi
export WEIR_REQUIRE_S3=1
# Sidecar interception tests run in network namespaces with Debian's iptables (weir-init
# programs the nat table); WEIR_REQUIRE_NETNS=1 makes missing namespaces/iptables a failure
# instead of a skip. (`ip` and `setpriv` come with iproute2 and util-linux.)
if ! command -v iptables-restore >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      iptables iproute2) >/dev/null
  fi
fi
export WEIR_REQUIRE_NETNS=1
# Kubernetes manifests (deploy/**/*.yaml, including the injected-pod golden file) against
# the schemas of a pinned Kubernetes release, strictly (unknown fields fail):
# kubernetes-validate bundles the schemas, so no cluster or network is needed.
K8S_VERSION=1.31.0
if ! python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
  python3 -m pip install -q kubernetes-validate
fi
mapfile -t manifests < <(find deploy -name '*.yaml' | sort)
python3 -m kubernetes_validate --strict --quiet -k "$K8S_VERSION" "${manifests[@]}"
echo "kubernetes-validate: ${#manifests[@]} manifest files valid against Kubernetes $K8S_VERSION"
cargo test --workspace --all-targets "$@"
