//! What a replica costs the volume it protects: fio 4k random writes on a raw block
//! volume with one replica against the same volume without, in the same run; the lag
//! the replica held meanwhile; bytes shipped against bytes written. bench/replication.sh
//! runs it against a controller and two `kura node` processes:
//!
//!     bench_replication --controller unix:///tmp/x/controller.sock \
//!         --node unix:///tmp/x/node-0/csi.sock --node-id bench-node-0 \
//!         --metrics 127.0.0.2:9820 --work /tmp/x/work --interval 10 --runtime 30 --runs 3
//!
//! Both volumes are made on the first node and prefilled (one sequential pass of 1 MiB
//! direct writes), so the writes overwrite allocated blocks in both; the replicated
//! one's first point (a full copy) is shipped before anything is measured. Then, in
//! each round, fio runs on each volume in turn, the order alternating. A sampler reads
//! the first node's metrics every second; the lag figures are the samples taken while
//! fio wrote to the replicated volume. At the end the bench waits for a point taken
//! after the last write to reach the replica, so the bytes shipped cover every write.

use std::error::Error;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use kura::csi::TOPOLOGY_KEY;
use kura::csi::proto::controller_client::ControllerClient;
use kura::csi::proto::node_client::NodeClient;
use kura::csi::proto::{self, volume_capability};
use serde_json::Value;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;

type Result<T, E = Box<dyn Error + Send + Sync>> = std::result::Result<T, E>;

#[derive(Parser)]
#[command(about = "fio on a replicated volume against the same volume without replicas")]
struct Args {
    /// The controller's CSI endpoint, unix:///path/csi.sock.
    #[arg(long)]
    controller: String,
    /// The CSI endpoint of the node the volumes are made on.
    #[arg(long)]
    node: String,
    /// That node's ID.
    #[arg(long)]
    node_id: String,
    /// That node's metrics listener, ADDR:PORT.
    #[arg(long)]
    metrics: String,
    /// A directory for staging and publish paths.
    #[arg(long)]
    work: PathBuf,
    /// The replicated volume's interval, seconds.
    #[arg(long, default_value_t = 10)]
    interval: u64,
    /// Seconds per fio run.
    #[arg(long, default_value_t = 30)]
    runtime: u64,
    /// Size of each volume, MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// fio's queue depth.
    #[arg(long, default_value_t = 32)]
    iodepth: u32,
    /// Rounds.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds to wait for the replica to hold a point taken after the fill, and
    /// after the last write (the figures are printed either way).
    #[arg(long, default_value_t = 300)]
    catch_up: u64,
}

/// A volume made, staged and published on the node.
struct Staged {
    id: String,
    staging: PathBuf,
    publish: PathBuf,
}

/// What one fio run did.
struct Run {
    iops: f64,
    bytes: u64,
}

/// One reading of the node's metrics for the replicated volume.
#[derive(Clone, Copy)]
struct Reading {
    at: Instant,
    lag: u64,
    interval: u64,
    shipped: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.work)?;
    let connect = |endpoint: &str| -> Result<PathBuf> {
        Ok(kura::server::socket_path(endpoint).map_err(|e| e.to_string())?)
    };
    let bench = Bench {
        controller: ControllerClient::new(
            kura::csi::client::connect(&connect(&args.controller)?).await?,
        ),
        node: NodeClient::new(kura::csi::client::connect(&connect(&args.node)?).await?),
        args,
    };
    let a = &bench.args;
    println!(
        "fio randwrite 4k QD{} direct, {} s per run, {} rounds (order alternating), on {} MiB \
         raw block thin volumes, one without replicas and one with 1 replica every {} s; \
         load average at the start: {}",
        a.iodepth,
        a.runtime,
        a.runs,
        a.size_mib,
        a.interval,
        load_average()
    );

    let plain = bench.volume("plain", &[]).await?;
    let interval = format!("{}s", a.interval);
    let replicated = bench
        .volume(
            "replicated",
            &[
                ("kura.csi.dev/replicas", "1"),
                ("kura.csi.dev/replication-interval", &interval),
            ],
        )
        .await?;
    for staged in [&plain, &replicated] {
        bench.fill(&staged.publish)?;
    }
    let filled = Instant::now();
    let first = bench.caught_up(&replicated.id, filled).await?;
    eprintln!(
        "bench: first point shipped ({} MiB) {:.1} s after the fill",
        first.shipped / MIB,
        first.at.duration_since(filled).as_secs_f64()
    );
    if first.interval != a.interval {
        return Err(format!(
            "kura_replica_interval_seconds is {}, the volume asked {}",
            first.interval, a.interval
        )
        .into());
    }

    let readings = Arc::new(Mutex::new(Vec::new()));
    let sampler = tokio::spawn(sample(
        a.metrics.clone(),
        replicated.id.clone(),
        readings.clone(),
    ));
    let (mut plain_runs, mut replicated_runs) = (Vec::new(), Vec::new());
    let mut windows = Vec::new();
    for round in 0..a.runs {
        let replicated_first = round % 2 == 1;
        for replicated_now in [replicated_first, !replicated_first] {
            let (staged, runs) = if replicated_now {
                (&replicated, &mut replicated_runs)
            } else {
                (&plain, &mut plain_runs)
            };
            let start = Instant::now();
            let run = bench.fio(&staged.publish)?;
            eprintln!(
                "bench: round {} {}: {:.0} IOPS, load average {}",
                round + 1,
                if replicated_now {
                    "replicated"
                } else {
                    "plain"
                },
                run.iops,
                load_average()
            );
            runs.push(run);
            if replicated_now {
                windows.push((start, Instant::now()));
            }
        }
    }
    let last_write = Instant::now();
    let end = bench.caught_up(&replicated.id, last_write).await;
    sampler.abort();
    let readings = readings.lock().unwrap_or_else(|e| e.into_inner()).clone();

    report(
        a,
        &plain_runs,
        &replicated_runs,
        &readings,
        &windows,
        first,
        end,
        last_write,
    );
    println!("load average at the end: {}", load_average());
    for staged in [plain, replicated] {
        bench.release(staged).await?;
    }
    Ok(())
}

