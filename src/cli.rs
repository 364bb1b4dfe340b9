//! The command line. Every flag can also come from a `KURA_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::pool::size::parse as parse_size;

#[derive(Debug, Parser)]
#[command(
    name = "kura",
    version,
    about = "CSI driver for node-local block storage with instant snapshots and clones"
)]
pub struct Cli {
    /// Log output format.
    #[arg(long, env = "KURA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter (tracing syntax, e.g. `info` or `kura=debug`); RUST_LOG overrides it.
    #[arg(long, env = "KURA_LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Identity, Controller and Node services on one socket, over this machine's pool
    /// (conformance runs, single-node clusters).
    AllInOne(AllInOne),
    /// The node DaemonSet's role: Identity and Node on the CSI socket, plus the agent
    /// (mutual TLS on TCP) through which controllers reach this node's pool.
    Node(NodeArgs),
    /// The controller Deployment's role: Identity and Controller over the agents it
    /// finds. No pool and no state; any number may run at once.
    Controller(ControllerArgs),
    /// Writes a new CA and the controller and node identities (TLS-secret layout).
    Certs(CertsArgs),
    /// Shows what is on this node: volumes, snapshots, group snapshots, attachments,
    /// cross-node copies, and anything orphaned or abnormal with the reason.
    /// Read-only: run it beside the serving `kura node`.
    Inspect(InspectArgs),
}

/// The flags of a role that owns a pool (`all-in-one`, and `node` with more).
pub type AllInOne = Local;

#[derive(Debug, Args)]
pub struct Local {
    /// CSI endpoint to listen on, `unix:///path/csi.sock`. The socket gets mode 0600.
    #[arg(long, env = "KURA_ENDPOINT")]
    pub endpoint: String,
    /// This node's name, as the CO knows it (the topology value).
    #[arg(long, env = "KURA_NODE_ID", value_parser = parse_node_id)]
    pub node_id: String,
    /// Directory for kura's own state: the pool mount point and attachment records.
    #[arg(long, env = "KURA_STATE_DIR", default_value = "/var/lib/kura")]
    pub state_dir: PathBuf,
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Size of the pool image (e.g. 20Gi, 512Mi, 20G); it grows to this on restart.
    #[arg(long, env = "KURA_POOL_SIZE", value_parser = parse_size, requires = "pool_image")]
    pub pool_size: Option<u64>,
    /// Driver name reported to the CO.
    #[arg(long, env = "KURA_DRIVER_NAME", default_value = "kura.csi.dev", value_parser = parse_driver_name)]
    pub driver_name: String,
    /// How many volumes this node may hold (NodeGetInfo max_volumes_per_node).
    #[arg(long, env = "KURA_MAX_VOLUMES_PER_NODE", default_value_t = 1000)]
    pub max_volumes_per_node: i64,
    /// Thin volumes may promise, in all, this many times the pool's size (and each no
    /// more than this many times what is really free).
    #[arg(long, env = "KURA_OVERPROVISION_RATIO", default_value_t = 1.0, value_parser = parse_ratio)]
    pub overprovision_ratio: f64,
    /// Filesystem for mount volumes whose capability names none (ext4, xfs, btrfs).
    #[arg(long, env = "KURA_DEFAULT_FS_TYPE", default_value = "ext4")]
    pub default_fs_type: crate::sys::FsType,
    /// Size of a volume whose request names no capacity (e.g. 1Gi).
    #[arg(long, env = "KURA_DEFAULT_VOLUME_SIZE", default_value = "1Gi", value_parser = parse_size)]
    pub default_volume_size: u64,
    /// `ADDR:PORT` to serve Prometheus metrics on, at `/metrics` (e.g. `0.0.0.0:9820`);
    /// no metrics listener when unset.
    #[arg(long, env = "KURA_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub local: Local,
    /// TCP address the agent listens on, e.g. `0.0.0.0:9810` (mutual TLS only).
    #[arg(long, env = "KURA_AGENT_LISTEN")]
    pub agent_listen: SocketAddr,
    /// `NAME:PORT` resolved to every address of NAME (the headless Service selecting
    /// the node pods), again every few seconds: how this node finds the nodes it
    /// replicates to and from, with or without a controller.
    #[arg(long, env = "KURA_PEERS", value_parser = parse_host_port)]
    pub peers: Option<String>,
    /// A static address `ADDR:PORT` of another node's agent; repeat for several
    /// (comma-separated in the variable).
    #[arg(long, env = "KURA_PEER", value_delimiter = ',')]
    pub peer: Vec<SocketAddr>,
    /// Directory holding this role's identity: ca.crt, tls.crt, tls.key (the node
    /// identity, from `kura certs` or any CA; see README).
    #[arg(long, env = "KURA_TLS_DIR")]
    pub tls_dir: PathBuf,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("targets").required(true).multiple(true).args(["agents", "agent"])))]
