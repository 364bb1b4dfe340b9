//! What the controller decides about replicas: where a volume's copies go
//! ([`placement::replica_nodes`]), which replica serves a clone or restore when the
//! volume's node is down (failover), what a delete leaves on the replica nodes, and
//! which lost replica nodes are replaced.
//!
//! The volume's node is the record of its replication: the controller places, the
//! node ships, and nothing here is needed for shipping to go on.
//!
//! # Guarantees
//!
//! - Placement keeps the nodes placed already and adds live nodes with room, the most
//!   free first; where too few nodes can take a copy the volume is still served, and
//!   its condition says it is degraded.
//! - A delete of a volume (or snapshot) whose node is down succeeds only when a live
//!   node held a copy of it: the copies go and a tombstone stays, so the node deletes
//!   its own copy when it comes back. Nothing else is deleted on anyone's behalf.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::placement::{self, Candidate};
use super::{Controller, Error, Result};
use crate::agent::{self, Node, Pools};
use crate::pool::{ContentSource, Provisioning, Volume, VolumeId};

/// How often placements are looked at again.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(10);

/// What a request asks of a volume's replication; each part unset is left as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicationChange {
    /// Copies on other nodes; 0: none.
    pub copies: Option<u8>,
    pub interval_secs: Option<u64>,
}

impl ReplicationChange {
    pub fn is_empty(&self) -> bool {
        self.copies.is_none() && self.interval_secs.is_none()
    }

    /// What a new volume asks: its copies and interval, or none.
    pub fn for_new_volume(&self) -> Option<(u8, u64)> {
        let copies = self.copies.filter(|c| *c > 0)?;
        Some((
            copies,
            self.interval_secs
                .unwrap_or(crate::pool::replica::DEFAULT_INTERVAL_SECS),
        ))
    }
}

/// Since when each node has been seen down, in this controller.
#[derive(Default)]
pub struct DownSince(Mutex<HashMap<String, Instant>>);

impl DownSince {
    /// Records what is live now; answers the nodes down for longer than `after`.
    fn update(&self, known: &[String], live: &[Node], after: Duration) -> Vec<String> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|node, _| !live.iter().any(|l| &l.id == node));
        for node in known {
            if !live.iter().any(|l| &l.id == node) {
                map.entry(node.clone()).or_insert_with(Instant::now);
            }
        }
        map.iter()
            .filter(|(_, since)| since.elapsed() >= after)
            .map(|(node, _)| node.clone())
            .collect()
    }
}

impl<P: Pools> Controller<P> {
    /// Gives `volume` the replication `wanted` (`None`: none), keeping the nodes placed
    /// already except those in `gone`. Copies on nodes no longer placed are removed
    /// (best effort: a node that is down keeps its copy until it is asked again).
    pub(super) async fn place_replicas(
        &self,
        volume: &Volume,
        wanted: Option<(u8, u64)>,
        gone: &[String],
    ) -> Result<Volume> {
        let home = self.node_id(&volume.id.node());
        let placed: Vec<String> = volume
            .replication
            .as_ref()
            .map(|r| r.nodes().map(str::to_owned).collect())
            .unwrap_or_default();
        let nodes = match wanted {
            None => vec![],
            Some((copies, _)) => {
                let mut live = Vec::new();
                for node in self.pools.nodes() {
                    let free = self.pools.available(&node, Provisioning::Thin).await?;
                    live.push(Candidate { node, free });
                }
                placement::replica_nodes(
                    copies as usize,
                    &home,
                    &placed,
                    gone,
                    &live,
                    volume.size_bytes,
                )
            }
        };
        let unchanged = match (&volume.replication, wanted) {
            (None, None) => true,
            (Some(r), Some((copies, interval))) => {
                r.copies == copies
                    && r.interval_secs == interval
                    && r.nodes().eq(nodes.iter().map(String::as_str))
            }
            _ => false,
        };
        if unchanged {
            return Ok(volume.clone());
        }
        let now = self
            .pools
            .set_replication(volume.id.clone(), wanted, nodes.clone())
            .await?;
        for node in placed.iter().filter(|n| !nodes.contains(n)) {
            self.drop_copy(node, ContentSource::Volume(volume.id.clone()), false)
                .await;
        }
        Ok(now)
    }

