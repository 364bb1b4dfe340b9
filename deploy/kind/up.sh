#!/usr/bin/env bash
# A kind cluster running kura, from this checkout, with a smoke test across both
# workers. Needs docker, kind and kubectl; reaches the network for the snapshot CRDs
# and images. Safe to rerun (the cluster and the TLS Secrets are kept; a new image is
# rolled out).
#
#   deploy/kind/up.sh            # build, create, install, smoke test
#   KURA_SMOKE=0 deploy/kind/up.sh   # without the smoke test
#   deploy/kind/down.sh          # delete it all
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER="${KURA_KIND_CLUSTER:-kura}"
# external-snapshotter's CRDs and snapshot-controller, at the tag of the manifests'
# csi-snapshotter.
SNAPSHOTTER_VERSION="v8.6.0"
SNAPSHOTTER="https://github.com/kubernetes-csi/external-snapshotter"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
TAG="${VERSION}-dev-$(git rev-parse --short HEAD)"
if ! git diff --quiet HEAD 2>/dev/null; then
  TAG="${TAG}-dirty-$(date +%s)"
fi
IMAGE="kura:${TAG}"
SMOKE_NS="kura-smoke"
work="$(mktemp -d /tmp/kura-kind.XXXXXX)"

cleanup() {
  rm -rf "$work"
}
trap cleanup EXIT

log() {
  printf '\n== %s\n' "$*"
}

need_tools() {
  local tool
  for tool in docker kind kubectl; do
    command -v "$tool" >/dev/null || { echo "up.sh needs $tool" >&2; exit 1; }
  done
}

build_image() {
  log "building $IMAGE"
  docker build --build-arg "VERSION=$VERSION" --build-arg "REVISION=$(git rev-parse HEAD)" -t "$IMAGE" .
}

create_cluster() {
  if kind get clusters | grep -qx "$CLUSTER"; then
    log "kind cluster $CLUSTER exists"
  else
    log "creating kind cluster $CLUSTER"
    kind create cluster --name "$CLUSTER" --config deploy/kind/cluster.yaml --wait 180s
  fi
  kubectl config use-context "kind-$CLUSTER" >/dev/null
}

load_image() {
  log "loading $IMAGE into the nodes"
  kind load docker-image --name "$CLUSTER" "$IMAGE"
}

install_snapshot_controller() {
  log "snapshot CRDs and snapshot-controller $SNAPSHOTTER_VERSION, group snapshots on"
  kubectl apply -k "$SNAPSHOTTER/client/config/crd?ref=$SNAPSHOTTER_VERSION"
  kubectl -n kube-system apply -k "$SNAPSHOTTER/deploy/kubernetes/snapshot-controller?ref=$SNAPSHOTTER_VERSION"
  # Volume group snapshots are behind a feature gate (beta, off) in v8.6.0, on the
  # snapshot-controller as on kura's csi-snapshotter.
  if ! kubectl -n kube-system get deployment snapshot-controller \
    -o jsonpath='{.spec.template.spec.containers[0].args}' | grep -q CSIVolumeGroupSnapshot; then
    kubectl -n kube-system patch deployment snapshot-controller --type=json \
      -p '[{"op":"add","path":"/spec/template/spec/containers/0/args/-","value":"--feature-gates=CSIVolumeGroupSnapshot=true"}]'
  fi
  kubectl -n kube-system rollout status deployment/snapshot-controller --timeout=180s
}

# The two TLS Secrets from `kura certs`, run in the image just built; the keys live
# only in a temporary directory and in the Secrets.
create_tls_secrets() {
  kubectl apply -f deploy/kubernetes/namespace.yaml
  if kubectl -n kura get secret kura-controller-tls kura-node-tls >/dev/null 2>&1; then
    log "TLS Secrets exist"
    return
  fi
  log "creating the TLS Secrets with kura certs"
  docker run --rm --user "$(id -u):$(id -g)" -v "$work:/out" "$IMAGE" certs --out /out/certs
  local role
  for role in controller node; do
    kubectl -n kura create secret generic "kura-$role-tls" --type=kubernetes.io/tls \
      --from-file="$work/certs/$role/"
  done
}

apply_kura() {
  log "applying deploy/kind with $IMAGE"
  mkdir -p "$work/overlay"
  cat >"$work/overlay/kustomization.yaml" <<YAML
resources:
  - $(realpath --relative-to="$work/overlay" deploy/kind)
images:
  - name: kura
    newTag: "$TAG"
YAML
  kubectl apply -k "$work/overlay"
  kubectl -n kura rollout status daemonset/kura-node --timeout=300s
  kubectl -n kura rollout status deployment/kura-controller --timeout=300s
}

# --- smoke test -----------------------------------------------------------------

workers() {
  kubectl get nodes -l '!node-role.kubernetes.io/control-plane' \
    -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}'
}

# claim NAME SIZE [MODE] [SOURCE_KIND SOURCE_NAME]
claim() {
  local name="$1" size="$2" mode="${3:-Filesystem}" source_kind="${4:-}" source_name="${5:-}"
  {
    cat <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: $name
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: kura
  volumeMode: $mode
  resources:
    requests:
      storage: $size
YAML
    if [ "$source_kind" = VolumeSnapshot ]; then
      printf '  dataSource:\n    apiGroup: snapshot.storage.k8s.io\n    kind: VolumeSnapshot\n    name: %s\n' "$source_name"
    elif [ "$source_kind" = PersistentVolumeClaim ]; then
      printf '  dataSource:\n    kind: PersistentVolumeClaim\n    name: %s\n' "$source_name"
    fi
  } | kubectl -n "$SMOKE_NS" apply -f -
}

