#!/usr/bin/env bash
# One-time set-up: CPU torch pinned by constraints.txt (GPU users: install your CUDA torch
# first and run `pip install -e .[test]` without -c), then the toolkit and its test extras.
# Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch (CPU wheel pinned by constraints.txt)"
  $PY -m pip install -q -c constraints.txt torch==2.13.0
fi
if ! $PY -c "import toolkit, deepspeed, transformers, sklearn, pytest, pytest_timeout" >/dev/null 2>&1; then
  echo "[setup] installing the toolkit and its dependencies"
  $PY -m pip install -q -c constraints.txt -e ".[test]"
fi
# numactl pins one core per rank for 2-process deepspeed runs on 2 CPU cores (optional).
if ! command -v numactl >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -q numactl >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q numactl >/dev/null 2>&1)) \
    || echo "[setup] numactl not installed; multi-rank CPU tests use OMP_NUM_THREADS=1 instead"
fi
echo "[setup] ok: $($PY -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)')"
