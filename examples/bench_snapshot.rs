//! How long a snapshot and a clone of a volume full of data take, against a full copy
//! of the same data in the same pool, measured over a running kura's CSI socket.
//! bench/snapshot-clone.sh runs it against a fresh all-in-one kura:
//!
//!     bench_snapshot --endpoint unix:///tmp/x/csi.sock --pool-root /tmp/x/state/pool \
//!         --work /tmp/x/work --sizes 1,8 --runs 5
//!
//! For each size it creates a raw block volume of that many GiB, stages and publishes
//! it as the kubelet would, fills it with O_DIRECT writes, and then, in `runs` rounds
//! (the order of the three operations rotating from round to round), times:
//!
//! - CreateSnapshot of the volume (published, as a running pod's volume is);
//! - CreateVolume with the volume as content source (a clone);
//! - a full copy of the volume's image inside the pool: O_DIRECT reads and writes and
//!   a final fsync, what a driver without reflinks has to do. (`copy_file_range` would
//!   not do: on XFS the kernel turns it into a reflink.)
//!
//! Each snapshot, clone and copy is deleted before the next operation. Prints a
//! markdown table of medians and the per-round samples.

use std::error::Error;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use kura::csi::proto::controller_client::ControllerClient;
use kura::csi::proto::node_client::NodeClient;
use kura::csi::proto::{self, volume_capability, volume_content_source};
use tonic::transport::Channel;

const GIB: u64 = 1 << 30;
/// Size of each O_DIRECT read and write.
const IO_SIZE: usize = 8 << 20;
const ALIGN: usize = 4096;

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

#[derive(Parser)]
#[command(about = "Time kura's snapshots and clones against a full copy")]
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
    /// Data sizes to measure, in GiB.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    sizes: Vec<u64>,
    /// Rounds per size.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Snapshot,
    Clone,
    Copy,
}

const OPS: [Op; 3] = [Op::Snapshot, Op::Clone, Op::Copy];

struct Row {
    gib: u64,
    write: Duration,
    samples: [Vec<Duration>; 3],
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let socket = kura::server::socket_path(&args.endpoint).map_err(|e| e.to_string())?;
    let channel = kura::csi::client::connect(&socket).await?;
    let bench = Bench {
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
        pool_root: args.pool_root,
        work: args.work,
    };
    std::fs::create_dir_all(&bench.work)?;
    let mut rows = Vec::new();
    for &gib in &args.sizes {
        rows.push(bench.measure(gib, args.runs).await?);
    }
    print_report(&rows, args.runs);
    Ok(())
}

struct Bench {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
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

fn volume_request(
    name: &str,
    bytes: u64,
    source: Option<proto::VolumeContentSource>,
) -> proto::CreateVolumeRequest {
    proto::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: bytes as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![block_capability()],
        volume_content_source: source,
        ..Default::default()
    }
}

fn text(path: &Path) -> String {
    path.display().to_string()
}

impl Bench {
    async fn measure(&self, gib: u64, runs: usize) -> Result<Row> {
        let (mut controller, mut node) = (self.controller.clone(), self.node.clone());
        let bytes = gib * GIB;
        let id = controller
            .create_volume(volume_request(&format!("bench-src-{gib}g"), bytes, None))
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

        eprintln!("bench: {gib} GiB volume {id}: writing {gib} GiB with O_DIRECT");
        let target_for_write = target.clone();
        let write = tokio::task::spawn_blocking(move || fill(&target_for_write, bytes)).await??;
        eprintln!(
            "bench: wrote {gib} GiB in {write:.2?} ({:.2} GiB/s)",
            gib as f64 / write.as_secs_f64()
        );

        let image = self.pool_root.join(format!("volumes/{id}.img"));
        let mut samples: [Vec<Duration>; 3] = Default::default();
        for run in 0..runs {
            for k in 0..OPS.len() {
                let op = OPS[(run + k) % OPS.len()];
                let took = self.time(op, &id, &image, gib, run).await?;
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
        controller
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: id,
                ..Default::default()
            })
            .await?;
        std::fs::remove_dir(&staging)?;
        Ok(Row {
            gib,
            write,
            samples,
        })
    }

