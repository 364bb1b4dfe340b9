//! The CSI services. Only this module (and `agent`) sees tonic and generated types:
//! a handler checks its request into typed arguments, calls [`crate::control`] (the
//! Controller and GroupController services) or [`crate::node`] (the Node service),
//! and builds the response; every error becomes a status in [`status`].

pub mod client;
pub mod controller;
pub mod group_controller;
pub mod identity;
pub mod node;
pub mod snapshot_metadata;
pub mod status;
pub mod validate;

/// Code generated from `proto/csi.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("csi.v1");
}

use std::collections::HashMap;

/// The one topology segment key: volumes are reachable only on their node.
pub const TOPOLOGY_KEY: &str = "topology.kura.csi.dev/node";

/// The topology segment of a node.
pub fn node_topology(node_id: &str) -> proto::Topology {
    proto::Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), node_id.to_owned())]),
    }
}
