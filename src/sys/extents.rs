//! Where a file's blocks lie on its filesystem's device (`FS_IOC_FIEMAP`), and
//! allocating ranges of another file (`fallocate`): how a thick volume's blocks in an
//! image pool are backed by the host filesystem under the pool's image.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::fcntl::{FallocateFlags, fallocate};

use super::{Error, Result};

/// `struct fiemap` of <linux/fiemap.h>, without its trailing extents.
#[repr(C)]
#[derive(Debug, Default)]
struct FiemapHeader {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
}

/// `struct fiemap_extent`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

/// How many extents one FIEMAP call returns at most.
const BATCH: usize = 256;

/// The header and room for [`BATCH`] extents, as the kernel fills them.
#[repr(C)]
struct FiemapBuffer {
    header: FiemapHeader,
    extents: [FiemapExtent; BATCH],
}

// The request number is encoded with the header's size, as in <linux/fs.h>.
nix::ioctl_readwrite!(fs_ioc_fiemap, b'f', 11, FiemapHeader);

const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Extents whose `physical` is no block address: unknown, delayed allocation,
/// encoded, inline or tail-packed data.
const FIEMAP_EXTENT_NO_ADDRESS: u32 = 0x2 | 0x4 | 0x8 | 0x200 | 0x400;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;

/// A byte range on a device (or in a file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub length: u64,
}

/// Where one piece of a file lies on its filesystem's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub device: Range,
    /// Allocated but never written: reads as zeros without reading the device.
    pub unwritten: bool,
    /// Shared with another file (a reflink).
    pub shared: bool,
}

/// The extents of the file at `path` from byte `from` to its end (an extent that
/// starts before `from` is cut there), in file order. Delayed allocations are
/// flushed first; a block the filesystem cannot place (inline data) is an error.
pub fn map(path: &Path, from: u64) -> Result<Vec<Extent>> {
    let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    let mut extents = Vec::new();
    let mut start = from;
    let mut buffer = Box::new(FiemapBuffer {
        header: FiemapHeader::default(),
        extents: [FiemapExtent::default(); BATCH],
    });
    while start < size {
        buffer.header = FiemapHeader {
            start,
            length: size - start,
            flags: FIEMAP_FLAG_SYNC,
            extent_count: BATCH as u32,
            ..Default::default()
        };
        // SAFETY: the pointer is to a FiemapBuffer, a fiemap header followed by room
        // for `extent_count` extents, which the kernel fills; it outlives the call.
        unsafe {
            fs_ioc_fiemap(
                file.as_raw_fd(),
                (&mut *buffer as *mut FiemapBuffer).cast::<FiemapHeader>(),
            )
        }
        .map_err(|e| Error::errno("FS_IOC_FIEMAP", path, e))?;
        let mapped = (buffer.header.mapped_extents as usize).min(BATCH);
        if mapped == 0 {
            break;
        }
        let mut last = false;
        for extent in &buffer.extents[..mapped] {
            if extent.flags & FIEMAP_EXTENT_NO_ADDRESS != 0 {
                return Err(Error::Parse {
                    what: "FIEMAP extents",
                    detail: format!(
                        "{}: the extent at {} has no block address (flags {:#x})",
                        path.display(),
                        extent.logical,
                        extent.flags
                    ),
                });
            }
            let cut = from.saturating_sub(extent.logical).min(extent.length);
            extents.push(Extent {
                device: Range {
                    offset: extent.physical + cut,
                    length: extent.length - cut,
                },
                unwritten: extent.flags & FIEMAP_EXTENT_UNWRITTEN != 0,
                shared: extent.flags & FIEMAP_EXTENT_SHARED != 0,
            });
            start = extent.logical + extent.length;
            last |= extent.flags & FIEMAP_EXTENT_LAST != 0;
        }
        if last {
            break;
        }
    }
    extents.retain(|e| e.device.length > 0);
    Ok(extents)
}

/// Sorts ranges and joins those that touch or overlap.
pub fn merge(mut ranges: Vec<Range>) -> Vec<Range> {
    ranges.sort_by_key(|r| r.offset);
    let mut merged: Vec<Range> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(prev) if range.offset <= prev.offset + prev.length => {
                let end = (prev.offset + prev.length).max(range.offset + range.length);
                prev.length = end - prev.offset;
            }
            _ => merged.push(range),
        }
    }
    merged
}

/// Allocates the given ranges of the file at `path` (its size unchanged; data already
/// there untouched), and makes the allocation durable. ENOSPC when its filesystem
/// cannot hold them; ranges allocated before the failure stay allocated.
pub fn allocate(path: &Path, ranges: &[Range]) -> Result<()> {
    apply(path, ranges, FallocateFlags::FALLOC_FL_KEEP_SIZE)
}

/// Frees the given ranges of the file at `path` (they read as zeros after; its size
/// unchanged), durably.
pub fn punch(path: &Path, ranges: &[Range]) -> Result<()> {
    apply(
        path,
        ranges,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
    )
}

fn apply(path: &Path, ranges: &[Range], mode: FallocateFlags) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    for range in ranges {
        fallocate(&file, mode, range.offset as i64, range.length as i64)
            .map_err(|e| Error::errno("fallocate", path, e))?;
    }
    file.sync_data().map_err(|e| Error::io("fsync", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64, length: u64) -> Range {
        Range { offset, length }
    }

    #[test]
    fn merges_touching_and_overlapping_ranges() {
        assert_eq!(merge(vec![]), vec![]);
        assert_eq!(
            merge(vec![r(100, 10), r(0, 10), r(10, 5), r(105, 20), r(50, 1)]),
            vec![r(0, 15), r(50, 1), r(100, 25)]
        );
        assert_eq!(merge(vec![r(0, 100), r(10, 5)]), vec![r(0, 100)]);
    }

    #[test]
    fn the_structures_have_the_kernels_sizes() {
        assert_eq!(std::mem::size_of::<FiemapHeader>(), 32);
        assert_eq!(std::mem::size_of::<FiemapExtent>(), 56);
    }

    #[test]
    fn maps_an_allocated_file_from_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        crate::sys::fs::create_image(&path, 8 << 20, true).unwrap();
        let bytes = |extents: &[Extent]| extents.iter().map(|e| e.device.length).sum::<u64>();
        let whole = map(&path, 0).unwrap();
        assert!(bytes(&whole) >= 8 << 20, "{whole:?}");
        assert!(whole.iter().all(|e| e.unwritten && !e.shared), "{whole:?}");
        let tail = map(&path, 3 << 20).unwrap();
        assert_eq!(bytes(&tail), bytes(&whole) - (3 << 20), "{tail:?}");
        let sparse = dir.path().join("s");
        crate::sys::fs::create_image(&sparse, 8 << 20, false).unwrap();
        assert_eq!(map(&sparse, 0).unwrap(), vec![]);
    }
}
