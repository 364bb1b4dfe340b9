//! The node process's side: this node's pool as the controller and the kubelet reach
//! it, with the node's per-volume locks.
//!
//! [`Local`] is the one place where a lock is taken and blocking pool work runs off
//! the async threads: the agent (for the controller, over the network or in-process)
//! and the CSI Node service (for the kubelet) both come through it, so a controller's
//! call and the kubelet's call on one volume exclude each other whichever process
//! asks.
//!
//! - [`group`]: group-snapshot freezes held between the controller's steps, with
//!   their deadline.
//! - [`transfer`]: both ends of a cross-node transfer (restore or clone): the source's
//!   exports and the destination's runs; the agent carries the bytes between them.
//!
//! # Guarantees
//!
//! - A mutating call takes the object's lock before any side effect; a second call on
//!   a busy object is refused ([`pool::Error::Busy`], ABORTED), never queued.
//! - A lock is held until the pool work is done, even if the caller stops waiting
//!   (a cancelled RPC): the guards move into the blocking work.

pub mod group;
pub mod replication;
pub mod transfer;

use std::sync::Arc;

use crate::pool::attach::Attacher;
use crate::pool::cbt::{self, Query};
use crate::pool::locks::{Guard, Locks};
use crate::pool::{
    self, Condition, NodeToken, Pool, Provisioning, Snapshot, SnapshotId, Volume, VolumeId,
    VolumeSpec, size,
};

pub use group::GROUP_HOLD_DEADLINE;

/// How long a drop of a replica waits for a point being received (a delta takes
/// seconds); well within the controller's call timeout.
pub const DROP_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// This node's pool, its attachments, and its per-volume locks.
#[derive(Clone)]
pub struct Local {
    pool: Arc<Pool>,
    attacher: Arc<Attacher>,
    node_id: String,
    locks: Locks,
    holds: group::Holds,
    /// How shipping to each replica goes (this node's replicated volumes).
    replicas: replication::States,
}

impl Local {
    pub fn new(pool: Arc<Pool>, attacher: Arc<Attacher>, node_id: &str) -> Self {
        Local {
            pool,
            attacher,
            node_id: node_id.to_owned(),
            locks: Locks::default(),
            holds: group::Holds::default(),
            replicas: replication::States::default(),
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn attacher(&self) -> &Arc<Attacher> {
        &self.attacher
    }

    /// The CO's name for this node.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn token(&self) -> &NodeToken {
        self.pool.node()
    }

    /// Takes the lock on every key, or none.
    fn lock(&self, keys: &[String]) -> pool::Result<Vec<Guard>> {
        keys.iter()
            .map(|key| {
                self.locks.try_acquire(key).ok_or_else(|| {
                    pool::Error::Busy(format!("an operation on {key} is already in progress"))
                })
            })
            .collect()
    }

    /// Runs `work` on the pool off the async threads, holding the locks on `keys`
    /// until it is done.
    pub async fn on_pool<T: Send + 'static>(
        &self,
        keys: &[String],
        work: impl FnOnce(&Pool) -> pool::Result<T> + Send + 'static,
    ) -> pool::Result<T> {
        on(self.lock(keys)?, Arc::clone(&self.pool), work).await
    }

