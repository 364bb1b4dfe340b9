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
//! - [`metrics`]: Prometheus metrics: a tower layer timing every gRPC call, the pool's
//!   gauges read at scrape time, and the `/metrics` listener (`--metrics-listen`).
//! - [`sys`]: the only code that touches the OS: loop devices, mounts, mkfs, reflink,
//!   freeze, statfs, mountinfo, fscrypt keys and policies.
//!
//! Dependencies point one way: `csi -> pool/agent -> sys`.

pub mod agent;
pub mod cli;
pub mod control;
pub mod csi;
pub mod metrics;
pub mod node;
pub mod pool;
pub mod server;
pub mod sys;

/// An error and its sources, joined: "a: b: c". The message every room logs and
/// answers with: a kubelet event is often all an operator sees.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}
