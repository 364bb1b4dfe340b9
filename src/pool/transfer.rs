//! Cross-node transfers, both ends, in pool terms: how an image is cut into chunks
//! (source), and how a destination builds a volume from them, resumably (import).
//!
//! # Chunks
//!
//! An image is read in fixed cells of [`CHUNK`] bytes (the last may be shorter). A
//! cell's data ranges are found with SEEK_DATA/SEEK_HOLE ([`sys::sparse`]), read with
//! O_DIRECT `pread` ([`sys::direct`]), and cut further at [`BLOCK`] granularity into runs of non-zero blocks: a [`Chunk`] carries
//! those runs ([`Chunk::extents`]) and their bytes; everything else in the cell, holes
//! and zero blocks alike, travels as the cell's range only and is never written on the
//! destination, so its file is at least as sparse as the source's. Every chunk carries
//! a CRC-32C (hardware) over its range, its extents and its bytes, checked on receipt.
//!
//! # Digest
//!
//! The whole image's digest is a chain over the cells in order: `D0 = SHA-256("kura
//! transfer v1", size)`, `Dn+1 = SHA-256(Dn, offset, length, extents, crc)`. It needs
//! no second pass over the data (the per-chunk CRCs cover the bytes), and its state is
//! 32 bytes, which the destination persists in its checkpoint, so a resumed transfer
//! continues the chain instead of starting over. The source computes its own chain
//! over its pinned image: on a resumed stream it reads the prefix again on its side
//! (no network, holes skipped) to get there. The destination commits only when both
//! chains agree.
//!
//! # Import (destination)
//!
//! `volumes/<id>.img.partial` is the image being filled (created at the source's
//! size, sparse), `volumes/<id>.transfer` the checkpoint: which export and pin it
//! reads, the next cell, the chain state, the bytes written. The checkpoint is
//! rewritten (after an `fdatasync` of the image, so what it claims is on disk) every
//! [`CHECKPOINT_SPAN`] bytes of image. Start-up keeps a `.partial` that has a
//! checkpoint whose grant has not expired (the transfer resumes from it on the next
//! request) and removes every other leftover.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::capacity::Need;
use super::encryption::Encryption;
use super::ids::VolumeId;
use super::volume::{Provisioning, Volume, VolumeSpec};
use super::{Error, Pool, Result, Timestamp, partial_path, read_meta, size, write_meta};
use crate::sys;

/// Bytes of image per chunk.
pub const CHUNK: u64 = 16 << 20;
/// Granularity of zero detection: a block of zeros inside data is not sent.
pub const BLOCK: usize = 4096;
/// The destination checkpoints after this many bytes of image.
pub const CHECKPOINT_SPAN: u64 = 32 << 20;

/// One cell of an image: `[offset, offset+length)`, its non-zero data ranges and
/// their bytes, concatenated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub length: u64,
    pub extents: Vec<(u64, u64)>,
    pub data: Bytes,
    pub crc: u32,
}

impl Chunk {
    /// The CRC-32C of the chunk's range, extents and bytes.
    pub fn checksum(offset: u64, length: u64, extents: &[(u64, u64)], data: &[u8]) -> u32 {
        let mut header = Vec::with_capacity(16 + 16 * extents.len());
        header.extend_from_slice(&offset.to_le_bytes());
        header.extend_from_slice(&length.to_le_bytes());
        for (o, l) in extents {
            header.extend_from_slice(&o.to_le_bytes());
            header.extend_from_slice(&l.to_le_bytes());
        }
        crc32c::crc32c_append(crc32c::crc32c(&header), data)
    }

