#!/usr/bin/env bash
# Provisioning latency: N volumes at once through create+stage+publish (CSI, over
# the socket) on a fresh all-in-one kura over a throw-away sparse image pool, with
# the share mkfs takes; then removes everything it made. Not a test: it measures and
# prints a markdown table (see bench/README.md).
#
#   bench/provision.sh [--counts 1,32] [--runs 3] [--size-mib 1024] [--fs ext4]
#
# Environment: POOL_SIZE (default 100Gi: thin volumes reserve their size), BENCH_TMP
# (where the pool image goes; default /tmp). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet --bin kura --example bench_provision

source bench/lib.sh
pool_size=${POOL_SIZE:-100Gi}
start_kura "$pool_size"

describe_machine "$pool_size"
echo
status=0
target/release/examples/bench_provision \
  --endpoint "unix://$work/csi.sock" \
  --work "$work/paths" \
  --mkfs-dir "$work/state/pool/bench-mkfs" \
  "$@" || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- kura log (last 50 lines) ---" >&2
  tail -n 50 "$work/kura.log" >&2
fi
exit "$status"
