//! The transport between the controller and the nodes: how `control` reaches a node's
//! pool ([`Pools`]), and nothing else; what a node does is in [`crate::node`].
//!
//! In `all-in-one` the one pool is in-process ([`local::InProcess`]); in a cluster
//! [`cluster::Cluster`] implements the same trait over the network, routing each call
//! by the node in the ID to that node's agent ([`server::AgentService`], which forwards
//! to the very same [`crate::node::Local`] in the node process). Either way the
//! per-volume locks are taken in the process that owns the pool, so every exclusion
//! holds whichever process asks.
//!
//! - [`cluster`]: the controller's side: finding agents, liveness, bounded calls.
//! - [`local`]: the in-process transport of `all-in-one`.
//! - [`server`]: the node's side: the agent gRPC service, forwarding to `node`.
//! - [`transfer`]: the bytes of a cross-node transfer between two agents.
//! - [`replication`]: the requests and bytes of replication between agents.
//! - [`errors`]: how errors travel on the agent API and are decoded.
//! - [`tls`]: certificates (`kura certs`), TLS configuration and the names checked.
//! - [`wire`]: conversions between pool types and the agent protocol.

pub mod cluster;
pub mod errors;
pub mod local;
pub mod replication;
pub mod server;
pub mod tls;
pub mod transfer;
pub mod wire;

/// Code generated from `proto/agent.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("kura.agent.v1");
}

use std::future::Future;

use crate::pool::cbt::{Query, Range};
use crate::pool::group::GroupSnapshot;
use crate::pool::{
    self, Condition, ContentSource, GroupSnapshotId, NodeToken, Provisioning, Snapshot, SnapshotId,
    Timestamp, Volume, VolumeId, VolumeSpec, size,
};

/// A node that has a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The CO's name for it (the topology value).
    pub id: String,
    pub token: NodeToken,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the seam: a pool's own error (in-process), or what crossing the network
/// adds. A remote error is carried through as the agent sent it, never rebuilt into a
/// local one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Pool(#[from] pool::Error),
    /// An ID names a node that cannot exist here (in-process: not this node), so the
    /// object it names does not exist.
    #[error("no kura node {token}")]
    UnknownNode { token: String },
    /// The node's agent cannot be reached now: down, not found (yet), or silent past
    /// the deadline. Nothing is known about the outcome.
    #[error("node {node} is unreachable: {reason}")]
    Unreachable { node: String, reason: String },
    /// The agent of `node` answered with an error: its code and message, unchanged.
    #[error("{message}")]
    Remote {
        node: String,
        code: tonic::Code,
        message: String,
    },
    /// The agent answered with something kura could not have sent.
    #[error(transparent)]
    Protocol(#[from] wire::Malformed),
}

impl Error {
    /// Whether the error says the object does not exist.
    pub fn is_not_found(&self) -> bool {
        match self {
            Error::Pool(pool::Error::NotFound { .. }) | Error::UnknownNode { .. } => true,
            Error::Remote { code, .. } => *code == tonic::Code::NotFound,
            Error::Pool(_) | Error::Unreachable { .. } | Error::Protocol(_) => false,
        }
    }
}

