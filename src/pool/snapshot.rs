//! Snapshots: a reflink of a volume image taken while the volume is quiesced, or, on a
//! pool without reflink, a sparse copy made in the background.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::cbt::ImageOrigin;
use super::encryption::Encryption;
use super::ids::{GroupSnapshotId, SnapshotId, VolumeId};
use super::listing::walk;
use super::{Error, Pool, Result, Timestamp, partial_path, read_meta, write_meta};
use crate::sys;

/// How long a volume's filesystem may stay frozen before it is thawed regardless.
const FREEZE_DEADLINE: Duration = Duration::from_secs(30);
/// How long a freeze may wait for the filesystem's writers to drain.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(20);

/// A snapshot's metadata document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: SnapshotId,
    pub name: String,
    pub source_volume: VolumeId,
    pub size_bytes: u64,
    pub created: Timestamp,
    /// False while a background copy is still filling the image.
    pub ready: bool,
    /// The source volume's encryption, which every restore keeps; records written
    /// before kura encrypted volumes read as plain.
    #[serde(default, skip_serializing_if = "Encryption::is_plain")]
    pub encryption: Encryption,
    /// The group snapshot this one was cut for, if any ([`super::group`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupSnapshotId>,
    /// How the image was made; records written before kura tracked it have none,
    /// and changed block tracking then compares their data ([`super::cbt`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageOrigin>,
}

/// Snapshots whose background copy is running in this process, with the volume each
/// is copied from while the copy still reads it.
pub(super) type Copying = Arc<Mutex<HashMap<SnapshotId, Option<VolumeId>>>>;

impl Pool {
    /// Cuts a snapshot of `source` named `name`, or returns the one that exists.
    pub fn create_snapshot(&self, name: &str, source: &VolumeId) -> Result<Snapshot> {
        let id = SnapshotId::derive(name, &self.node);
        let meta_path = self.snapshot_meta_path(&id);
        if let Some(existing) = read_meta::<Snapshot>(&meta_path)? {
            if existing.source_volume != *source {
                return Err(Error::Incompatible(format!(
                    "snapshot {name:?} already exists for volume {}",
                    existing.source_volume
                )));
            }
            return Ok(existing);
        }
        let volume = self.volume(source)?;
        let image = self.snapshot_image_path(&id);
        let partial = partial_path(&image);
        let mut snapshot = Snapshot {
            id: id.clone(),
            name: name.to_owned(),
            source_volume: source.clone(),
            size_bytes: volume.size_bytes,
            created: Timestamp::now(),
            ready: self.reflink,
            encryption: volume.encryption,
            group: None,
            image: Some(if self.reflink {
                ImageOrigin::Reflink
            } else {
                ImageOrigin::Copy
            }),
        };
        let source_image = self.image_path(source);
        if !self.reflink {
            self.start_background_copy(&snapshot, source_image)?;
            return Ok(snapshot);
        }
        let cloned = {
            let _quiesced = self.quiesce(&source_image)?;
            snapshot.created = Timestamp::now();
            sys::fs::reflink(&source_image, &partial)
        };
        cloned
            .and_then(|()| sys::fs::rename(&partial, &image))
            .inspect_err(|_| {
                let _ = sys::fs::remove(&partial);
            })?;
        if let Err(e) = self.write_snapshot(&snapshot) {
            let _ = sys::fs::remove(&image);
            return Err(e);
        }
        tracing::info!(snapshot.id = %id, volume.id = %source, "snapshot cut");
        Ok(snapshot)
    }

