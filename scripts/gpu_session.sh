#!/usr/bin/env bash
# Everything issue #8 still needs from a GPU, in phases that each fit one device-tool call
# (10 minutes). Run on the GPU machine, from the repository root:
#
#   scripts/gpu_session.sh env tests     # versions, the Triton kernel and benchmark smokes (~3 min)
#   scripts/gpu_session.sh recipes       # the recipes on bf16/fp16 engines, ZeRO 2/3, offload (~5 min)
#   scripts/gpu_session.sh bench         # the bf16 BERT-large table and its ceiling   (~5 min)
#   scripts/gpu_session.sh optimizer     # torch fused AdamW vs DeepSpeed FusedAdam    (~3 min)
#
# Output (logs, JSON, the markdown tables) goes to $OUT (the device tool's return folder) or
# runs/gpu_session; at most 8 files, as the tool brings back. Wheels in .whl/ (made here by
# scripts/gpu_wheels.sh, carried with `carry: [".whl"]`) are installed first: the lent machines
# have torch, triton and transformers but not DeepSpeed. See docs/DEVELOPING.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_session}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOOLKIT_NO_PROGRESS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
[ $# -gt 0 ] || set -- env tests
for phase in "$@"; do
  case "$phase" in env|tests|recipes|bench|optimizer) ;;
    *) echo "unknown phase '$phase': use env, tests, recipes, bench or optimizer" >&2; exit 2 ;; esac
done
if ls .whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    echo "[gpu] could not install .whl/*.whl: tests that need DeepSpeed will fail" >&2
  fi
fi
rc=0

phase_env() {
  { nvidia-smi || true
    "$PY" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for name in ("triton", "transformers", "deepspeed", "numpy", "tokenizers"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001 - report, don't stop
        print(name, "NOT IMPORTABLE:", type(exc).__name__, exc)
EOF
  } 2>&1 | tee "$OUT/env.txt"
}

phase_tests() {
  # The compiled Triton kernel against the float64 reference, and the GPU benchmark smokes.
  timeout 560 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/benchmarks \
    2>&1 | tee "$OUT/tests.log"
  return "${PIPESTATUS[0]}"
}

phase_recipes() {
  # tests/recipes/test_gpu_recipes.py: bf16/fp16 engines, ZeRO 2/3, offload (builds cpu_adam),
  # Triton vs chunked losses, a resume.
  timeout 560 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/recipes 2>&1 | tee "$OUT/recipes.log"
  return "${PIPESTATUS[0]}"
}

phase_bench() {
  timeout 330 "$PY" benchmarks/bench_distill_step.py --device cuda --dtype bf16 --models bert-large \
    --seqs 128,512 --batches "128=32,128;512=8,32" --json "$OUT/results_gpu.json" 2>&1 | tee "$OUT/bench_distill.md"
  local a="${PIPESTATUS[0]}"
  timeout 230 "$PY" benchmarks/bench_ceiling.py --device cuda --dtype bf16 --models bert-large \
    --seqs 128,512 --batches "128=32,128;512=8,32" --json "$OUT/results_ceiling_gpu.json" 2>&1 | tee "$OUT/bench_ceiling.md"
  local b="${PIPESTATUS[0]}"
  [ "$a" = 0 ] && [ "$b" = 0 ]
}

phase_optimizer() {
  timeout 560 "$PY" benchmarks/bench_optimizer.py --device cuda --models student6,bert-base,bert-large \
    --json "$OUT/results_optimizer_gpu.json" 2>&1 | tee "$OUT/bench_optimizer.md"
  return "${PIPESTATUS[0]}"
}

for phase in "$@"; do
  case "$phase" in
    *) echo "[gpu] phase $phase"; "phase_$phase" || { echo "[gpu] phase $phase failed"; rc=1; } ;;
  esac
done
exit "$rc"
