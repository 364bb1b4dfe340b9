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
