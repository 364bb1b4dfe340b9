//! Changed block tracking: which ranges of a snapshot hold data ("allocated"), and
//! which may differ between two snapshots of one volume ("delta").
//!
//! Snapshots on a reflink pool are reflinks of the volume image, so two of them map
//! the same physical extent at the same logical offset wherever the volume was not
//! written in between: the answer is read from the extent maps ([`sys::fiemap`]), in
//! time proportional to the extents, never from the data. Where extents cannot tell
//! (a full copy made on a pool without reflink, or a record older than
//! [`Snapshot::image`]), the two images are compared block by block with direct reads,
//! which is slow but exact to the block.
//!
//! # Guarantees
//!
//! - Never under-reports: a block whose bytes differ is in the delta; a block that
//!   holds data is in the allocated ranges.
//! - A listed snapshot is pinned: its image is held open ([`Pinned`]) until the
//!   stream ends, so a delete meanwhile changes nothing in the answer and frees the
//!   space once the stream is over. An open file is all the pin is: a client that
//!   hangs up or a killed process leaves nothing behind on disk.
//! - Ranges come in order, merged where adjacent, none ending at or before the
//!   starting offset, none past the capacity, at most `max` per batch.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ids::SnapshotId;
use super::{Error, Pool, Result, Snapshot};
use crate::sys::{self, fiemap::Extent};

/// A byte range `[start, end)`.
pub type Range = (u64, u64);

/// The block of the data comparison: a difference is reported as the 4 KiB blocks
/// that hold it (every volume's loop device has 4 KiB sectors).
pub const BLOCK: u64 = 4096;
/// How much of an image is mapped or compared at a time: bounds the memory a stream
/// takes whatever the volume's size.
const WINDOW: u64 = 1 << 30;
/// How much of each image the data comparison reads at a time.
const READ: usize = 1 << 20;
/// How long a stream may go without a message while the work goes on: well within
/// the controller's deadline per message in the split.
pub const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(2);
/// Ranges per message when the client leaves it to kura (`max_results` 0).
pub const DEFAULT_MAX_RESULTS: usize = 1024;

/// How a snapshot's image was made, recorded in its metadata: whether its extents
/// can be compared with another snapshot's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageOrigin {
    /// A reflink of the volume image: shares every extent not written since.
    Reflink,
    /// A full copy (a pool without reflink): shares nothing with anything.
    Copy,
}

/// Which way a delta was computed: the metric label and the debug log say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Extents,
    Data,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Extents => "extents",
            Method::Data => "data",
        }
    }
}

/// What a stream lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// The ranges of a snapshot that hold data.
    Allocated(SnapshotId),
    /// The ranges that may differ between two snapshots of one volume.
    Delta {
        base: SnapshotId,
        target: SnapshotId,
    },
}

/// How many deltas this process answered each way, for the metrics.
#[derive(Debug, Default)]
pub struct Served {
    extents: std::sync::atomic::AtomicU64,
    data: std::sync::atomic::AtomicU64,
}

