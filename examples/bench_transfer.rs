//! How fast a cross-node transfer moves an image between two running `kura node`
//! agents, against `cp --sparse=always` of the same image in the same run.
//! bench/cross-node.sh starts the two agents and runs it:
//!
//!     bench_transfer --certs DIR --source ADDR --destination ADDR \
//!         --source-root A/state/pool --destination-root B/state/pool \
//!         --pids PID_A,PID_B --sizes 1,8 --runs 3
//!
//! For each size it creates a thin volume of that many GiB on the source node (through
//! the agent, with the controller identity, as the controller does), writes every
//! other MiB of its image with non-repeating data (half data, half holes), and then,
//! in `runs` rounds with the order alternating, times
//!
//! - **transfer**: CreateExport on the source agent, Transfer calls on the destination
//!   agent until the volume is there (the controller's path, pin and commit included),
//!   and the CPU time both node processes used meanwhile;
//! - **cp**: `cp --sparse=always` of the source image (of a fresh reflink of it, as
//!   the transfer reads a fresh reflink: neither finds the data in the page cache)
//!   into the destination's pool filesystem, plus an fsync of the copy (the
//!   transfer's commit syncs too), and cp's CPU time.
//!
//! Rates are MB/s (10^6 bytes) of data moved (the image's non-hole bytes). Each copy
//! is deleted before the next round. Prints a markdown table of medians and the
//! samples.

use std::error::Error;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use kura::agent::proto::{self, agent_client::AgentClient};
use tonic::transport::{Channel, Endpoint};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

type Result<T, E = Box<dyn Error + Send + Sync>> = std::result::Result<T, E>;

#[derive(Parser)]
#[command(about = "Time kura's cross-node transfer against cp --sparse=always")]
struct Args {
    /// The directory `kura certs` wrote (controller/ is used).
    #[arg(long)]
    certs: PathBuf,
    #[arg(long)]
    source: String,
    #[arg(long)]
    destination: String,
    #[arg(long)]
    source_root: PathBuf,
    #[arg(long)]
    destination_root: PathBuf,
    /// The two node processes, for their CPU time.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Image sizes, in GiB.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    sizes: Vec<u64>,
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

async fn client(address: &str, certs: &Path) -> Result<AgentClient<Channel>> {
    let files = kura::agent::tls::Files::read(&certs.join("controller"))?;
    let channel = Endpoint::from_shared(format!("https://{address}"))?
        .tls_config(files.client())?
        .connect()
        .await?;
    Ok(AgentClient::new(channel))
}

/// CPU seconds (user + system) a process has used.
fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based).
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// CPU seconds waited-for children have used.
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// Writes every other MiB of `path` (of `size` bytes) with non-repeating data.
fn fill_half(path: &Path, size: u64) -> Result<u64> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut buf = vec![0u8; MIB as usize];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut written = 0;
    let mut offset = 0;
    while offset < size {
        for word in buf.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all_at(&buf, offset)?;
        written += MIB;
        offset += 2 * MIB;
    }
    file.sync_all()?;
    Ok(written)
}

fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[s.len() / 2]
}

struct Sample {
    seconds: f64,
    cpu: f64,
}

async fn transfer(
    args: &Args,
    source: &mut AgentClient<Channel>,
    destination: &mut AgentClient<Channel>,
    volume_id: &str,
    name: &str,
    destination_node: &str,
) -> Result<Sample> {
    let cpu0: f64 = args.pids.iter().map(|p| cpu_of(*p)).sum();
    let started = Instant::now();
    let export = source
        .create_export(proto::CreateExportRequest {
            key: name.to_owned(),
            source: Some(proto::ContentSource {
                kind: Some(proto::content_source::Kind::VolumeId(volume_id.to_owned())),
            }),
            destination_node: destination_node.to_owned(),
        })
        .await?
        .into_inner();
    let request = proto::TransferRequest {
        volume: Some(proto::CreateVolumeRequest {
            name: name.to_owned(),
            provisioning: proto::Provisioning::Thin as i32,
            source: Some(proto::ContentSource {
                kind: Some(proto::content_source::Kind::VolumeId(volume_id.to_owned())),
            }),
            access: vec![proto::AccessKind::Block as i32],
            ..Default::default()
        }),
        export: Some(export.clone()),
        source_address: args.source.clone(),
    };
    let volume = loop {
        let answer = destination.transfer(request.clone()).await?.into_inner();
        match answer.state {
            Some(proto::transfer_response::State::Volume(v)) => break v,
            Some(proto::transfer_response::State::Running(_)) => {}
            None => return Err("no state in the answer".into()),
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let cpu = args.pids.iter().map(|p| cpu_of(*p)).sum::<f64>() - cpu0;
    source
        .delete_export(proto::DeleteExportRequest {
            export_id: export.export_id,
        })
        .await?;
    destination
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: volume.id,
        })
        .await?;
    Ok(Sample { seconds, cpu })
}

