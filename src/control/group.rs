//! Volume group snapshots: one point in time across several volumes, on one node or
//! several (see `pool::group` for what each node does).
//!
//! # Guarantees
//!
//! - A create freezes every member on every node before any member is cut, and thaws
//!   every node afterwards, also when a step fails; a node's freeze ends by itself
//!   after [`crate::node::GROUP_HOLD_DEADLINE`] if the controller never comes back. A
//!   failed attempt removes the members it cut.
//! - It is idempotent by name and source set: the same name and sources return the
//!   group that exists; the same name with other sources is [`Error::Incompatible`].
//! - A group exists once its record is on its home node; deleting it removes its
//!   members first, then the record, so a repeated delete finishes an interrupted one.
//!   Its members cannot be deleted one by one ([`Error::GroupMember`]).
//! - The spec asks for write-order consistency or a failure: a group with more than
//!   one raw block volume in use is refused ([`Error::NotOneMoment`]), because kura can
//!   flush a loop device but not hold its writers still (see `pool::group`).

use std::collections::{BTreeMap, BTreeSet};

use super::{Controller, Error, Result};
use crate::agent::{self, Node, Pools};
use crate::pool::group::{GroupSnapshot, member_id};
use crate::pool::{GroupSnapshotId, Snapshot, SnapshotId, Timestamp, VolumeId};

/// A group and its member snapshots as they are now.
pub type GroupAndMembers = (GroupSnapshot, Vec<Snapshot>);

impl<P: Pools> Controller<P> {
    /// Cuts a group snapshot of `sources` (sorted, distinct), or finds the one a
    /// create of that name made.
    pub async fn create_group(
        &self,
        name: &str,
        sources: Vec<VolumeId>,
    ) -> Result<GroupAndMembers> {
        let _name_guard = self.lock_name("group snapshot", name)?;
        if let Some(existing) = self.find_group(name).await? {
            if existing.sources != sources {
                return Err(Error::Incompatible(format!(
                    "group snapshot {name:?} already exists with other source volumes"
                )));
            }
            let members = self.members(&existing).await?;
            return Ok((existing, members));
        }
        let mut by_node: BTreeMap<String, (Node, Vec<VolumeId>)> = BTreeMap::new();
        for source in &sources {
            let token = source.node();
            let node = self.pools.locate(&token).map_err(|e| match e {
                agent::Error::UnknownNode { token } => Error::VolumeNotFound {
                    id: source.to_string(),
                    node: token,
                },
                other => Error::Agent(other),
            })?;
            by_node
                .entry(token.as_str().to_owned())
                .or_insert_with(|| (node, Vec::new()))
                .1
                .push(source.clone());
        }
        // The home node keeps the record: the node of the first source.
        let id = GroupSnapshotId::derive(name, &sources[0].node());
        let (mut cut, created) = self.cut_group(&id, &by_node).await?;
        let group = GroupSnapshot {
            id: id.clone(),
            name: name.to_owned(),
            members: sources.iter().map(|v| member_id(&id, v)).collect(),
            sources,
            created,
        };
        if let Err(e) = self.pools.put_group(group.clone()).await {
            self.remove_members(cut.iter().map(|s| s.id.clone())).await;
            return Err(e.into());
        }
        cut.sort_by(|a, b| a.source_volume.cmp(&b.source_volume));
        Ok((group, cut))
    }

    /// Deletes a group: its members, then its record. `asked`, when not empty, must be
    /// exactly its members. One that is gone already is deleted.
    pub async fn delete_group(&self, id: GroupSnapshotId, asked: &[String]) -> Result<()> {
        let group = match self.pools.group(id.clone()).await {
            Ok(group) => group,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        check_members(&group, asked)?;
        for member in &group.members {
            self.pools.remove_member(member.clone()).await?;
        }
        Ok(self.pools.delete_group(id).await?)
    }

    /// A group and its members; `asked`, when not empty, must be exactly its members.
    pub async fn group(&self, id: GroupSnapshotId, asked: &[String]) -> Result<GroupAndMembers> {
        let group = self.pools.group(id).await?;
        check_members(&group, asked)?;
        let members = self.members(&group).await?;
        Ok((group, members))
    }

    /// The group a create with this name made, on whichever live node is its home.
    async fn find_group(&self, name: &str) -> Result<Option<GroupSnapshot>> {
        for node in self.pools.nodes() {
            match self
                .pools
                .group(GroupSnapshotId::derive(name, &node.token))
                .await
            {
                Ok(group) => return Ok(Some(group)),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }

    /// A group's member snapshots as they are now.
    async fn members(&self, group: &GroupSnapshot) -> Result<Vec<Snapshot>> {
        let mut snapshots = Vec::with_capacity(group.members.len());
        for id in &group.members {
            snapshots.push(self.pools.snapshot(id.clone()).await?);
        }
        Ok(snapshots)
    }

    /// A member of a group that exists cannot be deleted alone: a group goes as a
    /// whole. A member whose group was never committed (an interrupted create) may go
    /// alone.
    pub(super) async fn check_not_grouped(&self, id: &SnapshotId) -> Result<()> {
        let snapshot = match self.pools.snapshot(id.clone()).await {
            Ok(snapshot) => snapshot,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let Some(group) = snapshot.group else {
            return Ok(());
        };
        match self.pools.group(group.clone()).await {
            Ok(_) => Err(Error::GroupMember {
                snapshot: id.to_string(),
                group: group.to_string(),
            }),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs the three steps (freeze everywhere, cut everywhere, thaw everywhere) over
    /// the member volumes, by node; see the guarantees.
    async fn cut_group(
        &self,
        id: &GroupSnapshotId,
        by_node: &BTreeMap<String, (Node, Vec<VolumeId>)>,
    ) -> Result<(Vec<Snapshot>, Timestamp)> {
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
            .map_err(Error::from)
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
                    Err(e) => result = Err(e.into()),
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
                tracing::warn!(node.id = %node.id, error = %e, "thaw after a group snapshot failed; the node's deadline thaws it");
            }
        }
        match result {
            Ok(()) => Ok((cut, created)),
            Err(e) => {
                self.remove_members(cut.iter().map(|s| s.id.clone())).await;
                Err(e)
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
fn one_moment(flushed: Vec<VolumeId>) -> Result<()> {
    if flushed.len() <= 1 {
        return Ok(());
    }
    Err(Error::NotOneMoment {
        volumes: flushed.iter().map(ToString::to_string).collect(),
    })
}

/// `asked`, when given, must be exactly the group's members.
fn check_members(group: &GroupSnapshot, asked: &[String]) -> Result<()> {
    if asked.is_empty() {
        return Ok(());
    }
    let asked: BTreeSet<&str> = asked.iter().map(String::as_str).collect();
    let members: BTreeSet<&str> = group.members.iter().map(|m| m.as_str()).collect();
    if asked != members {
        return Err(Error::NotMembers {
            group: group.id.to_string(),
            members: members.len(),
        });
    }
    Ok(())
}
