#!/usr/bin/env bash
# Builds the sm90 prefill harness on this machine (no GPU needed) and packs it for a
# device call, whose time then goes to the GPU stages rather than to nvcc:
#
#   bash scripts/sm90_prebuild.sh [DIR]      # default DIR: .prebuilt (git-ignored)
#   # device tool, carry [".prebuilt"]:
#   SM90_PREBUILT=.prebuilt bash scripts/sm90_prefill_session.sh
#
# DIR/harness.tgz holds both binaries, their build logs and the commit they were built
# from (with "-dirty" if cuda/ or tests/cuda/ had uncommitted changes).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.prebuilt}
commit=$(git rev-parse --short HEAD)
[ -z "$(git status --porcelain -- cuda tests/cuda)" ] || commit="$commit-dirty"
SM90_STAGES=none OUT=/tmp/sm90_prebuild_out bash scripts/sm90_prefill_session.sh
run=/tmp/sm90_run  # sm90_prefill_session.sh's build directory
[ -x "$run/prefill_harness_sm90" ] && [ -x "$run/prefill_harness_sm90_watchdog" ] || {
  echo "sm90_prebuild: the build failed (see $run/build.log)" >&2
  exit 1
}
echo "$commit" >"$run/prebuilt_commit.txt"
mkdir -p "$dir"
(cd "$run" && tar czf - prefill_harness_sm90 prefill_harness_sm90_watchdog prebuilt_commit.txt build_*.log) \
  >"$dir/harness.tgz"
echo "sm90_prebuild: $dir/harness.tgz ($(du -h "$dir/harness.tgz" | cut -f1), built at $commit)"
