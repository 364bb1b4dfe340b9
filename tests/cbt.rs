//! Changed block tracking (the SnapshotMetadata service) on a real driver: real
//! volumes (raw block, ext4, xfs) on a reflink XFS pool, real writes, discards and
//! expansions, and the answers checked against the snapshots' bytes.
//!
//! - Reconstruction: for every pair of snapshots, the base's image with the target's
//!   bytes copied over the delta ranges is the target's image, byte for byte; every
//!   non-zero block of a snapshot lies in its allocated ranges.
//! - The protocol: resuming at random offsets, one range a message, the error codes.
//! - Pinning: a snapshot deleted mid-stream is still listed whole, and freed once
//!   the stream ends or the client hangs up.
//! - The data-comparison path on a pool without reflink.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use kura::csi::proto::{self, snapshot_metadata_client::SnapshotMetadataClient};
use tonic::transport::Channel;
use tonic::{Code, Status};

const BLOCK: u64 = 4096;

type Range = (u64, u64);

/// A small deterministic generator (xorshift64*): the same writes on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// One stream's answer: the capacity every message carried, and the messages' ranges.
#[derive(Debug)]
struct Answer {
    capacity: u64,
    messages: Vec<Vec<Range>>,
}

impl Answer {
    fn ranges(&self) -> Vec<Range> {
        self.messages.iter().flatten().copied().collect()
    }
}

/// Checks what the spec asks of every message and of the stream as a whole.
fn answer(kinds_and_messages: Vec<(i32, i64, Vec<proto::BlockMetadata>)>) -> Answer {
    assert!(!kinds_and_messages.is_empty(), "a stream has a message");
    let capacity = kinds_and_messages[0].1;
    let mut messages = Vec::new();
    let mut last_end = 0u64;
    for (kind, cap, blocks) in kinds_and_messages {
        assert_eq!(kind, proto::BlockMetadataType::VariableLength as i32);
        assert_eq!(cap, capacity, "the same capacity in every message");
        let ranges: Vec<Range> = blocks
            .iter()
            .map(|b| {
                assert!(b.size_bytes > 0, "{b:?}");
                (b.byte_offset as u64, (b.byte_offset + b.size_bytes) as u64)
            })
            .collect();
        for r in &ranges {
            assert!(r.0 >= last_end, "ranges in order, not overlapping: {r:?}");
            assert!(r.1 <= capacity as u64, "{r:?} past capacity {capacity}");
            last_end = r.1;
        }
        messages.push(ranges);
    }
    Answer {
        capacity: capacity as u64,
        messages,
    }
}

/// Every message of a metadata stream (Allocated and Delta messages have the same
/// fields, in different types): its ranges by message, and the capacity they carried.
macro_rules! read_all {
    ($stream:expr) => {{
        let mut stream = $stream;
        let mut all = Vec::new();
        while let Some(m) = stream.message().await? {
            all.push((
                m.block_metadata_type,
                m.volume_capacity_bytes,
                m.block_metadata,
            ));
        }
        Ok(answer(all))
    }};
}

fn client(channel: &Channel) -> SnapshotMetadataClient<Channel> {
    SnapshotMetadataClient::new(channel.clone())
}

async fn allocated(channel: &Channel, id: &str, start: i64, max: i32) -> Result<Answer, Status> {
    let stream = client(channel)
        .get_metadata_allocated(proto::GetMetadataAllocatedRequest {
            snapshot_id: id.into(),
            starting_offset: start,
            max_results: max,
            ..Default::default()
        })
        .await?
        .into_inner();
    read_all!(stream)
}

fn delta_request(base: &str, target: &str, start: i64, max: i32) -> proto::GetMetadataDeltaRequest {
    proto::GetMetadataDeltaRequest {
        base_snapshot_id: base.into(),
        target_snapshot_id: target.into(),
        starting_offset: start,
        max_results: max,
        ..Default::default()
    }
}

async fn delta(
    channel: &Channel,
    base: &str,
    target: &str,
    start: i64,
    max: i32,
) -> Result<Answer, Status> {
    let stream = client(channel)
        .get_metadata_delta(delta_request(base, target, start, max))
        .await?
        .into_inner();
    read_all!(stream)
}

