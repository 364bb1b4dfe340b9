//! The data path, layer by layer: fio (direct I/O, libaio) on the disk (a device of
//! the kind the pool's is, raw or with the filesystem made straight on it), on a file
//! in the pool, and on kura's raw block, ext4 and xfs volumes (thin and thick), plus
//! the cost of the first overwrites after a snapshot and, with `--pgbench-seconds`,
//! PostgreSQL's pgbench on the mount volumes and on the disk's filesystems.
//! bench/datapath.sh runs it against a fresh all-in-one kura:
//!
//!     bench_datapath --endpoint unix:///tmp/x/csi.sock --pool-root /tmp/x/state/pool \
//!         --work /tmp/x/work --runtime 10 --size-mib 1024 --runs 3
//!
//! Every target is made first and prefilled (one sequential pass of 1 MiB direct
//! writes over the measured region), so reads hit written blocks and writes overwrite
//! allocated ones. Then, in each of `runs` rounds, every workload runs on every target,
//! the order of the targets rotating from round to round. Prints, per workload, the
//! medians with min..max over the rounds and the ratios against the file in the pool
//! (the limit a volume can reach) and the disk (what a user compares kura with: an
//! LVM volume is close to it).

use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use clap::Parser;
use kura::csi::proto::controller_client::ControllerClient;
use kura::csi::proto::node_client::NodeClient;
use kura::csi::proto::{self, volume_capability};
use kura::sys::FsType;
use serde_json::Value;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

#[derive(Parser)]
#[command(about = "fio on every layer of kura's data path")]
struct Args {
    /// kura's CSI endpoint, unix:///path/csi.sock.
    #[arg(long)]
    endpoint: String,
    /// The pool's root directory (holding volumes/ and snapshots/).
    #[arg(long)]
    pool_root: PathBuf,
    /// A directory on the filesystem that holds the pool's device file: the disks'
    /// files go there, and staging and publish paths.
    #[arg(long)]
    work: PathBuf,
    /// Seconds per fio run.
    #[arg(long, default_value_t = 10)]
    runtime: u64,
    /// Size of the region fio works on, in MiB (volumes get room for a filesystem on
    /// top).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Rounds.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Targets to measure (default: all).
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// Workloads to run (default: all).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Seconds of 4k random writes after a snapshot (0: skip that measurement).
    #[arg(long, default_value_t = 20)]
    cow_seconds: u64,
    /// A shell command run once every target is ready and before the first round (a
    /// tuning experiment: queue settings of the loop devices, say).
    #[arg(long)]
    ready_setup: Option<String>,
    /// `NAME=shell command`, repeatable: an A/B experiment inside one pool. In every
    /// round each variant's command runs (with $BENCH_WORK set), then every workload
    /// on every target; the variants' order rotates from round to round, and the
    /// tables gain a row per target and variant with its ratio to the first variant.
    /// Each command must set everything the variants differ in.
    #[arg(long, value_parser = parse_variant)]
    variant: Vec<Variant>,
    /// Seconds per pgbench run on every filesystem target (0: no pgbench). Each such
    /// target gets a private PostgreSQL server (its data on the target, its socket in
    /// --work) and room for it.
    #[arg(long, default_value_t = 0)]
    pgbench_seconds: u64,
    /// pgbench's scale factor (100,000 accounts each).
    #[arg(long, default_value_t = 40)]
    pgbench_scale: u32,
    /// pgbench's clients.
    #[arg(long, default_value_t = 8)]
    pgbench_clients: u32,
    /// Where PostgreSQL's programs are (initdb, pg_ctl, psql, pgbench).
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pg_bin: PathBuf,
}

#[derive(Clone, Debug)]
struct Variant {
    name: String,
    command: String,
}

