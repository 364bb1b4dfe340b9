//! Sparse-aware file copy for pools that cannot reflink: only the data ranges are
//! copied ([`super::sparse`]), in the kernel (copy_file_range), holes stay holes.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use super::{Error, Result};

/// Bytes copied in one call to the kernel; `after_chunk` runs between chunks.
const CHUNK: usize = 64 << 20;

/// Copies `src` to the new file `dst`, preserving holes. `after_chunk` runs after each
/// chunk of data is copied (a test pause point holds a copy mid-way there).
pub fn sparse_copy(src: &Path, dst: &Path, after_chunk: &dyn Fn()) -> Result<()> {
    let source = File::open(src).map_err(|e| Error::io("open", src, e))?;
    let len = source
        .metadata()
        .map_err(|e| Error::io("stat", src, e))?
        .len();
    let target = super::fs::create_new(dst)?;
    target
        .set_len(len)
        .map_err(|e| Error::io("truncate", dst, e))?;
    let mut offset = 0;
    while offset < len {
        let Some((data, hole)) = super::sparse::next_data(&source, src, offset)? else {
            break;
        };
        copy_range(
            &source,
            src,
            &target,
            dst,
            (data as i64, hole as i64),
            after_chunk,
        )?;
        offset = hole;
    }
    target.sync_all().map_err(|e| Error::io("fsync", dst, e))
}

fn copy_range(
    source: &File,
    src: &Path,
    target: &File,
    dst: &Path,
    (start, end): (i64, i64),
    after_chunk: &dyn Fn(),
) -> Result<()> {
    let mut off_in = start;
    let mut off_out = start;
    while off_in < end {
        let chunk = ((end - off_in) as usize).min(CHUNK);
        let copied = nix::fcntl::copy_file_range(
            source.as_fd(),
            Some(&mut off_in),
            target.as_fd(),
            Some(&mut off_out),
            chunk,
        )
        .map_err(|e| Error::errno("copy_file_range", dst, e))?;
        if copied == 0 {
            return Err(Error::io(
                "copy_file_range",
                src,
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "source shrank while copying",
                ),
            ));
        }
        after_chunk();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn copies_data_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let writes: [(u64, &[u8]); 2] = [(1 << 20, &[7u8; 8192]), (40 << 20, b"tail data")];
        let src = crate::sys::testing::sparse_file(dir.path(), "src", 64 << 20, &writes);
        let dst = dir.path().join("dst");

        sparse_copy(&src, &dst, &|| {}).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let allocated = std::fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(
            allocated < 4 << 20,
            "holes were filled: {allocated} bytes allocated"
        );
    }
}
