#!/usr/bin/env bash
# Runs an installed upstream csi-sanity against a freshly started kura on a throw-away
# image pool, then removes everything it made.
#
#   csi-sanity/run.sh [mount|block] [extra csi-sanity flags...]
#   csi-sanity/run.sh split [mount|block] [extra csi-sanity flags...]
#
# The first form tests `kura all-in-one`. `split` tests the cluster roles: one
# `kura node` (Identity + Node on its socket, the agent on 127.0.0.1) and one
# `kura controller` (Identity + Controller on its own socket) that reaches the node
# over mutual TLS, with certificates from `kura certs` made for the run. csi-sanity
# gets the node's socket as --csi.endpoint and the controller's as
# --csi.controllerendpoint.
#
# Environment: KURA (path to the kura binary; default: builds target/release/kura),
# KURA_NODE (the binary of the split's node, to test a controller against a node of
# another version; default: KURA), CSI_SANITY (path to csi-sanity; default: the one
# on PATH).
set -euo pipefail

split=
if [ "${1:-}" = split ]; then
  split=1
  shift
fi
mode=${1:-mount}
shift || true
case "$mode" in mount | block) ;; *) echo "usage: $0 [split] [mount|block] [csi-sanity flags...]" >&2; exit 2 ;; esac

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
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  # Volumes csi-sanity left staged, then the pool: only what this run made.
  grep -F " $work/" /proc/self/mountinfo | awk '{print $5}' | sort -r | while read -r m; do umount "$m" || true; done
  for dev in $(losetup -n -O NAME -j "$work/pool.img" 2>/dev/null); do losetup -d "$dev" || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Waits until the socket $1 exists, or shows the log $2 and fails.
wait_for_socket() {
  for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done
  cat "$2" >&2
  echo "kura did not start" >&2
  exit 1
}

pool_flags=(--state-dir "$work/state" --pool-image "$work/pool.img" --pool-size 64Gi)
if [ -z "$split" ]; then
  "$KURA" all-in-one \
    --endpoint "unix://$work/csi.sock" \
    --node-id sanity-node \
    "${pool_flags[@]}" \
    >"$work/kura.log" 2>&1 &
  pids+=($!)
  wait_for_socket "$work/csi.sock" "$work/kura.log"
  endpoints=(--csi.endpoint "unix://$work/csi.sock")
  logs=("$work/kura.log")
else
  "$KURA" certs --out "$work/certs" >/dev/null 2>&1
  # A free port on the loopback: nothing answers a connection to it.
  port=
  for candidate in $(shuf -i 20000-60000 -n 50); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null; then port=$candidate; break; fi
  done
  [ -n "$port" ] || { echo "no free port found" >&2; exit 1; }
  "${KURA_NODE:-$KURA}" node \
    --endpoint "unix://$work/node.sock" \
    --node-id sanity-node \
    "${pool_flags[@]}" \
    --agent-listen "127.0.0.1:$port" \
    --tls-dir "$work/certs/node" \
    >"$work/node.log" 2>&1 &
  pids+=($!)
  wait_for_socket "$work/node.sock" "$work/node.log"
  "$KURA" controller \
    --endpoint "unix://$work/controller.sock" \
    --tls-dir "$work/certs/controller" \
    --agent "127.0.0.1:$port" \
    >"$work/controller.log" 2>&1 &
  pids+=($!)
  wait_for_socket "$work/controller.sock" "$work/controller.log"
  # Ready when the controller has the node's first status.
  for _ in $(seq 100); do grep -q "agent is live" "$work/controller.log" && break; sleep 0.1; done
  grep -q "agent is live" "$work/controller.log" || { cat "$work/controller.log" >&2; echo "the controller did not find the node" >&2; exit 1; }
  endpoints=(--csi.endpoint "unix://$work/node.sock" --csi.controllerendpoint "unix://$work/controller.sock")
  logs=("$work/node.log" "$work/controller.log")
fi

# Every optional spec kura serves runs: ModifyVolume with a mutable parameter kura
# takes (thin, so the 10 GiB test volumes allocate nothing), group snapshots (the
# GroupController service is advertised, so its specs run by themselves). Only the
# ControllerPublish specs are skipped: kura volumes are node-local.
printf 'kura.csi.dev/provisioning: thin\n' >"$work/mutable.yaml"
status=0
"$sanity" \
  "${endpoints[@]}" \
  --csi.mountdir "$work/mnt" \
  --csi.stagingdir "$work/stage" \
  --csi.testvolumeaccesstype "$mode" \
  --csi.testvolumemutableparameters "$work/mutable.yaml" \
  --ginkgo.skip 'ControllerPublishVolume|ControllerUnpublishVolume' \
  "$@" || status=$?
if [ "$status" -ne 0 ]; then
  for log in "${logs[@]}"; do
    echo "--- $(basename "$log") (last 50 lines) ---" >&2
    tail -n 50 "$log" >&2
  done
fi
exit "$status"