    /// Records the snapshot as not ready and copies the image in a thread. A crash
    /// mid-copy leaves a not-ready record that start-up reconciliation removes, so the
    /// CO's next CreateSnapshot (same name, same ID) starts over.
    ///
    /// A copy holds the data of one moment only if nothing writes to the volume while
    /// it runs: a volume attached on this node is refused, and one being copied cannot
    /// be staged until the copy is done (see [`Pool::copying_from`]).
    fn start_background_copy(&self, snapshot: &Snapshot, source_image: PathBuf) -> Result<()> {
        let meta_path = self.snapshot_meta_path(&snapshot.id);
        let image = self.snapshot_image_path(&snapshot.id);
        let partial = partial_path(&image);
        self.check_copyable(&snapshot.source_volume, &source_image)?;
        self.write_snapshot(snapshot)?;
        self.copying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(snapshot.id.clone(), Some(snapshot.source_volume.clone()));
        let copying = Arc::clone(&self.copying);
        let index = self.snapshots.clone();
        let pause = self.options.pause.clone();
        let mut done = snapshot.clone();
        let started = sys::thread::spawn("snapshot copy", move || {
            let copied = sys::copy::sparse_copy(&source_image, &partial, &|| pause.at("copying"));
            // The source is read no more: it may be staged, and written, again.
            if let Some(reading) = copying
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(&done.id)
            {
                *reading = None;
            }
            let result = copied
                .and_then(|()| sys::fs::rename(&partial, &image))
                .map_err(super::Error::from)
                .and_then(|()| {
                    done.ready = true;
                    write_meta(&meta_path, &done)
                });
            match result {
                Ok(()) => tracing::info!(snapshot.id = %done.id, "snapshot copy finished"),
                Err(e) => {
                    tracing::error!(snapshot.id = %done.id, error = %e, "snapshot copy failed");
                    if sys::fs::remove(&meta_path).is_ok() {
                        index.remove(&done.id);
                    }
                    let _ = sys::fs::remove(&partial);
                    let _ = sys::fs::remove(&image);
                }
            }
            copying
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&done.id);
        });
        if let Err(e) = started {
            self.copying
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&snapshot.id);
            let _ = self.remove_snapshot_meta(&snapshot.id);
            return Err(e.into());
        }
        tracing::info!(snapshot.id = %snapshot.id, "snapshot copy started");
        Ok(())
    }

    /// On a pool that cannot reflink, snapshots and clones are full copies, which hold
    /// the data of one moment only if nothing writes to the volume while they run: a
    /// volume attached on this node is refused.
    pub(super) fn check_copyable(&self, volume: &VolumeId, image: &Path) -> Result<()> {
        if self.reflink {
            return Ok(());
        }
        match sys::loopdev::find_by_backing(image)? {
            None => Ok(()),
            Some(device) => Err(Error::Precondition(format!(
                "volume {volume} is in use at {}: this pool cannot reflink, so a copy of it \
                 would not hold the data of one moment while it is written; unstage the \
                 volume and retry",
                device.path.display()
            ))),
        }
    }

    /// Deletes a snapshot; one that does not exist counts as deleted.
    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        if !self.is_local(&id.node()) {
            return Ok(());
        }
        if self
            .copying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
        {
            return Err(Error::Busy(format!("snapshot {id} is still being copied")));
        }
        self.remove_snapshot_meta(id)?;
        sys::fs::remove(&self.snapshot_image_path(id))?;
        tracing::info!(snapshot.id = %id, "snapshot deleted");
        Ok(())
    }

    /// Whether a background snapshot copy is reading `volume` now.
    pub fn copying_from(&self, volume: &VolumeId) -> bool {
        self.copying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|reading| reading.as_ref() == Some(volume))
    }

    pub fn snapshot(&self, id: &SnapshotId) -> Result<Snapshot> {
        let not_found = || Error::NotFound {
            kind: "snapshot",
            id: id.to_string(),
        };
        if !self.is_local(&id.node()) {
            return Err(not_found());
        }
        read_meta(&self.snapshot_meta_path(id))?.ok_or_else(not_found)
    }

    /// The first `limit` snapshots of the pool at or after `from` in ID order, of the
    /// volume `source` only if it is given; only the metadata of the snapshots looked
    /// at is read (see [`super::listing`]). A snapshot whose metadata cannot be read is
    /// left out (it has no source volume or time to report) and logged; the rest are
    /// served as ever, and deleting it still works.
    pub fn list_snapshots(
        &self,
        from: Option<&SnapshotId>,
        limit: usize,
        source: Option<&VolumeId>,
    ) -> Vec<Snapshot> {
        walk(&self.snapshots, from, limit, |id| {
            let path = self.snapshot_meta_path(id);
            match read_meta::<Snapshot>(&path) {
                Ok(snapshot) => snapshot.filter(|s| source.is_none_or(|v| s.source_volume == *v)),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "snapshot metadata is unreadable; leaving the snapshot out of listings");
                    None
                }
            }
        })
    }
}

