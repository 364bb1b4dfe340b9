#!/usr/bin/env bash
# Times kura's changed block tracking (GetMetadataDelta and GetMetadataAllocated, each
# to its last message) on thin raw block volumes of 8 GiB and 64 GiB, against a full
# read of both snapshot images (what a byte-comparing implementation pays at least),
# on a fresh all-in-one kura over a throw-away sparse image pool, then removes
# everything it made. Not a test: it measures and prints a markdown table (see
# bench/README.md).
#
#   bench/cbt.sh [--sizes 8,64] [--runs 3] [--base-mib 256]
#                [--rewrite-percent 1 | --rewrite-mib N]
#
# Environment: POOL_SIZE (default 200Gi: the volumes are thin, the image sparse),
# OVERPROVISION (kura's --overprovision-ratio, default 4: thin volumes may promise no
# more than the host's free space times the ratio, and a 64 GiB volume writes < 1 GiB),
# BENCH_TMP (where the pool image goes; default /tmp), KURA_BIN (the kura binary;
# default the one built here). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet --bin kura --example bench_cbt

source bench/lib.sh
pool_size=${POOL_SIZE:-200Gi}
start_kura "$pool_size" --overprovision-ratio "${OVERPROVISION:-4}"
describe_machine "$pool_size"
echo
status=0
target/release/examples/bench_cbt \
  --endpoint "unix://$work/csi.sock" \
  --pool-root "$work/state/pool" \
  --work "$work/paths" \
  "$@" || status=$?
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$status" -ne 0 ]; then
  echo "--- kura log (last 50 lines) ---" >&2
  tail -n 50 "$work/kura.log" >&2
fi
exit "$status"
