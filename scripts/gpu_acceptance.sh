#!/usr/bin/env bash
# GPU acceptance test: run on a machine with a CUDA GPU, from the repository root, after
# installing the toolkit there (`pip install -e ".[test]"` over your CUDA build of torch):
#
#   scripts/gpu_acceptance.sh                 # all phases: env tests bench optimizer
#   scripts/gpu_acceptance.sh tests           # only some
#
#   env        torch / CUDA / triton / transformers / deepspeed versions and the GPU's name
#   tests      pytest -m gpu: the Triton relation-KL kernel against the float64 reference, the
#              recipes on bf16/fp16 engines (ZeRO 2/3, offload, Triton vs chunked, a resume),
#              the GPU benchmark smokes
#   bench      the distillation step in bf16 against the plain transformers baseline
#              (benchmarks/bench_distill_step.py, BERT-large-shaped teacher)
#   optimizer  the AdamW implementations the engine can pick (benchmarks/bench_optimizer.py)
#
# Each phase runs under a time limit (GPU_ACCEPTANCE_PHASE_SECONDS, default 1800). Everything
# goes to $OUT (default runs/gpu_acceptance): log.txt (all output), results.md (one row per
# phase, then the benchmark tables) and the benchmarks' JSON.
# Exit status: 0 all phases passed, 1 a phase failed, 2 bad arguments, 3 no GPU visible to torch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_acceptance}"
PY="${PYTHON:-python3}"
LIMIT="${GPU_ACCEPTANCE_PHASE_SECONDS:-1800}"
case "$LIMIT" in ''|*[!0-9]*) echo "GPU_ACCEPTANCE_PHASE_SECONDS must be a whole number of seconds, got '$LIMIT'" >&2; exit 2 ;; esac
ALL=(env tests bench optimizer)
[ $# -gt 0 ] || set -- "${ALL[@]}"
for phase in "$@"; do
  case "$phase" in
    env|tests|bench|optimizer) ;;
    *) echo "unknown phase '$phase': use some of: ${ALL[*]}" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/log.txt"
RESULTS="$OUT/results.md"
: >"$LOG"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1; then
  echo "no CUDA GPU is visible to torch ($PY); this script tests a GPU installation" | tee -a "$LOG" >&2
  exit 3
fi

phase_env() {
  nvidia-smi || true
  "$PY" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for name in ("triton", "transformers", "deepspeed"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001 - report, don't stop
        print(name, "NOT IMPORTABLE:", type(exc).__name__, exc)
EOF
}
phase_tests() { "$PY" -m pytest -q -m gpu -p no:cacheprovider tests; }
phase_bench() {
  "$PY" benchmarks/bench_distill_step.py --device cuda --dtype bf16 --models bert-large \
    --seqs 128,512 --batches "128=32,128;512=8,32" --json "$OUT/distill_step_gpu.json"
}
phase_optimizer() {
  "$PY" benchmarks/bench_optimizer.py --device cuda --models student6,bert-base,bert-large \
    --json "$OUT/optimizer_gpu.json"
}

{
  echo "# GPU acceptance: $(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
  echo
  echo "| phase | result | seconds |"
  echo "|---|---|---|"
} >"$RESULTS"
failed=0
for phase in "$@"; do
  echo "== $phase" | tee -a "$LOG"
  t0=$SECONDS
  timeout -k 15 "$LIMIT" bash -c "$(declare -f "phase_$phase"); PY='$PY' OUT='$OUT' phase_$phase" 2>&1 \
    | tee "$OUT/$phase.txt" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  took=$(( SECONDS - t0 ))
  result="passed"
  if [ "$rc" != 0 ]; then
    result="FAILED (exit $rc)"
    { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && result="FAILED (stopped at its ${LIMIT} s limit)"
    failed=1
  fi
  echo "| $phase | $result | $took |" >>"$RESULTS"
done
for phase in "$@"; do
  case "$phase" in
    env) { echo; echo "## env"; echo; echo '```'; grep -E "^(python|gpu|triton|transformers|deepspeed)" "$OUT/env.txt"; echo '```'; } >>"$RESULTS" ;;
    tests) { echo; echo "## tests"; echo; tail -n 3 "$OUT/tests.txt"; } >>"$RESULTS" ;;
    bench|optimizer) { echo; echo "## $phase"; echo; grep -E "^\|" "$OUT/$phase.txt"; } >>"$RESULTS" ;;
  esac
  rm -f "$OUT/$phase.txt"
done
echo "results: $RESULTS"
exit "$failed"
