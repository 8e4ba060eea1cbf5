#!/usr/bin/env bash
# Regenerate the checked-in Python stubs from protos/ (tests/test_protos.py checks
# that this gives no diff). Needs grpcio-tools, pinned in the dev extra.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python -m grpc_tools.protoc -I protos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/syncnorm/coordinator/v1/coordinator.proto
