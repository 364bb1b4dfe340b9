#!/usr/bin/env bash
# Installs what kura needs at run time and in tests, on Debian, as root. Safe to rerun.
set -euo pipefail

packages=(xfsprogs e2fsprogs btrfs-progs util-linux mount)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "kura needs a Rust toolchain (1.90 or newer; Debian's rustc is too old): https://rustup.rs" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "kura attaches loop devices and mounts filesystems: run as root" >&2
  exit 1
fi

# promtool (checks and unit-tests the monitoring kit's alert rules), the one binary
# taken out of Debian's prometheus package: installing the package would also set
# up a Prometheus server and its service, which nothing here needs.
kura_promtool() {
  local bin="$1" tmp
  if [ -x "$bin" ]; then
    return
  fi
  echo "installing promtool into $bin"
  tmp="$(mktemp -d)"
  if ! (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root prometheus >/dev/null 2>&1); then
    apt-get update -qq
    (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root prometheus >/dev/null)
  fi
  dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
  install -m 0755 "$tmp/usr/bin/promtool" "$bin"
  rm -rf "$tmp"
}

# The manifest and script linters of deploy/validate.sh (deploy/requirements.txt,
# pinned) in a venv of the repo's own, reinstalled only when that list changes. Adds
# the venv's bin/ to PATH.
kura_tools() {
  local venv="${KURA_TOOLS_VENV:-$PWD/target/tools}"
  local requirements="$PWD/deploy/requirements.txt"
  local stamp="$venv/.requirements"
  if ! cmp -s "$requirements" "$stamp" 2>/dev/null; then
    echo "installing the validation tools into $venv"
    if ! python3 -m venv --clear "$venv" >/dev/null 2>&1; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq python3 python3-venv >/dev/null
      python3 -m venv --clear "$venv"
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$stamp"
  fi
  kura_promtool "$venv/bin/promtool"
  export PATH="$venv/bin:$PATH"
  if ! command -v kubectl >/dev/null 2>&1; then
    echo "deploy/validate.sh renders with kubectl kustomize: kubectl is not installed" >&2
    return 1
  fi
}
