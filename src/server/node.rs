//! `kura node`: Identity and Node on the CSI socket, as all-in-one serves them, plus
//! the agent on TCP (mutual TLS) through which controllers reach this node's pool.
//!
//! # Guarantees
//!
//! - One `kura node` per pool: the state directory and the pool root are locked
//!   (`flock`) before anything is touched; a second process exits with an error
//!   naming the holder.
//! - The Node service and the agent share one set of per-volume locks, so a
//!   controller's call (through the agent) and the kubelet's call on the same volume
//!   exclude each other as they do in all-in-one.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use super::{BoxError, CsiServices, MetricsServer, OpenedPool, bind, serve_csi, socket_path};
use crate::agent::proto::agent_server::AgentServer;
use crate::agent::replication::ClusterPeers;
use crate::agent::server::AgentService;
use crate::agent::{cluster, tls};
use crate::cli::NodeArgs;
use crate::csi::identity::{IdentityService, Readiness};
use crate::csi::node::NodeService;
use crate::metrics::Metrics;
use crate::node::{self, replication::Replicator, transfer::Transfers};
use crate::sys::fs::LockFile;

/// How often expired exports are removed.
const EXPORT_SWEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// The services of a node, ready to serve.
pub struct NodeDriver {
    identity: IdentityService,
    node: NodeService,
    agent: AgentService,
    tls: tls::Files,
    stopping: watch::Sender<bool>,
    driver_name: String,
    metrics: Arc<Metrics>,
    /// Whose expired exports are swept while serving.
    sweep: node::Local,
    /// Ships this node's replicated volumes while serving.
    replicator: Replicator<ClusterPeers>,
    _locks: Vec<LockFile>,
}

/// Takes the exclusive lock `path`, or says who holds it.
fn lock(path: &Path) -> Result<LockFile, BoxError> {
    match crate::sys::fs::try_lock_exclusive(path)? {
        Ok(lock) => Ok(lock),
        Err(holder) => Err(format!(
            "another kura process (pid {holder}) holds {}: one kura node serves a pool at a time",
            path.display()
        )
        .into()),
    }
}

impl NodeDriver {
    /// Locks the pool, prepares it, and builds the services. Blocks.
    pub fn open(args: &NodeArgs) -> Result<Self, BoxError> {
        let tls = tls::Files::read(&args.tls_dir)?;
        let local_args = &args.local;
        std::fs::create_dir_all(&local_args.state_dir)?;
        let mut locks = vec![lock(&local_args.state_dir.join("node.lock"))?];
        let opened = OpenedPool::open(local_args, crate::sys::pause::Points::from_env())?;
        let pool_lock = opened.root.join(".kura-node.lock");
        if !pool_lock.starts_with(&local_args.state_dir) {
            // A --pool-dir may be shared between state directories: lock it too.
            locks.push(lock(&pool_lock)?);
        }
        let (stopping, stopped) = watch::channel(false);
        let transfers = Transfers::new(opened.local.clone());
        let mut peers: Vec<String> = args.peers.iter().cloned().collect();
        peers.extend(args.peer.iter().map(|a| a.to_string()));
        let replicator = Replicator::new(
            opened.local.clone(),
            ClusterPeers(cluster::Cluster::start(cluster::Config {
                targets: peers,
                tls: tls.client(),
            })),
            opened.local.replica_states().clone(),
        );
        Ok(NodeDriver {
            identity: IdentityService::new(
                &local_args.driver_name,
                Readiness::Pool(opened.local.clone()),
            ),
            node: opened.node_service(local_args),
            // Node-to-node reads present this node's own identity.
            agent: AgentService::new(
                opened.local.clone(),
                transfers.clone(),
                replicator.clone(),
                tls.client(),
                stopped,
            ),
            replicator,
            tls,
            stopping,
            driver_name: local_args.driver_name.clone(),
            metrics: opened
                .metrics(local_args)
                .with_agent()
                .with_transfers(transfers.gauges())
                .with_replication(crate::metrics::replication::ReplicationCollector::new(
                    opened.local.clone(),
                ))
                .into_shared(),
            sweep: opened.local.clone(),
            _locks: locks,
        })
    }

    /// What this node counts; [`serve`] records its CSI and agent calls there.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }
}

/// Serves the CSI socket and the agent until `shutdown` completes, then lets in-flight
/// calls finish (status streams end at once).
pub async fn serve(
    csi: UnixListener,
    agent: TcpListener,
    driver: NodeDriver,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BoxError> {
    let NodeDriver {
        identity,
        node,
        agent: agent_service,
        tls,
        stopping,
        driver_name,
        metrics,
        sweep,
        replicator,
        _locks,
    } = driver;
    tokio::spawn(sweep.sweep_exports(EXPORT_SWEEP));
    tokio::spawn(replicator.run());
    let mut stopped = stopping.subscribe();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stopping.send(true);
    });
    let mut agent_stopped = stopped.clone();
    let services = CsiServices::<cluster::Cluster> {
        identity,
        controller: None,
        snapshot_metadata: None,
        node: Some(node),
    };
    let csi_server = serve_csi(csi, services, &metrics, &driver_name, async move {
        let _ = stopped.wait_for(|s| *s).await;
    });
    let agent_server = tonic::transport::Server::builder()
        .tls_config(tls.server())?
        .http2_keepalive_interval(Some(cluster::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(cluster::KEEPALIVE_TIMEOUT))
        // Transfer streams carry chunks of MiBs: the default 64 KiB windows would
        // throttle them.
        .initial_stream_window_size(crate::agent::transfer::WINDOW)
        .initial_connection_window_size(crate::agent::transfer::WINDOW)
        .layer(metrics.agent_layer())
        .add_service(AgentServer::new(agent_service))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(agent).with_nodelay(Some(true)),
            async move {
                let _ = agent_stopped.wait_for(|s| *s).await;
            },
        );
    let (csi_result, agent_result) = tokio::join!(csi_server, agent_server);
    csi_result?;
    agent_result?;
    Ok(())
}

/// `kura node` until `shutdown`.
pub async fn run(
    args: NodeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BoxError> {
    let socket = socket_path(&args.local.endpoint)?;
    let listen = args.agent_listen;
    let metrics_listen = args.local.metrics_listen;
    let driver = tokio::task::spawn_blocking(move || NodeDriver::open(&args)).await??;
    let _metrics = MetricsServer::start(metrics_listen, driver.metrics()).await?;
    let agent = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("agent: cannot listen on {listen}: {e}"))?;
    let csi = bind(&socket)?;
    tracing::info!(endpoint = %socket.display(), agent = %listen, "serving CSI and the agent");
    let result = serve(csi, agent, driver, shutdown).await;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("stopped");
    result
}
