//! The node-local pool: a reflink-capable filesystem holding one image file per volume
//! and per snapshot, with a JSON metadata document beside each. The pool directory is
//! the single source of truth on a node.
//!
//! # Layout on disk
//!
//! ```text
//! <root>/volumes/<volume-id>.img     the volume's bytes (sparse or allocated)
//! <root>/volumes/<volume-id>.json    its metadata; the volume exists iff this exists
//! <root>/snapshots/<snap-id>.img     a reflink (or copy) of a volume image
//! <root>/snapshots/<snap-id>.json    its metadata
//! <root>/groups/<group-id>.json       a group snapshot's record (on its home node)
//! <root>/volumes/<volume-id>.transfer a cross-node transfer's checkpoint (transfer.rs)
//! <root>/exports/<export-id>.img     a source pinned for a transfer (export.rs)
//! <root>/replication/<volume-id>/    a replicated volume's points (replica.rs)
//! <root>/replicas/<volume-id>/       what this node holds of another node's volume
//! <name>.partial                     an image being built; never a live object
//! ```
//!
//! # Guarantees
//!
//! - Creating writes the image as `.partial`, renames it into place, then commits the
//!   metadata atomically; deleting removes the metadata first. A crash at any point
//!   leaves either the whole object or nothing once [`Pool::open`] has reconciled.
//! - A create that runs out of space removes everything it made.
//! - Repeating a create with compatible arguments returns the existing object.

pub mod attach;
pub mod capacity;
pub mod cbt;
pub mod encryption;
pub mod ephemeral;
pub mod export;
pub mod group;
pub mod ids;
pub mod listing;
pub mod locks;
mod modify;
mod recovery;
pub mod replica;
pub mod size;
mod snapshot;
pub mod source;
pub mod survey;
pub mod transfer;
mod volume;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::sys;
pub use encryption::Encryption;
pub use ids::{GroupSnapshotId, NodeToken, SnapshotId, VolumeId};
pub use snapshot::Snapshot;
pub use volume::{AccessKind, ContentSource, Provisioning, Volume, VolumeSpec};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Pool errors, in the caller's terms.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} {id} does not exist")]
    NotFound { kind: &'static str, id: String },
    /// The object exists with arguments that differ from the request.
    #[error("{0}")]
    Incompatible(String),
    /// The request's size cannot be satisfied.
    #[error("{0}")]
    OutOfRange(String),
    #[error("not enough space in the pool: {needed} bytes needed, {available} available")]
    NoSpace { needed: u64, available: u64 },
    /// The object is in a state that forbids the operation (in use, not ready).
    #[error("{0}")]
    Precondition(String),
    /// A request argument is unusable; names the field.
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The operation failed on the node for a reason the caller cannot fix by
    /// changing the request.
    #[error(transparent)]
    Sys(#[from] sys::Error),
    /// Another operation on the object is still running; try again later.
    #[error("{0}")]
    Busy(String),
    /// Data of a cross-node transfer arrived damaged (a chunk's checksum, the
    /// image's digest): nothing of it is kept.
    #[error("{0}")]
    Damaged(String),
    /// Stored metadata cannot be read.
    #[error("corrupt metadata {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// When an object was made, as stored in its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub seconds: i64,
    pub nanos: i32,
}

impl Timestamp {
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: since.as_secs() as i64,
            nanos: since.subsec_nanos() as i32,
        }
    }
}

/// Whether a volume is healthy, as far as this node can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

impl Condition {
    pub fn healthy() -> Self {
        Condition {
            abnormal: false,
            message: "volume is healthy".to_owned(),
        }
    }

    pub fn abnormal(message: impl Into<String>) -> Self {
        Condition {
            abnormal: true,
            message: message.into(),
        }
    }
}

