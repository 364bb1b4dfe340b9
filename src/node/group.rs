//! Group-snapshot freezes held on this node between the controller's steps (see
//! `control::group`): a hold keeps its volumes quiesced and locked until the
//! controller thaws it or [`GROUP_HOLD_DEADLINE`] passes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{Local, run};
use crate::pool::group::{GroupFreeze, GroupSnapshot};
use crate::pool::locks::Guard;
use crate::pool::{self, GroupSnapshotId, Snapshot, SnapshotId, Timestamp, VolumeId};

/// How long a group's freeze may be held before it is ended regardless: the freeze
/// deadline of a single snapshot.
pub const GROUP_HOLD_DEADLINE: Duration = Duration::from_secs(30);

/// A group freeze in force: the frozen filesystems and the volumes' locks, with the
/// attempt it belongs to.
struct Hold {
    serial: u64,
    _freeze: GroupFreeze,
    _guards: Vec<Guard>,
}

/// The holds in force on this node, by name.
#[derive(Clone, Default)]
pub struct Holds {
    held: Arc<Mutex<HashMap<String, Hold>>>,
    serial: Arc<AtomicU64>,
}

impl Holds {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Hold>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends a hold off the async threads: a thaw is a system call.
    fn end(hold: Option<Hold>) {
        if let Some(hold) = hold {
            drop(tokio::task::spawn_blocking(move || drop(hold)));
        }
    }
}

impl Local {
    /// Quiesces `volumes` and holds them so, with their locks, under the name `hold`
    /// until [`Local::thaw_group`] or the deadline. Answers the raw block volumes in
    /// use among them: flushed, not held still.
    pub async fn freeze_group(
        &self,
        hold: String,
        volumes: Vec<VolumeId>,
    ) -> pool::Result<Vec<VolumeId>> {
        let keys: Vec<String> = volumes.iter().map(VolumeId::to_string).collect();
        let guards = self.lock(&keys)?;
        let pool = Arc::clone(&self.pool);
        let freeze = run(vec![], move || pool.freeze_volumes(&volumes)).await?;
        let flushed = freeze.flushed.clone();
        let serial = self.holds.serial.fetch_add(1, Ordering::Relaxed);
        let held = Hold {
            serial,
            _freeze: freeze,
            _guards: guards,
        };
        Holds::end(self.holds.lock().insert(hold.clone(), held));
        // The deadline: a controller that never comes back to thaw cannot keep the
        // volumes frozen and locked.
        let holds = self.holds.clone();
        tokio::spawn(async move {
            tokio::time::sleep(GROUP_HOLD_DEADLINE).await;
            let mut held = holds.lock();
            if held.get(&hold).is_some_and(|h| h.serial == serial) {
                tracing::error!(hold = %hold, "group freeze deadline passed; thawing");
                let ended = held.remove(&hold);
                drop(held);
                Holds::end(ended);
            }
        });
        Ok(flushed)
    }

    /// Cuts the member snapshots of `volumes` while `hold` is in force.
    pub async fn cut_group_members(
        &self,
        hold: String,
        group: GroupSnapshotId,
        volumes: Vec<VolumeId>,
        created: Timestamp,
    ) -> pool::Result<Vec<Snapshot>> {
        if !self.holds.lock().contains_key(&hold) {
            return Err(pool::Error::Busy(format!(
                "the freeze of group snapshot {group} ended before its members were cut; retry"
            )));
        }
        self.on_pool(&[], move |p| p.cut_members(&group, &volumes, created))
            .await
    }

    /// Ends `hold` (thaws); one that is over already is ended.
    pub async fn thaw_group(&self, hold: String) -> pool::Result<()> {
        let ended = self.holds.lock().remove(&hold);
        run(vec![], move || {
            drop(ended);
            Ok(())
        })
        .await
    }

    /// Commits a group's record (this is its home node).
    pub async fn put_group(&self, group: GroupSnapshot) -> pool::Result<()> {
        self.on_pool(&[], move |p| p.put_group(&group)).await
    }

    pub async fn group(&self, id: GroupSnapshotId) -> pool::Result<GroupSnapshot> {
        self.on_pool(&[], move |p| p.group(&id)).await
    }

    pub async fn delete_group(&self, id: GroupSnapshotId) -> pool::Result<()> {
        self.on_pool(&[id.to_string()], move |p| p.delete_group(&id))
            .await
    }

    /// Removes a member snapshot of a group.
    pub async fn remove_member(&self, id: SnapshotId) -> pool::Result<()> {
        self.on_pool(&[id.to_string()], move |p| p.remove_member(&id))
            .await
    }
}
