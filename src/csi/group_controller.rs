//! The GroupController service: volume group snapshots, one point in time across
//! several volumes, on one node or several (see `pool::group` for the steps).
//!
//! # Guarantees
//!
//! - CreateVolumeGroupSnapshot freezes every member on every node before any member
//!   is cut, and thaws every node afterwards, also when a step fails; a node's freeze
//!   ends by itself after [`crate::agent::GROUP_HOLD_DEADLINE`] if the controller
//!   never comes back. A failed attempt removes the members it cut.
//! - It is idempotent by name and source set: the same name and sources return the
//!   group that exists; the same name with other sources is ALREADY_EXISTS.
//! - A group exists once its record is on its home node; deleting it removes its
//!   members first, then the record, so a repeated delete finishes an interrupted one.
//!   Its members cannot be deleted one by one (DeleteSnapshot: INVALID_ARGUMENT, the
//!   spec's "snapshot is part of a group").
//! - The spec asks for write-order consistency or a failure: a group with more than
//!   one raw block volume in use is refused (FAILED_PRECONDITION), because kura can
//!   flush a loop device but not hold its writers still (see `pool::group`).

use std::collections::{BTreeMap, BTreeSet};

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::controller::{ControllerService, snapshot_message};
use super::proto::group_controller_server::GroupController;
use super::proto::{self, group_controller_service_capability};
use super::status::{
    from_agent, incompatible, invalid, missing, no_volume, not_found, precondition, shown,
};
use super::validate;
use crate::agent::{Node, Pools};
use crate::pool::group::{GroupSnapshot, member_id};
use crate::pool::{GroupSnapshotId, Snapshot, SnapshotId, Timestamp, VolumeId};

impl<P: Pools> ControllerService<P> {
    /// The group a create with this name made, on whichever live node is its home.
    async fn find_group(&self, name: &str) -> Result<Option<GroupSnapshot>, Status> {
        for node in self.pools.nodes() {
            match self
                .pools
                .group(GroupSnapshotId::derive(name, &node.token))
                .await
            {
                Ok(group) => return Ok(Some(group)),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(from_agent(e)),
            }
        }
        Ok(None)
    }

    /// A group's message, with its members as they are now.
    async fn group_message(
        &self,
        group: &GroupSnapshot,
    ) -> Result<proto::VolumeGroupSnapshot, Status> {
        let mut snapshots = Vec::with_capacity(group.members.len());
        for id in &group.members {
            let snapshot = self.pools.snapshot(id.clone()).await.map_err(from_agent)?;
            snapshots.push(snapshot_message(&snapshot));
        }
        Ok(group_message(group, snapshots))
    }

    /// DeleteSnapshot of a member of a group that exists is refused: a group goes as
    /// a whole. A member whose group was never committed (an interrupted create) may
    /// go alone.
    pub(super) async fn check_not_grouped(&self, id: &SnapshotId) -> Result<(), Status> {
        let snapshot = match self.pools.snapshot(id.clone()).await {
            Ok(snapshot) => snapshot,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(from_agent(e)),
        };
        let Some(group) = snapshot.group else {
            return Ok(());
        };
        match self.pools.group(group.clone()).await {
            Ok(_) => Err(invalid(
                "snapshot_id",
                format!(
                    "snapshot {id} is a member of group snapshot {group}; delete the group \
                     snapshot (DeleteVolumeGroupSnapshot) to delete its members"
                ),
            )),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(from_agent(e)),
        }
    }

    /// Runs the three steps over the member volumes, by node; see the guarantees.
    async fn cut_group(
        &self,
        id: &GroupSnapshotId,
        by_node: &BTreeMap<String, (Node, Vec<VolumeId>)>,
    ) -> Result<(Vec<Snapshot>, Timestamp), Status> {
        let hold = format!("{id}/{}", uuid::Uuid::new_v4().simple());
        let nodes: Vec<&(Node, Vec<VolumeId>)> = by_node.values().collect();
        let frozen =
            futures_util::future::join_all(nodes.iter().map(|(node, volumes)| {
                self.pools.freeze_group(node, hold.clone(), volumes.clone())
            }))
            .await;
        let mut result = frozen
            .into_iter()
            .collect::<Result<Vec<Vec<VolumeId>>, _>>()
            .map_err(from_agent)
            .and_then(|flushed| one_moment(flushed.concat()));
        let created = Timestamp::now();
        let mut cut = Vec::new();
        if result.is_ok() {
            let members = futures_util::future::join_all(nodes.iter().map(|(node, volumes)| {
                self.pools.cut_group_members(
                    node,
                    hold.clone(),
                    id.clone(),
                    volumes.clone(),
                    created,
                )
            }))
            .await;
            for answer in members {
                match answer {
                    Ok(snapshots) => cut.extend(snapshots),
                    Err(e) => result = Err(from_agent(e)),
                }
            }
        }
        // Every node is thawed, whatever happened; a thaw that fails is ended by the
        // node's deadline.
        let thawed = futures_util::future::join_all(
            nodes
                .iter()
                .map(|(node, _)| self.pools.thaw_group(node, hold.clone())),
        )
        .await;
        for (answer, (node, _)) in thawed.into_iter().zip(&nodes) {
            if let Err(e) = answer {
                tracing::error!(node.id = %node.id, error = %e, "thaw after a group snapshot failed; the node's deadline thaws it");
            }
        }
        match result {
            Ok(()) => Ok((cut, created)),
            Err(status) => {
                self.remove_members(cut.iter().map(|s| s.id.clone())).await;
                Err(status)
            }
        }
    }

