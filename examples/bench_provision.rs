//! How long a volume takes from CreateVolume to a published mount: N at once, as a
//! StatefulSet scaling up asks for them, over a running kura's CSI socket.
//! bench/provision.sh runs it against a fresh all-in-one kura:
//!
//!     bench_provision --endpoint unix:///tmp/x/csi.sock --work /tmp/x/work \
//!         --counts 1,32 --runs 3 --size-mib 1024 --fs ext4
//!
//! In each round and for each N, N tasks at once each run CreateVolume, then
//! NodeStageVolume (attach, mkfs, mount), then NodePublishVolume (bind mount), and
//! each step is timed from the client. Then all are unpublished, unstaged and deleted
//! (also N at once, timed as one teardown). After the rounds, N fresh images of the
//! same size are attached and formatted at once with kura's own mkfs call, to show the
//! share mkfs takes of a stage under the same concurrency.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::future::join_all;
use kura::csi::proto::controller_client::ControllerClient;
use kura::csi::proto::node_client::NodeClient;
use kura::csi::proto::{self, volume_capability};
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;

type Result<T, E = Box<dyn Error + Send + Sync>> = std::result::Result<T, E>;

#[derive(Parser)]
#[command(about = "Time N concurrent create+stage+publish through kura's CSI API")]
struct Args {
    /// kura's CSI endpoint, unix:///path/csi.sock.
    #[arg(long)]
    endpoint: String,
    /// A directory for staging and publish paths and the mkfs images; on the same
    /// filesystem as the pool for the mkfs comparison to hold.
    #[arg(long)]
    work: PathBuf,
    /// How many volumes at once.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    counts: Vec<usize>,
    /// Rounds per count.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Volume size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Filesystem of the mount volumes.
    #[arg(long, default_value = "ext4")]
    fs: String,
    /// Where the mkfs comparison's images go: a directory in the pool.
    #[arg(long)]
    mkfs_dir: Option<PathBuf>,
}

/// One volume's steps.
#[derive(Clone, Copy, Debug, Default)]
struct Steps {
    create: Duration,
    stage: Duration,
    publish: Duration,
}

impl Steps {
    fn total(&self) -> Duration {
        self.create + self.stage + self.publish
    }
}

