#!/usr/bin/env bash
# The whole test suite: formatting, lints, the deployment files (deploy/validate.sh:
# manifests, scripts, Dockerfile), unit tests and the root-only integration tests with
# real loop devices, filesystems and mounts. Run as root on Debian:
#
#   bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
bash deploy/validate.sh
cargo test --locked --all-targets
