//! Where a pool lives: a sparse image kura makes itself, a dedicated block device, or
//! a directory the operator provides.

use std::path::{Path, PathBuf};

use super::{Error, Result};
use crate::sys;

/// Label of a filesystem kura made for a pool; the only filesystem it will adopt.
pub const POOL_LABEL: &str = "kura-pool";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolSource {
    /// A sparse image file, created if missing, attached to a loop device.
    Image { path: PathBuf, size: u64 },
    /// A dedicated block device.
    Device(PathBuf),
    /// An existing directory on a mounted filesystem.
    Dir(PathBuf),
}

/// Makes the pool's filesystem ready and returns the directory the pool lives in.
/// Image and device pools are mounted at `<state_dir>/pool`. Running it again (a
/// restart) reuses what is there and never formats a device that holds data.
pub fn prepare(source: &PoolSource, state_dir: &Path) -> Result<PathBuf> {
    let mount_point = state_dir.join("pool");
    match source {
        PoolSource::Dir(dir) => {
            if !dir.is_dir() {
                return Err(Error::Invalid {
                    field: "pool-dir",
                    reason: format!("{} is not a directory", dir.display()),
                });
            }
            Ok(dir.clone())
        }
        PoolSource::Device(device) => {
            mount_pool_device(device, &mount_point, &[])?;
            Ok(mount_point)
        }
        PoolSource::Image { path, size } => {
            let grown = ensure_image(path, *size)?;
            let device = match sys::loopdev::find_by_backing(path)? {
                Some(found) => found.path,
                None => sys::loopdev::attach(path, false)?,
            };
            if grown {
                sys::loopdev::refresh_capacity(&device)?;
            }
            // Freed blocks go back to the host filesystem (the loop device punches
            // them out of the image), so deleted volumes do not keep host space.
            mount_pool_device(&device, &mount_point, &["discard"])?;
            if grown {
                sys::mkfs::grow_online(sys::FsType::Xfs, &device, &mount_point)?;
            }
            Ok(mount_point)
        }
    }
}

/// Creates the sparse image if missing, or grows it to `size`. True if it grew.
fn ensure_image(path: &Path, size: u64) -> Result<bool> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| sys::Error::io("mkdir", parent, e))?;
    }
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            sys::fs::create_image(path, size, false)?;
            tracing::info!(image = %path.display(), size, "pool image created");
            Ok(false)
        }
        Err(e) => Err(sys::Error::io("stat", path, e).into()),
        Ok(meta) if meta.len() < size => {
            sys::fs::grow_image(path, size, false)?;
            tracing::info!(image = %path.display(), size, "pool image grown");
            Ok(true)
        }
        Ok(_) => Ok(false),
    }
}

/// What to do with a device offered as a pool.
#[derive(Debug, PartialEq, Eq)]
pub enum DevicePlan {
    /// Blank: format it.
    Format,
    /// Already a kura pool: mount it.
    Mount,
    /// Carries something else: refuse, with the reason.
    Refuse(String),
}

pub fn plan_device(signature: Option<&sys::blkid::Signature>) -> DevicePlan {
    let Some(sig) = signature else {
        return DevicePlan::Format;
    };
    if let Some(table) = &sig.partition_table {
        return DevicePlan::Refuse(format!("it carries a {table} partition table"));
    }
    match (&sig.fs_type, &sig.label) {
        (Some(fs), Some(label)) if fs == "xfs" && label == POOL_LABEL => DevicePlan::Mount,
        (Some(fs), _) => DevicePlan::Refuse(format!(
            "it carries a {fs} filesystem that is not a kura pool"
        )),
        (None, _) => DevicePlan::Refuse("it carries an unrecognised signature".to_owned()),
    }
}

/// Mounts the pool's filesystem (formatting a blank device first) with `noatime` and
/// `extra` options; one mounted there from this device already is kept as it is.
fn mount_pool_device(device: &Path, mount_point: &Path, extra: &[&str]) -> Result<()> {
    let (major, minor) = sys::blockdev::numbers(device)?;
    let table = sys::mountinfo::read()?;
    if let Some(mount) = sys::mountinfo::find_mount(&table, mount_point) {
        if mount.is_from(device, (major, minor)) {
            return Ok(());
        }
        return Err(Error::Precondition(format!(
            "{} is already mounted from {}",
            mount_point.display(),
            mount.source
        )));
    }
    match plan_device(sys::blkid::probe(device)?.as_ref()) {
        DevicePlan::Format => {
            tracing::info!(device = %device.display(), "formatting blank pool device with XFS");
            sys::mkfs::format_pool(device, POOL_LABEL)?;
        }
        DevicePlan::Mount => {}
        DevicePlan::Refuse(reason) => {
            return Err(Error::Invalid {
                field: "pool-device",
                reason: format!("refusing to use {}: {reason}", device.display()),
            });
        }
    }
    std::fs::create_dir_all(mount_point).map_err(|e| sys::Error::io("mkdir", mount_point, e))?;
    let mut options = vec!["noatime".to_owned()];
    options.extend(extra.iter().map(|o| o.to_string()));
    sys::mount::mount_fs(device, mount_point, sys::FsType::Xfs, &options)?;
    tracing::info!(device = %device.display(), mount_point = %mount_point.display(), "pool mounted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::blkid::Signature;

    fn sig(fs: Option<&str>, label: Option<&str>, table: Option<&str>) -> Signature {
        Signature {
            fs_type: fs.map(str::to_owned),
            label: label.map(str::to_owned),
            partition_table: table.map(str::to_owned),
        }
    }

    #[test]
    fn plans_pool_devices() {
        assert_eq!(plan_device(None), DevicePlan::Format);
        assert_eq!(
            plan_device(Some(&sig(Some("xfs"), Some(POOL_LABEL), None))),
            DevicePlan::Mount
        );
        for other in [
            sig(Some("xfs"), None, None),
            sig(Some("ext4"), Some(POOL_LABEL), None),
            sig(None, None, Some("gpt")),
            sig(None, None, None),
        ] {
            assert!(
                matches!(plan_device(Some(&other)), DevicePlan::Refuse(_)),
                "{other:?}"
            );
        }
    }
}
