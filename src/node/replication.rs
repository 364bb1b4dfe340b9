//! Replication, both ends, as this node runs them; the agent carries the requests and
//! the bytes between nodes (`agent::replication`), through the [`Peers`] seam.
//!
//! - Source (the volume's node): [`Replicator::run`] keeps one loop per replicated
//!   volume. At every interval it takes a point ([`Pool::take_point`]: frozen or
//!   flushed, reflinked) and asks each replica node to take it ([`Peers::replicate`])
//!   with a fresh grant; [`Replicator::open_point`] serves the ranges to a node that
//!   presents one. What each replica holds is recorded as its answer comes back.
//! - Replica: [`Replicator::receive`] pulls the point from the volume's node
//!   ([`Peers::read_point`]) into a reflink of the point it holds, checks the digest
//!   and commits ([`crate::pool::replica::Incoming`]), then the volume's snapshots it
//!   has no copy of yet, each as a delta from that point.
//!
//! # Guarantees
//!
//! - The volume's own I/O never waits for the network: only the point is taken under
//!   the volume's lock (as a snapshot is), the shipping runs after.
//! - A replica holds a whole point or its previous one, never part of one: a failure
//!   anywhere removes what was received of the new point.
//! - Replication goes on with no controller: the volume's record names its replica
//!   nodes and their secrets, and nodes find each other themselves.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::BoxStream;

use super::Local;
use crate::pool::replica::{self, Denied, Incoming, ReadTarget, Shipped, Target};
use crate::pool::transfer::{Chain, Chunk, Reader};
use crate::pool::{self, Condition, Pool, Snapshot, SnapshotId, Timestamp, Volume, VolumeId};

/// How long a grant made for one round of shipping lets its node read.
pub const GRANT_LIFETIME: Duration = Duration::from_secs(600);
/// How often the set of replicated volumes is looked at again.
const SUPERVISE_EVERY: Duration = Duration::from_secs(1);
/// How long a busy volume (another operation holds its lock) is waited for before
/// its point is tried again.
const BUSY_RETRY: Duration = Duration::from_secs(1);
/// How often a replica node asks whether its copies are still placed with it.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How often the newest point is offered again to a replica that failed to take it.
pub const RETRY_LAGGING: Duration = Duration::from_secs(5);

/// A replica node's request to take a point (what the volume's node sends).
#[derive(Debug, Clone)]
pub struct ShipRequest {
    pub volume: Volume,
    pub source_node: String,
    /// The ID of the volume node's pool.
    pub source_pool: String,
    pub grant: String,
    pub point: u64,
    pub taken: Timestamp,
    pub size_bytes: u64,
    /// The volume's ready snapshots now.
    pub snapshots: Vec<Snapshot>,
}

/// What a replica node holds after a [`ShipRequest`].
#[derive(Debug, Clone, Default)]
pub struct ShipAnswer {
    /// 0: none.
    pub point: u64,
    pub taken: Option<Timestamp>,
    pub snapshots: BTreeSet<SnapshotId>,
    pub volume_deleted: bool,
    pub snapshots_deleted: Vec<SnapshotId>,
    pub bytes_received: u64,
}

/// What a node holds of another node's volume (its point) or snapshot.
#[derive(Debug, Clone)]
pub struct Found {
    /// The point number; 0 for a snapshot.
    pub point: u64,
    pub taken: Option<Timestamp>,
    pub size_bytes: u64,
}

/// A replica node's read of a point or snapshot.
#[derive(Debug, Clone)]
pub struct ReadRequest {
    pub volume: VolumeId,
    pub node: String,
    pub grant: String,
    pub target: ReadTarget,
    pub base: Option<u64>,
}

/// One message of a read: the header, the chunks, then the digest.
#[derive(Debug)]
pub enum Piece {
    Header { size_bytes: u64, delta: bool },
    Chunk(Chunk),
    Digest(Vec<u8>),
}

/// Why a round of shipping to a replica node failed.
#[derive(Debug, Clone)]
pub struct Failure {
    pub message: String,
    /// The replica node has no room for the point.
    pub no_space: bool,
}

