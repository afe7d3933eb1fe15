#!/usr/bin/env bash
# One call on the offline GPU machine (an H200) for the sm90 prefill kernel
# (cuda/kernels/sm90/): build tests/cuda/prefill_harness.cu with -DJPA_HARNESS_SM90
# against the CUTLASS/CuTe headers carried in .cutlass/, then run, each stage bounded by
# a timeout and none stopping the others:
#   check      all correctness cases + garbage plans (harness `all` minus bench); the quick
#              set again with 2 stages, with static bins, with the warpgroup pingpong and
#              with RoPE keys rotated in the kernel (JPA_SM90_ROPE_KEYS=0); all cases and
#              garbage plans with the kernel variant 1 (2 V stages)
#   bench      TFLOP/s of the sm80 kernel and the sm90 kernel, same process: pingpong on,
#              2 stages, no K/V copies, and the items dealt to the library's persistent bins
#   sass       HGMMA count and local-memory traffic in the sm90 kernel's SASS
#   ncu        hardware counters and the hottest SASS lines of one timed launch per row
#              of $NCU_ROWS (bench rows, 0-based), not run unless named
#   memcheck / racecheck / synccheck   compute-sanitizer on the reduced set (`quick`)
# SM90_STAGES picks stages (default: all but ncu). Logs go to $OUT (default /tmp/sm90_out): summary.txt, check.log, bench.log and
# sm90_logs.tgz (everything); the summary table is printed last.
#
#   bash scripts/sm90_prefill_session.sh        # device tool: carry [".cutlass"]
#
# Installs nothing. The headers: .cutlass/unpacked/cutlass_library/source/include, or
# the wheel .cutlass/nvidia_cutlass-*.whl unzipped with python3 -m zipfile.
set -uo pipefail
cd "$(dirname "$0")/.."
t_start=$(date +%s)
budget=${SM90_BUDGET_S:-285}  # seconds for the whole call; stages get what is left
out=${OUT:-/tmp/sm90_out}
run=/tmp/sm90_run
rm -rf "$run" && mkdir -p "$run" "$out"
summary=()
note() { summary+=("$1"); }
pack() {
  cp "$run"/check.log "$run"/bench.log "$out"/ 2>/dev/null
  printf '%s\n' "${summary[@]}" >"$out/summary.txt"
  tar czf "$out/sm90_logs.tgz" -C "$run" --exclude='*.o' --exclude='prefill_harness_sm90*' . 2>/dev/null
  true
}
trap pack EXIT
left() { echo $(( budget - ($(date +%s) - t_start) )); }
# timeout for a stage: its own cap, or what is left of the budget
cap() { local l; l=$(left); (( l < $1 )) && echo "$l" || echo "$1"; }

pick() { command -v "$1" 2>/dev/null || { [ -x "/usr/local/cuda/bin/$1" ] && echo "/usr/local/cuda/bin/$1"; }; }
NVCC=${NVCC:-$(pick nvcc)}
SANITIZER=$(pick compute-sanitizer)
CUOBJDUMP=$(pick cuobjdump)
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv,noheader >"$run/gpu.txt" 2>&1
else
  echo "nvidia-smi not found" >"$run/gpu.txt"
fi
note "gpu: $(head -1 "$run/gpu.txt")"

# ---- headers ----------------------------------------------------------------------------
inc=.cutlass/unpacked/cutlass_library/source/include
if [ ! -d "$inc/cute" ]; then
  whl=$(ls .cutlass/nvidia_cutlass-*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ]; then
    python3 -m zipfile -e "$whl" /tmp/sm90_cutlass >/dev/null 2>&1
    inc=/tmp/sm90_cutlass/cutlass_library/source/include
  fi
fi
[ -d "$inc/cute" ] || note "headers: NOT FOUND (carry .cutlass)"

