#!/usr/bin/env bash
# Every GPU number of bench/RESULTS.md in one command of at most 7 minutes (a lent GPU gives 15 in all):
#   bash bench/run_gpu.sh                  # the default stages in order of value, rows into $OUT or bench/results
#   bash bench/run_gpu.sh headline step    # chosen stages;  bash bench/run_gpu.sh --list  shows them all
# The orchestration (stage order, per-stage limits, global deadline, incremental writes) is bench/run_gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m bench.run_gpu "$@"