    /// Removes `node`'s copy of `source`, if it is live; answers whether it held one.
    async fn drop_copy(&self, node: &str, source: ContentSource, tombstone: bool) -> bool {
        let Some(node) = self.pools.nodes().into_iter().find(|n| n.id == node) else {
            return false;
        };
        match self.pools.drop_replica(&node, source, tombstone).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(node.id = %node.id, error = %crate::chain(&e), "removing a replica");
                false
            }
        }
    }

    /// The live node with the newest replica of `source`, if any: where a clone or
    /// restore is served from while the source's node is down.
    pub(super) async fn failover_node(&self, source: &ContentSource) -> Result<Option<Node>> {
        let nodes = self.pools.nodes();
        let found = futures_util::future::join_all(
            nodes
                .iter()
                .map(|n| self.pools.find_replica(n, source.clone())),
        )
        .await;
        let mut best: Option<(Node, (i64, i32))> = None;
        for (node, found) in nodes.into_iter().zip(found) {
            let Some(found) = found? else { continue };
            let taken = found.taken.map_or((0, 0), |t| (t.seconds, t.nanos));
            if best.as_ref().is_none_or(|(_, b)| taken > *b) {
                best = Some((node, taken));
            }
        }
        Ok(best.map(|(node, _)| node))
    }

    /// Deletes a volume and its copies; see the module's guarantees for a volume whose
    /// node is down.
    pub async fn delete_volume(&self, id: VolumeId) -> Result<()> {
        let replication = match self.pools.volume(id.clone()).await {
            Ok((volume, _)) => volume.replication,
            Err(e) if e.is_not_found() => None,
            Err(down @ agent::Error::Unreachable { .. }) => {
                return self.tombstone(ContentSource::Volume(id), down).await;
            }
            Err(e) => return Err(e.into()),
        };
        self.pools.delete_volume(id.clone()).await?;
        for node in replication.iter().flat_map(|r| r.nodes()) {
            self.drop_copy(node, ContentSource::Volume(id.clone()), false)
                .await;
        }
        Ok(())
    }

    /// The delete of `source`, whose node is down (`down`): succeeds when a live node
    /// held a copy, which it removes, keeping a tombstone for the node's return.
    pub(super) async fn tombstone(&self, source: ContentSource, down: agent::Error) -> Result<()> {
        let mut held = false;
        for node in self.pools.nodes() {
            match self.pools.drop_replica(&node, source.clone(), true).await {
                Ok(h) => held |= h,
                Err(e) => return Err(e.into()),
            }
        }
        if held {
            tracing::warn!(
                source = %source.id(),
                "deleted while its node is down: its replicas are removed, and its node \
                 deletes its own copy when it comes back"
            );
            Ok(())
        } else {
            Err(Error::Agent(down))
        }
    }

    /// Changes a volume's replication as `change` asks.
    pub(super) async fn change_replication(
        &self,
        id: VolumeId,
        change: ReplicationChange,
    ) -> Result<Volume> {
        let (volume, _) = self.pools.volume(id).await?;
        let current = volume
            .replication
            .as_ref()
            .map(|r| (r.copies, r.interval_secs));
        let copies = change.copies.or(current.map(|c| c.0)).unwrap_or(0);
        let interval = change
            .interval_secs
            .or(current.map(|c| c.1))
            .unwrap_or(crate::pool::replica::DEFAULT_INTERVAL_SECS);
        let wanted = (copies > 0).then_some((copies, interval));
        self.place_replicas(&volume, wanted, &[]).await
    }

    /// Every [`RECONCILE_EVERY`]: replicated volumes of live nodes get the copies they
    /// ask for where nodes can take them, and a replica node down past
    /// `replace_after` is replaced. For as long as the controller runs.
    pub async fn reconcile_replicas(&self, replace_after: Duration) {
        loop {
            tokio::time::sleep(RECONCILE_EVERY).await;
            if let Err(e) = self.reconcile_once(replace_after).await {
                tracing::warn!(error = %crate::chain(&e), "placing replicas");
            }
        }
    }

    async fn reconcile_once(&self, replace_after: Duration) -> Result<()> {
        let mut start: Option<VolumeId> = None;
        loop {
            let page = self.list_volumes(start.as_ref(), 500).await?;
            let live = self.pools.nodes();
            for (volume, _) in &page.items {
                let Some(r) = &volume.replication else {
                    continue;
                };
                let placed: Vec<String> = r.nodes().map(str::to_owned).collect();
                let mut gone = self.down_since.update(&placed, &live, replace_after);
                gone.extend(r.full.iter().cloned());
                if placed.len() < r.copies as usize || placed.iter().any(|n| gone.contains(n)) {
                    let wanted = Some((r.copies, r.interval_secs));
                    if let Err(e) = self.place_replicas(volume, wanted, &gone).await {
                        tracing::warn!(volume.id = %volume.id, error = %crate::chain(&e), "placing replicas");
                    }
                }
            }
            match page.next {
                Some((next, _)) => start = Some(next.id),
                None => return Ok(()),
            }
        }
    }
}
