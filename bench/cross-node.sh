#!/usr/bin/env bash
# Times kura's cross-node transfer of 1 GiB and 8 GiB images (half data, half holes)
# between two `kura node` agents on this machine (each with its own sparse image pool,
# mutual TLS with `kura certs` certificates, agents on 127.0.0.2 and 127.0.0.3)
# against `cp --sparse=always` of the same image in the same run, then removes
# everything it made. Not a test: it measures and prints a markdown table (see
# bench/README.md).
#
#   bench/cross-node.sh [--sizes 1,8] [--runs 3]
#
# Environment: POOL_SIZE (default 24Gi), BENCH_TMP (where the pool images go; default
# /tmp). Needs root, and room for the largest image's data three times in BENCH_TMP.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet --bin kura --example bench_transfer

work=$(mktemp -d "${BENCH_TMP:-/tmp}/kura-bench.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  # Only what this run made: mounts under $work (deepest first), then loop devices
  # whose backing file is under $work.
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

target/release/kura certs --out "$work/certs" >/dev/null
port() { python3 -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1],0)); print(s.getsockname()[1])' "$1"; }
addresses=()
for i in 0 1; do
  ip="127.0.0.$((2 + i))"
  address="$ip:$(port "$ip")"
  addresses+=("$address")
  dir="$work/node-$i"
  mkdir -p "$dir"
  target/release/kura node \
    --endpoint "unix://$dir/csi.sock" \
    --node-id "bench-node-$i" \
    --state-dir "$dir/state" \
    --pool-image "$dir/pool.img" --pool-size "${POOL_SIZE:-24Gi}" \
    --agent-listen "$address" \
    --tls-dir "$work/certs/node" \
    --log-level warn \
    >"$dir/kura.log" 2>&1 &
  pids+=("$!")
done
for i in 0 1; do
  for _ in $(seq 200); do [ -S "$work/node-$i/csi.sock" ] && break; sleep 0.1; done
  [ -S "$work/node-$i/csi.sock" ] || { cat "$work/node-$i/kura.log" >&2; echo "node $i did not start" >&2; exit 1; }
done

echo "kura $(target/release/kura --version | awk '{print $2}'), $(nproc) cores, kernel $(uname -r)," \
  "pools: ${POOL_SIZE:-24Gi} sparse images on $(findmnt -no FSTYPE -T "$work") ($(findmnt -no SOURCE -T "$work"))" >&2
status=0
target/release/examples/bench_transfer \
  --certs "$work/certs" \
  --source "${addresses[0]}" --destination "${addresses[1]}" \
  --source-root "$work/node-0/state/pool" --destination-root "$work/node-1/state/pool" \
  --pids "${pids[0]},${pids[1]}" \
  "$@" || status=$?
if [ "$status" -ne 0 ]; then
  for i in 0 1; do echo "--- node $i log (last 30 lines) ---" >&2; tail -n 30 "$work/node-$i/kura.log" >&2; done
fi
exit "$status"
