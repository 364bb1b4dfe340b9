//! What the controller decides, with no gRPC types: names and their locks, finding an
//! object by name across nodes, placement ([`placement`], a pure function),
//! copy-or-create, and the group-snapshot steps with their compensation ([`group`]).
//!
//! The CSI Controller and GroupController services (`csi/`, the room above) check requests
//! into the typed arguments here and map [`Error`] to a status; this room reaches the
//! nodes' pools only through [`Pools`] (in-process in `all-in-one`, over the agent API
//! in a cluster).
//!
//! # Guarantees
//!
//! - CreateVolume, CreateSnapshot and CreateVolumeGroupSnapshot hold a lock on the
//!   request's name (in this process) while they look for an object of that name on
//!   every live node and, only if there is none, make one: a retried or doubled
//!   request never makes two.
//! - The per-object locks are taken by [`Pools`] in the process that owns the pool.

pub mod group;
pub mod names;
pub mod placement;
pub mod replication;

use crate::agent::{self, Node, Pools, Progress};
use crate::pool::cbt::Query;
use crate::pool::{
    Condition, ContentSource, NodeToken, Provisioning, Snapshot, SnapshotId, Volume, VolumeId,
    VolumeSpec, size,
};
use names::{NameGuard, Names};
use placement::{Candidate, Refusal, Topology};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the controller refuses or fails with, in the caller's terms.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A node's answer, or the transport's failure to get one, as it came.
    #[error(transparent)]
    Agent(#[from] agent::Error),
    /// Another request of this name is in flight in this controller.
    #[error("an operation on {0} is already in progress")]
    NameBusy(String),
    /// No node can take the volume within what the request allows.
    #[error(transparent)]
    NoRoom(#[from] Refusal),
    /// A size above the largest volume any live node's pool could ever hold, full or
    /// empty: no node and no wait can serve it.
    #[error(
        "{needed} bytes is more than the {largest} bytes the largest pool of any live \
         kura node could ever hold"
    )]
    BeyondEveryPool { needed: u64, largest: u64 },
    /// A content source whose ID names a node that cannot exist.
    #[error("{id} does not exist (no kura node {node})")]
    SourceNotFound { id: String, node: String },
    /// A group snapshot's source volume whose ID names a node that cannot exist.
    #[error("volume {id} does not exist (no kura node {node})")]
    VolumeNotFound { id: String, node: String },
    /// A cross-node copy is still running; a retry follows it.
    #[error(
        "volume {name:?} is being copied from {from} to node {node}: {done} of {total} \
         bytes of data so far; retry to follow it"
    )]
    Transferring {
        name: String,
        from: String,
        node: String,
        done: u64,
        total: u64,
    },
    /// A name that exists with arguments the request does not allow.
    #[error("{0}")]
    Incompatible(String),
    /// A member snapshot of a group that exists cannot be deleted alone.
    #[error(
        "snapshot {snapshot} is a member of group snapshot {group}; delete the group \
         snapshot (DeleteVolumeGroupSnapshot) to delete its members"
    )]
    GroupMember { snapshot: String, group: String },
    /// The snapshot IDs a group request names are not the group's members.
    #[error("are not the members of group snapshot {group} ({members} members)")]
    NotMembers { group: String, members: usize },
    /// The members of a group would not be cut at one point in time.
    #[error(
        "raw block volumes {} are in use: kura cannot hold a block device's writers \
         still, so two or more of them in one group would not be cut at one point in \
         time; unstage all but one, or snapshot them in separate groups",
        volumes.join(", ")
    )]
    NotOneMoment { volumes: Vec<String> },
    /// A delta between snapshots on two nodes: they cannot be of one volume.
    #[error(
        "snapshot {target} is on another node than the base snapshot {base}: a delta is \
         between two snapshots of one volume"
    )]
    NotOneVolume { base: String, target: String },
}

/// A volume to make: what the pool needs, where the request allows it, and its
/// copies on other nodes (how many, seconds between points), if any.
#[derive(Debug, Clone)]
pub struct NewVolume {
    pub spec: VolumeSpec,
    pub topology: Topology,
    pub replication: Option<(u8, u64)>,
}

/// One page of a listing and the first item of the next, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<T>,
}

/// Which snapshots a listing asks for.
#[derive(Debug, Clone, Default)]
pub struct SnapshotFilter {
    /// One snapshot by ID (`Some(None)`: an ID that cannot be kura's, so none).
    pub id: Option<Option<SnapshotId>>,
    /// Only the snapshots of this volume (as the CO wrote the ID).
    pub source_volume: Option<String>,
}

