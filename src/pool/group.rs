//! Group snapshots: several volumes cut at one point in time.
//!
//! A group snapshot is taken in three steps, which the controller runs on every node
//! that holds a member (the same steps in-process and over the agent API):
//!
//! 1. [`Pool::freeze_volumes`]: every member volume of this pool is quiesced (its
//!    filesystem frozen, or a block volume flushed) and stays so while the returned
//!    [`GroupFreeze`] lives, at most the freeze deadline (a watchdog thaws). A raw
//!    block volume in use cannot be held still (a loop device has no suspend), so the
//!    controller refuses a group with more than one: one such member reflinked while
//!    all others are frozen still gives one point in time, two do not.
//! 2. [`Pool::cut_members`]: while all are frozen, each is reflinked into a member
//!    snapshot carrying the group's ID.
//! 3. The freeze is dropped (thawed) on every node, whatever happened; then the
//!    group's record is written on its home node (the node of its first source volume,
//!    whose token its ID carries).
//!
//! # Guarantees
//!
//! - No member is reflinked before every member on every node is frozen, and every
//!   freeze is thawed on success, on failure and after the deadline; a crash leaves
//!   frozen filesystems that start-up thaws ([`Pool::open`]).
//! - A group exists once its record is written (atomically). Member snapshots of a
//!   group whose record was never written (a crash, a failed step) are cut again by a
//!   retry, or may be deleted one by one.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ids::{GroupSnapshotId, SnapshotId, VolumeId};
use super::snapshot::{Quiesced, Snapshot};
use super::{Error, Pool, Result, Timestamp, partial_path, read_meta, write_meta};
use crate::sys;

/// A group snapshot's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSnapshot {
    pub id: GroupSnapshotId,
    pub name: String,
    /// The source volumes, sorted.
    pub sources: Vec<VolumeId>,
    /// One member snapshot per source, in the same order.
    pub members: Vec<SnapshotId>,
    pub created: Timestamp,
}

/// The member volumes of one pool, quiesced together until this is dropped.
pub struct GroupFreeze {
    _quiesced: Vec<Quiesced>,
    /// Raw block volumes in use, flushed but not held still (see [`Quiesced::Flushed`]).
    pub flushed: Vec<VolumeId>,
}

impl std::fmt::Debug for GroupFreeze {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GroupFreeze({} volumes, flushed {:?})",
            self._quiesced.len(),
            self.flushed
        )
    }
}

/// The name a group's member snapshot of `volume` is derived from.
pub fn member_name(group: &GroupSnapshotId, volume: &VolumeId) -> String {
    format!("{group}/{volume}")
}

/// The ID of a group's member snapshot of `volume` (on the volume's node).
pub fn member_id(group: &GroupSnapshotId, volume: &VolumeId) -> SnapshotId {
    SnapshotId::derive(&member_name(group, volume), &volume.node())
}

impl Pool {
    fn group_dir(&self) -> PathBuf {
        self.root.join("groups")
    }

    fn group_meta_path(&self, id: &GroupSnapshotId) -> PathBuf {
        self.group_dir().join(format!("{id}.json"))
    }

    /// Quiesces every volume in `volumes` (all of this pool) until the result is
    /// dropped. A volume that is missing, or a failure, thaws what was frozen.
    pub fn freeze_volumes(&self, volumes: &[VolumeId]) -> Result<GroupFreeze> {
        if !self.reflink {
            return Err(Error::Precondition(
                "group snapshots need a pool that can reflink: a copy of several volumes \
                 would not hold one point in time"
                    .to_owned(),
            ));
        }
        for id in volumes {
            self.volume(id)?;
        }
        let mut quiesced = Vec::new();
        let mut flushed = Vec::new();
        for id in volumes {
            let q = self.quiesce(&self.image_path(id))?;
            if matches!(q, Quiesced::Flushed) {
                flushed.push(id.clone());
            }
            quiesced.push(q);
        }
        self.pause_at("group-frozen");
        Ok(GroupFreeze {
            _quiesced: quiesced,
            flushed,
        })
    }