    /// [`Local::on_pool`] for work on the attachments.
    pub async fn on_attacher<T: Send + 'static>(
        &self,
        keys: &[String],
        work: impl FnOnce(&Attacher) -> pool::Result<T> + Send + 'static,
    ) -> pool::Result<T> {
        on(self.lock(keys)?, Arc::clone(&self.attacher), work).await
    }

    // ---- What the controller asks of this node (see `agent::Pools`) ----

    /// The volume a create with this name made here, if any.
    pub async fn find_volume(&self, name: String) -> pool::Result<Option<Volume>> {
        let id = VolumeId::derive(&name, self.token());
        self.on_pool(&[], move |p| found(p.volume(&id))).await
    }

    pub async fn create_volume(&self, spec: VolumeSpec) -> pool::Result<Volume> {
        let id = VolumeId::derive(&spec.name, self.token());
        // The source is read while the new volume is filled: no stage, expand,
        // snapshot or delete of it meanwhile.
        let mut keys = vec![id.to_string()];
        keys.extend(spec.source.as_ref().map(|s| s.id().to_owned()));
        self.on_pool(&keys, move |p| p.create_volume(&spec)).await
    }

    pub async fn delete_volume(&self, id: VolumeId) -> pool::Result<()> {
        self.on_pool(&[id.to_string()], move |p| p.delete_volume(&id))
            .await
    }

    pub async fn volume(&self, id: VolumeId) -> pool::Result<(Volume, Condition)> {
        let states = self.replicas.clone();
        self.on_pool(&[], move |p| {
            let found = p.volume_status(&id)?;
            Ok(with_replication(p, found, &states))
        })
        .await
    }

    /// At most `limit` volumes at or after `from`, in ID order.
    pub async fn list_volumes(
        &self,
        from: Option<VolumeId>,
        limit: usize,
    ) -> pool::Result<Vec<(Volume, Condition)>> {
        let states = self.replicas.clone();
        self.on_pool(&[], move |p| {
            Ok(p.list_volumes(from.as_ref(), limit)
                .into_iter()
                .map(|found| with_replication(p, found, &states))
                .collect())
        })
        .await
    }

    /// What this node holds of another node's volume or snapshot.
    pub async fn find_replica(
        &self,
        source: pool::ContentSource,
    ) -> pool::Result<Option<replication::Found>> {
        self.on_pool(&[], move |p| {
            Ok(match &source {
                pool::ContentSource::Volume(id) => p.replica(id)?.and_then(|r| {
                    let point = r.point?;
                    Some(replication::Found {
                        point: point.number,
                        taken: Some(point.taken),
                        size_bytes: point.size_bytes,
                    })
                }),
                pool::ContentSource::Snapshot(id) => {
                    p.replica_snapshot(id)?.map(|s| replication::Found {
                        point: 0,
                        taken: Some(s.created),
                        size_bytes: s.size_bytes,
                    })
                }
            })
        })
        .await
    }

    /// Removes this node's copy of another node's volume or snapshot; answers whether
    /// there was one. A point being received holds the volume's lock: the drop waits
    /// for it (up to [`DROP_WAIT`]) rather than fail busy, since the controller does
    /// not ask again and the copy would stay for good.
    pub async fn drop_replica(
        &self,
        source: pool::ContentSource,
        tombstone: bool,
    ) -> pool::Result<bool> {
        let keys = [source.id().to_owned()];
        let started = std::time::Instant::now();
        let guards = loop {
            match self.lock(&keys) {
                Err(pool::Error::Busy(_)) if started.elapsed() < DROP_WAIT => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                locked => break locked?,
            }
        };
        on(guards, Arc::clone(&self.pool), move |p| match &source {
            pool::ContentSource::Volume(id) => p.drop_replica(id, tombstone),
            pool::ContentSource::Snapshot(id) => p.drop_replica_snapshot(id, tombstone),
        })
        .await
    }

    /// How shipping to each replica goes.
    pub fn replica_states(&self) -> &replication::States {
        &self.replicas
    }

    /// Gives a volume the replication asked for, its copies on `nodes`.
    pub async fn set_replication(
        &self,
        id: VolumeId,
        wanted: Option<(u8, u64)>,
        nodes: Vec<String>,
    ) -> pool::Result<Volume> {
        self.on_pool(&[id.to_string()], move |p| {
            p.set_replication(&id, wanted, &nodes)
        })
        .await
    }

    pub async fn expand_volume(
        &self,
        id: VolumeId,
        range: size::Range,
    ) -> pool::Result<(Volume, bool)> {
        self.on_pool(&[id.to_string()], move |p| p.expand_volume(&id, range))
            .await
    }

    pub async fn modify_volume(
        &self,
        id: VolumeId,
        provisioning: Provisioning,
    ) -> pool::Result<(Volume, bool)> {
        self.on_pool(&[id.to_string()], move |p| {
            p.modify_volume(&id, provisioning)
        })
        .await
    }

    /// Bytes a new volume may take here now.
    pub async fn available(&self, provisioning: Provisioning) -> pool::Result<u64> {
        self.on_pool(&[], move |p| p.available(provisioning)).await
    }

    /// The largest volume the pool could ever hold, full or empty.
    pub async fn maximum(&self, provisioning: Provisioning) -> pool::Result<u64> {
        self.on_pool(&[], move |p| p.maximum(provisioning)).await
    }

    /// Whether the pool is usable.
    pub async fn probe(&self) -> pool::Result<()> {
        self.on_pool(&[], |p| p.probe()).await
    }

    /// The snapshot a create with this name made here, if any.
    pub async fn find_snapshot(&self, name: String) -> pool::Result<Option<Snapshot>> {
        let id = SnapshotId::derive(&name, self.token());
        self.on_pool(&[], move |p| found(p.snapshot(&id))).await
    }

    pub async fn create_snapshot(&self, name: String, source: VolumeId) -> pool::Result<Snapshot> {
        let id = SnapshotId::derive(&name, self.token());
        self.on_pool(&[id.to_string(), source.to_string()], move |p| {
            p.create_snapshot(&name, &source)
        })
        .await
    }

    pub async fn delete_snapshot(&self, id: SnapshotId) -> pool::Result<()> {
        self.on_pool(&[id.to_string()], move |p| p.delete_snapshot(&id))
            .await
    }

    pub async fn snapshot(&self, id: SnapshotId) -> pool::Result<Snapshot> {
        self.on_pool(&[], move |p| p.snapshot(&id)).await
    }

    /// At most `limit` snapshots (of `source` only, if given) at or after `from`, in
    /// ID order.
    pub async fn list_snapshots(
        &self,
        from: Option<SnapshotId>,
        limit: usize,
        source: Option<VolumeId>,
    ) -> pool::Result<Vec<Snapshot>> {
        self.on_pool(&[], move |p| {
            Ok(p.list_snapshots(from.as_ref(), limit, source.as_ref()))
        })
        .await
    }

    /// Starts listing the ranges `query` asks for, from `start`, at most `max` (0:
    /// kura's default) a batch. The snapshots are checked and pinned before this
    /// returns, so a refusal is an error here, not in the stream; the work runs off
    /// the async threads, a batch ahead of the reader at most, and stops when the
    /// receiver is dropped (the client went away), which unpins.
    pub async fn snapshot_ranges(
        &self,
        query: Query,
        start: u64,
        max: usize,
    ) -> pool::Result<RangeStream> {
        let pool = Arc::clone(&self.pool);
        let (pins, capacity) = run(Vec::new(), move || match &query {
            Query::Allocated(id) => {
                let pinned = pool.pin_snapshot(id)?;
                let capacity = cbt::check_start(&pinned.snapshot, start)?;
                Ok((vec![pinned], capacity))
            }
            Query::Delta { base, target } => {
                let base = pool.pin_snapshot(base)?;
                let target = pool.pin_snapshot(target)?;
                let capacity = cbt::check_delta(&base.snapshot, &target.snapshot, start)?;
                Ok((vec![base, target], capacity))
            }
        })
        .await?;
        let (sender, batches) = tokio::sync::mpsc::channel(1);
        let pool = Arc::clone(&self.pool);
        tokio::task::spawn_blocking(move || {
            let failed = sender.clone();
            let mut out = cbt::Batcher::new(start, capacity, max, |batch| {
                let taken = sender.blocking_send(Ok(batch)).is_ok();
                // Tests hold a stream here, its snapshots pinned, mid-way.
                pool.pause_at("snapshot-ranges-sent");
                taken
            });
            let result = match pins.as_slice() {
                [pinned] => cbt::allocated(pinned, &mut out).map(|()| None),
                [base, target] => cbt::delta(base, target, &mut out).map(Some),
                _ => unreachable!("one snapshot or two"),
            };
            let stopped = out.stopped();
            drop(out);
            if let Ok(Some(method)) = result {
                pool.deltas.record(method);
            }
            match result {
                Ok(method) => tracing::debug!(
                    snapshot.id = %pins[pins.len() - 1].snapshot.id,
                    method = method.map_or("allocated", cbt::Method::as_str),
                    stopped,
                    "snapshot ranges listed"
                ),
                Err(e) => {
                    let _ = failed.blocking_send(Err(e));
                }
            }
        });
        Ok(RangeStream { capacity, batches })
    }
}

