#!/usr/bin/env bash
# Runs an installed upstream csi-sanity against a freshly started kura on a throw-away
# image pool, then removes everything it made.
#
#   csi-sanity/run.sh [split] [plain] [mount|block] [extra csi-sanity flags...]
#
# Without `split` it tests `kura all-in-one`. `split` tests the cluster roles: one
# `kura node` (Identity + Node on its socket, the agent on 127.0.0.1) and one
# `kura controller` (Identity + Controller on its own socket) that reaches the node
# over mutual TLS, with certificates from `kura certs` made for the run. csi-sanity
# gets the node's socket as --csi.endpoint and the controller's as
# --csi.controllerendpoint.
#
# By default every optional spec kura serves runs (ModifyVolume with a mutable
# parameter, see below). `plain` runs csi-sanity as it comes, with none of them:
# what an operator gets from csi-sanity without reading kura's flags.
#
# Works with csi-sanity v5.4.x and v5.5.x. kura lists GET_SNAPSHOT, which csi-sanity
# tests from v5.5.0 on; v5.4.x fails any controller capability it does not know, so
# with a csi-sanity that has no GetSnapshot specs that one spec ("should return
# appropriate capabilities") is skipped, and the run says so.
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
plain=
if [ "${1:-}" = plain ]; then
  plain=1
  shift
fi
mode=${1:-mount}
shift || true
case "$mode" in mount | block) ;; *) echo "usage: $0 [split] [plain] [mount|block] [csi-sanity flags...]" >&2; exit 2 ;; esac

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
  # (No mount there, as when kura fails before mounting its pool, is no error: under
  # set -e a failing grep would end the cleanup before the loop devices go.)
  { grep -F " $work/" /proc/self/mountinfo || true; } | awk '{print $5}' | sort -r | while read -r m; do umount "$m" || true; done
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

# Every optional spec kura serves runs unless `plain`: ModifyVolume with a mutable
# parameter kura takes (thin, so the 10 GiB test volumes allocate nothing). Group
# snapshots and GetSnapshot run by themselves (advertised); csi-sanity skips the
# ControllerPublish specs by itself (not advertised: kura volumes are node-local).
flags=(--csi.mountdir "$work/mnt" --csi.stagingdir "$work/stage" --csi.testvolumeaccesstype "$mode")
if [ -z "$plain" ]; then
  printf 'kura.csi.dev/provisioning: thin\n' >"$work/mutable.yaml"
  flags+=(--csi.testvolumemutableparameters "$work/mutable.yaml")
fi
if ! grep -aqF 'GetSnapshot [Controller Server]' "$sanity"; then
  echo "this csi-sanity predates GET_SNAPSHOT (v5.5.0): skipping its capability-list spec" >&2
  flags+=(--ginkgo.skip '\[Controller Server\] ControllerGetCapabilities should return appropriate capabilities')
fi
status=0
"$sanity" "${endpoints[@]}" "${flags[@]}" "$@" || status=$?
if [ "$status" -ne 0 ]; then
  for log in "${logs[@]}"; do
    echo "--- $(basename "$log") (last 50 lines) ---" >&2
    tail -n 50 "$log" >&2
  done
fi
exit "$status"