fn parse_variant(text: &str) -> Result<Variant, String> {
    match text.split_once('=') {
        Some((name, command)) if !name.trim().is_empty() => Ok(Variant {
            name: name.trim().to_owned(),
            command: command.to_owned(),
        }),
        _ => Err(format!("--variant {text:?}: expected NAME=shell command")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// A file in the pool, opened by fio with O_DIRECT.
    File,
    Block,
    Ext4,
    Xfs,
}

/// Where a target lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum On {
    /// A kura volume (or, for [`Kind::File`], the pool), thin or thick.
    Kura { thick: bool },
    /// A disk of its own: a loop device with direct I/O over a sparse file on the
    /// host's filesystem, as the pool's device is, the size of a volume.
    Disk,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Target {
    kind: Kind,
    on: On,
}

impl Target {
    fn name(&self) -> String {
        let base = match self.kind {
            Kind::File => return "file".into(),
            Kind::Block => "block",
            Kind::Ext4 => "ext4",
            Kind::Xfs => "xfs",
        };
        match self.on {
            On::Disk if self.kind == Kind::Block => "disk".into(),
            On::Disk => format!("disk-{base}"),
            On::Kura { thick } => format!("{base}-{}", if thick { "thick" } else { "thin" }),
        }
    }

    fn describe(&self) -> &'static str {
        match (self.kind, self.on) {
            (Kind::File, _) => "a file in the pool, O_DIRECT",
            (Kind::Block, On::Disk) => {
                "the disk: a loop device (direct I/O) over a sparse file beside the pool's device file, as the pool's device is"
            }
            (Kind::Ext4, On::Disk) => "a file on ext4 made and mounted as kura does, on a disk",
            (Kind::Xfs, On::Disk) => "a file on xfs made and mounted as kura does, on a disk",
            (Kind::Block, _) => "kura raw block volume (the published device)",
            (Kind::Ext4, _) => "a file on kura's ext4 mount volume",
            (Kind::Xfs, _) => "a file on kura's xfs mount volume",
        }
    }

    /// The filesystem fio's file lives on, for targets that have one of their own.
    fn filesystem(&self) -> Option<FsType> {
        match self.kind {
            Kind::Ext4 => Some(FsType::Ext4),
            Kind::Xfs => Some(FsType::Xfs),
            Kind::File | Kind::Block => None,
        }
    }

    /// The same layout straight on a disk: what this target is compared with.
    fn on_disk(&self) -> Target {
        Target {
            kind: self.kind,
            on: On::Disk,
        }
    }
}

const fn target(kind: Kind, on: On) -> Target {
    Target { kind, on }
}

const THIN: On = On::Kura { thick: false };
const THICK: On = On::Kura { thick: true };

const ALL_TARGETS: [Target; 10] = [
    target(Kind::Block, On::Disk),
    target(Kind::Ext4, On::Disk),
    target(Kind::Xfs, On::Disk),
    target(Kind::File, THIN),
    target(Kind::Block, THIN),
    target(Kind::Block, THICK),
    target(Kind::Ext4, THIN),
    target(Kind::Ext4, THICK),
    target(Kind::Xfs, THIN),
    target(Kind::Xfs, THICK),
];

#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    depth: u32,
    /// Whether latency percentiles are the point (QD1).
    latency: bool,
    /// Buffered writes, each followed by fdatasync, as a database commits (PostgreSQL's
    /// WAL): the percentiles are the fdatasync calls'.
    fdatasync: bool,
}

const ALL_WORKLOADS: [Workload; 7] = [
    Workload {
        name: "randread-4k-qd32",
        rw: "randread",
        bs: "4k",
        depth: 32,
        latency: false,
        fdatasync: false,
    },
    Workload {
        name: "randwrite-4k-qd32",
        rw: "randwrite",
        bs: "4k",
        depth: 32,
        latency: false,
        fdatasync: false,
    },
    Workload {
        name: "randread-4k-qd1",
        rw: "randread",
        bs: "4k",
        depth: 1,
        latency: true,
        fdatasync: false,
    },
    Workload {
        name: "randwrite-4k-qd1",
        rw: "randwrite",
        bs: "4k",
        depth: 1,
        latency: true,
        fdatasync: false,
    },
    Workload {
        name: "read-1m-qd8",
        rw: "read",
        bs: "1m",
        depth: 8,
        latency: false,
        fdatasync: false,
    },
    Workload {
        name: "write-1m-qd8",
        rw: "write",
        bs: "1m",
        depth: 8,
        latency: false,
        fdatasync: false,
    },
    Workload {
        name: "fdatasync-4k-qd1",
        rw: "write",
        bs: "4k",
        depth: 1,
        latency: true,
        fdatasync: true,
    },
];

/// The three runs of 4k random writes of the overwrite-after-a-snapshot measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// On the prefilled volume, no snapshot ever taken.
    Without,
    /// Right after CreateSnapshot.
    After,
    /// After DeleteSnapshot, on the volume the previous run overwrote.
    Deleted,
}

impl Phase {
    const ALL: [Phase; 3] = [Phase::Without, Phase::After, Phase::Deleted];

    fn describe(self) -> &'static str {
        match self {
            Phase::Without => "no snapshot yet",
            Phase::After => "right after a snapshot",
            Phase::Deleted => "once that snapshot is deleted",
        }
    }
}

/// Per (workload, variant, target), one sample per round.
type Samples = BTreeMap<(usize, usize, Target), Vec<Sample>>;

/// One fio run's figures.
#[derive(Clone, Copy, Debug)]
struct Sample {
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
}

