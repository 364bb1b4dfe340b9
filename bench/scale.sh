#!/usr/bin/env bash
# Many volumes in one pool: on a fresh all-in-one kura over a throw-away sparse image
# pool, creates thin 1 MiB volumes up to each count, and at each count measures
# creates per second, a whole ListVolumes page by page and in one call, kura's
# resident memory, and how soon a restarted kura (SIGTERM, start) answers Probe
# ready, then lists again from the restarted process. Not a test: it prints a
# markdown table (see bench/README.md); everything it made is removed at the end.
#
#   bench/scale.sh [--counts 1000,10000] [--page 100] [--concurrency 16]
#
# Environment: POOL_SIZE (default 40Gi: thin volumes reserve their size), BENCH_TMP
# (where the pool image goes; default /tmp), KURA_BIN. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

counts=1000,10000
page=100
concurrency=16
while [ $# -gt 0 ]; do
  case $1 in
    --counts) counts=$2; shift 2 ;;
    --page) page=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

cargo build --release --quiet --bin kura --example bench_scale

source bench/lib.sh
pool_size=${POOL_SIZE:-40Gi}
bench=target/release/examples/bench_scale
endpoint="unix://$work/csi.sock"
# On a failure, kura's log first; then lib.sh's cleanup.
on_exit() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    echo "--- kura log (last 50 lines) ---" >&2
    tail -n 50 "$work/kura.log" >&2
  fi
  cleanup
}
trap on_exit EXIT

# rss FIELD: a line of kura's /proc status (VmRSS, VmHWM) in MiB.
rss() {
  awk -v f="$1:" '$1 == f {printf "%.1f MiB", $2 / 1024}' "/proc/$kura_pid/status"
}

start_kura "$pool_size"
describe_machine "$pool_size"
echo "thin 1 MiB mount volumes, $concurrency CreateVolume calls at once, pages of $page"
echo
echo "| volumes | creates/s (since the previous count) | list, pages of $page | list, one call | RSS | RSS peak | restart to ready | list after restart, pages of $page | RSS after restart and list |"
echo "|---|---|---|---|---|---|---|---|---|"
made=0
for n in ${counts//,/ }; do
  rate=$($bench create --endpoint "$endpoint" --from "$made" --to "$n" --concurrency "$concurrency")
  made=$n
  paged=$($bench list --endpoint "$endpoint" --page "$page" --expect "$n")
  whole=$($bench list --endpoint "$endpoint" --page 0 --expect "$n")
  resident=$(rss VmRSS)
  peak=$(rss VmHWM)
  stop_kura
  started=$(date +%s%N)
  spawn_kura "$pool_size"
  ready=$($bench ready --endpoint "$endpoint" --since-ns "$started")
  again=$($bench list --endpoint "$endpoint" --page "$page" --expect "$n")
  echo "| $n | $rate | ${paged} s | ${whole} s | $resident | $peak | ${ready} s | ${again} s | $(rss VmRSS) |"
done
echo
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
