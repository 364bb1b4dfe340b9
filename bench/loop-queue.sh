#!/usr/bin/env bash
# Sets queue attributes on the loop devices of the volumes in a datapath benchmark's
# pool, for A/B runs of loop queue settings (see bench/README.md):
#
#   bench/datapath.sh --variant "kernel=bench/loop-queue.sh nomerges=0" \
#                     --variant "kura=bench/loop-queue.sh nomerges=1"
#
# Each argument is ATTRIBUTE=VALUE under /sys/block/loopN/queue/. Only devices backed
# by a file in $BENCH_WORK/state/pool/volumes/ are touched.
set -euo pipefail
: "${BENCH_WORK:?run by bench/datapath.sh, which sets BENCH_WORK}"
volumes="$BENCH_WORK/state/pool/volumes/"
for setting in "$@"; do
  case "$setting" in
    *=*) ;;
    *) echo "loop-queue.sh: $setting: expected ATTRIBUTE=VALUE" >&2; exit 2 ;;
  esac
done
for backing in /sys/block/loop*/loop/backing_file; do
  [ -e "$backing" ] || continue
  [[ "$(cat "$backing")" == "$volumes"* ]] || continue
  queue="${backing%/loop/backing_file}/queue"
  for setting in "$@"; do
    echo "${setting#*=}" >"$queue/${setting%%=*}"
  done
done
