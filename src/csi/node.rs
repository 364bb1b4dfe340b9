//! The Node service: exposing this node's volumes to pods.

use std::collections::HashMap;
use std::path::PathBuf;

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::proto::node_server::Node;
use super::proto::{self, node_service_capability};
use super::status::{from_pool, invalid, no_volume, not_at_path};
use super::{node_topology, validate};
use crate::node;
use crate::pool::attach::{AccessType, Attacher, Capability};
use crate::pool::encryption::take_secret;
use crate::pool::ephemeral::InlineSpec;
use crate::pool::{self, VolumeId};

pub struct NodeService {
    local: node::Local,
    max_volumes: i64,
}

impl NodeService {
    pub fn new(local: node::Local, max_volumes: i64) -> Self {
        NodeService { local, max_volumes }
    }

    /// A path the node will create or mount on: well formed, outside kura's own
    /// directories.
    fn path(&self, value: &str, field: &str) -> Result<PathBuf, Status> {
        validate::node_path(value, field, self.local.attacher().reserved())
    }

    /// Runs `work` on the attachments with the volume's lock held (see
    /// [`node::Local::on_attacher`]: a call the kubelet cancels does not free the
    /// volume while its mount or mkfs still runs).
    async fn locked<T: Send + 'static>(
        &self,
        id: VolumeId,
        work: impl FnOnce(&Attacher, &VolumeId) -> pool::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        self.local
            .on_attacher(&[id.to_string()], move |a| work(a, &id))
            .await
            .map_err(from_pool)
    }
}

impl NodeService {
    /// NodePublishVolume of an inline volume: the kubelet's volume ID is a name
    /// (checked as one), the attributes say what to make; a refused request makes
    /// nothing.
    async fn publish_inline(
        &self,
        req: proto::NodePublishVolumeRequest,
        target: PathBuf,
        mut capability: Capability,
    ) -> Result<Response<proto::NodePublishVolumeResponse>, Status> {
        let name = validate::name(&req.volume_id, "volume_id")?.to_owned();
        if VolumeId::parse(&name).is_some() {
            return Err(invalid(
                "volume_id",
                "names a kura volume, which cannot be published as an inline volume",
            ));
        }
        let inline = validate::inline_attributes(&req.volume_context, &capability)?;
        if let (AccessType::Mount { fs_type, .. }, Some(fs)) =
            (&mut capability.access, &inline.fs_type)
        {
            *fs_type = Some(*fs);
        }
        let spec = InlineSpec {
            name,
            size: inline.size,
            provisioning: inline.provisioning,
        };
        let id = self.local.attacher().inline_id(&spec.name);
        let readonly = req.readonly;
        self.locked(id, move |a, _| {
            a.publish_inline(&spec, &target, &capability, readonly)
                .map(|_| ())
        })
        .await?;
        Ok(Response::new(proto::NodePublishVolumeResponse {}))
    }

    /// The volume an ID names: a kura volume ID, or the kubelet's name of an inline
    /// volume kura made; anything else names nothing.
    async fn volume_or_inline(&self, value: &str) -> Result<VolumeId, Status> {
        if let Some(id) = validate::volume_id(value, "volume_id")? {
            return Ok(id);
        }
        let name = value.to_owned();
        self.local
            .on_attacher(&[], move |a| a.inline_volume(&name))
            .await
            .map_err(from_pool)?
            .ok_or_else(|| no_volume("volume_id", value))
    }

    /// NodeUnpublishVolume with an ID that is not kura's: the inline volume of that
    /// name is taken down and deleted; with no such volume the ID names nothing
    /// (NOT_FOUND, as for any unknown ID). The record goes last, so a retry after a
    /// crash mid-way still finds it and finishes.
    async fn unpublish_inline(
        &self,
        name: &str,
        target: PathBuf,
    ) -> Result<Response<proto::NodeUnpublishVolumeResponse>, Status> {
        // An ID that cannot be a name names nothing.
        let owned = validate::name(name, "volume_id")
            .map_err(|_| no_volume("volume_id", name))?
            .to_owned();
        let id = self.local.attacher().inline_id(&owned);
        let found = self
            .locked(id, move |a, _| a.unpublish_inline(&owned, &target))
            .await?;
        if !found {
            return Err(no_volume("volume_id", name));
        }
        Ok(Response::new(proto::NodeUnpublishVolumeResponse {}))
    }
}

