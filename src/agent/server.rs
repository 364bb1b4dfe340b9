//! The node's side of the agent API: this node's pool, served to the controller.
//!
//! # Guarantees
//!
//! - Only a client presenting the controller identity ([`tls::CONTROLLER_NAME`]) may
//!   make control calls; any other identity of the CA gets PERMISSION_DENIED. A client
//!   without a certificate of the CA never gets past the TLS handshake.
//! - Every call goes through [`node::Local`], which takes the node's per-volume locks
//!   (shared with the Node service) for as long as the pool work runs, even if the
//!   controller gives up waiting.

use std::pin::Pin;
use std::time::Duration;

use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::errors::{self, malformed};
use super::proto::agent_server::Agent;
use super::replication::{ClusterPeers, PointStream};
use super::transfer::{ChunkStream, ExportClient};
use super::{proto, tls, wire};
use crate::node::{self, replication::Replicator, transfer::Transfers};
use crate::pool::{self, Provisioning, size};

/// A pool error as the agent answers it.
fn answer(error: pool::Error) -> Status {
    errors::status(&error)
}

/// How often the status stream sends an update.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

pub struct AgentService {
    local: node::Local,
    /// This node's transfers, as a destination.
    transfers: Transfers<ExportClient>,
    /// Both ends of this node's replication.
    replicator: Replicator<ClusterPeers>,
    /// This node's identity as a client, for reading a source's export.
    tls: tonic::transport::ClientTlsConfig,
    instance_id: String,
    /// Becomes true when the process stops: status streams end, so a graceful
    /// shutdown does not wait on them.
    stopping: watch::Receiver<bool>,
}

impl AgentService {
    pub fn new(
        local: node::Local,
        transfers: Transfers<ExportClient>,
        replicator: Replicator<ClusterPeers>,
        tls: tonic::transport::ClientTlsConfig,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        AgentService {
            local,
            transfers,
            replicator,
            tls,
            instance_id: uuid::Uuid::new_v4().to_string(),
            stopping,
        }
    }