#[derive(Clone)]
struct Client {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    work: PathBuf,
    bytes: u64,
    cap: proto::VolumeCapability,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let socket = kura::server::socket_path(&args.endpoint).map_err(|e| e.to_string())?;
    let channel = kura::csi::client::connect(&socket).await?;
    std::fs::create_dir_all(&args.work)?;
    let client = Client {
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
        work: args.work.clone(),
        bytes: args.size_mib * MIB,
        cap: proto::VolumeCapability {
            access_type: Some(volume_capability::AccessType::Mount(
                volume_capability::MountVolume {
                    fs_type: args.fs.clone(),
                    ..Default::default()
                },
            )),
            access_mode: Some(volume_capability::AccessMode {
                mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        },
    };
    println!(
        "{} MiB {} mount volumes, thin; {} rounds per count; load average at start: {}",
        args.size_mib,
        args.fs,
        args.runs,
        load_average()
    );
    println!();
    println!(
        "| N at once | create+stage+publish p50 | p99 | max | CreateVolume p50 | NodeStageVolume p50 | NodePublishVolume p50 | mkfs alone p50 (N at once) | mkfs ÷ stage | teardown of all N |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut lines = Vec::new();
    for &count in &args.counts {
        let mut all = Vec::new();
        let mut teardowns = Vec::new();
        for run in 0..args.runs {
            let names: Vec<String> = (0..count)
                .map(|i| format!("prov-{count}-{run}-{i}"))
                .collect();
            let made = join_all(names.iter().map(|name| {
                let client = client.clone();
                let name = name.clone();
                tokio::spawn(async move { client.provision(&name).await })
            }))
            .await;
            let mut ids = Vec::new();
            for result in made {
                let (id, steps) = result??;
                all.push(steps);
                ids.push(id);
            }
            let started = Instant::now();
            let gone = join_all(ids.into_iter().zip(names).map(|(id, name)| {
                let client = client.clone();
                tokio::spawn(async move { client.teardown(&id, &name).await })
            }))
            .await;
            for result in gone {
                result??;
            }
            teardowns.push(started.elapsed());
            eprintln!(
                "bench: N={count} round {run}: totals {:?}",
                all[all.len() - count..]
                    .iter()
                    .map(|s| ms(s.total()))
                    .collect::<Vec<_>>()
            );
        }
        let mkfs = match &args.mkfs_dir {
            Some(dir) => Some(mkfs_alone(dir, count, args.size_mib * MIB, &args.fs).await?),
            None => None,
        };
        let pick = |f: fn(&Steps) -> Duration| all.iter().map(f).collect::<Vec<_>>();
        let totals = pick(Steps::total);
        let stage = percentile(&pick(|s| s.stage), 50.0);
        lines.push(format!("N={count}: every total (ms, sorted): {:?}", {
            let mut t: Vec<f64> = totals.iter().map(|d| ms(*d)).collect();
            t.sort_by(f64::total_cmp);
            t
        }));
        println!(
            "| {count} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            show(percentile(&totals, 50.0)),
            show(percentile(&totals, 99.0)),
            show(percentile(&totals, 100.0)),
            show(percentile(&pick(|s| s.create), 50.0)),
            show(stage),
            show(percentile(&pick(|s| s.publish), 50.0)),
            mkfs.as_ref()
                .map_or("-".into(), |m| show(percentile(m, 50.0))),
            mkfs.as_ref().map_or("-".into(), |m| format!(
                "{:.2}",
                percentile(m, 50.0).as_secs_f64() / stage.as_secs_f64()
            )),
            show(percentile(&teardowns, 50.0)),
        );
    }
    println!();
    println!("load average at the end: {}", load_average());
    println!();
    for line in lines {
        println!("- {line}");
    }
    Ok(())
}

impl Client {
    async fn provision(mut self, name: &str) -> Result<(String, Steps)> {
        let started = Instant::now();
        let id = self
            .controller
            .create_volume(proto::CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(proto::CapacityRange {
                    required_bytes: self.bytes as i64,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![self.cap.clone()],
                ..Default::default()
            })
            .await?
            .into_inner()
            .volume
            .ok_or("CreateVolume returned no volume")?
            .volume_id;
        let create = started.elapsed();
        // The kubelet makes the staging directory's parent; kura makes the directory.
        let (staging, target) = self.paths(name);
        let started = Instant::now();
        self.node
            .node_stage_volume(proto::NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: text(&staging),
                volume_capability: Some(self.cap.clone()),
                ..Default::default()
            })
            .await?;
        let stage = started.elapsed();
        let started = Instant::now();
        self.node
            .node_publish_volume(proto::NodePublishVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: text(&staging),
                target_path: text(&target),
                volume_capability: Some(self.cap.clone()),
                ..Default::default()
            })
            .await?;
        let publish = started.elapsed();
        Ok((
            id,
            Steps {
                create,
                stage,
                publish,
            },
        ))
    }

    fn paths(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.work.join(format!("stage-{name}")),
            self.work.join(format!("publish-{name}")),
        )
    }

    async fn teardown(mut self, id: &str, name: &str) -> Result<()> {
        let (staging, target) = self.paths(name);
        self.node
            .node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: text(&target),
            })
            .await?;
        self.node
            .node_unstage_volume(proto::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: text(&staging),
            })
            .await?;
        self.controller
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            })
            .await?;
        Ok(())
    }
}

/// Attaches `count` fresh sparse images of `bytes` in `dir` as kura does (4 KiB
/// sectors, direct I/O) and formats them all at once with kura's mkfs call; returns
/// each format's time. Removes what it made.
async fn mkfs_alone(dir: &Path, count: usize, bytes: u64, fs: &str) -> Result<Vec<Duration>> {
    std::fs::create_dir_all(dir)?;
    let mut devices = Vec::new();
    for i in 0..count {
        let image = dir.join(format!("mkfs-{i}.img"));
        kura::sys::fs::create_image(&image, bytes, false)?;
        let device = kura::sys::loopdev::attach_with_block_size(
            &image,
            false,
            kura::pool::attach::VOLUME_SECTOR_SIZE,
        )?;
        devices.push((image, device));
    }
    let fs: kura::sys::FsType = fs.parse()?;
    let timed = join_all(devices.iter().map(|(_, device)| {
        let device = device.clone();
        tokio::task::spawn_blocking(move || -> Result<Duration> {
            let started = Instant::now();
            kura::sys::mkfs::format(&device, fs, false)?;
            Ok(started.elapsed())
        })
    }))
    .await;
    for (image, device) in &devices {
        kura::sys::loopdev::detach(device)?;
        std::fs::remove_file(image)?;
    }
    timed.into_iter().map(|r| r?).collect()
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

fn show(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn text(path: &Path) -> String {
    path.display().to_string()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