impl Pool {
    /// Makes a volume image consistent for as long as the returned guard lives: a
    /// filesystem mounted from its loop device is frozen (and thawed on drop, or by a
    /// watchdog after [`FREEZE_DEADLINE`]); a loop device without a filesystem mounted
    /// is flushed. An image that is not attached is consistent already.
    pub(super) fn quiesce(&self, image: &Path) -> Result<Quiesced> {
        let Some(device) = sys::loopdev::find_by_backing(image)? else {
            return Ok(Quiesced::Idle);
        };
        let (major, minor) = sys::blockdev::numbers(&device.path)?;
        let table = sys::mountinfo::read()?;
        let mounted = table
            .iter()
            .find(|m| m.is_from(&device.path, (major, minor)) && m.root == Path::new("/"));
        let quiesced = match mounted {
            Some(mount) => Quiesced::Frozen {
                _thawed_on_drop: Frozen::new(mount.mount_point.clone())?,
            },
            None => {
                sys::blockdev::flush(&device.path)?;
                Quiesced::Flushed
            }
        };
        self.pause_at("quiesced");
        Ok(quiesced)
    }
}

/// How [`Pool::quiesce`] made an image consistent; held for as long as that must last.
pub(super) enum Quiesced {
    /// Not attached: nothing writes to it.
    Idle,
    /// Its filesystem is frozen until this is dropped.
    Frozen { _thawed_on_drop: Frozen },
    /// A raw block device in use, flushed: writes that come after the flush are not
    /// held back, because a loop device cannot be suspended. One such image is
    /// consistent at the instant it is reflinked, not across a longer window.
    Flushed,
}

/// A frozen filesystem, thawed on drop or when the deadline passes.
pub(super) struct Frozen {
    mount_point: PathBuf,
    thawed: Arc<AtomicBool>,
    /// Dropped with the guard, which wakes the watchdog at once.
    _wake_watchdog: mpsc::Sender<()>,
}

impl Frozen {
    fn new(mount_point: PathBuf) -> Result<Self> {
        freeze(&mount_point)?;
        let thawed = Arc::new(AtomicBool::new(false));
        let (wake, woken) = mpsc::channel::<()>();
        let watchdog = (Arc::clone(&thawed), mount_point.clone());
        let started = sys::thread::spawn("freeze watchdog", move || {
            let (thawed, mount_point) = watchdog;
            if woken.recv_timeout(FREEZE_DEADLINE) == Err(mpsc::RecvTimeoutError::Timeout)
                && !thawed.swap(true, Ordering::SeqCst)
            {
                tracing::error!(path = %mount_point.display(), "freeze deadline passed; thawing");
                let _ = sys::fs::thaw(&mount_point);
            }
        });
        let frozen = Frozen {
            mount_point,
            thawed,
            _wake_watchdog: wake,
        };
        // Without its watchdog the freeze is not held: dropping the guard thaws.
        started?;
        Ok(frozen)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.thawed.swap(true, Ordering::SeqCst)
            && let Err(e) = sys::fs::thaw(&self.mount_point)
        {
            tracing::error!(error = %e, "thaw failed");
        }
    }
}

/// Freezes the filesystem at `mount_point`, waiting at most [`FREEZE_TIMEOUT`] for
/// its writers to drain.
///
/// A filesystem found frozen already was frozen by kura before a crash (the volume's
/// lock is held, so no other snapshot of it is running, and start-up thaws what a
/// crash left): it is thawed and frozen again, so this snapshot holds a moment of its
/// own and its thaw is the one that counts.
fn freeze(mount_point: &Path) -> Result<()> {
    match freeze_within(mount_point) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            tracing::warn!(path = %mount_point.display(), "filesystem was frozen already; thawing it and freezing again");
            sys::fs::thaw(mount_point)?;
            Ok(freeze_within(mount_point)?)
        }
        other => Ok(other?),
    }
}

fn freeze_within(mount_point: &Path) -> sys::Result<()> {
    let path = mount_point.to_owned();
    let late = mount_point.to_owned();
    sys::thread::within(
        &format!("FIFREEZE {}", mount_point.display()),
        FREEZE_TIMEOUT,
        move || sys::fs::freeze(&path),
        // A freeze that lands after kura gave up on it would never be thawed.
        move |()| {
            let _ = sys::fs::thaw(&late);
        },
    )
}