    /// Whether the chunk is whole: its extents lie in order within its range, its
    /// bytes are theirs, and its CRC matches.
    pub fn verify(&self) -> std::result::Result<(), String> {
        let mut at = self.offset;
        let mut total = 0u64;
        for &(o, l) in &self.extents {
            if o < at || l == 0 || o + l > self.offset + self.length {
                return Err(format!(
                    "chunk at {}: extent {o}+{l} is out of order or out of range",
                    self.offset
                ));
            }
            at = o + l;
            total += l;
        }
        if total != self.data.len() as u64 {
            return Err(format!(
                "chunk at {}: {} bytes of data for extents of {total} bytes",
                self.offset,
                self.data.len()
            ));
        }
        let crc = Chunk::checksum(self.offset, self.length, &self.extents, &self.data);
        if crc != self.crc {
            return Err(format!(
                "chunk at {} failed its checksum (crc32c {crc:08x}, sent {:08x})",
                self.offset, self.crc
            ));
        }
        Ok(())
    }
}

/// The running digest of an image's chunks (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain([u8; 32]);

impl Chain {
    pub fn start(size: u64) -> Chain {
        let mut h = Sha256::new();
        h.update(b"kura transfer v1");
        h.update(size.to_le_bytes());
        Chain(h.finalize().into())
    }

    pub fn add(&mut self, chunk: &Chunk) {
        let mut h = Sha256::new();
        h.update(self.0);
        h.update(chunk.offset.to_le_bytes());
        h.update(chunk.length.to_le_bytes());
        for (o, l) in &chunk.extents {
            h.update(o.to_le_bytes());
            h.update(l.to_le_bytes());
        }
        h.update(chunk.crc.to_le_bytes());
        self.0 = h.finalize().into();
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(text: &str) -> Option<Chain> {
        if text.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Chain(out))
    }
}

/// Reads an image as chunks, in order.
pub struct Reader {
    file: File,
    /// The same file opened with O_DIRECT (where the filesystem allows it): the
    /// pinned image is read once, so caching its pages would only cost copies.
    direct: File,
    path: PathBuf,
    size: u64,
    next: u64,
}

impl Reader {
    /// Opens `path` to read from `offset` (a multiple of [`CHUNK`]). The chain of the
    /// chunks before `offset` is computed here, reading them (see the module docs).
    pub fn open(path: &Path, offset: u64) -> Result<(Reader, Chain)> {
        let file = File::open(path).map_err(|e| sys::Error::io("open", path, e))?;
        let size = file
            .metadata()
            .map_err(|e| sys::Error::io("stat", path, e))?
            .len();
        if !offset.is_multiple_of(CHUNK) || offset > size {
            return Err(Error::Invalid {
                field: "offset",
                reason: format!("{offset} is not a chunk boundary within {size} bytes"),
            });
        }
        let direct = sys::direct::open(path, false)?;
        let mut reader = Reader {
            file,
            direct,
            path: path.to_owned(),
            size,
            next: 0,
        };
        let mut chain = Chain::start(size);
        while reader.next < offset {
            let chunk = reader.next_chunk()?.expect("offset is within the image");
            chain.add(&chunk);
        }
        Ok((reader, chain))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next chunk, or `None` at the end of the image.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk>> {
        if self.next >= self.size {
            return Ok(None);
        }
        let offset = self.next;
        let length = CHUNK.min(self.size - offset);
        let chunk = self.chunk(offset, length)?;
        self.next = offset + length;
        Ok(Some(chunk))
    }

    /// The chunk of `[offset, offset+length)`, any range of the image (a replica is
    /// sent only the ranges that changed).
    pub fn chunk(&self, offset: u64, length: u64) -> Result<Chunk> {
        let end = offset + length;
        let ranges = sys::sparse::data_ranges(&self.file, &self.path, offset, end)?;
        let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
        let mut buf = sys::direct::aligned(total as usize);
        let mut filled = 0usize;
        for &(start, stop) in &ranges {
            let len = (stop - start) as usize;
            // Where the buffer, the offset and the length allow it, O_DIRECT.
            let aligned =
                filled.is_multiple_of(sys::direct::ALIGN) && sys::direct::is_aligned(start, len);
            let file = if aligned { &self.direct } else { &self.file };
            file.read_exact_at(&mut buf[filled..filled + len], start)
                .map_err(|e| sys::Error::io("read", &self.path, e))?;
            filled += len;
        }
        let extents = drop_zero_blocks(&ranges, &mut buf);
        let data = buf.freeze();
        let crc = Chunk::checksum(offset, length, &extents, &data);
        Ok(Chunk {
            offset,
            length,
            extents,
            data,
            crc,
        })
    }
}

/// Cuts the data `ranges` (whose bytes fill `buf`, concatenated) into runs of
/// non-zero [`BLOCK`]s, compacting `buf` to the bytes of those runs. Blocks are
/// aligned to the image, so a run never starts mid-block but where data does.
fn drop_zero_blocks(ranges: &[(u64, u64)], buf: &mut BytesMut) -> Vec<(u64, u64)> {
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let mut read = 0usize;
    let mut write = 0usize;
    for &(start, stop) in ranges {
        let mut at = start;
        while at < stop {
            let block_end = ((at / BLOCK as u64 + 1) * BLOCK as u64).min(stop);
            let len = (block_end - at) as usize;
            let zero = is_zero(&buf[read..read + len]);
            if !zero {
                if read != write {
                    buf.copy_within(read..read + len, write);
                }
                write += len;
                match extents.last_mut() {
                    Some((o, l)) if *o + *l == at => *l += len as u64,
                    _ => extents.push((at, len as u64)),
                }
            }
            read += len;
            at = block_end;
        }
    }
    buf.truncate(write);
    extents
}

/// Whether every byte is zero, a word at a time.
fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; the slices cover `bytes` exactly.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// What a destination knows of the export it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRef {
    pub export_id: String,
    pub pin: String,
    pub size_bytes: u64,
    pub encryption: Encryption,
    /// Unix seconds when the grant expires.
    pub expires: i64,
}