pub struct ControllerArgs {
    /// CSI endpoint to listen on, `unix:///path/csi.sock`. The socket gets mode 0600.
    #[arg(long, env = "KURA_ENDPOINT")]
    pub endpoint: String,
    /// Directory holding this role's identity: ca.crt, tls.crt, tls.key (the
    /// controller identity).
    #[arg(long, env = "KURA_TLS_DIR")]
    pub tls_dir: PathBuf,
    /// `NAME:PORT` resolved to every address of NAME (a headless Service selecting
    /// the node pods), again every few seconds.
    #[arg(long, env = "KURA_AGENTS", value_parser = parse_host_port)]
    pub agents: Option<String>,
    /// A static agent address `ADDR:PORT`; repeat for several (comma-separated in the
    /// variable).
    #[arg(long, env = "KURA_AGENT", value_delimiter = ',')]
    pub agent: Vec<SocketAddr>,
    /// Driver name reported to the CO.
    #[arg(long, env = "KURA_DRIVER_NAME", default_value = "kura.csi.dev", value_parser = parse_driver_name)]
    pub driver_name: String,
    /// `ADDR:PORT` to serve Prometheus metrics on, at `/metrics` (e.g. `0.0.0.0:9820`);
    /// no metrics listener when unset.
    #[arg(long, env = "KURA_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Seconds a replica node may be down before its copies are placed on another
    /// node (where one can take them).
    #[arg(long, env = "KURA_REPLACE_REPLICAS_AFTER", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub replace_replicas_after: u64,
}

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Directory to write into: ca.crt, controller/ and node/ (each ca.crt, tls.crt,
    /// tls.key). Existing identities are never overwritten.
    #[arg(long, env = "KURA_CERTS_OUT")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The node's state directory (its image or device pool is mounted at
    /// `<state-dir>/pool`).
    #[arg(long, env = "KURA_STATE_DIR", default_value = "/var/lib/kura")]
    pub state_dir: PathBuf,
    /// The pool of a node started with `--pool-dir`.
    #[arg(long, env = "KURA_POOL_DIR")]
    pub pool_dir: Option<PathBuf>,
    /// An image pool's image, to show the host filesystem under it.
    #[arg(long, env = "KURA_POOL_IMAGE")]
    pub pool_image: Option<PathBuf>,
    /// JSON for scripts, instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Where the pool lives: exactly one source.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct PoolArgs {
    /// Sparse image file kura creates if missing, loop-attaches, formats XFS (when
    /// blank) and mounts under the state directory. Needs --pool-size.
    #[arg(long, env = "KURA_POOL_IMAGE", requires = "pool_size")]
    pub pool_image: Option<PathBuf>,
    /// Dedicated block device. Formatted XFS only when it carries no signature; a
    /// device with another filesystem or a partition table is refused.
    #[arg(long, env = "KURA_POOL_DEVICE")]
    pub pool_device: Option<PathBuf>,
    /// Existing directory on a mounted filesystem (XFS or btrfs for reflinks).
    #[arg(long, env = "KURA_POOL_DIR")]
    pub pool_dir: Option<PathBuf>,
}