/// How this node reaches the other nodes' agents: the agent's clients in a cluster.
pub trait Peers: Clone + Send + Sync + 'static {
    /// Asks `node` to take the point `request` names.
    fn replicate(
        &self,
        node: &str,
        request: ShipRequest,
    ) -> impl Future<Output = Result<ShipAnswer, Failure>> + Send;
    /// Asks `node`, a volume's node, whether it still places `me` as a holder of a
    /// copy of `volume`; answers that and the ID of its pool.
    fn placed(
        &self,
        node: &str,
        volume: &VolumeId,
        me: &str,
    ) -> impl Future<Output = Result<(bool, String), String>> + Send;
    /// Opens a read from `node`, the volume's node.
    fn read_point(
        &self,
        node: &str,
        request: ReadRequest,
    ) -> impl Future<Output = Result<BoxStream<'static, Result<Piece, String>>, String>> + Send;
}

/// How replication of one volume to one node goes, as the volume's node sees it.
#[derive(Debug, Clone, Default)]
pub struct ReplicaState {
    /// Why the last round failed; `None` after a success.
    pub error: Option<String>,
    /// The last round failed for want of space on the replica node.
    pub full: bool,
    /// Data bytes this node sent it, since start.
    pub bytes_shipped: u64,
}

/// The shipping state of every (volume, replica node), for conditions and metrics.
#[derive(Debug, Clone, Default)]
pub struct States(Arc<Mutex<HashMap<(VolumeId, String), ReplicaState>>>);

impl States {
    fn update(&self, volume: &VolumeId, node: &str, change: impl FnOnce(&mut ReplicaState)) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        change(map.entry((volume.clone(), node.to_owned())).or_default());
    }

    pub fn get(&self, volume: &VolumeId, node: &str) -> ReplicaState {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(volume.clone(), node.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// Every (volume, node) with its state.
    pub fn all(&self) -> Vec<((VolumeId, String), ReplicaState)> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn forget(&self, volume: &VolumeId) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|(v, _), _| v != volume);
    }
}

/// What a volume's replication looks like from its node: healthy, or degraded with
/// the reason (a copy missing, a replica behind and by how much, a failure).
pub fn condition(volume: &Volume, points: &replica::Points, states: &States) -> Option<Condition> {
    let replication = volume.replication.as_ref()?;
    let now = Timestamp::now().seconds;
    let mut problems = Vec::new();
    let placed = replication.replicas.len();
    if placed < replication.copies as usize {
        problems.push(format!(
            "{placed} of {} copies placed: no other live node with room",
            replication.copies
        ));
    }
    let behind_after = 2 * replication.interval_secs as i64;
    for node in replication.nodes() {
        let state = states.get(&volume.id, node);
        match (points.shipped.get(node), state.error) {
            (_, Some(error)) => problems.push(format!("replica on {node} is failing: {error}")),
            (None, None) => problems.push(format!("replica on {node} has no point yet")),
            (Some(shipped), None) if now - shipped.taken.seconds > behind_after => {
                problems.push(format!(
                    "replica on {node} is {}s behind",
                    now - shipped.taken.seconds
                ))
            }
            (Some(_), None) => {}
        }
    }
    Some(if problems.is_empty() {
        Condition {
            abnormal: false,
            message: format!(
                "volume is healthy; replicated to {} every {}s",
                replication.nodes().collect::<Vec<_>>().join(", "),
                replication.interval_secs
            ),
        }
    } else {
        Condition::abnormal(format!("replication degraded: {}", problems.join("; ")))
    })
}

/// Both ends of replication on this node.
#[derive(Clone)]
pub struct Replicator<P> {
    local: Local,
    peers: P,
    states: States,
}

impl<P: Peers> Replicator<P> {
    pub fn new(local: Local, peers: P, states: States) -> Self {
        Replicator {
            local,
            peers,
            states,
        }
    }

    fn pool(&self) -> &Arc<Pool> {
        self.local.pool()
    }

    // ---- Source ----

