//! How the controller reaches nodes' pools, both ends.
//!
//! The controller speaks to pools only through [`Pools`]. In `all-in-one` the one pool
//! is in-process ([`LocalPools`]); in a cluster [`cluster::Cluster`] implements the
//! same trait over the network, routing each call by the node in the ID to that node's
//! agent ([`server::AgentService`], which runs the very same [`LocalPools`] in the
//! node process). Either way the per-volume locks are taken in the process that owns
//! the pool, so every exclusion holds whichever process asks.
//!
//! - [`cluster`]: the controller's side: finding agents, liveness, bounded calls.
//! - [`server`]: the node's side: the agent gRPC service.
//! - [`tls`]: certificates (`kura certs`), TLS configuration and the names checked.
//! - [`wire`]: conversions between pool types and the agent protocol.

pub mod cluster;
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
use std::sync::Arc;

use crate::pool::locks::{Guard, Locks};
use crate::pool::{
    self, Condition, NodeToken, Pool, Provisioning, Snapshot, SnapshotId, Volume, VolumeId,
    VolumeSpec, size,
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
    /// The agent answered with an error: its code and message, unchanged.
    #[error("{message}")]
    Remote { code: tonic::Code, message: String },
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
    /// Every volume on every live node.
    fn list_volumes(&self) -> impl Future<Output = Result<Vec<(Volume, Condition)>>> + Send;
    fn expand_volume(
        &self,
        id: VolumeId,
        range: size::Range,
    ) -> impl Future<Output = Result<(Volume, bool)>> + Send;
    /// Bytes a new volume may take on `node` now.
    fn available(
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
    /// Every snapshot on every live node.
    fn list_snapshots(&self) -> impl Future<Output = Result<Vec<Snapshot>>> + Send;

    // ---- Cross-node restore and clone (see [`transfer`]) ----

    /// Makes the volume `spec` names on `node` by copying its content source from the
    /// source's node, or reports how far the copy is. Repeating it follows the same
    /// copy; it never starts a second one.
    fn copy_volume(
        &self,
        node: &Node,
        spec: VolumeSpec,
    ) -> impl Future<Output = Result<Copy>> + Send;
    /// The copy making a volume of this name on `node`, if one runs or may resume
    /// there.
    fn find_copy(
        &self,
        node: &Node,
        name: String,
    ) -> impl Future<Output = Result<Option<Copy>>> + Send;
}

/// Where a cross-node copy is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Copy {
    Done(Volume),
    /// Data bytes written on the destination so far, and the source image's size.
    Running {
        done: u64,
        total: u64,
    },
}

/// The pool of this process's own node, with the node's per-volume locks.
#[derive(Debug, Clone)]
pub struct LocalPools {
    pool: Arc<Pool>,
    node: Node,
    locks: Locks,
}

