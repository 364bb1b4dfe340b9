//! kura: a CSI driver for node-local block storage with instant snapshots and clones.
//!
//! # Layout
//!
//! - [`cli`]: the command line (every flag also from a `KURA_*` variable).
//! - [`server`]: builds each role (`all-in-one`, `node`, `controller`) from the command
//!   line and serves it; `certs` writes the agent API's identities.
//! - [`csi`]: the CSI Identity, Controller, GroupController and Node services;
//!   request validation and the mapping of errors to gRPC codes. Only `csi` and
//!   `agent` see gRPC types.
//! - [`agent`]: how the controller reaches nodes' pools ([`agent::Pools`]): in-process,
//!   or over the agent API (`proto/agent.proto`, mutual TLS), both ends.
//! - [`pool`]: the node-local pool: volumes, snapshots, group snapshots
//!   ([`pool::group`]), metadata, capacity, recovery, and exposing volumes on the node
//!   ([`pool::attach`], inline volumes in [`pool::ephemeral`]).
//! - [`inspect`]: `kura inspect`, a read-only report of what is on a node (from
//!   [`pool::survey`]).
//! - [`metrics`]: Prometheus metrics: a tower layer timing every gRPC call, the pool's
//!   gauges read at scrape time, and the `/metrics` listener (`--metrics-listen`).
//! - [`sys`]: the only code that touches the OS: loop devices, mounts, mkfs, reflink,
//!   freeze, statfs, mountinfo, fscrypt keys and policies.
//!
//! Dependencies point one way: `csi -> pool/agent -> sys`.

pub mod agent;
pub mod cli;
pub mod csi;
pub mod inspect;
pub mod metrics;
pub mod pool;
pub mod server;
pub mod sys;
