//! Mounting and unmounting.

use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, umount2};

use super::{Error, Result, cmd};

/// Mounts the filesystem on `device` at `target` with the given mount options.
pub fn mount_fs(device: &Path, target: &Path, fs_type: &str, options: &[String]) -> Result<()> {
    let mut options = options.to_vec();
    // Snapshots and clones carry their source's filesystem UUID; XFS refuses to mount a
    // second filesystem with a UUID it already has mounted unless told not to check.
    if fs_type == "xfs" && !options.iter().any(|o| o == "nouuid") {
        options.push("nouuid".to_owned());
    }
    let device = device.to_string_lossy();
    let target = target.to_string_lossy();
    let mut args = vec!["-t", fs_type];
    let joined = options.join(",");
    if !joined.is_empty() {
        args.extend(["-o", &joined]);
    }
    args.extend([device.as_ref(), target.as_ref()]);
    cmd::run("mount", &args)?;
    Ok(())
}

/// Bind-mounts `source` (a directory or a device node) on `target`, read-only if asked.
pub fn bind(source: &Path, target: &Path, read_only: bool) -> Result<()> {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| Error::errno("bind mount", target, e))?;
    if read_only {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
            // Do not leave a writable bind behind a failed read-only request.
            let _ = umount2(target, MntFlags::empty());
            return Err(Error::errno("remount read-only", target, e));
        }
    }
    Ok(())
}

/// Unmounts `target`. A path that is not a mount point counts as done.
pub fn unmount(target: &Path) -> Result<()> {
    match umount2(target, MntFlags::empty()) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(Error::errno("unmount", target, e)),
    }
}
