#!/usr/bin/env bash
# Deletes the kind cluster of up.sh. Before that, removes kura's workloads and, inside
# each worker, unmounts its pool and detaches the loop devices of that worker's own
# files: the workers share the host's kernel and /dev, so loop devices would
# otherwise stay attached on the host. Devices are found by their backing file
# (`losetup -j` compares device and inode), never all at once.
set -euo pipefail

CLUSTER="${KURA_KIND_CLUSTER:-kura}"

remove_workloads() {
  kubectl --context "kind-$CLUSTER" delete namespace kura-smoke --ignore-not-found --wait=true --timeout=120s || true
  kubectl --context "kind-$CLUSTER" -n kura delete daemonset kura-node --ignore-not-found --wait=true --timeout=120s || true
}

# Inside one worker: detach the loop devices of the volume images and of the pool
# image, and unmount the pool.
release_worker() {
  local worker="$1"
  docker exec "$worker" sh -c '
    pool=/var/lib/kura
    for image in "$pool"/pool/volumes/*.img; do
      [ -e "$image" ] || continue
      for dev in $(losetup -n -O NAME -j "$image"); do
        umount -l "$dev" 2>/dev/null || true
        losetup -d "$dev" || true
      done
    done
    umount "$pool/pool" 2>/dev/null || umount -l "$pool/pool" 2>/dev/null || true
    if [ -e "$pool/pool.img" ]; then
      for dev in $(losetup -n -O NAME -j "$pool/pool.img"); do
        losetup -d "$dev" || true
      done
    fi
  ' || true
}

main() {
  if ! kind get clusters | grep -qx "$CLUSTER"; then
    echo "no kind cluster $CLUSTER"
    return
  fi
  remove_workloads
  local worker
  for worker in $(kind get nodes --name "$CLUSTER"); do
    case "$worker" in
      *control-plane*) ;;
      *) release_worker "$worker" ;;
    esac
  done
  kind delete cluster --name "$CLUSTER"
}

main