/// The controller's decisions over the nodes' pools.
pub struct Controller<P> {
    pools: P,
    names: Names,
    down_since: replication::DownSince,
}

impl<P: Pools> Controller<P> {
    pub fn new(pools: P) -> Self {
        Controller {
            pools,
            names: Names::default(),
            down_since: Default::default(),
        }
    }

    /// The CO's name for the node a token names (the token itself if unknown).
    pub fn node_id(&self, token: &NodeToken) -> String {
        self.pools
            .node(token)
            .map_or_else(|| token.as_str().to_owned(), |n| n.id)
    }

    /// Takes the lock on a request's name.
    fn lock_name(&self, kind: &str, name: &str) -> Result<NameGuard> {
        self.names
            .try_acquire(format!("{kind} name {name:?}"))
            .map_err(Error::NameBusy)
    }

    /// Makes the volume, or finds the one a create of that name made (or is making:
    /// a cross-node copy reports its progress as [`Error::Copying`]).
    pub async fn create_volume(&self, new: NewVolume) -> Result<Volume> {
        let NewVolume {
            spec,
            topology,
            replication,
        } = new;
        let name = spec.name.clone();
        let name_guard = self.lock_name("volume", &name)?;
        let (node, exists) = match self.find_volume(&name).await? {
            Some((node, _)) => {
                if !topology.allows(&node.id) {
                    return Err(Error::Incompatible(format!(
                        "a volume of this name already exists on node {}, outside the \
                         requisite topology",
                        node.id
                    )));
                }
                (node, true)
            }
            None => match self.find_transfer(&name).await? {
                Some(node) => (node, false),
                None => {
                    let node = self
                        .place(
                            &topology,
                            spec.provisioning,
                            spec.range.required,
                            spec.source.as_ref(),
                        )
                        .await?;
                    (node, false)
                }
            },
        };
        name_guard.making(VolumeId::derive(&name, &node.token).as_str());
        // Where the source is read from: its own node, or the replica that serves
        // while that node is down.
        let source_node = match spec.source.as_ref().filter(|_| !exists) {
            None => None,
            Some(source) => Some(self.source_node(source).await?.token),
        };
        let copy_from = spec
            .source
            .as_ref()
            .zip(source_node)
            .filter(|(_, from)| *from != node.token);
        let volume = match copy_from {
            None => self.pools.create_volume(&node, spec).await?,
            Some((source, from)) => {
                let source = source.id().to_owned();
                match self.pools.transfer_volume(&node, spec, &from).await? {
                    Progress::Done(volume) => volume,
                    Progress::Running { done, total } => {
                        return Err(Error::Transferring {
                            name,
                            from: source,
                            node: node.id,
                            done,
                            total,
                        });
                    }
                }
            }
        };
        match replication {
            None => Ok(volume),
            Some(wanted) => self.place_replicas(&volume, Some(wanted), &[]).await,
        }
    }

    /// The live node a content source is read from: its own, or, while that one is
    /// down, the node with its newest replica.
    async fn source_node(&self, source: &ContentSource) -> Result<Node> {
        match self.pools.locate(&source.node()) {
            Ok(node) => Ok(node),
            Err(agent::Error::UnknownNode { token }) => Err(Error::SourceNotFound {
                id: source.id().to_owned(),
                node: token,
            }),
            Err(down) => match self.failover_node(source).await? {
                Some(node) => {
                    tracing::warn!(
                        source = %source.id(),
                        node.id = %node.id,
                        "the source's node is down: served from its newest replica"
                    );
                    Ok(node)
                }
                None => Err(Error::Agent(down)),
            },
        }
    }

    /// The node for a new volume: the live nodes' free space, then [`placement::place`].
    async fn place(
        &self,
        topology: &Topology,
        provisioning: Provisioning,
        needed: u64,
        source: Option<&ContentSource>,
    ) -> Result<Node> {
        self.check_satisfiable(provisioning, needed).await?;
        // A source on a node kura cannot have names nothing: NOT_FOUND, not a
        // topology failure.
        let source_node = match source {
            None => None,
            Some(source) => Some(self.source_node(source).await?),
        };
        let mut live = Vec::new();
        for node in self.pools.nodes() {
            let free = self.pools.available(&node, provisioning).await?;
            live.push(Candidate { node, free });
        }
        Ok(placement::place(
            topology,
            needed,
            source_node.as_ref(),
            &live,
        )?)
    }

