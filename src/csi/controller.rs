//! The Controller service: checks each request into typed arguments, asks
//! [`crate::control`] (which reaches the nodes' pools through [`Pools`]), and builds
//! the response; every error becomes a status in [`super::status`].

use std::collections::{BTreeSet, HashMap};

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::proto::controller_server::Controller;
use super::proto::{self, controller_service_capability, volume_content_source};
use super::status::{from_control, invalid, missing, no_volume, not_found, shown, unimplemented};
use super::validate::{self, CapabilityError};
use super::{TOPOLOGY_KEY, node_topology};
use crate::agent::Pools;
use crate::control::placement::Topology;
use crate::control::replication::ReplicationChange;
use crate::control::{self, NewVolume, SnapshotFilter};
use crate::pool::attach::Capability;
use crate::pool::{
    self, AccessKind, Condition, ContentSource, Snapshot, SnapshotId, Volume, VolumeId, VolumeSpec,
};

/// The Controller (and GroupController) service over the nodes' pools.
pub struct ControllerService<P> {
    pub(super) control: control::Controller<P>,
}

impl<P: Pools> ControllerService<P> {
    pub fn new(pools: P) -> Self {
        ControllerService {
            control: control::Controller::new(pools),
        }
    }

    fn volume_message(&self, volume: &Volume) -> proto::Volume {
        proto::Volume {
            capacity_bytes: volume.size_bytes as i64,
            volume_id: volume.id.to_string(),
            volume_context: HashMap::new(),
            content_source: volume.source.as_ref().map(content_source_message),
            accessible_topology: vec![node_topology(&self.control.node_id(&volume.id.node()))],
        }
    }
}

/// The topology a create request allows, by node ID. A requisite list that names no
/// kura node allows none; an empty one allows all.
fn topology(requirements: Option<&proto::TopologyRequirement>) -> Topology {
    let node_of = |t: &proto::Topology| t.segments.get(TOPOLOGY_KEY).cloned();
    let Some(r) = requirements else {
        return Topology::default();
    };
    Topology {
        requisite: (!r.requisite.is_empty())
            .then(|| r.requisite.iter().filter_map(node_of).collect()),
        preferred: r.preferred.iter().filter_map(node_of).collect(),
    }
}

fn content_source_message(source: &ContentSource) -> proto::VolumeContentSource {
    let r#type = match source {
        ContentSource::Snapshot(id) => {
            volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                snapshot_id: id.to_string(),
            })
        }
        ContentSource::Volume(id) => {
            volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                volume_id: id.to_string(),
            })
        }
    };
    proto::VolumeContentSource {
        r#type: Some(r#type),
    }
}

/// The content source of a create request; IDs that cannot be ours name nothing.
fn content_source(
    source: Option<&proto::VolumeContentSource>,
) -> Result<Option<ContentSource>, Status> {
    let Some(source) = source else {
        return Ok(None);
    };
    let not_found = |kind: &str, id: &str| {
        not_found(format_args!("volume_content_source: {kind} {}", shown(id)))
    };
    match &source.r#type {
        None => Err(missing("volume_content_source.type")),
        Some(volume_content_source::Type::Snapshot(s)) => {
            validate::snapshot_id(&s.snapshot_id, "volume_content_source.snapshot.snapshot_id")?
                .map(|id| Some(ContentSource::Snapshot(id)))
                .ok_or_else(|| not_found("snapshot", &s.snapshot_id))
        }
        Some(volume_content_source::Type::Volume(v)) => {
            validate::volume_id(&v.volume_id, "volume_content_source.volume.volume_id")?
                .map(|id| Some(ContentSource::Volume(id)))
                .ok_or_else(|| not_found("volume", &v.volume_id))
        }
    }
}

fn condition_message(condition: Condition) -> proto::VolumeCondition {
    proto::VolumeCondition {
        abnormal: condition.abnormal,
        message: condition.message,
    }
}

