//! How long kura's changed block tracking takes, against reading both snapshots in
//! full (the least a byte-comparing implementation pays), measured over a running
//! kura's CSI socket. bench/cbt.sh runs it against a fresh all-in-one kura:
//!
//!     bench_cbt --endpoint unix:///tmp/x/csi.sock --pool-root /tmp/x/state/pool \
//!         --work /tmp/x/work --sizes 8,64 --runs 3
//!
//! For each size it creates a thin raw block volume of that many GiB, stages and
//! publishes it as the kubelet would, and through the published device (O_DIRECT,
//! then fsync):
//!
//! 1. writes a base pattern: `--base-mib` of data in 1 MiB chunks spread evenly over
//!    the volume (data scattered over the device, as a filesystem's files are);
//! 2. takes snapshot S1;
//! 3. rewrites `--rewrite-percent` of the volume (or `--rewrite-mib`) in 64 KiB
//!    writes at random 64 KiB-aligned offsets;
//! 4. takes snapshot S2.
//!
//! Then, in `runs` rounds (the order of the three rotating from round to round), it
//! times GetMetadataDelta(S1, S2) and GetMetadataAllocated(S2), each to its last
//! message, and a full read of both snapshot images with O_DIRECT reads of 8 MiB.
//! Prints a markdown table of medians and ratios, and the per-round samples.

use std::error::Error;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use kura::csi::proto::controller_client::ControllerClient;
use kura::csi::proto::node_client::NodeClient;
use kura::csi::proto::snapshot_metadata_client::SnapshotMetadataClient;
use kura::csi::proto::{self, volume_capability};
use tonic::transport::Channel;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Size of each rewrite, as the issue asks.
const WRITE_SIZE: u64 = 64 << 10;
/// Size of each base chunk.
const BASE_CHUNK: u64 = MIB;
/// Size of each O_DIRECT read of the full-read baseline.
const READ_SIZE: usize = 8 << 20;
const ALIGN: usize = 4096;

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

#[derive(Parser)]
#[command(about = "Time kura's GetMetadataDelta and GetMetadataAllocated against a full read")]
struct Args {
    /// kura's CSI endpoint, unix:///path/csi.sock.
    #[arg(long)]
    endpoint: String,
    /// The pool's root directory (holding volumes/ and snapshots/).
    #[arg(long)]
    pool_root: PathBuf,
    /// A directory for staging and publish paths.
    #[arg(long)]
    work: PathBuf,
    /// Volume sizes to measure, in GiB.
    #[arg(long, value_delimiter = ',', default_value = "8,64")]
    sizes: Vec<u64>,
    /// Rounds per size.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Data written before S1, in MiB, spread over the volume in 1 MiB chunks.
    #[arg(long, default_value_t = 256)]
    base_mib: u64,
    /// Share of the volume rewritten between S1 and S2, in percent.
    #[arg(long, default_value_t = 1.0)]
    rewrite_percent: f64,
    /// Rewrite this many MiB between S1 and S2 whatever the size (instead of a share).
    #[arg(long)]
    rewrite_mib: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Delta,
    Allocated,
    FullRead,
}

const OPS: [Op; 3] = [Op::Delta, Op::Allocated, Op::FullRead];

/// What a stream answered: how many ranges, how many bytes they cover.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Answer {
    ranges: u64,
    bytes: u64,
}

struct Row {
    gib: u64,
    rewritten: u64,
    delta: Answer,
    allocated: Answer,
    samples: [Vec<Duration>; 3],
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let socket = kura::server::socket_path(&args.endpoint).map_err(|e| e.to_string())?;
    let channel = kura::csi::client::connect(&socket).await?;
    let bench = Bench {
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel.clone()),
        metadata: SnapshotMetadataClient::new(channel),
        pool_root: args.pool_root.clone(),
        work: args.work.clone(),
    };
    std::fs::create_dir_all(&bench.work)?;
    let mut rows = Vec::new();
    for &gib in &args.sizes {
        let rewrite = match args.rewrite_mib {
            Some(mib) => mib * MIB,
            None => ((gib * GIB) as f64 * args.rewrite_percent / 100.0) as u64,
        };
        rows.push(bench.measure(gib, &args, rewrite).await?);
    }
    print_report(&rows, &args);
    Ok(())
}

