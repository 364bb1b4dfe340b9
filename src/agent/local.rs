//! The in-process transport of `all-in-one`: [`Pools`] over this process's own
//! [`node::Local`], with no network between them. Only this node exists.

use super::{Error, Found, Node, Pools, Progress, Ranges, Result};
use crate::node;
use crate::pool::cbt::Query;
use crate::pool::group::GroupSnapshot;
use crate::pool::{
    Condition, ContentSource, GroupSnapshotId, NodeToken, Provisioning, Snapshot, SnapshotId,
    Timestamp, Volume, VolumeId, VolumeSpec, size,
};

/// The one node of an all-in-one driver.
#[derive(Clone)]
pub struct InProcess {
    local: node::Local,
    node: Node,
}

impl InProcess {
    pub fn new(local: node::Local) -> Self {
        let node = Node {
            id: local.node_id().to_owned(),
            token: local.token().clone(),
        };
        InProcess { local, node }
    }

    /// Only this node's pool exists: another token names a node that cannot be.
    fn check(&self, token: &NodeToken) -> Result<()> {
        if *token == self.node.token {
            Ok(())
        } else {
            Err(Error::UnknownNode {
                token: token.as_str().to_owned(),
            })
        }
    }
}

impl Pools for InProcess {
    fn nodes(&self) -> Vec<Node> {
        vec![self.node.clone()]
    }

    fn node(&self, token: &NodeToken) -> Option<Node> {
        (*token == self.node.token).then(|| self.node.clone())
    }

    fn locate(&self, token: &NodeToken) -> Result<Node> {
        self.check(token)?;
        Ok(self.node.clone())
    }

    async fn find_volume(&self, _node: &Node, name: String) -> Result<Option<Volume>> {
        Ok(self.local.find_volume(name).await?)
    }

    async fn create_volume(&self, node: &Node, spec: VolumeSpec) -> Result<Volume> {
        self.check(&node.token)?;
        Ok(self.local.create_volume(spec).await?)
    }

    async fn delete_volume(&self, id: VolumeId) -> Result<()> {
        Ok(self.local.delete_volume(id).await?)
    }

    async fn volume(&self, id: VolumeId) -> Result<(Volume, Condition)> {
        Ok(self.local.volume(id).await?)
    }

    async fn list_volumes(
        &self,
        from: Option<VolumeId>,
        limit: usize,
    ) -> Result<Vec<(Volume, Condition)>> {
        Ok(self.local.list_volumes(from, limit).await?)
    }

    async fn expand_volume(&self, id: VolumeId, range: size::Range) -> Result<(Volume, bool)> {
        Ok(self.local.expand_volume(id, range).await?)
    }

    async fn modify_volume(
        &self,
        id: VolumeId,
        provisioning: Provisioning,
    ) -> Result<(Volume, bool)> {
        Ok(self.local.modify_volume(id, provisioning).await?)
    }

    async fn available(&self, _node: &Node, provisioning: Provisioning) -> Result<u64> {
        Ok(self.local.available(provisioning).await?)
    }

    async fn maximum(&self, _node: &Node, provisioning: Provisioning) -> Result<u64> {
        Ok(self.local.maximum(provisioning).await?)
    }

    async fn find_snapshot(&self, _node: &Node, name: String) -> Result<Option<Snapshot>> {
        Ok(self.local.find_snapshot(name).await?)
    }

    async fn create_snapshot(&self, name: String, source: VolumeId) -> Result<Snapshot> {
        Ok(self.local.create_snapshot(name, source).await?)
    }

    async fn delete_snapshot(&self, id: SnapshotId) -> Result<()> {
        Ok(self.local.delete_snapshot(id).await?)
    }

    async fn snapshot(&self, id: SnapshotId) -> Result<Snapshot> {
        Ok(self.local.snapshot(id).await?)
    }

    async fn list_snapshots(
        &self,
        from: Option<SnapshotId>,
        limit: usize,
        source: Option<VolumeId>,
    ) -> Result<Vec<Snapshot>> {
        Ok(self.local.list_snapshots(from, limit, source).await?)
    }

    async fn freeze_group(
        &self,
        node: &Node,
        hold: String,
        volumes: Vec<VolumeId>,
    ) -> Result<Vec<VolumeId>> {
        self.check(&node.token)?;
        Ok(self.local.freeze_group(hold, volumes).await?)
    }

    async fn cut_group_members(
        &self,
        node: &Node,
        hold: String,
        group: GroupSnapshotId,
        volumes: Vec<VolumeId>,
        created: Timestamp,
    ) -> Result<Vec<Snapshot>> {
        self.check(&node.token)?;
        Ok(self
            .local
            .cut_group_members(hold, group, volumes, created)
            .await?)
    }

    async fn thaw_group(&self, node: &Node, hold: String) -> Result<()> {
        self.check(&node.token)?;
        Ok(self.local.thaw_group(hold).await?)
    }

    async fn put_group(&self, group: GroupSnapshot) -> Result<()> {
        Ok(self.local.put_group(group).await?)
    }

    async fn group(&self, id: GroupSnapshotId) -> Result<GroupSnapshot> {
        Ok(self.local.group(id).await?)
    }

    async fn delete_group(&self, id: GroupSnapshotId) -> Result<()> {
        Ok(self.local.delete_group(id).await?)
    }

    async fn remove_member(&self, id: SnapshotId) -> Result<()> {
        Ok(self.local.remove_member(id).await?)
    }

    /// One pool has no other node to copy from.
    async fn transfer_volume(
        &self,
        node: &Node,
        _spec: VolumeSpec,
        _from: &NodeToken,
    ) -> Result<Progress> {
        Err(Error::UnknownNode {
            token: node.token.as_str().to_owned(),
        })
    }

    async fn find_transfer(&self, _node: &Node, _name: String) -> Result<Option<Progress>> {
        Ok(None)
    }

    async fn snapshot_ranges(&self, query: Query, start: u64, max: usize) -> Result<Ranges> {
        use futures_util::StreamExt;
        let listed = self.local.snapshot_ranges(query, start, max).await?;
        Ok(Ranges {
            capacity: listed.capacity,
            batches: tokio_stream::wrappers::ReceiverStream::new(listed.batches)
                .map(|batch| batch.map_err(Error::from))
                .boxed(),
        })
    }

    async fn set_replication(
        &self,
        id: VolumeId,
        wanted: Option<(u8, u64)>,
        nodes: Vec<String>,
    ) -> Result<Volume> {
        self.check(&id.node())?;
        Ok(self.local.set_replication(id, wanted, nodes).await?)
    }

    async fn find_replica(&self, _node: &Node, source: ContentSource) -> Result<Option<Found>> {
        Ok(self.local.find_replica(source).await?)
    }

    async fn drop_replica(
        &self,
        _node: &Node,
        source: ContentSource,
        tombstone: bool,
    ) -> Result<bool> {
        Ok(self.local.drop_replica(source, tombstone).await?)
    }
}
