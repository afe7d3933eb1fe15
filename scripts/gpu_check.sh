#!/usr/bin/env bash
# One call on a fresh offline GPU machine: build, GPU tests, sanitizers, a short table.
#   bash scripts/gpu_check.sh [pytest -k expression]
# Full logs go to $OUT (or /tmp/jpa_out); the table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/jpa_out}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Only the card that is here: halves the compile time of the call.
export JAX_PAGEDATTN_CUDA_ARCHS=${JAX_PAGEDATTN_CUDA_ARCHS:-90a-real}
export JAX_PAGEDATTN_CUDA=1
declare -A status
t0=$(date +%s)
if python3 -m pip install --no-build-isolation --no-deps -v . >"$out/build.log" 2>&1; then
  status[build]="ok ($(( $(date +%s) - t0 )) s)"
else
  status[build]="FAILED"; tail -40 "$out/build.log"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpu.txt" 2>&1
kexpr=${1:-}
t0=$(date +%s)
python3 -P -m pytest -q --timeout=600 -p no:cacheprovider -m gpu ${kexpr:+-k "$kexpr"} tests >"$out/pytest_gpu.log" 2>&1
status[gpu_tests]="$(tail -1 "$out/pytest_gpu.log") ($(( $(date +%s) - t0 )) s)"
if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
  for tool in memcheck racecheck; do
    # Only our kernels are instrumented (XLA's own run unchecked), which keeps it quick.
    timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 --kernel-name kns=jax_pagedattn \
      python3 -P scripts/sanitizer_cases.py --$tool >"$out/sanitizer_$tool.log" 2>&1
    rc=$?
    status[$tool]="rc=$rc $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_$tool.log" | tail -1)"
  done
fi
echo "== $(cat "$out/gpu.txt") =="
grep -E "FAILED|Error|error" "$out/pytest_gpu.log" | head -30
for k in build gpu_tests memcheck racecheck; do printf '%-10s %s\n' "$k" "${status[$k]:-skipped}"; done
