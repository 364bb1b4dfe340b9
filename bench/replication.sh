#!/usr/bin/env bash
# What one replica costs: fio 4k random writes on a raw block volume with one replica
# (every 10 s by default) against the same volume without, interleaved in one run;
# the replica's lag meanwhile (kura_replica_lag_seconds from the volume's node, every
# second); bytes shipped against bytes written. On this machine: a controller and two
# `kura node` processes (each its own sparse image pool, mutual TLS with `kura certs`
# certificates, agents on 127.0.0.2 and 127.0.0.3, each given the other as --peer).
# Removes everything it made. Not a test: it measures and prints a markdown table (see
# bench/README.md).
#
#   bench/replication.sh [--interval 10] [--runtime 30] [--runs 3] [--size-mib 1024] [--iodepth 32]
#                        [--catch-up 300]
#
# Environment: POOL_SIZE (default 8Gi), BENCH_TMP (where the pool images go; default
# /tmp). Needs root; installs fio if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v fio >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null
fi

cargo build --release --quiet --bin kura --example bench_replication

work=$(mktemp -d "${BENCH_TMP:-/tmp}/kura-bench.XXXXXX")
pids=()
cleanup() {
  # SIGTERM, then SIGKILL after 10 s: a node serving a replica's read of a point
  # waits for it to end, which at the rates seen here can take minutes.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
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
agents=()
for i in 0 1; do
  ip="127.0.0.$((2 + i))"
  agents+=("$ip:$(port "$ip")")
done
metrics="127.0.0.2:$(port 127.0.0.2)"
for i in 0 1; do
  dir="$work/node-$i"
  mkdir -p "$dir"
  # The volumes are made on node 0: its metrics carry their replicas' series.
  extra=()
  if [ "$i" -eq 0 ]; then extra=(--metrics-listen "$metrics"); fi
  target/release/kura node \
    --endpoint "unix://$dir/csi.sock" \
    --node-id "bench-node-$i" \
    --state-dir "$dir/state" \
    --pool-image "$dir/pool.img" --pool-size "${POOL_SIZE:-8Gi}" \
    --agent-listen "${agents[$i]}" \
    --peer "${agents[$((1 - i))]}" \
    --tls-dir "$work/certs/node" \
    "${extra[@]}" \
    --log-level warn \
    >"$dir/kura.log" 2>&1 &
  pids+=("$!")
done
target/release/kura controller \
  --endpoint "unix://$work/controller.sock" \
  --tls-dir "$work/certs/controller" \
  --agent "${agents[0]}" --agent "${agents[1]}" \
  --log-level warn \
  >"$work/controller.log" 2>&1 &
pids+=("$!")
for socket in "$work/node-0/csi.sock" "$work/node-1/csi.sock" "$work/controller.sock"; do
  for _ in $(seq 200); do [ -S "$socket" ] && break; sleep 0.1; done
  [ -S "$socket" ] || { tail -n 30 "$work"/node-*/kura.log "$work/controller.log" >&2; echo "$socket did not appear" >&2; exit 1; }
done
# The controller sees both agents live before the replicated volume is placed.
sleep 3

echo "kura $(target/release/kura --version | awk '{print $2}'), $(nproc) cores, kernel $(uname -r)," \
  "pools: ${POOL_SIZE:-8Gi} sparse images on $(findmnt -no FSTYPE -T "$work") ($(findmnt -no SOURCE -T "$work"))"
status=0
target/release/examples/bench_replication \
  --controller "unix://$work/controller.sock" \
  --node "unix://$work/node-0/csi.sock" --node-id bench-node-0 \
  --metrics "$metrics" \
  --work "$work/paths" \
  "$@" || status=$?
if [ "$status" -ne 0 ]; then
  for log in "$work"/node-*/kura.log "$work/controller.log"; do
    echo "--- $log (last 30 lines) ---" >&2
    tail -n 30 "$log" >&2
  done
fi
exit "$status"