    fn info(&self) -> proto::InfoResponse {
        proto::InfoResponse {
            node_id: self.local.node_id().to_owned(),
            node_token: self.local.token().as_str().to_owned(),
            pool_id: self.local.pool().id().to_owned(),
            instance_id: self.instance_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

/// Refuses a caller that is not the controller.
fn control<T>(request: &Request<T>) -> Result<(), Status> {
    match tls::caller_is(request, tls::CONTROLLER_NAME) {
        true => Ok(()),
        false => Err(errors::not_controller(tls::CONTROLLER_NAME)),
    }
}

/// A snapshot of the pool's state for the status stream.
async fn status(local: &node::Local) -> proto::StatusUpdate {
    let thin = local.available(Provisioning::Thin).await;
    let thick = local.available(Provisioning::Thick).await;
    let maximum_thin = local.maximum(Provisioning::Thin).await;
    let maximum_thick = local.maximum(Provisioning::Thick).await;
    let probe = local.probe().await;
    match (thin, thick, probe) {
        (Ok(thin), Ok(thick), Ok(())) => proto::StatusUpdate {
            available_thin: thin,
            available_thick: thick,
            healthy: true,
            message: "pool is usable".to_owned(),
            // Unknown (0) if the pool cannot say: the controller then leaves the
            // bound to the node.
            maximum_thin: maximum_thin.unwrap_or(0),
            maximum_thick: maximum_thick.unwrap_or(0),
        },
        (thin, thick, probe) => {
            let problem = [thin.err(), thick.err(), probe.err()]
                .into_iter()
                .flatten()
                .map(|e| crate::chain(&e))
                .next()
                .unwrap_or_default();
            proto::StatusUpdate {
                available_thin: 0,
                available_thick: 0,
                healthy: false,
                message: format!("pool is not usable: {problem}"),
                maximum_thin: 0,
                maximum_thick: 0,
            }
        }
    }
}

type RangesStream = Pin<Box<dyn Stream<Item = Result<proto::SnapshotRangesBatch, Status>> + Send>>;

type StatusStream = Pin<Box<dyn Stream<Item = Result<proto::StatusUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn info(
        &self,
        _request: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::InfoResponse>, Status> {
        // Any identity of the CA may ask who this is (the handshake checked the CA).
        Ok(Response::new(self.info()))
    }

    type StatusStream = StatusStream;

    async fn status(
        &self,
        request: Request<proto::StatusRequest>,
    ) -> Result<Response<Self::StatusStream>, Status> {
        // The controller and the other nodes (which replicate to this one) follow it.
        if !tls::caller_is(&request, tls::NODE_NAME) {
            control(&request)?;
        }
        let local = self.local.clone();
        let mut stopping = self.stopping.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(STATUS_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = stopping.wait_for(|s| *s) => break,
                }
                // Ends when the controller hangs up.
                if tx.send(Ok(status(&local).await)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    #[instrument(skip_all, fields(volume.name = %request.get_ref().name))]
    async fn find_volume(
        &self,
        request: Request<proto::FindVolumeRequest>,
    ) -> Result<Response<proto::FindVolumeResponse>, Status> {
        control(&request)?;
        let found = self
            .local
            .find_volume(request.into_inner().name)
            .await
            .map_err(answer)?;
        Ok(Response::new(proto::FindVolumeResponse {
            volume: found.as_ref().map(wire::volume_message),
        }))
    }

    #[instrument(skip_all, fields(volume.name = %request.get_ref().name))]
    async fn create_volume(
        &self,
        request: Request<proto::CreateVolumeRequest>,
    ) -> Result<Response<proto::VolumeResponse>, Status> {
        control(&request)?;
        let spec = wire::spec(request.get_ref()).map_err(malformed)?;
        let volume = self.local.create_volume(spec).await.map_err(answer)?;
        Ok(Response::new(proto::VolumeResponse {
            volume: Some(wire::volume_message(&volume)),
            condition: None,
        }))
    }

    #[instrument(skip_all, fields(volume.id = %request.get_ref().volume_id))]
    async fn get_volume(
        &self,
        request: Request<proto::GetVolumeRequest>,
    ) -> Result<Response<proto::VolumeResponse>, Status> {
        control(&request)?;
        let id = wire::volume_id(&request.get_ref().volume_id, "volume_id").map_err(malformed)?;
        let (volume, condition) = self.local.volume(id).await.map_err(answer)?;
        Ok(Response::new(wire::volume_response(&volume, &condition)))
    }

    #[instrument(skip_all)]
    async fn list_volumes(
        &self,
        request: Request<proto::ListVolumesRequest>,
    ) -> Result<Response<proto::ListVolumesResponse>, Status> {
        control(&request)?;
        let req = request.into_inner();
        let from = wire::optional(&req.start_id, "start_id", wire::volume_id).map_err(malformed)?;
        let volumes = self
            .local
            .list_volumes(from, wire::limit(req.limit))
            .await
            .map_err(answer)?;
        Ok(Response::new(proto::ListVolumesResponse {
            volumes: volumes
                .iter()
                .map(|(v, c)| wire::volume_response(v, c))
                .collect(),
        }))
    }

    #[instrument(skip_all, fields(volume.id = %request.get_ref().volume_id))]
    async fn delete_volume(
        &self,
        request: Request<proto::DeleteVolumeRequest>,
    ) -> Result<Response<proto::DeleteVolumeResponse>, Status> {
        control(&request)?;
        let id = wire::volume_id(&request.get_ref().volume_id, "volume_id").map_err(malformed)?;
        self.local.delete_volume(id).await.map_err(answer)?;
        Ok(Response::new(proto::DeleteVolumeResponse {}))
    }

    #[instrument(skip_all, fields(volume.id = %request.get_ref().volume_id))]
    async fn expand_volume(
        &self,
        request: Request<proto::ExpandVolumeRequest>,
    ) -> Result<Response<proto::ExpandVolumeResponse>, Status> {
        control(&request)?;
        let req = request.into_inner();
        let id = wire::volume_id(&req.volume_id, "volume_id").map_err(malformed)?;
        let range = size::Range {
            required: req.required_bytes,
            limit: req.limit_bytes,
        };
        let (volume, changed) = self.local.expand_volume(id, range).await.map_err(answer)?;
        Ok(Response::new(proto::ExpandVolumeResponse {
            volume: Some(wire::volume_message(&volume)),
            changed,
        }))
    }

    #[instrument(skip_all, fields(snapshot.name = %request.get_ref().name))]
    async fn find_snapshot(
        &self,
        request: Request<proto::FindSnapshotRequest>,
    ) -> Result<Response<proto::FindSnapshotResponse>, Status> {
        control(&request)?;
        let found = self
            .local
            .find_snapshot(request.into_inner().name)
            .await
            .map_err(answer)?;
        Ok(Response::new(proto::FindSnapshotResponse {
            snapshot: found.as_ref().map(wire::snapshot_message),
        }))
    }

    #[instrument(skip_all, fields(snapshot.name = %request.get_ref().name))]
    async fn create_snapshot(
        &self,
        request: Request<proto::CreateSnapshotRequest>,
    ) -> Result<Response<proto::SnapshotResponse>, Status> {
        control(&request)?;
        let req = request.into_inner();
        let source =
            wire::volume_id(&req.source_volume_id, "source_volume_id").map_err(malformed)?;
        let snapshot = self
            .local
            .create_snapshot(req.name, source)
            .await
            .map_err(answer)?;
        Ok(Response::new(proto::SnapshotResponse {
            snapshot: Some(wire::snapshot_message(&snapshot)),
        }))
    }

    #[instrument(skip_all, fields(snapshot.id = %request.get_ref().snapshot_id))]
    async fn get_snapshot(
        &self,
        request: Request<proto::GetSnapshotRequest>,
    ) -> Result<Response<proto::SnapshotResponse>, Status> {
        control(&request)?;
        let id =
            wire::snapshot_id(&request.get_ref().snapshot_id, "snapshot_id").map_err(malformed)?;
        let snapshot = self.local.snapshot(id).await.map_err(answer)?;
        Ok(Response::new(proto::SnapshotResponse {
            snapshot: Some(wire::snapshot_message(&snapshot)),
        }))
    }

    #[instrument(skip_all)]
    async fn list_snapshots(
        &self,
        request: Request<proto::ListSnapshotsRequest>,
    ) -> Result<Response<proto::ListSnapshotsResponse>, Status> {
        control(&request)?;
        let req = request.into_inner();
        let from =
            wire::optional(&req.start_id, "start_id", wire::snapshot_id).map_err(malformed)?;
        let source = wire::optional(&req.source_volume_id, "source_volume_id", wire::volume_id)
            .map_err(malformed)?;
        let snapshots = self
            .local
            .list_snapshots(from, wire::limit(req.limit), source)
            .await
            .map_err(answer)?;
        Ok(Response::new(proto::ListSnapshotsResponse {
            snapshots: snapshots.iter().map(wire::snapshot_message).collect(),
        }))
    }

    #[instrument(skip_all, fields(snapshot.id = %request.get_ref().snapshot_id))]
    async fn delete_snapshot(
        &self,
        request: Request<proto::DeleteSnapshotRequest>,
    ) -> Result<Response<proto::DeleteSnapshotResponse>, Status> {
        control(&request)?;
        let id =
            wire::snapshot_id(&request.get_ref().snapshot_id, "snapshot_id").map_err(malformed)?;
        self.local.delete_snapshot(id).await.map_err(answer)?;
        Ok(Response::new(proto::DeleteSnapshotResponse {}))
    }

    #[instrument(skip_all, fields(volume.id = %request.get_ref().volume_id))]
    async fn modify_volume(
        &self,
        request: Request<proto::ModifyVolumeRequest>,
    ) -> Result<Response<proto::ModifyVolumeResponse>, Status> {
        control(&request)?;
        let req = request.into_inner();
        let id = wire::volume_id(&req.volume_id, "volume_id").map_err(malformed)?;
        let provisioning = wire::provisioning(req.provisioning).map_err(malformed)?;
        let (volume, changed) = self
            .local
            .modify_volume(id, provisioning)
            .await
            .map_err(answer)?;
        Ok(Response::new(proto::ModifyVolumeResponse {
            volume: Some(wire::volume_message(&volume)),
            changed,
        }))
    }

    #[instrument(skip_all, fields(hold = %request.get_ref().hold))]
    async fn freeze_group(
        &self,
        request: Request<proto::FreezeGroupRequest>,
    ) -> Result<Response<proto::FreezeGroupResponse>, Status> {
        control(&request)?;
        let req = request.into_inner();
        let volumes = wire::volume_ids(&req.volume_ids, "volume_ids").map_err(malformed)?;
        let flushed = self
            .local
            .freeze_group(req.hold, volumes)
            .await
            .map_err(answer)?;
        Ok(Response::new(proto::FreezeGroupResponse {
            flushed_volume_ids: flushed.iter().map(|v| v.to_string()).collect(),
        }))
    }

    #[instrument(skip_all, fields(group_snapshot.id = %request.get_ref().group_snapshot_id))]
    async fn cut_group_members(
        &self,
        request: Request<proto::CutGroupMembersRequest>,
    ) -> Result<Response<proto::CutGroupMembersResponse>, Status> {
        control(&request)?;
        let req = request.into_inner();
        let group =
            wire::group_id(&req.group_snapshot_id, "group_snapshot_id").map_err(malformed)?;
        let volumes = wire::volume_ids(&req.volume_ids, "volume_ids").map_err(malformed)?;
        let created = wire::timestamp(req.created.as_ref());
        let snapshots = self
            .local
            .cut_group_members(req.hold, group, volumes, created)
            .await
            .map_err(answer)?;
        Ok(Response::new(proto::CutGroupMembersResponse {
            snapshots: snapshots.iter().map(wire::snapshot_message).collect(),
        }))
    }

    #[instrument(skip_all, fields(hold = %request.get_ref().hold))]
    async fn thaw_group(
        &self,
        request: Request<proto::ThawGroupRequest>,
    ) -> Result<Response<proto::ThawGroupResponse>, Status> {
        control(&request)?;
        self.local
            .thaw_group(request.into_inner().hold)
            .await
            .map_err(answer)?;
        Ok(Response::new(proto::ThawGroupResponse {}))
    }

    #[instrument(skip_all)]
    async fn put_group(
        &self,
        request: Request<proto::PutGroupRequest>,
    ) -> Result<Response<proto::PutGroupResponse>, Status> {
        control(&request)?;
        let group = wire::group(request.get_ref().group.as_ref()).map_err(malformed)?;
        self.local.put_group(group).await.map_err(answer)?;
        Ok(Response::new(proto::PutGroupResponse {}))
    }

    #[instrument(skip_all, fields(group_snapshot.id = %request.get_ref().group_snapshot_id))]
    async fn get_group(
        &self,
        request: Request<proto::GetGroupRequest>,
    ) -> Result<Response<proto::GetGroupResponse>, Status> {
        control(&request)?;
        let id = wire::group_id(&request.get_ref().group_snapshot_id, "group_snapshot_id")
            .map_err(malformed)?;
        let group = self.local.group(id).await.map_err(answer)?;
        Ok(Response::new(proto::GetGroupResponse {
            group: Some(wire::group_message(&group)),
        }))
    }

    #[instrument(skip_all, fields(group_snapshot.id = %request.get_ref().group_snapshot_id))]
    async fn delete_group(
        &self,
        request: Request<proto::DeleteGroupRequest>,
    ) -> Result<Response<proto::DeleteGroupResponse>, Status> {
        control(&request)?;
        let id = wire::group_id(&request.get_ref().group_snapshot_id, "group_snapshot_id")
            .map_err(malformed)?;
        self.local.delete_group(id).await.map_err(answer)?;
        Ok(Response::new(proto::DeleteGroupResponse {}))
    }

    #[instrument(skip_all, fields(snapshot.id = %request.get_ref().snapshot_id))]
    async fn remove_member(
        &self,
        request: Request<proto::RemoveMemberRequest>,
    ) -> Result<Response<proto::RemoveMemberResponse>, Status> {
        control(&request)?;
        let id =
            wire::snapshot_id(&request.get_ref().snapshot_id, "snapshot_id").map_err(malformed)?;
        self.local.remove_member(id).await.map_err(answer)?;
        Ok(Response::new(proto::RemoveMemberResponse {}))
    }

    // ---- Cross-node restore and clone: the logic is in `super::transfer`. ----

    #[instrument(skip_all, fields(export.key = %request.get_ref().key))]
    async fn create_export(
        &self,
        request: Request<proto::CreateExportRequest>,
    ) -> Result<Response<proto::Export>, Status> {
        control(&request)?;
        let export = super::transfer::create_export(&self.local, request.into_inner()).await?;
        Ok(Response::new(export))
    }

    #[instrument(skip_all, fields(export.id = %request.get_ref().export_id))]
    async fn delete_export(
        &self,
        request: Request<proto::DeleteExportRequest>,
    ) -> Result<Response<proto::DeleteExportResponse>, Status> {
        control(&request)?;
        super::transfer::delete_export(&self.local, request.into_inner().export_id).await?;
        Ok(Response::new(proto::DeleteExportResponse {}))
    }

    type ReadExportStream = ChunkStream;

    #[instrument(skip_all, fields(export.id = %request.get_ref().export_id))]
    async fn read_export(
        &self,
        request: Request<proto::ReadExportRequest>,
    ) -> Result<Response<Self::ReadExportStream>, Status> {
        let stream = super::transfer::read_export(&self.local, request).await?;
        Ok(Response::new(stream))
    }

    #[instrument(skip_all, fields(volume.name = ?request.get_ref().volume.as_ref().map(|v| &v.name)))]
    async fn transfer(
        &self,
        request: Request<proto::TransferRequest>,
    ) -> Result<Response<proto::TransferResponse>, Status> {
        control(&request)?;
        let answer =
            super::transfer::transfer(&self.transfers, &self.tls, request.into_inner()).await?;
        Ok(Response::new(answer))
    }

    #[instrument(skip_all, fields(volume.name = %request.get_ref().name))]
    async fn find_transfer(
        &self,
        request: Request<proto::FindTransferRequest>,
    ) -> Result<Response<proto::FindTransferResponse>, Status> {
        control(&request)?;
        let progress = super::transfer::find(&self.transfers, request.into_inner().name).await?;
        Ok(Response::new(proto::FindTransferResponse { progress }))
    }

    // ---- Changed block tracking ----

    type SnapshotRangesStream = RangesStream;

    #[instrument(skip_all, fields(snapshot.id = %request.get_ref().snapshot_id))]
    async fn snapshot_ranges(
        &self,
        request: Request<proto::SnapshotRangesRequest>,
    ) -> Result<Response<Self::SnapshotRangesStream>, Status> {
        use tokio_stream::StreamExt;
        control(&request)?;
        let request = request.into_inner();
        let query = wire::ranges_query(&request).map_err(malformed)?;
        let listed = self
            .local
            .snapshot_ranges(query, request.starting_offset, request.max_results as usize)
            .await
            .map_err(answer)?;
        let capacity = listed.capacity;
        // Dropped when the controller cancels the call: the node's work stops.
        let batches = tokio_stream::wrappers::ReceiverStream::new(listed.batches).map(
            move |batch| match batch {
                Ok(ranges) => Ok(wire::ranges_message(capacity, &ranges)),
                Err(e) => Err(answer(e)),
            },
        );
        Ok(Response::new(Box::pin(batches)))
    }

    // ---- Replicas: the logic is in `super::replication`. ----

    #[instrument(skip_all, fields(volume.id = %request.get_ref().volume_id))]
    async fn set_replication(
        &self,
        request: Request<proto::SetReplicationRequest>,
    ) -> Result<Response<proto::VolumeResponse>, Status> {
        control(&request)?;
        let request = request.into_inner();
        let id = wire::volume_id(&request.volume_id, "volume_id").map_err(malformed)?;
        let (wanted, nodes) = match &request.replication {
            None => (None, vec![]),
            Some(r) => {
                let r = wire::replication(r).map_err(malformed)?;
                let nodes = r.nodes().map(str::to_owned).collect();
                (Some((r.copies, r.interval_secs)), nodes)
            }
        };
        self.local
            .set_replication(id.clone(), wanted, nodes)
            .await
            .map_err(answer)?;
        let (volume, condition) = self.local.volume(id).await.map_err(answer)?;
        Ok(Response::new(proto::VolumeResponse {
            volume: Some(wire::volume_message(&volume)),
            condition: Some(wire::condition_message(&condition)),
        }))
    }

    #[instrument(skip_all, fields(volume.id = ?request.get_ref().volume.as_ref().map(|v| &v.id)))]
    async fn replicate(
        &self,
        request: Request<proto::ReplicateRequest>,
    ) -> Result<Response<proto::ReplicateResponse>, Status> {
        let answer = super::replication::replicate(&self.replicator, request).await?;
        Ok(Response::new(answer))
    }

    type ReadPointStream = PointStream;

    #[instrument(skip_all, fields(volume.id = %request.get_ref().volume_id))]
    async fn read_point(
        &self,
        request: Request<proto::ReadPointRequest>,
    ) -> Result<Response<Self::ReadPointStream>, Status> {
        let stream = super::replication::read_point(&self.replicator, request).await?;
        Ok(Response::new(stream))
    }

    async fn find_replica(
        &self,
        request: Request<proto::FindReplicaRequest>,
    ) -> Result<Response<proto::FindReplicaResponse>, Status> {
        control(&request)?;
        use proto::find_replica_request::Source;
        let source = match &request.get_ref().source {
            Some(Source::VolumeId(v)) => super::replication::replica_source(Some(v), None)?,
            Some(Source::SnapshotId(s)) => super::replication::replica_source(None, Some(s))?,
            None => super::replication::replica_source(None, None)?,
        };
        let found = super::replication::find_replica(&self.local, source).await?;
        Ok(Response::new(found))
    }

    async fn drop_replica(
        &self,
        request: Request<proto::DropReplicaRequest>,
    ) -> Result<Response<proto::DropReplicaResponse>, Status> {
        control(&request)?;
        use proto::drop_replica_request::Source;
        let request = request.into_inner();
        let source = match &request.source {
            Some(Source::VolumeId(v)) => super::replication::replica_source(Some(v), None)?,
            Some(Source::SnapshotId(s)) => super::replication::replica_source(None, Some(s))?,
            None => super::replication::replica_source(None, None)?,
        };
        let dropped =
            super::replication::drop_replica(&self.local, source, request.tombstone).await?;
        Ok(Response::new(dropped))
    }

    async fn replica_placed(
        &self,
        request: Request<proto::ReplicaPlacedRequest>,
    ) -> Result<Response<proto::ReplicaPlacedResponse>, Status> {
        let placed = super::replication::replica_placed(&self.replicator, request).await?;
        Ok(Response::new(placed))
    }
}
