//! Loop devices, driven through `/dev/loop-control` and the loop ioctls.
//!
//! A loop device is recognised by its backing file's device and inode, never by a
//! path, because several nodes (kind) may share one kernel. Where `/dev/loopN` does not
//! appear (a container with a static /dev), it is created here from the number that
//! sysfs reports.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::stat::{Mode, SFlag, makedev, mknod};

use super::{Error, Result};

const LOOP_CONTROL: &str = "/dev/loop-control";
const LOOP_MAJOR: u64 = 7;

// Request numbers from <linux/loop.h>; these are plain numbers, not _IOC encoded.
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn zeroed_info() -> LoopInfo64 {
    LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: 0,
        lo_file_name: [0; LO_NAME_SIZE],
        lo_crypt_name: [0; LO_NAME_SIZE],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    }
}

/// A bound loop device and what backs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    pub path: PathBuf,
    /// Device and inode of the backing file.
    pub backing_dev: u64,
    pub backing_ino: u64,
    /// The backing path as recorded at attach time (truncated to 63 bytes).
    pub backing_name: String,
    pub direct_io: bool,
}

/// Attaches `file` to a free loop device, with direct I/O when the backing
/// filesystem allows it and the logical sector size the kernel picks. Returns the
/// device path.
pub fn attach(file: &Path, read_only: bool) -> Result<PathBuf> {
    attach_with_block_size(file, read_only, 0)
}

/// Like [`attach`], with a fixed logical sector size (`block_size`: 512 to 4096, a
/// power of two; 0 lets the kernel pick it from the backing file's direct I/O
/// alignment, which can change over the file's life).
pub fn attach_with_block_size(file: &Path, read_only: bool, block_size: u32) -> Result<PathBuf> {
    // On XFS (a volume's image in the pool), held so that the device's writes leave the
    // image's times alone: see [`super::nocmtime`] for the flushes that saves.
    let backing = match super::nocmtime::open(file, read_only) {
        Some(backing) => backing,
        None => OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(file)
            .map_err(|e| Error::io("open", file, e))?,
    };
    let control = File::open(LOOP_CONTROL).map_err(|e| Error::io("open", LOOP_CONTROL, e))?;
    let mut flags = LO_FLAGS_DIRECT_IO | if read_only { LO_FLAGS_READ_ONLY } else { 0 };
    // Another process may take the free device between GET_FREE and CONFIGURE.
    for _ in 0..32 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if number < 0 {
            return Err(Error::io(
                "LOOP_CTL_GET_FREE",
                LOOP_CONTROL,
                std::io::Error::last_os_error(),
            ));
        }
        let path = ensure_node(number as u32)?;
        let device = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        let mut config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size,
            info: zeroed_info(),
            reserved: [0; 8],
        };
        config.info.lo_flags = flags;
        let name = file.as_os_str().as_encoded_bytes();
        let len = name.len().min(LO_NAME_SIZE - 1);
        config.info.lo_file_name[..len].copy_from_slice(&name[..len]);
        // SAFETY: `config` is a valid, initialised loop_config that outlives the call;
        // the kernel only reads it.
        let rc = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &config) };
        if rc == 0 {
            return Ok(path);
        }
        match Errno::last() {
            Errno::EBUSY => continue,
            // The backing filesystem cannot do direct I/O (tmpfs): fall back to buffered.
            Errno::EINVAL if flags & LO_FLAGS_DIRECT_IO != 0 => {
                tracing::warn!(file = %file.display(), "direct I/O refused, using buffered loop");
                flags &= !LO_FLAGS_DIRECT_IO;
                continue;
            }
            errno => return Err(Error::errno("LOOP_CONFIGURE", &path, errno)),
        }
    }
    Err(Error::errno("LOOP_CONFIGURE", file, Errno::EBUSY))
}

/// A volume's loop device merges no requests beyond the one-hit and plug merges
/// (`nomerges` 1, the kernel's default 0): the pool's own device below merges what
/// reaches it. Faster in A/B runs, measured in bench/README.md ("Loop queue
/// settings"). Writeback throttling stays on: the loop driver writes to
/// its backing file with direct I/O, which the pool's device does not throttle, so the
/// volume's device is the one place a pod's buffered writeback is throttled.
const NOMERGES: &str = "nomerges";

/// Sets [`NOMERGES`] on a volume's loop device. A refusal is logged and skipped: it
/// costs speed, never correctness.
pub fn tune_for_stacking(device: &Path) {
    set_queue(device, NOMERGES, "1");
}

/// Puts [`NOMERGES`] back to the kernel's default, so that whoever binds this loop
/// device next gets a stock one: queue settings outlive the binding.
fn restore_queue_defaults(device: &Path) {
    set_queue(device, NOMERGES, "0");
}

fn set_queue(device: &Path, attribute: &str, value: &str) {
    let Some(name) = device.file_name() else {
        return;
    };
    let path = Path::new("/sys/block")
        .join(name)
        .join("queue")
        .join(attribute);
    if let Err(e) = std::fs::write(&path, value) {
        tracing::warn!(path = %path.display(), value, error = %e, "loop queue setting refused");
    }
}

/// How long [`detach`] waits for the kernel to let go of a device that something else
/// held open when it was cleared.
const DETACH_DEADLINE: Duration = Duration::from_secs(10);

