//! The GroupController service: volume group snapshots, checked here and made by
//! [`crate::control::group`] (its guarantees are there).

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::controller::{ControllerService, snapshot_message};
use super::proto::group_controller_server::GroupController;
use super::proto::{self, group_controller_service_capability};
use super::status::{from_control, invalid, missing, no_volume, not_found, shown};
use super::validate;
use crate::agent::Pools;
use crate::pool::group::GroupSnapshot;
use crate::pool::{GroupSnapshotId, Snapshot};

fn group_message((group, members): &(GroupSnapshot, Vec<Snapshot>)) -> proto::VolumeGroupSnapshot {
    let snapshots: Vec<proto::Snapshot> = members.iter().map(snapshot_message).collect();
    proto::VolumeGroupSnapshot {
        group_snapshot_id: group.id.to_string(),
        ready_to_use: snapshots.iter().all(|s| s.ready_to_use),
        snapshots,
        creation_time: Some(prost_types::Timestamp {
            seconds: group.created.seconds,
            nanos: group.created.nanos,
        }),
    }
}

/// A group snapshot ID from a request: required; one that cannot be kura's is `None`.
fn group_id(value: &str) -> Result<Option<GroupSnapshotId>, Status> {
    validate::required(value, "group_snapshot_id").map(GroupSnapshotId::parse)
}

#[tonic::async_trait]
impl<P: Pools> GroupController for ControllerService<P> {
    async fn group_controller_get_capabilities(
        &self,
        _request: Request<proto::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<proto::GroupControllerGetCapabilitiesResponse>, Status> {
        use group_controller_service_capability::rpc::Type;
        Ok(Response::new(
            proto::GroupControllerGetCapabilitiesResponse {
                capabilities: vec![proto::GroupControllerServiceCapability {
                    r#type: Some(group_controller_service_capability::Type::Rpc(
                        group_controller_service_capability::Rpc {
                            r#type: Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                        },
                    )),
                }],
            },
        ))
    }

    #[instrument(skip_all, fields(group_snapshot.name = ?request.get_ref().name))]
    async fn create_volume_group_snapshot(
        &self,
        request: Request<proto::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<proto::CreateVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let name = validate::name(&req.name, "name")?;
        if req.source_volume_ids.is_empty() {
            return Err(missing("source_volume_ids"));
        }
        validate::map_size(&req.parameters, "parameters")?;
        validate::snapshot_parameters(&req.parameters)?;
        validate::map_size(&req.secrets, "secrets")?;
        let mut sources = Vec::with_capacity(req.source_volume_ids.len());
        for (i, text) in req.source_volume_ids.iter().enumerate() {
            let field = format!("source_volume_ids[{i}]");
            let id = validate::volume_id(text, &field)?.ok_or_else(|| no_volume(&field, text))?;
            if sources.contains(&id) {
                return Err(invalid(
                    &field,
                    format!("names volume {} twice", shown(text)),
                ));
            }
            sources.push(id);
        }
        sources.sort();
        let group = self
            .control
            .create_group(name, sources)
            .await
            .map_err(from_control)?;
        Ok(Response::new(proto::CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(group_message(&group)),
        }))
    }

    #[instrument(skip_all, fields(group_snapshot.id = ?request.get_ref().group_snapshot_id))]
    async fn delete_volume_group_snapshot(
        &self,
        request: Request<proto::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<proto::DeleteVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let id = group_id(&req.group_snapshot_id)?;
        validate::map_size(&req.secrets, "secrets")?;
        // An ID that cannot be ours names a group that is already gone.
        let Some(id) = id else {
            return Ok(Response::new(proto::DeleteVolumeGroupSnapshotResponse {}));
        };
        self.control
            .delete_group(id, &req.snapshot_ids)
            .await
            .map_err(from_control)?;
        Ok(Response::new(proto::DeleteVolumeGroupSnapshotResponse {}))
    }

    #[instrument(skip_all, fields(group_snapshot.id = ?request.get_ref().group_snapshot_id))]
    async fn get_volume_group_snapshot(
        &self,
        request: Request<proto::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<proto::GetVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let id = group_id(&req.group_snapshot_id)?;
        validate::map_size(&req.secrets, "secrets")?;
        let id = id.ok_or_else(|| {
            not_found(format_args!(
                "group_snapshot_id: group snapshot {}",
                shown(&req.group_snapshot_id)
            ))
        })?;
        let group = self
            .control
            .group(id, &req.snapshot_ids)
            .await
            .map_err(from_control)?;
        Ok(Response::new(proto::GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(group_message(&group)),
        }))
    }
}