    /// A size above the largest volume any live node could ever hold is refused
    /// ([`Error::BeyondEveryPool`], OUT_OF_RANGE) whatever the topology asks: waiting
    /// or placing elsewhere cannot help. Within that, a node without room is a
    /// placement refusal (RESOURCE_EXHAUSTED: the scheduler may pick a node that can).
    /// With no live node, or one whose bound is unknown (an older agent), the node
    /// decides.
    async fn check_satisfiable(&self, provisioning: Provisioning, needed: u64) -> Result<()> {
        let mut largest = 0;
        for node in self.pools.nodes() {
            let most = self.pools.maximum(&node, provisioning).await?;
            if most == 0 {
                return Ok(());
            }
            largest = largest.max(most);
        }
        if largest > 0 && needed > largest {
            return Err(Error::BeyondEveryPool { needed, largest });
        }
        Ok(())
    }

    /// The live node that holds a volume made by a create with this name, if any.
    async fn find_volume(&self, name: &str) -> Result<Option<(Node, Volume)>> {
        self.first_found(|node| async move { self.pools.find_volume(&node, name.to_owned()).await })
            .await
    }

    /// The live node where a cross-node copy for a create with this name runs or
    /// may resume, if any: retries follow it rather than place again.
    async fn find_transfer(&self, name: &str) -> Result<Option<Node>> {
        Ok(self
            .first_found(
                |node| async move { self.pools.find_transfer(&node, name.to_owned()).await },
            )
            .await?
            .map(|(node, _)| node))
    }

    /// Asks every live node at once; the first (by ID) that answers with something,
    /// and what it answered. A node that fails fails the search: what it holds is
    /// unknown.
    async fn first_found<T, Fut>(&self, ask: impl Fn(Node) -> Fut) -> Result<Option<(Node, T)>>
    where
        Fut: std::future::Future<Output = agent::Result<Option<T>>>,
    {
        let nodes = self.pools.nodes();
        let found = futures_util::future::join_all(nodes.iter().cloned().map(ask)).await;
        for (node, found) in nodes.iter().zip(found) {
            if let Some(item) = found? {
                return Ok(Some((node.clone(), item)));
            }
        }
        Ok(None)
    }

    pub async fn volume(&self, id: VolumeId) -> Result<(Volume, Condition)> {
        Ok(self.pools.volume(id).await?)
    }

    /// Volumes of every live node, sorted by ID (tokens are IDs: one order over every
    /// node keeps paging stable), from `start` on. Each node sends at most one more
    /// than a page: the one that may start the next.
    pub async fn list_volumes(
        &self,
        start: Option<&VolumeId>,
        max: usize,
    ) -> Result<Page<(Volume, Condition)>> {
        let answers = self
            .pools
            .list_volumes(start.cloned(), max.saturating_add(1))
            .await?;
        Ok(page(answers, |(v, _)| &v.id, start, max))
    }

    /// Grows a volume; returns it as it is now.
    pub async fn expand_volume(&self, id: VolumeId, range: size::Range) -> Result<Volume> {
        Ok(self.pools.expand_volume(id, range).await?.0)
    }

    /// Gives a volume the provisioning asked for. With no key asked for there is
    /// nothing to change (the spec: only the keys given are modified), but the volume
    /// must still exist.
    pub async fn modify_volume(
        &self,
        id: VolumeId,
        provisioning: Option<Provisioning>,
        replication: replication::ReplicationChange,
    ) -> Result<()> {
        match provisioning {
            Some(provisioning) => {
                self.pools.modify_volume(id.clone(), provisioning).await?;
            }
            None => {
                self.pools.volume(id.clone()).await?;
            }
        }
        if !replication.is_empty() {
            self.change_replication(id, replication).await?;
        }
        Ok(())
    }

    /// Bytes new volumes may take on the live nodes `node` names (all, for `None`):
    /// the sum and the largest on one node.
    pub async fn capacity(
        &self,
        node: Option<&str>,
        provisioning: Provisioning,
    ) -> Result<(u64, u64)> {
        let mut sum = 0u64;
        let mut largest = 0u64;
        for live in self.pools.nodes() {
            if node.is_some_and(|wanted| wanted != live.id) {
                continue;
            }
            let free = self.pools.available(&live, provisioning).await?;
            sum = sum.saturating_add(free);
            largest = largest.max(free);
        }
        Ok((sum, largest))
    }

