//! Start-up reconciliation: finishes or removes what interrupted operations left.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::snapshot::Snapshot;
use super::{Pool, Result};
use crate::sys;

impl Pool {
    /// - `*.partial` images and `*.tmp` metadata (group records' too) are unfinished
    ///   writes: removed, except the image of a cross-node transfer that may still resume (see
    ///   [`super::transfer`]); expired transfers and exports are removed.
    /// - An image without metadata is a create that never committed, or a delete that
    ///   removed the metadata and stopped: removed.
    /// - A snapshot whose background copy never finished: removed (its CO retries).
    /// - A loop device backed by a file of this pool's volume directory that no longer
    ///   exists: detached.
    /// - A filesystem mounted from a volume's loop device: thawed, since a crash
    ///   between freeze and thaw (a snapshot or clone of the volume) leaves it frozen,
    ///   with every write of its application blocked. One that is not frozen is left
    ///   as it is.
    pub(super) fn recover(&self) -> Result<()> {
        self.recover_imports()?;
        self.sweep_exports()?;
        self.recover_replicas()?;
        for dir in [self.volume_dir(), self.snapshot_dir()] {
            for path in entries(&dir)? {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                let orphan_image = name.ends_with(".img") && !path.with_extension("json").exists();
                if name.ends_with(".partial") && self.is_resumable_import(&path) {
                    continue;
                }
                if name.ends_with(".partial") || name.ends_with(".tmp") || orphan_image {
                    tracing::warn!(path = %path.display(), "removing leftover of an interrupted operation");
                    self.remove_image(&path)?;
                }
            }
        }
        // A group record being written when the process died.
        let groups = self.root.join("groups");
        if groups.is_dir() {
            for path in entries(&groups)? {
                if path.extension().is_some_and(|x| x == "tmp") {
                    sys::fs::remove(&path)?;
                }
            }
        }
        for snapshot in self.list_snapshots(None, usize::MAX, None) {
            if !snapshot.ready {
                self.remove_unfinished(&snapshot)?;
            }
        }
        self.detach_orphaned_loops()?;
        self.thaw_volumes()
    }

    fn thaw_volumes(&self) -> Result<()> {
        let table = sys::mountinfo::read()?;
        for device in self.attached_volumes()? {
            let numbers = sys::blockdev::numbers(&device.path)?;
            let staged = table
                .iter()
                .find(|m| m.is_from(&device.path, numbers) && m.root == Path::new("/"));
            if let Some(mount) = staged
                && sys::fs::thaw(&mount.mount_point)?
            {
                tracing::warn!(path = %mount.mount_point.display(), "thawed a volume's filesystem that an interrupted snapshot left frozen");
            }
        }
        Ok(())
    }

    /// Loop devices attached to this pool's live volume images.
    fn attached_volumes(&self) -> Result<Vec<sys::loopdev::LoopDevice>> {
        let (pool_dev, live) = self.volume_inodes()?;
        Ok(sys::loopdev::list_bound()?
            .into_iter()
            .filter(|d| d.backing_dev == pool_dev && live.contains(&d.backing_ino))
            .collect())
    }

    /// The device of the volume directory and the inodes of the files in it.
    fn volume_inodes(&self) -> Result<(u64, HashSet<u64>)> {
        let volume_dir = self.volume_dir();
        let pool_dev = std::fs::metadata(&volume_dir)
            .map_err(|e| sys::Error::io("stat", &volume_dir, e))?
            .dev();
        let live = entries(&volume_dir)?
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.ino())
            .collect();
        Ok((pool_dev, live))
    }

    fn remove_unfinished(&self, snapshot: &Snapshot) -> Result<()> {
        tracing::warn!(snapshot.id = %snapshot.id, "removing snapshot whose copy was interrupted");
        self.remove_snapshot_meta(&snapshot.id)?;
        sys::fs::remove(&self.snapshot_image_path(&snapshot.id))?;
        Ok(())
    }

    fn detach_orphaned_loops(&self) -> Result<()> {
        let (pool_dev, live) = self.volume_inodes()?;
        let prefix = format!("{}/", self.volume_dir().display());
        for device in sys::loopdev::list_bound()? {
            let ours =
                device.backing_dev == pool_dev && names_within(&device.backing_name, &prefix);
            if ours && !live.contains(&device.backing_ino) {
                tracing::warn!(device = %device.path.display(), file = device.backing_name, "detaching loop device whose volume is gone");
                sys::loopdev::detach(&device.path)?;
            }
        }
        Ok(())
    }
}

/// Whether a loop device's recorded backing name (cut to 63 bytes by the kernel) lies
/// under `prefix`.
pub(super) fn names_within(backing_name: &str, prefix: &str) -> bool {
    const RECORDED: usize = 63;
    if backing_name.len() >= RECORDED {
        prefix.starts_with(backing_name) || backing_name.starts_with(prefix)
    } else {
        backing_name.starts_with(prefix)
    }
}

fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)
        .map_err(|e| sys::Error::io("read_dir", dir, e))?
        .flatten()
        .map(|e| e.path())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_truncated_backing_names() {
        let prefix = "/var/lib/kura/pool/volumes/";
        assert!(names_within("/var/lib/kura/pool/volumes/vol-1.img", prefix));
        assert!(!names_within("/home/other/disk.img", prefix));
        let long_prefix = format!("/{}/volumes/", "d".repeat(80));
        assert!(names_within(&long_prefix[..63], &long_prefix));
        assert!(!names_within(&long_prefix[..40], &long_prefix));
    }
}