/// The controller's view of every node's pool.
///
/// # Guarantees
///
/// - Mutating calls take the object's lock in the process that owns the pool: a second
///   call on a busy volume or snapshot is refused (ABORTED), never queued.
/// - Every call on a remote node ends within a bound: a node that does not answer
///   gives [`Error::Unreachable`], never a hang and never a false success.
pub trait Pools: Send + Sync + 'static {
    /// Nodes that can take volumes now.
    fn nodes(&self) -> Vec<Node>;
    /// The node an ID's token names, if it is known (live or not).
    fn node(&self, token: &NodeToken) -> Option<Node>;
    /// The live node an ID's token names; an error says why there is none.
    fn locate(&self, token: &NodeToken) -> Result<Node>;
    /// The volume a create with this name made on `node`, if any.
    fn find_volume(
        &self,
        node: &Node,
        name: String,
    ) -> impl Future<Output = Result<Option<Volume>>> + Send;
    fn create_volume(
        &self,
        node: &Node,
        spec: VolumeSpec,
    ) -> impl Future<Output = Result<Volume>> + Send;
    fn delete_volume(&self, id: VolumeId) -> impl Future<Output = Result<()>> + Send;
    fn volume(&self, id: VolumeId) -> impl Future<Output = Result<(Volume, Condition)>> + Send;
    /// The volumes of every live node at or after `from` in ID order, at most `limit`
    /// from each node (an agent that predates paging sends all it has), in no order
    /// across nodes: [`pool::listing::merge`] makes a page of them.
    fn list_volumes(
        &self,
        from: Option<VolumeId>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(Volume, Condition)>>> + Send;
    fn expand_volume(
        &self,
        id: VolumeId,
        range: size::Range,
    ) -> impl Future<Output = Result<(Volume, bool)>> + Send;
    /// Gives a volume the provisioning asked for; returns it and whether it changed.
    fn modify_volume(
        &self,
        id: VolumeId,
        provisioning: Provisioning,
    ) -> impl Future<Output = Result<(Volume, bool)>> + Send;
    /// Bytes a new volume may take on `node` now.
    fn available(
        &self,
        node: &Node,
        provisioning: Provisioning,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// The largest volume `node` could ever hold, full or empty; 0 when unknown.
    fn maximum(
        &self,
        node: &Node,
        provisioning: Provisioning,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// The snapshot a create with this name made on `node`, if any.
    fn find_snapshot(
        &self,
        node: &Node,
        name: String,
    ) -> impl Future<Output = Result<Option<Snapshot>>> + Send;
    fn create_snapshot(
        &self,
        name: String,
        source: VolumeId,
    ) -> impl Future<Output = Result<Snapshot>> + Send;
    fn delete_snapshot(&self, id: SnapshotId) -> impl Future<Output = Result<()>> + Send;
    fn snapshot(&self, id: SnapshotId) -> impl Future<Output = Result<Snapshot>> + Send;
    /// As [`Pools::list_volumes`], for snapshots (of the volume `source` only, if it
    /// is given; an agent that predates paging sends those of every volume).
    fn list_snapshots(
        &self,
        from: Option<SnapshotId>,
        limit: usize,
        source: Option<VolumeId>,
    ) -> impl Future<Output = Result<Vec<Snapshot>>> + Send;

    // Group snapshots (see `pool::group`): the controller runs each step on every
    // node that holds a member.

    /// Quiesces `volumes` (all on `node`) and holds them so, with their locks, under
    /// the name `hold` until [`Pools::thaw_group`] or the freeze deadline. Answers the
    /// raw block volumes in use among them: flushed, not held still.
    fn freeze_group(
        &self,
        node: &Node,
        hold: String,
        volumes: Vec<VolumeId>,
    ) -> impl Future<Output = Result<Vec<VolumeId>>> + Send;
    /// Cuts the member snapshots of `volumes` while `hold` is in force.
    fn cut_group_members(
        &self,
        node: &Node,
        hold: String,
        group: GroupSnapshotId,
        volumes: Vec<VolumeId>,
        created: Timestamp,
    ) -> impl Future<Output = Result<Vec<Snapshot>>> + Send;
    /// Ends `hold` (thaws); one that is over already is ended.
    fn thaw_group(&self, node: &Node, hold: String) -> impl Future<Output = Result<()>> + Send;
    /// Commits a group's record on its home node.
    fn put_group(&self, group: GroupSnapshot) -> impl Future<Output = Result<()>> + Send;
    fn group(&self, id: GroupSnapshotId) -> impl Future<Output = Result<GroupSnapshot>> + Send;
    fn delete_group(&self, id: GroupSnapshotId) -> impl Future<Output = Result<()>> + Send;
    /// Removes a member snapshot of a group.
    fn remove_member(&self, id: SnapshotId) -> impl Future<Output = Result<()>> + Send;

    // ---- Cross-node restore and clone (see [`transfer`]) ----

    /// Makes the volume `spec` names on `node` by copying its content source from the
    /// node `from` (the source's own, or one holding a replica of it), or reports how
    /// far the copy is. Repeating it follows the same
    /// copy; it never starts a second one.
    fn transfer_volume(
        &self,
        node: &Node,
        spec: VolumeSpec,
        from: &NodeToken,
    ) -> impl Future<Output = Result<Progress>> + Send;
    /// The copy making a volume of this name on `node`, if one runs or may resume
    /// there.
    fn find_transfer(
        &self,
        node: &Node,
        name: String,
    ) -> impl Future<Output = Result<Option<Progress>>> + Send;

    // ---- Changed block tracking (see [`crate::pool::cbt`]) ----

    /// Starts listing what `query` asks for on the node of its snapshots, from
    /// `start`, at most `max` ranges a batch (0: the node's default). A refusal is an
    /// error here; dropping the stream stops the work and unpins the snapshots.
    fn snapshot_ranges(
        &self,
        query: Query,
        start: u64,
        max: usize,
    ) -> impl Future<Output = Result<Ranges>> + Send;

    // ---- Replicas (see [`crate::pool::replica`]) ----

    /// Gives a volume the replication asked for (`None`: none), its copies on
    /// `nodes`; returns the volume as it is now.
    fn set_replication(
        &self,
        id: VolumeId,
        wanted: Option<(u8, u64)>,
        nodes: Vec<String>,
    ) -> impl Future<Output = Result<Volume>> + Send;
    /// What `node` holds of another node's volume or snapshot.
    fn find_replica(
        &self,
        node: &Node,
        source: ContentSource,
    ) -> impl Future<Output = Result<Option<Found>>> + Send;
    /// Removes `node`'s copy of a volume or snapshot (with `tombstone`: deleted while
    /// its own node is down); answers whether it held one.
    fn drop_replica(
        &self,
        node: &Node,
        source: ContentSource,
        tombstone: bool,
    ) -> impl Future<Output = Result<bool>> + Send;
}

/// What [`Pools::snapshot_ranges`] lists: the volume's capacity, then the batches as
/// the node finds them; an error ends the stream.
pub struct Ranges {
    pub capacity: u64,
    pub batches: futures_util::stream::BoxStream<'static, Result<Vec<Range>>>,
}

/// Where a cross-node transfer is: done (the volume), or how far.
pub use crate::node::transfer::Progress;

/// What a node holds of another node's volume or snapshot.
pub use crate::node::replication::Found;
