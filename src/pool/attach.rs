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
//! - Unstage and unpublish of what is not there succeed, and touch nothing: unpublish
//!   unmounts and removes only a recorded publication of this volume (a mount of its
//!   device), unstage acts only at the volume's recorded staging path.
//! - Paths are left as found: kura creates only the last component of a path, never
//!   its parents; it removes on unpublish or unstage only what it created, and a call
//!   that fails removes what it created. It never mounts over a directory or file
//!   that is not empty.
//! - A stage that fails detaches the loop device it attached.
//! - Volumes are mounted `nosuid,nodev`, with mount options from an allow-list only.
//! - An encrypted volume (fscrypt) is staged only with its key: its key is in the
//!   filesystem's keyring exactly while it is staged (stage adds it, unstage removes it
//!   before unmounting, reading which key from the directory's policy, so an unstage
//!   after a crash removes it too), and only its encrypted directory is published. A
//!   stage with another key changes nothing it did not make, and leaves nothing
//!   mounted when the volume was not staged before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::encryption::{DATA_DIR, Encryption, SECRET_FIELD, Secret};
use super::ids::VolumeId;
use super::volume::{AccessKind, Volume};
use super::{Condition, Error, Pool, Result, read_meta, size, write_meta};
use crate::sys::fscrypt::{Key, KeyId, KeyStatus, Policy, Removal};
use crate::sys::mountinfo::MountEntry;
use crate::sys::{self, FsType};

