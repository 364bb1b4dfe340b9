//! Block device queries.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::{Error, Result};

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);

/// Size of a block device in bytes.
pub fn size(device: &Path) -> Result<u64> {
    let dev = File::open(device).map_err(|e| Error::io("open", device, e))?;
    let mut bytes = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 into `bytes`, which outlives the call.
    unsafe { blkgetsize64(dev.as_raw_fd(), &mut bytes) }
        .map_err(|e| Error::errno("BLKGETSIZE64", device, e))?;
    Ok(bytes)
}

/// Writes a block device's dirty pages and flushes its cache to the backing file.
pub fn flush(device: &Path) -> Result<()> {
    let dev = File::open(device).map_err(|e| Error::io("open", device, e))?;
    dev.sync_all().map_err(|e| Error::io("fsync", device, e))
}

/// Major and minor number of a device node.
pub fn numbers(device: &Path) -> Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(device).map_err(|e| Error::io("stat", device, e))?;
    let rdev = meta.rdev();
    Ok((
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    ))
}

/// Major and minor number of the filesystem that holds `path` (for a device node, the
/// `/dev` filesystem it lives on).
pub fn holder_numbers(path: &Path) -> Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| Error::io("stat", path, e))?;
    let dev = meta.dev();
    Ok((
        nix::sys::stat::major(dev) as u32,
        nix::sys::stat::minor(dev) as u32,
    ))
}
