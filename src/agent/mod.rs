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

use crate::pool::group::{GroupFreeze, GroupSnapshot};
use crate::pool::locks::{Guard, Locks};
use crate::pool::{
    self, Condition, GroupSnapshotId, NodeToken, Pool, Provisioning, Snapshot, SnapshotId,
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
    /// Every snapshot on every live node.
    fn list_snapshots(&self) -> impl Future<Output = Result<Vec<Snapshot>>> + Send;

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

/// How long a group's freeze may be held before it is ended regardless: the freeze
/// deadline of a single snapshot.
pub const GROUP_HOLD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// A group freeze in force on this node: the frozen filesystems and the volumes'
/// locks, with the attempt it belongs to.
struct Hold {
    serial: u64,
    _freeze: GroupFreeze,
    _guards: Vec<Guard>,
}

type Holds = Arc<std::sync::Mutex<std::collections::HashMap<String, Hold>>>;

/// The pool of this process's own node, with the node's per-volume locks.
#[derive(Clone)]
pub struct LocalPools {
    pool: Arc<Pool>,
    node: Node,
    locks: Locks,
    holds: Holds,
    serial: Arc<std::sync::atomic::AtomicU64>,
}

impl LocalPools {
    /// `locks` are the node's: the same set the Node service takes.
    pub fn new(pool: Arc<Pool>, node_id: &str, locks: Locks) -> Self {
        let node = Node {
            id: node_id.to_owned(),
            token: pool.node().clone(),
        };
        LocalPools {
            pool,
            node,
            locks,
            holds: Holds::default(),
            serial: Default::default(),
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn this_node(&self) -> &Node {
        &self.node
    }

    /// In-process, only this node's pool exists.
    fn check_node(&self, node: &Node) -> Result<()> {
        if node.token != self.node.token {
            return Err(Error::UnknownNode {
                token: node.token.as_str().to_owned(),
            });
        }
        Ok(())
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

    async fn modify_volume(
        &self,
        id: VolumeId,
        provisioning: Provisioning,
    ) -> Result<(Volume, bool)> {
        let guard = self.lock(id.as_str())?;
        self.blocking(vec![guard], move |p| p.modify_volume(&id, provisioning))
            .await
    }

    async fn available(&self, _node: &Node, provisioning: Provisioning) -> Result<u64> {
        self.blocking(vec![], move |p| p.available(provisioning))
            .await
    }

    async fn maximum(&self, _node: &Node, provisioning: Provisioning) -> Result<u64> {
        self.blocking(vec![], move |p| p.maximum(provisioning))
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

    async fn freeze_group(
        &self,
        node: &Node,
        hold: String,
        volumes: Vec<VolumeId>,
    ) -> Result<Vec<VolumeId>> {
        self.check_node(node)?;
        let guards = volumes
            .iter()
            .map(|v| self.lock(v.as_str()))
            .collect::<Result<Vec<_>>>()?;
        let freeze = self
            .blocking(vec![], move |p| p.freeze_volumes(&volumes))
            .await?;
        let flushed = freeze.flushed.clone();
        let serial = self
            .serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let held = Hold {
            serial,
            _freeze: freeze,
            _guards: guards,
        };
        let replaced = lock_holds(&self.holds).insert(hold.clone(), held);
        // Ended off the async threads: a thaw is a system call.
        if let Some(old) = replaced {
            drop(tokio::task::spawn_blocking(move || drop(old)));
        }
        // The deadline: a controller that never comes back to thaw cannot keep the
        // volumes frozen and locked.
        let holds = Arc::clone(&self.holds);
        tokio::spawn(async move {
            tokio::time::sleep(GROUP_HOLD_DEADLINE).await;
            let mut held = lock_holds(&holds);
            if held.get(&hold).is_some_and(|h| h.serial == serial) {
                tracing::error!(hold = %hold, "group freeze deadline passed; thawing");
                let ended = held.remove(&hold);
                drop(held);
                drop(tokio::task::spawn_blocking(move || drop(ended)));
            }
        });
        Ok(flushed)
    }

    async fn cut_group_members(
        &self,
        node: &Node,
        hold: String,
        group: GroupSnapshotId,
        volumes: Vec<VolumeId>,
        created: Timestamp,
    ) -> Result<Vec<Snapshot>> {
        self.check_node(node)?;
        if !lock_holds(&self.holds).contains_key(&hold) {
            return Err(Error::Pool(pool::Error::Busy(format!(
                "the freeze of group snapshot {group} ended before its members were cut; retry"
            ))));
        }
        self.blocking(vec![], move |p| p.cut_members(&group, &volumes, created))
            .await
    }

    async fn thaw_group(&self, node: &Node, hold: String) -> Result<()> {
        self.check_node(node)?;
        let ended = lock_holds(&self.holds).remove(&hold);
        self.blocking(vec![], move |_| {
            drop(ended);
            Ok(())
        })
        .await
    }

    async fn put_group(&self, group: GroupSnapshot) -> Result<()> {
        self.blocking(vec![], move |p| p.put_group(&group)).await
    }

    async fn group(&self, id: GroupSnapshotId) -> Result<GroupSnapshot> {
        self.blocking(vec![], move |p| p.group(&id)).await
    }

    async fn delete_group(&self, id: GroupSnapshotId) -> Result<()> {
        let guard = self.lock(id.as_str())?;
        self.blocking(vec![guard], move |p| p.delete_group(&id))
            .await
    }

    async fn remove_member(&self, id: SnapshotId) -> Result<()> {
        let guard = self.lock(id.as_str())?;
        self.blocking(vec![guard], move |p| p.remove_member(&id))
            .await
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

fn lock_holds(holds: &Holds) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Hold>> {
    holds.lock().unwrap_or_else(|e| e.into_inner())
}
