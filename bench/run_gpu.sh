#!/usr/bin/env bash
# Every number of bench/RESULTS.md, on one CUDA machine (H100/H200), from the repository root:
#
#   bash bench/run_gpu.sh            # all stages: loss, sweep, step, plot  (~20-30 min, most of it torch.compile)
#   bash bench/run_gpu.sh loss step  # chosen stages only (each stage fits in a 10-minute window)
#
# Stages:
#   loss   headline preset qwen2.5-7b+mpnet, N in {4096,16384,65536}, M in {1,4}, modes forward/backward/full
#   sweep  the other model/encoder presets of DESIGN.md section 4 at N=16384, M=4, mode full
#   step   end-to-end SFT vs SFT+SFR optimizer step, qwen2.5-0.5b and qwen2.5-1.5b shapes
#   plot   PNGs + headline table, written into bench/RESULTS.md between the headline markers
# Results are appended to $OUT/loss.csv and $OUT/step.csv (default bench/results); commit them with
# the PNGs and bench/RESULTS.md. COMPILE_MODE=default skips max-autotune (faster, weaker baseline).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
COMPILE=()
if [[ -n "${COMPILE_MODE:-}" ]]; then COMPILE=(--compile-mode "$COMPILE_MODE"); fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA device: these benchmarks are GPU results (use --quick on the CPU for a harness check)" >&2
  exit 1
fi
STAGES=("$@")
if [[ ${#STAGES[@]} -eq 0 ]]; then STAGES=(loss sweep step plot); fi
for stage in "${STAGES[@]}"; do
  echo "=== $stage ==="
  case "$stage" in
    loss)  # one process per N: each stays well inside a 10-minute window even with max-autotune compiles
      for n in 16384 4096 65536; do
        python -m bench.loss --preset qwen2.5-7b+mpnet --N "$n" --M 1 4 "${COMPILE[@]}" --out "$OUT"
      done ;;
    sweep)
      for preset in qwen2.5-0.5b+mpnet qwen2.5-1.5b+mpnet qwen3-32b+mpnet qwen2.5-7b+minilm qwen2.5-7b+bge-large; do
        python -m bench.loss --preset "$preset" --N 16384 --M 4 --modes full "${COMPILE[@]}" --out "$OUT"
      done ;;
    step)
      python -m bench.step --model-config qwen2.5-0.5b --out "$OUT"
      python -m bench.step --model-config qwen2.5-1.5b --out "$OUT" ;;
    plot)
      python -m bench.plot --results "$OUT" --table --update-results bench/RESULTS.md ;;
    *)
      echo "error: unknown stage '$stage' (expected loss, sweep, step or plot)" >&2; exit 2 ;;
  esac
done
