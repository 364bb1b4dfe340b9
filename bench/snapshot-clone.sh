#!/usr/bin/env bash
# Times kura's snapshots and clones of volumes holding 1 GiB and 8 GiB of data against
# a full copy of the same data, on a fresh all-in-one kura over a throw-away sparse
# image pool, then removes everything it made. Not a test: it measures and prints a
# markdown table (see bench/README.md).
#
#   bench/snapshot-clone.sh [--sizes 1,8] [--runs 5]
#
# Environment: POOL_SIZE (default 40Gi), BENCH_TMP (where the pool image goes; default
# /tmp). Needs root, and room for the largest size twice over in BENCH_TMP.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet --bin kura --example bench_snapshot

work=$(mktemp -d "${BENCH_TMP:-/tmp}/kura-bench.XXXXXX")
kura_pid=
cleanup() {
  if [ -n "$kura_pid" ]; then kill -TERM "$kura_pid" 2>/dev/null || true; wait "$kura_pid" 2>/dev/null || true; fi
  # Only what this run made: mounts under $work (deepest first), then loop devices
  # whose backing file is under $work (volumes first, the pool image last).
  for _ in 1 2 3; do
    grep -F " $work/" /proc/self/mountinfo | awk '{print $5}' | sort -r | while read -r m; do umount "$m" 2>/dev/null || true; done
    losetup -n -l -O NAME,BACK-FILE 2>/dev/null | awk -v p="$work/" 'index($2, p) == 1 {print $1}' |
      sort -r | while read -r dev; do losetup -d "$dev" 2>/dev/null || true; done
    grep -qF " $work/" /proc/self/mountinfo || break
    sleep 0.5
  done
  rm -rf "$work"
}
trap cleanup EXIT

target/release/kura all-in-one \
  --endpoint "unix://$work/csi.sock" \
  --node-id bench-node \
  --state-dir "$work/state" \
  --pool-image "$work/pool.img" --pool-size "${POOL_SIZE:-40Gi}" \
  --log-level warn \
  >"$work/kura.log" 2>&1 &
kura_pid=$!
for _ in $(seq 100); do [ -S "$work/csi.sock" ] && break; sleep 0.1; done
[ -S "$work/csi.sock" ] || { cat "$work/kura.log" >&2; echo "kura did not start" >&2; exit 1; }

echo "kura $(target/release/kura --version | awk '{print $2}'), $(nproc) cores, kernel $(uname -r)," \
  "pool: ${POOL_SIZE:-40Gi} sparse image on $(findmnt -no FSTYPE -T "$work") ($(findmnt -no SOURCE -T "$work"))" >&2
status=0
target/release/examples/bench_snapshot \
  --endpoint "unix://$work/csi.sock" \
  --pool-root "$work/state/pool" \
  --work "$work/paths" \
  "$@" || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- kura log (last 50 lines) ---" >&2
  tail -n 50 "$work/kura.log" >&2
fi
exit "$status"
