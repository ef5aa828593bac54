#!/usr/bin/env bash
# Regenerate the Python gRPC code from protos/voxserve/v1/voice.proto (run from anywhere).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. \
  protos/voxserve/v1/voice.proto
echo "generated protos/voxserve/v1/voice_pb2{,_grpc}.py and voice_pb2.pyi"