    /// Removes member snapshots after a failed create; what cannot be removed now is
    /// cut again by a retry, or deletable alone (its group was never committed).
    async fn remove_members(&self, ids: impl Iterator<Item = SnapshotId>) {
        for id in ids {
            if let Err(e) = self.pools.remove_member(id.clone()).await {
                tracing::warn!(snapshot.id = %id, error = %e, "could not remove a member of a failed group snapshot");
            }
        }
    }
}

/// Whether the members, as frozen, give one point in time: every frozen member is
/// still from the freeze until after the cut, so at most one member may keep taking
/// writes (a raw block volume in use) and be cut at its own instant.
fn one_moment(flushed: Vec<VolumeId>) -> Result<(), Status> {
    if flushed.len() <= 1 {
        return Ok(());
    }
    let names: Vec<String> = flushed.iter().map(ToString::to_string).collect();
    Err(precondition(
        "source_volume_ids",
        format!(
            "raw block volumes {} are in use: kura cannot hold a block device's writers \
             still, so two or more of them in one group would not be cut at one point in \
             time; unstage all but one, or snapshot them in separate groups",
            names.join(", ")
        ),
    ))
}

fn group_message(
    group: &GroupSnapshot,
    snapshots: Vec<proto::Snapshot>,
) -> proto::VolumeGroupSnapshot {
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

/// `snapshot_ids`, when given, must be exactly the group's members.
fn check_members(group: &GroupSnapshot, snapshot_ids: &[String]) -> Result<(), Status> {
    if snapshot_ids.is_empty() {
        return Ok(());
    }
    let asked: BTreeSet<&str> = snapshot_ids.iter().map(String::as_str).collect();
    let members: BTreeSet<&str> = group.members.iter().map(|m| m.as_str()).collect();
    if asked != members {
        return Err(invalid(
            "snapshot_ids",
            format!(
                "are not the members of group snapshot {} ({} members)",
                group.id,
                members.len()
            ),
        ));
    }
    Ok(())
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

    #[instrument(err, skip_all, fields(group_snapshot.name = ?request.get_ref().name))]
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
        let _name_guard = self.lock_name("group snapshot", name)?;
        if let Some(existing) = self.find_group(name).await? {
            if existing.sources != sources {
                return Err(incompatible(format!(
                    "group snapshot {name:?} already exists with other source volumes"
                )));
            }
            return Ok(Response::new(proto::CreateVolumeGroupSnapshotResponse {
                group_snapshot: Some(self.group_message(&existing).await?),
            }));
        }
        let mut by_node: BTreeMap<String, (Node, Vec<VolumeId>)> = BTreeMap::new();
        for source in &sources {
            let token = source.node();
            let node = self.pools.locate(&token).map_err(|e| match e {
                crate::agent::Error::UnknownNode { .. } => {
                    no_volume("source_volume_ids", source.as_str())
                }
                other => from_agent(other),
            })?;
            by_node
                .entry(token.as_str().to_owned())
                .or_insert_with(|| (node, Vec::new()))
                .1
                .push(source.clone());
        }
        // The home node keeps the record: the node of the first source.
        let id = GroupSnapshotId::derive(name, &sources[0].node());
        let (cut, created) = self.cut_group(&id, &by_node).await?;
        let group = GroupSnapshot {
            id: id.clone(),
            name: name.to_owned(),
            members: sources.iter().map(|v| member_id(&id, v)).collect(),
            sources,
            created,
        };
        if let Err(e) = self.pools.put_group(group.clone()).await {
            self.remove_members(cut.iter().map(|s| s.id.clone())).await;
            return Err(from_agent(e));
        }
        let mut snapshots: Vec<Snapshot> = cut;
        snapshots.sort_by(|a, b| a.source_volume.cmp(&b.source_volume));
        Ok(Response::new(proto::CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(group_message(
                &group,
                snapshots.iter().map(snapshot_message).collect(),
            )),
        }))
    }

    #[instrument(err, skip_all, fields(group_snapshot.id = ?request.get_ref().group_snapshot_id))]
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
        let group = match self.pools.group(id.clone()).await {
            Ok(group) => group,
            Err(e) if e.is_not_found() => {
                return Ok(Response::new(proto::DeleteVolumeGroupSnapshotResponse {}));
            }
            Err(e) => return Err(from_agent(e)),
        };
        check_members(&group, &req.snapshot_ids)?;
        for member in &group.members {
            self.pools
                .remove_member(member.clone())
                .await
                .map_err(from_agent)?;
        }
        self.pools.delete_group(id).await.map_err(from_agent)?;
        Ok(Response::new(proto::DeleteVolumeGroupSnapshotResponse {}))
    }

    #[instrument(err, skip_all, fields(group_snapshot.id = ?request.get_ref().group_snapshot_id))]
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
        let group = self.pools.group(id).await.map_err(from_agent)?;
        check_members(&group, &req.snapshot_ids)?;
        Ok(Response::new(proto::GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(self.group_message(&group).await?),
        }))
    }
}
