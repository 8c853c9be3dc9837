#!/usr/bin/env bash
# The GPU numbers of bench/RESULTS.md, on one CUDA machine (H100/H200), from the repository root, a
# few stages per command (every command must end within 10 minutes):
#
#   bash bench/run_gpu.sh                    # = headline step compile (about 6-9 minutes)
#   bash bench/run_gpu.sh nsweep             # stages in the order given
#
# Stage      what                                                                  expected on an H100
#   check    python bench/check_gpu.py without memcheck -> $OUT/check_gpu.md          3-5 min
#   memcheck the compute-sanitizer memcheck part of check_gpu -> $OUT/memcheck.md      2-4 min
#   headline qwen2.5-7b+mpnet N=16384 M=4, triton + torch-eager, all modes              1-2 min
#   step     end-to-end SFT vs SFT+SFR step, qwen2.5-0.5b and qwen2.5-1.5b shapes        1-2 min
#   compile  the headline shape, torch-compile max-autotune-no-cudagraphs, all modes;    3-7 min
#            if that has not finished after COMPILE_TIMEOUT s (default 330), mode default
#   nsweep   qwen2.5-7b+mpnet, N in {4096,65536} x M in {1,4}, mode full, compile mode    5-8 min
#            default (with headline and compile: the time-vs-N plots)
#   sweep    the other presets of DESIGN.md section 4 at N=16384, M=4, mode full,         5-8 min
#            compile mode default
#   loss     = headline compile (the older name of the headline stages)
#   plot     PNGs + headline table into bench/RESULTS.md: needs no GPU, run it where the CSVs are
#
# Rows are appended to $OUT/loss.csv and $OUT/step.csv (OUT defaults to bench/results) as soon as
# they are measured, so a command stopped at its time limit keeps what it measured. The loss stages
# start no new provider after BUDGET_MINUTES (default 7). PYTHON (default python3, the interpreter
# that holds PyTorch on the GPU machines) runs everything. Rows record the git commit (+dirty when
# tracked files changed); in a copy of the checkout without .git, set BENCH_COMMIT=<hash>.
# Rows fetched from a GPU machine join the committed ones, and the table is rebuilt, with
#   python -m bench.plot --add FETCHED_DIR... --table --update-results bench/RESULTS.md
# (copy $OUT/check_gpu.md and memcheck.md to bench/results/ to commit them).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
PY=${PYTHON:-python3}
BUDGET=(--budget-minutes "${BUDGET_MINUTES:-7}")
HEADLINE=(--preset qwen2.5-7b+mpnet --N 16384 --M 4)
export PYTHONUNBUFFERED=1
ARGS=("$@")
if [[ ${#ARGS[@]} -eq 0 ]]; then ARGS=(headline step compile); fi
STAGES=()
for stage in "${ARGS[@]}"; do
  if [[ "$stage" == loss ]]; then STAGES+=(headline compile); else STAGES+=("$stage"); fi
done
KNOWN=" check memcheck headline step compile nsweep sweep plot "
needs_gpu=0
for stage in "${STAGES[@]}"; do
  [[ "$KNOWN" == *" $stage "* ]] || { echo "error: unknown stage '$stage' (expected one of:$KNOWN)" >&2; exit 2; }
  [[ "$stage" == plot ]] || needs_gpu=1
done
if [[ $needs_gpu == 1 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: these stages need a CUDA device (python -m bench.loss --quick checks the harness on a CPU)" >&2
  exit 1
fi
if [[ -z "${BENCH_COMMIT:-}" ]] && ! git rev-parse --short HEAD >/dev/null 2>&1; then
  echo "warning: no git checkout here: rows record commit 'unknown' (set BENCH_COMMIT=<hash>)" >&2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,memory.used --format=csv || true
failed=()
run() {  # a failing command is reported and the next one still runs
  "$@" || { echo "FAILED (exit $?): $*"; failed+=("$stage"); }
}
for stage in "${STAGES[@]}"; do
  echo "=== $stage ($(date -u +%H:%M:%S)) ==="
  case "$stage" in
    check)
      run "$PY" bench/check_gpu.py --skip-memcheck --out "$OUT/check_gpu.md" ;;
    memcheck)
      run "$PY" bench/check_gpu.py --only memcheck --out "$OUT/memcheck.md" ;;
    headline)
      run "$PY" -m bench.loss "${HEADLINE[@]}" --providers triton torch-eager "${BUDGET[@]}" --out "$OUT" ;;
    compile)  # rows already measured stay when the timeout stops max-autotune
      if ! timeout "${COMPILE_TIMEOUT:-330}" "$PY" -m bench.loss "${HEADLINE[@]}" --providers torch-compile \
           --compile-mode max-autotune-no-cudagraphs --out "$OUT"; then
        echo "max-autotune-no-cudagraphs did not finish in ${COMPILE_TIMEOUT:-330} s: compile mode default"
        run "$PY" -m bench.loss "${HEADLINE[@]}" --providers torch-compile --compile-mode default --out "$OUT"
      fi ;;
    nsweep)
      run "$PY" -m bench.loss --preset qwen2.5-7b+mpnet --N 4096 65536 --M 1 4 --modes full --compile-mode default \
        "${BUDGET[@]}" --out "$OUT" ;;
    sweep)
      run "$PY" -m bench.loss --preset qwen2.5-0.5b+mpnet --preset qwen2.5-1.5b+mpnet --preset qwen3-32b+mpnet \
        --preset qwen2.5-7b+minilm --preset qwen2.5-7b+bge-large --N 16384 --M 4 --modes full \
        --compile-mode default "${BUDGET[@]}" --out "$OUT" ;;
    step)
      run "$PY" -m bench.step --model-config qwen2.5-0.5b --out "$OUT"
      run "$PY" -m bench.step --model-config qwen2.5-1.5b --out "$OUT" ;;
    plot)
      run "$PY" -m bench.plot --results "$OUT" --table --update-results bench/RESULTS.md ;;
  esac
done
echo "=== done ($(date -u +%H:%M:%S)) ${failed[*]:+FAILED: ${failed[*]}} ==="
[[ ${#failed[@]} -eq 0 ]]
