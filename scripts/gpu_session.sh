#!/usr/bin/env bash
# One call on a fresh offline GPU machine: build, then the stages named in $STAGES, in
# order. Full logs and results go to a folder that is packed into $OUT/run.tgz at the
# end (the device tool brings back at most 8 files); a short summary is printed last.
#
#   STAGES="tests memcheck bench" bash scripts/gpu_session.sh
#   STAGES="bench bench2" BENCH="decode --preset design" BENCH2="decode --preset variants \
#     --systems ours,flashinfer --no-host" bash scripts/gpu_session.sh
#
# The sm90 prefill kernel is built when .cutlass/ holds the nvidia-cutlass wheel
# (shared/tools/cutlass_wheel.sh; carry that one file).
# Stages: tests (pytest -m gpu, PYTEST_K narrows it), memcheck / racecheck
# (compute-sanitizer on scripts/sanitizer_cases.py, our kernels only), bench, bench2,
# bench3 (python -m jax_pagedattn.bench with $BENCH / $BENCH2 / $BENCH3 as arguments;
# FlashInfer from the wheels in .fi/ that shared/tools/flashinfer_wheels.sh prepares),
# sweep ($SWEEP once per value of $SWEEP_VAR in $SWEEP_VALUES), ncu (hardware
# counters of our kernel and FlashInfer's on each preset of $NCU_PRESETS), rpa
# (scripts/bench_rpa.py with $RPA as arguments: the in-graph ragged loop), timeline
# (scripts/op_timeline.py on $TIMELINE_PRESETS), host (scripts/host_costs.py on each
# BxL of $HOST_SHAPES).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
out=${OUT:-/tmp/jpa_out}
run=/tmp/jpa_run
rm -rf "$run" && mkdir -p "$run" "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PAGEDATTN_CUDA=1 PYTHONUNBUFFERED=1
# Only the card that is here: halves the compile time of the call.
export JAX_PAGEDATTN_CUDA_ARCHS=${JAX_PAGEDATTN_CUDA_ARCHS:-90a-real}
summary=()
pack() { tar czf "$out/run.tgz" -C "$run" . ; cp "$run"/*.png "$out"/ 2>/dev/null; true; }
trap pack EXIT

# CuTe headers for the sm90 prefill kernel: the nvidia-cutlass wheel carried in .cutlass/.
if ls .cutlass/nvidia_cutlass-*.whl >/dev/null 2>&1; then
  python3 -m zipfile -e "$(ls .cutlass/nvidia_cutlass-*.whl | head -1)" /tmp/cutlass >/dev/null 2>&1
  export JAX_PAGEDATTN_CUTLASS_INCLUDE=/tmp/cutlass/cutlass_library/source/include JAX_PAGEDATTN_SM90=1
fi
t0=$(date +%s)
if [ "${SKIP_BUILD:-0}" = 1 ]; then  # installed already (scripts/prefill_session.sh)
  cp /tmp/pip_build.log "$run/build.log" 2>/dev/null || echo "SKIP_BUILD=1" >"$run/build.log"
elif ! python3 -m pip install --no-build-isolation --no-deps -v . >"$run/build.log" 2>&1; then
  tail -40 "$run/build.log"
  exit 1
fi
summary+=("build: ok ($(( $(date +%s) - t0 )) s; $(grep -o 'sm90 prefill [A-Z]*' "$run/build.log" | head -1))")
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv,noheader >"$run/gpu.txt" 2>&1

if [ -d /tmp/fi/flashinfer ]; then
  export PYTHONPATH=/tmp/fi FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
elif ls .fi/*.whl >/dev/null 2>&1; then
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
      timeout "${SAN_TIMEOUT:-200}" compute-sanitizer --tool "$stage" --error-exitcode 9 --kernel-name kns=jax_pagedattn \
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
    sweep)
      # The bench ($SWEEP) once per value in $SWEEP_VALUES of the environment variable
      # $SWEEP_VAR ("auto": unset), e.g. JAX_PAGEDATTN_CTAS_PER_SM (how many bins the
      # planner fills) or JAX_PAGEDATTN_DEAL (bins / equal pieces).
      var=${SWEEP_VAR:-JAX_PAGEDATTN_CTAS_PER_SM}
      for c in ${SWEEP_VALUES:-auto 1 2}; do
        (cd /tmp && if [ "$c" = auto ]; then unset "$var"; else export "$var=$c"; fi
         timeout "${BENCH_TIMEOUT:-400}" python3 -m jax_pagedattn.bench ${SWEEP:-decode --preset design} \
           --no-progress --no-host --json "$run/sweep_$c.json" >"$run/sweep_$c.txt" 2>"$run/sweep_$c.err")
        echo "-- $var=$c (rc=$?)"
        cat "$run/sweep_$c.txt"
      done
      summary+=("sweep $var: ($(( $(date +%s) - t0 )) s)")
      ;;
    rpa)
      (cd /tmp && timeout "${BENCH_TIMEOUT:-400}" python3 -P "$repo/scripts/bench_rpa.py" \
         ${RPA:---batch 64 --kv-len 4096 --layers 1,16} --json "$run/rpa.json" \
         >"$run/rpa.txt" 2>"$run/rpa.err")
      rc=$?
      summary+=("rpa (${RPA:-default}): rc=$rc ($(( $(date +%s) - t0 )) s)")
      cat "$run/rpa.txt"
      [ $rc -eq 0 ] || tail -20 "$run/rpa.err"
      ;;
    timeline)
      (cd /tmp && timeout "${BENCH_TIMEOUT:-400}" python3 -P "$repo/scripts/op_timeline.py" \
         --preset "${TIMELINE_PRESETS:-64x4096,16x4096}" >"$run/timeline.txt" 2>"$run/timeline.err")
      rc=$?
      summary+=("timeline: rc=$rc ($(( $(date +%s) - t0 )) s)")
      cat "$run/timeline.txt"
      [ $rc -eq 0 ] || tail -20 "$run/timeline.err"
      ;;
    host)
      # Where a step's host time goes (scripts/host_costs.py) on each BxL of $HOST_SHAPES.
      for shape in ${HOST_SHAPES:-16x4096 64x4096}; do
        (cd /tmp && timeout "${BENCH_TIMEOUT:-400}" python3 -P "$repo/scripts/host_costs.py" \
           --batch "${shape%x*}" --kv-len "${shape#*x}" >"$run/host_$shape.txt" 2>"$run/host_$shape.err")
        echo "-- host costs $shape (rc=$?)"
        cat "$run/host_$shape.txt"; tail -5 "$run/host_$shape.err"
      done
      summary+=("host: ($(( $(date +%s) - t0 )) s)")
      ;;
    ncu)
      # Hardware counters of our attention kernel and FlashInfer's on the $NCU_PRESET
      # workloads (one bench process per kernel; clocks left alone, METHOD.md).
      for pre in ${NCU_PRESETS:-64x4096}; do
      for k in "regex:^PrefillKernel" "regex:BatchPrefillWithPagedKVCacheKernel"; do
        tag=$pre-$(echo "$k" | tr -cd 'A-Za-z')
        (cd /tmp && timeout "${NCU_TIMEOUT:-200}" ncu --clock-control none -k "$k" --launch-skip 8 \
           --launch-count "${NCU_COUNT:-2}" --section SpeedOfLight --section MemoryWorkloadAnalysis \
           --section Occupancy --section LaunchStats --section WarpStateStats \
           python3 -m jax_pagedattn.bench decode --preset "$pre" --quick \
           --systems ours-tc,flashinfer-tc --no-host --no-ceilings --no-check --no-progress \
           >"$run/ncu_$tag.txt" 2>&1)
        echo "-- ncu $k (rc=$?)"
        keys="Duration|DRAM Throughput|Memory Throughput|L2 Hit|L1/TEX Hit|Occupancy|Registers Per"
        keys="$keys|Shared Memory Config|Block Limit|Grid Size|Warp Cycles Per Issued|Mem Busy"
        grep -E "^  [A-Za-z].*\(|$keys" "$run/ncu_$tag.txt" | head -"${NCU_LINES:-80}"
      done
      done
      summary+=("ncu: ($(( $(date +%s) - t0 )) s)")
      ;;
    *) summary+=("unknown stage $stage") ;;
  esac
done
echo "== $(cat "$run/gpu.txt") =="
printf '%s\n' "${summary[@]}"
