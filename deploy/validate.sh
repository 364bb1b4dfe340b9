#!/usr/bin/env bash
# Validates kura's deployment files without a cluster: renders every kustomization
# (the base, the base with each component, the kind overlay), checks every object and
# kura's invariants (deploy/check.py), proves the checks catch broken manifests
# (deploy/test_check.py), and lints the YAML, the shell scripts and the Dockerfile.
#
#   deploy/validate.sh [CRD_DIR]
#
# CRD_DIR holds the snapshot CRDs (default: $KURA_CRDS_DIR, else ../shared/k8s/crds
# beside the repo). Without them the snapshot classes are checked by kura's invariants
# only, and the run says so loudly.
# Needs kubectl (for kustomize), python3 and the tools of deploy/requirements.txt
# (scripts/deps.sh installs them); builds target/debug/kura for its --help.
set -euo pipefail
cd "$(dirname "$0")/.."

crds="${1:-${KURA_CRDS_DIR:-../shared/k8s/crds}}"
work=""

cleanup() {
  if [ -n "$work" ]; then
    rm -rf "$work"
  fi
}

# Writes OUT/NAME.yaml for each rendering: base, base+component, kind overlay.
render_all() {
  local out="$1" component name overlay
  kubectl kustomize deploy/kubernetes >"$out/base.yaml"
  for component in deploy/kubernetes/components/*/; do
    name="$(basename "$component")"
    overlay="$out/overlay-$name"
    mkdir -p "$overlay"
    # kustomize takes only relative paths to other kustomizations.
    printf 'resources:\n  - %s\ncomponents:\n  - %s\n' \
      "$(realpath --relative-to="$overlay" deploy/kubernetes)" \
      "$(realpath --relative-to="$overlay" "$component")" >"$overlay/kustomization.yaml"
    kubectl kustomize "$overlay" >"$out/with-$name.yaml"
  done
  kubectl kustomize deploy/kind >"$out/kind.yaml"
  # The examples are plain files: one rendering of all of them.
  for example in deploy/kubernetes/examples/*.yaml; do
    printf -- '---\n'
    cat "$example"
  done >"$out/examples.yaml"
}

check_manifests() {
  local out="$1" kura="$2"
  local crd_args=()
  if [ -d "$crds" ]; then
    crd_args=(--crds "$crds")
  fi
  python3 deploy/check.py "${crd_args[@]}" --kura "$kura" "$out"/*.yaml
  python3 deploy/test_check.py "${crd_args[@]}" --kura "$kura" "$out/kind.yaml"
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
    echo "deploy/validate.sh: WARNING: no snapshot CRDs at $crds (../shared/k8s/crds beside the repo, KURA_CRDS_DIR, or the first argument): the snapshot classes are not checked against their CRD schemas" >&2
  fi
  # shellcheck source=scripts/deps.sh
  source scripts/deps.sh
  kura_tools
  cargo build --locked --quiet --bin kura
  work="$(mktemp -d /tmp/kura-validate.XXXXXX)"
  trap cleanup EXIT
  render_all "$work"
  check_manifests "$work" target/debug/kura
  lint_files
  echo "deploy/validate.sh: manifests, scripts and Dockerfile are valid"
}

main
