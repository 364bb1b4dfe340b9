//! Building each role from the command line and serving it.
//!
//! - `all-in-one` (this file): Identity, Controller and Node on one Unix socket.
//! - [`node`]: Identity and Node on the CSI socket, plus the agent on TCP.
//! - [`controller`]: Identity and Controller over the agents.
//! - `certs`: writes the identities ([`crate::agent::tls::write_certs`]).
//! - `inspect`: prints what is on the node ([`crate::inspect`]); serves nothing.

pub mod controller;
pub mod node;

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;

use crate::agent::Pools;
use crate::agent::local::InProcess;
use crate::cli::{AllInOne, Command, Local};
use crate::csi::controller::ControllerService;
use crate::csi::identity::{IdentityService, Readiness};
use crate::csi::node::NodeService;
use crate::csi::proto::controller_server::ControllerServer;
use crate::csi::proto::group_controller_server::GroupControllerServer;
use crate::csi::proto::identity_server::IdentityServer;
use crate::csi::proto::node_server::NodeServer;
use crate::csi::proto::snapshot_metadata_server::SnapshotMetadataServer;
use crate::csi::snapshot_metadata::SnapshotMetadataService;
use crate::csi::status;
use crate::metrics::Metrics;
use crate::pool::attach::Attacher;
use crate::pool::source::{self, PoolSource};
use crate::pool::{self, Pool};
use crate::sys;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A node's pool, opened: what `all-in-one` and `node` share.
pub struct OpenedPool {
    /// The node's side: the pool, its attachments and its per-volume locks, shared by
    /// every service of the process.
    pub local: crate::node::Local,
    /// Where the pool lives (a mount point kura made, or the `--pool-dir`).
    pub root: PathBuf,
}

impl OpenedPool {
    /// Prepares the pool (mounting or formatting as the source needs), reconciles it,
    /// and opens the node side, with the given test pause points (off in production:
    /// see [`sys::pause::Points::from_env`]). Blocks.
    pub fn open(args: &Local, pause: sys::pause::Points) -> Result<Self, BoxError> {
        let source = pool_source(args)?;
        std::fs::create_dir_all(&args.state_dir)?;
        let root = source::prepare(&source, &args.state_dir)?;
        let options = pool::Options {
            overprovision_ratio: args.overprovision_ratio,
            default_volume_size: args.default_volume_size,
            mounted_root: !matches!(source, PoolSource::Dir(_)),
            host_image: match &source {
                PoolSource::Image { path, .. } => Some(path.clone()),
                PoolSource::Device(_) | PoolSource::Dir(_) => None,
            },
            pause,
        };
        let pool = Arc::new(Pool::open(&root, &args.node_id, options)?);
        let attacher = Arc::new(Attacher::new(
            Arc::clone(&pool),
            &args.state_dir,
            args.default_fs_type,
        )?);
        // Inline volumes whose pod's mount is gone (a crash mid-publish) go now.
        attacher.recover_inline()?;
        Ok(OpenedPool {
            local: crate::node::Local::new(pool, attacher, &args.node_id),
            root,
        })
    }

    fn node_service(&self, args: &Local) -> NodeService {
        NodeService::new(self.local.clone(), args.max_volumes_per_node)
    }

    /// The CSI operations histogram and this pool's gauges.
    fn metrics(&self, args: &Local) -> Metrics {
        Metrics::new().with_pool(crate::metrics::pool::PoolCollector::new(
            Arc::clone(self.local.pool()),
            self.root.clone(),
            &args.node_id,
        ))
    }
}

/// The services of an all-in-one driver, ready to serve.
pub struct AllInOneDriver {
    identity: IdentityService,
    controller: ControllerService<InProcess>,
    snapshot_metadata: SnapshotMetadataService<InProcess>,
    node: NodeService,
    driver_name: String,
    metrics: Arc<Metrics>,
}

impl AllInOneDriver {
    /// Prepares the pool (mounting or formatting as the source needs), reconciles it,
    /// and builds the services. Blocks.
    pub fn open(args: &AllInOne) -> Result<Self, BoxError> {
        Self::open_with_pause(args, sys::pause::Points::from_env())
    }