    /// Cuts a snapshot of `source`, or finds the one a create of that name made.
    pub async fn create_snapshot(&self, name: &str, source: VolumeId) -> Result<Snapshot> {
        let name_guard = self.lock_name("snapshot", name)?;
        name_guard.making(SnapshotId::derive(name, &source.node()).as_str());
        if let Some(existing) = self.find_snapshot(name).await?
            && existing.source_volume != source
        {
            return Err(Error::Incompatible(format!(
                "snapshot {name:?} already exists for volume {}",
                existing.source_volume
            )));
        }
        Ok(self.pools.create_snapshot(name.to_owned(), source).await?)
    }

    /// A snapshot made by a create with this name on any live node, if any.
    async fn find_snapshot(&self, name: &str) -> Result<Option<Snapshot>> {
        Ok(self
            .first_found(
                |node| async move { self.pools.find_snapshot(&node, name.to_owned()).await },
            )
            .await?
            .map(|(_, snapshot)| snapshot))
    }

    /// Deletes a snapshot that is not a member of a group (see
    /// [`Controller::check_not_grouped`]); one that is gone already is deleted.
    pub async fn delete_snapshot(&self, id: SnapshotId) -> Result<()> {
        let deleted = match self.check_not_grouped(&id).await {
            Ok(()) => self
                .pools
                .delete_snapshot(id.clone())
                .await
                .map_err(Error::from),
            Err(e) => Err(e),
        };
        match deleted {
            // Its node is down: a snapshot with replicas is deleted there.
            Err(Error::Agent(down @ agent::Error::Unreachable { .. })) => {
                self.tombstone(ContentSource::Snapshot(id), down).await
            }
            done => done,
        }
    }

    /// Changed block tracking: lists what `query` asks, from `start`, on the node of
    /// its snapshots. Two snapshots on different nodes cannot be of one volume; each
    /// must exist before the pair is refused, so an unknown one is NOT_FOUND.
    pub async fn snapshot_ranges(
        &self,
        query: Query,
        start: u64,
        max: usize,
    ) -> Result<agent::Ranges> {
        if let Query::Delta { base, target } = &query
            && base.node() != target.node()
        {
            self.pools.snapshot(base.clone()).await?;
            self.pools.snapshot(target.clone()).await?;
            return Err(Error::NotOneVolume {
                base: base.to_string(),
                target: target.to_string(),
            });
        }
        Ok(self.pools.snapshot_ranges(query, start, max).await?)
    }

    pub async fn snapshot(&self, id: SnapshotId) -> Result<Snapshot> {
        Ok(self.pools.snapshot(id).await?)
    }

    /// Snapshots of every live node that pass `filter`, sorted by ID, from `start` on.
    pub async fn list_snapshots(
        &self,
        filter: SnapshotFilter,
        start: Option<&SnapshotId>,
        max: usize,
    ) -> Result<Page<Snapshot>> {
        // A source volume ID that cannot be kura's has no snapshots.
        let source = match &filter.source_volume {
            None => None,
            Some(text) => match VolumeId::parse(text) {
                Some(id) => Some(id),
                None => return Ok(page(vec![], |s: &Snapshot| &s.id, start, max)),
            },
        };
        let mut snapshots = match filter.id {
            None => {
                self.pools
                    .list_snapshots(start.cloned(), max.saturating_add(1), source)
                    .await?
            }
            Some(None) => vec![],
            Some(Some(id)) => match self.pools.snapshot(id).await {
                Ok(snapshot) => vec![snapshot],
                Err(e) if e.is_not_found() => vec![],
                Err(e) => return Err(e.into()),
            },
        };
        // One asked for by ID, or from an agent that predates the source filter.
        if let Some(volume) = &filter.source_volume {
            snapshots.retain(|s| s.source_volume.as_str() == volume);
        }
        Ok(page(snapshots, |s| &s.id, start, max))
    }
}

/// One page of the nodes' answers: see [`crate::pool::listing::merge`].
fn page<T, K: Ord>(
    answers: Vec<T>,
    key: impl Fn(&T) -> &K,
    start: Option<&K>,
    max: usize,
) -> Page<T> {
    let (items, next) = crate::pool::listing::merge(answers, key, start, max);
    Page { items, next }
}