struct Bench {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    args: Args,
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
    /// Creates a volume on the node with `parameters`, stages and publishes it the way
    /// the provisioner and the kubelet would.
    async fn volume(&self, name: &str, parameters: &[(&str, &str)]) -> Result<Staged> {
        let (mut controller, mut node) = (self.controller.clone(), self.node.clone());
        let cap = block_capability();
        let on_node = proto::Topology {
            segments: [(TOPOLOGY_KEY.to_owned(), self.args.node_id.clone())].into(),
        };
        let volume = controller
            .create_volume(proto::CreateVolumeRequest {
                name: format!("bench-{name}"),
                capacity_range: Some(proto::CapacityRange {
                    required_bytes: (self.args.size_mib * MIB) as i64,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap.clone()],
                parameters: parameters
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                accessibility_requirements: Some(proto::TopologyRequirement {
                    requisite: vec![on_node.clone()],
                    preferred: vec![on_node],
                }),
                ..Default::default()
            })
            .await?
            .into_inner()
            .volume
            .ok_or("CreateVolume returned no volume")?;
        let staging = self.args.work.join(format!("stage-{name}"));
        let publish = self.args.work.join(format!("publish-{name}"));
        std::fs::create_dir_all(&staging)?;
        node.node_stage_volume(proto::NodeStageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: text(&staging),
            volume_capability: Some(cap.clone()),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        })
        .await?;
        node.node_publish_volume(proto::NodePublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: text(&staging),
            target_path: text(&publish),
            volume_capability: Some(cap),
            volume_context: volume.volume_context,
            ..Default::default()
        })
        .await?;
        Ok(Staged {
            id: volume.volume_id,
            staging,
            publish,
        })
    }

    async fn release(&self, staged: Staged) -> Result<()> {
        let (mut controller, mut node) = (self.controller.clone(), self.node.clone());
        node.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
            volume_id: staged.id.clone(),
            target_path: text(&staged.publish),
        })
        .await?;
        node.node_unstage_volume(proto::NodeUnstageVolumeRequest {
            volume_id: staged.id.clone(),
            staging_target_path: text(&staged.staging),
        })
        .await?;
        controller
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: staged.id,
                ..Default::default()
            })
            .await?;
        std::fs::remove_dir(&staged.staging)?;
        Ok(())
    }

    /// Waits until the replica holds a point taken after `since` (its lag, plus a
    /// second for the whole-second timestamps, is less than the time since then); the
    /// reading that showed it.
    async fn caught_up(&self, volume: &str, since: Instant) -> Result<Reading> {
        loop {
            let reading = read_metrics(&self.args.metrics, volume);
            if let Ok(Some(r)) = &reading
                && Duration::from_secs(r.lag + 1) < r.at.duration_since(since)
            {
                return Ok(*r);
            }
            if since.elapsed() > Duration::from_secs(self.args.catch_up) {
                return Err(format!(
                    "after {} s the replica of {volume} holds no newer point: {reading:?}",
                    self.args.catch_up
                )
                .into());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// One sequential pass of 1 MiB direct writes over the device.
    fn fill(&self, device: &Path) -> Result<()> {
        fio(
            device,
            &["--name=fill", "--rw=write", "--bs=1m", "--iodepth=8"],
        )?;
        Ok(())
    }

    /// 4k random writes for the runtime.
    fn fio(&self, device: &Path) -> Result<Run> {
        let json = fio(
            device,
            &[
                "--name=randwrite",
                "--rw=randwrite",
                "--bs=4k",
                &format!("--iodepth={}", self.args.iodepth),
                &format!("--runtime={}", self.args.runtime),
                "--time_based=1",
                "--randrepeat=0",
                "--norandommap=1",
                "--output-format=json",
            ],
        )?;
        let value: Value = serde_json::from_slice(&json)?;
        let write = &value["jobs"][0]["write"];
        Ok(Run {
            iops: write["iops"].as_f64().ok_or("fio output lacks iops")?,
            bytes: write["io_bytes"]
                .as_u64()
                .ok_or("fio output lacks io_bytes")?,
        })
    }
}

/// fio with direct I/O through libaio on the whole device; its standard output.
fn fio(device: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let output = Command::new("fio")
        .arg(format!("--filename={}", device.display()))
        .args(["--direct=1", "--ioengine=libaio"])
        .args(args)
        .output()?;
    if !output.status.success() {
        return Err(format!(
            "fio {args:?} on {}: {}",
            device.display(),
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(output.stdout)
}

/// Every second until aborted: a reading of the replicated volume's series.
async fn sample(metrics: String, volume: String, readings: Arc<Mutex<Vec<Reading>>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        match read_metrics(&metrics, &volume) {
            Ok(Some(r)) => readings.lock().unwrap_or_else(|e| e.into_inner()).push(r),
            Ok(None) => eprintln!("bench: no replica series for {volume}"),
            Err(e) => eprintln!("bench: reading {metrics}: {e}"),
        }
    }
}

impl std::fmt::Debug for Reading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lag {} s, interval {} s, shipped {} bytes",
            self.lag, self.interval, self.shipped
        )
    }
}

/// The volume's replica series from `/metrics` at `address` (plain HTTP/1.0); None
/// while it has no replica placed.
fn read_metrics(address: &str, volume: &str) -> Result<Option<Reading>> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: {address}\r\nAccept: text/plain\r\n\r\n"
    )?;
    let at = Instant::now();
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    let label = format!("volume_id=\"{volume}\"");
    let value = |name: &str| -> Option<u64> {
        body.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))?
            .rsplit(' ')
            .next()?
            .parse::<f64>()
            .ok()
            .map(|v| v as u64)
    };
    Ok(
        match (
            value("kura_replica_lag_seconds"),
            value("kura_replica_interval_seconds"),
            value("kura_replica_shipped_bytes_total"),
        ) {
            (Some(lag), Some(interval), Some(shipped)) => Some(Reading {
                at,
                lag,
                interval,
                shipped,
            }),
            _ => None,
        },
    )
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// The nearest-rank percentile.
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &Args,
    plain: &[Run],
    replicated: &[Run],
    readings: &[Reading],
    windows: &[(Instant, Instant)],
    first: Reading,
    end: Result<Reading>,
    last_write: Instant,
) {
    let iops = |runs: &[Run]| runs.iter().map(|r| r.iops).collect::<Vec<_>>();
    let shown = |runs: &[Run]| {
        iops(runs)
            .iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (p, r) = (median(&iops(plain)), median(&iops(replicated)));
    println!();
    println!("| volume | 4k randwrite IOPS, median | runs |");
    println!("|---|---|---|");
    println!("| no replica | {p:.0} | {} |", shown(plain));
    println!(
        "| 1 replica, {} s interval | {r:.0} | {} |",
        args.interval,
        shown(replicated)
    );
    println!();
    println!(
        "replicated ÷ plain: {:.2} (goal >= 0.90)",
        if p > 0.0 { r / p } else { f64::NAN }
    );

    // While fio wrote to the replicated volume.
    let during: Vec<Reading> = readings
        .iter()
        .copied()
        .filter(|s| windows.iter().any(|(a, b)| s.at >= *a && s.at <= *b))
        .collect();
    let lags: Vec<f64> = during.iter().map(|s| s.lag as f64).collect();
    // Where the lag drops, the replica has just committed a point: the new lag is how
    // long that point took from being taken to being committed (shipping included),
    // to within the one-second sampling and the metric's whole seconds.
    let ships: Vec<f64> = during
        .windows(2)
        .filter(|w| w[1].lag < w[0].lag)
        .map(|w| w[1].lag as f64)
        .collect();
    let ship_max = ships.iter().copied().fold(0.0, f64::max);
    println!();
    println!(
        "lag (kura_replica_lag_seconds, sampled every second while fio wrote to the replicated \
         volume, {} samples): p50 {} s, p99 {} s, max {} s",
        lags.len(),
        percentile(&lags, 50.0),
        percentile(&lags, 99.0),
        lags.iter().copied().fold(0.0, f64::max)
    );
    println!(
        "a point from taken to committed on the replica (the lag just after each commit, {} \
         commits): p50 {} s, max {} s; goal: lag p99 <= interval + that = {} s",
        ships.len(),
        median(&ships),
        ship_max,
        args.interval as f64 + ship_max
    );
    let written: u64 = replicated.iter().map(|r| r.bytes).sum();
    let (last, caught_up) = match &end {
        Ok(r) => (
            *r,
            format!(
                "the last point reached the replica {:.1} s after the last write",
                r.at.duration_since(last_write).as_secs_f64()
            ),
        ),
        Err(e) => (
            readings.last().copied().unwrap_or(first),
            format!("NOT CAUGHT UP: {e}"),
        ),
    };
    let shipped = last.shipped - first.shipped;
    println!(
        "bytes written to the replicated volume: {} MiB; shipped to its replica since its \
         first point: {} MiB ({:.2} of written); {caught_up}",
        written / MIB,
        shipped / MIB,
        shipped as f64 / written.max(1) as f64,
    );
}
