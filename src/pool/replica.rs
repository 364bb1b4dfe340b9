//! Replicas, both ends, in pool terms: the consistent points a replicated volume's
//! node takes and keeps (source), and the copies of those points another node holds
//! (replica). How points travel between nodes is in `node::replication`.
//!
//! # Source
//!
//! A volume that asks for copies carries a [`Replication`] in its metadata: how many,
//! how often, and the nodes placed to hold them, each with the secret its reading
//! grants are made from. At every interval the node takes a **point**: the image made
//! consistent exactly as for a snapshot (freeze or flush) and reflinked to
//! `replication/<volume-id>/point-<n>.img`. `state.json` beside the points says which
//! exist and which point each replica holds; a point is kept while it is the newest
//! or the one a replica holds (the base its next delta is computed from).
//!
//! # Replica
//!
//! `replicas/<volume-id>/record.json` says what this node holds of another node's
//! volume: the volume's record as last shipped, the committed point, and copies of
//! the volume's snapshots. A point arrives as a `.partial` file: a reflink of the
//! previous point with the changed ranges written over it (or, the first time, a
//! sparse file with every range that holds data), checked against the source's digest,
//! synced, renamed to `point-<n>.img`, and only then named in the record. The record's
//! point is always whole; anything else in the directory is removed at start-up.
//!
//! # Grants
//!
//! A replica node reads points with a grant the volume's node made for it:
//! `<expires>.<HMAC-SHA256(secret, volume, node, expires)>`, where the secret is the
//! one placement recorded for that node. A node holds no secret and gets a grant only
//! while it is placed, so it can read only what it holds a replica of; a grant is
//! refused once it expires, once its node is no longer placed, or if it was not made
//! from the secret.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::cbt::{self, ImageOrigin};
use super::encryption::Encryption;
use super::ids::{SnapshotId, VolumeId};
use super::transfer::{Chain, Chunk};
use super::volume::{ContentSource, Volume};
use super::{Error, Pool, Result, Snapshot, Timestamp, partial_path, read_meta, write_meta};
use crate::sys;

/// At most this many copies of a volume on other nodes.
pub const MAX_COPIES: u8 = 2;
/// The shortest interval between points, in seconds.
pub const MIN_INTERVAL_SECS: u64 = 5;
/// The interval when a volume asks for copies and names none, in seconds.
pub const DEFAULT_INTERVAL_SECS: u64 = 30;

/// What a volume asks of replication, and where its copies are placed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replication {
    /// Copies asked for, 1 to [`MAX_COPIES`].
    pub copies: u8,
    /// Seconds between points.
    pub interval_secs: u64,
    /// The nodes placed to hold a copy; fewer than `copies` when no more could be.
    #[serde(default)]
    pub replicas: Vec<Placement>,
    /// Placed nodes whose last round failed for want of space (what the volume's node
    /// saw lately; not stored).
    #[serde(skip)]
    pub full: Vec<String>,
}

/// One node placed to hold a copy, and the secret its grants are made from.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub node: String,
    pub secret: String,
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secrets are never logged.
        let nodes: Vec<&str> = self.replicas.iter().map(|p| p.node.as_str()).collect();
        f.debug_struct("Replication")
            .field("copies", &self.copies)
            .field("interval_secs", &self.interval_secs)
            .field("replicas", &nodes)
            .field("full", &self.full)
            .finish()
    }
}

impl Replication {
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.replicas.iter().map(|p| p.node.as_str())
    }
}

/// Why a read of a point was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

type HmacSha256 = Hmac<Sha256>;

fn grant_mac(secret: &str, volume: &VolumeId, node: &str, expires: i64) -> HmacSha256 {
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(format!("kura replica grant v1\n{volume}\n{node}\n{expires}").as_bytes());
    mac
}

/// The grant that lets `node` read points of `volume` until `expires` (Unix seconds).
pub fn grant(secret: &str, volume: &VolumeId, node: &str, expires: i64) -> String {
    let tag = grant_mac(secret, volume, node, expires)
        .finalize()
        .into_bytes();
    format!("{expires}.{}", hex(&tag))
}

