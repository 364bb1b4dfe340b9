//! What is on a node, read without changing anything: the pool's volumes, snapshots,
//! group snapshots, exports and in-flight copies, the attachment records, and the
//! kernel's loop devices and mounts, with everything that does not add up named and
//! explained. `kura inspect` prints it ([`crate::inspect`]).
//!
//! # Guarantees
//!
//! - Nothing is written, created, locked, probed or repaired: a survey runs beside a
//!   serving `kura node` (whose lock it leaves alone) and may race its calls, which
//!   then shows as what it is at that instant.
//! - One unreadable document never hides the others: it is itself a finding.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::attach::{AccessType, Record};
use super::ephemeral::InlineRecord;
use super::export::Export;
use super::group::GroupSnapshot;
use super::ids::VolumeId;
use super::recovery::names_within;
use super::transfer::Checkpoint;
use super::volume::Provisioning;
use super::{Options, Pool, Result, Snapshot, Timestamp, id_of_meta, list_meta, read_meta};
use crate::sys;
use crate::sys::loopdev::LoopDevice;
use crate::sys::mountinfo::MountEntry;

/// Everything a survey found.
#[derive(Debug, Clone, Serialize)]
pub struct Survey {
    pub pool: PoolView,
    pub volumes: Vec<VolumeView>,
    pub snapshots: Vec<SnapshotView>,
    pub group_snapshots: Vec<GroupView>,
    pub attachments: Vec<AttachmentView>,
    pub copies: Vec<CopyView>,
    pub exports: Vec<ExportView>,
    /// This node's replicated volumes: where their copies are and how old.
    pub replicated: Vec<ReplicatedView>,
    /// The copies of other nodes' volumes this node holds.
    pub replicas: Vec<ReplicaView>,
    /// What is orphaned or abnormal, each with the reason and what clears it.
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolView {
    pub root: PathBuf,
    /// Whether a filesystem is mounted at the root (image and device pools must be).
    pub mounted: bool,
    pub size_bytes: u64,
    pub available_bytes: u64,
    /// The filesystem holding an image pool's image.
    pub host: Option<HostView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostView {
    pub image: PathBuf,
    pub size_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VolumeView {
    pub id: String,
    pub name: String,
    pub size_bytes: u64,
    pub provisioning: Provisioning,
    pub abnormal: bool,
    pub condition: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotView {
    pub id: String,
    pub name: String,
    pub source_volume: String,
    pub size_bytes: u64,
    pub ready: bool,
    pub group: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupView {
    pub id: String,
    pub name: String,
    pub sources: Vec<String>,
    pub members: Vec<String>,
}

/// A staged volume: its record and what the kernel shows for it.
#[derive(Debug, Clone, Serialize)]
pub struct AttachmentView {
    pub volume_id: String,
    /// An inline (ephemeral) volume, staged by kura in its own directory.
    pub inline: bool,
    /// `block`, or `mount` with the filesystem when the capability names one.
    pub access: String,
    /// The loop device bound to the volume's image, if any.
    pub loop_device: Option<PathBuf>,
    pub staging_path: PathBuf,
    /// Whether the volume's filesystem is mounted at the staging path (mount access;
    /// nothing is mounted there for block access).
    pub staging_mounted: bool,
    pub targets: Vec<TargetView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetView {
    pub path: PathBuf,
    pub mounted: bool,
}

/// A cross-node copy arriving on this node.
#[derive(Debug, Clone, Serialize)]
pub struct CopyView {
    pub volume_id: String,
    pub bytes_done: u64,
    pub size_bytes: u64,
    /// Unix seconds after which the source's grant lapses (a retry extends it).
    pub expires: i64,
}

/// A source pinned on this node for a copy to another node. The grant is never shown.
#[derive(Debug, Clone, Serialize)]
pub struct ExportView {
    pub id: String,
    /// The destination volume's ID.
    pub for_volume: String,
    pub source: String,
    pub destination_node: String,
    pub expires: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicatedView {
    pub volume_id: String,
    pub interval_secs: u64,
    pub copies: u8,
    /// Each placed node and the point it holds (none yet: `None`), taken when.
    pub replicas: Vec<(String, Option<u64>, Option<i64>)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicaView {
    pub volume_id: String,
    pub source_node: String,
    pub point: Option<u64>,
    /// Unix seconds when that point was taken.
    pub taken: Option<i64>,
    pub snapshots: usize,
    /// The volume was deleted while its node was down; the record stays for its node.
    pub deleted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// What it is about: an ID, a path or a device.
    pub subject: String,
    pub reason: String,
}

fn problem(subject: impl std::fmt::Display, reason: impl Into<String>) -> Problem {
    Problem {
        subject: subject.to_string(),
        reason: reason.into(),
    }
}

/// Surveys the pool at `root` and the attachments under `state_dir`; `host_image` is
/// an image pool's image. Reads only.
pub fn survey(root: &Path, state_dir: &Path, host_image: Option<&Path>) -> Result<Survey> {
    let pool = Pool::as_found(root, host_image);
    let mounts = sys::mountinfo::read()?;
    let loops = sys::loopdev::list_bound()?;
    let mut problems = Vec::new();
    let pool_view = pool_view(&pool, &mounts, &mut problems)?;

    let listed = pool.list_volumes(None, usize::MAX);
    let volumes: Vec<VolumeView> = listed
        .iter()
        .map(|(v, c)| VolumeView {
            id: v.id.to_string(),
            name: v.name.clone(),
            size_bytes: v.size_bytes,
            provisioning: v.provisioning,
            abnormal: c.abnormal,
            condition: c.message.clone(),
        })
        .collect();
    for v in volumes.iter().filter(|v| v.abnormal) {
        problems.push(problem(&v.id, format!("abnormal volume: {}", v.condition)));
    }

    let snapshots = snapshots(&pool, &mut problems)?;
    let group_snapshots = groups(&pool, &mut problems)?;
    let (copies, partials) = copies(&pool, &mut problems)?;
    let exports = exports(&pool, &mut problems)?;
    let (replicated, replicas) = replication(&pool, &listed)?;
    leftovers(&pool, &partials, &mut problems)?;

    // Every pool image with its inode, to recognise the loop devices bound to them.
    let pool_dev = std::fs::metadata(root)
        .map_err(|e| sys::Error::io("stat", root, e))?
        .dev();
    let images = pool_images(&pool)?;
    let attachments = attachments(&pool, state_dir, &images, &loops, &mounts, &mut problems)?;
    stray_kernel_state(
        (pool_dev, &format!("{}/", root.display())),
        &images,
        &attachments,
        &loops,
        &mounts,
        &mut problems,
    );
    Ok(Survey {
        pool: pool_view,
        volumes,
        snapshots,
        group_snapshots,
        attachments,
        copies,
        exports,
        replicated,
        replicas,
        problems,
    })
}

/// The replicated volumes among `listed`, and the replicas held here.
fn replication(
    pool: &Pool,
    listed: &[(super::Volume, super::Condition)],
) -> Result<(Vec<ReplicatedView>, Vec<ReplicaView>)> {
    let mut replicated = Vec::new();
    for (volume, _) in listed {
        let Some(r) = &volume.replication else {
            continue;
        };
        let points = pool.points(&volume.id)?;
        replicated.push(ReplicatedView {
            volume_id: volume.id.to_string(),
            interval_secs: r.interval_secs,
            copies: r.copies,
            replicas: r
                .nodes()
                .map(|n| {
                    let held = points.shipped.get(n);
                    (
                        n.to_owned(),
                        held.map(|s| s.point),
                        held.map(|s| s.taken.seconds),
                    )
                })
                .collect(),
        });
    }
    let replicas = pool
        .replicas()?
        .into_iter()
        .map(|r| ReplicaView {
            volume_id: r.volume.id.to_string(),
            source_node: r.source_node,
            point: r.point.as_ref().map(|p| p.number),
            taken: r.point.as_ref().map(|p| p.taken.seconds),
            snapshots: r.snapshots.len(),
            deleted: r.deleted,
        })
        .collect();
    Ok((replicated, replicas))
}

impl Pool {
    /// The pool at `root` as it is, for a survey: unlike [`Pool::open`] nothing is
    /// made, reconciled or probed, and only reading methods are called on it.
    fn as_found(root: &Path, host_image: Option<&Path>) -> Pool {
        let id = std::fs::read_to_string(root.join("pool-id")).unwrap_or_default();
        Pool {
            root: root.to_owned(),
            // Surveys never ask whether an ID is local.
            node: super::NodeToken::for_node(""),
            id: id.trim().to_owned(),
            reflink: false,
            options: Options {
                host_image: host_image.map(Path::to_owned),
                ..Options::default()
            },
            copying: Default::default(),
            in_flight: Default::default(),
            deltas: Default::default(),
            volumes: super::listing::Index::scan_or_empty(&root.join("volumes"), VolumeId::parse),
            snapshots: super::listing::Index::scan_or_empty(
                &root.join("snapshots"),
                super::SnapshotId::parse,
            ),
        }
    }
}

fn pool_view(pool: &Pool, mounts: &[MountEntry], problems: &mut Vec<Problem>) -> Result<PoolView> {
    let mounted = sys::mountinfo::find_mount(mounts, &pool.root).is_some();
    if !mounted && pool.options.host_image.is_some() {
        problems.push(problem(
            pool.root.display(),
            "the image pool is not mounted: kura node mounts it when it starts",
        ));
    }
    let usage = sys::fs::usage(&pool.root)?;
    let host = match (&pool.options.host_image, pool.host_usage()) {
        (Some(image), Ok(Some(u))) => Some(HostView {
            image: image.clone(),
            size_bytes: u.total_bytes,
            available_bytes: u.available_bytes,
        }),
        _ => None,
    };
    Ok(PoolView {
        root: pool.root.clone(),
        mounted,
        size_bytes: usage.total_bytes,
        available_bytes: usage.available_bytes,
        host,
    })
}

fn snapshots(pool: &Pool, problems: &mut Vec<Problem>) -> Result<Vec<SnapshotView>> {
    let mut out = Vec::new();
    for (path, listed) in list_meta::<Snapshot>(&pool.snapshot_dir())? {
        match listed {
            Ok(s) => {
                if !s.ready {
                    problems.push(problem(
                        &s.id,
                        "snapshot not ready: its background copy is running, or was cut \
                         short by a restart (start-up removes it; the CO's retry cuts it again)",
                    ));
                }
                out.push(SnapshotView {
                    id: s.id.to_string(),
                    name: s.name,
                    source_volume: s.source_volume.to_string(),
                    size_bytes: s.size_bytes,
                    ready: s.ready,
                    group: s.group.map(|g| g.to_string()),
                })
            }
            Err(e) => problems.push(problem(
                path.display(),
                format!("unreadable snapshot metadata ({e}): the snapshot is left out of listings"),
            )),
        }
    }
    Ok(out)
}

fn groups(pool: &Pool, problems: &mut Vec<Problem>) -> Result<Vec<GroupView>> {
    let dir = pool.root.join("groups");
    if !dir.is_dir() {
        return Ok(vec![]);
    }
    let mut out = Vec::new();
    for (path, listed) in list_meta::<GroupSnapshot>(&dir)? {
        match listed {
            Ok(g) => out.push(GroupView {
                id: g.id.to_string(),
                name: g.name,
                sources: g.sources.iter().map(|v| v.to_string()).collect(),
                members: g.members.iter().map(|s| s.to_string()).collect(),
            }),
            Err(e) => problems.push(problem(
                path.display(),
                format!("unreadable group snapshot record ({e})"),
            )),
        }
    }
    Ok(out)
}

/// Cross-node copies arriving here (a checkpoint beside a `.partial`), and the
/// `.partial` images they own.
fn copies(pool: &Pool, problems: &mut Vec<Problem>) -> Result<(Vec<CopyView>, HashSet<PathBuf>)> {
    let now = Timestamp::now().seconds;
    let mut out = Vec::new();
    let mut partials = HashSet::new();
    for path in files(&pool.volume_dir(), "transfer")? {
        let partial = super::partial_path(&path.with_extension("img"));
        let Some(id) = id_of_meta(&path, VolumeId::parse) else {
            continue;
        };
        match read_meta::<Checkpoint>(&path) {
            Ok(Some(c)) => {
                if c.expires <= now {
                    problems.push(problem(
                        &id,
                        "a cross-node copy whose grant has lapsed: the next CreateVolume \
                         retry starts it over, and start-up removes it",
                    ));
                }
                if !partial.exists() {
                    problems.push(problem(
                        &id,
                        "a cross-node copy checkpoint without its .partial image: start-up removes it",
                    ));
                }
                partials.insert(partial);
                out.push(CopyView {
                    volume_id: id.to_string(),
                    bytes_done: c.bytes_done,
                    size_bytes: c.size_bytes,
                    expires: c.expires,
                })
            }
            Ok(None) => {}
            Err(e) => problems.push(problem(
                path.display(),
                format!("unreadable copy checkpoint ({e}): start-up removes it"),
            )),
        }
    }
    Ok((out, partials))
}

fn exports(pool: &Pool, problems: &mut Vec<Problem>) -> Result<Vec<ExportView>> {
    let dir = pool.root.join("exports");
    if !dir.is_dir() {
        return Ok(vec![]);
    }
    let now = Timestamp::now().seconds;
    let mut out = Vec::new();
    for (path, listed) in list_meta::<Export>(&dir)? {
        match listed {
            Ok(e) => {
                if e.expires <= now {
                    problems.push(problem(
                        &e.id,
                        "an expired export: the agent's sweep removes it within a minute",
                    ));
                }
                out.push(ExportView {
                    id: e.id.clone(),
                    for_volume: e.key.clone(),
                    source: e.source.id().to_owned(),
                    destination_node: e.destination_node.clone(),
                    expires: e.expires,
                })
            }
            Err(e) => problems.push(problem(
                path.display(),
                format!("unreadable export record ({e}): the sweep removes it"),
            )),
        }
    }
    Ok(out)
}

/// Images without metadata, and builds that never finished.
fn leftovers(pool: &Pool, copying: &HashSet<PathBuf>, problems: &mut Vec<Problem>) -> Result<()> {
    for (dir, kind) in [
        (pool.volume_dir(), "volume"),
        (pool.snapshot_dir(), "snapshot"),
    ] {
        for path in files(&dir, "img")? {
            if !path.with_extension("json").exists() {
                problems.push(problem(
                    path.display(),
                    format!(
                        "a {kind} image without metadata (a create that never committed, or a \
                         delete cut short): kura removes it at its next start"
                    ),
                ));
            }
        }
        for path in files(&dir, "partial")? {
            if !copying.contains(&path) {
                problems.push(problem(
                    path.display(),
                    "an image being built: a create in progress, or one cut short by a \
                     restart (then start-up removes it)",
                ));
            }
        }
    }
    Ok(())
}

/// Every image in the pool (volumes, snapshots, exports, partials) by inode, with its
/// path; the volume's ID for volume images.
fn pool_images(pool: &Pool) -> Result<HashMap<u64, (PathBuf, Option<VolumeId>)>> {
    let mut images = HashMap::new();
    for dir in [
        pool.volume_dir(),
        pool.snapshot_dir(),
        pool.root.join("exports"),
    ] {
        if !dir.is_dir() {
            continue;
        }
        for path in files(&dir, "img")?
            .into_iter()
            .chain(files(&dir, "partial")?)
        {
            if let Ok(meta) = std::fs::metadata(&path) {
                let id = id_of_meta(&path, VolumeId::parse);
                images.insert(meta.ino(), (path, id));
            }
        }
    }
    Ok(images)
}

/// The attachment records (and inline volumes' records) against the kernel's view.
fn attachments(
    pool: &Pool,
    state_dir: &Path,
    images: &HashMap<u64, (PathBuf, Option<VolumeId>)>,
    loops: &[LoopDevice],
    mounts: &[MountEntry],
    problems: &mut Vec<Problem>,
) -> Result<Vec<AttachmentView>> {
    let mut out = Vec::new();
    let inline: BTreeMap<VolumeId, InlineRecord> = {
        let dir = state_dir.join("ephemeral");
        let mut found = BTreeMap::new();
        if dir.is_dir() {
            for (path, record) in list_meta::<InlineRecord>(&dir)? {
                match (id_of_meta(&path, VolumeId::parse), record) {
                    (Some(id), Ok(r)) => {
                        found.insert(id, r);
                    }
                    (_, Err(e)) => problems.push(problem(
                        path.display(),
                        format!("unreadable inline volume record ({e})"),
                    )),
                    (None, Ok(_)) => {}
                }
            }
        }
        found
    };
    let records = state_dir.join("attachments");
    if !records.is_dir() {
        return Ok(out);
    }
    for (path, listed) in list_meta::<Record>(&records)? {
        let Some(id) = id_of_meta(&path, VolumeId::parse) else {
            continue;
        };
        let record = match listed {
            Ok(record) => record,
            Err(e) => {
                problems.push(problem(
                    &id,
                    format!("unreadable attachment record {} ({e})", path.display()),
                ));
                continue;
            }
        };
        let image = pool.image_path(&id);
        // By device and inode: another filesystem (another pool on this kernel) may
        // hold a file of the same inode number.
        let file = std::fs::metadata(&image).ok().map(|m| (m.dev(), m.ino()));
        let device = loops.iter().find(|d| {
            file == Some((d.backing_dev, d.backing_ino)) && images.contains_key(&d.backing_ino)
        });
        let numbers = device.and_then(|d| sys::blockdev::numbers(&d.path).ok());
        let mounted_from_device = |at: &Path| {
            sys::mountinfo::find_mount(mounts, at).is_some_and(|m| {
                device
                    .zip(numbers)
                    .is_some_and(|(d, n)| m.is_from(&d.path, n))
            })
        };
        let (access, block) = match &record.capability.access {
            AccessType::Block => ("block".to_owned(), true),
            AccessType::Mount { fs_type, .. } => (
                match fs_type {
                    Some(fs) => format!("mount ({fs})"),
                    None => "mount".to_owned(),
                },
                false,
            ),
        };
        let staging_mounted = !block && mounted_from_device(&record.staging_path);
        let targets: Vec<TargetView> = record
            .targets
            .keys()
            .map(|path| TargetView {
                path: path.clone(),
                // A block publication is a bind of the device node, so it is
                // mounted from devtmpfs, not from the loop device.
                mounted: if block {
                    sys::mountinfo::find_mount(mounts, path).is_some()
                } else {
                    mounted_from_device(path)
                },
            })
            .collect();
        let subject = id.to_string();
        if file.is_none() {
            problems.push(problem(
                &subject,
                format!(
                    "staged (record {}), but the volume's image is gone",
                    path.display()
                ),
            ));
        } else if device.is_none() {
            problems.push(problem(
                &subject,
                "a stuck attachment: recorded as staged, but no loop device is bound to its \
                 image (detached behind kura's back, or the node rebooted); the kubelet's \
                 NodeUnstageVolume clears the record",
            ));
        }
        if !block && !staging_mounted {
            problems.push(problem(
                &subject,
                format!(
                    "its filesystem is not mounted at its staging path {}",
                    record.staging_path.display()
                ),
            ));
        }
        for target in targets.iter().filter(|t| !t.mounted) {
            problems.push(problem(
                &subject,
                format!(
                    "recorded as published at {}, which is not mounted: NodeUnpublishVolume \
                     clears it",
                    target.path.display()
                ),
            ));
        }
        out.push(AttachmentView {
            volume_id: subject,
            inline: inline.contains_key(&id),
            access,
            loop_device: device.map(|d| d.path.clone()),
            staging_path: record.staging_path,
            staging_mounted,
            targets,
        });
    }
    Ok(out)
}

/// Loop devices and mounts of the pool's images that no record explains.
/// `pool` is the pool filesystem's device and the root's path with a final `/`.
fn stray_kernel_state(
    pool: (u64, &str),
    images: &HashMap<u64, (PathBuf, Option<VolumeId>)>,
    attachments: &[AttachmentView],
    loops: &[LoopDevice],
    mounts: &[MountEntry],
    problems: &mut Vec<Problem>,
) {
    let recorded: HashSet<&Path> = attachments
        .iter()
        .flat_map(|a| {
            std::iter::once(a.staging_path.as_path())
                .chain(a.targets.iter().map(|t| t.path.as_path()))
        })
        .collect();
    let attached: HashSet<&Path> = attachments
        .iter()
        .filter_map(|a| a.loop_device.as_deref())
        .collect();
    let (pool_dev, prefix) = pool;
    let in_pool =
        |d: &&LoopDevice| d.backing_dev == pool_dev && names_within(&d.backing_name, prefix);
    for device in loops.iter().filter(in_pool) {
        let Some((image, id)) = images.get(&device.backing_ino) else {
            problems.push(problem(
                device.path.display(),
                format!(
                    "a loop device bound to a deleted image ({}): detach it with losetup -d \
                     once nothing mounts it (kura detaches such devices at its next start)",
                    device.backing_name
                ),
            ));
            continue;
        };
        if id.is_some() && !attached.contains(device.path.as_path()) {
            problems.push(problem(
                device.path.display(),
                format!(
                    "a loop device bound to {} with no attachment record: kura leaves it \
                     alone; detach it by hand (losetup -d) once nothing mounts it",
                    image.display()
                ),
            ));
        }
        let Ok(numbers) = sys::blockdev::numbers(&device.path) else {
            continue;
        };
        for mount in mounts.iter().filter(|m| m.is_from(&device.path, numbers)) {
            if !recorded.contains(mount.mount_point.as_path()) {
                problems.push(problem(
                    mount.mount_point.display(),
                    format!(
                        "{} (image {}) is mounted here with no attachment record naming this \
                         path: kura leaves it alone; unmount it by hand once no pod uses it",
                        device.path.display(),
                        image.display()
                    ),
                ));
            }
        }
    }
}

/// The files in `dir` whose name ends in `.{extension}`, sorted.
fn files(dir: &Path, extension: &str) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| sys::Error::io("read_dir", dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == extension))
        .collect();
    out.sort();
    Ok(out)
}