impl Served {
    pub fn record(&self, method: Method) {
        let counter = match method {
            Method::Extents => &self.extents,
            Method::Data => &self.data,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Each method with its count.
    pub fn counts(&self) -> [(Method, u64); 2] {
        let read = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        [
            (Method::Extents, read(&self.extents)),
            (Method::Data, read(&self.data)),
        ]
    }
}

/// An image held open: readable until this is dropped even if its file is removed
/// meanwhile.
#[derive(Debug)]
pub struct Image {
    file: File,
    path: PathBuf,
    size: u64,
    /// Whether its extents can be compared with those of another reflink of the same
    /// volume ([`ImageOrigin::Reflink`]).
    reflinked: bool,
}

impl Image {
    /// Opens `path` (O_DIRECT where the filesystem allows it); a missing file is
    /// `None`.
    pub fn open(path: PathBuf, size: u64, origin: ImageOrigin) -> Result<Option<Image>> {
        match sys::direct::open(&path, false) {
            Ok(file) => Ok(Some(Image {
                file,
                path,
                size,
                reflinked: origin == ImageOrigin::Reflink,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The image's size, as its record gives it.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// A snapshot held open for a stream: its record and its image, readable until this
/// is dropped even if the snapshot is deleted meanwhile.
#[derive(Debug)]
pub struct Pinned {
    pub snapshot: Snapshot,
    image: Image,
}

impl Pool {
    /// Opens a ready snapshot for listing. An unknown one is NOT_FOUND (CSI spec,
    /// "GetMetadataAllocated Errors" and "GetMetadataDelta Errors": "Invalid
    /// `snapshot_id`"); one whose copy still runs is FAILED_PRECONDITION, the code
    /// CSI gives an object in a state that forbids the call (the delta table's
    /// "Changed block tracking is not enabled": no answer can be given yet).
    pub fn pin_snapshot(&self, id: &SnapshotId) -> Result<Pinned> {
        let snapshot = self.snapshot(id)?;
        if !snapshot.ready {
            return Err(Error::Precondition(format!(
                "snapshot {id} is not ready: its copy is still running"
            )));
        }
        let origin = snapshot.image.unwrap_or(ImageOrigin::Copy);
        let image = Image::open(self.snapshot_image_path(id), snapshot.size_bytes, origin)?
            // Deleted between its record and its image.
            .ok_or_else(|| Error::NotFound {
                kind: "snapshot",
                id: id.to_string(),
            })?;
        Ok(Pinned { snapshot, image })
    }
}

/// Checks a delta request against its two snapshots: the target's capacity. Base
/// and target of different volumes, or a target not taken after the base, are
/// INVALID_ARGUMENT (CSI spec, "GetMetadataDelta Errors": "Missing or otherwise
/// invalid argument"; the request's target is "a second snapshot in the same volume,
/// created after the base snapshot").
pub fn check_delta(base: &Snapshot, target: &Snapshot, start: u64) -> Result<u64> {
    if base.source_volume != target.source_volume {
        return Err(Error::Invalid {
            field: "target_snapshot_id",
            reason: format!(
                "snapshot {} is of volume {}, the base snapshot {} of volume {}: a delta is \
                 between two snapshots of one volume",
                target.id, target.source_volume, base.id, base.source_volume
            ),
        });
    }
    let at = |s: &Snapshot| (s.created.seconds, s.created.nanos);
    if at(target) <= at(base) {
        return Err(Error::Invalid {
            field: "target_snapshot_id",
            reason: format!(
                "snapshot {} was not taken after the base snapshot {}",
                target.id, base.id
            ),
        });
    }
    check_start(target, start)
}

/// The capacity a stream reports, once `start` is known to lie within it: past it is
/// OUT_OF_RANGE (CSI spec, "GetMetadataAllocated Errors" and "GetMetadataDelta
/// Errors": "Invalid `starting_offset`", "exceeds the volume size"). At the capacity
/// exactly, nothing is left: an empty answer.
pub fn check_start(snapshot: &Snapshot, start: u64) -> Result<u64> {
    if start > snapshot.size_bytes {
        return Err(Error::OutOfRange(format!(
            "starting_offset: {start} is past the volume's capacity of {} bytes",
            snapshot.size_bytes
        )));
    }
    Ok(snapshot.size_bytes)
}

/// Streams the allocated ranges of `pinned` from `start` into `out`.
pub fn allocated(pinned: &Pinned, out: &mut Batcher) -> Result<()> {
    let pinned = &pinned.image;
    let capacity = pinned.size;
    let mut at = window_start(out.start);
    while at < capacity && !out.stopped() {
        let end = (at + WINDOW).min(capacity);
        let ranges = match map(pinned, at, end)? {
            Some(extents) => written(&extents),
            None => sys::sparse::data_ranges(&pinned.file, &pinned.path, at, end)?,
        };
        for range in ranges {
            out.push(range);
        }
        at = end;
    }
    out.finish();
    Ok(())
}

/// Streams the ranges that may differ between `base` and `target` from `start` into
/// `out`; answers which way they were found.
pub fn delta(base: &Pinned, target: &Pinned, out: &mut Batcher) -> Result<Method> {
    images_delta(&base.image, &target.image, out)
}

/// Every range that may differ between two images of one volume, merged, whatever
/// their number: what a replica is sent ([`super::replica`]).
pub fn changed_between(base: &Image, target: &Image) -> Result<(Vec<Range>, Method)> {
    let mut ranges = Vec::new();
    let method = {
        let mut out = Batcher::new(0, target.size, usize::MAX, |batch| {
            ranges.extend(batch);
            true
        })
        .with_keepalive(std::time::Duration::MAX);
        images_delta(base, target, &mut out)?
    };
    Ok((ranges, method))
}

/// [`delta`] between two open images.
fn images_delta(base: &Image, target: &Image, out: &mut Batcher) -> Result<Method> {
    let capacity = target.size;
    let by_extents = base.reflinked && target.reflinked;
    let mut method = if by_extents {
        Method::Extents
    } else {
        Method::Data
    };
    let mut at = window_start(out.start);
    while at < capacity && !out.stopped() {
        let end = (at + WINDOW).min(capacity);
        let maps = match method {
            Method::Extents => map(base, at, end)?.zip(map(target, at, end)?),
            Method::Data => None,
        };
        match maps {
            Some((b, t)) => {
                for range in changed(&b, &t, (at, end)) {
                    out.push(range);
                }
            }
            None => {
                method = Method::Data;
                compare_data(
                    base,
                    target,
                    (at.max(out.start - out.start % BLOCK), end),
                    out,
                )?;
            }
        }
        at = end;
    }
    out.finish();
    Ok(method)
}

/// The window that holds `start`.
fn window_start(start: u64) -> u64 {
    start - start % WINDOW
}

fn map(pinned: &Image, start: u64, end: u64) -> Result<Option<Vec<Extent>>> {
    Ok(sys::fiemap::extents(
        &pinned.file,
        &pinned.path,
        start,
        end,
    )?)
}

/// The ranges of written data among `extents` (unwritten ones read as zeros).
pub fn written(extents: &[Extent]) -> Vec<Range> {
    extents
        .iter()
        .filter(|e| !e.is_unwritten())
        .map(|e| (e.logical, e.end()))
        .collect()
}

/// The ranges of `window` whose content may differ between two extent maps: all but
/// where both read as zeros (a hole or an unwritten extent in each) and where both map
/// the same physical bytes.
pub fn changed(base: &[Extent], target: &[Extent], window: Range) -> Vec<Range> {
    let mut cuts: Vec<u64> = vec![window.0, window.1];
    for e in base.iter().chain(target) {
        cuts.extend([e.logical, e.end()]);
    }
    cuts.retain(|&c| c >= window.0 && c <= window.1);
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<Range> = Vec::new();
    let (mut bi, mut ti) = (0, 0);
    for piece in cuts.windows(2) {
        let (start, end) = (piece[0], piece[1]);
        let b = covering(base, &mut bi, start);
        let t = covering(target, &mut ti, start);
        if !same_content(b, t, start) {
            merge_into(&mut out, (start, end));
        }
    }
    out
}

/// The extent of `map` (sorted) that holds `offset`, moving `index` forward.
fn covering<'a>(map: &'a [Extent], index: &mut usize, offset: u64) -> Option<&'a Extent> {
    while *index < map.len() && map[*index].end() <= offset {
        *index += 1;
    }
    map.get(*index).filter(|e| e.logical <= offset)
}

/// Whether the bytes at `offset` are the same in two files, as far as the extents
/// tell.
fn same_content(base: Option<&Extent>, target: Option<&Extent>, offset: u64) -> bool {
    let zeros = |e: Option<&Extent>| e.is_none_or(|e| e.is_unwritten());
    match (base, target) {
        _ if zeros(base) && zeros(target) => true,
        (Some(b), Some(t)) => {
            !b.is_unwritten()
                && !t.is_unwritten()
                && b.has_own_location()
                && t.has_own_location()
                && b.physical + (offset - b.logical) == t.physical + (offset - t.logical)
        }
        _ => false,
    }
}

/// Appends `range` to `ranges` (in order), joining it to the last one it touches.
pub fn merge_into(ranges: &mut Vec<Range>, range: Range) {
    match ranges.last_mut() {
        Some(last) if last.1 >= range.0 => last.1 = last.1.max(range.1),
        _ => ranges.push(range),
    }
}

/// Compares two images in `window` block by block into `out`: the blocks that
/// differ. Only where either holds data is read; a block past an image's end reads as
/// zeros (the base of a volume that grew). Long stretches without a difference keep
/// the stream alive ([`Batcher::keepalive`]).
fn compare_data(base: &Image, target: &Image, window: Range, out: &mut Batcher) -> Result<()> {
    let mut data = sys::sparse::data_ranges(&base.file, &base.path, window.0, window.1)?;
    data.extend(sys::sparse::data_ranges(
        &target.file,
        &target.path,
        window.0,
        window.1,
    )?);
    data.sort_unstable();
    let mut union: Vec<Range> = Vec::new();
    for (start, end) in data {
        let aligned = (start - start % BLOCK, end.div_ceil(BLOCK) * BLOCK);
        merge_into(&mut union, (aligned.0, aligned.1.min(window.1)));
    }
    let (mut a, mut b) = (sys::direct::aligned(READ), sys::direct::aligned(READ));
    for (start, end) in union {
        let mut at = start;
        while at < end && !out.stopped() {
            let len = ((end - at) as usize).min(READ);
            read_block_aligned(base, at, &mut a[..len])?;
            read_block_aligned(target, at, &mut b[..len])?;
            for range in differing_blocks(at, &a[..len], &b[..len]) {
                out.push(range);
            }
            out.keepalive();
            at += len as u64;
        }
    }
    Ok(())
}

/// Fills `buf` from `offset`; what lies past the end of the image is zeros.
fn read_block_aligned(pinned: &Image, offset: u64, buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = pinned
            .file
            .read_at(&mut buf[done..], offset + done as u64)
            .map_err(|e| sys::Error::io("read", &pinned.path, e))?;
        if n == 0 {
            break;
        }
        done += n;
    }
    buf[done..].fill(0);
    Ok(())
}

/// The [`BLOCK`]s at which `a` and `b` (read at `offset`) differ, merged.
pub fn differing_blocks(offset: u64, a: &[u8], b: &[u8]) -> Vec<Range> {
    let mut out = Vec::new();
    for (i, (x, y)) in a
        .chunks(BLOCK as usize)
        .zip(b.chunks(BLOCK as usize))
        .enumerate()
    {
        if x != y {
            let start = offset + i as u64 * BLOCK;
            merge_into(&mut out, (start, start + x.len() as u64));
        }
    }
    out
}

/// Turns ranges found in order into a stream's batches: merged where adjacent, cut
/// at the starting offset and at the capacity, at most `max` a batch, each handed to
/// `send`, which answers false once nobody listens.
pub struct Batcher<'a> {
    start: u64,
    capacity: u64,
    max: usize,
    pending: Option<Range>,
    batch: Vec<Range>,
    sent_any: bool,
    stopped: bool,
    /// When a message last went out, and how long the reader may wait for the next.
    last_sent: std::time::Instant,
    keepalive: std::time::Duration,
    send: Box<dyn FnMut(Vec<Range>) -> bool + 'a>,
}

impl<'a> Batcher<'a> {
    /// `max` 0 is [`DEFAULT_MAX_RESULTS`].
    pub fn new(
        start: u64,
        capacity: u64,
        max: usize,
        send: impl FnMut(Vec<Range>) -> bool + 'a,
    ) -> Self {
        Batcher {
            start,
            capacity,
            max: if max == 0 { DEFAULT_MAX_RESULTS } else { max },
            pending: None,
            batch: Vec::new(),
            sent_any: false,
            stopped: false,
            last_sent: std::time::Instant::now(),
            keepalive: KEEPALIVE,
            send: Box::new(send),
        }
    }

    /// Sends an empty batch when nothing went out for `every` (default
    /// [`KEEPALIVE`]).
    pub fn with_keepalive(mut self, every: std::time::Duration) -> Self {
        self.keepalive = every;
        self
    }

    /// Called as slow work goes on: when nothing was sent for the keepalive interval,
    /// sends an empty batch, so a reader with a deadline per message (the controller
    /// of a split) knows the node is still at work. Empty batches after the first
    /// are not relayed to the CSI client.
    pub fn keepalive(&mut self) {
        if self.last_sent.elapsed() >= self.keepalive && self.batch.is_empty() {
            self.flush();
        }
    }

    /// Whether the receiver went away: the work may stop.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds the next range (ranges come in order).
    pub fn push(&mut self, range: Range) {
        let range = (range.0.max(self.start), range.1.min(self.capacity));
        if range.0 >= range.1 || self.stopped {
            return;
        }
        match &mut self.pending {
            Some(pending) if pending.1 >= range.0 => pending.1 = pending.1.max(range.1),
            pending => {
                if let Some(done) = pending.replace(range) {
                    self.add(done);
                }
            }
        }
    }

    fn add(&mut self, range: Range) {
        self.batch.push(range);
        if self.batch.len() >= self.max {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        self.sent_any = true;
        self.last_sent = std::time::Instant::now();
        if !self.stopped && !(self.send)(batch) {
            self.stopped = true;
        }
    }

    /// Sends what is left. A stream with no ranges at all still sends one (empty)
    /// message, which carries the capacity.
    pub fn finish(&mut self) {
        if let Some(last) = self.pending.take() {
            self.add(last);
        }
        if !self.batch.is_empty() || !self.sent_any {
            self.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fiemap::FLAG_UNWRITTEN;

    fn ext(logical: u64, physical: u64, length: u64) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags: 0,
        }
    }

    fn unwritten(logical: u64, physical: u64, length: u64) -> Extent {
        Extent {
            flags: FLAG_UNWRITTEN,
            ..ext(logical, physical, length)
        }
    }

    /// A name, the base's and the target's extents, the changed ranges.
    type ChangedCase = (&'static str, Vec<Extent>, Vec<Extent>, Vec<Range>);
    /// A name, the starting offset, the capacity, max_results, the messages.
    type BatchCase = (&'static str, u64, u64, usize, Vec<Vec<Range>>);

    #[test]
    fn changed_ranges_of_two_extent_maps() {
        let cases: Vec<ChangedCase> = vec![
            ("both empty", vec![], vec![], vec![]),
            (
                "the same extent",
                vec![ext(0, 1000, 100)],
                vec![ext(0, 1000, 100)],
                vec![],
            ),
            (
                "a rewritten middle",
                vec![ext(0, 1000, 300)],
                vec![ext(0, 1000, 100), ext(100, 5000, 100), ext(200, 1200, 100)],
                vec![(100, 200)],
            ),
            (
                "split differently, same bytes",
                vec![ext(0, 1000, 50), ext(50, 1050, 50)],
                vec![ext(0, 1000, 100)],
                vec![],
            ),
            (
                "same physical at another logical offset",
                vec![ext(0, 1000, 100)],
                vec![ext(100, 1000, 100)],
                vec![(0, 200)],
            ),
            (
                "data written into a hole",
                vec![],
                vec![ext(100, 9000, 100)],
                vec![(100, 200)],
            ),
            (
                "data punched out",
                vec![ext(0, 1000, 100)],
                vec![],
                vec![(0, 100)],
            ),
            (
                "hole against unwritten reads zeros in both",
                vec![unwritten(0, 1000, 100)],
                vec![],
                vec![],
            ),
            (
                "unwritten against written",
                vec![unwritten(0, 1000, 100)],
                vec![ext(0, 1000, 100)],
                vec![(0, 100)],
            ),
            (
                "adjacent changes merge",
                vec![ext(0, 1000, 100), ext(100, 2000, 100)],
                vec![ext(0, 3000, 100), ext(100, 4000, 100)],
                vec![(0, 200)],
            ),
            (
                "clipped to the window",
                vec![],
                vec![ext(0, 1000, 1000)],
                vec![(200, 600)],
            ),
        ];
        for (name, base, target, want) in cases {
            let window = if name == "clipped to the window" {
                (200, 600)
            } else {
                (0, 1000)
            };
            assert_eq!(changed(&base, &target, window), want, "{name}");
        }
        let unknown = Extent {
            flags: crate::sys::fiemap::FLAG_UNKNOWN,
            ..ext(0, 1000, 100)
        };
        assert_eq!(
            changed(&[unknown], &[unknown], (0, 100)),
            vec![(0, 100)],
            "an extent without its own location is never taken as the same"
        );
    }

    /// Runs ranges through a batcher: the messages it sends.
    fn batches(start: u64, capacity: u64, max: usize, ranges: &[Range]) -> Vec<Vec<Range>> {
        let mut sent = Vec::new();
        let mut batcher = Batcher::new(start, capacity, max, |b| {
            sent.push(b);
            true
        });
        for &r in ranges {
            batcher.push(r);
        }
        batcher.finish();
        drop(batcher);
        sent
    }

    #[test]
    fn batches_merge_resume_clip_and_cut() {
        let ranges = [(0, 10), (10, 20), (30, 40), (50, 60), (60, 70), (90, 200)];
        let cases: Vec<BatchCase> = vec![
            (
                "adjacent merge",
                0,
                100,
                0,
                vec![vec![(0, 20), (30, 40), (50, 70), (90, 100)]],
            ),
            (
                "max 1: one a message",
                0,
                100,
                1,
                vec![
                    vec![(0, 20)],
                    vec![(30, 40)],
                    vec![(50, 70)],
                    vec![(90, 100)],
                ],
            ),
            (
                "max 3",
                0,
                100,
                3,
                vec![vec![(0, 20), (30, 40), (50, 70)], vec![(90, 100)]],
            ),
            (
                "resume inside a range",
                35,
                100,
                0,
                vec![vec![(35, 40), (50, 70), (90, 100)]],
            ),
            (
                "resume at a range's end",
                40,
                100,
                0,
                vec![vec![(50, 70), (90, 100)]],
            ),
            ("resume at the capacity", 100, 100, 0, vec![vec![]]),
        ];
        for (name, start, capacity, max, want) in cases {
            assert_eq!(batches(start, capacity, max, &ranges), want, "{name}");
        }
        assert_eq!(batches(0, 100, 0, &[]), vec![vec![]], "empty: one message");
        // A receiver gone stops the sending.
        let mut sent = 0;
        let mut batcher = Batcher::new(0, 100, 1, |_| {
            sent += 1;
            false
        });
        for &r in &ranges {
            batcher.push(r);
        }
        batcher.finish();
        assert!(batcher.stopped());
        drop(batcher);
        assert_eq!(sent, 1);
    }

    #[test]
    fn keepalives_are_empty_batches_while_nothing_is_found() {
        let mut sent = Vec::new();
        let mut batcher = Batcher::new(0, 100, 0, |b| {
            sent.push(b);
            true
        })
        .with_keepalive(std::time::Duration::ZERO);
        batcher.keepalive();
        batcher.push((10, 20));
        batcher.keepalive();
        batcher.finish();
        drop(batcher);
        assert_eq!(sent, vec![vec![], vec![], vec![(10, 20)]]);
    }

    #[test]
    fn differing_blocks_are_whole_blocks() {
        let a = vec![0u8; 5 * BLOCK as usize];
        let mut b = a.clone();
        b[1] = 1;
        b[BLOCK as usize + 7] = 1;
        b[3 * BLOCK as usize] = 1;
        let base = 1 << 20;
        assert_eq!(
            differing_blocks(base, &a, &b),
            vec![
                (base, base + 2 * BLOCK),
                (base + 3 * BLOCK, base + 4 * BLOCK)
            ]
        );
        assert_eq!(differing_blocks(0, &a, &a), vec![]);
    }

    fn pinned(path: &std::path::Path, size: u64, image: ImageOrigin) -> Pinned {
        let id = SnapshotId::derive(
            &path.display().to_string(),
            &super::super::NodeToken::for_node("n"),
        );
        Pinned {
            snapshot: Snapshot {
                id,
                name: "s".into(),
                source_volume: super::super::VolumeId::derive(
                    "v",
                    &super::super::NodeToken::for_node("n"),
                ),
                size_bytes: size,
                created: super::super::Timestamp::now(),
                ready: true,
                encryption: Default::default(),
                group: None,
                image: Some(image),
            },
            image: Image::open(path.to_owned(), size, image).unwrap().unwrap(),
        }
    }

    fn collect(run: impl FnOnce(&mut Batcher) -> Result<()>) -> Vec<Range> {
        let mut all = Vec::new();
        let mut out = Batcher::new(0, u64::MAX, 0, |b| {
            all.extend(b);
            true
        });
        run(&mut out).unwrap();
        drop(out);
        all
    }

    /// Two reflinked images on XFS, one rewritten in places (one rewrite with the same
    /// bytes, one punched hole): the extent path reports each rewritten range and the
    /// hole, the data path exactly the blocks whose bytes differ.
    #[test]
    fn deltas_of_reflinked_images_by_extents_and_by_data() {
        use std::os::unix::fs::FileExt;
        let xfs = sys::testing::Xfs::mount("cbt");
        let size = 16u64 << 20;
        let data = vec![5u8; 4 << 20];
        let a = sys::testing::sparse_file(&xfs.dir, "a", size, &[(0, &data)]);
        let b = xfs.dir.join("b");
        sys::fs::reflink(&a, &b).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
        f.write_all_at(&[6u8; 8192], 1 << 20).unwrap();
        f.write_all_at(&[5u8; 4096], 2 << 20).unwrap();
        f.write_all_at(&[7u8; 4096], 10 << 20).unwrap();
        nix::fcntl::fallocate(
            &f,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            3 << 20,
            4096,
        )
        .unwrap();
        f.sync_all().unwrap();
        let (pa, pb) = (
            pinned(&a, size, ImageOrigin::Reflink),
            pinned(&b, size, ImageOrigin::Reflink),
        );
        let mut method = None;
        let by_extents = collect(|out| delta(&pa, &pb, out).map(|m| method = Some(m)));
        assert_eq!(method, Some(Method::Extents));
        let blk = |at: u64, n: u64| (at, at + n * BLOCK);
        assert_eq!(
            by_extents,
            vec![
                blk(1 << 20, 2),
                blk(2 << 20, 1),
                blk(3 << 20, 1),
                blk(10 << 20, 1)
            ]
        );
        let pb = pinned(&b, size, ImageOrigin::Copy);
        let by_data = collect(|out| delta(&pa, &pb, out).map(|m| method = Some(m)));
        assert_eq!(method, Some(Method::Data));
        // The same-bytes rewrite is no difference to the data path.
        assert_eq!(
            by_data,
            vec![blk(1 << 20, 2), blk(3 << 20, 1), blk(10 << 20, 1)]
        );
        let allocated_b = collect(|out| allocated(&pb, out));
        assert_eq!(
            allocated_b,
            vec![(0, 3 << 20), (blk(3 << 20, 1).1, 4 << 20), blk(10 << 20, 1)]
        );
    }
}