/// Checks a grant presented by `node` for `volume` against the volume's placements.
pub fn check_grant(
    volume: &VolumeId,
    replication: Option<&Replication>,
    node: &str,
    grant: &str,
    now: i64,
) -> std::result::Result<(), Denied> {
    let placement = replication
        .and_then(|r| r.replicas.iter().find(|p| p.node == node))
        .ok_or_else(|| Denied(format!("node {node:?} holds no replica of volume {volume}")))?;
    let invalid = || Denied(format!("the grant for volume {volume} is not valid"));
    let (expires, tag) = grant.split_once('.').ok_or_else(invalid)?;
    let expires: i64 = expires.parse().map_err(|_| invalid())?;
    let tag = unhex(tag).ok_or_else(invalid)?;
    grant_mac(&placement.secret, volume, node, expires)
        .verify_slice(&tag)
        .map_err(|_| invalid())?;
    if expires < now {
        return Err(Denied(format!(
            "the grant for volume {volume} expired {}s ago",
            now - expires
        )));
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A new placement secret: 256 random bits.
fn new_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// A point the source took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointInfo {
    pub taken: Timestamp,
    pub size_bytes: u64,
}

/// What a replica node holds, as its node last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipped {
    pub point: u64,
    /// When that point was taken: the replica's data is this old.
    pub taken: Timestamp,
    /// The snapshots of the volume it holds copies of.
    #[serde(default)]
    pub snapshots: BTreeSet<SnapshotId>,
}

/// The source's `state.json`: the points that exist and what each replica holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Points {
    /// The number of the next point.
    pub next: u64,
    pub points: BTreeMap<u64, PointInfo>,
    /// By replica node.
    pub shipped: BTreeMap<String, Shipped>,
}

impl Points {
    /// The newest point, if any.
    pub fn newest(&self) -> Option<(u64, PointInfo)> {
        self.points.iter().next_back().map(|(n, p)| (*n, *p))
    }
}

/// What a replica is asked to receive.
#[derive(Debug, Clone)]
pub enum Target {
    /// Point `number` of the volume, taken at `taken`.
    Point { number: u64, taken: Timestamp },
    /// A copy of one of the volume's snapshots.
    Snapshot(Snapshot),
}

/// A replica node's record of one volume of another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// The volume's record as its node last described it.
    pub volume: Volume,
    /// The CO's name of the volume's node, and the ID of its pool then: a node of that
    /// name with another pool is not the one that placed this copy.
    pub source_node: String,
    #[serde(default)]
    pub source_pool: String,
    pub point: Option<Committed>,
    #[serde(default)]
    pub snapshots: BTreeMap<SnapshotId, Snapshot>,
    /// The volume was deleted while its node was down: its node deletes its copy
    /// when it comes back (a tombstone; the points are gone).
    #[serde(default)]
    pub deleted: bool,
    /// Snapshots deleted while the volume's node was down, likewise.
    #[serde(default)]
    pub deleted_snapshots: BTreeSet<SnapshotId>,
}

/// A point a replica holds whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    pub number: u64,
    pub taken: Timestamp,
    pub committed: Timestamp,
    pub size_bytes: u64,
    /// The transfer digest it was checked against.
    pub digest: String,
}

impl Pool {
    // ---- Source: the volume's node ----

    fn replication_dir(&self, id: &VolumeId) -> PathBuf {
        self.root.join("replication").join(id.as_str())
    }

    /// The image of point `number` of a volume (whether or not it exists).
    pub fn point_image(&self, id: &VolumeId, number: u64) -> PathBuf {
        self.replication_dir(id).join(format!("point-{number}.img"))
    }

    fn points_path(&self, id: &VolumeId) -> PathBuf {
        self.replication_dir(id).join("state.json")
    }

    /// The points of a replicated volume and what each replica holds.
    pub fn points(&self, id: &VolumeId) -> Result<Points> {
        Ok(read_meta(&self.points_path(id))?.unwrap_or_default())
    }