# ---- build (the translation units in parallel) ----------------------------------------------
# Two harness binaries: the production kernel (ptxas report, SASS, bench, sanitizers) and a
# test build with -DJPA_SM90_WATCHDOG (check, garbage plans), whose mbarrier waits trap
# after 4 s with the barrier named, so a broken protocol cannot hang the call. The sm90
# kernels are five units (the launcher, one per head_dim, the variants), built twice.
bin=$run/prefill_harness_sm90
bin_wd=$run/prefill_harness_sm90_watchdog
# JPA_SM90_VARIANTS: the kernel variants under measurement (prefill_sm90_variants.cu).
flags=(-std=c++17 -O3 -lineinfo --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a
       -Icuda/include -Icuda/kernels "-I$inc" -DJPA_SM90_VARIANTS)
sm90_units=(prefill_sm90 prefill_sm90_d64 prefill_sm90_d128 prefill_sm90_d256 prefill_sm90_variants)
# Builds both binaries from source; returns nonzero if any step failed.
build_from_source() {
  local pids=() rc=0 u pid
  for u in "${sm90_units[@]}"; do
    "$NVCC" "${flags[@]}" -Xptxas -v -c "cuda/kernels/sm90/$u.cu" -o "$run/$u.o" \
      >"$run/build_sm90_$u.log" 2>&1 & pids+=($!)
    "$NVCC" "${flags[@]}" -DJPA_SM90_WATCHDOG -c "cuda/kernels/sm90/$u.cu" -o "$run/${u}_wd.o" \
      >"$run/build_sm90wd_$u.log" 2>&1 & pids+=($!)
  done
  "$NVCC" "${flags[@]}" -c cuda/kernels/prefill.cu -o "$run/prefill.o" >"$run/build_sm80.log" 2>&1 & pids+=($!)
  "$NVCC" "${flags[@]}" -c cuda/kernels/merge_setup.cu -o "$run/merge_setup.o" >"$run/build_setup.log" 2>&1 & pids+=($!)
  "$NVCC" "${flags[@]}" -DJPA_HARNESS_SM90 -c tests/cuda/prefill_harness.cu -o "$run/harness.o" \
    >"$run/build_harness.log" 2>&1 & pids+=($!)
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  (( rc == 0 )) || return 1
  local objs=() objs_wd=()
  for u in "${sm90_units[@]}"; do objs+=("$run/$u.o"); objs_wd+=("$run/${u}_wd.o"); done
  "$NVCC" -gencode=arch=compute_90a,code=sm_90a "$run/harness.o" "${objs[@]}" \
    "$run/prefill.o" "$run/merge_setup.o" -o "$bin" >"$run/build_link.log" 2>&1 || return 1
  "$NVCC" -gencode=arch=compute_90a,code=sm_90a "$run/harness.o" "${objs_wd[@]}" \
    "$run/prefill.o" "$run/merge_setup.o" -o "$bin_wd" >>"$run/build_link.log" 2>&1 || return 1
}
t0=$(date +%s)
brc=0
# SM90_PREBUILT=DIR: harness.tgz there holds both binaries and their build logs, packed
# by scripts/sm90_prebuild.sh on a machine without a GPU (the build is most of a call's
# device time); it says which commit it was built from.
if [ -n "${SM90_PREBUILT:-}" ]; then
  if tar xzf "$SM90_PREBUILT/harness.tgz" -C "$run" 2>/dev/null && [ -x "$bin" ] && [ -x "$bin_wd" ]; then
    note "build: prebuilt at $(cat "$run/prebuilt_commit.txt" 2>/dev/null) (head here: $(git rev-parse --short HEAD 2>/dev/null))"
  else
    note "build: no prebuilt binaries in $SM90_PREBUILT"
    brc=1
  fi
else
  build_from_source || brc=1
fi
cat "$run"/build_*.log >"$run/build.log" 2>/dev/null
ptx=$(cat "$run"/build_sm90_*.log | grep -E "spill|Used" | sed 's/ptxas info *: //' | sort | uniq -c | tr -s ' ' | paste -sd ';' -)
note "build: rc=$brc ($(( $(date +%s) - t0 )) s); sm90 ptxas (2 kernels): ${ptx:-none}"
if (( brc != 0 )); then
  grep -E "error|Error" "$run/build.log" | head -20
fi

