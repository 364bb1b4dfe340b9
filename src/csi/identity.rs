//! The Identity service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::identity_server::Identity;
use super::proto::{self, plugin_capability};
use super::{blocking, status};
use crate::pool::Pool;

pub struct IdentityService {
    driver_name: String,
    pool: Arc<Pool>,
}

impl IdentityService {
    pub fn new(driver_name: &str, pool: Arc<Pool>) -> Self {
        IdentityService {
            driver_name: driver_name.to_owned(),
            pool,
        }
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
        Ok(Response::new(proto::GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(Type::ControllerService),
                service(Type::VolumeAccessibilityConstraints),
                expansion,
            ],
        }))
    }

    /// Ready only while the pool is mounted and writable.
    async fn probe(
        &self,
        _request: Request<proto::ProbeRequest>,
    ) -> Result<Response<proto::ProbeResponse>, Status> {
        let pool = Arc::clone(&self.pool);
        blocking(move || pool.probe())
            .await
            .map_err(|e| status::not_ready(status::chain(&e)))?;
        Ok(Response::new(proto::ProbeResponse { ready: Some(true) }))
    }
}
