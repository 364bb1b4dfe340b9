#!/usr/bin/env bash
# kura's main job on one machine: the all-in-one driver (Identity, Controller, Node) on a
# sparse image pool it makes itself, plus a short demo of one volume's life driven over
# its CSI socket. Run as root on Debian:
#
#   bash scripts/demo.sh              # demo, then stop the driver and remove the pool
#   KURA_KEEP=1 bash scripts/demo.sh  # demo, then keep serving until Ctrl-C
#
# KURA_DEMO_DIR (default /var/lib/kura-demo) holds the socket, state and pool image.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

cargo build --release --quiet --bin kura --example demo
dir=${KURA_DEMO_DIR:-/var/lib/kura-demo}
mkdir -p "$dir"
socket="$dir/csi.sock"

kura_pid=
cleanup() {
  if [ -n "$kura_pid" ]; then kill -TERM "$kura_pid" 2>/dev/null || true; wait "$kura_pid" 2>/dev/null || true; fi
  if [ -z "${KURA_KEEP:-}" ]; then
    umount "$dir/state/pool" 2>/dev/null || true
    for dev in $(losetup -n -O NAME -j "$dir/pool.img" 2>/dev/null); do losetup -d "$dev" || true; done
    rm -rf "$dir"
  fi
}
trap cleanup EXIT

target/release/kura all-in-one \
  --endpoint "unix://$socket" \
  --node-id "$(hostname)" \
  --state-dir "$dir/state" \
  --pool-image "$dir/pool.img" --pool-size 10Gi &
kura_pid=$!
for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.1; done
[ -S "$socket" ] || { echo "kura did not start" >&2; exit 1; }

target/release/examples/demo "unix://$socket" "$dir/work"

if [ -n "${KURA_KEEP:-}" ]; then
  echo "kura is serving on unix://$socket (Ctrl-C stops it)"
  wait "$kura_pid"
fi