    /// Reflinks each volume into its member snapshot of `group`, all with the time
    /// `created`. Called while the volumes are frozen. A member left by an earlier,
    /// uncommitted attempt is cut again; on failure the members this call made are
    /// removed.
    pub fn cut_members(
        &self,
        group: &GroupSnapshotId,
        volumes: &[VolumeId],
        created: Timestamp,
    ) -> Result<Vec<Snapshot>> {
        let mut made = Vec::new();
        for volume_id in volumes {
            match self.cut_member(group, volume_id, created) {
                Ok(snapshot) => made.push(snapshot),
                Err(e) => {
                    for snapshot in &made {
                        let _ = self.remove_member(&snapshot.id);
                    }
                    return Err(e);
                }
            }
        }
        // Cut, not thawed yet: where a test holds a controller that never thaws.
        self.pause_at("group-cut");
        Ok(made)
    }

    fn cut_member(
        &self,
        group: &GroupSnapshotId,
        volume_id: &VolumeId,
        created: Timestamp,
    ) -> Result<Snapshot> {
        let volume = self.volume(volume_id)?;
        let id = member_id(group, volume_id);
        // An earlier attempt's member holds another moment.
        self.remove_member(&id)?;
        let image = self.snapshot_image_path(&id);
        let partial = partial_path(&image);
        sys::fs::reflink(&self.image_path(volume_id), &partial)
            .and_then(|()| sys::fs::rename(&partial, &image))
            .inspect_err(|_| {
                let _ = sys::fs::remove(&partial);
            })?;
        let snapshot = Snapshot {
            id: id.clone(),
            name: member_name(group, volume_id),
            source_volume: volume_id.clone(),
            size_bytes: volume.size_bytes,
            created,
            ready: true,
            encryption: volume.encryption,
            group: Some(group.clone()),
            image: Some(super::cbt::ImageOrigin::Reflink),
        };
        if let Err(e) = self.write_snapshot(&snapshot) {
            let _ = sys::fs::remove(&image);
            return Err(e);
        }
        Ok(snapshot)
    }

    /// Removes a member snapshot (metadata first); one that is gone is removed.
    pub fn remove_member(&self, id: &SnapshotId) -> Result<()> {
        if !self.is_local(&id.node()) {
            return Ok(());
        }
        self.remove_snapshot_meta(id)?;
        sys::fs::remove(&self.snapshot_image_path(id))?;
        Ok(())
    }

    /// Commits a group's record: from now on the group exists.
    pub fn put_group(&self, group: &GroupSnapshot) -> Result<()> {
        let dir = self.group_dir();
        std::fs::create_dir_all(&dir).map_err(|e| sys::Error::io("mkdir", &dir, e))?;
        write_meta(&self.group_meta_path(&group.id), group)?;
        tracing::info!(group_snapshot.id = %group.id, members = group.members.len(), "group snapshot cut");
        Ok(())
    }

    pub fn group(&self, id: &GroupSnapshotId) -> Result<GroupSnapshot> {
        let not_found = || Error::NotFound {
            kind: "group snapshot",
            id: id.to_string(),
        };
        if !self.is_local(&id.node()) {
            return Err(not_found());
        }
        read_meta(&self.group_meta_path(id))?.ok_or_else(not_found)
    }

    /// Removes a group's record; its members must be gone first, so a crash in
    /// between leaves a record a repeated delete finishes. One that is gone is
    /// removed.
    pub fn delete_group(&self, id: &GroupSnapshotId) -> Result<()> {
        if !self.is_local(&id.node()) {
            return Ok(());
        }
        sys::fs::remove(&self.group_meta_path(id))?;
        tracing::info!(group_snapshot.id = %id, "group snapshot deleted");
        Ok(())
    }
}
