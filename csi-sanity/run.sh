#!/usr/bin/env bash
# Runs an installed upstream csi-sanity against a freshly started all-in-one kura on a
# throw-away image pool, then removes everything it made.
#
#   csi-sanity/run.sh [mount|block] [extra csi-sanity flags...]
#
# Environment: KURA (path to the kura binary; default: builds target/release/kura),
# CSI_SANITY (path to csi-sanity; default: the one on PATH).
set -euo pipefail

mode=${1:-mount}
shift || true
case "$mode" in mount | block) ;; *) echo "usage: $0 [mount|block] [csi-sanity flags...]" >&2; exit 2 ;; esac

sanity=${CSI_SANITY:-$(command -v csi-sanity || true)}
if [ -z "$sanity" ] || [ ! -x "$sanity" ]; then
  cat >&2 <<'MSG'
csi-sanity is not installed, so the conformance run cannot start.
Install it from https://github.com/kubernetes-csi/csi-test (cmd/csi-sanity, v5.4.0 or
newer), put it on PATH (or set CSI_SANITY=/path/to/csi-sanity), and run this again.
MSG
  exit 2
fi

cd "$(dirname "$0")/.."
if [ -z "${KURA:-}" ]; then
  cargo build --release --quiet
  KURA=target/release/kura
fi

work=$(mktemp -d /tmp/kura-sanity.XXXXXX)
kura_pid=
cleanup() {
  if [ -n "$kura_pid" ]; then kill -TERM "$kura_pid" 2>/dev/null || true; wait "$kura_pid" 2>/dev/null || true; fi
  # Volumes csi-sanity left staged, then the pool: only what this run made.
  grep -F " $work/" /proc/self/mountinfo | awk '{print $5}' | sort -r | while read -r m; do umount "$m" || true; done
  for dev in $(losetup -n -O NAME -j "$work/pool.img" 2>/dev/null); do losetup -d "$dev" || true; done
  rm -rf "$work"
}
trap cleanup EXIT

"$KURA" all-in-one \
  --endpoint "unix://$work/csi.sock" \
  --node-id sanity-node \
  --state-dir "$work/state" \
  --pool-image "$work/pool.img" --pool-size 64Gi \
  >"$work/kura.log" 2>&1 &
kura_pid=$!
for _ in $(seq 100); do [ -S "$work/csi.sock" ] && break; sleep 0.1; done
[ -S "$work/csi.sock" ] || { cat "$work/kura.log" >&2; echo "kura did not start" >&2; exit 1; }

# kura has no ControllerPublish (volumes are node-local) and no mutable parameters.
status=0
"$sanity" \
  --csi.endpoint "unix://$work/csi.sock" \
  --csi.mountdir "$work/mnt" \
  --csi.stagingdir "$work/stage" \
  --csi.testvolumeaccesstype "$mode" \
  --ginkgo.skip 'ModifyVolume|ControllerPublishVolume|ControllerUnpublishVolume' \
  "$@" || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- kura log (last 50 lines) ---" >&2
  tail -n 50 "$work/kura.log" >&2
fi
exit "$status"