/// A volume ID that must name an existing volume.
fn existing_volume_id(value: &str) -> Result<VolumeId, Status> {
    validate::volume_id(value, "volume_id")?.ok_or_else(|| no_volume("volume_id", value))
}

/// The maps every node request may carry: within CSI's size, never echoed.
fn maps(maps: &[(&HashMap<String, String>, &str)]) -> Result<(), Status> {
    maps.iter()
        .try_for_each(|(map, field)| validate::map_size(map, field))
}

fn node_capability(cap: Option<&proto::VolumeCapability>) -> Result<Capability, Status> {
    validate::capability(cap, "volume_capability")
        .map_err(|e| e.into_node_status("volume_capability"))
}

fn capability(kind: node_service_capability::rpc::Type) -> proto::NodeServiceCapability {
    proto::NodeServiceCapability {
        r#type: Some(node_service_capability::Type::Rpc(
            node_service_capability::Rpc {
                r#type: kind as i32,
            },
        )),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    #[instrument(skip_all, fields(volume.id = ?request.get_ref().volume_id))]
    async fn node_stage_volume(
        &self,
        request: Request<proto::NodeStageVolumeRequest>,
    ) -> Result<Response<proto::NodeStageVolumeResponse>, Status> {
        let mut req = request.into_inner();
        // The key leaves the request at once, and the rest of the Secret is wiped, so
        // no copy of it outlives this call (nor reaches an error or a log).
        let secrets_fit = validate::map_size(&req.secrets, "secrets");
        let secret = take_secret(&mut req.secrets);
        validate::required(&req.volume_id, "volume_id")?;
        let staging = self.path(&req.staging_target_path, "staging_target_path")?;
        let capability = node_capability(req.volume_capability.as_ref())?;
        secrets_fit?;
        maps(&[
            (&req.publish_context, "publish_context"),
            (&req.volume_context, "volume_context"),
        ])?;
        let id = existing_volume_id(&req.volume_id)?;
        self.locked(id, move |a, id| a.stage(id, &staging, &capability, secret))
            .await?;
        Ok(Response::new(proto::NodeStageVolumeResponse {}))
    }

    #[instrument(skip_all, fields(volume.id = ?request.get_ref().volume_id))]
    async fn node_unstage_volume(
        &self,
        request: Request<proto::NodeUnstageVolumeRequest>,
    ) -> Result<Response<proto::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        validate::required(&req.volume_id, "volume_id")?;
        let staging = self.path(&req.staging_target_path, "staging_target_path")?;
        let id = existing_volume_id(&req.volume_id)?;
        self.locked(id, move |a, id| a.unstage(id, &staging))
            .await?;
        Ok(Response::new(proto::NodeUnstageVolumeResponse {}))
    }

    #[instrument(skip_all, fields(volume.id = ?request.get_ref().volume_id))]
    async fn node_publish_volume(
        &self,
        request: Request<proto::NodePublishVolumeRequest>,
    ) -> Result<Response<proto::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        validate::required(&req.volume_id, "volume_id")?;
        let target = self.path(&req.target_path, "target_path")?;
        let capability = node_capability(req.volume_capability.as_ref())?;
        maps(&[
            (&req.secrets, "secrets"),
            (&req.publish_context, "publish_context"),
            (&req.volume_context, "volume_context"),
        ])?;
        if validate::is_ephemeral(&req.volume_context) {
            return self.publish_inline(req, target, capability).await;
        }
        let staging = validate::publish_staging_path(
            &req.staging_target_path,
            self.local.attacher().reserved(),
        )?;
        validate::publish_paths(&target, &staging)?;
        let id = existing_volume_id(&req.volume_id)?;
        let readonly = req.readonly;
        self.locked(id, move |a, id| {
            a.publish(id, &staging, &target, &capability, readonly)
        })
        .await?;
        Ok(Response::new(proto::NodePublishVolumeResponse {}))
    }

    #[instrument(skip_all, fields(volume.id = ?request.get_ref().volume_id))]
    async fn node_unpublish_volume(
        &self,
        request: Request<proto::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<proto::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        validate::required(&req.volume_id, "volume_id")?;
        let target = self.path(&req.target_path, "target_path")?;
        let id = match validate::volume_id(&req.volume_id, "volume_id")? {
            Some(id) => id,
            // Not a kura ID: perhaps the kubelet's name for an inline volume.
            None => return self.unpublish_inline(&req.volume_id, target).await,
        };
        self.locked(id, move |a, id| a.unpublish(id, &target))
            .await?;
        Ok(Response::new(proto::NodeUnpublishVolumeResponse {}))
    }

    #[instrument(skip_all, fields(volume.id = ?request.get_ref().volume_id))]
    async fn node_get_volume_stats(
        &self,
        request: Request<proto::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<proto::NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        validate::required(&req.volume_id, "volume_id")?;
        let volume_path = validate::volume_path(&req.volume_path, "volume_path")?;
        validate::optional_node_path(&req.staging_target_path, "staging_target_path", &[])?;
        let id = self.volume_or_inline(&req.volume_id).await?;
        let volume_path =
            volume_path.ok_or_else(|| not_at_path("volume_path", &req.volume_path, id.as_str()))?;
        let stats = self
            .local
            .on_attacher(&[], move |a| a.stats(&id, &volume_path))
            .await
            .map_err(from_pool)?;
        use proto::volume_usage::Unit;
        let mut usage = Vec::new();
        match stats.files {
            None => usage.push(proto::VolumeUsage {
                total: stats.total_bytes as i64,
                unit: Unit::Bytes as i32,
                ..Default::default()
            }),
            Some(fs) => {
                usage.push(proto::VolumeUsage {
                    available: fs.available_bytes as i64,
                    total: fs.total_bytes as i64,
                    used: fs.used_bytes() as i64,
                    unit: Unit::Bytes as i32,
                });
                usage.push(proto::VolumeUsage {
                    available: fs.free_inodes as i64,
                    total: fs.total_inodes as i64,
                    used: fs.total_inodes.saturating_sub(fs.free_inodes) as i64,
                    unit: Unit::Inodes as i32,
                });
            }
        }
        Ok(Response::new(proto::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(proto::VolumeCondition {
                abnormal: stats.condition.abnormal,
                message: stats.condition.message,
            }),
        }))
    }

    #[instrument(skip_all, fields(volume.id = ?request.get_ref().volume_id))]
    async fn node_expand_volume(
        &self,
        request: Request<proto::NodeExpandVolumeRequest>,
    ) -> Result<Response<proto::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        validate::required(&req.volume_id, "volume_id")?;
        let volume_path = validate::volume_path(&req.volume_path, "volume_path")?;
        validate::optional_node_path(&req.staging_target_path, "staging_target_path", &[])?;
        let range = validate::range(req.capacity_range.as_ref())?;
        validate::optional_capability(req.volume_capability.as_ref(), "volume_capability")?;
        maps(&[(&req.secrets, "secrets")])?;
        let id = existing_volume_id(&req.volume_id)?;
        let volume_path =
            volume_path.ok_or_else(|| not_at_path("volume_path", &req.volume_path, id.as_str()))?;
        let size = self
            .locked(id, move |a, id| a.expand(id, &volume_path, range))
            .await?;
        Ok(Response::new(proto::NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<proto::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<proto::NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::rpc::Type;
        let capabilities = [
            Type::StageUnstageVolume,
            Type::GetVolumeStats,
            Type::VolumeCondition,
            Type::SingleNodeMultiWriter,
            Type::ExpandVolume,
        ]
        .into_iter()
        .map(capability)
        .collect();
        Ok(Response::new(proto::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<proto::NodeGetInfoRequest>,
    ) -> Result<Response<proto::NodeGetInfoResponse>, Status> {
        Ok(Response::new(proto::NodeGetInfoResponse {
            node_id: self.local.node_id().to_owned(),
            max_volumes_per_node: self.max_volumes,
            accessible_topology: Some(node_topology(self.local.node_id())),
        }))
    }
}
