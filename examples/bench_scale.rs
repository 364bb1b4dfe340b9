//! How kura copes with many volumes in one pool: creates per second, a whole listing
//! page by page and in one call, and how soon a restarted kura is ready.
//! bench/scale.sh runs it against a fresh all-in-one kura (and restarts kura itself):
//!
//!     bench_scale create --endpoint unix:///tmp/x/csi.sock --from 0 --to 1000
//!     bench_scale list --endpoint unix:///tmp/x/csi.sock --page 100 --expect 1000
//!     bench_scale ready --endpoint unix:///tmp/x/csi.sock --since-ns 1700000000000000000
//!
//! Each prints one number on stdout (creates per second, or seconds) for the script's
//! table, and what it did on stderr.

use std::collections::HashSet;
use std::error::Error;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use kura::csi::proto::controller_client::ControllerClient;
use kura::csi::proto::identity_client::IdentityClient;
use kura::csi::proto::{self, volume_capability};
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;

type Result<T, E = Box<dyn Error + Send + Sync>> = std::result::Result<T, E>;

#[derive(Parser)]
#[command(about = "Creates, lists and restart readiness at scale, over kura's CSI socket")]
struct Args {
    /// kura's CSI endpoint, unix:///path/csi.sock.
    #[arg(long, global = true, default_value = "")]
    endpoint: String,
    #[command(subcommand)]
    step: Step,
}

#[derive(Subcommand)]
enum Step {
    /// Creates the thin mount volumes `scale-<from>` .. `scale-<to - 1>`; prints
    /// creates per second.
    Create {
        #[arg(long)]
        from: usize,
        #[arg(long)]
        to: usize,
        /// CreateVolume calls in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 1)]
        size_mib: i64,
    },
    /// Lists every volume, `--page` at a time (0: one call), and checks that the
    /// listing holds `--expect` distinct volumes; prints the seconds it took.
    List {
        #[arg(long)]
        page: i32,
        #[arg(long)]
        expect: usize,
    },
    /// Waits until the socket answers Probe with ready; prints the seconds since
    /// `--since-ns` (nanoseconds since the epoch, when kura was started).
    Ready {
        #[arg(long)]
        since_ns: u128,
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let socket = kura::server::socket_path(&args.endpoint).map_err(|e| e.to_string())?;
    match args.step {
        Step::Create {
            from,
            to,
            concurrency,
            size_mib,
        } => {
            let controller = ControllerClient::new(kura::csi::client::connect(&socket).await?);
            let started = Instant::now();
            stream::iter(from..to)
                .map(|i| create(controller.clone(), format!("scale-{i}"), size_mib * MIB))
                .buffer_unordered(concurrency)
                .try_collect::<()>()
                .await?;
            let took = started.elapsed();
            let rate = (to - from) as f64 / took.as_secs_f64();
            eprintln!(
                "bench: created {} volumes ({concurrency} at once) in {took:.2?}: {rate:.0}/s",
                to - from
            );
            println!("{rate:.0}");
        }
        Step::List { page, expect } => {
            let controller = ControllerClient::new(kura::csi::client::connect(&socket).await?);
            let started = Instant::now();
            let (ids, calls) = list(controller, page).await?;
            let took = started.elapsed();
            let distinct: HashSet<&String> = ids.iter().collect();
            eprintln!(
                "bench: listed {} volumes in {calls} calls of max_entries {page} in {took:.2?}",
                ids.len()
            );
            if ids.len() != expect || distinct.len() != expect {
                return Err(format!(
                    "listed {} volumes ({} distinct), expected {expect}",
                    ids.len(),
                    distinct.len()
                )
                .into());
            }
            println!("{:.3}", took.as_secs_f64());
        }
        Step::Ready {
            since_ns,
            timeout_s,
        } => {
            let took = ready(&socket, Duration::from_secs(timeout_s)).await?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
            let since = Duration::from_nanos(now.saturating_sub(since_ns) as u64);
            eprintln!("bench: ready {since:.2?} after the start ({took:.2?} of polling)");
            println!("{:.3}", since.as_secs_f64());
        }
    }
    Ok(())
}

async fn create(mut controller: ControllerClient<Channel>, name: String, bytes: i64) -> Result<()> {
    controller
        .create_volume(proto::CreateVolumeRequest {
            name,
            capacity_range: Some(proto::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![proto::VolumeCapability {
                access_type: Some(volume_capability::AccessType::Mount(
                    volume_capability::MountVolume::default(),
                )),
                access_mode: Some(volume_capability::AccessMode {
                    mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
                }),
            }],
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// Every volume's ID, following next_token, and how many calls it took.
async fn list(
    mut controller: ControllerClient<Channel>,
    page: i32,
) -> Result<(Vec<String>, usize)> {
    let mut ids = Vec::new();
    let mut token = String::new();
    let mut calls = 0;
    loop {
        let answer = controller
            .list_volumes(proto::ListVolumesRequest {
                max_entries: page,
                starting_token: token,
            })
            .await?
            .into_inner();
        calls += 1;
        ids.extend(
            answer
                .entries
                .into_iter()
                .filter_map(|e| e.volume.map(|v| v.volume_id)),
        );
        if answer.next_token.is_empty() {
            return Ok((ids, calls));
        }
        token = answer.next_token;
    }
}

/// Polls Probe every 2 ms until the driver answers ready.
async fn ready(socket: &std::path::Path, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if socket.exists()
            && let Ok(channel) = kura::csi::client::connect(socket).await
            && let Ok(answer) = IdentityClient::new(channel)
                .probe(proto::ProbeRequest {})
                .await
            && answer.into_inner().ready == Some(true)
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(format!("not ready within {timeout:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