/// The checkpoint document beside a `.partial` image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Checkpoint {
    export_id: String,
    pin: String,
    /// The source image's size: what the `.partial` holds.
    pub(super) size_bytes: u64,
    /// The next cell to receive; everything before it is on disk.
    offset: u64,
    chain: String,
    /// Data bytes written so far.
    pub(super) bytes_done: u64,
    pub(super) expires: i64,
}

/// What a transfer request finds on the destination.
pub enum Begin {
    /// The volume exists already (the transfer finished earlier).
    Exists(Volume),
    /// A transfer to run, perhaps resumed.
    Import(Box<Import>),
}

/// A volume being filled from chunks.
pub struct Import {
    id: VolumeId,
    spec: VolumeSpec,
    volume_size: u64,
    /// The `.partial`, written with O_DIRECT: the data goes to the disk once, without
    /// a copy into the page cache that the commit would have to write back anyway.
    file: Direct,
    partial: PathBuf,
    checkpoint_path: PathBuf,
    state: Checkpoint,
    chain: Chain,
    checkpointed_at: u64,
    pause: sys::pause::Points,
}

impl Pool {
    fn transfer_checkpoint_path(&self, id: &VolumeId) -> PathBuf {
        self.volume_dir().join(format!("{id}.transfer"))
    }

