#!/usr/bin/env bash
# Validates kura's deployment files without a cluster: renders every kustomization
# (the base; the base with each component, then with all of them; the kind overlay,
# alone and with the pool-device component; everything in another namespace), checks
# every object and kura's invariants (deploy/check.py), proves the checks catch broken
# manifests (deploy/test_check.py), runs the alert rules' unit tests with promtool,
# and lints the YAML, the shell scripts and the Dockerfile.
#
#   deploy/validate.sh [CRD_DIR]
#
# CRD_DIR holds the CRDs the manifests are checked against: the snapshot CRDs of
# external-snapshotter, external-snapshot-metadata's SnapshotMetadataService and the
# Prometheus Operator's PodMonitor and PrometheusRule
# (default: $KURA_CRDS_DIR, else ../shared/k8s/crds beside the repo, where CI keeps
# them). Without them those objects are checked by kura's invariants only, and the
# run says so loudly.
# Needs kubectl (for kustomize), python3 and the tools of deploy/requirements.txt and
# promtool (scripts/deps.sh installs them); builds target/debug/kura, whose own
# argument parser checks the rendered command lines.
set -euo pipefail
cd "$(dirname "$0")/.."

crds="${1:-${KURA_CRDS_DIR:-../shared/k8s/crds}}"
# The namespace of the "another namespace" rendering.
other_namespace="storage-system"
work=""
# The CA certificate the other-namespace rendering puts in the caCert (render_all).
ca_cert=""

cleanup() {
  if [ -n "$work" ]; then
    rm -rf "$work"
  fi
}

# render OUT NAME NAMESPACE RESOURCE [COMPONENT...]: OUT/NAME.yaml from an overlay of
# RESOURCE with the components, in NAMESPACE if it is not empty (with the
# snapshot-metadata component, its address set there too).
render() {
  local out="$1" name="$2" namespace="$3" resource="$4" dir component
  shift 4
  dir="$out/overlay-$name"
  mkdir -p "$dir"
  {
    if [ -n "$namespace" ]; then
      printf 'namespace: %s\n' "$namespace"
    fi
    # kustomize takes only relative paths to other kustomizations.
    printf 'resources:\n  - %s\n' "$(realpath --relative-to="$dir" "$resource")"
    if [ "$#" -gt 0 ]; then
      printf 'components:\n'
      for component in "$@"; do
        printf '  - %s\n' "$(realpath --relative-to="$dir" "$component")"
      done
    fi
    if [ -n "$namespace" ] && [[ " $* " == *"/snapshot-metadata"* ]]; then
      snapshot_metadata_address "$namespace"
    fi
  } >"$dir/kustomization.yaml"
  kubectl kustomize "$dir" >"$out/$name.yaml"
}

# The patch README ("Changed block tracking") has users put in an overlay that moves
# the snapshot-metadata component to NAMESPACE: kustomize cannot rewrite the address
# in the SnapshotMetadataService. It sets the caCert too, as every user does, with
# the CA certificate in $ca_cert (a real one: check.py reads it).
snapshot_metadata_address() {
  cat <<EOF
patches:
  - target:
      kind: SnapshotMetadataService
      name: kura.csi.dev
    patch: |-
      - op: replace
        path: /spec/address
        value: kura-snapshot-metadata.$1.svc:6443
      - op: replace
        path: /spec/caCert
        value: $(base64 -w0 "$ca_cert")
EOF
}

render_all() {
  local out="$1" component
  local components=(deploy/kubernetes/components/*/ deploy/monitoring/)
  kubectl kustomize deploy/kubernetes >"$out/base.yaml"
  for component in "${components[@]}"; do
    render "$out" "with-$(basename "$component")" "" deploy/kubernetes "$component"
  done
  render "$out" all-components "" deploy/kubernetes "${components[@]}"
  kubectl kustomize deploy/kind >"$out/kind.yaml"
  render "$out" kind-pool-device "" deploy/kind deploy/kubernetes/components/pool-device
  # A CA certificate for the SnapshotMetadataService's caCert (any will do).
  if ! made="$(target/debug/kura certs --out "$out/certs" 2>&1)"; then
    echo "$made" >&2
    return 1
  fi
  ca_cert="$out/certs/ca.crt"
  render "$out" other-namespace "$other_namespace" deploy/kubernetes "${components[@]}"
  # The examples are plain files: one rendering of all of them.
  for example in deploy/kubernetes/examples/*.yaml; do
    printf -- '---\n'
    cat "$example"
  done >"$out/examples.yaml"
}

check_manifests() {
  local out="$1" kura="$2" rendering
  local args=(--kura "$kura" --promtool "$(command -v promtool)")
  local renderings=()
  if [ -d "$crds" ]; then
    args+=(--crds "$crds")
  fi
  for rendering in "$out"/*.yaml; do
    if [ "$rendering" != "$out/other-namespace.yaml" ]; then
      renderings+=("$rendering")
    fi
  done
  python3 deploy/check.py "${args[@]}" "${renderings[@]}"
  python3 deploy/check.py "${args[@]}" --namespace "$other_namespace" "$out/other-namespace.yaml"
  python3 deploy/test_check.py "${args[@]}" --install "$out/kind.yaml" \
    --monitoring "$out/with-monitoring.yaml" --pool-device "$out/kind-pool-device.yaml" \
    --snapshot-metadata "$out/with-snapshot-metadata.yaml" \
    --other-namespace "$out/other-namespace.yaml" --namespace "$other_namespace"
}

# The alert rules' cases (deploy/monitoring/rules-test.yaml) on the rules as rendered.
test_rules() {
  local out="$1"
  python3 - "$out/with-monitoring.yaml" "$out/rules.yaml" <<'PY'
import sys, yaml
rules = [o for o in yaml.safe_load_all(open(sys.argv[1])) if o and o.get("kind") == "PrometheusRule"]
yaml.safe_dump({"groups": [g for r in rules for g in r["spec"]["groups"]]}, open(sys.argv[2], "w"))
PY
  cp deploy/monitoring/rules-test.yaml "$out/"
  promtool test rules "$out/rules-test.yaml"
}

lint_files() {
  local scripts
  shopt -s nullglob
  scripts=(.ci/run scripts/*.sh deploy/*.sh deploy/kind/*.sh csi-sanity/*.sh bench/*.sh)
  shopt -u nullglob
  yamllint --strict deploy .yamllint.yaml
  shellcheck -x "${scripts[@]}"
  hadolint Dockerfile
}

main() {
  if [ ! -d "$crds" ]; then
    echo "deploy/validate.sh: WARNING: no CRDs at $crds (KURA_CRDS_DIR or the first argument): snapshot classes, SnapshotMetadataServices, PodMonitors and PrometheusRules are not checked against their CRD schemas" >&2
  fi
  # shellcheck source=scripts/deps.sh
  source scripts/deps.sh
  kura_tools
  cargo build --locked --quiet --bin kura
  work="$(mktemp -d /tmp/kura-validate.XXXXXX)"
  trap cleanup EXIT
  render_all "$work"
  check_manifests "$work" target/debug/kura
  test_rules "$work"
  lint_files
  echo "deploy/validate.sh: manifests, monitoring kit, scripts and Dockerfile are valid"
}

main