    /// The volumes of this node that are replicated: those with a replication
    /// directory (made by [`Pool::set_replication`], removed with the volume).
    pub fn replicated_volumes(&self) -> Result<Vec<VolumeId>> {
        let dir = self.root.join("replication");
        let mut ids: Vec<VolumeId> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .flatten()
                .filter_map(|e| VolumeId::parse(e.file_name().to_str()?))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(e) => return Err(sys::Error::io("read_dir", &dir, e).into()),
        };
        ids.sort();
        Ok(ids)
    }

    /// Gives a volume the replication asked for (`None`: none) with its copies on
    /// `nodes`: a node kept keeps its secret, a node added gets a new one, a node
    /// dropped loses its grants at once. Returns the volume as it is now.
    pub fn set_replication(
        &self,
        id: &VolumeId,
        wanted: Option<(u8, u64)>,
        nodes: &[String],
    ) -> Result<Volume> {
        let mut volume = self.volume(id)?;
        let replication = match wanted {
            None => None,
            Some((copies, interval_secs)) => {
                let old = volume.replication.as_ref();
                let replicas = nodes
                    .iter()
                    .map(|node| Placement {
                        node: node.clone(),
                        secret: old
                            .and_then(|r| r.replicas.iter().find(|p| &p.node == node))
                            .map_or_else(new_secret, |p| p.secret.clone()),
                    })
                    .collect();
                Some(Replication {
                    copies,
                    interval_secs,
                    replicas,
                    full: vec![],
                })
            }
        };
        if volume.replication == replication {
            return Ok(volume);
        }
        let dir = self.replication_dir(id);
        if replication.is_some() {
            std::fs::create_dir_all(&dir).map_err(|e| sys::Error::io("mkdir", &dir, e))?;
        }
        volume.replication = replication;
        self.write_volume(&volume)?;
        match &volume.replication {
            None => self.remove_points(id)?,
            Some(r) => {
                // What a dropped node held is no base for anything any more.
                let mut points = self.points(id)?;
                points
                    .shipped
                    .retain(|node, _| r.nodes().any(|n| n == node));
                self.write_points(id, &points)?;
            }
        }
        tracing::info!(volume.id = %id, replication = ?volume.replication, "replication set");
        Ok(volume)
    }

    fn write_points(&self, id: &VolumeId, points: &Points) -> Result<()> {
        write_meta(&self.points_path(id), points)?;
        self.prune_points(id, points)
    }

    /// Removes every point of a volume and its replication directory.
    pub(super) fn remove_points(&self, id: &VolumeId) -> Result<()> {
        let dir = self.replication_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(sys::Error::io("remove", &dir, e).into()),
        }
    }

    /// Removes the point files `points` no longer needs: all but the newest and those
    /// a replica holds.
    fn prune_points(&self, id: &VolumeId, points: &Points) -> Result<()> {
        let keep: BTreeSet<u64> = points
            .newest()
            .map(|(n, _)| n)
            .into_iter()
            .chain(points.shipped.values().map(|s| s.point))
            .collect();
        for path in entries(&self.replication_dir(id))? {
            let number = point_number(&path);
            let stale = match number {
                Some(n) => !keep.contains(&n) || !points.points.contains_key(&n),
                None => path.extension().is_some_and(|x| x == "partial"),
            };
            if stale {
                self.remove_image(&path)?;
            }
        }
        Ok(())
    }

    /// Takes the next point of a replicated volume: made consistent as for a
    /// snapshot, then reflinked. Holds the volume still only for the reflink.
    pub fn take_point(&self, id: &VolumeId) -> Result<(u64, PointInfo)> {
        let volume = self.volume(id)?;
        if volume.replication.is_none() {
            return Err(Error::Precondition(format!(
                "volume {id} is not replicated"
            )));
        }
        if !self.reflink {
            return Err(Error::Precondition(
                "points are reflinks, and this node's pool cannot reflink".to_owned(),
            ));
        }
        let mut points = self.points(id)?;
        let number = points.next.max(1);
        let image = self.point_image(id, number);
        let partial = partial_path(&image);
        let source = self.image_path(id);
        let taken = {
            let _quiesced = self.quiesce(&source)?;
            let taken = Timestamp::now();
            sys::fs::reflink(&source, &partial).map(|()| taken)
        };
        let taken = taken
            .and_then(|taken| sys::fs::rename(&partial, &image).map(|()| taken))
            .inspect_err(|_| {
                let _ = sys::fs::remove(&partial);
            })?;
        let info = PointInfo {
            taken,
            size_bytes: volume.size_bytes,
        };
        let previous = points.newest().map(|(n, _)| n);
        points.next = number + 1;
        points.points.insert(number, info);
        // Kept: the new point, what each replica holds, and the point before, which a
        // replica may hold without this node having heard so (its answer lost, or
        // this node stopped before recording it): its next delta starts there.
        let held: BTreeSet<u64> = points.shipped.values().map(|s| s.point).collect();
        points
            .points
            .retain(|n, _| *n == number || Some(*n) == previous || held.contains(n));
        self.write_points(id, &points)?;
        Ok((number, info))
    }

    /// Records what a replica node holds now.
    pub fn record_shipped(&self, id: &VolumeId, node: &str, shipped: Shipped) -> Result<()> {
        let mut points = self.points(id)?;
        points.shipped.insert(node.to_owned(), shipped);
        let held: BTreeSet<u64> = points.shipped.values().map(|s| s.point).collect();
        let newest = points.newest().map(|(n, _)| n);
        points
            .points
            .retain(|n, _| Some(*n) == newest || held.contains(n));
        self.write_points(id, &points)
    }

    /// Opens what a replica node asks to read: point `number`, or a snapshot of the
    /// volume, after checking its grant. Answers the image and its size.
    pub fn open_for_replica(
        &self,
        id: &VolumeId,
        node: &str,
        grant: &str,
        target: &ReadTarget,
    ) -> Result<std::result::Result<cbt::Image, Denied>> {
        let volume = self.volume(id)?;
        if let Err(denied) = check_grant(
            id,
            volume.replication.as_ref(),
            node,
            grant,
            Timestamp::now().seconds,
        ) {
            return Ok(Err(denied));
        }
        let (path, size) = match target {
            ReadTarget::Point(number) => {
                let points = self.points(id)?;
                let info = points.points.get(number).ok_or_else(|| Error::NotFound {
                    kind: "point",
                    id: format!("{id}/{number}"),
                })?;
                (self.point_image(id, *number), info.size_bytes)
            }
            ReadTarget::Snapshot(snapshot) => {
                let snapshot = self.snapshot(snapshot)?;
                if snapshot.source_volume != *id || !snapshot.ready {
                    return Err(Error::NotFound {
                        kind: "snapshot",
                        id: snapshot.id.to_string(),
                    });
                }
                (self.snapshot_image_path(&snapshot.id), snapshot.size_bytes)
            }
        };
        let image = cbt::Image::open(path, size, ImageOrigin::Reflink)?;
        image.map(Ok).ok_or_else(|| Error::NotFound {
            kind: "point",
            id: format!("{id}"),
        })
    }

    /// Whether this node still wants `node` to hold a copy of `id`: the volume exists
    /// here and its replication places `node`.
    pub fn replica_placed(&self, id: &VolumeId, node: &str) -> Result<bool> {
        match self.volume(id) {
            Ok(volume) => Ok(volume
                .replication
                .is_some_and(|r| r.nodes().any(|n| n == node))),
            Err(Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The base a delta to a replica is computed from: point `number`, if this node
    /// still has it.
    pub fn open_base_point(&self, id: &VolumeId, number: u64) -> Result<Option<cbt::Image>> {
        let points = self.points(id)?;
        match points.points.get(&number) {
            None => Ok(None),
            Some(info) => cbt::Image::open(
                self.point_image(id, number),
                info.size_bytes,
                ImageOrigin::Reflink,
            ),
        }
    }

    // ---- Replica: a node that holds copies of another node's volume ----

    fn replica_dir(&self, id: &VolumeId) -> PathBuf {
        self.root.join("replicas").join(id.as_str())
    }

    fn replica_record_path(&self, id: &VolumeId) -> PathBuf {
        self.replica_dir(id).join("record.json")
    }

    fn replica_point_image(&self, id: &VolumeId, number: u64) -> PathBuf {
        self.replica_dir(id).join(format!("point-{number}.img"))
    }

    fn replica_snapshot_image(&self, id: &VolumeId, snapshot: &SnapshotId) -> PathBuf {
        self.replica_dir(id)
            .join(format!("snapshot-{snapshot}.img"))
    }

    /// What this node holds of another node's volume, if anything.
    pub fn replica(&self, id: &VolumeId) -> Result<Option<ReplicaRecord>> {
        read_meta(&self.replica_record_path(id))
    }

    /// The volumes of other nodes with a replica directory here, each with it.
    fn replica_dirs(&self) -> Result<Vec<(VolumeId, PathBuf)>> {
        Ok(entries(&self.root.join("replicas"))?
            .into_iter()
            .filter_map(|path| {
                let id = VolumeId::parse(path.file_name()?.to_str()?)?;
                Some((id, path))
            })
            .collect())
    }

    /// Every record of a replica this node holds (tombstones included).
    pub fn replicas(&self) -> Result<Vec<ReplicaRecord>> {
        let mut out = Vec::new();
        for (id, _) in self.replica_dirs()? {
            if let Some(record) = self.replica(&id)? {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn write_replica(&self, record: &ReplicaRecord) -> Result<()> {
        write_meta(&self.replica_record_path(&record.volume.id), record)
    }

    /// Starts receiving `target` of `volume` from its node: a reflink of the
    /// committed point `base` (a delta), or an empty file (`base` none: every range
    /// that holds data comes). A volume deleted while its node was down is refused.
    pub fn begin_replica(
        &self,
        volume: &Volume,
        (source_node, source_pool): (&str, &str),
        target: Target,
        size_bytes: u64,
        base: Option<u64>,
    ) -> Result<Incoming> {
        let id = &volume.id;
        if self.is_local(&id.node()) {
            return Err(Error::Invalid {
                field: "volume",
                reason: format!("volume {id} is this node's own"),
            });
        }
        let record = self.replica(id)?;
        if record.as_ref().is_some_and(|r| r.deleted) {
            return Err(Error::Precondition(format!(
                "volume {id} was deleted while its node was down"
            )));
        }
        let committed = record.as_ref().and_then(|r| r.point.as_ref());
        let final_path = match &target {
            Target::Point { number, .. } => self.replica_point_image(id, *number),
            Target::Snapshot(s) => self.replica_snapshot_image(id, &s.id),
        };
        let dir = self.replica_dir(id);
        std::fs::create_dir_all(&dir).map_err(|e| sys::Error::io("mkdir", &dir, e))?;
        let partial = partial_path(&final_path);
        let _ = sys::fs::remove(&partial);
        match base {
            Some(number) => {
                if committed.map(|c| c.number) != Some(number) {
                    return Err(Error::Precondition(format!(
                        "volume {id}: point {number} is not the point this node holds"
                    )));
                }
                sys::fs::reflink(&self.replica_point_image(id, number), &partial)
                    .and_then(|()| sys::fs::grow_image(&partial, size_bytes, false))
                    .map_err(|e| no_space(e, &partial, 0))?;
            }
            None => sys::fs::create_image(&partial, size_bytes, false)
                .map_err(|e| no_space(e, &partial, 0))?,
        }
        let file = OpenOptions::new()
            .write(true)
            .open(&partial)
            .map_err(|e| sys::Error::io("open", &partial, e))?;
        Ok(Incoming {
            volume: volume.clone(),
            source_node: source_node.to_owned(),
            source_pool: source_pool.to_owned(),
            target,
            delta: base.is_some(),
            size_bytes,
            chain: Chain::start(size_bytes),
            file,
            partial,
            final_path,
            bytes_written: 0,
            done: false,
        })
    }

    /// Keeps only the snapshot copies of `id` whose snapshots are in `keep` (the
    /// volume's snapshots now), besides those kept as tombstones.
    pub fn keep_replica_snapshots(&self, id: &VolumeId, keep: &BTreeSet<SnapshotId>) -> Result<()> {
        let Some(mut record) = self.replica(id)? else {
            return Ok(());
        };
        let gone: Vec<SnapshotId> = record
            .snapshots
            .keys()
            .filter(|s| !keep.contains(*s))
            .cloned()
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        for snapshot in &gone {
            record.snapshots.remove(snapshot);
        }
        self.write_replica(&record)?;
        for snapshot in &gone {
            self.remove_image(&self.replica_snapshot_image(id, snapshot))?;
        }
        Ok(())
    }

    /// Removes what this node holds of a volume. With `tombstone` (the volume was
    /// deleted while its node was down) the record stays, marked deleted, with the
    /// volume's snapshot copies, which outlive it as snapshots do; without (the copy
    /// was moved or replication turned off) everything goes. Answers whether there
    /// was anything.
    pub fn drop_replica(&self, id: &VolumeId, tombstone: bool) -> Result<bool> {
        let Some(mut record) = self.replica(id)? else {
            return Ok(false);
        };
        if !tombstone {
            let dir = self.replica_dir(id);
            std::fs::remove_dir_all(&dir).map_err(|e| sys::Error::io("remove", &dir, e))?;
            tracing::info!(volume.id = %id, "replica removed");
            return Ok(true);
        }
        let point = record.point.take();
        record.deleted = true;
        self.write_replica(&record)?;
        if let Some(point) = point {
            self.remove_image(&self.replica_point_image(id, point.number))?;
        }
        tracing::info!(volume.id = %id, "replica removed; the volume's deletion is recorded");
        Ok(true)
    }

    /// The copy of another node's snapshot this node holds, if any.
    pub fn replica_snapshot(&self, snapshot: &SnapshotId) -> Result<Option<Snapshot>> {
        Ok(self
            .replicas()?
            .into_iter()
            .find_map(|mut r| r.snapshots.remove(snapshot)))
    }

    /// Removes the copy of a snapshot; with `tombstone` (deleted while its volume's
    /// node was down) records the deletion for that node. Answers whether this node
    /// held one.
    pub fn drop_replica_snapshot(&self, snapshot: &SnapshotId, tombstone: bool) -> Result<bool> {
        for mut record in self.replicas()? {
            if record.snapshots.remove(snapshot).is_some() {
                if tombstone {
                    record.deleted_snapshots.insert(snapshot.clone());
                }
                self.write_replica(&record)?;
                self.remove_image(&self.replica_snapshot_image(&record.volume.id, snapshot))?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Forgets the snapshot tombstones its node has acted on: those of snapshots it
    /// no longer offers (`offered`: the ones it has now).
    pub fn forget_snapshot_tombstones(
        &self,
        id: &VolumeId,
        offered: &BTreeSet<SnapshotId>,
    ) -> Result<()> {
        let Some(mut record) = self.replica(id)? else {
            return Ok(());
        };
        let before = record.deleted_snapshots.len();
        record.deleted_snapshots.retain(|s| offered.contains(s));
        if record.deleted_snapshots.len() != before {
            self.write_replica(&record)?;
        }
        Ok(())
    }

    /// The image, size and encryption a content source provides from a replica this
    /// node holds: the newest whole point of a volume, or a snapshot's copy.
    pub(super) fn replica_source(
        &self,
        source: &ContentSource,
    ) -> Result<Option<(PathBuf, u64, Encryption)>> {
        match source {
            ContentSource::Volume(id) => Ok(self.replica(id)?.and_then(|r| {
                let point = r.point?;
                Some((
                    self.replica_point_image(id, point.number),
                    point.size_bytes,
                    r.volume.encryption,
                ))
            })),
            ContentSource::Snapshot(snapshot) => {
                for record in self.replicas()? {
                    if let Some(s) = record.snapshots.get(snapshot) {
                        return Ok(Some((
                            self.replica_snapshot_image(&record.volume.id, snapshot),
                            s.size_bytes,
                            s.encryption,
                        )));
                    }
                }
                Ok(None)
            }
        }
    }

    /// Start-up: every replica directory holds its record's point and snapshot copies
    /// and nothing else; every point directory of the source holds what its state
    /// names, and belongs to a volume that exists.
    pub(super) fn recover_replicas(&self) -> Result<()> {
        for (id, path) in self.replica_dirs()? {
            let record = self.replica(&id)?;
            for file in entries(&path)? {
                let name = file.file_name().unwrap_or_default().to_string_lossy();
                let kept = match &record {
                    None => false,
                    Some(r) => {
                        name == "record.json"
                            || r.point
                                .as_ref()
                                .is_some_and(|p| file == self.replica_point_image(&id, p.number))
                            || r.snapshots
                                .keys()
                                .any(|s| file == self.replica_snapshot_image(&id, s))
                    }
                };
                if !kept {
                    tracing::warn!(path = %file.display(), "removing leftover of an interrupted replica commit");
                    self.remove_image(&file)?;
                }
            }
            if record.is_none() {
                let _ = std::fs::remove_dir(&path);
            }
        }
        for id in self.replicated_volumes()? {
            match self.volume(&id) {
                Ok(v) if v.replication.is_some() => {
                    let points = self.points(&id)?;
                    self.prune_points(&id, &points)?;
                }
                Ok(_) | Err(Error::NotFound { .. }) => self.remove_points(&id)?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Changed ranges closer than this are shipped as one: the unchanged bytes between
/// them travel too, but the source reads one run instead of many small ones (random
/// 4 KiB writes leave thousands of ranges, and reading them one by one at queue depth
/// one is what a round's time would go to).
pub const SHIP_GAP: u64 = 256 << 10;

/// The ranges a delta ships: the changed ones, joined across gaps up to [`SHIP_GAP`].
pub fn shipped_ranges(changed: &[cbt::Range]) -> Vec<cbt::Range> {
    let mut out: Vec<cbt::Range> = Vec::new();
    for &(start, end) in changed {
        match out.last_mut() {
            Some(last) if start <= last.1 + SHIP_GAP => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

/// What a replica node reads from a volume's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadTarget {
    Point(u64),
    Snapshot(SnapshotId),
}

/// A point or snapshot copy being received; removed unless committed.
pub struct Incoming {
    volume: Volume,
    source_node: String,
    source_pool: String,
    target: Target,
    delta: bool,
    size_bytes: u64,
    chain: Chain,
    file: File,
    partial: PathBuf,
    final_path: PathBuf,
    bytes_written: u64,
    done: bool,
}

impl Incoming {
    /// Writes one checked chunk: in a delta, its whole range is replaced (what is not
    /// data in it reads as zeros after).
    pub fn apply(&mut self, chunk: &Chunk) -> Result<()> {
        chunk.verify().map_err(Error::Damaged)?;
        if chunk.offset + chunk.length > self.size_bytes {
            return Err(Error::Damaged(format!(
                "chunk at {} runs past the image's {} bytes",
                chunk.offset, self.size_bytes
            )));
        }
        self.chain.add(chunk);
        if self.delta && chunk.length > 0 {
            sys::fs::punch_hole(&self.file, &self.partial, chunk.offset, chunk.length)
                .map_err(|e| no_space(e, &self.partial, 0))?;
        }
        let mut at = 0usize;
        for &(offset, length) in &chunk.extents {
            let bytes = &chunk.data[at..at + length as usize];
            self.file.write_all_at(bytes, offset).map_err(|e| {
                no_space(
                    sys::Error::io("write", &self.partial, e),
                    &self.partial,
                    length,
                )
            })?;
            at += length as usize;
        }
        self.bytes_written += chunk.data.len() as u64;
        Ok(())
    }

    /// Bytes of data written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Commits the copy if `digest` is the one of the chunks received: synced, put in
    /// place, then named in the record. Returns the record as it is now.
    pub fn commit(mut self, pool: &Pool, digest: &[u8]) -> Result<ReplicaRecord> {
        if digest != self.chain.bytes() {
            return Err(Error::Damaged(format!(
                "the replica of volume {} does not match its node's digest",
                self.volume.id
            )));
        }
        self.file
            .sync_all()
            .map_err(|e| no_space(sys::Error::io("fsync", &self.partial, e), &self.partial, 0))?;
        pool.pause_at("replica-before-commit");
        sys::fs::rename(&self.partial, &self.final_path)?;
        self.done = true;
        let id = self.volume.id.clone();
        let old = pool.replica(&id)?;
        let mut record = old.clone().unwrap_or_else(|| ReplicaRecord {
            volume: self.volume.clone(),
            source_node: self.source_node.clone(),
            source_pool: self.source_pool.clone(),
            point: None,
            snapshots: BTreeMap::new(),
            deleted: false,
            deleted_snapshots: BTreeSet::new(),
        });
        record.volume = self.volume.clone();
        record.source_node = self.source_node.clone();
        record.source_pool = self.source_pool.clone();
        match &self.target {
            Target::Point { number, taken } => {
                record.point = Some(Committed {
                    number: *number,
                    taken: *taken,
                    committed: Timestamp::now(),
                    size_bytes: self.size_bytes,
                    digest: self.chain.hex(),
                });
            }
            Target::Snapshot(snapshot) => {
                record
                    .snapshots
                    .insert(snapshot.id.clone(), snapshot.clone());
            }
        }
        pool.write_replica(&record)?;
        // The point it replaces is no use now.
        let replaced = old.and_then(|o| o.point).map(|p| p.number);
        if let (Target::Point { number, .. }, Some(previous)) = (&self.target, replaced)
            && previous != *number
        {
            pool.remove_image(&pool.replica_point_image(&id, previous))?;
        }
        Ok(record)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.done {
            let _ = sys::fs::remove(&self.partial);
        }
    }
}

/// A write of `needed` bytes into `path` that ran out of space is the pool's
/// NoSpace (RESOURCE_EXHAUSTED), with what its filesystem has left.
fn no_space(e: sys::Error, path: &Path, needed: u64) -> Error {
    if !e.is_no_space() {
        return e.into();
    }
    Error::NoSpace {
        needed,
        available: path
            .parent()
            .and_then(|dir| sys::fs::usage(dir).ok())
            .map_or(0, |u| u.available_bytes),
    }
}

/// The point number a `point-<n>.img` path names.
fn point_number(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("point-")?
        .strip_suffix(".img")?
        .parse()
        .ok()
}

/// Every entry of `dir`; none if it does not exist.
fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries.flatten().map(|e| e.path()).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(sys::Error::io("read_dir", dir, e).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replication(node: &str, secret: &str) -> Replication {
        Replication {
            copies: 1,
            interval_secs: 5,
            replicas: vec![Placement {
                node: node.to_owned(),
                secret: secret.to_owned(),
            }],
            full: vec![],
        }
    }

    #[test]
    fn grants_are_checked() {
        let volume = VolumeId::derive("pvc-1", &super::super::NodeToken::for_node("node-a"));
        let r = replication("node-b", "s3cret");
        let good = grant("s3cret", &volume, "node-b", 2_000);
        assert_eq!(
            check_grant(&volume, Some(&r), "node-b", &good, 1_000),
            Ok(())
        );
        // Expired.
        let err = check_grant(&volume, Some(&r), "node-b", &good, 3_000).unwrap_err();
        assert!(err.0.contains("expired"), "{err}");
        // Another node presenting it, or a node not placed.
        let err = check_grant(&volume, Some(&r), "node-c", &good, 1_000).unwrap_err();
        assert!(err.0.contains("holds no replica"), "{err}");
        // Not made from the secret; tampered expiry; garbage.
        let forged = grant("guess", &volume, "node-b", 2_000);
        assert!(check_grant(&volume, Some(&r), "node-b", &forged, 1_000).is_err());
        let later = good.replacen("2000", "9000", 1);
        assert!(check_grant(&volume, Some(&r), "node-b", &later, 1_000).is_err());
        for bad in ["", ".", "x.y", "2000.zz", "2000"] {
            assert!(
                check_grant(&volume, Some(&r), "node-b", bad, 1_000).is_err(),
                "{bad}"
            );
        }
        // No replication at all.
        assert!(check_grant(&volume, None, "node-b", &good, 1_000).is_err());
    }

    #[test]
    fn close_changes_ship_as_one_range() {
        let k = |n: u64| n << 10;
        assert_eq!(shipped_ranges(&[]), vec![]);
        assert_eq!(
            shipped_ranges(&[
                (0, k(4)),
                (k(8), k(12)),
                (k(300), k(304)),
                (k(1000), k(1004))
            ]),
            vec![(0, k(12)), (k(300), k(304)), (k(1000), k(1004))]
        );
        // Exactly the gap apart: joined.
        assert_eq!(
            shipped_ranges(&[(0, k(4)), (k(4) + SHIP_GAP, k(8) + SHIP_GAP)]),
            vec![(0, k(8) + SHIP_GAP)]
        );
    }

    #[test]
    fn debug_never_shows_secrets() {
        let shown = format!("{:?}", replication("node-b", "s3cret"));
        assert!(
            shown.contains("node-b") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