struct Bench {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    metadata: SnapshotMetadataClient<Channel>,
    pool_root: PathBuf,
    work: PathBuf,
}

fn block_capability() -> proto::VolumeCapability {
    proto::VolumeCapability {
        access_type: Some(volume_capability::AccessType::Block(
            volume_capability::BlockVolume {},
        )),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

fn text(path: &Path) -> String {
    path.display().to_string()
}

impl Bench {
    async fn measure(&self, gib: u64, args: &Args, rewrite: u64) -> Result<Row> {
        let (mut controller, mut node) = (self.controller.clone(), self.node.clone());
        let bytes = gib * GIB;
        let id = controller
            .create_volume(proto::CreateVolumeRequest {
                name: format!("bench-cbt-{gib}g"),
                capacity_range: Some(proto::CapacityRange {
                    required_bytes: bytes as i64,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![block_capability()],
                ..Default::default()
            })
            .await?
            .into_inner()
            .volume
            .ok_or("CreateVolume returned no volume")?
            .volume_id;
        let staging = self.work.join(format!("stage-{gib}g"));
        let target = self.work.join(format!("target-{gib}g"));
        std::fs::create_dir_all(&staging)?;
        node.node_stage_volume(proto::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: text(&staging),
            volume_capability: Some(block_capability()),
            ..Default::default()
        })
        .await?;
        node.node_publish_volume(proto::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: text(&staging),
            target_path: text(&target),
            volume_capability: Some(block_capability()),
            ..Default::default()
        })
        .await?;

        let device = target.clone();
        let base = args.base_mib * MIB;
        let took = tokio::task::spawn_blocking(move || write_base(&device, bytes, base)).await??;
        eprintln!(
            "bench: {gib} GiB volume {id}: base {} MiB written in {took:.2?}",
            args.base_mib
        );
        let s1 = self.snapshot(&id, &format!("bench-cbt-{gib}g-s1")).await?;
        let device = target.clone();
        let took =
            tokio::task::spawn_blocking(move || rewrite_random(&device, bytes, rewrite)).await??;
        eprintln!(
            "bench: {gib} GiB: rewrote {} MiB in 64 KiB random writes in {took:.2?}",
            rewrite / MIB
        );
        let s2 = self.snapshot(&id, &format!("bench-cbt-{gib}g-s2")).await?;

        let images = [&s1, &s2].map(|s| self.pool_root.join(format!("snapshots/{s}.img")));
        let mut samples: [Vec<Duration>; 3] = Default::default();
        let (mut delta, mut allocated) = (None, None);
        for run in 0..args.runs {
            for k in 0..OPS.len() {
                let op = OPS[(run + k) % OPS.len()];
                let started = Instant::now();
                match op {
                    Op::Delta => same_each_round(&mut delta, self.delta(&s1, &s2).await?)?,
                    Op::Allocated => same_each_round(&mut allocated, self.allocated(&s2).await?)?,
                    Op::FullRead => {
                        let images = images.clone();
                        tokio::task::spawn_blocking(move || read_all(&images)).await??
                    }
                }
                let took = started.elapsed();
                eprintln!("bench: {gib} GiB round {run}: {op:?} {took:.2?}");
                samples[OPS.iter().position(|o| *o == op).unwrap()].push(took);
            }
        }

        node.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: text(&target),
        })
        .await?;
        node.node_unstage_volume(proto::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: text(&staging),
        })
        .await?;
        for snapshot_id in [s1, s2] {
            controller
                .delete_snapshot(proto::DeleteSnapshotRequest {
                    snapshot_id,
                    ..Default::default()
                })
                .await?;
        }
        controller
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: id,
                ..Default::default()
            })
            .await?;
        std::fs::remove_dir(&staging)?;
        Ok(Row {
            gib,
            rewritten: rewrite,
            delta: delta.unwrap_or_default(),
            allocated: allocated.unwrap_or_default(),
            samples,
        })
    }

    async fn snapshot(&self, volume: &str, name: &str) -> Result<String> {
        let snapshot = self
            .controller
            .clone()
            .create_snapshot(proto::CreateSnapshotRequest {
                source_volume_id: volume.into(),
                name: name.into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .snapshot
            .ok_or("CreateSnapshot returned no snapshot")?;
        if !snapshot.ready_to_use {
            return Err("the snapshot is not ready: is the pool without reflink?".into());
        }
        Ok(snapshot.snapshot_id)
    }

    /// GetMetadataDelta(base, target), read to its last message.
    async fn delta(&self, base: &str, target: &str) -> Result<Answer> {
        let stream = self
            .metadata
            .clone()
            .get_metadata_delta(proto::GetMetadataDeltaRequest {
                base_snapshot_id: base.into(),
                target_snapshot_id: target.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        drain(stream, |m: &proto::GetMetadataDeltaResponse| {
            &m.block_metadata
        })
        .await
    }

    /// GetMetadataAllocated(snapshot), read to its last message.
    async fn allocated(&self, snapshot: &str) -> Result<Answer> {
        let stream = self
            .metadata
            .clone()
            .get_metadata_allocated(proto::GetMetadataAllocatedRequest {
                snapshot_id: snapshot.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        drain(stream, |m: &proto::GetMetadataAllocatedResponse| {
            &m.block_metadata
        })
        .await
    }
}

/// Reads a stream to its end, counting the ranges and the bytes they cover.
async fn drain<M>(
    mut stream: tonic::Streaming<M>,
    ranges: impl Fn(&M) -> &Vec<proto::BlockMetadata>,
) -> Result<Answer> {
    let mut answer = Answer::default();
    while let Some(message) = stream.message().await? {
        for range in ranges(&message) {
            answer.ranges += 1;
            answer.bytes += range.size_bytes as u64;
        }
    }
    Ok(answer)
}

/// Keeps the first round's answer; a later round that differs is an error, since the
/// snapshots do not change between rounds.
fn same_each_round(kept: &mut Option<Answer>, answer: Answer) -> Result<()> {
    match kept {
        Some(first) if *first != answer => Err("an answer changed between rounds".into()),
        _ => {
            *kept = Some(answer);
            Ok(())
        }
    }
}

/// A buffer of `len` bytes whose start is aligned for O_DIRECT, inside `storage`.
fn aligned(storage: &mut Vec<u8>, len: usize) -> &mut [u8] {
    storage.resize(len + ALIGN, 0);
    let offset = storage.as_ptr().align_offset(ALIGN);
    &mut storage[offset..offset + len]
}

/// xorshift64: cheap data that no layer can compress or deduplicate, and random
/// offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_exact_mut(8) {
            word.copy_from_slice(&self.next().to_le_bytes());
        }
    }
}

fn open_direct(path: &Path) -> std::io::Result<std::fs::File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Writes `base` bytes in 1 MiB chunks spread evenly over the `size`-byte device at
/// `path`, then fsyncs it.
fn write_base(path: &Path, size: u64, base: u64) -> std::io::Result<Duration> {
    let device = open_direct(path)?;
    let mut storage = Vec::new();
    let buf = aligned(&mut storage, BASE_CHUNK as usize);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let chunks = (base / BASE_CHUNK).min(size / BASE_CHUNK).max(1);
    let stride = size / chunks / BASE_CHUNK * BASE_CHUNK;
    let started = Instant::now();
    for chunk in 0..chunks {
        rng.fill(buf);
        device.write_all_at(buf, chunk * stride)?;
    }
    device.sync_all()?;
    Ok(started.elapsed())
}

/// Writes `bytes` in 64 KiB writes at random 64 KiB-aligned offsets of the
/// `size`-byte device at `path` (a few may land on the same place twice), then fsyncs.
fn rewrite_random(path: &Path, size: u64, bytes: u64) -> std::io::Result<Duration> {
    let device = open_direct(path)?;
    let mut storage = Vec::new();
    let buf = aligned(&mut storage, WRITE_SIZE as usize);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let slots = size / WRITE_SIZE;
    let started = Instant::now();
    for _ in 0..bytes / WRITE_SIZE {
        let slot = rng.next() % slots;
        rng.fill(buf);
        device.write_all_at(buf, slot * WRITE_SIZE)?;
    }
    device.sync_all()?;
    Ok(started.elapsed())
}

/// Reads every file in `paths` in full with O_DIRECT reads (holes read as zeros, as
/// a byte-comparing implementation sees them).
fn read_all(paths: &[PathBuf]) -> Result<(), String> {
    let mut storage = Vec::new();
    let buf = aligned(&mut storage, READ_SIZE);
    for path in paths {
        read_file(path, buf).map_err(|e| format!("read {}: {e}", path.display()))?;
    }
    Ok(())
}

fn read_file(path: &Path, buf: &mut [u8]) -> std::io::Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let len = file.metadata()?.len();
    let mut offset = 0u64;
    while offset < len {
        let want = (len - offset).min(buf.len() as u64) as usize;
        let got = file.read_at(&mut buf[..want], offset)?;
        if got == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        offset += got as u64;
    }
    Ok(())
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2
    }
}