/// A target made ready for fio: the path fio works on, and what undoes it.
struct Ready {
    target: Target,
    path: PathBuf,
    /// The directory of the target's own filesystem, where it has one.
    root: Option<PathBuf>,
    volume: Option<Staged>,
    disk: Option<Disk>,
}

/// A disk the bench attached, and the filesystem it mounted on it.
struct Disk {
    device: PathBuf,
    file: PathBuf,
    mount: Option<PathBuf>,
}

struct Staged {
    id: String,
    staging: PathBuf,
    publish: PathBuf,
}

struct Bench {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    args: Args,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let socket = kura::server::socket_path(&args.endpoint).map_err(|e| e.to_string())?;
    let channel = kura::csi::client::connect(&socket).await?;
    std::fs::create_dir_all(&args.work)?;
    let targets: Vec<Target> = ALL_TARGETS
        .into_iter()
        .filter(|t| args.targets.is_empty() || args.targets.contains(&t.name()))
        .collect();
    let workloads: Vec<Workload> = ALL_WORKLOADS
        .into_iter()
        .filter(|w| args.workloads.is_empty() || args.workloads.iter().any(|n| n == w.name))
        .collect();
    if targets.is_empty() || workloads.is_empty() {
        return Err("no target or no workload selected".into());
    }
    let bench = Bench {
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
        args,
    };
    print_header(&bench.args, &targets, &workloads)?;

    let mut ready = Vec::new();
    for target in &targets {
        let made = bench.prepare(*target).await?;
        eprintln!("bench: {} ready at {}", target.name(), made.path.display());
        ready.push(made);
    }
    if let Some(setup) = &bench.args.ready_setup {
        println!("setup once the targets were ready: {setup}");
        println!();
        let status = Command::new("sh").args(["-c", setup]).status()?;
        if !status.success() {
            return Err(format!("--ready-setup failed: {status}").into());
        }
    }
    let variants = &bench.args.variant;
    for v in variants {
        println!("- variant {}: {}", v.name, v.command);
    }
    if !variants.is_empty() {
        println!();
    }
    let mut samples: Samples = BTreeMap::new();
    for run in 0..bench.args.runs {
        for j in 0..variants.len().max(1) {
            let variant = (!variants.is_empty()).then(|| (run + j) % variants.len());
            if let Some(v) = variant {
                let status = Command::new("sh")
                    .args(["-c", &variants[v].command])
                    .status()?;
                if !status.success() {
                    return Err(format!("--variant {}: {status}", variants[v].name).into());
                }
            }
            for (w, workload) in workloads.iter().enumerate() {
                for k in 0..ready.len() {
                    let r = &ready[(run + k) % ready.len()];
                    let sample = bench.fio(&r.path, workload, None)?;
                    eprintln!(
                        "bench: round {run}{} {} {}: {:.0} IOPS, {:.1} MiB/s, p50 {:.0} us, p99 {:.0} us",
                        variant.map_or(String::new(), |v| format!(" [{}]", variants[v].name)),
                        workload.name,
                        r.target.name(),
                        sample.iops,
                        sample.mib_s,
                        sample.p50_us,
                        sample.p99_us
                    );
                    samples
                        .entry((w, variant.unwrap_or(0), r.target))
                        .or_default()
                        .push(sample);
                }
            }
        }
    }
    print_tables(&workloads, &targets, variants, &samples, bench.args.runs);

    if bench.args.pgbench_seconds > 0 {
        bench.pgbench(&ready)?;
    }

    if bench.args.cow_seconds > 0 {
        bench.after_snapshot().await?;
    }
    for r in ready {
        bench.release(r).await?;
    }
    Ok(())
}