    /// Starts or resumes making the volume `spec` names from `source`: a checkpoint
    /// of the same export and pin is resumed; anything else there is dropped and the
    /// import starts at 0.
    pub fn begin_import(&self, spec: &VolumeSpec, source: &ExportRef) -> Result<Begin> {
        let id = VolumeId::derive(&spec.name, &self.node);
        if let Some(existing) = read_meta::<Volume>(&self.volume_meta_path(&id))? {
            super::volume::check_compatible(&existing, spec)?;
            return Ok(Begin::Exists(existing));
        }
        super::volume::check_source_encryption(source.encryption, spec)?;
        let volume_size = size::for_new_volume(
            spec.range,
            self.options.default_volume_size,
            source.size_bytes,
        )
        .map_err(Error::OutOfRange)?;
        self.check_maximum(volume_size, spec.provisioning)?;
        let image = self.image_path(&id);
        let partial = partial_path(&image);
        let checkpoint_path = self.transfer_checkpoint_path(&id);
        let pause = self.options.pause.clone();
        if let Some(mut state) = read_meta::<Checkpoint>(&checkpoint_path)?
            && state.export_id == source.export_id
            && state.pin == source.pin
            && state.size_bytes == source.size_bytes
            && let Some(chain) = Chain::from_hex(&state.chain)
            && let Ok(file) = Direct::open(&partial)
        {
            state.expires = source.expires;
            write_meta(&checkpoint_path, &state)?;
            tracing::info!(volume.id = %id, offset = state.offset, bytes.done = state.bytes_done, "transfer resumed from its checkpoint");
            let checkpointed_at = state.offset;
            return Ok(Begin::Import(Box::new(Import {
                id,
                spec: spec.clone(),
                volume_size,
                file,
                partial,
                checkpoint_path,
                state,
                chain,
                checkpointed_at,
                pause,
            })));
        }
        // Anything else left for this volume reads another moment: start over.
        self.remove_image(&partial)?;
        sys::fs::remove(&checkpoint_path)?;
        // A thin copy promises its whole size, as a create does. (The promise is
        // checked here, not held: the copy spans many calls.)
        drop(self.promise(Need::New(spec.provisioning), volume_size)?);
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(|e| sys::Error::io("create", &partial, e))?;
        created
            .set_len(source.size_bytes)
            .map_err(|e| sys::Error::io("truncate", &partial, e))?;
        drop(created);
        let file = Direct::open(&partial)?;
        let chain = Chain::start(source.size_bytes);
        let state = Checkpoint {
            export_id: source.export_id.clone(),
            pin: source.pin.clone(),
            size_bytes: source.size_bytes,
            offset: 0,
            chain: chain.hex(),
            bytes_done: 0,
            expires: source.expires,
        };
        if let Err(e) = write_meta(&checkpoint_path, &state) {
            let _ = sys::fs::remove(&partial);
            return Err(e);
        }
        tracing::info!(volume.id = %id, size = source.size_bytes, "transfer started");
        Ok(Begin::Import(Box::new(Import {
            id,
            spec: spec.clone(),
            volume_size,
            file,
            partial,
            checkpoint_path,
            state,
            chain,
            checkpointed_at: 0,
            pause,
        })))
    }

    /// Start-up: a transfer's `.partial` and checkpoint stay while its grant is valid
    /// (the next request resumes it); expired or orphaned ones are removed.
    pub(super) fn recover_imports(&self) -> Result<()> {
        let dir = self.volume_dir();
        let now = Timestamp::now().seconds;
        for entry in std::fs::read_dir(&dir)
            .map_err(|e| sys::Error::io("read_dir", &dir, e))?
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_none_or(|x| x != "transfer") {
                continue;
            }
            let partial = partial_path(&path.with_extension("img"));
            let keep = match read_meta::<Checkpoint>(&path) {
                Ok(Some(state)) => state.expires > now && partial.exists(),
                _ => false,
            };
            if !keep {
                tracing::warn!(path = %path.display(), "removing an expired or broken transfer");
                self.remove_image(&partial)?;
                sys::fs::remove(&path)?;
            }
        }
        Ok(())
    }

    /// Whether a `.partial` image belongs to a transfer that may resume.
    pub(super) fn is_resumable_import(&self, partial: &Path) -> bool {
        let name = partial.file_name().unwrap_or_default().to_string_lossy();
        name.strip_suffix(".img.partial")
            .is_some_and(|stem| self.volume_dir().join(format!("{stem}.transfer")).exists())
    }

    /// The progress (data bytes written, source size) of a resumable transfer for a
    /// volume of this name, if any.
    pub fn import_progress(&self, name: &str) -> Result<Option<(u64, u64)>> {
        let id = VolumeId::derive(name, &self.node);
        Ok(
            read_meta::<Checkpoint>(&self.transfer_checkpoint_path(&id))?
                .map(|s| (s.bytes_done, s.size_bytes)),
        )
    }

    /// Removes what a transfer for the volume of this name left: its `.partial`
    /// and its checkpoint.
    pub fn abandon_import(&self, name: &str) -> Result<()> {
        let id = VolumeId::derive(name, &self.node);
        self.remove_image(&partial_path(&self.image_path(&id)))?;
        sys::fs::remove(&self.transfer_checkpoint_path(&id))?;
        Ok(())
    }

    /// Commits an import whose chain matched the source's: the image is synced,
    /// grown to the volume's size, renamed into place, and the metadata written.
    pub fn commit_import(&self, import: Box<Import>) -> Result<Volume> {
        let Import {
            id,
            spec,
            volume_size,
            file,
            partial,
            checkpoint_path,
            ..
        } = *import;
        file.buffered
            .sync_all()
            .map_err(|e| sys::Error::io("fsync", &partial, e))?;
        drop(file);
        let image = self.image_path(&id);
        let thick = spec.provisioning == Provisioning::Thick;
        sys::fs::grow_image(&partial, volume_size, thick)
            .map_err(|e| super::volume::no_space_or(e, volume_size, 0))?;
        if thick {
            self.back_on_host(&partial)?;
        }
        sys::fs::rename(&partial, &image)?;
        let volume = self.commit_volume(id.clone(), &spec, volume_size, &image)?;
        sys::fs::remove(&checkpoint_path)?;
        tracing::info!(volume.id = %id, volume.size = volume_size, "volume created by a transfer");
        Ok(volume)
    }
}

