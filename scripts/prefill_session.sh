#!/usr/bin/env bash
# One device call for prefill work, with the slow CPU parts overlapped:
#   in the background from the start: our extension's pip build (with the sm90 kernel,
#   CuTe from .cutlass/) and FlashInfer's JIT of its prefill kernels (scripts/fi_warmup.py);
#   in the foreground: scripts/sm90_prefill_session.sh (harness build, then its GPU
#   stages: $SM90_STAGES);
#   then, once the build is in: scripts/gpu_session.sh with SKIP_BUILD=1 and $STAGES
#   (default "tests bench": the GPU pytest narrowed by $PYTEST_K and the sanitizers run
#   before FlashInfer's JIT is waited for, then $BENCH and any other stage).
# Carry .cutlass and .fi. Each part prints its own summary; every log is packed into
# $OUT/session.tgz, with the ncu digests and the bench tables beside it.
#
#   STAGES="tests bench" PYTEST_K=prefill BENCH="prefill --preset design" \
#     bash scripts/prefill_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
final=${OUT:-/tmp/prefill_out}
out=/tmp/prefill_session
rm -rf "$out" && mkdir -p "$out" "$final"
pack() {
  cp /tmp/pip_build.log /tmp/fi_warmup_d*.log "$out"/ 2>/dev/null
  tar czf "$final/session.tgz" -C "$out" . 2>/dev/null
  cp "$out"/harness/ncu_row*_hot.txt /tmp/jpa_run/*.md "$final"/ 2>/dev/null
  true
}
trap pack EXIT
trap "exit 143" TERM
# The sm90 prefill kernel is the default (switches.py); =0 here times the sm80 one.
export JAX_PAGEDATTN_SM90_PREFILL=${JAX_PAGEDATTN_SM90_PREFILL:-1}
export PYTHONUNBUFFERED=1 JAX_PAGEDATTN_CUDA=1 JAX_PAGEDATTN_CUDA_ARCHS=${JAX_PAGEDATTN_CUDA_ARCHS:-90a-real}
t_start=$(date +%s)

whl=$(ls .cutlass/nvidia_cutlass-*.whl 2>/dev/null | head -1)
if [ -n "$whl" ]; then
  python3 -m zipfile -e "$whl" /tmp/cutlass >/dev/null 2>&1
  export JAX_PAGEDATTN_CUTLASS_INCLUDE=/tmp/cutlass/cutlass_library/source/include JAX_PAGEDATTN_SM90=1
fi

(python3 -m pip install --no-build-isolation --no-deps -v . >/tmp/pip_build.log 2>&1
 echo $? >/tmp/pip_build.rc) &
build_pid=$!

if ls .fi/*.whl >/dev/null 2>&1 && [ "${FI_WARMUP:-fa3 fa2}" != none ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/fi .fi/*.whl >/tmp/fi_install.log 2>&1
  # One JIT per head_dim at once: each builds its own modules (about 110 s apiece alone).
  fi_dims=${FI_HEAD_DIMS:-128}
  for d in ${fi_dims//,/ }; do
    (export PYTHONPATH=/tmp/fi FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
     python3 scripts/fi_warmup.py ${FI_WARMUP:-fa3 fa2} --head-dims "$d" \
       --pos-encodings "${FI_POS:-NONE}" >/tmp/fi_warmup_d$d.log 2>&1) &
  done
fi

if [ "${SM90_STAGES:-check bench sass}" != none ]; then
  SM90_STAGES=${SM90_STAGES:-check bench sass} OUT=$out/harness bash scripts/sm90_prefill_session.sh
  # A kernel that failed or hung its checks would fail or hang the library stages too:
  # they then run on the sm80 kernel, and say so.
  chk=$(grep -E "^check: rc=" "$out/harness/summary.txt" 2>/dev/null)
  if [ -n "$chk" ] && ! [[ "$chk" =~ ^check:\ rc=0\ garbage\ rc=0.*\ 0\ FAIL\ lines\;\ watchdog:\ 0 ]]; then
    echo "== sm90 harness check failed ($chk): library stages run with JAX_PAGEDATTN_SM90_PREFILL=0 =="
    export JAX_PAGEDATTN_SM90_PREFILL=0
  fi
fi

wait "$build_pid"
echo "== pip build: rc=$(cat /tmp/pip_build.rc) ($(( $(date +%s) - t_start )) s since start;" \
  "$(grep -o 'sm90 prefill [A-Z]*' /tmp/pip_build.log | head -1)) =="
[ "$(cat /tmp/pip_build.rc)" = 0 ] || { tail -30 /tmp/pip_build.log; exit 1; }
# Stages that need no FlashInfer (the GPU tests, the sanitizers; $EARLY_STAGES) run
# while its JIT may still be going, in the order given.
stages=${STAGES-tests bench}
late=""
for st in $stages; do
  if [[ " ${EARLY_STAGES:-tests memcheck racecheck} " == *" $st "* ]]; then
    STAGES=$st SKIP_BUILD=1 OUT=$out/lib_$st bash scripts/gpu_session.sh
  else
    late="$late $st"
  fi
done
stages=$late
wait  # FlashInfer's JIT
tail -n 3 /tmp/fi_warmup_d*.log 2>/dev/null
[ -n "${stages// /}" ] && STAGES=$stages SKIP_BUILD=1 OUT=$out/lib bash scripts/gpu_session.sh
echo "== prefill session: $(( $(date +%s) - t_start )) s =="