    /// [`AllInOneDriver::open`] with the given test pause points: how in-process tests,
    /// which share one environment, give each driver its own.
    pub fn open_with_pause(args: &AllInOne, pause: sys::pause::Points) -> Result<Self, BoxError> {
        let opened = OpenedPool::open(args, pause)?;
        Ok(AllInOneDriver {
            identity: IdentityService::new(
                &args.driver_name,
                Readiness::Pool(opened.local.clone()),
            )
            .with_snapshot_metadata(),
            controller: ControllerService::new(InProcess::new(opened.local.clone())),
            snapshot_metadata: SnapshotMetadataService::new(InProcess::new(opened.local.clone())),
            node: opened.node_service(args),
            driver_name: args.driver_name.clone(),
            metrics: opened
                .metrics(args)
                .with_agents(crate::metrics::agents::AgentsCollector::Local(
                    args.node_id.clone(),
                ))
                .into_shared(),
        })
    }

    /// What this driver counts; [`serve`] records its calls there.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }
}

fn pool_source(args: &Local) -> Result<PoolSource, BoxError> {
    let pool = &args.pool;
    match (&pool.pool_image, &pool.pool_device, &pool.pool_dir) {
        (Some(path), None, None) => Ok(PoolSource::Image {
            path: path.clone(),
            size: args.pool_size.ok_or("--pool-image needs --pool-size")?,
        }),
        (None, Some(device), None) => Ok(PoolSource::Device(device.clone())),
        (None, None, Some(dir)) => Ok(PoolSource::Dir(dir.clone())),
        _ => Err("give exactly one of --pool-image, --pool-device, --pool-dir".into()),
    }
}

/// The largest request message kura decodes (gRPC's customary 4 MiB). A larger one is
/// answered RESOURCE_EXHAUSTED, as gRPC specifies.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// Serves `driver` on `listener` until `shutdown` completes, then lets in-flight calls
/// finish.
pub async fn serve(
    listener: UnixListener,
    driver: AllInOneDriver,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let services = CsiServices {
        identity: driver.identity,
        controller: Some(driver.controller),
        snapshot_metadata: Some(driver.snapshot_metadata),
        node: Some(driver.node),
    };
    serve_csi(
        listener,
        services,
        &driver.metrics,
        &driver.driver_name,
        shutdown,
    )
    .await
}

/// The CSI services one role serves on its socket.
pub(crate) struct CsiServices<P: Pools> {
    pub identity: IdentityService,
    pub controller: Option<ControllerService<P>>,
    /// Served with the controller, where the snapshot-metadata sidecar runs.
    pub snapshot_metadata: Option<SnapshotMetadataService<P>>,
    pub node: Option<NodeService>,
}

/// Serves a role's CSI services on its socket until `shutdown`, as every role does:
/// requests up to [`MAX_REQUEST_BYTES`] (a larger one is RESOURCE_EXHAUSTED), and every
/// call counted in `metrics` with the code the client sees.
pub(crate) async fn serve_csi<P: Pools>(
    listener: UnixListener,
    services: CsiServices<P>,
    metrics: &Metrics,
    driver_name: &str,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let CsiServices {
        identity,
        controller,
        snapshot_metadata,
        node,
    } = services;
    let controller = controller.map(Arc::new);
    tonic::transport::Server::builder()
        // Outermost, so an operation is counted with the code the client sees.
        .layer(metrics.csi_layer(driver_name))
        .layer(tower::util::MapResponseLayer::new(
            status::rewrite_transport_status::<tonic::body::Body>,
        ))
        .add_service(IdentityServer::new(identity).max_decoding_message_size(MAX_REQUEST_BYTES))
        // The controller serves the GroupController service too (one name lock set).
        .add_optional_service(controller.as_ref().map(|c| {
            ControllerServer::from_arc(Arc::clone(c)).max_decoding_message_size(MAX_REQUEST_BYTES)
        }))
        .add_optional_service(controller.map(|c| {
            GroupControllerServer::from_arc(c).max_decoding_message_size(MAX_REQUEST_BYTES)
        }))
        .add_optional_service(
            snapshot_metadata.map(|s| {
                SnapshotMetadataServer::new(s).max_decoding_message_size(MAX_REQUEST_BYTES)
            }),
        )
        .add_optional_service(
            node.map(|n| NodeServer::new(n).max_decoding_message_size(MAX_REQUEST_BYTES)),
        )
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}