/// `cp --sparse=always` of a fresh reflink of `source`: like the transfer's export,
/// a new inode whose pages are not cached yet, so both read the same data from the
/// same place.
fn cp(source: &Path, target: &Path) -> Result<Sample> {
    let pinned = source.with_extension("bench-pin");
    run(std::process::Command::new("cp")
        .arg("--reflink=always")
        .arg(source)
        .arg(&pinned))?;
    let cpu0 = children_cpu();
    let started = Instant::now();
    run(std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(&pinned)
        .arg(target))?;
    std::fs::File::open(target)?.sync_all()?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = children_cpu() - cpu0;
    std::fs::remove_file(target)?;
    std::fs::remove_file(&pinned)?;
    Ok(Sample { seconds, cpu })
}

fn run(command: &mut std::process::Command) -> Result<()> {
    let status = command.status()?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} failed: {status}").into())
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut source = client(&args.source, &args.certs).await?;
    let mut destination = client(&args.destination, &args.certs).await?;
    let destination_node = destination
        .info(proto::InfoRequest {})
        .await?
        .into_inner()
        .node_id;
    println!(
        "| image | data moved | transfer | cp --sparse=always | transfer ÷ cp | CPU per GiB of data: transfer (both nodes) | CPU per GiB: cp |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut notes = Vec::new();
    for &gib in &args.sizes {
        let volume = source
            .create_volume(proto::CreateVolumeRequest {
                name: format!("bench-source-{gib}"),
                required_bytes: gib * GIB,
                provisioning: proto::Provisioning::Thin as i32,
                access: vec![proto::AccessKind::Block as i32],
                ..Default::default()
            })
            .await?
            .into_inner()
            .volume
            .ok_or("no volume")?;
        let image = args
            .source_root
            .join("volumes")
            .join(format!("{}.img", volume.id));
        let data = {
            let image = image.clone();
            tokio::task::spawn_blocking(move || fill_half(&image, gib * GIB)).await??
        };
        let cp_target = args.destination_root.join("bench-cp.img");
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for run in 0..args.runs {
            let name = format!("bench-copy-{gib}-{run}");
            let order = if run % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for is_transfer in order {
                if is_transfer {
                    ours.push(
                        transfer(
                            &args,
                            &mut source,
                            &mut destination,
                            &volume.id,
                            &name,
                            &destination_node,
                        )
                        .await?,
                    );
                } else {
                    let (s, t) = (image.clone(), cp_target.clone());
                    theirs.push(tokio::task::spawn_blocking(move || cp(&s, &t)).await??);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        let rate = |s: &Sample| data as f64 / 1e6 / s.seconds;
        let per_gib = |s: &Sample| s.cpu / (data as f64 / GIB as f64);
        let our_rates: Vec<f64> = ours.iter().map(rate).collect();
        let their_rates: Vec<f64> = theirs.iter().map(rate).collect();
        let (ours_mb, theirs_mb) = (median(&our_rates), median(&their_rates));
        println!(
            "| {gib} GiB | {:.2} GiB | {ours_mb:.0} MB/s | {theirs_mb:.0} MB/s | {:.0}% | {:.2} s | {:.2} s |",
            data as f64 / GIB as f64,
            100.0 * ours_mb / theirs_mb,
            median(&ours.iter().map(per_gib).collect::<Vec<_>>()),
            median(&theirs.iter().map(per_gib).collect::<Vec<_>>()),
        );
        let show = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        notes.push(format!(
            "- {gib} GiB: transfer {} MB/s; cp {} MB/s",
            show(&our_rates),
            show(&their_rates)
        ));
        source
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: volume.id,
            })
            .await?;
    }
    println!("\nSamples (MB/s), in round order:\n");
    for note in notes {
        println!("{note}");
    }
    Ok(())
}
