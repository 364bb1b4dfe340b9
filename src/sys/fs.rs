//! Files and filesystems: atomic metadata writes, sparse and allocated images,
//! reflinks, freezing and usage.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{FallocateFlags, fallocate};

use super::{Error, Result};

nix::ioctl_write_int!(ficlone, 0x94, 9);
nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);
nix::ioctl_read!(fs_get_xattr, b'X', 31, FsXattr);
nix::ioctl_write_ptr!(fs_set_xattr, b'X', 32, FsXattr);

/// `struct fsxattr` of <linux/fs.h>.
#[repr(C)]
#[derive(Debug, Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

const FS_XFLAG_EXTSZINHERIT: u32 = 0x0000_1000;

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content:
/// temporary file, fsync, rename, fsync of the directory.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let mut file = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
    file.write_all(bytes)
        .map_err(|e| Error::io("write", &tmp, e))?;
    file.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| Error::io("rename", path, e))?;
    sync_parent(path)
}

/// The name `atomic_write` uses for its temporary file.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Renames `from` to `to` durably.
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| Error::io("rename", to, e))?;
    sync_parent(to)
}

/// Removes a file durably; one that is already gone counts as removed.
pub fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

/// Fsyncs the directory holding `path`, making a rename or create in it durable.
pub fn sync_parent(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let handle = File::open(dir).map_err(|e| Error::io("open", dir, e))?;
    handle.sync_all().map_err(|e| Error::io("fsync", dir, e))
}

/// An exclusive lock on a file, held until dropped (or the process exits).
#[derive(Debug)]
pub struct LockFile {
    _lock: nix::fcntl::Flock<File>,
    pub path: PathBuf,
}

/// Takes an exclusive `flock` on `path` (created if missing) without waiting, and
/// writes this process's ID into it. `Ok(Err(pid))` when another process holds it,
/// with the ID that process wrote.
pub fn try_lock_exclusive(path: &Path) -> Result<std::result::Result<LockFile, String>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            lock.set_len(0)
                .map_err(|e| Error::io("truncate", path, e))?;
            (&*lock)
                .write_all(format!("{}\n", std::process::id()).as_bytes())
                .map_err(|e| Error::io("write", path, e))?;
            Ok(Ok(LockFile {
                _lock: lock,
                path: path.to_owned(),
            }))
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = std::fs::read_to_string(path).unwrap_or_default();
            Ok(Err(holder.trim().to_owned()))
        }
        Err((_, errno)) => Err(Error::io("flock", path, errno.into())),
    }
}

/// Creates `path`, which must not exist, private to root (mode 0600), for writing.
pub fn create_new(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("create", path, e))
}

/// Creates a new file of `size` bytes: sparse, or with every block allocated.
pub fn create_image(path: &Path, size: u64, allocate: bool) -> Result<()> {
    let file = create_new(path)?;
    resize_open(&file, path, 0, size, allocate)
}

/// Grows the file at `path` from its current size to `size`. With `allocate`, every
/// block of the whole file is allocated, holes it had before included: a clone of a
/// thin volume, or of a thick one, whose preallocated (unwritten) extents a reflink
/// does not share.
pub fn grow_image(path: &Path, size: u64, allocate: bool) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    let current = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    if current >= size && !allocate {
        return Ok(());
    }
    let from = if allocate { 0 } else { current };
    resize_open(&file, path, from, size.max(current), allocate)
}

fn resize_open(file: &File, path: &Path, from: u64, to: u64, allocate: bool) -> Result<()> {
    if allocate && to > from {
        fallocate(
            file,
            FallocateFlags::empty(),
            from as i64,
            (to - from) as i64,
        )
        .map_err(|e| Error::errno("fallocate", path, e))?;
    }
    file.set_len(to)
        .map_err(|e| Error::io("truncate", path, e))?;
    file.sync_all().map_err(|e| Error::io("fsync", path, e))
}

/// Frees `[offset, offset+length)` of an open file: it reads as zeros after, and the
/// file keeps its size.
pub fn punch_hole(file: &File, path: &Path, offset: u64, length: u64) -> Result<()> {
    fallocate(
        file,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        length as i64,
    )
    .map_err(|e| Error::errno("fallocate(PUNCH_HOLE)", path, e))
}

/// Cuts the file at `path` back to `size` bytes (its blocks beyond are freed).
pub fn truncate(path: &Path, size: u64) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    file.set_len(size)
        .map_err(|e| Error::io("truncate", path, e))?;
    file.sync_all().map_err(|e| Error::io("fsync", path, e))
}

/// Whether any byte of the file at `path` was ever written: false when `SEEK_DATA`
/// finds no data at all (a sparse or only preallocated file, which reads as zeros).
/// A filesystem without `SEEK_DATA` reports the whole file as data.
pub fn holds_data(path: &Path) -> Result<bool> {
    let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    Ok(super::sparse::next_data(&file, path, 0)?.is_some())
}

/// Makes `dst` (which must not exist) a copy-on-write clone of `src` with FICLONE.
pub fn reflink(src: &Path, dst: &Path) -> Result<()> {
    let source = File::open(src).map_err(|e| Error::io("open", src, e))?;
    let target = create_new(dst)?;
    // SAFETY: FICLONE takes the source descriptor as its integer argument; both
    // descriptors are open for the duration of the call.
    if let Err(e) = unsafe { ficlone(target.as_raw_fd(), source.as_raw_fd() as libc::c_ulong) } {
        drop(target);
        let _ = std::fs::remove_file(dst);
        return Err(Error::errno("FICLONE", dst, e));
    }
    target.sync_all().map_err(|e| Error::io("fsync", dst, e))
}

