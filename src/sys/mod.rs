//! The only code that touches the operating system: loop devices, mounts, mkfs,
//! reflinks, freezing, statfs, mountinfo and filesystem encryption keys. Every function is small and typed and
//! reports what it touched when it fails. All of it blocks; callers in async code run
//! it through `spawn_blocking`. Knowledge of the tools lives beside their wrappers, as
//! pure functions: the filesystems mkfs makes, the mount options a volume may take
//! ([`mount::check_option`]).

pub mod blkid;
pub mod blockdev;
pub mod cmd;
pub mod copy;
pub mod direct;
pub mod extents;
pub mod fiemap;
pub mod fs;
pub mod fscrypt;
pub mod fstype;
pub mod loopdev;
pub mod mkfs;
pub mod mount;
pub mod mountinfo;
pub mod nocmtime;
pub mod pause;
pub mod sparse;
pub mod thread;

/// Files for tests of the code that reads them.
#[cfg(test)]
pub(crate) mod testing {
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};

    /// A sparse file `dir/name` of `len` bytes with `writes` (offset, bytes) written,
    /// synced so its layout is on disk.
    pub fn sparse_file(dir: &Path, name: &str, len: u64, writes: &[(u64, &[u8])]) -> PathBuf {
        let path = dir.join(name);
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(len).unwrap();
        for (offset, bytes) in writes {
            file.write_all_at(bytes, *offset).unwrap();
        }
        file.sync_all().unwrap();
        path
    }

    /// A reflink XFS filesystem on a loop device the test attaches, mounted at `dir`;
    /// unmounted, its own loop device detached and its files removed on drop, also
    /// when the test fails.
    pub struct Xfs {
        pub dir: PathBuf,
        device: Option<PathBuf>,
        _temp: tempfile::TempDir,
    }

    impl Xfs {
        pub fn mount(name: &str) -> Xfs {
            let temp = tempfile::Builder::new().prefix(name).tempdir().unwrap();
            let image = temp.path().join("xfs.img");
            std::fs::File::create(&image)
                .unwrap()
                .set_len(300 << 20)
                .unwrap();
            let dir = temp.path().join("mnt");
            std::fs::create_dir(&dir).unwrap();
            let mut xfs = Xfs {
                dir,
                device: None,
                _temp: temp,
            };
            let device = super::loopdev::attach(&image, false).unwrap();
            xfs.device = Some(device.clone());
            super::mkfs::format_pool(&device, "kura-test").unwrap();
            super::mount::mount_fs(&device, &xfs.dir, super::FsType::Xfs, &[]).unwrap();
            xfs
        }
    }

    impl Drop for Xfs {
        fn drop(&mut self) {
            let _ = super::mount::unmount(&self.dir);
            if let Some(device) = &self.device {
                let _ = super::loopdev::detach(device);
            }
        }
    }
}

pub use fstype::FsType;

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on a path failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An external tool could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    /// An external tool ran and failed.
    #[error("{program} {args} failed ({status}): {stderr}", args = args.join(" "))]
    Command {
        program: String,
        args: Vec<String>,
        status: String,
        stderr: String,
    },
    /// A tool or kernel file said something kura cannot read.
    #[error("cannot parse {what}: {detail}")]
    Parse { what: &'static str, detail: String },
    /// A step did not finish in time.
    #[error("{step} did not finish within {seconds}s")]
    Timeout { step: String, seconds: u64 },
    /// The kernel refused to grow a mounted filesystem (resize2fs without
    /// CAP_SYS_RESOURCE): it can be grown unmounted.
    #[error("the kernel refused to grow the mounted {fs} filesystem on {device}: {stderr}")]
    GrowRefused {
        fs: fstype::FsType,
        device: PathBuf,
        stderr: String,
    },
    /// The OS refused a thread kura needs.
    #[error("cannot start a thread for {what}: {source}")]
    Thread {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn errno(
        op: &'static str,
        path: impl Into<PathBuf>,
        errno: nix::errno::Errno,
    ) -> Self {
        Self::io(op, path, io::Error::from(errno))
    }

    /// The OS error number behind this error, if it came from a system call.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// True when the filesystem ran out of space (or quota).
    pub fn is_no_space(&self) -> bool {
        matches!(self.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
            || matches!(self, Error::Command { stderr, .. } if stderr.contains("No space left"))
    }
}

impl Error {}