    /// Runs one operation, returns how long it took, and removes what it made.
    async fn time(
        &self,
        op: Op,
        source: &str,
        image: &Path,
        gib: u64,
        run: usize,
    ) -> Result<Duration> {
        let mut controller = self.controller.clone();
        match op {
            Op::Snapshot => {
                let request = proto::CreateSnapshotRequest {
                    source_volume_id: source.into(),
                    name: format!("bench-snap-{gib}g-{run}"),
                    ..Default::default()
                };
                let started = Instant::now();
                let snapshot = controller
                    .create_snapshot(request)
                    .await?
                    .into_inner()
                    .snapshot
                    .ok_or("CreateSnapshot returned no snapshot")?;
                let took = started.elapsed();
                if !snapshot.ready_to_use {
                    return Err("the snapshot is not ready: is the pool without reflink?".into());
                }
                controller
                    .delete_snapshot(proto::DeleteSnapshotRequest {
                        snapshot_id: snapshot.snapshot_id,
                        ..Default::default()
                    })
                    .await?;
                Ok(took)
            }
            Op::Clone => {
                let request = volume_request(
                    &format!("bench-clone-{gib}g-{run}"),
                    gib * GIB,
                    Some(proto::VolumeContentSource {
                        r#type: Some(volume_content_source::Type::Volume(
                            volume_content_source::VolumeSource {
                                volume_id: source.into(),
                            },
                        )),
                    }),
                );
                let started = Instant::now();
                let clone = controller
                    .create_volume(request)
                    .await?
                    .into_inner()
                    .volume
                    .ok_or("CreateVolume returned no volume")?;
                let took = started.elapsed();
                controller
                    .delete_volume(proto::DeleteVolumeRequest {
                        volume_id: clone.volume_id,
                        ..Default::default()
                    })
                    .await?;
                Ok(took)
            }
            Op::Copy => {
                let (from, to) = (image.to_owned(), self.pool_root.join("bench-copy.img"));
                let took = tokio::task::spawn_blocking(move || -> Result<Duration, String> {
                    let started = Instant::now();
                    full_copy(&from, &to).map_err(|e| format!("copy {}: {e}", from.display()))?;
                    let took = started.elapsed();
                    std::fs::remove_file(&to).map_err(|e| e.to_string())?;
                    Ok(took)
                })
                .await??;
                Ok(took)
            }
        }
    }
}

/// A zeroed buffer of `len` bytes whose start is aligned for O_DIRECT, inside `storage`.
fn aligned(storage: &mut Vec<u8>, len: usize) -> &mut [u8] {
    storage.resize(len + ALIGN, 0);
    let offset = storage.as_ptr().align_offset(ALIGN);
    &mut storage[offset..offset + len]
}

/// Writes `bytes` of non-repeating data to the device at `path` with O_DIRECT, then
/// fsyncs it.
fn fill(path: &Path, bytes: u64) -> std::io::Result<Duration> {
    let device = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let mut storage = Vec::new();
    let buf = aligned(&mut storage, IO_SIZE);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let started = Instant::now();
    let mut offset = 0u64;
    while offset < bytes {
        for word in buf.chunks_exact_mut(8) {
            // xorshift64: cheap data that no layer can compress or deduplicate.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let len = (bytes - offset).min(IO_SIZE as u64) as usize;
        device.write_all_at(&buf[..len], offset)?;
        offset += len as u64;
    }
    device.sync_all()?;
    Ok(started.elapsed())
}

/// Copies `from` to the new file `to` with O_DIRECT reads and writes, then fsyncs.
fn full_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    let source = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(from)?;
    let target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(to)?;
    let len = source.metadata()?.len();
    let mut storage = Vec::new();
    let buf = aligned(&mut storage, IO_SIZE);
    let mut offset = 0u64;
    while offset < len {
        let want = (len - offset).min(IO_SIZE as u64) as usize;
        let got = source.read_at(&mut buf[..want], offset)?;
        if got == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        target.write_all_at(&buf[..got], offset)?;
        offset += got as u64;
    }
    File::sync_all(&target)
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

fn print_report(rows: &[Row], runs: usize) {
    println!(
        "| data in volume | CreateSnapshot | clone (CreateVolume from volume) | full copy (O_DIRECT) | full copy ÷ snapshot | full copy ÷ clone |"
    );
    println!("|---|---|---|---|---|---|");
    for row in rows {
        let [snapshot, clone, copy] = row.samples.each_ref().map(|s| median(s));
        println!(
            "| {} GiB | {} | {} | {} | {:.0}× | {:.0}× |",
            row.gib,
            show(snapshot),
            show(clone),
            show(copy),
            copy.as_secs_f64() / snapshot.as_secs_f64(),
            copy.as_secs_f64() / clone.as_secs_f64(),
        );
    }
    println!();
    println!("Medians of {runs} interleaved rounds. Samples, in round order:");
    println!();
    for row in rows {
        let list = |s: &[Duration]| s.iter().map(|d| show(*d)).collect::<Vec<_>>().join(", ");
        println!(
            "- {} GiB (written in {}, {:.2} GiB/s): snapshot {}; clone {}; copy {}",
            row.gib,
            show(row.write),
            row.gib as f64 / row.write.as_secs_f64(),
            list(&row.samples[0]),
            list(&row.samples[1]),
            list(&row.samples[2]),
        );
    }
}