/// Detaches `device` and returns once it is really detached (or bound again, to
/// another file). A device that is not bound is left as it is.
///
/// LOOP_CLR_FD detaches at once only when the caller is the device's sole opener;
/// otherwise the kernel marks it to detach at the last close. Another opener is
/// common: a concurrent [`list_bound`] (of this process or another kura) holds every
/// bound device open for a moment, as does udev's blkid after a write. Returning
/// before that last close would let a DeleteVolume that follows find the volume still
/// attached. When the deadline passes with the device still bound (something keeps it
/// open), the error says so, and a retry clears it again.
pub fn detach(device: &Path) -> Result<()> {
    let bound_to = match status(device) {
        Ok(info) => (info.lo_device, info.lo_inode),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(()),
        Err(e) => return Err(e),
    };
    // Still bound to the caller's file here, so this cannot touch someone else's device.
    restore_queue_defaults(device);
    {
        let dev = File::open(device).map_err(|e| Error::io("open", device, e))?;
        // SAFETY: LOOP_CLR_FD takes no argument.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD) };
        if rc < 0 && Errno::last() != Errno::ENXIO {
            return Err(Error::io(
                "LOOP_CLR_FD",
                device,
                std::io::Error::last_os_error(),
            ));
        }
        // Closing it here is this process's last close: with no other opener, this is
        // where the kernel detaches it.
    }
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match status(device) {
            Ok(info) if (info.lo_device, info.lo_inode) == bound_to => {}
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(()),
            Err(e) => return Err(e),
        }
        if started.elapsed() >= DETACH_DEADLINE {
            return Err(Error::Timeout {
                step: format!(
                    "detaching {} (something else holds it open)",
                    device.display()
                ),
                seconds: DETACH_DEADLINE.as_secs(),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Makes the loop device re-read its backing file's size after the file grew.
pub fn refresh_capacity(device: &Path) -> Result<()> {
    let dev = File::open(device).map_err(|e| Error::io("open", device, e))?;
    // SAFETY: LOOP_SET_CAPACITY takes no argument.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_CAPACITY, 0) };
    if rc < 0 {
        return Err(Error::io(
            "LOOP_SET_CAPACITY",
            device,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The loop device currently bound to `file` (same device and inode), if any.
pub fn find_by_backing(file: &Path) -> Result<Option<LoopDevice>> {
    let meta = std::fs::metadata(file).map_err(|e| Error::io("stat", file, e))?;
    Ok(list_bound()?
        .into_iter()
        .find(|d| d.backing_dev == meta.dev() && d.backing_ino == meta.ino()))
}

/// Every bound loop device in this kernel, with its backing file's identity.
pub fn list_bound() -> Result<Vec<LoopDevice>> {
    let sys_block = Path::new("/sys/block");
    let entries = std::fs::read_dir(sys_block).map_err(|e| Error::io("read_dir", sys_block, e))?;
    let mut bound = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(number) = name
            .strip_prefix("loop")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Only bound devices have a backing_file attribute.
        if !entry.path().join("loop/backing_file").exists() {
            continue;
        }
        let path = ensure_node(number)?;
        match status(&path) {
            Ok(info) => bound.push(LoopDevice {
                path,
                backing_dev: info.lo_device,
                backing_ino: info.lo_inode,
                backing_name: c_string(&info.lo_file_name),
                direct_io: info.lo_flags & LO_FLAGS_DIRECT_IO != 0,
            }),
            // Detached between the sysfs look and the ioctl.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
            Err(e) => return Err(e),
        }
    }
    bound.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(bound)
}

fn status(device: &Path) -> Result<LoopInfo64> {
    let dev = File::open(device).map_err(|e| Error::io("open", device, e))?;
    let mut info = zeroed_info();
    // SAFETY: `info` is a valid loop_info64 the kernel writes into; it outlives the call.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_GET_STATUS64, &mut info) };
    if rc < 0 {
        return Err(Error::io(
            "LOOP_GET_STATUS64",
            device,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(info)
}

/// Returns `/dev/loopN`, creating the node when this /dev lacks it.
fn ensure_node(number: u32) -> Result<PathBuf> {
    let path = PathBuf::from(format!("/dev/loop{number}"));
    if path.exists() {
        return Ok(path);
    }
    // The minor number depends on the loop module's max_part; sysfs knows it.
    let dev_file = format!("/sys/block/loop{number}/dev");
    let text = std::fs::read_to_string(&dev_file).map_err(|e| Error::io("read", &dev_file, e))?;
    let minor = text
        .trim()
        .split_once(':')
        .and_then(|(_, minor)| minor.parse::<u64>().ok())
        .ok_or_else(|| Error::Parse {
            what: "loop device number",
            detail: format!("{dev_file}: {}", text.trim()),
        })?;
    match mknod(
        &path,
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o660),
        makedev(LOOP_MAJOR, minor),
    ) {
        Ok(()) | Err(Errno::EEXIST) => Ok(path),
        Err(errno) => Err(Error::errno("mknod", &path, errno)),
    }
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_match_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn c_string_stops_at_nul() {
        let mut name = [0u8; 8];
        name[..3].copy_from_slice(b"abc");
        assert_eq!(c_string(&name), "abc");
        assert_eq!(c_string(b"full"), "full");
    }
}
