//! `kura controller`: Identity and Controller over the agents it finds. It keeps no
//! state: any number of replicas may serve at once, and a restarted one serves as soon
//! as it has found the agents again.

use std::future::Future;
use std::sync::Arc;

use tokio::net::UnixListener;

use super::{BoxError, CsiServices, MetricsServer, bind, serve_csi, socket_path};
use crate::agent::cluster::{self, Cluster};
use crate::agent::tls;
use crate::cli::ControllerArgs;
use crate::csi::controller::ControllerService;
use crate::csi::identity::{IdentityService, Readiness};
use crate::csi::snapshot_metadata::SnapshotMetadataService;
use crate::metrics::Metrics;

/// Starts finding the agents the flags name.
pub fn start_cluster(args: &ControllerArgs) -> Result<Cluster, BoxError> {
    let files = tls::Files::read(&args.tls_dir)?;
    let mut targets: Vec<String> = args.agents.iter().cloned().collect();
    targets.extend(args.agent.iter().map(|a| a.to_string()));
    Ok(Cluster::start(cluster::Config {
        targets,
        tls: files.client(),
    }))
}

/// Serves Identity and Controller over `cluster` on `listener` until `shutdown`,
/// recording every call in `metrics`.
pub async fn serve(
    listener: UnixListener,
    cluster: Cluster,
    driver_name: &str,
    metrics: &Metrics,
    replace_after: std::time::Duration,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    // Replicas of lost nodes are placed again while the controller serves.
    let reconciler = crate::control::Controller::new(cluster.clone());
    let reconciling =
        tokio::spawn(async move { reconciler.reconcile_replicas(replace_after).await });
    let services = CsiServices {
        identity: IdentityService::new(driver_name, Readiness::Agents(cluster.clone()))
            .with_snapshot_metadata(),
        controller: Some(ControllerService::new(cluster.clone())),
        snapshot_metadata: Some(SnapshotMetadataService::new(cluster)),
        node: None,
    };
    let served = serve_csi(listener, services, metrics, driver_name, shutdown).await;
    reconciling.abort();
    served
}

/// `kura controller` until `shutdown`.
pub async fn run(
    args: ControllerArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), BoxError> {
    let socket = socket_path(&args.endpoint)?;
    let cluster = start_cluster(&args)?;
    let metrics = Metrics::new()
        .with_agents(crate::metrics::agents::AgentsCollector::Cluster(
            cluster.clone(),
        ))
        .into_shared();
    let _metrics = MetricsServer::start(args.metrics_listen, Arc::clone(&metrics)).await?;
    let listener = bind(&socket)?;
    tracing::info!(endpoint = %socket.display(), "serving CSI (controller)");
    let result = serve(
        listener,
        cluster,
        &args.driver_name,
        &metrics,
        std::time::Duration::from_secs(args.replace_replicas_after),
        shutdown,
    )
    .await;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("stopped");
    Ok(result?)
}
