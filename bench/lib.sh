# shellcheck shell=bash
# Shared by the benchmarks: a throw-away all-in-one kura over a fresh sparse pool
# image in a temporary directory, and a cleanup that removes only what it made.
# Source it after `cd` to the repository root; it sets $work and starts nothing.

work=$(mktemp -d "${BENCH_TMP:-/tmp}/kura-bench.XXXXXX")
kura_pid=
cleanup() {
  if [ -n "$kura_pid" ]; then kill -TERM "$kura_pid" 2>/dev/null || true; wait "$kura_pid" 2>/dev/null || true; fi
  # PostgreSQL servers a benchmark started on its targets (their data under $work):
  # a fast shutdown (SIGINT), waited for, so their filesystems can be unmounted.
  find "$work" -maxdepth 5 -name postmaster.pid 2>/dev/null | while read -r pidfile; do
    pid=$(head -n 1 "$pidfile")
    kill -INT "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
  # Only what this run made: mounts under $work (deepest first), then loop devices
  # whose backing file is under $work (volumes first, the pool image last).
  for _ in 1 2 3; do
    # (grep finds nothing when nothing is mounted: that must not end the cleanup.)
    { grep -F " $work/" /proc/self/mountinfo || true; } | awk '{print $5}' | sort -r | while read -r m; do umount "$m" 2>/dev/null || true; done
    losetup -n -l -O NAME,BACK-FILE 2>/dev/null | awk -v p="$work/" 'index($2, p) == 1 {print $1}' |
      sort -r | while read -r dev; do losetup -d "$dev" 2>/dev/null || true; done
    grep -qF " $work/" /proc/self/mountinfo || break
    sleep 0.5
  done
  rm -rf "$work"
}
trap cleanup EXIT

# attach_disk NAME SIZE: a "disk" of the kind the benchmarks compare with: a loop
# device with direct I/O over a new sparse file $work/NAME.img of SIZE (40Gi or 40G
# units) on the host's filesystem. Prints the device; cleanup detaches it.
attach_disk() {
  truncate -s "${2%i}" "$work/$1.img"
  losetup --direct-io=on --show -f "$work/$1.img"
}

# spawn_kura SIZE [extra kura flags...]: kura all-in-one on $work/pool.img of SIZE
# (or, with $pool_device set, on that device), serving $work/csi.sock (appending to
# $work/kura.log); does not wait.
spawn_kura() {
  local size=$1
  shift
  local pool=(--pool-image "$work/pool.img" --pool-size "$size")
  if [ -n "${pool_device:-}" ]; then pool=(--pool-device "$pool_device"); fi
  "${KURA_BIN:-target/release/kura}" all-in-one \
    --endpoint "unix://$work/csi.sock" \
    --node-id bench-node \
    --state-dir "$work/state" \
    "${pool[@]}" \
    --log-level warn "$@" \
    >>"$work/kura.log" 2>&1 &
  kura_pid=$!
}

# stop_kura: SIGTERM, as a rolling update stops it; waits until it has exited.
stop_kura() {
  kill -TERM "$kura_pid"
  wait "$kura_pid" || true
  kura_pid=
}

# start_kura SIZE [extra kura flags...]: spawn_kura, then waits for the socket.
start_kura() {
  spawn_kura "$@"
  for _ in $(seq 100); do [ -S "$work/csi.sock" ] && break; sleep 0.1; done
  [ -S "$work/csi.sock" ] || { cat "$work/kura.log" >&2; echo "kura did not start" >&2; exit 1; }
}

# What the run is on, for the report.
describe_machine() {
  local what="$1 sparse image"
  if [ -n "${pool_device:-}" ]; then what="$1 device $pool_device (a loop device, direct I/O, over a sparse file)"; fi
  echo "kura $(target/release/kura --version | awk '{print $2}'), $(nproc) cores, kernel $(uname -r)," \
    "pool: $what on $(findmnt -no FSTYPE -T "$work") ($(findmnt -no SOURCE -T "$work")); $(uptime)"
}
