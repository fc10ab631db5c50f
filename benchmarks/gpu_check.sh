#!/usr/bin/env bash
# The GPU check from a source tree, no network: kernel tests, float64 checks, benchmarks.
# Usage: benchmarks/gpu_check.sh OUT_DIR [--dry-run] [other benchmarks.gpu_check options]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: benchmarks/gpu_check.sh OUT_DIR [options]}"
shift
mkdir -p "$out"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
python3 -m benchmarks.gpu_check --out "$out" "$@" 2>&1 | tee "$out/console.log"
exit "${PIPESTATUS[0]}"