fn show(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

fn print_report(rows: &[Row], args: &Args) {
    println!(
        "| volume | rewritten | GetMetadataDelta (ranges, bytes) | GetMetadataAllocated (ranges, bytes) | full read of both images | full read ÷ delta | full read ÷ allocated |"
    );
    println!("|---|---|---|---|---|---|---|");
    let medians: Vec<[Duration; 3]> = rows
        .iter()
        .map(|r| r.samples.each_ref().map(|s| median(s)))
        .collect();
    for (row, [delta, allocated, read]) in rows.iter().zip(&medians) {
        println!(
            "| {} GiB | {} | {} ({}, {}) | {} ({}, {}) | {} | {:.0}× | {:.0}× |",
            row.gib,
            mib(row.rewritten),
            show(*delta),
            row.delta.ranges,
            mib(row.delta.bytes),
            show(*allocated),
            row.allocated.ranges,
            mib(row.allocated.bytes),
            show(*read),
            read.as_secs_f64() / delta.as_secs_f64(),
            read.as_secs_f64() / allocated.as_secs_f64(),
        );
    }
    println!();
    // Each size against the first: how the time grows with the volume.
    if let (Some(first), Some(first_medians)) = (rows.first(), medians.first()) {
        for (row, m) in rows.iter().zip(&medians).skip(1) {
            println!(
                "{} GiB ÷ {} GiB: delta {:.2}×, allocated {:.2}×, full read {:.2}×",
                row.gib,
                first.gib,
                m[0].as_secs_f64() / first_medians[0].as_secs_f64(),
                m[1].as_secs_f64() / first_medians[1].as_secs_f64(),
                m[2].as_secs_f64() / first_medians[2].as_secs_f64(),
            );
        }
        println!();
    }
    println!(
        "Base: {} MiB in 1 MiB chunks spread evenly; medians of {} interleaved rounds. Samples, in round order:",
        args.base_mib, args.runs
    );
    println!();
    for row in rows {
        let list = |s: &[Duration]| s.iter().map(|d| show(*d)).collect::<Vec<_>>().join(", ");
        println!(
            "- {} GiB: delta {}; allocated {}; full read {}",
            row.gib,
            list(&row.samples[0]),
            list(&row.samples[1]),
            list(&row.samples[2]),
        );
    }
}