fn print_header(args: &Args, targets: &[Target], workloads: &[Workload]) -> Result<()> {
    let fio = Command::new("fio").arg("--version").output()?;
    println!(
        "fio {} (direct=1, ioengine=libaio, one job), {} s per run, {} rounds interleaved, region {} MiB per target; load average at start: {}",
        String::from_utf8_lossy(&fio.stdout).trim(),
        args.runtime,
        args.runs,
        args.size_mib,
        load_average()
    );
    println!();
    println!("Targets:");
    for t in targets {
        println!("- {}: {}", t.name(), t.describe());
    }
    println!();
    println!("Workloads:");
    for w in workloads {
        println!("- {}: rw={} bs={} iodepth={}", w.name, w.rw, w.bs, w.depth);
    }
    println!();
    Ok(())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn block_capability() -> proto::VolumeCapability {
    capability(volume_capability::AccessType::Block(
        volume_capability::BlockVolume {},
    ))
}

fn mount_capability(fs_type: &str) -> proto::VolumeCapability {
    capability(volume_capability::AccessType::Mount(
        volume_capability::MountVolume {
            fs_type: fs_type.into(),
            ..Default::default()
        },
    ))
}

fn capability(access: volume_capability::AccessType) -> proto::VolumeCapability {
    proto::VolumeCapability {
        access_type: Some(access),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

fn text(path: &Path) -> String {
    path.display().to_string()
}

impl Bench {
    fn region(&self) -> u64 {
        self.args.size_mib * MIB
    }

    /// A volume's size: the region, room for the filesystem's own metadata and journal
    /// beside fio's file, and for PostgreSQL's data and WAL when pgbench runs.
    fn volume_bytes(&self) -> u64 {
        let pgbench = match self.args.pgbench_seconds {
            0 => 0,
            _ => 2048 * MIB + u64::from(self.args.pgbench_scale) * 16 * MIB,
        };
        self.region() + 256 * MIB + pgbench
    }

    async fn prepare(&self, target: Target) -> Result<Ready> {
        let work = &self.args.work;
        let ready = match (target.kind, target.on) {
            (Kind::File, _) => Ready {
                target,
                path: self.args.pool_root.join("bench-file.img"),
                root: None,
                volume: None,
                disk: None,
            },
            (_, On::Disk) => {
                let file = work.join(format!("{}.img", target.name()));
                kura::sys::fs::create_image(&file, self.volume_bytes(), false)?;
                // As bench/datapath.sh attaches the pool's device.
                let output = Command::new("losetup")
                    .args(["--direct-io=on", "--show", "-f"])
                    .arg(&file)
                    .output()?;
                if !output.status.success() {
                    return Err(format!(
                        "losetup {}: {}",
                        file.display(),
                        String::from_utf8_lossy(&output.stderr)
                    )
                    .into());
                }
                let device = PathBuf::from(String::from_utf8(output.stdout)?.trim());
                let mut disk = Disk {
                    device: device.clone(),
                    file,
                    mount: None,
                };
                let (path, root) = match target.filesystem() {
                    None => (device, None),
                    Some(fs) => {
                        // Made and mounted by kura's own code, as a volume's is.
                        let mount = work.join(format!("{}-mnt", target.name()));
                        std::fs::create_dir_all(&mount)?;
                        kura::sys::mkfs::format(&device, fs, false)?;
                        kura::sys::mount::mount_fs(&device, &mount, fs, &[])?;
                        disk.mount = Some(mount.clone());
                        (mount.join("fio.dat"), Some(mount))
                    }
                };
                Ready {
                    target,
                    path,
                    root,
                    volume: None,
                    disk: Some(disk),
                }
            }
            (kind, On::Kura { thick }) => {
                let cap = match kind {
                    Kind::Block => block_capability(),
                    Kind::Ext4 => mount_capability("ext4"),
                    _ => mount_capability("xfs"),
                };
                let staged = self.volume(&target.name(), thick, &cap).await?;
                let (path, root) = match kind {
                    Kind::Block => (staged.publish.clone(), None),
                    _ => (staged.publish.join("fio.dat"), Some(staged.publish.clone())),
                };
                Ready {
                    target,
                    path,
                    root,
                    volume: Some(staged),
                    disk: None,
                }
            }
        };
        self.fill(&ready.path)?;
        Ok(ready)
    }

    /// Creates, stages and publishes a volume the way the kubelet would.
    async fn volume(
        &self,
        name: &str,
        thick: bool,
        cap: &proto::VolumeCapability,
    ) -> Result<Staged> {
        let (mut controller, mut node) = (self.controller.clone(), self.node.clone());
        let bytes = self.volume_bytes();
        let id = controller
            .create_volume(proto::CreateVolumeRequest {
                name: format!("bench-{name}"),
                capacity_range: Some(proto::CapacityRange {
                    required_bytes: bytes as i64,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap.clone()],
                parameters: [(
                    "kura.csi.dev/provisioning".to_owned(),
                    if thick { "thick" } else { "thin" }.to_owned(),
                )]
                .into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .volume
            .ok_or("CreateVolume returned no volume")?
            .volume_id;
        let staging = self.args.work.join(format!("stage-{name}"));
        let publish = self.args.work.join(format!("publish-{name}"));
        std::fs::create_dir_all(&staging)?;
        node.node_stage_volume(proto::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: text(&staging),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await?;
        node.node_publish_volume(proto::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: text(&staging),
            target_path: text(&publish),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await?;
        Ok(Staged {
            id,
            staging,
            publish,
        })
    }

    async fn release(&self, ready: Ready) -> Result<()> {
        if let Some(disk) = ready.disk {
            if let Some(mount) = &disk.mount {
                kura::sys::mount::unmount(mount)?;
                std::fs::remove_dir(mount)?;
            }
            kura::sys::loopdev::detach(&disk.device)?;
            std::fs::remove_file(&disk.file)?;
        }
        if ready.target.kind == Kind::File {
            std::fs::remove_file(&ready.path)?;
        }
        if let Some(staged) = ready.volume {
            if ready.target.kind != Kind::Block {
                std::fs::remove_file(&ready.path)?;
            }
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
        }
        Ok(())
    }

    /// One sequential pass of 1 MiB direct writes over the region (creating the file
    /// where the target is one).
    fn fill(&self, path: &Path) -> Result<()> {
        let status = Command::new("fio")
            .args(["--name=fill", "--rw=write", "--bs=1m", "--iodepth=8"])
            .args(["--direct=1", "--ioengine=libaio", "--output-format=terse"])
            .arg(format!("--filename={}", path.display()))
            .arg(format!("--size={}", self.region()))
            .output()?;
        if !status.status.success() {
            return Err(format!(
                "fio fill of {}: {}",
                path.display(),
                String::from_utf8_lossy(&status.stderr)
            )
            .into());
        }
        Ok(())
    }

    /// Runs one workload on `path` for the runtime (or `seconds`), returning its
    /// figures; with `iops_log`, fio also writes per-second IOPS there.
    fn fio(&self, path: &Path, w: &Workload, iops_log: Option<(&Path, u64)>) -> Result<Sample> {
        let runtime = iops_log.map_or(self.args.runtime, |(_, s)| s);
        let mut command = Command::new("fio");
        command
            .arg(format!("--name={}", w.name))
            .arg(format!("--filename={}", path.display()))
            .arg(format!("--rw={}", w.rw))
            .arg(format!("--bs={}", w.bs))
            .arg(format!("--iodepth={}", w.depth))
            .arg(format!("--size={}", self.region()))
            .arg(format!("--runtime={runtime}"))
            .args(["--time_based=1", "--randrepeat=0", "--norandommap=1"])
            .arg("--output-format=json");
        match w.fdatasync {
            true => command.args(["--direct=0", "--ioengine=psync", "--fdatasync=1"]),
            false => command.args(["--direct=1", "--ioengine=libaio"]),
        };
        if let Some((prefix, _)) = iops_log {
            command
                .arg(format!("--write_iops_log={}", prefix.display()))
                .args(["--log_avg_msec=1000", "--per_job_logs=0"]);
        }
        let output = command.output()?;
        if !output.status.success() {
            return Err(format!(
                "fio {} on {}: {}",
                w.name,
                path.display(),
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        parse_fio(&output.stdout, w)
    }

    /// PostgreSQL's pgbench (TPC-B like, the default script) on every target with a
    /// filesystem of its own: a private server per target (its data on the target, its
    /// socket in --work, trust authentication, every other setting the default: fsync
    /// on, synchronous commits, WAL synced with fdatasync), initialised once, then
    /// `runs` rounds with the targets' order rotating, a CHECKPOINT before each run.
    /// The servers are stopped at the end (and by bench/lib.sh's cleanup on a failure).
    fn pgbench(&self, ready: &[Ready]) -> Result<()> {
        let args = &self.args;
        let on_fs: Vec<&Ready> = ready.iter().filter(|r| r.root.is_some()).collect();
        let mut servers = Vec::new();
        for r in &on_fs {
            let server = Postgres::start(args, r)?;
            eprintln!("bench: pgbench initialised on {}", r.target.name());
            servers.push(server);
        }
        let mut tps: BTreeMap<Target, Vec<f64>> = BTreeMap::new();
        let mut latency: BTreeMap<Target, Vec<f64>> = BTreeMap::new();
        let mut failed = None;
        'rounds: for run in 0..args.runs {
            for k in 0..servers.len() {
                let server = &servers[(run + k) % servers.len()];
                match server.run(args) {
                    Ok((t, ms)) => {
                        eprintln!(
                            "bench: round {run} pgbench {}: {t:.0} TPS, latency average {ms:.2} ms",
                            server.target.name()
                        );
                        tps.entry(server.target).or_default().push(t);
                        latency.entry(server.target).or_default().push(ms);
                    }
                    Err(e) => {
                        failed = Some(e);
                        break 'rounds;
                    }
                }
            }
        }
        for server in servers {
            server.stop(args)?;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        println!(
            "### pgbench (scale {}, {} clients, 2 threads, {} s per run; medians of {} interleaved rounds, (min..max))",
            args.pgbench_scale, args.pgbench_clients, args.pgbench_seconds, args.runs
        );
        println!();
        println!("| target | TPS | latency average ms | TPS ÷ disk |");
        println!("|---|---|---|---|");
        for r in &on_fs {
            let t = &tps[&r.target];
            let disk = tps
                .get(&r.target.on_disk())
                .filter(|_| r.target.on != On::Disk)
                .map_or("-".to_owned(), |d| format!("{:.2}", median(t) / median(d)));
            println!(
                "| {} | {} | {} | {disk} |",
                r.target.name(),
                with_range(t),
                with_range(&latency[&r.target])
            );
        }
        println!();
        Ok(())
    }

    /// The first overwrites after a snapshot pay copy-on-write. In each round a fresh
    /// thin block volume is made and prefilled; 4k random writes (QD32) run on it for
    /// `cow_seconds` (the baseline), then CreateSnapshot, then the same writes again,
    /// IOPS logged per second in both; then the snapshot is deleted and the writes run
    /// a third time (what the overwrites after the snapshot left: a fragmented image
    /// stays slower), and the volume is deleted.
    /// A fresh volume per round, because overwriting a volume after a snapshot leaves
    /// it fragmented (and XFS keeps copy-on-write reservations for a while), which
    /// would lower a later baseline.
    async fn after_snapshot(&self) -> Result<()> {
        let workload = ALL_WORKLOADS[1];
        let seconds = self.args.cow_seconds;
        let target = target(Kind::Block, THIN);
        let mut series: [Vec<Vec<f64>>; 3] = Default::default();
        let mut controller = self.controller.clone();
        for run in 0..self.args.runs {
            let mut snapshot_id = None;
            let staged = self
                .volume(&format!("cow-{run}"), false, &block_capability())
                .await?;
            let ready = Ready {
                target,
                path: staged.publish.clone(),
                root: None,
                volume: Some(staged),
                disk: None,
            };
            self.fill(&ready.path)?;
            for phase in Phase::ALL {
                if phase == Phase::After {
                    let started = Instant::now();
                    let made = controller
                        .create_snapshot(proto::CreateSnapshotRequest {
                            source_volume_id: ready
                                .volume
                                .as_ref()
                                .map(|s| s.id.clone())
                                .unwrap_or_default(),
                            name: format!("bench-cow-{run}"),
                            ..Default::default()
                        })
                        .await?
                        .into_inner()
                        .snapshot
                        .ok_or("CreateSnapshot returned no snapshot")?;
                    eprintln!("bench: snapshot taken in {:.1?}", started.elapsed());
                    snapshot_id = Some(made.snapshot_id);
                }
                if phase == Phase::Deleted
                    && let Some(snapshot_id) = snapshot_id.take()
                {
                    controller
                        .delete_snapshot(proto::DeleteSnapshotRequest {
                            snapshot_id,
                            ..Default::default()
                        })
                        .await?;
                }
                let prefix = self.args.work.join(format!("cow-{run}-{phase:?}"));
                let sample = self.fio(&ready.path, &workload, Some((&prefix, seconds)))?;
                let log = prefix.with_file_name(format!(
                    "{}_iops.log",
                    prefix.file_name().unwrap_or_default().to_string_lossy()
                ));
                let per_second = parse_iops_log(&std::fs::read_to_string(&log)?);
                std::fs::remove_file(&log)?;
                eprintln!(
                    "bench: round {run} overwrite, {}: {:.0} IOPS overall, per second {:?}",
                    phase.describe(),
                    sample.iops,
                    per_second.iter().map(|v| v.round()).collect::<Vec<_>>()
                );
                series[phase as usize].push(per_second);
            }
            self.release(ready).await?;
        }
        print_cow(&series, seconds, &target);
        Ok(())
    }
}

/// A private PostgreSQL server for one target.
struct Postgres {
    target: Target,
    data: PathBuf,
    socket: PathBuf,
}

impl Postgres {
    /// initdb on the target, start, and pgbench's initialisation at the scale asked.
    fn start(args: &Args, ready: &Ready) -> Result<Postgres> {
        let root = ready.root.as_ref().ok_or("pgbench needs a filesystem")?;
        let server = Postgres {
            target: ready.target,
            data: root.join("pgdata"),
            socket: args.work.join(format!("pg-{}", ready.target.name())),
        };
        for dir in [&server.data, &server.socket] {
            std::fs::create_dir_all(dir)?;
            run_tool(
                Command::new("chown").args(["postgres:postgres"]).arg(dir),
                false,
            )?;
        }
        let data = text(&server.data);
        let bin = |name: &str| args.pg_bin.join(name);
        run_tool(
            Command::new(bin("initdb")).args([
                "-D",
                &data,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
            ]),
            true,
        )?;
        let options = format!(
            "-c listen_addresses='' -c unix_socket_directories={} -p 5432",
            server.socket.display()
        );
        let log = text(&server.socket.join("server.log"));
        run_tool(
            Command::new(bin("pg_ctl"))
                .args(["-D", &data, "-l", &log, "-w", "-o", &options, "start"]),
            true,
        )?;
        run_tool(server.client(args, "createdb").arg("bench"), true)?;
        run_tool(
            server.client(args, "pgbench").args([
                "-i",
                "-q",
                "-s",
                &args.pgbench_scale.to_string(),
                "bench",
            ]),
            true,
        )?;
        Ok(server)
    }

    fn client(&self, args: &Args, program: &str) -> Command {
        let mut command = Command::new(args.pg_bin.join(program));
        command.arg("-h").arg(&self.socket).args(["-p", "5432"]);
        command
    }

    /// One pgbench run after a CHECKPOINT: (TPS, average latency in ms).
    fn run(&self, args: &Args) -> Result<(f64, f64)> {
        run_tool(
            self.client(args, "psql")
                .args(["-q", "-c", "CHECKPOINT", "bench"]),
            true,
        )?;
        let output = run_tool(
            self.client(args, "pgbench").args([
                "-c",
                &args.pgbench_clients.to_string(),
                "-j",
                "2",
                "-T",
                &args.pgbench_seconds.to_string(),
                "bench",
            ]),
            true,
        )?;
        let figure = |prefix: &str| -> Result<f64> {
            output
                .lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
                .ok_or_else(|| format!("pgbench printed no {prefix:?}: {output}").into())
        };
        Ok((figure("tps = ")?, figure("latency average = ")?))
    }

    fn stop(self, args: &Args) -> Result<()> {
        run_tool(
            Command::new(args.pg_bin.join("pg_ctl")).args([
                "-D",
                &text(&self.data),
                "-m",
                "fast",
                "-w",
                "stop",
            ]),
            true,
        )?;
        Ok(())
    }
}

/// Runs `command` (as the postgres user with `as_postgres`: PostgreSQL refuses root) and
/// returns its standard output; a failure carries its standard error.
fn run_tool(command: &mut Command, as_postgres: bool) -> Result<String> {
    let output = match as_postgres {
        true => Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(command.get_program())
            .args(command.get_args())
            .output()?,
        false => command.output()?,
    };
    if !output.status.success() {
        return Err(format!("{:?}: {}", command, String::from_utf8_lossy(&output.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn parse_fio(json: &[u8], w: &Workload) -> Result<Sample> {
    let value: Value = serde_json::from_slice(json)?;
    let job = &value["jobs"][0];
    let side = if w.rw.contains("read") {
        &job["read"]
    } else {
        &job["write"]
    };
    let number = |v: &Value| v.as_f64().ok_or("fio output lacks a figure");
    let latencies = match w.fdatasync {
        true => &job["sync"]["lat_ns"],
        false => &side["clat_ns"],
    };
    let percentile = |p: &str| -> Result<f64> { Ok(number(&latencies["percentile"][p])? / 1000.0) };
    Ok(Sample {
        iops: number(&side["iops"])?,
        mib_s: number(&side["bw"])? / 1024.0,
        p50_us: percentile("50.000000")?,
        p99_us: percentile("99.000000")?,
    })
}

/// fio's averaged IOPS log: `msec, iops, direction, bs, prio` per line.
fn parse_iops_log(log: &str) -> Vec<f64> {
    log.lines()
        .filter_map(|l| l.split(',').nth(1)?.trim().parse().ok())
        .collect()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn spread(values: &[f64]) -> (f64, f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(values), min, max)
}

fn figure(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn with_range(values: &[f64]) -> String {
    let (m, lo, hi) = spread(values);
    format!("{} ({}..{})", figure(m), figure(lo), figure(hi))
}

fn print_tables(
    workloads: &[Workload],
    targets: &[Target],
    variants: &[Variant],
    samples: &Samples,
    runs: usize,
) {
    let file = target(Kind::File, THIN);
    let compare = variants.len() > 1;
    println!(
        "Medians of {runs} interleaved rounds, (min..max); ratios: of the medians, (per round min..max)."
    );
    for (w, workload) in workloads.iter().enumerate() {
        let throughput = |s: &Sample| {
            if workload.bs == "1m" { s.mib_s } else { s.iops }
        };
        let unit = if workload.bs == "1m" { "MiB/s" } else { "IOPS" };
        println!();
        println!("### {}", workload.name);
        println!();
        let extra = if compare {
            format!(" ÷ {} |", variants[0].name)
        } else {
            String::new()
        };
        if workload.latency {
            println!(
                "| target | {unit} | p50 µs | p99 µs | ÷ file | ÷ disk | p50 ÷ disk | p99 ÷ disk |{extra}"
            );
            println!(
                "|---|---|---|---|---|---|---|---|{}",
                if compare { "---|" } else { "" }
            );
        } else {
            println!("| target | {unit} | ÷ file | ÷ disk |{extra}");
            println!("|---|---|---|---|{}", if compare { "---|" } else { "" });
        }
        let figures = |v: usize, t: Target, f: &dyn Fn(&Sample) -> f64| {
            samples
                .get(&(w, v, t))
                .map(|s| s.iter().map(f).collect::<Vec<_>>())
        };
        let of = |v: usize, t: Target| figures(v, t, &throughput);
        for target in targets {
            for v in 0..variants.len().max(1) {
                let Some(values) = of(v, *target) else {
                    continue;
                };
                let ratio_of = |values: &[f64], base: Option<Vec<f64>>| match base {
                    Some(b) => {
                        let per_round: Vec<f64> =
                            values.iter().zip(&b).map(|(v, b)| v / b).collect();
                        let (_, lo, hi) = spread(&per_round);
                        format!("{:.2} ({lo:.2}..{hi:.2})", median(values) / median(&b))
                    }
                    None => "-".into(),
                };
                let ratio = |base: Option<Vec<f64>>| ratio_of(&values, base);
                let against = |base: Target| ratio(of(v, base).filter(|_| base != *target));
                let disk = target.on_disk();
                let name = if compare {
                    format!("{} [{}]", target.name(), variants[v].name)
                } else {
                    target.name()
                };
                let list = &samples[&(w, v, *target)];
                let mut row = format!("| {name} | {} |", with_range(&values));
                if workload.latency {
                    let p50: Vec<f64> = list.iter().map(|s| s.p50_us).collect();
                    let p99: Vec<f64> = list.iter().map(|s| s.p99_us).collect();
                    row += &format!(" {} | {} |", with_range(&p50), with_range(&p99));
                }
                row += &format!(" {} | {} |", against(file), against(disk));
                if workload.latency {
                    for pick in [&|s: &Sample| s.p50_us, &|s: &Sample| s.p99_us]
                        as [&dyn Fn(&Sample) -> f64; 2]
                    {
                        let mine = figures(v, *target, pick).unwrap_or_default();
                        let base = figures(v, disk, pick).filter(|_| disk != *target);
                        row += &format!(" {} |", ratio_of(&mine, base));
                    }
                }
                if compare {
                    row += &format!(" {} |", ratio(of(0, *target).filter(|_| v != 0)));
                }
                println!("{row}");
            }
        }
    }
    println!();
}

/// Per second, the median over rounds; the loss is the seconds of full-rate writing
/// the copy-on-write cost: the sum over seconds of 1 - rate after / rate without.
fn print_cow(series: &[Vec<Vec<f64>>; 3], seconds: u64, target: &Target) {
    let per_second = |runs: &[Vec<f64>]| -> Vec<f64> {
        let len = runs.iter().map(Vec::len).min().unwrap_or(0);
        (0..len)
            .map(|i| median(&runs.iter().map(|r| r[i]).collect::<Vec<_>>()))
            .collect()
    };
    let [without, after, deleted] = series.each_ref().map(|s| per_second(s));
    let baseline = median(&without);
    let loss_of = |r: &[f64]| -> f64 { r.iter().map(|v| (1.0 - v / baseline).max(0.0)).sum() };
    let recovered = after
        .iter()
        .position(|v| *v >= 0.9 * baseline)
        .map_or(format!("not within {seconds} s"), |i| {
            format!("{} s", i + 1)
        });
    let losses: Vec<String> = series[1]
        .iter()
        .map(|r| format!("{:.1} s", loss_of(r)))
        .collect();
    println!(
        "### Overwrite right after a snapshot ({}: 4k random writes, QD32, {seconds} s per run, a fresh volume per round)",
        target.name()
    );
    println!();
    println!(
        "No snapshot yet: {} IOPS (median of the per-second rates). Right after CreateSnapshot: first second {} IOPS ({:.2} of it), back to 0.9 of it after {recovered}; loss {:.1} s of full-rate writing in {seconds} s (per round {}). Once the snapshot is deleted: {} IOPS ({:.2} of the first).",
        figure(baseline),
        after.first().map_or("-".into(), |v| figure(*v)),
        after.first().map_or(f64::NAN, |v| v / baseline),
        loss_of(&after),
        losses.join(", "),
        figure(median(&deleted)),
        median(&deleted) / baseline,
    );
    println!();
    let list = |r: &[f64]| r.iter().map(|v| figure(*v)).collect::<Vec<_>>().join(", ");
    println!("Per second, no snapshot yet: {}", list(&without));
    println!("Per second, right after the snapshot: {}", list(&after));
    println!("Per second, once it is deleted: {}", list(&deleted));
    println!();
}
