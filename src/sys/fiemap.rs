//! A file's extent map (the FS_IOC_FIEMAP ioctl): which logical ranges of a file map
//! to which physical ranges of its filesystem, and how (written, unwritten, shared).
//! Two reflinked files that share a physical extent at the same logical offset hold
//! the same bytes there: what changed block tracking reads instead of the data.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::{Error, Result};

/// `_IOWR('f', 11, struct fiemap)`: the header is 32 bytes.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// Flush dirty data first, so delayed allocations have their physical extents.
const FIEMAP_FLAG_SYNC: u32 = 0x1;
/// Bytes of `struct fiemap` before its extents.
const HEADER: usize = 32;
/// Bytes of one `struct fiemap_extent`.
const EXTENT: usize = 56;
/// Extents asked for per call.
const BATCH: usize = 512;

/// The last extent of the file.
pub const FLAG_LAST: u32 = 0x1;
/// The physical location is not known (yet).
pub const FLAG_UNKNOWN: u32 = 0x2;
/// Delayed allocation: no physical extent yet.
pub const FLAG_DELALLOC: u32 = 0x4;
/// The data is encoded (compressed): the physical range does not map bytes 1:1.
pub const FLAG_ENCODED: u32 = 0x8;
/// The data is stored in metadata blocks, not in an extent of its own.
pub const FLAG_NOT_ALIGNED: u32 = 0x100;
pub const FLAG_DATA_INLINE: u32 = 0x200;
pub const FLAG_DATA_TAIL: u32 = 0x400;
/// Allocated but never written: reads as zeros.
pub const FLAG_UNWRITTEN: u32 = 0x800;
/// The physical extent is shared with another file (a reflink).
pub const FLAG_SHARED: u32 = 0x2000;

/// One extent of a file, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.logical + self.length
    }

    /// Allocated but never written: reads as zeros, holds no data.
    pub fn is_unwritten(&self) -> bool {
        self.flags & FLAG_UNWRITTEN != 0
    }

    pub fn is_shared(&self) -> bool {
        self.flags & FLAG_SHARED != 0
    }

    /// Whether `physical` names where the bytes are, one to one: false for extents
    /// whose location is unknown, delayed, encoded or packed with others, which can
    /// never be taken as the same as another file's.
    pub fn has_own_location(&self) -> bool {
        const UNRELIABLE: u32 = FLAG_UNKNOWN
            | FLAG_DELALLOC
            | FLAG_ENCODED
            | FLAG_NOT_ALIGNED
            | FLAG_DATA_INLINE
            | FLAG_DATA_TAIL;
        self.flags & UNRELIABLE == 0
    }
}

/// The extents of `file` (at `path`, for errors) that overlap `[start, end)`, in
/// logical order, as the filesystem reports them (not clipped), after flushing the
/// file's dirty data. `Ok(None)` when the filesystem has no extent maps (EOPNOTSUPP).
pub fn extents(file: &File, path: &Path, start: u64, end: u64) -> Result<Option<Vec<Extent>>> {
    let mut out = Vec::new();
    let mut at = start;
    // u64 words keep the buffer aligned for the struct's 64-bit fields.
    let mut buf = vec![0u64; (HEADER + BATCH * EXTENT) / 8];
    while at < end {
        buf.fill(0);
        let header = header_bytes(at, end - at, BATCH as u32);
        as_bytes(&mut buf)[..HEADER].copy_from_slice(&header);
        // SAFETY: `buf` is a live, 8-byte-aligned buffer of HEADER + BATCH * EXTENT
        // bytes: a `struct fiemap` whose fm_extent_count (BATCH) says how many extents
        // the kernel may write after the header, so it writes only inside `buf`. The
        // fd is open for as long as `file` is borrowed.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) };
        if rc < 0 {
            let errno = nix::errno::Errno::last();
            if errno == nix::errno::Errno::EOPNOTSUPP && out.is_empty() {
                return Ok(None);
            }
            return Err(Error::errno("FIEMAP", path, errno));
        }
        let bytes = as_bytes(&mut buf);
        let mapped = u32::from_ne_bytes(bytes[20..24].try_into().expect("4 bytes")) as usize;
        let batch: Vec<Extent> = (0..mapped.min(BATCH))
            .map(|i| parse_extent(&bytes[HEADER + i * EXTENT..HEADER + (i + 1) * EXTENT]))
            .collect();
        let Some(last) = batch.last().copied() else {
            break;
        };
        out.extend(batch);
        if last.flags & FLAG_LAST != 0 || last.end() <= at {
            break;
        }
        at = last.end();
    }
    Ok(Some(out))
}

/// A `struct fiemap` header asking for `count` extents of `[start, start + length)`.
fn header_bytes(start: u64, length: u64, count: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..8].copy_from_slice(&start.to_ne_bytes());
    h[8..16].copy_from_slice(&length.to_ne_bytes());
    h[16..20].copy_from_slice(&FIEMAP_FLAG_SYNC.to_ne_bytes());
    // fm_mapped_extents (20..24) is the kernel's to fill.
    h[24..28].copy_from_slice(&count.to_ne_bytes());
    h
}

