//! Exposing volumes on this node: loop devices, filesystems and mounts.
//!
//! Each staged volume has a small record under the state directory naming its staging
//! path, its capability and its publications; the kernel (mount table, loop devices)
//! says what is really in place, and every call makes the two agree.
//!
//! # Guarantees
//!
//! - Stage and publish repeated with the same arguments succeed and change nothing;
//!   with other arguments they fail and change nothing.
//! - A device that carries a filesystem is never formatted.
//! - Unstage and unpublish of what is not there succeed.
//! - A stage that fails detaches the loop device it attached.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::ids::VolumeId;
use super::{Condition, Error, Pool, Result, read_meta, write_meta};
use crate::sys;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    /// Whether the mode allows only one publication on the node.
    fn single_target(&self) -> bool {
        !matches!(self, AccessMode::SingleNodeMultiWriter)
    }

    fn read_only(&self) -> bool {
        matches!(self, AccessMode::SingleNodeReaderOnly)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessType {
    Block,
    /// `fs_type` is `None` when the CO leaves the choice to kura.
    Mount {
        fs_type: Option<String>,
        flags: Vec<String>,
    },
}

impl AccessType {
    /// Whether a volume staged with `self` can be published with `other`: the same
    /// access type and, when both name one, the same filesystem. (Mount flags may
    /// differ: they apply to the staging mount.)
    fn publishable_as(&self, other: &AccessType) -> bool {
        match (self, other) {
            (AccessType::Block, AccessType::Block) => true,
            (
                AccessType::Mount {
                    fs_type: staged, ..
                },
                AccessType::Mount { fs_type: asked, .. },
            ) => staged.is_none() || asked.is_none() || staged == asked,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    pub access: AccessType,
    pub mode: AccessMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Publication {
    capability: Capability,
    readonly: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    staging_path: PathBuf,
    capability: Capability,
    targets: BTreeMap<PathBuf, Publication>,
}

/// Usage of a volume as a pod sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub total_bytes: u64,
    /// `None` for raw block volumes.
    pub files: Option<sys::fs::Usage>,
    pub condition: Condition,
}

/// What staging a mount volume does with the device.
#[derive(Debug, PartialEq, Eq)]
pub enum FormatPlan {
    Format(String),
    Mount(String),
    Conflict(String),
}

/// Decides from what blkid found whether to format: only a blank device is formatted.
pub fn plan_format(
    found: Option<&sys::blkid::Signature>,
    requested: Option<&str>,
    default_fs: &str,
) -> FormatPlan {
    let Some(sig) = found else {
        return FormatPlan::Format(requested.unwrap_or(default_fs).to_owned());
    };
    match (&sig.fs_type, &sig.partition_table, requested) {
        (_, Some(table), _) => {
            FormatPlan::Conflict(format!("device carries a {table} partition table"))
        }
        (Some(fs), None, Some(want)) if fs != want => FormatPlan::Conflict(format!(
            "device holds a {fs} filesystem but the capability asks for {want}"
        )),
        (Some(fs), None, _) => FormatPlan::Mount(fs.clone()),
        (None, None, _) => {
            FormatPlan::Conflict("device carries an unrecognised signature".to_owned())
        }
    }
}

/// What a publish request does given the volume's current publications.
#[derive(Debug, PartialEq, Eq)]
enum PublishPlan {
    AlreadyDone,
    Publish,
    /// Same target, other arguments (ALREADY_EXISTS).
    Conflict(String),
    /// The access mode forbids another target (FAILED_PRECONDITION).
    Forbidden(String),
}

fn plan_publish(
    targets: &BTreeMap<PathBuf, Publication>,
    target: &Path,
    wanted: &Publication,
) -> PublishPlan {
    if let Some(existing) = targets.get(target) {
        return if existing == wanted {
            PublishPlan::AlreadyDone
        } else {
            PublishPlan::Conflict(format!(
                "{} is already published with other arguments",
                target.display()
            ))
        };
    }
    let blocking = targets
        .iter()
        .find(|(_, p)| p.capability.mode.single_target() || wanted.capability.mode.single_target());
    match blocking {
        Some((other, _)) => PublishPlan::Forbidden(format!(
            "volume is already published at {} and its access mode allows one target",
            other.display()
        )),
        None => PublishPlan::Publish,
    }
}

/// Logical sector size of every volume's loop device. Left to the kernel, it follows
/// the image's direct I/O alignment, and XFS raises that to its block size (4 KiB) once
/// a file shares extents: a volume formatted on 512-byte sectors would no longer mount
/// after its first snapshot or clone, nor would its restores. A fixed size keeps it the
/// same for the volume's whole life.
pub const VOLUME_SECTOR_SIZE: u32 = 4096;

/// The node side of a pool.
#[derive(Debug)]
pub struct Attacher {
    pool: Arc<Pool>,
    records: PathBuf,
    default_fs: String,
}

impl Attacher {
    pub fn new(pool: Arc<Pool>, state_dir: &Path, default_fs: &str) -> Result<Self> {
        let records = state_dir.join("attachments");
        std::fs::create_dir_all(&records).map_err(|e| sys::Error::io("mkdir", &records, e))?;
        Ok(Attacher {
            pool,
            records,
            default_fs: default_fs.to_owned(),
        })
    }

    fn record_path(&self, id: &VolumeId) -> PathBuf {
        self.records.join(format!("{id}.json"))
    }

    /// Present while kura formats the volume: a crash mid-format leaves it behind.
    fn formatting_path(&self, id: &VolumeId) -> PathBuf {
        self.records.join(format!("{id}.formatting"))
    }

    fn record(&self, id: &VolumeId) -> Result<Option<Record>> {
        read_meta(&self.record_path(id))
    }

    /// Attaches the volume and, for mount access, formats (if blank) and mounts it at
    /// `staging`.
    pub fn stage(&self, id: &VolumeId, staging: &Path, capability: &Capability) -> Result<()> {
        let volume = self.pool.volume(id)?;
        if self.pool.copying_from(id) {
            return Err(Error::Busy(format!(
                "volume {id} is being copied into a snapshot; it can be staged once the copy is done"
            )));
        }
        let mut record = Record {
            staging_path: staging.to_owned(),
            capability: capability.clone(),
            targets: BTreeMap::new(),
        };
        if let Some(existing) = self.record(id)? {
            if existing.staging_path != staging {
                return Err(Error::Incompatible(format!(
                    "volume {id} is already staged at {}",
                    existing.staging_path.display()
                )));
            }
            if existing.capability != *capability {
                return Err(Error::Incompatible(format!(
                    "volume {id} is already staged at {} with another volume_capability",
                    staging.display()
                )));
            }
            record.targets = existing.targets;
        }
        let image = self.pool.image_path(&volume.id);
        let (device, attached_now) = match sys::loopdev::find_by_backing(&image)? {
            Some(found) => (found.path, false),
            None => (
                sys::loopdev::attach_with_block_size(&image, false, VOLUME_SECTOR_SIZE)?,
                true,
            ),
        };
        self.pool.pause_at("staging");
        let mounted = match &capability.access {
            AccessType::Block => Ok(()),
            AccessType::Mount { fs_type, flags } => {
                self.mount_staging(id, &device, staging, fs_type.as_deref(), flags)
            }
        };
        if let Err(e) = mounted.and_then(|()| write_meta(&self.record_path(id), &record)) {
            if attached_now {
                let _ = sys::loopdev::detach(&device);
            }
            return Err(e);
        }
        Ok(())
    }

    fn mount_staging(
        &self,
        id: &VolumeId,
        device: &Path,
        staging: &Path,
        fs_type: Option<&str>,
        flags: &[String],
    ) -> Result<()> {
        let (major, minor) = sys::blockdev::numbers(device)?;
        let table = sys::mountinfo::read()?;
        if let Some(mount) = sys::mountinfo::find_mount(&table, staging) {
            if mount.is_from(device, (major, minor)) {
                return Ok(());
            }
            return Err(Error::Precondition(format!(
                "{} is already mounted from {}",
                staging.display(),
                mount.source
            )));
        }
        // A format that a crash interrupted leaves a device that may look formatted but
        // is not: it is blank as far as kura is concerned, and formatted again.
        let formatting = self.formatting_path(id);
        let found = match formatting.exists() {
            true => None,
            false => sys::blkid::probe(device)?,
        };
        let (fs, formatted) = match plan_format(found.as_ref(), fs_type, &self.default_fs) {
            FormatPlan::Format(fs) => {
                let (size, minimum) = (sys::blockdev::size(device)?, sys::mkfs::minimum_size(&fs));
                if size < minimum {
                    return Err(Error::Precondition(format!(
                        "volume of {size} bytes is too small for {fs}, which needs at least {minimum} bytes"
                    )));
                }
                sys::fs::atomic_write(&formatting, fs.as_bytes())?;
                sys::mkfs::format(device, &fs)?;
                sys::fs::remove(&formatting)?;
                (fs, true)
            }
            FormatPlan::Mount(fs) => {
                grow_unmounted(&fs, device)?;
                (fs, false)
            }
            FormatPlan::Conflict(reason) => return Err(Error::Precondition(reason)),
        };
        std::fs::create_dir_all(staging).map_err(|e| sys::Error::io("mkdir", staging, e))?;
        if let Err(e) = sys::mount::mount_fs(device, staging, &fs, flags) {
            // A mount of a process that died a moment ago may land while this one runs.
            let table = sys::mountinfo::read()?;
            let landed = sys::mountinfo::find_mount(&table, staging)
                .is_some_and(|m| m.is_from(device, (major, minor)));
            if !landed {
                return Err(e.into());
            }
        }
        // XFS and btrfs grow only while mounted; this is where a volume restored or
        // expanded while unstaged reaches its full size (ext was grown before mounting).
        if !formatted
            && !fs.starts_with("ext")
            && let Err(e) = sys::mkfs::grow_online(&fs, device, staging)
        {
            let _ = sys::mount::unmount(staging);
            return Err(e.into());
        }
        Ok(())
    }

    /// Unmounts the staging path and detaches the loop device.
    pub fn unstage(&self, id: &VolumeId, staging: &Path) -> Result<()> {
        let record = self.record(id)?;
        if record.is_none() {
            // Not staged by us; the volume must at least exist.
            self.pool.volume(id)?;
        }
        let table = sys::mountinfo::read()?;
        let image = self.pool.image_path(id);
        let device = match image.exists() {
            true => sys::loopdev::find_by_backing(&image)?,
            false => None,
        };
        if let (Some(device), Some(mount)) = (&device, sys::mountinfo::find_mount(&table, staging))
        {
            let (major, minor) = sys::blockdev::numbers(&device.path)?;
            if mount.is_from(&device.path, (major, minor)) {
                sys::mount::unmount(staging)?;
            }
        }
        if let Some(device) = device {
            sys::loopdev::detach(&device.path)?;
        }
        sys::fs::remove(&self.formatting_path(id))?;
        sys::fs::remove(&self.record_path(id))?;
        Ok(())
    }

    /// Bind-mounts the staged volume (a directory, or the device node for block
    /// access) at `target`.
    pub fn publish(
        &self,
        id: &VolumeId,
        staging: &Path,
        target: &Path,
        capability: &Capability,
        readonly: bool,
    ) -> Result<()> {
        self.pool.volume(id)?;
        let Some(mut record) = self.record(id)? else {
            return Err(Error::Precondition(format!(
                "volume {id} is not staged; NodeStageVolume comes first"
            )));
        };
        if record.staging_path != staging {
            return Err(Error::Precondition(format!(
                "volume {id} is staged at {}, not {}",
                record.staging_path.display(),
                staging.display()
            )));
        }
        if !record.capability.access.publishable_as(&capability.access) {
            return Err(Error::Precondition(format!(
                "volume {id} is staged as {:?}, which cannot be published as {:?}",
                record.capability.access, capability.access
            )));
        }
        let wanted = Publication {
            capability: capability.clone(),
            readonly,
        };
        let table = sys::mountinfo::read()?;
        let mounted = sys::mountinfo::find_mount(&table, target).is_some();
        match plan_publish(&record.targets, target, &wanted) {
            PublishPlan::AlreadyDone if mounted => return Ok(()),
            PublishPlan::AlreadyDone | PublishPlan::Publish => {}
            PublishPlan::Conflict(reason) => return Err(Error::Incompatible(reason)),
            PublishPlan::Forbidden(reason) => return Err(Error::Precondition(reason)),
        }
        let read_only = readonly || capability.mode.read_only();
        // A publish that a crash cut short between its bind mount and its record left
        // the bind in place: it is recorded, not mounted a second time on top.
        let source = match &capability.access {
            AccessType::Block => {
                let device = self.device(id)?;
                make_file(target)?;
                device
            }
            AccessType::Mount { .. } => {
                std::fs::create_dir_all(target).map_err(|e| sys::Error::io("mkdir", target, e))?;
                staging.to_owned()
            }
        };
        if !(mounted && sys::fs::same_object(target, &source)) {
            sys::mount::bind(&source, target, read_only)?;
        }
        record.targets.insert(target.to_owned(), wanted);
        if let Err(e) = write_meta(&self.record_path(id), &record) {
            let _ = sys::mount::unmount(target);
            return Err(e);
        }
        Ok(())
    }

    /// Unmounts and removes `target`.
    pub fn unpublish(&self, id: &VolumeId, target: &Path) -> Result<()> {
        let record = self.record(id)?;
        if record.is_none() {
            self.pool.volume(id)?;
        }
        let table = sys::mountinfo::read()?;
        if sys::mountinfo::find_mount(&table, target).is_some() {
            sys::mount::unmount(target)?;
        }
        remove_target(target)?;
        if let Some(mut record) = record
            && record.targets.remove(target).is_some()
        {
            write_meta(&self.record_path(id), &record)?;
        }
        Ok(())
    }

    /// The loop device of an attached volume.
    fn device(&self, id: &VolumeId) -> Result<PathBuf> {
        sys::loopdev::find_by_backing(&self.pool.image_path(id))?
            .map(|d| d.path)
            .ok_or_else(|| Error::Precondition(format!("volume {id} is not attached on this node")))
    }

    /// Checks that `path` is where this volume is staged or published.
    fn exposed_at(&self, id: &VolumeId, path: &Path) -> Result<Record> {
        let not_found = || Error::NotFound {
            kind: "volume path",
            id: format!("{} for volume {id}", path.display()),
        };
        let record = self.record(id)?.ok_or_else(not_found)?;
        let known = record.staging_path == path || record.targets.contains_key(path);
        if !known || !path.exists() {
            return Err(not_found());
        }
        Ok(record)
    }

    /// Capacity and usage of a volume at `path`.
    pub fn stats(&self, id: &VolumeId, path: &Path) -> Result<Stats> {
        let volume = self.pool.volume(id)?;
        let record = self.exposed_at(id, path)?;
        let mut condition = self.pool.condition(&volume);
        let device = sys::loopdev::find_by_backing(&self.pool.image_path(id))
            .ok()
            .flatten();
        if device.is_none() && !condition.abnormal {
            condition = Condition::abnormal("volume is staged but its loop device is gone");
        }
        match record.capability.access {
            AccessType::Block => Ok(Stats {
                total_bytes: sys::blockdev::size(path)?,
                files: None,
                condition,
            }),
            AccessType::Mount { .. } => {
                let table = sys::mountinfo::read()?;
                if sys::mountinfo::find_mount(&table, path).is_none() && !condition.abnormal {
                    condition = Condition::abnormal(format!("{} is not mounted", path.display()));
                }
                let usage = sys::fs::usage(path)?;
                Ok(Stats {
                    total_bytes: usage.total_bytes,
                    files: Some(usage),
                    condition,
                })
            }
        }
    }

    /// Makes the loop device and the filesystem at `path` take the volume's new size.
    /// Returns the size the volume now shows.
    pub fn expand(&self, id: &VolumeId, path: &Path) -> Result<u64> {
        self.pool.volume(id)?;
        let record = self.exposed_at(id, path)?;
        let device = self.device(id)?;
        sys::loopdev::refresh_capacity(&device)?;
        let size = sys::blockdev::size(&device)?;
        if let AccessType::Mount { .. } = record.capability.access {
            let table = sys::mountinfo::read()?;
            let staging = &record.staging_path;
            let fs = sys::mountinfo::find_mount(&table, staging)
                .map(|m| m.fs_type)
                .ok_or_else(|| {
                    Error::Precondition(format!("{} is not mounted", staging.display()))
                })?;
            if let Err(e) = sys::mkfs::grow_online(&fs, &device, staging) {
                // resize2fs reports the kernel's EPERM as "Permission denied to resize
                // filesystem".
                if e.stderr_contains("Operation not permitted")
                    || e.stderr_contains("Permission denied to resize")
                {
                    return Err(Error::Precondition(format!(
                        "the kernel refused to grow the mounted {fs} filesystem ({e}); it will be grown when the volume is next staged"
                    )));
                }
                return Err(e.into());
            }
        }
        Ok(size)
    }
}

/// Grows an unmounted ext filesystem that is smaller than its device (a volume expanded
/// while unstaged, or after the kernel refused an online grow).
fn grow_unmounted(fs: &str, device: &Path) -> Result<()> {
    if !fs.starts_with("ext") {
        return Ok(());
    }
    if sys::mkfs::ext_size(device)? < sys::blockdev::size(device)? {
        sys::mkfs::grow_offline_ext(device)?;
    }
    Ok(())
}

/// Creates the empty file a block volume is bind-mounted on.
fn make_file(target: &Path) -> Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(target)
    {
        Ok(_) => Ok(()),
        Err(e) => Err(sys::Error::io("create", target, e).into()),
    }
}

/// Removes a publish target (a directory or a file); one already gone is fine.
fn remove_target(target: &Path) -> Result<()> {
    let result = match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir(target),
        Ok(_) => std::fs::remove_file(target),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| sys::Error::io("remove", target, e).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::blkid::Signature;

    fn fs(kind: &str) -> Signature {
        Signature {
            fs_type: Some(kind.to_owned()),
            ..Default::default()
        }
    }

    #[test]
    fn formats_only_blank_devices() {
        assert_eq!(
            plan_format(None, None, "ext4"),
            FormatPlan::Format("ext4".into())
        );
        assert_eq!(
            plan_format(None, Some("xfs"), "ext4"),
            FormatPlan::Format("xfs".into())
        );
        assert_eq!(
            plan_format(Some(&fs("xfs")), None, "ext4"),
            FormatPlan::Mount("xfs".into())
        );
        assert_eq!(
            plan_format(Some(&fs("xfs")), Some("xfs"), "ext4"),
            FormatPlan::Mount("xfs".into())
        );
        assert!(matches!(
            plan_format(Some(&fs("xfs")), Some("ext4"), "ext4"),
            FormatPlan::Conflict(_)
        ));
        let table = Signature {
            partition_table: Some("dos".into()),
            ..Default::default()
        };
        assert!(matches!(
            plan_format(Some(&table), None, "ext4"),
            FormatPlan::Conflict(_)
        ));
        assert!(matches!(
            plan_format(Some(&Signature::default()), None, "ext4"),
            FormatPlan::Conflict(_)
        ));
    }

    #[test]
    fn publish_must_match_the_staged_access_type_and_filesystem() {
        let mount = |fs: Option<&str>| AccessType::Mount {
            fs_type: fs.map(str::to_owned),
            flags: vec![],
        };
        assert!(AccessType::Block.publishable_as(&AccessType::Block));
        assert!(mount(Some("xfs")).publishable_as(&mount(Some("xfs"))));
        assert!(mount(None).publishable_as(&mount(Some("xfs"))));
        assert!(mount(Some("xfs")).publishable_as(&mount(None)));
        assert!(!mount(Some("xfs")).publishable_as(&mount(Some("ext4"))));
        assert!(!mount(None).publishable_as(&AccessType::Block));
        assert!(!AccessType::Block.publishable_as(&mount(None)));
    }

    fn publication(mode: AccessMode, readonly: bool) -> Publication {
        Publication {
            capability: Capability {
                access: AccessType::Block,
                mode,
            },
            readonly,
        }
    }

    #[test]
    fn publish_follows_the_access_mode_table() {
        use AccessMode::*;
        let t1 = Path::new("/t1");
        let t2 = Path::new("/t2");
        for mode in [
            SingleNodeWriter,
            SingleNodeReaderOnly,
            SingleNodeSingleWriter,
            SingleNodeMultiWriter,
        ] {
            let p = publication(mode.clone(), false);
            let targets = BTreeMap::from([(t1.to_owned(), p.clone())]);
            assert_eq!(plan_publish(&targets, t1, &p), PublishPlan::AlreadyDone);
            assert!(matches!(
                plan_publish(&targets, t1, &publication(mode.clone(), true)),
                PublishPlan::Conflict(_)
            ));
            let other = plan_publish(&targets, t2, &p);
            if mode == SingleNodeMultiWriter {
                assert_eq!(other, PublishPlan::Publish);
            } else {
                assert!(matches!(other, PublishPlan::Forbidden(_)), "{mode:?}");
            }
        }
        assert_eq!(
            plan_publish(
                &BTreeMap::new(),
                t1,
                &publication(SingleNodeSingleWriter, false)
            ),
            PublishPlan::Publish
        );
    }
}