# pod NAME CLAIM NODE [block]: a pod on NODE using CLAIM at /data (or /dev/xvda).
pod() {
  local name="$1" claim="$2" node="$3" block="${4:-}" use
  if [ -n "$block" ]; then
    use="      volumeDevices:
        - name: data
          devicePath: /dev/xvda"
  else
    use="      volumeMounts:
        - name: data
          mountPath: /data"
  fi
  kubectl -n "$SMOKE_NS" apply -f - <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: $name
spec:
  nodeSelector:
    kubernetes.io/hostname: $node
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: busybox:1.37.0
      command: [sleep, "1000000"]
$use
  volumes:
    - name: data
      persistentVolumeClaim:
        claimName: $claim
YAML
  kubectl -n "$SMOKE_NS" wait --for=condition=Ready "pod/$name" --timeout=180s
}

in_pod() {
  local name="$1"
  shift
  kubectl -n "$SMOKE_NS" exec "$name" -- sh -c "$*"
}

expect() {
  local what="$1" want="$2" got="$3"
  if [ "$got" != "$want" ]; then
    echo "smoke test FAILED: $what: wanted '$want', got '$got'" >&2
    exit 1
  fi
  echo "ok: $what"
}

# The node a claim's volume was made on (the PV's node affinity).
volume_node() {
  local pv
  pv="$(kubectl -n "$SMOKE_NS" get pvc "$1" -o jsonpath='{.spec.volumeName}')"
  kubectl get pv "$pv" -o jsonpath='{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}'
}

smoke_write_read() {
  local node i=0
  for node in "${WORKERS[@]}"; do
    i=$((i + 1))
    claim "data-$i" 1Gi
    pod "app-$i" "data-$i" "$node"
    in_pod "app-$i" "echo written-on-$node > /data/hello && sync"
    expect "read back on $node" "written-on-$node" "$(in_pod "app-$i" cat /data/hello)"
    expect "data-$i was made on $node" "$node" "$(volume_node "data-$i")"
  done
}

smoke_snapshot_restore() {
  local node="${WORKERS[0]}"
  kubectl -n "$SMOKE_NS" apply -f - <<YAML
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata:
  name: snap-1
spec:
  volumeSnapshotClassName: kura
  source:
    persistentVolumeClaimName: data-1
YAML
  kubectl -n "$SMOKE_NS" wait --for=jsonpath='{.status.readyToUse}'=true volumesnapshot/snap-1 --timeout=120s
  echo "ok: snapshot of data-1 is ready"
  claim restored 1Gi Filesystem VolumeSnapshot snap-1
  pod restorer restored "$node"
  expect "restore holds the snapshot's data" "written-on-$node" "$(in_pod restorer cat /data/hello)"
}

smoke_clone() {
  local node="${WORKERS[0]}"
  claim cloned 1Gi Filesystem PersistentVolumeClaim data-1
  pod cloner cloned "$node"
  expect "clone holds its source's data" "written-on-$node" "$(in_pod cloner cat /data/hello)"
}

smoke_expand() {
  kubectl -n "$SMOKE_NS" patch pvc data-1 --type=merge -p '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}'
  kubectl -n "$SMOKE_NS" wait --for=jsonpath='{.status.capacity.storage}'=2Gi pvc/data-1 --timeout=180s
  local kib
  kib="$(in_pod app-1 "df -k /data | tail -n 1" | awk '{print $2}')"
  if [ "$kib" -lt $((1536 * 1024)) ]; then
    echo "smoke test FAILED: /data is $kib KiB after growing to 2Gi" >&2
    exit 1
  fi
  echo "ok: data-1 grew online to 2Gi ($kib KiB in the pod)"
}

smoke_block() {
  local node="${WORKERS[1]}"
  claim raw 1Gi Block
  pod raw-user raw "$node" block
  in_pod raw-user "printf kura-block-data | dd of=/dev/xvda bs=4096 conv=sync,fsync 2>/dev/null"
  expect "raw block read back" "kura-block-data" \
    "$(in_pod raw-user "dd if=/dev/xvda bs=15 count=1 2>/dev/null")"
}

smoke_metrics() {
  local pod
  pod="$(kubectl -n kura get pods -l app.kubernetes.io/component=node \
    --field-selector "spec.nodeName=${WORKERS[0]}" -o jsonpath='{.items[0].metadata.name}')"
  kubectl get --raw "/api/v1/namespaces/kura/pods/$pod:9820/proxy/metrics" \
    | grep -q 'csi_plugin_operations_seconds_count{driver_name="kura.csi.dev",method_name="/csi.v1.Node/NodeStageVolume",grpc_status_code="OK"}'
  echo "ok: $pod's /metrics counts NodeStageVolume"
}

smoke_test() {
  log "smoke test in namespace $SMOKE_NS"
  mapfile -t WORKERS < <(workers)
  if [ "${#WORKERS[@]}" -lt 2 ]; then
    echo "smoke test needs two workers, found ${#WORKERS[@]}" >&2
    exit 1
  fi
  kubectl delete namespace "$SMOKE_NS" --ignore-not-found --wait=true
  kubectl create namespace "$SMOKE_NS"
  smoke_write_read
  smoke_snapshot_restore
  smoke_clone
  smoke_expand
  smoke_block
  smoke_metrics
  kubectl delete namespace "$SMOKE_NS" --wait=true
  log "smoke test passed"
}

main() {
  need_tools
  build_image
  create_cluster
  load_image
  install_snapshot_controller
  create_tls_secrets
  apply_kura
  if [ "${KURA_SMOKE:-1}" != 0 ]; then
    smoke_test
  fi
  log "kura is running: kubectl -n kura get pods"
}

main
