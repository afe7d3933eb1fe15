#!/usr/bin/env bash
# The benchmark run behind docs/BENCHMARKS.md, on a fresh offline GPU machine:
# build, sanitizer cases, FlashInfer from wheels in .fi/ (shared/tools/flashinfer_wheels.sh),
# then every DESIGN.md §6 workload for our kernels, FlashInfer and the jnp reference in one
# process. Outputs (JSON, plot, markdown table, logs) go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/jpa_out}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PAGEDATTN_CUDA=1
export JAX_PAGEDATTN_CUDA_ARCHS=${JAX_PAGEDATTN_CUDA_ARCHS:-90a-real}
python3 -m pip install -q --no-build-isolation --no-deps . >"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
for t in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $t --error-exitcode 9 --kernel-name kns=jax_pagedattn \
    python3 -P scripts/sanitizer_cases.py --$t >"$out/sanitizer_$t.log" 2>&1
  echo "$t rc=$? $(grep -E 'SUMMARY' "$out/sanitizer_$t.log")"
done
if ls .fi/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/fi .fi/*.whl
  export PYTHONPATH=/tmp/fi FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >"$out/gpu.txt"
(cd /tmp && timeout "${BENCH_TIMEOUT:-420}" python3 -m jax_pagedattn.bench all --preset "${PRESETS:-all}" \
  --no-progress --json "$out/bench.json" --plot "$out/bench.png" --markdown "$out/bench.md" \
  >"$out/bench.txt" 2>"$out/bench.err")
echo "bench rc=$?"
tail -70 "$out/bench.txt"