/// Tunables of a pool.
#[derive(Debug, Clone)]
pub struct Options {
    /// Thin volumes may promise this many times the pool's size, in all (see
    /// [`capacity`]).
    pub overprovision_ratio: f64,
    /// Size of a volume whose request names no capacity.
    pub default_volume_size: u64,
    /// The pool root is a mount point kura made (image and device pools); the pool is
    /// usable only while it is mounted.
    pub mounted_root: bool,
    /// The image file of an image pool (`--pool-image`): the host filesystem holding
    /// it bounds capacity and backs thick volumes (see [`capacity`]).
    pub host_image: Option<PathBuf>,
    /// Test-only pause points (off in production).
    pub pause: sys::pause::Points,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            overprovision_ratio: 1.0,
            default_volume_size: 1 << 30,
            mounted_root: false,
            host_image: None,
            pause: sys::pause::Points::off(),
        }
    }
}

/// The extent size hint of volume images: what a first write into a hole of a thin
/// image allocates at once. Measured (bench/README.md, "Allocation of volume
/// images"): after 8 s of 4k random writes into a fresh thin image, a fifth of the
/// extents and sequential reads of it 3.7 times as fast, random writes as fast as
/// without; the cost is up to 1 MiB allocated per region touched.
const VOLUME_EXTENT_SIZE_HINT: u32 = 1 << 20;

/// A node's pool. Every method blocks; async callers use `spawn_blocking`.
#[derive(Debug)]
pub struct Pool {
    root: PathBuf,
    node: NodeToken,
    id: String,
    reflink: bool,
    options: Options,
    copying: snapshot::Copying,
    /// The IDs of the volumes and snapshots, for listings ([`listing`]).
    volumes: listing::Index<VolumeId>,
    snapshots: listing::Index<SnapshotId>,
    in_flight: capacity::InFlight,
    /// Deltas answered, by method (the metrics read it).
    pub deltas: cbt::Served,
}

impl Pool {
    /// Opens the pool rooted at `root` (a mounted directory), creating its layout if
    /// new, and reconciles what interrupted operations left behind.
    pub fn open(root: &Path, node_id: &str, options: Options) -> Result<Pool> {
        for dir in [root.join("volumes"), root.join("snapshots")] {
            std::fs::create_dir_all(&dir).map_err(|e| sys::Error::io("mkdir", &dir, e))?;
        }
        let volumes = root.join("volumes");
        if !sys::fs::set_extent_size_hint(&volumes, VOLUME_EXTENT_SIZE_HINT)? {
            tracing::debug!(pool = %root.display(), "pool filesystem takes no extent size hints");
        }
        let reflink = sys::fs::supports_reflink(root)?;
        if !reflink {
            tracing::warn!(
                pool = %root.display(),
                "pool filesystem cannot reflink: snapshots and clones will be full copies"
            );
        }
        let pool = Pool {
            root: root.to_owned(),
            node: NodeToken::for_node(node_id),
            id: pool_id(root)?,
            reflink,
            options,
            copying: Default::default(),
            volumes: listing::Index::scan(&volumes, VolumeId::parse)?,
            snapshots: listing::Index::scan(&root.join("snapshots"), SnapshotId::parse)?,
            in_flight: Default::default(),
            deltas: Default::default(),
        };
        pool.recover()?;
        Ok(pool)
    }

    pub fn node(&self) -> &NodeToken {
        &self.node
    }

    /// Holds the calling operation at a test pause point (a no-op in production).
    pub fn pause_at(&self, point: &str) {
        self.options.pause.at(point);
    }

    /// The pool's own identity: made when the pool is first opened and stored in it,
    /// so it stays the same across restarts and says when a node's pool was replaced.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Ready when the pool is mounted (if kura mounted it) and writable.
    pub fn probe(&self) -> Result<()> {
        if self.options.mounted_root {
            let table = sys::mountinfo::read()?;
            if sys::mountinfo::find_mount(&table, &self.root).is_none() {
                return Err(Error::Precondition(format!(
                    "pool {} is not mounted",
                    self.root.display()
                )));
            }
        }
        let path = self.root.join(".kura-probe");
        sys::fs::atomic_write(&path, b"ok")?;
        sys::fs::remove(&path)?;
        Ok(())
    }

