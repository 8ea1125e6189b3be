#!/usr/bin/env bash
# Regenerates the Python modules from replay.proto (needs grpcio-tools: pip install -e .[dev]).
set -euo pipefail
cd "$(dirname "$0")/../../.."
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
  asearcher_jax/replay/protos/replay.proto