/// A CSI plugin name: at most 63 characters, alphanumeric at both ends, with `-`, `_`
/// and `.` allowed inside.
fn parse_driver_name(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b));
    if ok {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{text:?} is not a CSI driver name (at most 63 characters, alphanumeric at both ends, '-', '_' or '.' inside)"
        ))
    }
}

/// A CSI node ID: not empty, at most 256 bytes.
fn parse_node_id(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > 256 {
        return Err(format!(
            "a node ID has 1 to 256 bytes; {text:?} has {}",
            text.len()
        ));
    }
    Ok(text.to_owned())
}

/// `HOST:PORT` with a port number.
fn parse_host_port(text: &str) -> Result<String, String> {
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(text.to_owned())
        }
        _ => Err(format!("{text:?} is not NAME:PORT")),
    }
}

fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 1.0 => Ok(r),
        _ => Err(format!("{text:?} is not a ratio of at least 1.0")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512Mi"), Ok(512 << 20));
        assert_eq!(parse_size("20Gi"), Ok(20 << 30));
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("20G"), Ok(20_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "G", "12X", "-1", "0", "99999999999Pi", "1.5Gi"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn driver_names_and_node_ids() {
        assert!(parse_driver_name("kura.csi.dev").is_ok());
        for bad in ["", "-kura", "kura.", "ku ra", &"k".repeat(64)] {
            assert!(parse_driver_name(bad).is_err(), "{bad}");
        }
        assert!(parse_node_id("worker-1").is_ok());
        assert!(parse_node_id("").is_err());
        assert!(parse_node_id(&"n".repeat(257)).is_err());
    }

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exactly_one_pool_source() {
        let base = [
            "kura",
            "all-in-one",
            "--endpoint",
            "unix:///tmp/x.sock",
            "--node-id",
            "n",
        ];
        let parse = |extra: &[&str]| Cli::try_parse_from(base.iter().chain(extra));
        assert!(parse(&["--pool-dir", "/p"]).is_ok());
        assert!(parse(&["--pool-image", "/p.img", "--pool-size", "1Gi"]).is_ok());
        assert!(parse(&[]).is_err());
        assert!(parse(&["--pool-dir", "/p", "--pool-device", "/dev/x"]).is_err());
        assert!(parse(&["--pool-image", "/p.img"]).is_err());
    }

    #[test]
    fn roles_take_their_flags() {
        let node = Cli::try_parse_from([
            "kura",
            "node",
            "--endpoint",
            "unix:///csi/csi.sock",
            "--node-id",
            "n1",
            "--state-dir",
            "/s",
            "--pool-dir",
            "/p",
            "--agent-listen",
            "127.0.0.2:9810",
            "--tls-dir",
            "/tls",
        ])
        .unwrap();
        assert!(matches!(node.command, Command::Node(_)));
        let controller = |extra: &[&str]| {
            let base = [
                "kura",
                "controller",
                "--endpoint",
                "unix:///csi/csi.sock",
                "--tls-dir",
                "/tls",
            ];
            Cli::try_parse_from(base.iter().chain(extra))
        };
        assert!(controller(&[]).is_err());
        assert!(controller(&["--agents", "kura-agents.kube-system:9810"]).is_ok());
        assert!(controller(&["--agents", "no-port"]).is_err());
        let Command::Controller(args) =
            controller(&["--agent", "127.0.0.2:9810", "--agent", "127.0.0.3:9810"])
                .unwrap()
                .command
        else {
            panic!("controller");
        };
        assert_eq!(args.agent.len(), 2);
        assert!(
            controller(&[
                "--agent",
                "127.0.0.2:9810",
                "--metrics-listen",
                "0.0.0.0:9820"
            ])
            .is_ok()
        );
        assert!(controller(&["--agent", "127.0.0.2:9810", "--metrics-listen", ":9820"]).is_err());
        assert!(Cli::try_parse_from(["kura", "certs", "--out", "/x"]).is_ok());
    }
}