    /// Keeps one shipping loop per replicated volume of this node, for as long as
    /// the process lives.
    pub async fn run(self) {
        tokio::spawn(self.clone().sweep_replicas());
        let mut running: HashMap<VolumeId, tokio::task::JoinHandle<()>> = HashMap::new();
        loop {
            running.retain(|_, task| !task.is_finished());
            match self.local.on_pool(&[], |p| p.replicated_volumes()).await {
                Ok(ids) => {
                    for id in ids {
                        if let std::collections::hash_map::Entry::Vacant(slot) = running.entry(id) {
                            let id = slot.key().clone();
                            slot.insert(tokio::spawn(self.clone().ship_volume(id)));
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %crate::chain(&e), "listing replicated volumes"),
            }
            tokio::time::sleep(SUPERVISE_EVERY).await;
        }
    }

    /// Ships points of one volume until it is deleted or no longer replicated: a new
    /// point every interval, and the newest again (every [`RETRY_LAGGING`]) to a
    /// replica that does not hold it yet.
    async fn ship_volume(self, id: VolumeId) {
        let mut last_round: Option<std::time::Instant> = None;
        loop {
            let found = {
                let id = id.clone();
                self.local
                    .on_pool(&[], move |p| Ok((p.volume(&id)?, p.points(&id)?)))
                    .await
            };
            let (volume, points) = match found {
                Ok((volume, points)) if volume.replication.is_some() => (volume, points),
                Ok(_) | Err(pool::Error::NotFound { .. }) => {
                    self.states.forget(&id);
                    return;
                }
                Err(e) => {
                    tracing::warn!(volume.id = %id, error = %crate::chain(&e), "replication");
                    tokio::time::sleep(BUSY_RETRY).await;
                    continue;
                }
            };
            let replication = volume.replication.clone().expect("checked above");
            if replication.replicas.is_empty() {
                // No node could take a copy yet: no point is of use (the condition
                // says so, and the controller places one when a node can take it).
                tokio::time::sleep(RETRY_LAGGING).await;
                continue;
            }
            let newest = points.newest();
            let point_due = newest.is_none_or(|(_, p)| {
                Timestamp::now().seconds >= p.taken.seconds + replication.interval_secs as i64
            });
            let lagging = newest.is_some_and(|(n, _)| {
                replication
                    .nodes()
                    .any(|node| points.shipped.get(node).is_none_or(|s| s.point != n))
            });
            let retry_due = last_round.is_none_or(|at| at.elapsed() >= RETRY_LAGGING);
            if !(point_due || lagging && retry_due) {
                tokio::time::sleep(BUSY_RETRY).await;
                continue;
            }
            let point = match newest {
                Some(newest) if !point_due => newest,
                _ => {
                    let volume_id = id.clone();
                    let taken = self
                        .local
                        .on_pool(&[id.to_string()], move |p| p.take_point(&volume_id))
                        .await;
                    match taken {
                        Ok(point) => point,
                        Err(pool::Error::Busy(_)) => {
                            tokio::time::sleep(BUSY_RETRY).await;
                            continue;
                        }
                        Err(e) => {
                            // Every replica falls behind: the condition says why.
                            let error = format!("no point could be taken: {}", crate::chain(&e));
                            tracing::warn!(volume.id = %id, %error, "replication");
                            for node in replication.nodes() {
                                self.states
                                    .update(&id, node, |s| s.error = Some(error.clone()));
                            }
                            tokio::time::sleep(RETRY_LAGGING).await;
                            continue;
                        }
                    }
                }
            };
            last_round = Some(std::time::Instant::now());
            let rounds = replication
                .replicas
                .iter()
                .map(|placement| self.ship_to(&volume, point, placement));
            if futures_util::future::join_all(rounds)
                .await
                .into_iter()
                .any(|deleted| deleted)
            {
                self.delete_after_tombstone(&id).await;
            }
        }
    }

    /// One round of shipping to one replica node; answers whether that node says the
    /// volume was deleted while this node was down.
    async fn ship_to(
        &self,
        volume: &Volume,
        (number, info): (u64, replica::PointInfo),
        placement: &replica::Placement,
    ) -> bool {
        let id = volume.id.clone();
        let node = placement.node.clone();
        let expires = Timestamp::now().seconds + GRANT_LIFETIME.as_secs() as i64;
        let snapshots = {
            let id = id.clone();
            self.local
                .on_pool(&[], move |p| {
                    Ok(p.list_snapshots(None, usize::MAX, Some(&id))
                        .into_iter()
                        .filter(|s| s.ready)
                        .collect::<Vec<_>>())
                })
                .await
                .unwrap_or_default()
        };
        let request = ShipRequest {
            volume: volume.clone(),
            source_node: self.local.node_id().to_owned(),
            source_pool: self.pool().id().to_owned(),
            grant: replica::grant(&placement.secret, &id, &node, expires),
            point: number,
            taken: info.taken,
            size_bytes: info.size_bytes,
            snapshots,
        };
        let answer = match self.peers.replicate(&node, request).await {
            Ok(answer) => answer,
            Err(failure) => {
                tracing::warn!(volume.id = %id, replica = %node, error = %failure.message, "replication round failed");
                self.states.update(&id, &node, |s| {
                    s.error = Some(failure.message);
                    s.full = failure.no_space;
                });
                return false;
            }
        };
        if answer.volume_deleted {
            return true;
        }
        for snapshot in &answer.snapshots_deleted {
            let snapshot = snapshot.clone();
            let deleted = self
                .local
                .on_pool(&[snapshot.to_string()], move |p| {
                    p.delete_snapshot(&snapshot)
                })
                .await;
            if let Err(e) = deleted {
                tracing::warn!(volume.id = %id, error = %crate::chain(&e), "deleting a snapshot deleted while this node was down");
            }
        }
        self.states.update(&id, &node, |s| {
            s.error = None;
            s.full = false;
        });
        if answer.point == 0 {
            return false;
        }
        tracing::debug!(
            volume.id = %id,
            replica = %node,
            point = answer.point,
            bytes = answer.bytes_received,
            "replica holds the point"
        );
        let shipped = Shipped {
            point: answer.point,
            taken: answer.taken.unwrap_or(info.taken),
            snapshots: answer.snapshots,
        };
        let recorded = {
            let id = id.clone();
            let node = node.clone();
            self.local
                .on_pool(&[], move |p| p.record_shipped(&id, &node, shipped))
                .await
        };
        if let Err(e) = recorded {
            tracing::warn!(volume.id = %id, error = %crate::chain(&e), "recording a shipped point");
        }
        false
    }

    /// A replica node holds the tombstone of this volume: it was deleted while this
    /// node was down. The copy here goes too, unless it is in use.
    async fn delete_after_tombstone(&self, id: &VolumeId) {
        let id = id.clone();
        tracing::warn!(volume.id = %id, "the volume was deleted while this node was down; deleting its copy here");
        let key = id.to_string();
        if let Err(e) = self
            .local
            .on_pool(&[key], move |p| p.delete_volume(&id))
            .await
        {
            tracing::warn!(error = %crate::chain(&e), "deleting a volume deleted while this node was down");
        }
    }

    /// Source: the reader of what a replica node asks, after checking its grant; the
    /// pieces come through a channel, read in a blocking thread ahead of the stream.
    pub async fn open_point(
        &self,
        request: ReadRequest,
    ) -> pool::Result<Result<tokio::sync::mpsc::Receiver<pool::Result<Piece>>, Denied>> {
        let pool = Arc::clone(self.pool());
        let states = self.states.clone();
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let (volume, node) = (request.volume.clone(), request.node.clone());
        let opened = crate::node::run(Vec::new(), move || {
            let image = match pool.open_for_replica(
                &request.volume,
                &request.node,
                &request.grant,
                &request.target,
            )? {
                Ok(image) => image,
                Err(denied) => return Ok(Err(denied)),
            };
            let base = match request.base {
                Some(number) => pool.open_base_point(&request.volume, number)?,
                None => None,
            };
            let size = image.size();
            let (ranges, delta) = match &base {
                Some(base) => {
                    let changed = pool::cbt::changed_between(base, &image)?.0;
                    (replica::shipped_ranges(&changed), true)
                }
                None => (vec![(0, size)], false),
            };
            let reader = Reader::open(image.path(), 0)?.0;
            Ok(Ok((reader, ranges, delta, size)))
        })
        .await?;
        let (reader, ranges, delta, size) = match opened {
            Ok(opened) => opened,
            Err(denied) => return Ok(Err(denied)),
        };
        // A thread of its own, below the volumes' I/O: shipping may lag, the volumes
        // must not wait.
        let reading = crate::sys::thread::spawn("kura-ship", move || {
            crate::sys::thread::lower_priority();
            let send = |piece| sender.blocking_send(piece).is_ok();
            if !send(Ok(Piece::Header {
                size_bytes: size,
                delta,
            })) {
                return;
            }
            let mut chain = Chain::start(size);
            for (start, end) in ranges {
                let mut at = start;
                while at < end {
                    let length = (end - at).min(pool::transfer::CHUNK);
                    let chunk = match reader.chunk(at, length) {
                        Ok(chunk) => chunk,
                        Err(e) => {
                            send(Err(e));
                            return;
                        }
                    };
                    chain.add(&chunk);
                    let bytes = chunk.data.len() as u64;
                    if !send(Ok(Piece::Chunk(chunk))) {
                        return;
                    }
                    states.update(&volume, &node, |s| s.bytes_shipped += bytes);
                    at += length;
                }
            }
            send(Ok(Piece::Digest(chain.bytes().to_vec())));
        });
        reading?;
        Ok(Ok(receiver))
    }

    // ---- Replica ----

    /// Every [`SWEEP_EVERY`], removes the copies their volume's node no longer
    /// places here (the volume deleted, or its copy moved, while this node was down).
    /// Only that node decides: a copy whose node cannot be asked, or whose node now
    /// has another pool (a lost disk, where the copy may be all that is left), stays.
    async fn sweep_replicas(self) {
        loop {
            tokio::time::sleep(SWEEP_EVERY).await;
            let records = match self.local.on_pool(&[], |p| p.replicas()).await {
                Ok(records) => records,
                Err(e) => {
                    tracing::warn!(error = %crate::chain(&e), "listing replicas");
                    continue;
                }
            };
            for record in records.into_iter().filter(|r| !r.deleted) {
                let id = record.volume.id.clone();
                let asked = self
                    .peers
                    .placed(&record.source_node, &id, self.local.node_id())
                    .await;
                let Ok((false, pool)) = asked else { continue };
                if pool != record.source_pool {
                    continue;
                }
                let dropped = self
                    .local
                    .on_pool(&[id.to_string()], move |p| p.drop_replica(&id, false))
                    .await;
                if let Err(e) = dropped {
                    tracing::warn!(error = %crate::chain(&e), "removing a replica no longer placed here");
                }
            }
        }
    }

    /// Source: whether `node` is still placed to hold a copy of `volume`, and this
    /// node's pool ID.
    pub async fn placed(&self, volume: VolumeId, node: String) -> pool::Result<(bool, String)> {
        let pool_id = self.pool().id().to_owned();
        self.local
            .on_pool(&[], move |p| {
                Ok((p.replica_placed(&volume, &node)?, pool_id))
            })
            .await
    }

    /// Takes the point a volume's node offers, and copies of its snapshots, reading
    /// them from that node. One request per volume at a time (the volume's lock on
    /// this node).
    pub async fn receive(&self, request: ShipRequest) -> pool::Result<ShipAnswer> {
        let id = request.volume.id.clone();
        if id.node() != pool::NodeToken::for_node(&request.source_node) {
            return Err(pool::Error::Invalid {
                field: "source_node",
                reason: format!("volume {id} is not of node {:?}", request.source_node),
            });
        }
        let _guard = self.local.lock(&[id.to_string()])?;
        let record = {
            let id = id.clone();
            // A tombstone whose snapshot the volume's node no longer has was acted on.
            let offered: BTreeSet<SnapshotId> =
                request.snapshots.iter().map(|s| s.id.clone()).collect();
            self.local
                .on_pool(&[], move |p| {
                    p.forget_snapshot_tombstones(&id, &offered)?;
                    p.replica(&id)
                })
                .await?
        };
        let tombstones = record
            .as_ref()
            .map(|r| r.deleted_snapshots.clone())
            .unwrap_or_default();
        if let Some(record) = &record
            && record.deleted
        {
            return Ok(ShipAnswer {
                volume_deleted: true,
                ..ShipAnswer::default()
            });
        }
        let mut held = record.as_ref().and_then(|r| r.point.clone());
        let mut bytes = 0;
        if held.as_ref().map(|p| p.number) != Some(request.point) {
            let target = Target::Point {
                number: request.point,
                taken: request.taken,
            };
            let base = held.as_ref().map(|p| p.number);
            let (record, written) = self
                .pull(&request, target, ReadTarget::Point(request.point), base)
                .await?;
            bytes += written;
            held = record.point;
        }
        let mut snapshots: BTreeSet<SnapshotId> = record
            .as_ref()
            .map(|r| r.snapshots.keys().cloned().collect())
            .unwrap_or_default();
        for snapshot in &request.snapshots {
            let wanted = snapshot.source_volume == id
                && !snapshots.contains(&snapshot.id)
                && !tombstones.contains(&snapshot.id);
            if !wanted {
                continue;
            }
            let base = held.as_ref().map(|p| p.number);
            let target = Target::Snapshot(snapshot.clone());
            let read = ReadTarget::Snapshot(snapshot.id.clone());
            let (_, written) = self.pull(&request, target, read, base).await?;
            bytes += written;
            snapshots.insert(snapshot.id.clone());
        }
        let keep: BTreeSet<SnapshotId> = request.snapshots.iter().map(|s| s.id.clone()).collect();
        let deleted = {
            let id = id.clone();
            self.local
                .on_pool(&[], move |p| {
                    p.keep_replica_snapshots(&id, &keep)?;
                    Ok(p.replica(&id)?
                        .map(|r| r.deleted_snapshots)
                        .unwrap_or_default())
                })
                .await?
        };
        snapshots.retain(|s| request.snapshots.iter().any(|r| &r.id == s));
        Ok(ShipAnswer {
            point: held.as_ref().map_or(0, |p| p.number),
            taken: held.map(|p| p.taken),
            snapshots,
            volume_deleted: false,
            snapshots_deleted: deleted.into_iter().collect(),
            bytes_received: bytes,
        })
    }

    /// Reads one point or snapshot from the volume's node and commits it here.
    async fn pull(
        &self,
        request: &ShipRequest,
        target: Target,
        read: ReadTarget,
        base: Option<u64>,
    ) -> pool::Result<(replica::ReplicaRecord, u64)> {
        use futures_util::StreamExt;
        let failed = |what: String| {
            pool::Error::Precondition(format!(
                "reading volume {} from node {}: {what}",
                request.volume.id, request.source_node
            ))
        };
        let read = ReadRequest {
            volume: request.volume.id.clone(),
            node: self.local.node_id().to_owned(),
            grant: request.grant.clone(),
            target: read,
            base,
        };
        let mut stream = self
            .peers
            .read_point(&request.source_node, read)
            .await
            .map_err(failed)?;
        let (size_bytes, delta) = match stream.next().await {
            Some(Ok(Piece::Header { size_bytes, delta })) => (size_bytes, delta),
            Some(Ok(_)) => return Err(failed("the stream did not start with its header".into())),
            Some(Err(e)) => return Err(failed(e)),
            None => return Err(failed("the stream ended at once".into())),
        };
        let pool = Arc::clone(self.pool());
        let volume = request.volume.clone();
        let source = (request.source_node.as_str(), request.source_pool.as_str());
        let base = base.filter(|_| delta);
        let incoming: Incoming = tokio::task::block_in_place(|| {
            pool.begin_replica(&volume, source, target, size_bytes, base)
        })?;
        // Written by a thread of its own, below the node's volumes (see
        // `sys::thread::lower_priority`), a few chunks behind the stream at most.
        let (chunks, mut to_write) = tokio::sync::mpsc::channel::<Chunk>(4);
        let writer = crate::sys::thread::spawn("kura-replica", move || {
            crate::sys::thread::lower_priority();
            let mut incoming = incoming;
            while let Some(chunk) = to_write.blocking_recv() {
                incoming.apply(&chunk)?;
            }
            Ok::<_, pool::Error>(incoming)
        })?;
        let written = |writer: std::thread::JoinHandle<pool::Result<Incoming>>| async move {
            tokio::task::spawn_blocking(move || writer.join())
                .await
                .ok()
                .and_then(|joined| joined.ok())
                .unwrap_or_else(|| {
                    Err(pool::Error::Sys(crate::sys::Error::Thread {
                        what: "kura-replica".to_owned(),
                        source: std::io::Error::other("the replica's writer panicked"),
                    }))
                })
        };
        loop {
            match stream.next().await {
                Some(Ok(Piece::Chunk(chunk))) => {
                    if chunks.send(chunk).await.is_err() {
                        // The writer stopped: its error says why.
                        drop(chunks);
                        return Err(written(writer)
                            .await
                            .err()
                            .unwrap_or_else(|| failed("the replica's writer stopped".into())));
                    }
                }
                Some(Ok(Piece::Digest(digest))) => {
                    drop(chunks);
                    let incoming = written(writer).await?;
                    let bytes = incoming.bytes_written();
                    let record = tokio::task::block_in_place(|| incoming.commit(&pool, &digest))?;
                    return Ok((record, bytes));
                }
                Some(Ok(Piece::Header { .. })) => {
                    return Err(failed("a second header".into()));
                }
                Some(Err(e)) => return Err(failed(e)),
                None => return Err(failed("the stream ended before its digest".into())),
            }
        }
    }
}
