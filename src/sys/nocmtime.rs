//! Files on XFS opened so that writes through them leave the file's times alone: XFS's
//! open by handle gives the descriptor `FMODE_NOCMTIME`, which no open(2) flag does.
//!
//! Why a volume's loop device holds its image this way: every direct write the loop
//! driver makes through an ordinary descriptor updates the image's mtime, an XFS
//! transaction, and the driver turns each flush from the volume's filesystem into a
//! full fsync of the image, which then has to force XFS's log for that timestamp: a
//! log write, with a flush of the pool's device before it and one after, on top of
//! the flush the fsync was for. Traced in bench/README.md ("Where a commit's time
//! goes"): two flushes of the pool's device per fdatasync in a volume, one without the
//! time updates. kura never reads an image's times; writes that allocate or convert
//! an image's extents still go through the log, as they must.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::statfs::{XFS_SUPER_MAGIC, fstatfs};

/// `struct xfs_fsop_handlereq` from <xfs/xfs_fs.h>.
#[repr(C)]
struct HandleRequest {
    fd: u32,
    path: *mut libc::c_void,
    oflags: u32,
    ihandle: *mut libc::c_void,
    ihandlen: u32,
    ohandle: *mut libc::c_void,
    ohandlen: *mut u32,
}

nix::ioctl_readwrite!(fd_to_handle, b'X', 106, HandleRequest);
nix::ioctl_readwrite!(open_by_handle, b'X', 107, HandleRequest);

/// Opens the regular file `path` (read-write unless `read_only`) so that writes through
/// the descriptor do not update its times. `None` where that cannot be had (not on
/// XFS, or no CAP_SYS_ADMIN for opening by handle): the caller opens it as usual.
pub fn open(path: &Path, read_only: bool) -> Option<File> {
    let file = File::open(path).ok()?;
    // XFS takes the open by handle on a directory of the filesystem (ENOTDIR on a
    // regular file).
    let dir = File::open(path.parent()?).ok()?;
    if fstatfs(&file).ok()?.filesystem_type() != XFS_SUPER_MAGIC {
        return None;
    }
    // The handle names this inode (and its generation), so the file opened below is
    // the one just opened by path, whatever happens to the path meanwhile.
    let mut handle = [0u8; 64];
    let mut handle_len = handle.len() as u32;
    let mut request = HandleRequest {
        fd: file.as_raw_fd() as u32,
        path: std::ptr::null_mut(),
        oflags: 0,
        ihandle: std::ptr::null_mut(),
        ihandlen: 0,
        ohandle: handle.as_mut_ptr().cast(),
        ohandlen: &mut handle_len,
    };
    // SAFETY: `request` points at `handle` and `handle_len`, which outlive the call;
    // the kernel writes at most `handle_len` bytes into `handle`.
    unsafe { fd_to_handle(file.as_raw_fd(), &mut request) }.ok()?;
    let mut request = HandleRequest {
        fd: 0,
        path: std::ptr::null_mut(),
        oflags: if read_only {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        } as u32,
        ihandle: handle.as_mut_ptr().cast(),
        ihandlen: handle_len,
        ohandle: std::ptr::null_mut(),
        ohandlen: std::ptr::null_mut(),
    };
    // SAFETY: the kernel only reads `request` and the handle it points at; on success
    // it returns a new descriptor that nothing else owns.
    let fd = unsafe { open_by_handle(dir.as_raw_fd(), &mut request) }.ok()?;
    // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
    let opened = unsafe { OwnedFd::from_raw_fd(fd) };
    // XFS opens it without O_CLOEXEC: a tool spawned meanwhile must not inherit it.
    fcntl(&opened, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).ok()?;
    Some(File::from(opened))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};

    use super::*;
    use crate::sys::testing::Xfs;

    #[test]
    fn writes_leave_the_times_alone() {
        let xfs = Xfs::mount("kura-nocmtime");
        let path = xfs.dir.join("image");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let before = std::fs::metadata(&path).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let file = open(&path, false).expect("an XFS file opens by handle as root");
        file.write_all_at(&[1u8; 4096], 0).unwrap();
        file.sync_all().unwrap();
        let after = std::fs::metadata(&path).unwrap();
        assert_eq!(after.ino(), before.ino());
        assert_eq!(std::fs::read(&path).unwrap(), vec![1u8; 4096]);
        assert_eq!(
            (after.mtime(), after.mtime_nsec(), after.ctime_nsec()),
            (before.mtime(), before.mtime_nsec(), before.ctime_nsec())
        );
        let flags = fcntl(&file, FcntlArg::F_GETFD).unwrap();
        assert!(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC));
    }

    #[test]
    fn elsewhere_there_is_nothing_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let on_xfs = fstatfs(File::open(&path).unwrap())
            .unwrap()
            .filesystem_type()
            == XFS_SUPER_MAGIC;
        assert_eq!(open(&path, true).is_some(), on_xfs);
    }
}