/// One `struct fiemap_extent`: logical, physical, length, two reserved u64, flags.
fn parse_extent(b: &[u8]) -> Extent {
    let word = |at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    Extent {
        logical: word(0),
        physical: word(8),
        length: word(16),
        flags: u32::from_ne_bytes(b[40..44].try_into().expect("4 bytes")),
    }
}

fn as_bytes(words: &mut [u64]) -> &mut [u8] {
    let len = std::mem::size_of_val(words);
    // SAFETY: any u64 slice is a valid, initialised byte slice of 8 times its length,
    // borrowed mutably for as long as `words` is.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testing::sparse_file;
    use std::os::unix::fs::FileExt;

    /// The written (not unwritten) extents, merged where adjacent.
    fn written(extents: &[Extent]) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for e in extents.iter().filter(|e| !e.is_unwritten()) {
            match out.last_mut() {
                Some(last) if last.1 == e.logical => last.1 = e.end(),
                _ => out.push((e.logical, e.end())),
            }
        }
        out
    }

    #[test]
    fn maps_written_ranges_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = [7u8; 1 << 20];
        let path = sparse_file(dir.path(), "f", 16 << 20, &[(4 << 20, &data)]);
        let f = File::open(&path).unwrap();
        let Some(map) = extents(&f, &path, 0, 16 << 20).unwrap() else {
            panic!("the test directory's filesystem has FIEMAP");
        };
        let ranges = written(&map);
        assert_eq!(ranges.len(), 1, "{map:?}");
        assert!(ranges[0].0 <= 4 << 20 && ranges[0].1 >= 5 << 20, "{map:?}");
        assert!(map.iter().all(|e| e.has_own_location()), "{map:?}");
        // A window after the data sees nothing.
        assert_eq!(extents(&f, &path, 8 << 20, 16 << 20).unwrap(), Some(vec![]));
        // Preallocated space is unwritten: no data.
        let pre = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        nix::fcntl::fallocate(
            &pre,
            nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            8 << 20,
            1 << 20,
        )
        .unwrap();
        let map = extents(&f, &path, 0, 16 << 20).unwrap().unwrap();
        assert!(map.iter().any(|e| e.is_unwritten()), "{map:?}");
        assert_eq!(written(&map), ranges);
    }

    /// A reflinked copy on XFS shares its extents with the original at the same
    /// physical offsets until one of them is written, and no longer there.
    #[test]
    fn reflinks_share_physical_extents_on_xfs() {
        let xfs = crate::sys::testing::Xfs::mount("fiemap");
        let data = vec![3u8; 2 << 20];
        let a = sparse_file(&xfs.dir, "a", 8 << 20, &[(1 << 20, &data)]);
        let b = xfs.dir.join("b");
        crate::sys::fs::reflink(&a, &b).unwrap();
        let map = |p: &Path| {
            let f = File::open(p).unwrap();
            extents(&f, p, 0, 8 << 20).unwrap().unwrap()
        };
        let (ma, mb) = (map(&a), map(&b));
        assert_eq!(ma, mb, "a reflink maps the same extents");
        assert!(ma.iter().all(|e| e.is_shared()), "{ma:?}");
        // Rewrite 4 KiB of b: that block gets a physical extent of its own.
        let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
        f.write_all_at(&[9u8; 4096], 2 << 20).unwrap();
        f.sync_all().unwrap();
        let mb = map(&b);
        let at = |m: &[Extent], off: u64| {
            let e = m
                .iter()
                .find(|e| e.logical <= off && off < e.end())
                .unwrap();
            e.physical + (off - e.logical)
        };
        assert_ne!(at(&ma, 2 << 20), at(&mb, 2 << 20));
        assert_eq!(at(&ma, 1 << 20), at(&mb, 1 << 20));
        assert_eq!(at(&ma, (2 << 20) + 4096), at(&mb, (2 << 20) + 4096));
    }

    /// More extents than one call returns: every one comes, in order.
    #[test]
    fn maps_many_extents_across_calls() {
        let xfs = crate::sys::testing::Xfs::mount("fiemap-many");
        let path = sparse_file(&xfs.dir, "many", 256 << 20, &[]);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let count = 32 * 1024u64;
        for k in 0..count {
            f.write_all_at(&[1u8; 4096], 2 * k * 4096).unwrap();
        }
        f.sync_all().unwrap();
        let map = extents(&File::open(&path).unwrap(), &path, 0, 256 << 20)
            .unwrap()
            .unwrap();
        let ranges = written(&map);
        assert_eq!(
            ranges.len() as u64,
            count,
            "{:?}",
            &ranges[ranges.len() - 3..]
        );
        assert!(map.windows(2).all(|w| w[0].end() <= w[1].logical));
    }
}
