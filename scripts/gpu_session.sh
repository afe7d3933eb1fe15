#!/usr/bin/env bash
# One call on a fresh offline GPU machine: build, then the stages named in $STAGES, in
# order. Full logs and results go to a folder that is packed into $OUT/run.tgz at the
# end (the device tool brings back at most 8 files); a short summary is printed last.
#
#   STAGES="tests memcheck bench" bash scripts/gpu_session.sh
#   STAGES="bench bench2" BENCH="decode --preset design" BENCH2="decode --preset variants \
#     --systems ours,flashinfer --no-host" bash scripts/gpu_session.sh
#
# Stages: tests (pytest -m gpu, PYTEST_K narrows it), memcheck / racecheck
# (compute-sanitizer on scripts/sanitizer_cases.py, our kernels only), bench, bench2,
# bench3 (python -m jax_pagedattn.bench with $BENCH / $BENCH2 / $BENCH3 as arguments;
# FlashInfer from the wheels in .fi/ that shared/tools/flashinfer_wheels.sh prepares).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/jpa_out}
run=/tmp/jpa_run
rm -rf "$run" && mkdir -p "$run" "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PAGEDATTN_CUDA=1 PYTHONUNBUFFERED=1
# Only the card that is here: halves the compile time of the call.
export JAX_PAGEDATTN_CUDA_ARCHS=${JAX_PAGEDATTN_CUDA_ARCHS:-90a-real}
summary=()
pack() { tar czf "$out/run.tgz" -C "$run" . ; cp "$run"/*.png "$out"/ 2>/dev/null; true; }
trap pack EXIT

t0=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -v . >"$run/build.log" 2>&1; then
  tail -40 "$run/build.log"
  exit 1
fi
summary+=("build: ok ($(( $(date +%s) - t0 )) s)")
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv,noheader >"$run/gpu.txt" 2>&1

if ls .fi/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/fi .fi/*.whl >"$run/fi_install.log" 2>&1
  export PYTHONPATH=/tmp/fi FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
fi

for stage in ${STAGES-tests memcheck bench}; do  # STAGES="" runs none (build only)
  t0=$(date +%s)
  case $stage in
    tests)
      python3 -P -m pytest -q -p no:cacheprovider --timeout=500 -m gpu ${PYTEST_K:+-k "$PYTEST_K"} \
        tests >"$run/pytest_gpu.log" 2>&1
      summary+=("tests: $(tail -1 "$run/pytest_gpu.log") ($(( $(date +%s) - t0 )) s)")
      grep -E "^(FAILED|ERROR)" "$run/pytest_gpu.log" | head -20
      ;;
    memcheck | racecheck)
      timeout 200 compute-sanitizer --tool "$stage" --error-exitcode 9 --kernel-name kns=jax_pagedattn \
        python3 -P scripts/sanitizer_cases.py "--$stage" >"$run/sanitizer_$stage.log" 2>&1
      rc=$?
      summary+=("$stage: rc=$rc $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$run/sanitizer_$stage.log" | tail -1) ($(( $(date +%s) - t0 )) s)")
      ;;
    bench | bench2 | bench3)
      var=$(echo "$stage" | tr a-z A-Z)
      args=${!var:-decode --preset design}
      # From /tmp: the installed package, not the source tree, is imported.
      (cd /tmp && timeout "${BENCH_TIMEOUT:-400}" python3 -m jax_pagedattn.bench $args --no-progress \
        --json "$run/$stage.json" --plot "$run/$stage.png" --markdown "$run/$stage.md" \
        >"$run/$stage.txt" 2>"$run/$stage.err")
      rc=$?
      summary+=("$stage ($args): rc=$rc ($(( $(date +%s) - t0 )) s)")
      cat "$run/$stage.txt"
      [ $rc -eq 0 ] || tail -20 "$run/$stage.err"
      ;;
    *) summary+=("unknown stage $stage") ;;
  esac
done
echo "== $(cat "$run/gpu.txt") =="
printf '%s\n' "${summary[@]}"
