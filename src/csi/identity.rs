//! The Identity service.

use tonic::{Request, Response, Status};

use super::proto::identity_server::Identity;
use super::proto::{self, plugin_capability};
use super::status;
use crate::agent::cluster::Cluster;
use crate::node;

/// What a role needs before it can serve.
pub enum Readiness {
    /// A role with a pool (all-in-one, node): the pool is mounted and writable.
    Pool(node::Local),
    /// The controller: ready while it serves. Whether agents are live is logged here
    /// and exported as `kura_agent_up`, not made a liveness failure.
    Agents(Cluster),
}

pub struct IdentityService {
    driver_name: String,
    readiness: Readiness,
    /// The socket serves SnapshotMetadata too (all-in-one, controller).
    snapshot_metadata: bool,
}

impl IdentityService {
    pub fn new(driver_name: &str, readiness: Readiness) -> Self {
        IdentityService {
            driver_name: driver_name.to_owned(),
            readiness,
            snapshot_metadata: false,
        }
    }

    /// Advertises the SnapshotMetadata service, which this socket serves.
    pub fn with_snapshot_metadata(mut self) -> Self {
        self.snapshot_metadata = true;
        self
    }
}

fn service(kind: plugin_capability::service::Type) -> proto::PluginCapability {
    proto::PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service {
                r#type: kind as i32,
            },
        )),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<proto::GetPluginInfoRequest>,
    ) -> Result<Response<proto::GetPluginInfoResponse>, Status> {
        Ok(Response::new(proto::GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<proto::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<proto::GetPluginCapabilitiesResponse>, Status> {
        use plugin_capability::service::Type;
        let expansion = proto::PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(
                plugin_capability::VolumeExpansion {
                    r#type: plugin_capability::volume_expansion::Type::Online as i32,
                },
            )),
        };
        let mut capabilities = vec![
            service(Type::ControllerService),
            service(Type::GroupControllerService),
            service(Type::VolumeAccessibilityConstraints),
            expansion,
        ];
        if self.snapshot_metadata {
            capabilities.push(service(Type::SnapshotMetadataService));
        }
        Ok(Response::new(proto::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    /// With a pool: ready while it is mounted and writable, FAILED_PRECONDITION
    /// otherwise. The controller: ready whenever it answers. The livenessprobe
    /// sidecar restarts a container whose Probe is not ready, and a controller with no
    /// agent to reach (none started yet, a network partition) is alive: restarting it
    /// would find the agents no sooner. It serves what it can meanwhile (placement
    /// answers RESOURCE_EXHAUSTED, calls on a node's objects UNAVAILABLE).
    async fn probe(
        &self,
        _request: Request<proto::ProbeRequest>,
    ) -> Result<Response<proto::ProbeResponse>, Status> {
        let ready = match &self.readiness {
            Readiness::Pool(local) => {
                local.probe().await.map_err(|e| {
                    status::not_ready(format!("pool is not usable: {}", status::chain(&e)))
                })?;
                true
            }
            Readiness::Agents(cluster) => {
                if let Err(reason) = cluster.ready() {
                    tracing::warn!(reason, "Probe: serving, but no agent is live");
                }
                true
            }
        };
        Ok(Response::new(proto::ProbeResponse { ready: Some(ready) }))
    }
}