/// Whether `[start, end)` lies inside the sorted `ranges`.
fn covered(ranges: &[Range], start: u64, end: u64) -> bool {
    let i = ranges.partition_point(|r| r.1 <= start);
    ranges.get(i).is_some_and(|r| r.0 <= start && end <= r.1)
}

/// Reads `buf.len()` bytes at `offset`; past the end of the file, zeros.
fn read_padded(file: &File, offset: u64, buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        let n = file
            .read_at(&mut buf[done..], offset + done as u64)
            .unwrap();
        if n == 0 {
            break;
        }
        done += n;
    }
    buf[done..].fill(0);
}

/// The data ranges of either image, block-aligned and merged: outside them both read
/// as zeros.
fn data_of_either(a: &Path, b: &Path, size: u64) -> Vec<Range> {
    let mut all = Vec::new();
    for path in [a, b] {
        let f = File::open(path).unwrap();
        all.extend(kura::sys::sparse::data_ranges(&f, path, 0, size).unwrap());
    }
    all.sort_unstable();
    let mut merged: Vec<Range> = Vec::new();
    for (s, e) in all {
        let (s, e) = (s - s % BLOCK, e.div_ceil(BLOCK) * BLOCK);
        match merged.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

/// The base image with the target's bytes over `delta` is the target image; every
/// non-zero block of the target is in `allocated`.
fn assert_reconstructs(base: &Path, target: &Path, delta: &[Range], allocated: &[Range]) {
    let (bf, tf) = (File::open(base).unwrap(), File::open(target).unwrap());
    let size = tf.metadata().unwrap().len();
    const CHUNK: u64 = 1 << 20;
    let (mut b, mut t) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    for (start, end) in data_of_either(base, target, size) {
        let mut at = start;
        while at < end.min(size) {
            let len = (end.min(size) - at).min(CHUNK) as usize;
            read_padded(&bf, at, &mut b[..len]);
            read_padded(&tf, at, &mut t[..len]);
            for &(ds, de) in delta.iter().filter(|r| r.1 > at && r.0 < at + len as u64) {
                let (s, e) = (
                    (ds.max(at) - at) as usize,
                    (de.min(at + len as u64) - at) as usize,
                );
                b[s..e].copy_from_slice(&t[s..e]);
            }
            if let Some(i) = (0..len).find(|&i| b[i] != t[i]) {
                panic!(
                    "byte {} of {} differs after applying the delta from {}",
                    at + i as u64,
                    target.display(),
                    base.display()
                );
            }
            for (k, block) in t[..len].chunks(BLOCK as usize).enumerate() {
                let off = at + k as u64 * BLOCK;
                if block.iter().any(|&x| x != 0) {
                    assert!(
                        covered(allocated, off, off + block.len() as u64),
                        "non-zero block at {off} of {} is not in its allocated ranges",
                        target.display()
                    );
                }
            }
            at += len as u64;
        }
    }
}

fn snapshot_image(driver: &Driver, id: &str) -> PathBuf {
    driver
        .pool_root()
        .join("snapshots")
        .join(format!("{id}.img"))
}

async fn snapshot(driver: &Driver, name: &str, volume: &str) -> String {
    let mut snap = driver
        .controller()
        .create_snapshot(proto::CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: volume.into(),
            ..Default::default()
        })
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    let started = Instant::now();
    while !snap.ready_to_use {
        assert!(started.elapsed() < Duration::from_secs(60), "snapshot copy");
        tokio::time::sleep(Duration::from_millis(100)).await;
        snap = driver
            .controller()
            .list_snapshots(proto::ListSnapshotsRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .expect("ListSnapshots")
            .into_inner()
            .entries
            .remove(0)
            .snapshot
            .unwrap();
    }
    snap.snapshot_id
}

/// Grows a published volume to `size`. An ext4 filesystem the kernel refuses to grow
/// online grows at the next stage: the volume is unstaged and staged again.
async fn expand(driver: &Driver, volume: &str, kind: Kind, staged: (&Path, &Path), size: i64) {
    let range = Some(proto::CapacityRange {
        required_bytes: size,
        limit_bytes: 0,
    });
    driver
        .controller()
        .controller_expand_volume(proto::ControllerExpandVolumeRequest {
            volume_id: volume.into(),
            capacity_range: range,
            ..Default::default()
        })
        .await
        .expect("ControllerExpandVolume");
    let (staging, target) = staged;
    let grown = driver
        .node()
        .node_expand_volume(proto::NodeExpandVolumeRequest {
            volume_id: volume.into(),
            volume_path: target.display().to_string(),
            capacity_range: range,
            ..Default::default()
        })
        .await;
    match grown {
        Ok(_) => {}
        Err(e) if e.code() == Code::FailedPrecondition && e.message().contains("next staged") => {
            driver.unpublish_and_unstage(volume, staging, target).await;
            driver
                .node()
                .node_stage_volume(common::stage_request(volume, staging, &kind.cap()))
                .await
                .expect("NodeStageVolume");
            driver
                .node()
                .node_publish_volume(common::publish_request(
                    volume,
                    staging,
                    target,
                    &kind.cap(),
                    false,
                ))
                .await
                .expect("NodePublishVolume");
        }
        Err(e) => panic!("NodeExpandVolume: {e:?}"),
    }
}

/// How a test volume is used.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Block,
    Fs(&'static str),
}

impl Kind {
    fn cap(self) -> proto::VolumeCapability {
        match self {
            Kind::Block => block_cap(),
            Kind::Fs(fs) => mount_cap(fs),
        }
    }
}

/// One round of changes to a published volume: random writes, a rewrite of bytes
/// with the same bytes, and a discard (a punched hole in the image).
fn change(kind: Kind, target: &Path, size: u64, rng: &mut Rng, round: usize) {
    match kind {
        Kind::Block => {
            let dev = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(target)
                .unwrap();
            for _ in 0..12 {
                let len = (1 + rng.below(16)) * BLOCK;
                let at = rng.below((size - len) / BLOCK) * BLOCK;
                dev.write_all_at(&rng.bytes(len as usize), at).unwrap();
            }
            // The same bytes again over a range written before.
            let mut same = vec![0u8; 8 * BLOCK as usize];
            dev.read_exact_at(&mut same, 0).unwrap();
            dev.write_all_at(&same, 0).unwrap();
            dev.sync_all().unwrap();
            // A discard: the loop device punches the range out of the image.
            let at = rng.below((size - MIB as u64) / BLOCK) * BLOCK;
            let status = std::process::Command::new("blkdiscard")
                .args(["-o", &at.to_string(), "-l", &(256 * 1024).to_string()])
                .arg(target)
                .status()
                .expect("blkdiscard runs");
            assert!(status.success(), "blkdiscard");
        }
        Kind::Fs(_) => {
            for i in 0..6 {
                let len = (1 + rng.below(32)) as usize * BLOCK as usize;
                common::write_file(&target.join(format!("f-{round}-{i}")), &rng.bytes(len));
            }
            // The same bytes again over a file written before.
            if round > 0 {
                let old = target.join(format!("f-{}-0", round - 1));
                let bytes = std::fs::read(&old).unwrap();
                common::write_at(&old, 0, &bytes);
            }
            // A deleted file, discarded by fstrim: holes in the image.
            if round > 1 {
                std::fs::remove_file(target.join(format!("f-{}-1", round - 2))).unwrap();
                let status = std::process::Command::new("fstrim")
                    .arg(target)
                    .status()
                    .expect("fstrim runs");
                assert!(status.success(), "fstrim");
            }
        }
    }
}

/// S1..S4 of one volume with changes between them and an expansion before S3; for
/// every pair the delta reconstructs the later one, and every snapshot's data lies in
/// its allocated ranges.
async fn reconstruction(kind: Kind, size: i64) {
    let driver = Driver::start().await;
    let mut request = create_request("pvc-cbt", size, &[], None);
    request.volume_capabilities = vec![kind.cap()];
    let volume = driver
        .controller()
        .create_volume(request)
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let (staging, target) = driver.stage_and_publish(&volume, &kind.cap(), "v").await;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut snaps = Vec::new();
    let mut current = size as u64;
    for round in 0..4 {
        if round == 2 {
            current += size as u64 / 2;
            expand(&driver, &volume, kind, (&staging, &target), current as i64).await;
            if let Kind::Block = kind {
                // A write past the first size.
                write_at(
                    &target,
                    size as u64 + 4 * BLOCK,
                    &rng.bytes(8 * BLOCK as usize),
                );
            }
        }
        change(kind, &target, current, &mut rng, round);
        snaps.push(snapshot(&driver, &format!("s{round}"), &volume).await);
    }
    let channel = &driver.channel;
    for (j, sj) in snaps.iter().enumerate() {
        let alloc = allocated(channel, sj, 0, 0).await.expect("allocated");
        let image = snapshot_image(&driver, sj);
        assert_eq!(
            alloc.capacity,
            File::open(&image).unwrap().metadata().unwrap().len()
        );
        assert_reconstructs(&image, &image, &[], &alloc.ranges());
        for si in &snaps[..j] {
            let d = delta(channel, si, sj, 0, 0).await.expect("delta");
            assert_eq!(d.capacity, alloc.capacity, "the target's capacity");
            assert_reconstructs(
                &snapshot_image(&driver, si),
                &image,
                &d.ranges(),
                &alloc.ranges(),
            );
        }
        // Nothing changes between a snapshot and itself... which is no delta at all:
        // the target must be later than the base.
    }
    // Consecutive snapshots differ by little: the extents say so.
    let first = delta(channel, &snaps[0], &snaps[1], 0, 0).await.unwrap();
    let changed: u64 = first.ranges().iter().map(|r| r.1 - r.0).sum();
    assert!(
        changed < first.capacity / 2,
        "{kind:?}: {changed} bytes reported"
    );
}

#[tokio::test]
async fn reconstruction_of_block_volumes() {
    reconstruction(Kind::Block, 32 * MIB).await;
}

#[tokio::test]
async fn reconstruction_of_ext4_volumes() {
    reconstruction(Kind::Fs("ext4"), 64 * MIB).await;
}

#[tokio::test]
async fn reconstruction_of_xfs_volumes() {
    reconstruction(Kind::Fs("xfs"), 320 * MIB).await;
}

/// A block volume with many small changes between two snapshots: (volume, S1, S2).
async fn two_snapshots(
    driver: &Driver,
    tag: &str,
    size: i64,
    ranges: u64,
) -> (String, String, String) {
    let mut request = create_request(&format!("pvc-{tag}"), size, &[], None);
    request.volume_capabilities = vec![block_cap()];
    let volume = driver
        .controller()
        .create_volume(request)
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let (staging, target) = driver.stage_and_publish(&volume, &block_cap(), tag).await;
    let mut rng = Rng(7);
    write_at(&target, 0, &rng.bytes(4 * MIB as usize));
    let s1 = snapshot(driver, &format!("{tag}-1"), &volume).await;
    // Every other 4 KiB block from the start: `ranges` separate ranges.
    let dev = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap();
    for k in 0..ranges {
        dev.write_all_at(&rng.bytes(BLOCK as usize), 2 * k * BLOCK)
            .unwrap();
    }
    dev.sync_all().unwrap();
    drop(dev);
    let s2 = snapshot(driver, &format!("{tag}-2"), &volume).await;
    driver
        .unpublish_and_unstage(&volume, &staging, &target)
        .await;
    (volume, s1, s2)
}

/// The answer from `start` on, as a resumed stream must give it: no range ending at or
/// before `start`, the first one cut there.
fn from(ranges: &[Range], start: u64) -> Vec<Range> {
    ranges
        .iter()
        .filter(|r| r.1 > start)
        .map(|&(s, e)| (s.max(start), e))
        .collect()
}

#[tokio::test]
async fn resumes_at_any_offset_and_honours_max_results() {
    let driver = Driver::start().await;
    let channel = &driver.channel;
    let (_, s1, s2) = two_snapshots(&driver, "two", 16 * MIB, 256).await;
    let full = delta(channel, &s1, &s2, 0, 0).await.unwrap();
    let ranges = full.ranges();
    assert_eq!(ranges.len(), 256, "{ranges:?}");
    assert!(ranges.iter().all(|r| r.1 - r.0 == BLOCK), "{ranges:?}");
    let one = delta(channel, &s1, &s2, 0, 1).await.unwrap();
    assert!(
        one.messages.iter().all(|m| m.len() == 1),
        "one tuple a message"
    );
    assert_eq!(one.ranges(), ranges);
    let alloc = allocated(channel, &s2, 0, 0).await.unwrap();
    let mut rng = Rng(11);
    for _ in 0..12 {
        let start = rng.below(full.capacity + 1);
        let resumed = delta(channel, &s1, &s2, start as i64, 3).await.unwrap();
        assert!(resumed.messages.iter().all(|m| m.len() <= 3));
        assert_eq!(resumed.ranges(), from(&ranges, start), "delta from {start}");
        if let Some(first) = resumed.ranges().first() {
            assert!(start < first.1);
        }
        let resumed = allocated(channel, &s2, start as i64, 0).await.unwrap();
        assert_eq!(
            resumed.ranges(),
            from(&alloc.ranges(), start),
            "allocated from {start}"
        );
    }
    // At the capacity: nothing left, one empty message with the capacity.
    let end = delta(channel, &s1, &s2, full.capacity as i64, 0)
        .await
        .unwrap();
    assert_eq!(end.messages, vec![Vec::<Range>::new()]);
    assert_eq!(end.capacity, full.capacity);
}

#[tokio::test]
async fn errors_have_the_specs_codes_and_change_nothing() {
    let driver = Driver::start().await;
    let channel = &driver.channel;
    let caps = driver
        .identity()
        .get_plugin_capabilities(proto::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let advertised = caps.capabilities.iter().any(|c| {
        matches!(
            &c.r#type,
            Some(proto::plugin_capability::Type::Service(s))
                if s.r#type == proto::plugin_capability::service::Type::SnapshotMetadataService as i32
        )
    });
    assert!(advertised, "SNAPSHOT_METADATA_SERVICE is advertised");

    let (_, s1, s2) = two_snapshots(&driver, "two", 16 * MIB, 256).await;
    let before = delta(channel, &s1, &s2, 0, 0).await.unwrap().ranges();
    // A snapshot of another volume.
    let other = driver
        .create_volume("pvc-other", 16 * MIB, &[])
        .await
        .volume_id;
    let s3 = snapshot(&driver, "other-1", &other).await;
    // A snapshot that existed once.
    let gone = snapshot(&driver, "gone", &other).await;
    driver
        .controller()
        .delete_snapshot(proto::DeleteSnapshotRequest {
            snapshot_id: gone.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    let code = |r: Result<Answer, Status>| r.expect_err("refused");
    let cases: Vec<(&str, Status, Code, &str)> = vec![
        (
            "unknown",
            code(allocated(channel, &gone, 0, 0).await),
            Code::NotFound,
            "snapshot_id",
        ),
        (
            "not ours",
            code(allocated(channel, "x", 0, 0).await),
            Code::NotFound,
            "snapshot_id",
        ),
        (
            "missing",
            code(allocated(channel, "", 0, 0).await),
            Code::InvalidArgument,
            "snapshot_id",
        ),
        (
            "negative offset",
            code(allocated(channel, &s1, -1, 0).await),
            Code::OutOfRange,
            "starting_offset",
        ),
        (
            "past capacity",
            code(allocated(channel, &s1, 16 * MIB + 1, 0).await),
            Code::OutOfRange,
            "starting_offset",
        ),
        (
            "negative max",
            code(allocated(channel, &s1, 0, -1).await),
            Code::InvalidArgument,
            "max_results",
        ),
        (
            "unknown base",
            code(delta(channel, &gone, &s2, 0, 0).await),
            Code::NotFound,
            "base_snapshot_id",
        ),
        (
            "unknown target",
            code(delta(channel, &s1, &gone, 0, 0).await),
            Code::NotFound,
            "target_snapshot_id",
        ),
        (
            "missing target",
            code(delta(channel, &s1, "", 0, 0).await),
            Code::InvalidArgument,
            "target_snapshot_id",
        ),
        (
            "other volume",
            code(delta(channel, &s1, &s3, 0, 0).await),
            Code::InvalidArgument,
            "target_snapshot_id",
        ),
        (
            "target earlier",
            code(delta(channel, &s2, &s1, 0, 0).await),
            Code::InvalidArgument,
            "target_snapshot_id",
        ),
        (
            "target is base",
            code(delta(channel, &s1, &s1, 0, 0).await),
            Code::InvalidArgument,
            "target_snapshot_id",
        ),
        (
            "delta past capacity",
            code(delta(channel, &s1, &s2, 16 * MIB + 1, 0).await),
            Code::OutOfRange,
            "starting_offset",
        ),
    ];
    for (name, status, want, field) in cases {
        assert_eq!(status.code(), want, "{name}: {status:?}");
        assert!(status.message().starts_with(field), "{name}: {status:?}");
    }
    assert_eq!(
        delta(channel, &s1, &s2, 0, 0).await.unwrap().ranges(),
        before
    );
}

/// The descriptors of this process open on a deleted file under `dir`: a pin.
fn pins_under(pid: u32, dir: &Path) -> Vec<String> {
    let mut held = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let text = target.display().to_string();
            if text.starts_with(&dir.display().to_string()) && text.ends_with("(deleted)") {
                held.push(text);
            }
        }
    }
    held
}

async fn until_no_pins(pid: u32, dir: &Path) {
    let started = Instant::now();
    loop {
        let held = pins_under(pid, dir);
        if held.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "pins left: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The pause point where the node holds a stream after sending a message.
const SENT: &str = "snapshot-ranges-sent";

#[tokio::test]
async fn a_snapshot_deleted_mid_stream_is_listed_whole_then_freed() {
    let driver = Driver::start().await;
    let channel = &driver.channel;
    let (_, s1, s2) = two_snapshots(&driver, "deleted", 16 * MIB, 256).await;
    let want = delta(channel, &s1, &s2, 0, 0).await.unwrap().ranges();
    let image = snapshot_image(&driver, &s2);
    let pool = driver.pool_root();
    let me = std::process::id();

    // Deleted after the first message: the rest still comes, the same.
    let sent = driver.pause.arm(SENT);
    let mut stream = client(channel)
        .get_metadata_delta(delta_request(&s1, &s2, 0, 1))
        .await
        .unwrap()
        .into_inner();
    let mut got: Vec<Range> = Vec::new();
    let first = stream.message().await.unwrap().unwrap();
    got.extend(first.block_metadata.iter().map(range_of));
    sent.held(|| false).await;
    driver
        .controller()
        .delete_snapshot(proto::DeleteSnapshotRequest {
            snapshot_id: s2.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot mid-stream");
    assert!(!image.exists(), "deleted from the pool at once");
    assert!(!pins_under(me, &pool).is_empty(), "held open by the stream");
    sent.release();
    while let Some(m) = stream.message().await.unwrap() {
        got.extend(m.block_metadata.iter().map(range_of));
    }
    assert_eq!(got, want);
    until_no_pins(me, &pool).await;
    assert_eq!(
        allocated(channel, &s2, 0, 0).await.unwrap_err().code(),
        Code::NotFound
    );

    // A client that hangs up mid-stream: the snapshot it pinned is freed.
    let (_, s3, s4) = two_snapshots(&driver, "hangup", 16 * MIB, 256).await;
    let sent = driver.pause.arm(SENT);
    let mut stream = client(channel)
        .get_metadata_delta(delta_request(&s3, &s4, 0, 1))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    sent.held(|| false).await;
    driver
        .controller()
        .delete_snapshot(proto::DeleteSnapshotRequest {
            snapshot_id: s4.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!pins_under(me, &pool).is_empty());
    drop(stream);
    sent.release();
    until_no_pins(me, &pool).await;
}

fn range_of(b: &proto::BlockMetadata) -> Range {
    (b.byte_offset as u64, (b.byte_offset + b.size_bytes) as u64)
}

/// On a pool that cannot reflink, snapshots are full copies: the delta is found by
/// comparing data, exactly the blocks that differ.
#[tokio::test]
async fn data_comparison_on_a_pool_without_reflink() {
    let mut driver = Driver::start_with(common::PoolKind::Dir, &[]).await;
    let root = common::restart_on_ext4_pool(&mut driver).await;
    let mut request = create_request("pvc-copy", 16 * MIB, &[], None);
    request.volume_capabilities = vec![block_cap()];
    let volume = driver
        .controller()
        .create_volume(request)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let mut rng = Rng(3);
    // A copy is refused while the volume is attached: write, detach, snapshot.
    let (staging, target) = driver.stage_and_publish(&volume, &block_cap(), "c1").await;
    write_at(&target, 0, &rng.bytes(2 * MIB as usize));
    driver
        .unpublish_and_unstage(&volume, &staging, &target)
        .await;
    let s1 = snapshot(&driver, "copy-1", &volume).await;
    let (staging, target) = driver.stage_and_publish(&volume, &block_cap(), "c2").await;
    write_at(&target, 5 * BLOCK, &rng.bytes(3 * BLOCK as usize));
    write_at(&target, 8 * MIB as u64, &rng.bytes(BLOCK as usize));
    // The same bytes again: no difference.
    let same = common::read_at(&target, MIB as u64, BLOCK as usize);
    write_at(&target, MIB as u64, &same);
    driver
        .unpublish_and_unstage(&volume, &staging, &target)
        .await;

    // While the second copy runs, the snapshot is not ready.
    let copying = driver.pause.arm("copying");
    let s2 = driver
        .controller()
        .create_snapshot(proto::CreateSnapshotRequest {
            name: "copy-2".into(),
            source_volume_id: volume.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    let not_ready = allocated(&driver.channel, &s2, 0, 0).await.unwrap_err();
    assert_eq!(not_ready.code(), Code::FailedPrecondition, "{not_ready:?}");
    copying.release();
    let s2 = snapshot(&driver, "copy-2", &volume).await;

    let d = delta(&driver.channel, &s1, &s2, 0, 0).await.unwrap();
    assert_eq!(
        d.ranges(),
        vec![
            (5 * BLOCK, 8 * BLOCK),
            (8 * MIB as u64, 8 * MIB as u64 + BLOCK)
        ]
    );
    let image = |id: &str| root.join("snapshots").join(format!("{id}.img"));
    let alloc = allocated(&driver.channel, &s2, 0, 0).await.unwrap();
    assert_reconstructs(&image(&s1), &image(&s2), &d.ranges(), &alloc.ranges());
}

/// The split: the controller streams from the node's agent. The same answers as the
/// node's images say; the node's socket does not serve the service; a client hanging
/// up unpins on the node; a node killed mid-stream ends the stream with an error
/// (never a clean end, which would claim the answer whole) and leaves nothing behind
/// once restarted.
#[tokio::test]
async fn split_streams_from_the_owning_node() {
    let mut cluster = common::cluster::Cluster::start(&["2Gi"]).await;
    let controller_socket = cluster.controller().socket.clone();
    let channel = kura::csi::client::connect(&controller_socket)
        .await
        .unwrap();
    let node = cluster.node("node-a");
    let pool = node.dir.join("state/pool");
    let image = |id: &str| pool.join("snapshots").join(format!("{id}.img"));
    let snap = |name: &'static str, volume: String| {
        let channel = channel.clone();
        async move {
            kura::csi::proto::controller_client::ControllerClient::new(channel)
                .create_snapshot(proto::CreateSnapshotRequest {
                    name: name.into(),
                    source_volume_id: volume,
                    ..Default::default()
                })
                .await
                .expect("CreateSnapshot")
                .into_inner()
                .snapshot
                .unwrap()
                .snapshot_id
        }
    };
    let delete = |id: String| {
        let channel = channel.clone();
        async move {
            kura::csi::proto::controller_client::ControllerClient::new(channel)
                .delete_snapshot(proto::DeleteSnapshotRequest {
                    snapshot_id: id,
                    ..Default::default()
                })
                .await
                .expect("DeleteSnapshot");
        }
    };

    let mut request = create_request("pvc-split", 16 * MIB, &[], None);
    request.volume_capabilities = vec![block_cap()];
    let volume = cluster
        .controller()
        .controller()
        .create_volume(request)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging = node.path("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let target = node.path("target");
    let mut csi_node = node.node();
    csi_node
        .node_stage_volume(common::stage_request(&volume, &staging, &block_cap()))
        .await
        .unwrap();
    csi_node
        .node_publish_volume(common::publish_request(
            &volume,
            &staging,
            &target,
            &block_cap(),
            false,
        ))
        .await
        .unwrap();
    let mut rng = Rng(5);
    write_at(&target, 0, &rng.bytes(4 * MIB as usize));
    let s1 = snap("split-1", volume.clone()).await;
    let dev = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap();
    for k in 0..256 {
        dev.write_all_at(&rng.bytes(BLOCK as usize), 2 * k * BLOCK)
            .unwrap();
    }
    dev.sync_all().unwrap();
    drop(dev);
    let s2 = snap("split-2", volume.clone()).await;
    let s3 = snap("split-3", volume.clone()).await;

    // The same answers the node's images give.
    let d = delta(&channel, &s1, &s2, 0, 0).await.unwrap();
    assert_eq!(d.ranges().len(), 256);
    let alloc = allocated(&channel, &s2, 0, 0).await.unwrap();
    assert_reconstructs(&image(&s1), &image(&s2), &d.ranges(), &alloc.ranges());
    let resumed = delta(&channel, &s1, &s2, 12345, 7).await.unwrap();
    assert!(resumed.messages.iter().all(|m| m.len() <= 7));
    assert_eq!(resumed.ranges(), from(&d.ranges(), 12345));
    let unknown = allocated(
        &channel,
        &s1.replace(|c: char| c.is_ascii_digit(), "0"),
        0,
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let later = delta(&channel, &s2, &s1, 0, 0).await.unwrap_err();
    assert_eq!(later.code(), Code::InvalidArgument, "{later:?}");
    let on_node = allocated(&node.channel(), &s1, 0, 0).await.unwrap_err();
    assert_eq!(
        on_node.code(),
        Code::Unimplemented,
        "the node's socket does not serve it"
    );

    // A client that hangs up: the node's work stops and its pin goes.
    let node_pid = node.pid().as_raw() as u32;
    let sent = node.pause.arm(SENT);
    let mut stream = client(&channel)
        .get_metadata_delta(delta_request(&s1, &s2, 0, 1))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    sent.held(|| false).await;
    delete(s2.clone()).await;
    assert!(
        !pins_under(node_pid, &pool).is_empty(),
        "pinned on the node"
    );
    drop(stream);
    sent.release();
    until_no_pins(node_pid, &pool).await;

    // SIGKILL mid-stream: the stream fails, and after the restart nothing is left.
    csi_node
        .node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
            volume_id: volume.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
    csi_node
        .node_unstage_volume(proto::NodeUnstageVolumeRequest {
            volume_id: volume.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
    let sent = cluster.node("node-a").pause.arm(SENT);
    let mut stream = client(&channel)
        .get_metadata_delta(delta_request(&s1, &s3, 0, 1))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    sent.held(|| false).await;
    delete(s3.clone()).await;
    assert!(
        !pins_under(node_pid, &pool).is_empty(),
        "pinned on the node"
    );
    cluster.node_mut("node-a").kill();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await
    .expect("the stream ends within the per-message deadline");
    assert!(
        ended.is_err(),
        "a killed node's stream must fail, not end cleanly"
    );
    // Restarted with the point no longer armed.
    drop(sent);
    let node = cluster.node_mut("node-a");
    node.start().await;
    let node_pid = node.pid().as_raw() as u32;
    assert!(pins_under(node_pid, &pool).is_empty());
    assert!(!image(&s3).exists(), "the deleted snapshot's image is gone");
    let left: Vec<_> = std::fs::read_dir(pool.join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with(&s1))
        .collect();
    assert!(left.is_empty(), "only S1 is left: {left:?}");
}