/// Runs a subcommand until SIGTERM or SIGINT.
pub async fn run(command: Command) -> Result<(), BoxError> {
    match command {
        Command::AllInOne(args) => {
            let socket = socket_path(&args.endpoint)?;
            let listen = args.metrics_listen;
            let driver = tokio::task::spawn_blocking(move || AllInOneDriver::open(&args)).await??;
            let _metrics = MetricsServer::start(listen, driver.metrics()).await?;
            let listener = bind(&socket)?;
            tracing::info!(endpoint = %socket.display(), "serving CSI");
            let result = serve(listener, driver, shutdown_signal()).await;
            let _ = std::fs::remove_file(&socket);
            tracing::info!("stopped");
            Ok(result?)
        }
        Command::Node(args) => node::run(args, shutdown_signal()).await,
        Command::Controller(args) => controller::run(args, shutdown_signal()).await,
        Command::Inspect(args) => {
            let report = tokio::task::spawn_blocking(move || crate::inspect::run(&args)).await??;
            print!("{report}");
            Ok(())
        }
        Command::Certs(args) => {
            let out = args.out.clone();
            tokio::task::spawn_blocking(move || crate::agent::tls::write_certs(&out)).await??;
            tracing::info!(
                out = %args.out.display(),
                "wrote ca.crt, controller/ and node/ (ca.crt, tls.crt, tls.key)"
            );
            Ok(())
        }
    }
}

/// The `/metrics` listener of a role, while it lives (dropping it stops it).
pub struct MetricsServer {
    task: tokio::task::JoinHandle<()>,
    address: SocketAddr,
}

impl MetricsServer {
    /// Listens on `listen`, if given, and serves `metrics` there.
    pub async fn start(
        listen: Option<SocketAddr>,
        metrics: Arc<Metrics>,
    ) -> Result<Option<MetricsServer>, BoxError> {
        let Some(listen) = listen else {
            return Ok(None);
        };
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("metrics: cannot listen on {listen}: {e}"))?;
        let address = listener.local_addr()?;
        tracing::info!(%address, "serving /metrics");
        let task = tokio::spawn(crate::metrics::http::serve(
            listener,
            metrics,
            std::future::pending(),
        ));
        Ok(Some(MetricsServer { task, address }))
    }

    /// Where it listens (the port chosen when `listen` named port 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The socket path of a `unix://` endpoint.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, BoxError> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .ok_or_else(|| {
            format!("endpoint {endpoint:?}: only unix:///path endpoints are supported")
        })?;
    if !path.starts_with('/') {
        return Err(format!("endpoint {endpoint:?}: the socket path must be absolute").into());
    }
    Ok(PathBuf::from(path))
}

/// Binds the socket with mode 0600, removing a stale one first.
pub fn bind(socket: &Path) -> Result<UnixListener, BoxError> {
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(socket)?,
        Ok(_) => return Err(format!("{} exists and is not a socket", socket.display()).into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    // Bound under a temporary name and made private before it takes the endpoint's
    // name, so no client can connect while the socket still has the umask's mode.
    let mut temporary = socket.as_os_str().to_owned();
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary)?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&temporary, socket)?;
    Ok(listener)
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight calls"),
        _ = int.recv() => tracing::info!("SIGINT: finishing in-flight calls"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///run/csi.sock").unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert_eq!(
            socket_path("unix:/run/csi.sock").unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
        assert!(socket_path("unix://relative").is_err());
    }

    #[tokio::test]
    async fn socket_is_private_and_stale_ones_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        drop(bind(&path).unwrap());
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(listener);
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        assert!(bind(&dir.path().join("file")).is_err());
    }
}