    fn volume_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }

    fn snapshot_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// The image file of a volume (whether or not it exists).
    pub fn image_path(&self, id: &VolumeId) -> PathBuf {
        self.volume_dir().join(format!("{id}.img"))
    }

    fn volume_meta_path(&self, id: &VolumeId) -> PathBuf {
        self.volume_dir().join(format!("{id}.json"))
    }

    fn snapshot_image_path(&self, id: &SnapshotId) -> PathBuf {
        self.snapshot_dir().join(format!("{id}.img"))
    }

    fn snapshot_meta_path(&self, id: &SnapshotId) -> PathBuf {
        self.snapshot_dir().join(format!("{id}.json"))
    }

    /// Commits a volume's metadata document: from now on the volume exists. Every
    /// write of one goes through here, so listings know of it.
    fn write_volume(&self, volume: &Volume) -> Result<()> {
        self.volumes.insert(&volume.id);
        write_meta(&self.volume_meta_path(&volume.id), volume)
    }

    /// Removes a volume's metadata document: from now on the volume is gone.
    fn remove_volume_meta(&self, id: &VolumeId) -> Result<()> {
        sys::fs::remove(&self.volume_meta_path(id))?;
        self.volumes.remove(id);
        Ok(())
    }

    /// [`Pool::write_volume`] for snapshots.
    fn write_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        self.snapshots.insert(&snapshot.id);
        write_meta(&self.snapshot_meta_path(&snapshot.id), snapshot)
    }

    /// [`Pool::remove_volume_meta`] for snapshots.
    fn remove_snapshot_meta(&self, id: &SnapshotId) -> Result<()> {
        sys::fs::remove(&self.snapshot_meta_path(id))?;
        self.snapshots.remove(id);
        Ok(())
    }

    /// Whether an ID names this node; IDs of other nodes name nothing here.
    fn is_local(&self, node: &NodeToken) -> bool {
        *node == self.node
    }
}

/// Reads the pool's ID from `<root>/pool-id`, writing a new one if there is none.
fn pool_id(root: &Path) -> Result<String> {
    let path = root.join("pool-id");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_owned()),
        Ok(_) => write_pool_id(&path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_pool_id(&path),
        Err(e) => Err(sys::Error::io("read", &path, e).into()),
    }
}

fn write_pool_id(path: &Path) -> Result<String> {
    let id = uuid::Uuid::new_v4().to_string();
    sys::fs::atomic_write(path, format!("{id}\n").as_bytes())?;
    Ok(id)
}

/// Appends `.partial` to a path: where an image is built before it goes live.
fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

fn read_meta<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Corrupt {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(sys::Error::io("read", path, e).into()),
    }
}

fn write_meta<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).expect("metadata serialises");
    Ok(sys::fs::atomic_write(path, &bytes)?)
}

/// Every `*.json` document in `dir`, in ID order, each with its path: read, or why it
/// could not be. One unreadable document never hides the others.
fn list_meta<T: for<'de> Deserialize<'de>>(dir: &Path) -> Result<Vec<(PathBuf, Result<T>)>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| sys::Error::io("read_dir", dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    Ok(paths
        .into_iter()
        .filter_map(|path| match read_meta(&path) {
            Ok(None) => None,
            Ok(Some(meta)) => Some((path, Ok(meta))),
            Err(e) => Some((path, Err(e))),
        })
        .collect())
}

/// The ID a metadata document's file name carries (`<id>.json`).
fn id_of_meta<T>(path: &Path, parse: impl Fn(&str) -> Option<T>) -> Option<T> {
    path.file_stem().and_then(|s| s.to_str()).and_then(parse)
}