/// Whether the filesystem holding `dir` can reflink, found by trying it.
pub fn supports_reflink(dir: &Path) -> Result<bool> {
    let src = dir.join(".kura-reflink-probe");
    let dst = dir.join(".kura-reflink-probe.clone");
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);
    std::fs::write(&src, [0u8; 4096]).map_err(|e| Error::io("write", &src, e))?;
    let result = reflink(&src, &dst);
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);
    match result {
        Ok(()) => Ok(true),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP)
                    | Some(libc::EINVAL)
                    | Some(libc::EXDEV)
                    | Some(libc::ENOTTY)
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Gives files made in `dir` from now on an extent size hint of `bytes` (XFS: new
/// files inherit it from their directory). A write into a hole then allocates
/// `bytes` at once, aligned (the rest unwritten, reading as zeros), instead of just
/// what it writes: far fewer extents in an image that was written at random, so
/// reading it back sequentially, reflinking it and copying it stay fast. Returns false
/// where the filesystem has no such hints (ext4, btrfs), which changes nothing there.
pub fn set_extent_size_hint(dir: &Path, bytes: u32) -> Result<bool> {
    let file = File::open(dir).map_err(|e| Error::io("open", dir, e))?;
    let mut attr = FsXattr::default();
    // SAFETY: FS_IOC_FSGETXATTR writes one fsxattr into `attr`, which outlives the call.
    match unsafe { fs_get_xattr(file.as_raw_fd(), &mut attr) } {
        Ok(_) => {}
        Err(nix::errno::Errno::ENOTTY | nix::errno::Errno::EOPNOTSUPP) => return Ok(false),
        Err(e) => return Err(Error::errno("FS_IOC_FSGETXATTR", dir, e)),
    }
    attr.xflags |= FS_XFLAG_EXTSZINHERIT;
    attr.extsize = bytes;
    // SAFETY: FS_IOC_FSSETXATTR reads one fsxattr from `attr`, which outlives the call.
    match unsafe { fs_set_xattr(file.as_raw_fd(), &attr) } {
        Ok(_) => Ok(true),
        // ext4 takes the call but not this flag.
        Err(
            nix::errno::Errno::EINVAL | nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOTTY,
        ) => Ok(false),
        Err(e) => Err(Error::errno("FS_IOC_FSSETXATTR", dir, e)),
    }
}

/// Freezes the filesystem mounted at `mount_point`.
pub fn freeze(mount_point: &Path) -> Result<()> {
    let dir = File::open(mount_point).map_err(|e| Error::io("open", mount_point, e))?;
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE ignores its argument; `arg` is a valid int that outlives the call.
    unsafe { fifreeze(dir.as_raw_fd(), &mut arg) }
        .map_err(|e| Error::errno("FIFREEZE", mount_point, e))?;
    Ok(())
}

/// Thaws a frozen filesystem; one that is not frozen counts as thawed. Returns whether
/// it was frozen.
pub fn thaw(mount_point: &Path) -> Result<bool> {
    let dir = File::open(mount_point).map_err(|e| Error::io("open", mount_point, e))?;
    let mut arg: libc::c_int = 0;
    // SAFETY: FITHAW ignores its argument; `arg` is a valid int that outlives the call.
    match unsafe { fithaw(dir.as_raw_fd(), &mut arg) } {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EINVAL) => Ok(false),
        Err(e) => Err(Error::errno("FITHAW", mount_point, e)),
    }
}

/// Whether two paths show the same object: one directory or file (as a bind mount
/// shows its source), or two nodes of one block device.
pub fn same_object(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) if x.file_type().is_block_device() && y.file_type().is_block_device() => {
            x.rdev() == y.rdev()
        }
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => false,
    }
}

/// Space and inodes of a mounted filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
}

impl Usage {
    pub fn used_bytes(&self) -> u64 {
        self.total_bytes.saturating_sub(self.available_bytes)
    }
}

pub fn usage(path: &Path) -> Result<Usage> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| Error::errno("statvfs", path, e))?;
    let block = st.fragment_size();
    Ok(Usage {
        total_bytes: st.blocks() * block,
        available_bytes: st.blocks_available() * block,
        total_inodes: st.files(),
        free_inodes: st.files_free(),
    })
}

/// Bytes the filesystem has allocated to a file (shared reflinked extents included).
pub fn allocated_bytes(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io("stat", path, e))?;
    Ok(meta.blocks() * 512)
}

/// Reads the first block of a file, surfacing I/O errors the storage reports.
pub fn probe_read(path: &Path) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut buf = [0u8; 4096];
    nix::sys::uio::pread(&file, &mut buf, 0).map_err(|e| Error::errno("read", path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_refused_with_the_holder_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = try_lock_exclusive(&path).unwrap().expect("first lock");
        let refused = try_lock_exclusive(&path).unwrap().expect_err("second lock");
        assert_eq!(refused, std::process::id().to_string());
        drop(held);
        assert!(try_lock_exclusive(&path).unwrap().is_ok());
    }
}
