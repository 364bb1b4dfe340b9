#!/usr/bin/env bash
# fio (direct I/O, libaio) on every layer of kura's data path against the disk: a
# file in the pool, kura's raw block, ext4 and xfs volumes (thin and thick), the same
# filesystems made straight on a disk of the kind the pool's device is, the first
# overwrites after a snapshot, and with --pgbench-seconds PostgreSQL's pgbench; on a
# fresh all-in-one kura whose pool device is a loop device with direct I/O over a
# sparse file on the host (each disk target is one more such device), then removes
# everything it made. Not a test: it measures and prints markdown tables (see
# bench/README.md).
#
#   bench/datapath.sh [--runtime 10] [--size-mib 1024] [--runs 3] [--cow-seconds 20]
#                     [--targets disk,disk-ext4,file,block-thin,...] [--workloads randread-4k-qd32,...]
#                     [--pgbench-seconds 0] [--pgbench-scale 40] [--pgbench-clients 8]
#                     [--ready-setup 'shell command, run with $BENCH_WORK set, once the targets exist']
#                     [--variant "NAME=shell command" ...  (an A/B inside one pool, per round)]
#
# Environment: POOL_SIZE (default 40Gi), BENCH_TMP (where the pool's and the disks'
# files go; default /tmp), BENCH_POOL=image (kura's own sparse pool image instead of a
# pool device, as before), KURA_BIN (the kura binary; default the one built here),
# BENCH_POOL_SETUP (a shell command run in the pool's root before the targets are
# made, for tuning experiments). Needs root; installs fio, and PostgreSQL for pgbench,
# if missing (never creating or touching the system's cluster).
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

# The newest PostgreSQL's programs, if any is installed.
newest_pg_bin() {
  local dirs=(/usr/lib/postgresql/*/bin)
  if [ -d "${dirs[0]}" ]; then printf '%s\n' "${dirs[@]}" | sort -V | tail -n 1; fi
}
pg_bin=$(newest_pg_bin)
if [[ " $* " == *" --pgbench-seconds "* ]] && [ -z "$pg_bin" ]; then
  # Debian's postgresql makes and starts a cluster of its own unless told not to.
  mkdir -p /etc/postgresql-common
  [ -e /etc/postgresql-common/createcluster.conf ] ||
    echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.conf
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  pg_bin=$(newest_pg_bin)
fi

cargo build --release --quiet --bin kura --example bench_datapath

source bench/lib.sh
pool_size=${POOL_SIZE:-40Gi}
if [ "${BENCH_POOL:-device}" = device ]; then
  pool_device=$(attach_disk pool "$pool_size")
fi
start_kura "$pool_size"
# The private PostgreSQL servers (user postgres) reach their data and sockets below.
chmod 711 "$work"
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
  ${pg_bin:+--pg-bin "$pg_bin"} \
  "$@" || status=$?
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$status" -ne 0 ]; then
  echo "--- kura log (last 50 lines) ---" >&2
  tail -n 50 "$work/kura.log" >&2
fi
exit "$status"
