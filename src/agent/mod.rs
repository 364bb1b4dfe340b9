//! How the controller reaches nodes' pools.
//!
//! The controller speaks to pools only through [`Pools`]. In `all-in-one` the one pool
//! is in-process ([`LocalPools`]); in a cluster the agent client implements the same
//! trait over the network, routing each call by the node in the ID.

use std::future::Future;
use std::sync::Arc;

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

/// The controller's view of every node's pool.
pub trait Pools: Send + Sync + 'static {
    /// Nodes that can take volumes now.
    fn nodes(&self) -> Vec<Node>;
    /// The node an ID's token names, if it is known.
    fn node(&self, token: &NodeToken) -> Option<Node> {
        self.nodes().into_iter().find(|n| n.token == *token)
    }
    fn create_volume(
        &self,
        node: &Node,
        spec: VolumeSpec,
    ) -> impl Future<Output = pool::Result<Volume>> + Send;
    fn delete_volume(&self, id: VolumeId) -> impl Future<Output = pool::Result<()>> + Send;
    fn volume(
        &self,
        id: VolumeId,
    ) -> impl Future<Output = pool::Result<(Volume, Condition)>> + Send;
    fn list_volumes(&self) -> impl Future<Output = pool::Result<Vec<(Volume, Condition)>>> + Send;
    fn expand_volume(
        &self,
        id: VolumeId,
        range: size::Range,
    ) -> impl Future<Output = pool::Result<(Volume, bool)>> + Send;
    fn available(
        &self,
        node: &Node,
        provisioning: Provisioning,
    ) -> impl Future<Output = pool::Result<u64>> + Send;
    fn create_snapshot(
        &self,
        name: String,
        source: VolumeId,
    ) -> impl Future<Output = pool::Result<Snapshot>> + Send;
    fn delete_snapshot(&self, id: SnapshotId) -> impl Future<Output = pool::Result<()>> + Send;
    fn snapshot(&self, id: SnapshotId) -> impl Future<Output = pool::Result<Snapshot>> + Send;
    fn list_snapshots(&self) -> impl Future<Output = pool::Result<Vec<Snapshot>>> + Send;
}

/// The pool of this process's own node.
#[derive(Debug, Clone)]
pub struct LocalPools {
    pool: Arc<Pool>,
    node: Node,
}

impl LocalPools {
    pub fn new(pool: Arc<Pool>, node_id: &str) -> Self {
        let node = Node {
            id: node_id.to_owned(),
            token: pool.node().clone(),
        };
        LocalPools { pool, node }
    }

    /// Runs blocking pool work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Pool) -> pool::Result<T> + Send + 'static,
    ) -> pool::Result<T> {
        let pool = Arc::clone(&self.pool);
        match tokio::task::spawn_blocking(move || work(&pool)).await {
            Ok(result) => result,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

impl Pools for LocalPools {
    fn nodes(&self) -> Vec<Node> {
        vec![self.node.clone()]
    }

    async fn create_volume(&self, node: &Node, spec: VolumeSpec) -> pool::Result<Volume> {
        debug_assert_eq!(node.token, self.node.token);
        self.blocking(move |p| p.create_volume(&spec)).await
    }

    async fn delete_volume(&self, id: VolumeId) -> pool::Result<()> {
        self.blocking(move |p| p.delete_volume(&id)).await
    }

    async fn volume(&self, id: VolumeId) -> pool::Result<(Volume, Condition)> {
        self.blocking(move |p| p.volume_status(&id)).await
    }

    async fn list_volumes(&self) -> pool::Result<Vec<(Volume, Condition)>> {
        self.blocking(|p| p.list_volumes()).await
    }

    async fn expand_volume(
        &self,
        id: VolumeId,
        range: size::Range,
    ) -> pool::Result<(Volume, bool)> {
        self.blocking(move |p| p.expand_volume(&id, range)).await
    }

    async fn available(&self, _node: &Node, provisioning: Provisioning) -> pool::Result<u64> {
        self.blocking(move |p| p.available(provisioning)).await
    }

    async fn create_snapshot(&self, name: String, source: VolumeId) -> pool::Result<Snapshot> {
        self.blocking(move |p| p.create_snapshot(&name, &source))
            .await
    }

    async fn delete_snapshot(&self, id: SnapshotId) -> pool::Result<()> {
        self.blocking(move |p| p.delete_snapshot(&id)).await
    }

    async fn snapshot(&self, id: SnapshotId) -> pool::Result<Snapshot> {
        self.blocking(move |p| p.snapshot(&id)).await
    }

    async fn list_snapshots(&self) -> pool::Result<Vec<Snapshot>> {
        self.blocking(|p| p.list_snapshots()).await
    }
}