impl Pool {
    /// Test-only hook `damage-chunk` (a file in the pause directory): the next chunk
    /// read for a transfer is damaged after its checksum was taken. Never on in
    /// production (see [`sys::pause`]).
    pub fn test_damage_in_flight(&self) -> bool {
        self.options.pause.take("damage-chunk")
    }
}

impl Import {
    pub fn id(&self) -> &VolumeId {
        &self.id
    }

    /// Where the next chunk starts.
    pub fn offset(&self) -> u64 {
        self.state.offset
    }

    pub fn bytes_done(&self) -> u64 {
        self.state.bytes_done
    }

    pub fn size(&self) -> u64 {
        self.state.size_bytes
    }

    /// Checks a chunk and writes its data at its offsets; checkpoints every
    /// [`CHECKPOINT_SPAN`]. A chunk out of order or damaged is [`Error::Damaged`].
    pub fn write(&mut self, chunk: &Chunk) -> Result<()> {
        let expected = CHUNK.min(self.state.size_bytes.saturating_sub(self.state.offset));
        if chunk.offset != self.state.offset || chunk.length != expected || expected == 0 {
            return Err(Error::Damaged(format!(
                "chunk at {}+{} arrived where {}+{expected} was expected",
                chunk.offset, chunk.length, self.state.offset
            )));
        }
        chunk.verify().map_err(Error::Damaged)?;
        let mut at = 0usize;
        for &(offset, len) in &chunk.extents {
            let bytes = &chunk.data[at..at + len as usize];
            self.file
                .write_at(bytes, offset)
                .map_err(|e| self.full_or(sys::Error::io("write", &self.partial, e)))?;
            at += len as usize;
        }
        self.chain.add(chunk);
        self.state.offset += chunk.length;
        self.state.bytes_done += chunk.data.len() as u64;
        if self.state.offset - self.checkpointed_at >= CHECKPOINT_SPAN {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// A full pool is [`Error::NoSpace`] (the scheduler may pick another node).
    fn full_or(&self, e: sys::Error) -> Error {
        let left = self.state.size_bytes - self.state.offset;
        super::volume::no_space_or(e, left, 0)
    }

    /// Makes what was written durable, then records it.
    fn checkpoint(&mut self) -> Result<()> {
        self.file
            .buffered
            .sync_data()
            .map_err(|e| self.full_or(sys::Error::io("fdatasync", &self.partial, e)))?;
        self.state.chain = self.chain.hex();
        write_meta(&self.checkpoint_path, &self.state)?;
        self.checkpointed_at = self.state.offset;
        tracing::debug!(volume.id = %self.id, offset = self.state.offset, "transfer checkpoint");
        self.pause.at("transfer-checkpoint");
        Ok(())
    }

    /// Whether every chunk arrived and the chain matches the source's digest.
    pub fn check_digest(&self, digest: &[u8]) -> Result<()> {
        if self.state.offset != self.state.size_bytes {
            return Err(Error::Damaged(format!(
                "the transfer ended at {} of {} bytes",
                self.state.offset, self.state.size_bytes
            )));
        }
        if digest != self.chain.bytes() {
            return Err(Error::Damaged(format!(
                "the image's digest {} does not match the source's",
                self.chain.hex()
            )));
        }
        Ok(())
    }
}

/// A file written with O_DIRECT where the range allows it, through a reused aligned
/// buffer, and through the page cache where it does not (a range not aligned to
/// [`sys::direct::ALIGN`], which SEEK_DATA on a filesystem of smaller blocks could
/// give).
struct Direct {
    direct: File,
    buffered: File,
    /// [`CHUNK`] aligned bytes: the I/O buffer.
    buf: BytesMut,
}

impl Direct {
    fn open(path: &Path) -> Result<Direct> {
        Ok(Direct {
            direct: sys::direct::open(path, true)?,
            buffered: OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| sys::Error::io("open", path, e))?,
            buf: sys::direct::aligned(CHUNK as usize),
        })
    }

    fn write_at(&mut self, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        if !sys::direct::is_aligned(offset, bytes.len()) {
            return self.buffered.write_all_at(bytes, offset);
        }
        for (i, piece) in bytes.chunks(CHUNK as usize).enumerate() {
            let aligned = &mut self.buf[..piece.len()];
            aligned.copy_from_slice(piece);
            self.direct
                .write_all_at(aligned, offset + (i as u64) * CHUNK)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_skip_holes_and_zero_blocks_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        // Data, then a written zero block, then data again, in the first cell.
        let writes: [(u64, &[u8]); 4] = [
            (8192, &[1u8; 4096]),
            (12288, &[0u8; 4096]),
            (16384, &[2u8; 100]),
            (CHUNK + 4096, b"tail"),
        ];
        let path = crate::sys::testing::sparse_file(dir.path(), "img", CHUNK + CHUNK / 2, &writes);

        let (mut reader, chain0) = Reader::open(&path, 0).unwrap();
        let first = reader.next_chunk().unwrap().unwrap();
        // The written zero block is dropped; the last block is data up to where the
        // filesystem says data ends (the 100 bytes, or their whole block).
        assert_eq!(first.extents[0], (8192, 4096));
        assert_eq!(first.extents[1].0, 16384);
        assert!(
            [100, 4096].contains(&first.extents[1].1),
            "{:?}",
            first.extents
        );
        assert_eq!(first.extents.len(), 2);
        assert_eq!(&first.data[..4096], &[1u8; 4096][..]);
        assert_eq!(&first.data[4096..4196], &[2u8; 100][..]);
        first.verify().unwrap();
        let second = reader.next_chunk().unwrap().unwrap();
        assert_eq!((second.offset, second.length), (CHUNK, CHUNK / 2));
        assert_eq!(second.extents.len(), 1);
        assert_eq!(second.extents[0].0, CHUNK + 4096);
        assert_eq!(&second.data[..4], b"tail");
        assert!(reader.next_chunk().unwrap().is_none());

        let mut damaged = first.clone();
        let mut bytes = damaged.data.to_vec();
        bytes[0] ^= 1;
        damaged.data = bytes.into();
        assert!(damaged.verify().is_err());

        // A reader opened mid-way has the chain of the prefix.
        let mut chain = chain0;
        chain.add(&first);
        let (_, resumed) = Reader::open(&path, CHUNK).unwrap();
        assert_eq!(resumed, chain);
        assert_eq!(Chain::from_hex(&chain.hex()), Some(chain));
    }
}
