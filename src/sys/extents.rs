//! Where a file's blocks lie on its filesystem's device (from [`super::fiemap`]), and
//! allocating ranges of another file (`fallocate`): how a thick volume's blocks in an
//! image pool are backed by the host filesystem under the pool's image.

use std::fs::{File, OpenOptions};
use std::path::Path;

use nix::fcntl::{FallocateFlags, fallocate};

use super::{Error, Result};

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
/// starts before `from` is cut there), in file order, read with [`super::fiemap`]
/// (delayed allocations are flushed first). A block the filesystem cannot place
/// (inline, encoded or delayed data), or a filesystem without extent maps, is an error.
pub fn map(path: &Path, from: u64) -> Result<Vec<Extent>> {
    let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    let no_map = |detail: String| Error::Parse {
        what: "FIEMAP extents",
        detail: format!("{}: {detail}", path.display()),
    };
    let found = super::fiemap::extents(&file, path, from, size)?
        .ok_or_else(|| no_map("the filesystem has no extent maps".to_owned()))?;
    let mut extents = Vec::with_capacity(found.len());
    for extent in found {
        if !extent.has_own_location() {
            return Err(no_map(format!(
                "the extent at {} has no block address (flags {:#x})",
                extent.logical, extent.flags
            )));
        }
        let cut = from.saturating_sub(extent.logical).min(extent.length);
        extents.push(Extent {
            device: Range {
                offset: extent.physical + cut,
                length: extent.length - cut,
            },
            unwritten: extent.is_unwritten(),
            shared: extent.is_shared(),
        });
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
