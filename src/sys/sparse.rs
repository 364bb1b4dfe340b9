//! Where a file holds data (SEEK_DATA/SEEK_HOLE): the one reader of a file's layout
//! for everything that skips holes (the sparse copy, the transfer reader, the check
//! whether an image was ever written).

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

use super::{Error, Result};

/// The first data range of `file` (at `path`, for errors) that ends after `offset`,
/// as `(start, end)` with `start >= offset`; `None` when only holes remain. A
/// filesystem without SEEK_DATA reports the whole file as one data range.
pub fn next_data(file: &File, path: &Path, offset: u64) -> Result<Option<(u64, u64)>> {
    let start = match lseek(file.as_fd(), offset as i64, Whence::SeekData) {
        Ok(pos) => pos,
        // No data after `offset`: the rest is a hole.
        Err(Errno::ENXIO) => return Ok(None),
        Err(e) => return Err(Error::errno("SEEK_DATA", path, e)),
    };
    let end = lseek(file.as_fd(), start, Whence::SeekHole)
        .map_err(|e| Error::errno("SEEK_HOLE", path, e))?;
    Ok(Some((start as u64, end as u64)))
}

/// The data ranges of `file` within `[start, end)`, clipped to it, in order.
pub fn data_ranges(file: &File, path: &Path, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    let mut at = start;
    while at < end {
        let Some((data, hole)) = next_data(file, path, at)? else {
            break;
        };
        if data >= end {
            break;
        }
        ranges.push((data, hole.min(end)));
        at = hole;
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testing::sparse_file;

    #[test]
    fn finds_the_data_between_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = sparse_file(dir.path(), "f", 16 << 20, &[(4 << 20, &[1u8; 1 << 20])]);
        let f = File::open(&path).unwrap();
        let ranges = data_ranges(&f, &path, 0, 16 << 20).unwrap();
        // Filesystems may round data out to their allocation unit.
        assert_eq!(ranges.len(), 1, "{ranges:?}");
        let (start, end) = ranges[0];
        assert!(start <= 4 << 20 && end >= 5 << 20, "{ranges:?}");
        assert!(end <= 16 << 20);
        assert_eq!(data_ranges(&f, &path, 8 << 20, 16 << 20).unwrap(), vec![]);
        assert_eq!(next_data(&f, &path, 8 << 20).unwrap(), None);
        let empty = sparse_file(dir.path(), "empty", 1 << 20, &[]);
        assert_eq!(
            next_data(&File::open(&empty).unwrap(), &empty, 0).unwrap(),
            None
        );
    }
}
