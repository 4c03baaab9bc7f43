#!/usr/bin/env bash
# Everything issue #8 still needs from a GPU, in ONE device-tool call that fits the lent
# machine's budget (15 minutes of device time per task, the machine's start included; one
# command at most 10 minutes). Run on the GPU machine, from the repository root:
#
#   scripts/gpu_session.sh              # = all: env tests bench recipes optimizer ceiling
#   scripts/gpu_session.sh recipes ceiling     # a second call for what the first skipped
#
# Phases run in this order of importance, each inside what is left of one deadline
# (GPU_SESSION_SECONDS, default 540 s: a 600 s call keeps a minute for copying files back):
#   env        versions, GPU name                                              (~10 s)
#   tests      the compiled Triton kernel vs the float64 reference, the GPU benchmark smokes
#   bench      the bf16 BERT-large table (bench_distill_step.py) for benchmarks/RESULTS.md
#   recipes    the recipes on bf16/fp16 engines, ZeRO 2/3, offload, Triton vs chunked, resume
#   optimizer  torch fused AdamW vs DeepSpeed FusedAdam (bench_optimizer.py)
#   ceiling    the step's kernels against the matmul peak (bench_ceiling.py)
# A phase gets min(its cap, time left); one whose minimum no longer fits is skipped, and
# summary.txt says so and prints the command for a second call.
#
# Output goes to $OUT (the device tool's return folder) or runs/gpu_session, as at most
# 5 files (the tool brings back 8): session.log (everything printed), summary.txt and the JSON
# of the three benchmarks. Wheels in .whl/ (made here by scripts/gpu_wheels.sh, carried with
# `carry: [".whl"]`) are installed first: the lent machines have torch, triton and
# transformers but not DeepSpeed. See docs/DEVELOPING.md, "When a GPU is lent".
#
# Exit status: 0 all asked phases passed, 1 a phase failed, 2 bad arguments, 3 none failed but
# some were skipped for time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_session}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOOLKIT_NO_PROGRESS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_SESSION_SECONDS:-540}"
case "$BUDGET" in ''|*[!0-9]*) echo "GPU_SESSION_SECONDS must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;; esac
ALL=(env tests bench recipes optimizer ceiling)
# seconds: cap (longest a phase may take) and minimum (below this it is not started)
declare -A CAP=([env]=60 [tests]=200 [bench]=240 [recipes]=300 [optimizer]=150 [ceiling]=180)
declare -A MIN=([env]=5 [tests]=60 [bench]=120 [recipes]=120 [optimizer]=60 [ceiling]=90)

[ $# -gt 0 ] || set -- all
phases=()
for phase in "$@"; do
  case "$phase" in
    all) phases+=("${ALL[@]}") ;;
    env|tests|bench|recipes|optimizer|ceiling) phases+=("$phase") ;;
    *) echo "unknown phase '$phase': use all, or some of: ${ALL[*]}" >&2; exit 2 ;;
  esac
done

LOG="$OUT/session.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$LOG" "$SUMMARY"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$LOG" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    say "[gpu] could not install .whl/*.whl: tests that need DeepSpeed will fail"
  fi
fi

# Each phase runs under `timeout $1` (seconds; SIGKILL 15 s after SIGTERM, so a hung process
# cannot push the call past the tool's limit) and appends to session.log.
phase_env() {
  { nvidia-smi || true
    timeout -k 15 "$1" "$PY" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
else:
    print("gpu: none visible to torch")
for name in ("triton", "transformers", "deepspeed", "numpy", "tokenizers"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001 - report, don't stop
        print(name, "NOT IMPORTABLE:", type(exc).__name__, exc)
EOF
  } 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}

phase_tests() {
  # The compiled Triton kernel against the float64 reference, and the GPU benchmark smokes.
  timeout -k 15 "$1" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/benchmarks 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}

phase_bench() {
  timeout -k 15 "$1" "$PY" benchmarks/bench_distill_step.py --device cuda --dtype bf16 --models bert-large \
    --seqs 128,512 --batches "128=32,128;512=8,32" --json "$OUT/results_gpu.json" 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}

phase_recipes() {
  # tests/recipes/test_gpu_recipes.py: bf16/fp16 engines, ZeRO 2/3, offload (builds cpu_adam),
  # Triton vs chunked losses, a resume.
  timeout -k 15 "$1" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/recipes 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}

phase_optimizer() {
  timeout -k 15 "$1" "$PY" benchmarks/bench_optimizer.py --device cuda --models student6,bert-base,bert-large \
    --json "$OUT/results_optimizer_gpu.json" 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}

phase_ceiling() {
  timeout -k 15 "$1" "$PY" benchmarks/bench_ceiling.py --device cuda --dtype bf16 --models bert-large \
    --seqs 128,512 --batches "128=32,128;512=8,32" --json "$OUT/results_ceiling_gpu.json" 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}

start=$SECONDS
failed=()
skipped=()
say "[gpu] budget ${BUDGET} s for: ${phases[*]}"
for phase in "${phases[@]}"; do
  left=$(( BUDGET - (SECONDS - start) ))
  if [ "$left" -lt "${MIN[$phase]}" ]; then
    say "[gpu] $phase: skipped (${left} s left, needs ${MIN[$phase]} s)"
    skipped+=("$phase")
    continue
  fi
  limit=$(( left < CAP[$phase] ? left : CAP[$phase] ))
  echo "[gpu] phase $phase (at most ${limit} s)" | tee -a "$LOG"
  t0=$SECONDS
  "phase_$phase" "$limit"
  rc=$?
  took=$(( SECONDS - t0 ))
  if [ "$rc" = 0 ]; then
    say "[gpu] $phase: ok in ${took} s"
  else
    reason="exit $rc"
    { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && reason="stopped at its ${limit} s limit"
    say "[gpu] $phase: FAILED ($reason) after ${took} s"
    failed+=("$phase")
  fi
done
say "[gpu] done in $(( SECONDS - start )) s; failed: ${failed[*]:-none}; skipped: ${skipped[*]:-none}"
if [ "${#skipped[@]}" -gt 0 ]; then
  say "[gpu] next call: run(command=\"scripts/gpu_session.sh ${skipped[*]}\", carry=[\".whl\"], timeout_s=600)"
fi
[ "${#failed[@]}" -gt 0 ] && exit 1
[ "${#skipped[@]}" -gt 0 ] && exit 3
exit 0
