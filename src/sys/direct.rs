//! Direct I/O (O_DIRECT): files opened to bypass the page cache where the filesystem
//! allows it, and the aligned buffers such I/O needs.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use bytes::BytesMut;

use super::{Error, Result};

/// The alignment of direct I/O buffers, offsets and lengths: a 4 KiB block, which
/// covers every logical sector size kura's devices and pools have.
pub const ALIGN: usize = 4096;

/// Opens `path` for direct reads (or writes, with `write`); a filesystem that refuses
/// O_DIRECT gets a file through the page cache instead.
pub fn open(path: &Path, write: bool) -> Result<File> {
    let open = |flags| {
        OpenOptions::new()
            .read(!write)
            .write(write)
            .custom_flags(flags)
            .open(path)
    };
    open(libc::O_DIRECT)
        .or_else(|_| open(0))
        .map_err(|e| Error::io("open", path, e))
}

/// `len` zero bytes whose start is aligned to [`ALIGN`].
pub fn aligned(len: usize) -> BytesMut {
    let mut buf = BytesMut::zeroed(len + ALIGN);
    let skip = buf.as_ptr().align_offset(ALIGN);
    bytes::Buf::advance(&mut buf, skip);
    buf.truncate(len);
    buf
}

/// Whether an offset and a length can go through a direct file as they are.
pub fn is_aligned(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_aligned() {
        for len in [0, 1, 4096, 1 << 20] {
            let buf = aligned(len);
            assert_eq!(buf.len(), len);
            assert!(buf.as_ptr().align_offset(ALIGN) == 0 || len == 0);
        }
        assert!(is_aligned(8192, 4096));
        assert!(!is_aligned(8192, 100));
        assert!(!is_aligned(100, 4096));
    }
}