/// Trees of the kernel's own that no volume is ever staged or published under.
pub const SYSTEM_TREES: [&str; 3] = ["/proc", "/sys", "/dev"];

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
        fs_type: Option<FsType>,
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

    pub fn kind(&self) -> AccessKind {
        match self {
            AccessType::Block => AccessKind::Block,
            AccessType::Mount { .. } => AccessKind::Mount,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    pub access: AccessType,
    pub mode: AccessMode,
}

/// Records made before kura noted who made a target: kura always made it then.
fn made_by_kura() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Publication {
    capability: Capability,
    readonly: bool,
    /// Whether kura created the target (then unpublish removes it).
    #[serde(default = "made_by_kura")]
    created_target: bool,
}

impl Publication {
    /// Whether two publications are the same request (who made the target aside).
    fn same_request(&self, other: &Publication) -> bool {
        self.capability == other.capability && self.readonly == other.readonly
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Record {
    pub(super) staging_path: PathBuf,
    pub(super) capability: Capability,
    pub(super) targets: BTreeMap<PathBuf, Publication>,
    /// Whether kura created the staging directory (then unstage removes it).
    #[serde(default)]
    created_staging: bool,
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
    Format(FsType),
    Mount(FsType),
    Conflict(String),
}

/// Decides from what blkid found whether to format: only a blank device is formatted.
pub fn plan_format(
    found: Option<&sys::blkid::Signature>,
    requested: Option<FsType>,
    default_fs: FsType,
) -> FormatPlan {
    let Some(sig) = found else {
        return FormatPlan::Format(requested.unwrap_or(default_fs));
    };
    match (&sig.fs_type, &sig.partition_table, requested) {
        (_, Some(table), _) => {
            FormatPlan::Conflict(format!("device carries a {table} partition table"))
        }
        (Some(fs), None, want) => match (fs.parse::<FsType>(), want) {
            // kura mounts only what it makes: a volume a pod formatted with another
            // filesystem (through raw block access) is not mounted.
            (Err(_), _) => FormatPlan::Conflict(format!(
                "device holds a {fs} filesystem, which kura does not mount (it mounts {})",
                FsType::names()
            )),
            (Ok(found), Some(want)) if found != want => FormatPlan::Conflict(format!(
                "device holds a {fs} filesystem but the capability asks for {want}"
            )),
            (Ok(found), _) => FormatPlan::Mount(found),
        },
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
        return if existing.same_request(wanted) {
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

/// What unpublish does at a target.
#[derive(Debug, PartialEq, Eq)]
enum UnpublishPlan {
    /// Not a publication of this volume: nothing to do, nothing touched.
    LeaveAlone,
    /// A recorded publication, mounted: unmount, then as [`UnpublishPlan::Forget`].
    Unmount,
    /// A recorded publication whose mount is gone (a crash, a reboot): remove what kura
    /// made there if it is empty, and drop it from the record.
    Forget,
    /// Recorded, but what is mounted there is not this volume (FAILED_PRECONDITION).
    Refuse(String),
}

/// `mounted`: what is mounted at the target, if anything: `Some(true)` when it is this
/// volume (its filesystem or its device node).
fn plan_unpublish(recorded: bool, mounted: Option<bool>, target: &Path) -> UnpublishPlan {
    match (recorded, mounted) {
        (false, _) => UnpublishPlan::LeaveAlone,
        (true, Some(true)) => UnpublishPlan::Unmount,
        (true, None) => UnpublishPlan::Forget,
        (true, Some(false)) => UnpublishPlan::Refuse(format!(
            "{} is mounted from something other than this volume; leaving it alone",
            target.display()
        )),
    }
}

/// What is at a path the CO names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    Missing,
    Dir,
    File,
    Symlink,
    /// A device node, socket or FIFO.
    Other,
}

/// What a stage or publish needs at its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// A directory, which kura makes if it is missing.
    Dir,
    /// A regular file (a block publication), which kura makes if it is missing.
    File,
    /// A directory, or nothing (a block staging path, which kura never uses).
    DirOrNothing,
}

/// Whether `found` serves as `want`: `Ok(true)` when kura must create it, `Err` (the
/// reason, for FAILED_PRECONDITION) when it is the wrong kind of file.
fn plan_place(found: Found, want: Want) -> std::result::Result<bool, &'static str> {
    match (found, want) {
        (Found::Symlink, _) => Err("is a symbolic link; kura mounts only on what it names"),
        (Found::Missing, Want::Dir | Want::File) => Ok(true),
        (Found::Missing, Want::DirOrNothing) => Ok(false),
        (Found::Dir, Want::Dir | Want::DirOrNothing) => Ok(false),
        (Found::File, Want::File) => Ok(false),
        (Found::Dir, Want::File) => {
            Err("is a directory, where a block volume needs a file to be published on")
        }
        (Found::File, Want::Dir | Want::DirOrNothing) => {
            Err("is a file, where a directory is needed")
        }
        (Found::Other, _) => Err("is a device node, socket or FIFO"),
    }
}

/// Logical sector size of every volume's loop device. Left to the kernel, it follows
/// the image's direct I/O alignment, and XFS raises that to its block size (4 KiB) once
/// a file shares extents: a volume formatted on 512-byte sectors would no longer mount
/// after its first snapshot or clone, nor would its restores. A fixed size keeps it the
/// same for the volume's whole life.
pub const VOLUME_SECTOR_SIZE: u32 = 4096;

/// A volume's loop device and what recognises its mounts.
struct Device {
    path: PathBuf,
    numbers: (u32, u32),
    /// The filesystem holding the device node (a block publication binds the node).
    node_holder: (u32, u32),
}

impl Device {
    fn of(path: PathBuf) -> Result<Self> {
        Ok(Device {
            numbers: sys::blockdev::numbers(&path)?,
            node_holder: sys::blockdev::holder_numbers(&path)?,
            path,
        })
    }

    /// Whether `mount` is of this device: its filesystem (the staging mount or a bind
    /// of it) or its device node (a block publication).
    fn backs(&self, mount: &MountEntry) -> bool {
        mount.is_from(&self.path, self.numbers)
            || ((mount.major, mount.minor) == self.node_holder
                && mount.root.file_name().is_some()
                && mount.root.file_name() == self.path.file_name())
    }
}

/// The node side of a pool.
#[derive(Debug)]
pub struct Attacher {
    pub(super) pool: Arc<Pool>,
    records: PathBuf,
    /// Inline volumes' records and staging directories ([`super::ephemeral`]).
    pub(super) ephemeral: PathBuf,
    default_fs: FsType,
    /// kura's own directories: no CO path may point into them.
    reserved: Vec<PathBuf>,
}

impl Attacher {
    pub fn new(pool: Arc<Pool>, state_dir: &Path, default_fs: FsType) -> Result<Self> {
        let records = state_dir.join("attachments");
        std::fs::create_dir_all(&records).map_err(|e| sys::Error::io("mkdir", &records, e))?;
        let absolute = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
        let mut reserved = vec![absolute(state_dir)];
        let pool_root = absolute(&pool.root);
        if !pool_root.starts_with(&reserved[0]) {
            reserved.push(pool_root);
        }
        Ok(Attacher {
            pool,
            records,
            ephemeral: reserved[0].join("ephemeral"),
            default_fs,
            reserved,
        })
    }

    /// kura's own directories (state and pool), where no staging or target path may
    /// lie, nor above them.
    pub fn reserved(&self) -> &[PathBuf] {
        &self.reserved
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

    /// Whether `target` is a recorded publication of the volume.
    pub(super) fn published_at(&self, id: &VolumeId, target: &Path) -> Result<bool> {
        Ok(self
            .record(id)?
            .is_some_and(|r| r.targets.contains_key(target)))
    }

    /// Looks at `path` before anything is made there: what is there must serve as
    /// `want`, its parent must exist if kura is to create it, and where it really is
    /// (symbolic links in its parents resolved) must not be a system tree or kura's.
    /// Returns what it found; touches nothing.
    fn inspect(&self, path: &Path, field: &'static str, want: Want) -> Result<Found> {
        let found = found_at(path)?;
        let create = plan_place(found, want).map_err(|reason| {
            Error::Precondition(format!("{field}: {} {reason}", path.display()))
        })?;
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(Error::Invalid {
                field,
                reason: format!("{} has no parent directory", path.display()),
            });
        };
        let parent = match std::fs::canonicalize(parent) {
            Ok(real) => real,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => parent.to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Precondition(format!(
                    "{field}: the parent directory of {} does not exist (the CO makes it)",
                    path.display()
                )));
            }
            Err(e) => return Err(sys::Error::io("resolve", parent, e).into()),
        };
        if create && !parent.is_dir() {
            return Err(Error::Precondition(format!(
                "{field}: the parent of {} is not a directory",
                path.display()
            )));
        }
        let real = parent.join(name);
        let forbidden = SYSTEM_TREES
            .iter()
            .map(Path::new)
            .chain(self.reserved.iter().map(PathBuf::as_path))
            .find(|tree| {
                real.starts_with(tree) || (tree.starts_with(&real) && real != Path::new("/"))
            })
            // The one path of kura's own it stages on: an inline volume's.
            .filter(|_| !self.is_inline_staging(&real));
        if let Some(tree) = forbidden {
            return Err(Error::Invalid {
                field,
                reason: format!(
                    "{} is really {}, which overlaps {}",
                    path.display(),
                    real.display(),
                    tree.display()
                ),
            });
        }
        Ok(found)
    }

    /// Attaches the volume and, for mount access, formats (if blank) and mounts it at
    /// `staging`. An encrypted volume needs `secret` (the node-stage Secret's key
    /// entry): its key is added to the filesystem and its encrypted directory made or
    /// checked. A plain volume ignores a secret.
    pub fn stage(
        &self,
        id: &VolumeId,
        staging: &Path,
        capability: &Capability,
        secret: Option<Secret>,
    ) -> Result<()> {
        let volume = self.pool.volume(id)?;
        if self.pool.copying_from(id) {
            return Err(Error::Busy(format!(
                "volume {id} is being copied into a snapshot; it can be staged once the copy is done"
            )));
        }
        let key = stage_key(&volume, capability, secret)?;
        let existing = self.record(id)?;
        if let Some(existing) = &existing {
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
        }
        let want = match capability.access {
            AccessType::Block => Want::DirOrNothing,
            AccessType::Mount { .. } => Want::Dir,
        };
        let found = self.inspect(staging, "staging_target_path", want)?;
        if want == Want::Dir
            && found == Found::Dir
            && sys::mountinfo::find_mount(&sys::mountinfo::read()?, staging).is_none()
        {
            must_be_empty(staging, "staging_target_path")?;
        }
        let image = self.pool.image_path(&volume.id);
        let mut undo = StageUndo::new(staging);
        let (device, attached_now) = match sys::loopdev::find_by_backing(&image)? {
            Some(found) => (found.path, false),
            None => (
                sys::loopdev::attach_with_block_size(&image, false, VOLUME_SECTOR_SIZE)?,
                true,
            ),
        };
        if attached_now {
            undo.device = Some(device.clone());
        }
        // Also on a device found bound: an older kura may have attached it untuned.
        sys::loopdev::tune_for_stacking(&device);
        self.pool.pause_at("staging");
        let encrypted = key.is_some();
        let staged = match &capability.access {
            AccessType::Block => Staged::default(),
            AccessType::Mount { fs_type, flags } => self.mount_staging(
                id,
                &device,
                staging,
                Filesystem {
                    // An encrypted volume is ext4, whatever the default filesystem is.
                    fs_type: if encrypted {
                        Some(FsType::Ext4)
                    } else {
                        *fs_type
                    },
                    flags,
                    encrypt: encrypted,
                },
                found == Found::Missing,
                &mut undo,
            )?,
        };
        let fresh = existing.is_none();
        if let Some(key) = &key {
            match self.add_volume_key(id, staging, key) {
                Ok(key_id) if staged.mounted_now => undo.key = Some(key_id),
                Ok(_) => {}
                Err(e) => {
                    // A volume that was not staged before is left unstaged: also a
                    // mount a crashed stage left here.
                    if fresh {
                        undo.mount = true;
                        undo.device = Some(device.clone());
                    }
                    return Err(e);
                }
            }
        }
        drop(key);
        let record = Record {
            staging_path: staging.to_owned(),
            capability: capability.clone(),
            created_staging: existing.as_ref().is_some_and(|r| r.created_staging)
                || staged.created_dir,
            targets: existing.map(|r| r.targets).unwrap_or_default(),
        };
        write_meta(&self.record_path(id), &record)?;
        undo.commit();
        Ok(())
    }

    fn mount_staging(
        &self,
        id: &VolumeId,
        device: &Path,
        staging: &Path,
        Filesystem {
            fs_type,
            flags,
            encrypt,
        }: Filesystem<'_>,
        create_dir: bool,
        undo: &mut StageUndo<'_>,
    ) -> Result<Staged> {
        let (major, minor) = sys::blockdev::numbers(device)?;
        let table = sys::mountinfo::read()?;
        if let Some(mount) = sys::mountinfo::find_mount(&table, staging) {
            if mount.is_from(device, (major, minor)) {
                return Ok(Staged::default());
            }
            return Err(Error::Precondition(format!(
                "staging_target_path: {} is already mounted from {}",
                staging.display(),
                mount.source
            )));
        }
        // A format that a crash interrupted leaves a device that may look formatted but
        // is not: it is blank as far as kura is concerned, and formatted again.
        let formatting = self.formatting_path(id);
        // An image that was never written (a new volume, thin or thick) reads as zeros
        // and carries no signature: no need to run blkid to know it is blank.
        let found = match formatting.exists() {
            true => None,
            false if !sys::fs::holds_data(&self.pool.image_path(id))? => None,
            false => sys::blkid::probe(device)?,
        };
        let (fs, format) = match plan_format(found.as_ref(), fs_type, self.default_fs) {
            FormatPlan::Format(fs) => (fs, true),
            FormatPlan::Mount(fs) => (fs, false),
            FormatPlan::Conflict(reason) => return Err(Error::Precondition(reason)),
        };
        // The flags were checked against the filesystem the request named; now that the
        // filesystem is known, against it, before anything is written.
        for (i, flag) in flags.iter().enumerate() {
            if let Err(reason) = sys::mount::check_option(flag, Some(fs)) {
                return Err(Error::Invalid {
                    field: "volume_capability.mount.mount_flags",
                    reason: format!("flag {i} on the volume's {fs}: {reason}"),
                });
            }
        }
        if format {
            let (size, minimum) = (sys::blockdev::size(device)?, fs.minimum_size());
            if size < minimum {
                return Err(Error::Precondition(format!(
                    "volume of {size} bytes is too small for {fs}, which needs at least {minimum} bytes"
                )));
            }
            sys::fs::atomic_write(&formatting, fs.as_str().as_bytes())?;
            sys::mkfs::format(device, fs, encrypt)?;
            sys::fs::remove(&formatting)?;
        } else {
            grow_unmounted(fs, device)?;
        }
        if create_dir {
            std::fs::create_dir(staging).map_err(|e| sys::Error::io("mkdir", staging, e))?;
            undo.dir = true;
        }
        if let Err(e) = sys::mount::mount_fs(device, staging, fs, flags) {
            // A mount of a process that died a moment ago may land while this one runs.
            let table = sys::mountinfo::read()?;
            let landed = sys::mountinfo::find_mount(&table, staging)
                .is_some_and(|m| m.is_from(device, (major, minor)));
            if !landed {
                return Err(e.into());
            }
        }
        undo.mount = true;
        // XFS and btrfs grow only while mounted; this is where a volume restored or
        // expanded while unstaged reaches its full size (ext was grown before mounting).
        if !format && fs != FsType::Ext4 {
            sys::mkfs::grow_online(fs, device, staging)?;
        }
        Ok(Staged {
            mounted_now: true,
            created_dir: create_dir,
        })
    }

    /// Adds `key` to the keyring of the filesystem mounted at `staging` and makes sure
    /// the volume's encrypted directory is under a policy naming it: made (and the
    /// policy set) on the first stage, checked on later ones. A key that is not the
    /// volume's is taken out again, and the volume is FAILED_PRECONDITION.
    fn add_volume_key(&self, id: &VolumeId, staging: &Path, key: &Key) -> Result<KeyId> {
        let added = sys::fscrypt::add_key(staging, key)?;
        let data = staging.join(DATA_DIR);
        let checked = match found_at(&data)? {
            Found::Missing => std::fs::create_dir(&data)
                .map_err(|e| Error::from(sys::Error::io("mkdir", &data, e)))
                .and_then(|()| {
                    self.pool.pause_at("fscrypt-dir-made");
                    sys::fscrypt::set_policy(&data, &added).map_err(Error::from)
                }),
            Found::Dir => match sys::fscrypt::get_policy(&data)? {
                Some(policy) if policy == Policy::kura(added) => Ok(()),
                Some(Policy::V2 { key, .. }) if key != added => Err(Error::Precondition(format!(
                    "volume {id} is encrypted with another key than the one in its node-stage Secret ({SECRET_FIELD}); it is not staged"
                ))),
                Some(_) => Err(Error::Precondition(format!(
                    "volume {id}: {} has an encryption policy kura does not set",
                    data.display()
                ))),
                // A stage that died between making the directory and setting its
                // policy left it empty.
                None if is_empty(&data)? => {
                    sys::fscrypt::set_policy(&data, &added).map_err(Error::from)
                }
                None => Err(Error::Precondition(format!(
                    "volume {id}: {} is not encrypted but holds files; kura does not expose it as an encrypted volume",
                    data.display()
                ))),
            },
            _ => Err(Error::Precondition(format!(
                "volume {id}: {} is not a directory",
                data.display()
            ))),
        };
        if let Err(e) = checked {
            let _ = sys::fscrypt::remove_key(staging, &added);
            return Err(e);
        }
        Ok(added)
    }

    /// Removes the key of the encrypted directory under `staging` from its
    /// filesystem's keyring. Which key is read from the directory's policy, which
    /// needs no key: so this works after a crash, when nothing else remembers it.
    fn remove_volume_key(&self, id: &VolumeId, staging: &Path) -> Result<()> {
        let data = staging.join(DATA_DIR);
        if found_at(&data)? != Found::Dir {
            return Ok(());
        }
        let Some(Policy::V2 { key, .. }) = sys::fscrypt::get_policy(&data)? else {
            return Ok(());
        };
        match sys::fscrypt::remove_key(staging, &key)? {
            Removal::Removed | Removal::Absent | Removal::OtherUsers => {}
            Removal::FilesBusy => tracing::warn!(
                volume.id = %id,
                "files of the encrypted volume are still open; the kernel drops its key once they are closed"
            ),
        }
        self.pool.pause_at("fscrypt-key-removed");
        Ok(())
    }

    /// Unmounts the staging path and detaches the loop device. Only the volume's own
    /// staging path is acted on; another path is not staged, which is done.
    pub fn unstage(&self, id: &VolumeId, staging: &Path) -> Result<()> {
        let record = self.record(id)?;
        match &record {
            // Not staged by us; the volume must at least exist.
            None => {
                self.pool.volume(id)?;
            }
            Some(record) if record.staging_path != staging => return Ok(()),
            Some(_) => {}
        }
        let table = sys::mountinfo::read()?;
        let image = self.pool.image_path(id);
        let device = match image.exists() {
            true => sys::loopdev::find_by_backing(&image)?
                .map(|d| Device::of(d.path))
                .transpose()?,
            false => None,
        };
        if let Some(device) = &device {
            if let Some(record) = &record
                && let Some(target) = record.targets.keys().find(|t| {
                    sys::mountinfo::find_mount(&table, t).is_some_and(|m| device.backs(&m))
                })
            {
                return Err(Error::Precondition(format!(
                    "volume {id} is still published at {}; NodeUnpublishVolume comes first",
                    target.display()
                )));
            }
            if let Some(other) = table
                .iter()
                .find(|m| m.mount_point != staging && device.backs(m))
            {
                if record.is_none() {
                    // Mounted elsewhere, and no record says where: not staged here.
                    return Ok(());
                }
                return Err(Error::Precondition(format!(
                    "volume {id} is still mounted at {}",
                    other.mount_point.display()
                )));
            }
            if sys::mountinfo::find_mount(&table, staging).is_some_and(|m| device.backs(&m)) {
                // A volume whose metadata cannot be read may be encrypted.
                if self
                    .pool
                    .volume(id)
                    .map_or(true, |v| !v.encryption.is_plain())
                {
                    self.remove_volume_key(id, staging)?;
                }
                sys::mount::unmount(staging)?;
            }
        }
        if let Some(record) = &record {
            // Publications whose mounts are gone (a crash, a reboot) leave only what
            // kura made for them.
            for (target, publication) in &record.targets {
                if publication.created_target
                    && sys::mountinfo::find_mount(&table, target).is_none()
                {
                    remove_if_empty(target)?;
                }
            }
            if record.created_staging {
                remove_if_empty(staging)?;
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
    /// access) at `target`. The publication is recorded before it is made, so a crash
    /// in between leaves a record that unpublish can clean up after.
    pub fn publish(
        &self,
        id: &VolumeId,
        staging: &Path,
        target: &Path,
        capability: &Capability,
        readonly: bool,
    ) -> Result<()> {
        let volume = self.pool.volume(id)?;
        let Some(record) = self.record(id)? else {
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
        let device = Device::of(self.device(id)?)?;
        let table = sys::mountinfo::read()?;
        let staging_mount = sys::mountinfo::find_mount(&table, staging).filter(|m| device.backs(m));
        if matches!(capability.access, AccessType::Mount { .. }) && staging_mount.is_none() {
            return Err(Error::Precondition(format!(
                "staging_target_path: volume {id} is not mounted at {}; NodeStageVolume again",
                staging.display()
            )));
        }
        // What a mount publication binds: the filesystem's root, or for an encrypted
        // volume its encrypted directory, unlocked.
        let source = match volume.encryption {
            Encryption::Plain => staging.to_owned(),
            Encryption::Fscrypt => self.unlocked_dir(&volume, staging)?,
        };
        let mut wanted = Publication {
            capability: capability.clone(),
            readonly,
            created_target: false,
        };
        let at_target = sys::mountinfo::find_mount(&table, target);
        match plan_publish(&record.targets, target, &wanted) {
            PublishPlan::AlreadyDone if at_target.as_ref().is_some_and(|m| device.backs(m)) => {
                return Ok(());
            }
            PublishPlan::AlreadyDone | PublishPlan::Publish => {}
            PublishPlan::Conflict(reason) => return Err(Error::Incompatible(reason)),
            PublishPlan::Forbidden(reason) => return Err(Error::Precondition(reason)),
        }
        if let Some(mount) = at_target {
            return Err(Error::Precondition(format!(
                "target_path: {} is already a mount point (of {})",
                target.display(),
                mount.source
            )));
        }
        let want = match capability.access {
            AccessType::Block => Want::File,
            AccessType::Mount { .. } => Want::Dir,
        };
        let create = match self.inspect(target, "target_path", want)? {
            Found::Missing => true,
            _ => {
                must_be_empty(target, "target_path")?;
                false
            }
        };
        wanted.created_target =
            create || record.targets.get(target).is_some_and(|p| p.created_target);
        let mut updated = record.clone();
        updated.targets.insert(target.to_owned(), wanted);
        write_meta(&self.record_path(id), &updated)?;
        let flags = sys::mount::BindFlags {
            read_only: readonly || capability.mode.read_only(),
            no_dev: !matches!(capability.access, AccessType::Block),
            no_exec: staging_mount.is_some_and(|m| m.options.iter().any(|o| o == "noexec")),
        };
        let made = match capability.access {
            AccessType::Block => {
                let made = if create { make_file(target) } else { Ok(()) };
                made.and_then(|()| {
                    sys::mount::bind(&device.path, target, flags).map_err(Error::from)
                })
            }
            AccessType::Mount { .. } => {
                let made = if create {
                    std::fs::create_dir(target)
                        .map_err(|e| Error::from(sys::Error::io("mkdir", target, e)))
                } else {
                    Ok(())
                };
                made.and_then(|()| sys::mount::bind(&source, target, flags).map_err(Error::from))
            }
        };
        if let Err(e) = made {
            if create {
                let _ = remove_target(target);
            }
            let _ = write_meta(&self.record_path(id), &record);
            return Err(e);
        }
        Ok(())
    }

    /// The encrypted directory of a staged encrypted volume, once its key is known to
    /// be in the filesystem's keyring (a pod never gets a locked directory).
    fn unlocked_dir(&self, volume: &Volume, staging: &Path) -> Result<PathBuf> {
        let id = &volume.id;
        let data = staging.join(DATA_DIR);
        let Some(Policy::V2 { key, .. }) = sys::fscrypt::get_policy(&data)? else {
            return Err(Error::Precondition(format!(
                "volume {id} is encrypted but {} is not an encrypted directory; NodeStageVolume again",
                data.display()
            )));
        };
        match sys::fscrypt::key_status(staging, &key)? {
            KeyStatus::Present => Ok(data),
            KeyStatus::Absent | KeyStatus::IncompletelyRemoved => {
                Err(Error::Precondition(format!(
                    "volume {id} is staged but locked: its key is no longer in the filesystem's keyring; NodeStageVolume again with its Secret"
                )))
            }
        }
    }

    /// Unmounts and (if kura made it) removes `target`, when it is a recorded
    /// publication of this volume; any other path is left alone.
    pub fn unpublish(&self, id: &VolumeId, target: &Path) -> Result<()> {
        let Some(mut record) = self.record(id)? else {
            // Nothing of this volume is published on this node.
            self.pool.volume(id)?;
            return Ok(());
        };
        let recorded = record.targets.get(target).cloned();
        let device = sys::loopdev::find_by_backing(&self.pool.image_path(id))?
            .map(|d| Device::of(d.path))
            .transpose()?;
        let ours = |mount: &MountEntry| device.as_ref().is_some_and(|d| d.backs(mount));
        let table = sys::mountinfo::read()?;
        let mounted = sys::mountinfo::find_mount(&table, target).map(|m| ours(&m));
        match plan_unpublish(recorded.is_some(), mounted, target) {
            UnpublishPlan::LeaveAlone => return Ok(()),
            UnpublishPlan::Refuse(reason) => {
                return Err(Error::Precondition(format!("target_path: {reason}")));
            }
            UnpublishPlan::Unmount => {
                // A retried publish racing a crash may have stacked a second bind.
                loop {
                    sys::mount::unmount(target)?;
                    let table = sys::mountinfo::read()?;
                    if !sys::mountinfo::find_mount(&table, target).is_some_and(|m| ours(&m)) {
                        break;
                    }
                }
            }
            UnpublishPlan::Forget => {}
        }
        if recorded.is_some_and(|p| p.created_target) {
            remove_if_empty(target)?;
        }
        record.targets.remove(target);
        write_meta(&self.record_path(id), &record)
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
        // A block volume is nowhere at its staging path: kura puts nothing there.
        let staged_here = record.staging_path == path
            && matches!(record.capability.access, AccessType::Mount { .. });
        let known = staged_here || record.targets.contains_key(path);
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
    /// Returns the size the volume now shows. A `range` the volume's size (as the
    /// controller left it) does not meet is OUT_OF_RANGE, with nothing done.
    pub fn expand(&self, id: &VolumeId, path: &Path, range: size::Range) -> Result<u64> {
        let volume = self.pool.volume(id)?;
        let record = self.exposed_at(id, path)?;
        check_node_range(range, volume.size_bytes).map_err(Error::OutOfRange)?;
        let device = self.device(id)?;
        sys::loopdev::refresh_capacity(&device)?;
        let size = sys::blockdev::size(&device)?;
        if let AccessType::Mount { .. } = record.capability.access {
            let table = sys::mountinfo::read()?;
            let staging = &record.staging_path;
            let found = sys::mountinfo::find_mount(&table, staging)
                .map(|m| m.fs_type)
                .ok_or_else(|| {
                    Error::Precondition(format!("{} is not mounted", staging.display()))
                })?;
            let fs = found.parse::<FsType>().map_err(|e| {
                Error::Precondition(format!(
                    "cannot grow the filesystem at {}: {e}",
                    staging.display()
                ))
            })?;
            match sys::mkfs::grow_online(fs, &device, staging) {
                Ok(()) => {}
                Err(e @ sys::Error::GrowRefused { .. }) => {
                    return Err(Error::Precondition(format!(
                        "{e}; it will be grown when the volume is next staged"
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(size)
    }
}

/// The key a stage of `volume` uses: `None` for a plain volume (a secret given anyway
/// is not used), the Secret's key for an encrypted one, which must be staged as an
/// ext4 mount. Checked before anything is touched.
fn stage_key(
    volume: &Volume,
    capability: &Capability,
    secret: Option<Secret>,
) -> Result<Option<Key>> {
    let id = &volume.id;
    match volume.encryption {
        Encryption::Plain => {
            if secret.is_some() {
                tracing::debug!(
                    volume.id = %id,
                    "the volume is not encrypted; the node-stage Secret's key entry is not used"
                );
            }
            Ok(None)
        }
        Encryption::Fscrypt => {
            match &capability.access {
                AccessType::Block => {
                    return Err(Error::Precondition(format!(
                        "volume {id} is encrypted (fscrypt on ext4) and cannot be staged for block access"
                    )));
                }
                AccessType::Mount {
                    fs_type: Some(fs), ..
                } if *fs != FsType::Ext4 => {
                    return Err(Error::Precondition(format!(
                        "volume {id} is encrypted (fscrypt on ext4) and cannot be staged as {fs}"
                    )));
                }
                AccessType::Mount { .. } => {}
            }
            let field = SECRET_FIELD;
            let secret = secret.ok_or_else(|| Error::Invalid {
                field,
                reason: format!(
                    "is required: volume {id} is encrypted, and its key comes from the node-stage Secret (csi.storage.k8s.io/node-stage-secret-name in the StorageClass)"
                ),
            })?;
            let key = secret.key().map_err(|e| Error::Invalid {
                field,
                reason: e.to_string(),
            })?;
            Ok(Some(key))
        }
    }
}

/// The filesystem a mount stage wants: its type (`None`: what the device holds, or
/// the default), its mount flags, and whether a new one is made encryptable.
struct Filesystem<'a> {
    fs_type: Option<FsType>,
    flags: &'a [String],
    encrypt: bool,
}

/// What [`Attacher::mount_staging`] did, for undoing it.
#[derive(Debug, Default, Clone, Copy)]
struct Staged {
    mounted_now: bool,
    created_dir: bool,
}

/// What a stage has put in place so far, taken back when it is dropped before
/// [`StageUndo::commit`]: in reverse order of how it was made (the encryption key,
/// the mount, the staging directory, the loop device). Each step sets its field once it
/// has landed, so a failure at any point takes back exactly what this stage made.
struct StageUndo<'a> {
    staging: &'a Path,
    key: Option<KeyId>,
    mount: bool,
    dir: bool,
    device: Option<PathBuf>,
    committed: bool,
}

impl<'a> StageUndo<'a> {
    fn new(staging: &'a Path) -> Self {
        StageUndo {
            staging,
            key: None,
            mount: false,
            dir: false,
            device: None,
            committed: false,
        }
    }

    /// The stage finished: everything stays.
    fn commit(mut self) {
        self.committed = true;
    }
}

impl Drop for StageUndo<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // Best effort: the error that ended the stage is what the caller sees, and a
        // retry or start-up recovery finishes what cannot be taken back now.
        if let Some(key) = &self.key {
            let _ = sys::fscrypt::remove_key(self.staging, key);
        }
        if self.mount {
            let _ = sys::mount::unmount(self.staging);
        }
        if self.dir {
            let _ = std::fs::remove_dir(self.staging);
        }
        if let Some(device) = &self.device {
            let _ = sys::loopdev::detach(device);
        }
    }
}

/// A node expansion's range against the volume's size: the node only makes the
/// volume's filesystem take the size the controller gave it, so it cannot meet a
/// larger `required_bytes`, nor a `limit_bytes` below that size.
fn check_node_range(range: size::Range, size: u64) -> std::result::Result<(), String> {
    let size::Range { required, limit } = range;
    if limit > 0 && required > limit {
        return Err(format!(
            "capacity_range: required_bytes {required} exceeds limit_bytes {limit}"
        ));
    }
    if required > size {
        return Err(format!(
            "capacity_range: required_bytes {required} is more than the volume's {size} bytes; ControllerExpandVolume grows the volume first"
        ));
    }
    if limit > 0 && size > limit {
        return Err(format!(
            "capacity_range: limit_bytes {limit} is below the volume's {size} bytes; volumes cannot shrink"
        ));
    }
    Ok(())
}

/// What is at `path`, without following a symbolic link there.
fn found_at(path: &Path) -> Result<Found> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            let kind = meta.file_type();
            Ok(if kind.is_symlink() {
                Found::Symlink
            } else if kind.is_dir() {
                Found::Dir
            } else if kind.is_file() {
                Found::File
            } else {
                Found::Other
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Found::Missing),
        Err(e) => Err(sys::Error::io("stat", path, e).into()),
    }
}

/// Grows an unmounted ext filesystem that is smaller than its device (a volume expanded
/// while unstaged, or after the kernel refused an online grow).
fn grow_unmounted(fs: FsType, device: &Path) -> Result<()> {
    if fs != FsType::Ext4 {
        return Ok(());
    }
    if sys::mkfs::ext_size(device)? < sys::blockdev::size(device)? {
        sys::mkfs::grow_offline_ext(device)?;
    }
    Ok(())
}

/// Creates the empty file a block volume is bind-mounted on; it must not exist yet.
fn make_file(target: &Path) -> Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
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

/// kura never mounts over something: a directory or file it mounts on must be empty
/// (what is in it would be hidden, and a CO never hands out a full one).
fn must_be_empty(path: &Path, field: &str) -> Result<()> {
    if is_empty(path)? {
        Ok(())
    } else {
        Err(Error::Precondition(format!(
            "{field}: {} is not empty; kura does not mount over what is there",
            path.display()
        )))
    }
}

/// Whether `path` is an empty directory or an empty regular file.
fn is_empty(path: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(std::fs::read_dir(path)
            .map_err(|e| sys::Error::io("read_dir", path, e))?
            .next()
            .is_none()),
        Ok(meta) => Ok(meta.is_file() && meta.len() == 0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(sys::Error::io("stat", path, e).into()),
    }
}

/// Removes what kura made at `path` if it still is as kura made it: an empty directory
/// or an empty file. Anything else (something was put there) stays.
fn remove_if_empty(path: &Path) -> Result<()> {
    if is_empty(path)? {
        remove_target(path)?;
    }
    Ok(())
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
            plan_format(None, None, FsType::Ext4),
            FormatPlan::Format(FsType::Ext4)
        );
        assert_eq!(
            plan_format(None, Some(FsType::Xfs), FsType::Ext4),
            FormatPlan::Format(FsType::Xfs)
        );
        assert_eq!(
            plan_format(Some(&fs("xfs")), None, FsType::Ext4),
            FormatPlan::Mount(FsType::Xfs)
        );
        assert_eq!(
            plan_format(Some(&fs("xfs")), Some(FsType::Xfs), FsType::Ext4),
            FormatPlan::Mount(FsType::Xfs)
        );
        assert!(matches!(
            plan_format(Some(&fs("xfs")), Some(FsType::Ext4), FsType::Ext4),
            FormatPlan::Conflict(_)
        ));
        let table = Signature {
            partition_table: Some("dos".into()),
            ..Default::default()
        };
        assert!(matches!(
            plan_format(Some(&table), None, FsType::Ext4),
            FormatPlan::Conflict(_)
        ));
        assert!(matches!(
            plan_format(Some(&Signature::default()), None, FsType::Ext4),
            FormatPlan::Conflict(_)
        ));
        // kura mounts only the filesystems it makes.
        assert!(matches!(
            plan_format(Some(&fs("vfat")), None, FsType::Ext4),
            FormatPlan::Conflict(_)
        ));
    }

    #[test]
    fn publish_must_match_the_staged_access_type_and_filesystem() {
        let mount = |fs: Option<&str>| AccessType::Mount {
            fs_type: fs.map(|f| f.parse().unwrap()),
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
            created_target: true,
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
            let by_the_co = Publication {
                created_target: false,
                ..p.clone()
            };
            assert_eq!(
                plan_publish(&targets, t1, &by_the_co),
                PublishPlan::AlreadyDone
            );
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

    #[test]
    fn unpublish_touches_only_recorded_publications_of_the_volume() {
        let t = Path::new("/t");
        assert_eq!(plan_unpublish(false, None, t), UnpublishPlan::LeaveAlone);
        assert_eq!(
            plan_unpublish(false, Some(true), t),
            UnpublishPlan::LeaveAlone
        );
        assert_eq!(
            plan_unpublish(false, Some(false), t),
            UnpublishPlan::LeaveAlone
        );
        assert_eq!(plan_unpublish(true, Some(true), t), UnpublishPlan::Unmount);
        assert_eq!(plan_unpublish(true, None, t), UnpublishPlan::Forget);
        assert!(matches!(
            plan_unpublish(true, Some(false), t),
            UnpublishPlan::Refuse(_)
        ));
    }

    #[test]
    fn places_must_be_of_the_right_kind() {
        use Found::*;
        let cases = [
            (Missing, Want::Dir, Ok(true)),
            (Missing, Want::File, Ok(true)),
            (Missing, Want::DirOrNothing, Ok(false)),
            (Dir, Want::Dir, Ok(false)),
            (Dir, Want::DirOrNothing, Ok(false)),
            (File, Want::File, Ok(false)),
        ];
        for (found, want, expected) in cases {
            assert_eq!(plan_place(found, want), expected, "{found:?} as {want:?}");
        }
        for (found, want) in [
            (Dir, Want::File),
            (File, Want::Dir),
            (File, Want::DirOrNothing),
            (Symlink, Want::Dir),
            (Symlink, Want::File),
            (Other, Want::Dir),
            (Other, Want::File),
        ] {
            assert!(plan_place(found, want).is_err(), "{found:?} as {want:?}");
        }
    }

    #[test]
    fn node_expansion_cannot_go_beyond_the_volume() {
        let r = |required, limit| size::Range { required, limit };
        let mib = size::MIB;
        assert!(check_node_range(r(0, 0), mib).is_ok());
        assert!(check_node_range(r(mib, 0), mib).is_ok());
        assert!(check_node_range(r(mib, 2 * mib), mib).is_ok());
        assert!(check_node_range(r(mib + 1, 0), mib).is_err());
        assert!(check_node_range(r(i64::MAX as u64, 0), mib).is_err());
        assert!(check_node_range(r(0, mib - 1), mib).is_err());
        assert!(check_node_range(r(2 * mib, mib), 4 * mib).is_err());
    }

    #[test]
    fn records_from_before_still_read() {
        let old = r#"{"staging_path":"/s","capability":{"access":"block","mode":"single_node_writer"},
            "targets":{"/t":{"capability":{"access":"block","mode":"single_node_writer"},"readonly":false}}}"#;
        let record: Record = serde_json::from_str(old).unwrap();
        assert!(!record.created_staging);
        assert!(record.targets[Path::new("/t")].created_target);
    }
}