impl LocalPools {
    /// `locks` are the node's: the same set the Node service takes.
    pub fn new(pool: Arc<Pool>, node_id: &str, locks: Locks) -> Self {
        let node = Node {
            id: node_id.to_owned(),
            token: pool.node().clone(),
        };
        LocalPools { pool, node, locks }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn this_node(&self) -> &Node {
        &self.node
    }

    fn lock(&self, key: &str) -> Result<Guard> {
        self.locks.try_acquire(key).ok_or_else(|| {
            Error::Pool(pool::Error::Busy(format!(
                "an operation on {key} is already in progress"
            )))
        })
    }

    /// Runs blocking pool work off the async threads. The guards move into the work,
    /// so a lock is held until the work is done even if the caller gives up waiting
    /// (a cancelled RPC).
    async fn blocking<T: Send + 'static>(
        &self,
        guards: Vec<Guard>,
        work: impl FnOnce(&Pool) -> pool::Result<T> + Send + 'static,
    ) -> Result<T> {
        let pool = Arc::clone(&self.pool);
        let task = tokio::task::spawn_blocking(move || {
            let result = work(&pool);
            drop(guards);
            result
        });
        match task.await {
            Ok(result) => Ok(result?),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

impl Pools for LocalPools {
    fn nodes(&self) -> Vec<Node> {
        vec![self.node.clone()]
    }

    fn node(&self, token: &NodeToken) -> Option<Node> {
        (*token == self.node.token).then(|| self.node.clone())
    }

    fn locate(&self, token: &NodeToken) -> Result<Node> {
        self.node(token).ok_or_else(|| Error::UnknownNode {
            token: token.as_str().to_owned(),
        })
    }

    async fn find_volume(&self, _node: &Node, name: String) -> Result<Option<Volume>> {
        let id = VolumeId::derive(&name, &self.node.token);
        self.blocking(vec![], move |p| match p.volume(&id) {
            Ok(volume) => Ok(Some(volume)),
            Err(pool::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    async fn create_volume(&self, node: &Node, spec: VolumeSpec) -> Result<Volume> {
        if node.token != self.node.token {
            return Err(Error::UnknownNode {
                token: node.token.as_str().to_owned(),
            });
        }
        let id = VolumeId::derive(&spec.name, &self.node.token);
        let mut guards = vec![self.lock(id.as_str())?];
        // The source is read while the new volume is filled: no stage, expand,
        // snapshot or delete of it meanwhile.
        if let Some(source) = &spec.source {
            guards.push(self.lock(source.id())?);
        }
        self.blocking(guards, move |p| p.create_volume(&spec)).await
    }

    async fn delete_volume(&self, id: VolumeId) -> Result<()> {
        let guard = self.lock(id.as_str())?;
        self.blocking(vec![guard], move |p| p.delete_volume(&id))
            .await
    }

    async fn volume(&self, id: VolumeId) -> Result<(Volume, Condition)> {
        self.blocking(vec![], move |p| p.volume_status(&id)).await
    }

    async fn list_volumes(&self) -> Result<Vec<(Volume, Condition)>> {
        self.blocking(vec![], |p| p.list_volumes()).await
    }

    async fn expand_volume(&self, id: VolumeId, range: size::Range) -> Result<(Volume, bool)> {
        let guard = self.lock(id.as_str())?;
        self.blocking(vec![guard], move |p| p.expand_volume(&id, range))
            .await
    }

    async fn available(&self, _node: &Node, provisioning: Provisioning) -> Result<u64> {
        self.blocking(vec![], move |p| p.available(provisioning))
            .await
    }

    async fn find_snapshot(&self, _node: &Node, name: String) -> Result<Option<Snapshot>> {
        let id = SnapshotId::derive(&name, &self.node.token);
        self.blocking(vec![], move |p| match p.snapshot(&id) {
            Ok(snapshot) => Ok(Some(snapshot)),
            Err(pool::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    async fn create_snapshot(&self, name: String, source: VolumeId) -> Result<Snapshot> {
        let id = SnapshotId::derive(&name, &self.node.token);
        let guards = vec![self.lock(id.as_str())?, self.lock(source.as_str())?];
        self.blocking(guards, move |p| p.create_snapshot(&name, &source))
            .await
    }

    async fn delete_snapshot(&self, id: SnapshotId) -> Result<()> {
        let guard = self.lock(id.as_str())?;
        self.blocking(vec![guard], move |p| p.delete_snapshot(&id))
            .await
    }

    async fn snapshot(&self, id: SnapshotId) -> Result<Snapshot> {
        self.blocking(vec![], move |p| p.snapshot(&id)).await
    }

    async fn list_snapshots(&self) -> Result<Vec<Snapshot>> {
        self.blocking(vec![], |p| p.list_snapshots()).await
    }

    /// One pool has no other node to copy from.
    async fn copy_volume(&self, node: &Node, _spec: VolumeSpec) -> Result<Copy> {
        Err(Error::UnknownNode {
            token: node.token.as_str().to_owned(),
        })
    }

    async fn find_copy(&self, _node: &Node, _name: String) -> Result<Option<Copy>> {
        Ok(None)
    }
}