/// The ranges a [`Local::snapshot_ranges`] lists: the volume's capacity, then the
/// batches as they are found; an error ends the stream.
pub struct RangeStream {
    pub capacity: u64,
    pub batches: tokio::sync::mpsc::Receiver<pool::Result<Vec<cbt::Range>>>,
}

/// A volume's condition with its replication's: a volume healthy on its own is
/// degraded when its copies are missing or behind.
fn with_replication(
    pool: &Pool,
    (volume, condition): (Volume, Condition),
    states: &replication::States,
) -> (Volume, Condition) {
    let (mut volume, condition) = (volume, condition);
    let Some(r) = &mut volume.replication else {
        return (volume, condition);
    };
    r.full = r
        .nodes()
        .filter(|n| states.get(&volume.id, n).full)
        .map(str::to_owned)
        .collect();
    if condition.abnormal {
        return (volume, condition);
    }
    let points = pool.points(&volume.id).unwrap_or_default();
    let condition = replication::condition(&volume, &points, states).unwrap_or(condition);
    (volume, condition)
}

/// Runs `work` on `target` off the async threads, holding `guards` until it is done.
async fn on<S: Send + Sync + 'static, T: Send + 'static>(
    guards: Vec<Guard>,
    target: Arc<S>,
    work: impl FnOnce(&S) -> pool::Result<T> + Send + 'static,
) -> pool::Result<T> {
    run(guards, move || work(&target)).await
}

/// Runs blocking work off the async threads. The guards move into the work, so a lock
/// is held until the work is done even if the caller gives up waiting.
async fn run<T: Send + 'static>(
    guards: Vec<Guard>,
    work: impl FnOnce() -> pool::Result<T> + Send + 'static,
) -> pool::Result<T> {
    let task = tokio::task::spawn_blocking(move || {
        let result = work();
        drop(guards);
        result
    });
    match task.await {
        Ok(result) => result,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// An object that may not exist: `None` rather than NotFound.
fn found<T>(result: pool::Result<T>) -> pool::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(pool::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}