# ---- stages ----------------------------------------------------------------------------------
check_timed_out=0
if [ -x "$bin" ] && [ -x "$bin_wd" ]; then
  want() { [[ " ${SM90_STAGES:-check bench sass memcheck racecheck synccheck} " == *" $1 "* ]]; }
  # check: the full case list, then garbage plans (watchdog build)
  t0=$(date +%s)
  if want check; then
  timeout "$(cap 110)" "$bin_wd" check 1234 >"$run/check.log" 2>&1; rc=$?
  timeout "$(cap 60)" "$bin_wd" garbage 99 >>"$run/check.log" 2>&1; rc2=$?
  JPA_SM90_STAGES=2 timeout "$(cap 40)" "$bin_wd" quick 4321 >"$run/check_2stages.log" 2>&1
  note "check, 2 stages (quick set): rc=$? $(grep -c 'PASS$' "$run/check_2stages.log") PASS, $(grep -c FAIL "$run/check_2stages.log") FAIL lines"
  JPA_SM90_STATIC=1 timeout "$(cap 40)" "$bin_wd" quick 4321 >"$run/check_static.log" 2>&1
  note "check, static bins (quick set): rc=$? $(grep -c 'PASS$' "$run/check_static.log") PASS, $(grep -c FAIL "$run/check_static.log") FAIL lines"
  JPA_SM90_PINGPONG=1 timeout "$(cap 40)" "$bin_wd" quick 4321 >"$run/check_pingpong.log" 2>&1
  note "check, warpgroup pingpong (quick set): rc=$? $(grep -c 'PASS$' "$run/check_pingpong.log") PASS, $(grep -c FAIL "$run/check_pingpong.log") FAIL lines"
  # The kernel variants under measurement (prefill_sm90_config.cuh), on every case and
  # garbage plan ($SM90_VARIANT_CHECKS picks them): 1 = the V ring of 2 tiles with two Q
  # buffers (head_dim 128, 3 stages).
  for v in ${SM90_VARIANT_CHECKS-1}; do
    JPA_SM90_VARIANT=$v timeout "$(cap 60)" "$bin_wd" check 1234 >"$run/check_variant$v.log" 2>&1; rv=$?
    JPA_SM90_VARIANT=$v timeout "$(cap 40)" "$bin_wd" garbage 77 >>"$run/check_variant$v.log" 2>&1
    note "check, variant $v (all cases): rc=$rv garbage rc=$? $(grep -c 'PASS$' "$run/check_variant$v.log") PASS, $(grep -c FAIL "$run/check_variant$v.log") FAIL lines"
  done
  JPA_SM90_ROPE_KEYS=0 timeout "$(cap 40)" "$bin_wd" quick 4321 >"$run/check_ropeip.log" 2>&1
  note "check, RoPE keys rotated in the kernel (quick set): rc=$? $(grep -c 'PASS$' "$run/check_ropeip.log") PASS, $(grep -c FAIL "$run/check_ropeip.log") FAIL lines"
  (( rc == 124 || rc2 == 124 )) && check_timed_out=1
  npass=$(grep -c "PASS$" "$run/check.log"); nfail=$(grep -c "FAIL" "$run/check.log")
  note "check: rc=$rc garbage rc=$rc2 (124 = timeout); $npass PASS, $nfail FAIL lines; watchdog: $(grep -c 'sm90 watchdog' "$run/check.log") ($(( $(date +%s) - t0 )) s)"
  grep -E "FAIL|error|rror:|watchdog" "$run/check.log" | head -20
  if (( rc != 0 || rc2 != 0 )); then
    echo "check: last lines of check.log:"; tail -4 "$run/check.log"
    # Diagnostic: the same cases with the warpgroup pingpong.
    JPA_SM90_PINGPONG=1 timeout "$(cap 60)" "$bin_wd" check 1234 >"$run/check_pingpong_all.log" 2>&1
    note "check with pingpong: rc=$? $(grep -c 'PASS$' "$run/check_pingpong_all.log") PASS, $(grep -c FAIL "$run/check_pingpong_all.log") FAIL lines"
  fi
  fi

  # bench: sm80 and sm90 side by side
  if want bench; then
  t0=$(date +%s)
  timeout "$(cap 100)" "$bin" bench 7 >"$run/bench.log" 2>&1; rc=$?
  note "bench: rc=$rc ($(( $(date +%s) - t0 )) s)"
  (( rc != 0 )) && { echo "bench: last lines of bench.log:"; tail -4 "$run/bench.log"; }
  fi

  # ncu: one timed launch of each harness kernel of $NCU_KERNELS (bench row names,
  # default sm90) on each bench row of $NCU_ROWS (full set, per-instruction stall
  # samples), the hottest SASS lines printed by scripts/ncu_hot_sass.py
  if want ncu && command -v ncu >/dev/null; then
    for r in ${NCU_ROWS:-0 4}; do
    for kn in ${NCU_KERNELS:-sm90}; do
      t0=$(date +%s)
      tag=row$r-$kn
      JPA_BENCH_ROWS=$r JPA_BENCH_KERNELS=$kn timeout "$(cap 90)" ncu --clock-control none \
        -k regex:PrefillSm90Kernel --launch-skip 3 --launch-count 1 --set full --import-source yes \
        -f -o "$run/ncu_$tag" "$bin" bench 7 >"$run/ncu_$tag.log" 2>&1
      note "ncu $tag: rc=$? ($(( $(date +%s) - t0 )) s)"
      ncu --import "$run/ncu_$tag.ncu-rep" --page details >"$run/ncu_$tag.txt" 2>&1
      ncu --import "$run/ncu_$tag.ncu-rep" --page source --csv --print-source sass \
        >"$run/ncu_${tag}_sass.csv" 2>&1
      python3 scripts/ncu_hot_sass.py "$run/ncu_${tag}_sass.csv" >"$run/ncu_${tag}_hot.txt" 2>&1
      cp "$run/ncu_$tag.txt" "$run/ncu_${tag}_hot.txt" "$out"/ 2>/dev/null
    done
    done
  fi

  # sass
  if ! want sass; then
    :
  elif [ -n "$CUOBJDUMP" ]; then
    for u in "${sm90_units[@]}"; do "$CUOBJDUMP" --dump-sass "$run/$u.o"; done >"$run/prefill_sm90.sass" 2>&1
    note "sass: HGMMA $(grep -c HGMMA "$run/prefill_sm90.sass"), LDL/STL $(grep -cE 'LDL|STL' "$run/prefill_sm90.sass"), kernels $(grep -c 'Function :' "$run/prefill_sm90.sass")"
  else
    note "sass: cuobjdump not found"
  fi

  # sanitizers on the reduced set; shorter when check hung (they would hang too)
  if [ -n "$SANITIZER" ]; then
    for tool in memcheck racecheck synccheck; do
      want "$tool" || continue
      l=$(left)
      if (( l < 15 )); then note "$tool: skipped (budget)"; continue; fi
      t=$(cap 75); (( check_timed_out )) && t=$(cap 25)
      t0=$(date +%s)
      timeout "$t" "$SANITIZER" --tool "$tool" --error-exitcode 9 "$bin" quick 5 \
        >"$run/sanitizer_$tool.log" 2>&1; rc=$?
      res=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|case\(s\) failed" "$run/sanitizer_$tool.log" | tr '\n' ' ')
      note "$tool: rc=$rc (9 = errors, 124 = timeout) ${res} ($(( $(date +%s) - t0 )) s)"
    done
  else
    note "sanitizers: compute-sanitizer not found"
  fi
else
  note "stages: skipped, no binary"
fi

# ---- summary ---------------------------------------------------------------------------------
echo
echo "== bench (TFLOP/s; causal rows count the visible half) =="
# Per problem, fastest first, against sm90 (the raw lines stay in bench.log).
[ -f "$run/bench.log" ] && python3 scripts/harness_bench_table.py "$run/bench.log"
echo
echo "== summary (total $(( $(date +%s) - t_start )) s; logs in $out) =="
printf '%s\n' "${summary[@]}"
