# syntax=docker/dockerfile:1
# kura's one image for every role: `kura controller` (run as the unprivileged user
# below), `kura node` (run privileged, as root, by the DaemonSet), `kura all-in-one`
# and `kura certs`.
#
#   docker build -t kura:0.1.0 .
#
# The builder's Rust is the toolchain kura is developed and tested with; build.rs
# compiles the protos with protox, so no protoc is needed.

ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
# The registry and target caches survive between builds; the binary is copied out of
# the cache mount in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin kura \
    && install -D -m 0755 target/release/kura /out/kura

FROM debian:bookworm-slim
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="kura" \
      org.opencontainers.image.description="CSI driver for node-local block storage with instant snapshots and clones" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"
# The tools kura runs: mkfs, fsck and grow for ext4, xfs and btrfs; blkid and mount;
# tini reaps them as PID 1. Debian's versions, as the base image pins its release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       btrfs-progs e2fsprogs mount tini util-linux xfsprogs \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 65532 kura \
    && useradd --system --uid 65532 --gid kura --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin kura
COPY --from=builder /out/kura /usr/local/bin/kura
# The license the image's label names, where Debian keeps a package's.
COPY LICENSE /usr/share/doc/kura/LICENSE
# The controller's user; the node DaemonSet overrides it with runAsUser: 0.
USER 65532:65532
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/kura"]
CMD ["--help"]
