#!/usr/bin/env bash
# fio (direct I/O, libaio) on every layer of kura's data path: the pool's raw device,
# a file in the pool, kura's raw block, ext4 and xfs volumes (thin and thick), and the
# first overwrites after a snapshot; on a fresh all-in-one kura over a throw-away
# sparse image pool, then removes everything it made. Not a test: it measures and
# prints markdown tables (see bench/README.md).
#
#   bench/datapath.sh [--runtime 10] [--size-mib 1024] [--runs 3] [--cow-seconds 20]
#                     [--targets raw,file,block-thin,...] [--workloads randread-4k-qd32,...]
#                     [--ready-setup 'shell command, run with $BENCH_WORK set, once the targets exist']
#                     [--variant "NAME=shell command" ...  (an A/B inside one pool, per round)]
#
# Environment: POOL_SIZE (default 40Gi), BENCH_TMP (where the pool image and the raw
# device's image go; default /tmp), KURA_BIN (the kura binary; default the one built
# here), BENCH_POOL_SETUP (a shell command run in the pool's root before the targets
# are made, for tuning experiments). Needs root; installs fio if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v fio >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null
fi
for tool in mkfs.xfs mkfs.ext4 losetup; do
  command -v "$tool" >/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xfsprogs e2fsprogs util-linux >/dev/null
    break
  }
done

cargo build --release --quiet --bin kura --example bench_datapath

source bench/lib.sh
pool_size=${POOL_SIZE:-40Gi}
start_kura "$pool_size"
raw_mib=$(( $(stat -c %s "$work/pool.img") >> 20 ))
# A tuning experiment's setup, run in the pool's root before any target is made
# (for example: BENCH_POOL_SETUP='xfs_io -c "cowextsize 1m" volumes').
if [ -n "${BENCH_POOL_SETUP:-}" ]; then
  echo "pool setup: $BENCH_POOL_SETUP"
  (cd "$work/state/pool" && eval "$BENCH_POOL_SETUP")
fi

describe_machine "$pool_size"
echo
status=0
export BENCH_WORK=$work
target/release/examples/bench_datapath \
  --endpoint "unix://$work/csi.sock" \
  --pool-root "$work/state/pool" \
  --work "$work/paths" \
  --raw-size-mib "$raw_mib" \
  "$@" || status=$?
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$status" -ne 0 ]; then
  echo "--- kura log (last 50 lines) ---" >&2
  tail -n 50 "$work/kura.log" >&2
fi
exit "$status"
