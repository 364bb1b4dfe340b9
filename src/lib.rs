//! kura: a CSI driver for node-local block storage with instant snapshots and clones.
//!
//! # Layout
//!
//! Every RPC reads downwards, `csi -> control -> agent -> node -> pool -> sys`, and
//! each room imports only rooms to its right; `server`, `cli` and `metrics` sit at the
//! edges. Only `csi` and `agent` see gRPC types.
//!
//! - [`csi`]: the CSI services, one file each: check a request into typed arguments,
//!   call `control` (Controller, GroupController, SnapshotMetadata) or `node`
//!   (Node), build the response; [`csi::status`] maps every error to its code.
//! - [`control`]: what the controller decides: request names and their locks,
//!   find-by-name across nodes, placement ([`control::placement`], a pure function),
//!   copy-or-create, the group-snapshot steps ([`control::group`]), where replicas go
//!   and which one serves a lost node's volume ([`control::replication`]).
//! - [`agent`]: the transport between controller and nodes: the [`agent::Pools`] seam,
//!   in-process ([`agent::local`]) or over the agent API ([`agent::cluster`] on the
//!   controller, [`agent::server`] on the node, mutual TLS), a transfer's bytes
//!   ([`agent::transfer`]), replication between nodes ([`agent::replication`]: how
//!   nodes find each other, the points' requests and bytes), how errors travel
//!   ([`agent::errors`]).
//! - [`node`]: the node process's side: [`node::Local`], the one place where
//!   per-volume locks are taken and blocking pool work runs; group holds
//!   ([`node::group`]); both ends of a cross-node transfer ([`node::transfer`]) and of
//!   replication ([`node::replication`]: the points a volume's node ships, the copies
//!   a replica node takes).
//! - [`pool`]: the node-local pool: volumes, snapshots, group snapshots, metadata,
//!   capacity, recovery, exposing volumes on the node ([`pool::attach`], inline
//!   volumes in [`pool::ephemeral`]), changed block tracking ([`pool::cbt`]), and
//!   replicas on disk ([`pool::replica`]: points, copies, grants, tombstones).
//! - [`sys`]: the only code that touches the OS: loop devices (holding images
//!   without time updates, [`sys::nocmtime`]), mounts, mkfs
//!   ([`sys::FsType`]), reflink, freeze, statfs, mountinfo, sparse ranges, extent
//!   maps ([`sys::fiemap`]), direct I/O, fscrypt keys and policies.
//! - [`server`]: builds each role (`all-in-one`, `node`, `controller`) from the
//!   command line ([`cli`], every flag also from a `KURA_*` variable) and serves it;
//!   `certs` writes the agent API's identities.
//! - [`inspect`]: `kura inspect`, a read-only report of what is on a node (from
//!   [`pool::survey`]), run beside a serving `kura node`.
//! - [`metrics`]: Prometheus: a tower layer timing every gRPC call, the pool's gauges
//!   read at scrape time, and the `/metrics` listener (`--metrics-listen`).
//!
//! The README's "Code layout" follows two RPCs through these rooms.

pub mod agent;
pub mod cli;
pub mod control;
pub mod csi;
pub mod inspect;
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