pub(super) fn snapshot_message(snapshot: &Snapshot) -> proto::Snapshot {
    proto::Snapshot {
        size_bytes: snapshot.size_bytes as i64,
        snapshot_id: snapshot.id.to_string(),
        source_volume_id: snapshot.source_volume.to_string(),
        creation_time: Some(prost_types::Timestamp {
            seconds: snapshot.created.seconds,
            nanos: snapshot.created.nanos,
        }),
        ready_to_use: snapshot.ready,
        group_snapshot_id: snapshot
            .group
            .as_ref()
            .map(|g| g.to_string())
            .unwrap_or_default(),
    }
}

/// The access types a list of capabilities asks for.
fn access_kinds(caps: &[Capability]) -> BTreeSet<AccessKind> {
    caps.iter().map(|c| c.access.kind()).collect()
}

fn capability(
    kind: controller_service_capability::rpc::Type,
) -> proto::ControllerServiceCapability {
    proto::ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(
            controller_service_capability::Rpc {
                r#type: kind as i32,
            },
        )),
    }
}

#[tonic::async_trait]
impl<P: Pools> Controller for ControllerService<P> {
    #[instrument(skip_all, fields(volume.name = ?request.get_ref().name))]
    async fn create_volume(
        &self,
        request: Request<proto::CreateVolumeRequest>,
    ) -> Result<Response<proto::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = validate::name(&req.name, "name")?;
        let capabilities = validate::capabilities(&req.volume_capabilities, "volume_capabilities")
            .map_err(|e| e.into_invalid("volume_capabilities"))?;
        let range = validate::range(req.capacity_range.as_ref())?;
        validate::map_size(&req.parameters, "parameters")?;
        let provisioning = validate::volume_parameters(&req.parameters)?;
        let encryption = validate::encryption(&req.parameters, &capabilities)?;
        validate::map_size(&req.mutable_parameters, "mutable_parameters")?;
        // Mutable parameters (a VolumeAttributesClass) beat the StorageClass's.
        let mutable = validate::mutable_parameters(&req.mutable_parameters)?;
        let provisioning = mutable.provisioning.unwrap_or(provisioning);
        let stored = validate::replication_parameters(&req.parameters, "parameters")?;
        let replication = ReplicationChange {
            copies: mutable.replication.copies.or(stored.copies),
            interval_secs: mutable.replication.interval_secs.or(stored.interval_secs),
        };
        validate::map_size(&req.secrets, "secrets")?;
        let source = content_source(req.volume_content_source.as_ref())?;
        let new = NewVolume {
            spec: VolumeSpec {
                name: name.to_owned(),
                range,
                provisioning,
                source,
                access: access_kinds(&capabilities),
                encryption,
            },
            topology: topology(req.accessibility_requirements.as_ref()),
            replication: replication.for_new_volume(),
        };
        let volume = self
            .control
            .create_volume(new)
            .await
            .map_err(from_control)?;
        Ok(Response::new(proto::CreateVolumeResponse {
            volume: Some(self.volume_message(&volume)),
        }))
    }

    #[instrument(skip_all, fields(volume.id = ?request.get_ref().volume_id))]
    async fn delete_volume(
        &self,
        request: Request<proto::DeleteVolumeRequest>,
    ) -> Result<Response<proto::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = validate::volume_id(&req.volume_id, "volume_id")?;
        validate::map_size(&req.secrets, "secrets")?;
        // An ID that cannot be ours names a volume that is already gone.
        if let Some(id) = id {
            self.control.delete_volume(id).await.map_err(from_control)?;
        }
        Ok(Response::new(proto::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _request: Request<proto::ControllerPublishVolumeRequest>,
    ) -> Result<Response<proto::ControllerPublishVolumeResponse>, Status> {
        Err(unimplemented(
            "ControllerPublishVolume",
            "kura volumes are local; there is nothing to attach",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _request: Request<proto::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<proto::ControllerUnpublishVolumeResponse>, Status> {
        Err(unimplemented(
            "ControllerUnpublishVolume",
            "kura volumes are local; there is nothing to detach",
        ))
    }

    #[instrument(skip_all, fields(volume.id = ?request.get_ref().volume_id))]
    async fn validate_volume_capabilities(
        &self,
        request: Request<proto::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<proto::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let id = validate::volume_id(&req.volume_id, "volume_id")?;
        for (map, field) in [
            (&req.volume_context, "volume_context"),
            (&req.parameters, "parameters"),
            (&req.mutable_parameters, "mutable_parameters"),
            (&req.secrets, "secrets"),
        ] {
            validate::map_size(map, field)?;
        }
        let checked = validate::capabilities(&req.volume_capabilities, "volume_capabilities");
        if let Err(CapabilityError::Invalid(status)) = checked {
            return Err(status);
        }
        let id = id.ok_or_else(|| no_volume("volume_id", &req.volume_id))?;
        let (volume, _) = self.control.volume(id).await.map_err(from_control)?;
        let verdict = checked
            .map_err(|e| e.into_invalid("volume_capabilities").message().to_owned())
            .and_then(|caps| {
                let encrypted = format!("volume {} is encrypted", volume.id);
                validate::encryption_fits(volume.encryption, &caps, &encrypted)
                    .map_err(|s| s.message().to_owned())?;
                let asked = access_kinds(&caps);
                if volume.serves(&asked) {
                    Ok(())
                } else {
                    Err(format!(
                        "volume_capabilities: volume {} was created for other access types than {}",
                        volume.id,
                        asked
                            .iter()
                            .map(|k| k.to_string())
                            .collect::<Vec<_>>()
                            .join(" and ")
                    ))
                }
            })
            .and_then(|()| {
                validate::volume_parameters(&req.parameters).map_err(|s| s.message().to_owned())
            })
            .and_then(|_| {
                validate::mutable_parameters(&req.mutable_parameters)
                    .map_err(|s| s.message().to_owned())
            });
        let response = match verdict {
            Ok(_) => proto::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(proto::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: req.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(message) => proto::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            },
        };
        Ok(Response::new(response))
    }

    #[instrument(skip_all)]
    async fn list_volumes(
        &self,
        request: Request<proto::ListVolumesRequest>,
    ) -> Result<Response<proto::ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let max = validate::max_entries(req.max_entries)?;
        let start = validate::starting_token(&req.starting_token, VolumeId::parse)?;
        let page = self
            .control
            .list_volumes(start.as_ref(), max)
            .await
            .map_err(from_control)?;
        let entries = page
            .items
            .into_iter()
            .map(|(volume, condition)| proto::list_volumes_response::Entry {
                volume: Some(self.volume_message(&volume)),
                status: Some(proto::list_volumes_response::VolumeStatus {
                    published_node_ids: vec![],
                    volume_condition: Some(condition_message(condition)),
                }),
            })
            .collect();
        Ok(Response::new(proto::ListVolumesResponse {
            entries,
            next_token: page.next.map(|(v, _)| v.id.to_string()).unwrap_or_default(),
        }))
    }

    #[instrument(skip_all)]
    async fn get_capacity(
        &self,
        request: Request<proto::GetCapacityRequest>,
    ) -> Result<Response<proto::GetCapacityResponse>, Status> {
        let req = request.into_inner();
        validate::map_size(&req.parameters, "parameters")?;
        let provisioning = validate::volume_parameters(&req.parameters)?;
        let mut unusable = false;
        for (i, cap) in req.volume_capabilities.iter().enumerate() {
            match validate::capability(Some(cap), &format!("volume_capabilities[{i}]")) {
                Ok(_) => {}
                Err(CapabilityError::Invalid(status)) => return Err(status),
                Err(CapabilityError::Unsupported(_)) => unusable = true,
            }
        }
        // A topology that names no kura node has no capacity.
        let node = req
            .accessible_topology
            .as_ref()
            .map(|t| t.segments.get(TOPOLOGY_KEY).map_or("", String::as_str));
        let (available, largest) = if unusable {
            (0, 0)
        } else {
            self.control
                .capacity(node, provisioning)
                .await
                .map_err(from_control)?
        };
        let largest = largest / pool::size::MIB * pool::size::MIB;
        Ok(Response::new(proto::GetCapacityResponse {
            available_capacity: available.min(i64::MAX as u64) as i64,
            maximum_volume_size: Some(largest.min(i64::MAX as u64) as i64),
            minimum_volume_size: Some(pool::size::MIB as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<proto::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<proto::ControllerGetCapabilitiesResponse>, Status> {
        use controller_service_capability::rpc::Type;
        let capabilities = [
            Type::CreateDeleteVolume,
            Type::ListVolumes,
            Type::GetCapacity,
            Type::GetVolume,
            Type::VolumeCondition,
            Type::SingleNodeMultiWriter,
            Type::CreateDeleteSnapshot,
            Type::ListSnapshots,
            // Alpha in CSI 1.12; csi-sanity runs its GetSnapshot specs from v5.5.0 on
            // when it is listed (v5.4.0 fails any capability it does not know:
            // csi-sanity/run.sh skips that one spec there).
            Type::GetSnapshot,
            Type::CloneVolume,
            Type::ExpandVolume,
            Type::ModifyVolume,
        ]
        .into_iter()
        .map(capability)
        .collect();
        Ok(Response::new(proto::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    #[instrument(skip_all, fields(snapshot.name = ?request.get_ref().name, volume.id = ?request.get_ref().source_volume_id))]
    async fn create_snapshot(
        &self,
        request: Request<proto::CreateSnapshotRequest>,
    ) -> Result<Response<proto::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let source = validate::volume_id(&req.source_volume_id, "source_volume_id")?;
        let name = validate::name(&req.name, "name")?;
        validate::map_size(&req.parameters, "parameters")?;
        validate::snapshot_parameters(&req.parameters)?;
        validate::map_size(&req.secrets, "secrets")?;
        let source = source.ok_or_else(|| no_volume("source_volume_id", &req.source_volume_id))?;
        let snapshot = self
            .control
            .create_snapshot(name, source)
            .await
            .map_err(from_control)?;
        Ok(Response::new(proto::CreateSnapshotResponse {
            snapshot: Some(snapshot_message(&snapshot)),
        }))
    }

    #[instrument(skip_all, fields(snapshot.id = ?request.get_ref().snapshot_id))]
    async fn delete_snapshot(
        &self,
        request: Request<proto::DeleteSnapshotRequest>,
    ) -> Result<Response<proto::DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        let id = validate::snapshot_id(&req.snapshot_id, "snapshot_id")?;
        validate::map_size(&req.secrets, "secrets")?;
        if let Some(id) = id {
            self.control
                .delete_snapshot(id)
                .await
                .map_err(from_control)?;
        }
        Ok(Response::new(proto::DeleteSnapshotResponse {}))
    }

    #[instrument(skip_all)]
    async fn list_snapshots(
        &self,
        request: Request<proto::ListSnapshotsRequest>,
    ) -> Result<Response<proto::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let max = validate::max_entries(req.max_entries)?;
        validate::map_size(&req.secrets, "secrets")?;
        let start = validate::starting_token(&req.starting_token, SnapshotId::parse)?;
        let filter = SnapshotFilter {
            id: (!req.snapshot_id.is_empty()).then(|| SnapshotId::parse(&req.snapshot_id)),
            source_volume: (!req.source_volume_id.is_empty()).then(|| req.source_volume_id.clone()),
        };
        let page = self
            .control
            .list_snapshots(filter, start.as_ref(), max)
            .await
            .map_err(from_control)?;
        Ok(Response::new(proto::ListSnapshotsResponse {
            entries: page
                .items
                .iter()
                .map(|s| proto::list_snapshots_response::Entry {
                    snapshot: Some(snapshot_message(s)),
                })
                .collect(),
            next_token: page.next.map(|s| s.id.to_string()).unwrap_or_default(),
        }))
    }

    #[instrument(skip_all, fields(volume.id = ?request.get_ref().volume_id))]
    async fn controller_expand_volume(
        &self,
        request: Request<proto::ControllerExpandVolumeRequest>,
    ) -> Result<Response<proto::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = validate::volume_id(&req.volume_id, "volume_id")?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| missing("capacity_range"))?;
        let range = validate::range(Some(range))?;
        if range.required == 0 && range.limit == 0 {
            return Err(invalid("capacity_range", "asks for no size"));
        }
        validate::optional_capability(req.volume_capability.as_ref(), "volume_capability")?;
        validate::map_size(&req.secrets, "secrets")?;
        let id = id.ok_or_else(|| no_volume("volume_id", &req.volume_id))?;
        let volume = self
            .control
            .expand_volume(id, range)
            .await
            .map_err(from_control)?;
        Ok(Response::new(proto::ControllerExpandVolumeResponse {
            capacity_bytes: volume.size_bytes as i64,
            // The loop device must re-read the size on the node, even for block access.
            node_expansion_required: true,
        }))
    }

    #[instrument(skip_all, fields(volume.id = ?request.get_ref().volume_id))]
    async fn controller_get_volume(
        &self,
        request: Request<proto::ControllerGetVolumeRequest>,
    ) -> Result<Response<proto::ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = validate::volume_id(&req.volume_id, "volume_id")?
            .ok_or_else(|| no_volume("volume_id", &req.volume_id))?;
        let (volume, condition) = self.control.volume(id).await.map_err(from_control)?;
        Ok(Response::new(proto::ControllerGetVolumeResponse {
            volume: Some(self.volume_message(&volume)),
            status: Some(proto::controller_get_volume_response::VolumeStatus {
                published_node_ids: vec![],
                volume_condition: Some(condition_message(condition)),
            }),
        }))
    }

    #[instrument(skip_all, fields(volume.id = ?request.get_ref().volume_id))]
    async fn controller_modify_volume(
        &self,
        request: Request<proto::ControllerModifyVolumeRequest>,
    ) -> Result<Response<proto::ControllerModifyVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = validate::volume_id(&req.volume_id, "volume_id")?;
        validate::map_size(&req.secrets, "secrets")?;
        validate::map_size(&req.mutable_parameters, "mutable_parameters")?;
        let mutable = validate::mutable_parameters(&req.mutable_parameters)?;
        let id = id.ok_or_else(|| no_volume("volume_id", &req.volume_id))?;
        self.control
            .modify_volume(id, mutable.provisioning, mutable.replication)
            .await
            .map_err(from_control)?;
        Ok(Response::new(proto::ControllerModifyVolumeResponse {}))
    }

    #[instrument(skip_all, fields(snapshot.id = ?request.get_ref().snapshot_id))]
    async fn get_snapshot(
        &self,
        request: Request<proto::GetSnapshotRequest>,
    ) -> Result<Response<proto::GetSnapshotResponse>, Status> {
        let req = request.into_inner();
        let id = validate::snapshot_id(&req.snapshot_id, "snapshot_id")?.ok_or_else(|| {
            not_found(format_args!(
                "snapshot_id: snapshot {}",
                shown(&req.snapshot_id)
            ))
        })?;
        let snapshot = self.control.snapshot(id).await.map_err(from_control)?;
        Ok(Response::new(proto::GetSnapshotResponse {
            snapshot: Some(snapshot_message(&snapshot)),
        }))
    }
}
