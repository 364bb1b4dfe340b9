//! Inline (CSI ephemeral) volumes: made by NodePublishVolume from the pod's volume
//! attributes, deleted by NodeUnpublishVolume.
//!
//! The kubelet names an inline volume itself (`csi-<digest>`); kura derives the
//! volume's ID from that name, as it does from a CO's create name, so a retried
//! publish finds the volume the first one made.
//!
//! # On disk
//!
//! ```text
//! <state>/ephemeral/<volume-id>.json   the kubelet's name and the publication target
//! <state>/ephemeral/<volume-id>/       where the volume is staged (kura's own path)
//! ```
//!
//! # Guarantees
//!
//! - The record is written before the volume is created, and removed only after the
//!   volume is deleted: whatever instant a crash hits, start-up finds the record and
//!   removes the volume unless its publication is still mounted.
//! - A publish that fails removes what it made (volume, staging, record), unless an
//!   earlier publish had made them; a refused request creates nothing.
//! - Unpublish unmounts, unstages and deletes; repeated, it finds nothing and succeeds.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::attach::{Attacher, Capability};
use super::ids::VolumeId;
use super::volume::{Provisioning, VolumeSpec};
use super::{Encryption, Error, Result, list_meta, read_meta, size, write_meta};
use crate::sys;

/// What an inline volume is made of.
#[derive(Debug, Clone)]
pub struct InlineSpec {
    /// The kubelet's volume ID.
    pub name: String,
    /// 0: the pool's default size.
    pub size: u64,
    pub provisioning: Provisioning,
}

/// An inline volume's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct InlineRecord {
    pub(super) name: String,
    pub(super) target: PathBuf,
}

impl Attacher {
    /// The ID of the inline volume the kubelet calls `name`.
    pub fn inline_id(&self, name: &str) -> VolumeId {
        VolumeId::derive(name, self.pool.node())
    }

    /// The ID of the inline volume the kubelet calls `name`, if kura made one.
    pub fn inline_volume(&self, name: &str) -> Result<Option<VolumeId>> {
        let id = self.inline_id(name);
        Ok(read_meta::<InlineRecord>(&self.inline_record_path(&id))?.map(|_| id))
    }

    fn inline_record_path(&self, id: &VolumeId) -> PathBuf {
        self.ephemeral.join(format!("{id}.json"))
    }

    /// Where an inline volume is staged: a directory of kura's own.
    pub(super) fn inline_staging(&self, id: &VolumeId) -> PathBuf {
        self.ephemeral.join(id.as_str())
    }

    /// Whether `path` is where kura stages some inline volume.
    pub(super) fn is_inline_staging(&self, path: &Path) -> bool {
        path.parent() == Some(self.ephemeral.as_path())
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(VolumeId::parse)
                .is_some()
    }

    /// Creates the inline volume `spec` names, stages it in kura's own directory and
    /// publishes it at `target`. Returns its ID.
    pub fn publish_inline(
        &self,
        spec: &InlineSpec,
        target: &Path,
        capability: &Capability,
        readonly: bool,
    ) -> Result<VolumeId> {
        let id = self.inline_id(&spec.name);
        let record_path = self.inline_record_path(&id);
        let existing = read_meta::<InlineRecord>(&record_path)?;
        if let Some(existing) = &existing
            && existing.target != target
        {
            return Err(Error::Precondition(format!(
                "inline volume {} is already published at {}",
                spec.name,
                existing.target.display()
            )));
        }
        std::fs::create_dir_all(&self.ephemeral)
            .map_err(|e| sys::Error::io("mkdir", &self.ephemeral, e))?;
        let record = InlineRecord {
            name: spec.name.clone(),
            target: target.to_owned(),
        };
        // Before anything is made, so a crash from here on leaves a trace.
        write_meta(&record_path, &record)?;
        let made = self.make_inline(&id, spec, target, capability, readonly);
        if let Err(e) = made {
            if existing.is_none()
                && let Err(undo) = self.remove_inline(&id, target)
            {
                tracing::error!(volume.id = %id, error = %undo, "could not undo a failed inline publish; start-up will retry");
            }
            return Err(e);
        }
        Ok(id)
    }

    fn make_inline(
        &self,
        id: &VolumeId,
        spec: &InlineSpec,
        target: &Path,
        capability: &Capability,
        readonly: bool,
    ) -> Result<()> {
        let volume = self.pool.create_volume(&VolumeSpec {
            name: spec.name.clone(),
            range: size::Range {
                required: spec.size,
                limit: 0,
            },
            provisioning: spec.provisioning,
            source: None,
            access: [capability.access.kind()].into(),
            encryption: Encryption::Plain,
        })?;
        // A crash here leaves a volume nothing mounts: start-up removes it.
        self.pool.pause_at("inline-created");
        let staging = self.inline_staging(&volume.id);
        self.stage(id, &staging, capability, None)?;
        self.publish(id, &staging, target, capability, readonly)
    }

    /// Unpublishes, unstages and deletes the inline volume the kubelet calls `name`.
    /// `false` when kura has no inline volume of that name.
    pub fn unpublish_inline(&self, name: &str, target: &Path) -> Result<bool> {
        let id = self.inline_id(name);
        let Some(record) = read_meta::<InlineRecord>(&self.inline_record_path(&id))? else {
            return Ok(false);
        };
        if record.target != target {
            // Not where it is published: nothing of it is at this path.
            return Ok(true);
        }
        self.remove_inline(&id, target)?;
        Ok(true)
    }

    /// Takes down whatever exists of an inline volume, then its record.
    fn remove_inline(&self, id: &VolumeId, target: &Path) -> Result<()> {
        match self.pool.volume(id) {
            Ok(_) => {
                self.unpublish(id, target)?;
                self.unstage(id, &self.inline_staging(id))?;
                self.pool.delete_volume(id)?;
            }
            Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        sys::fs::remove(&self.inline_record_path(id))?;
        tracing::info!(volume.id = %id, "inline volume removed");
        Ok(())
    }

    /// Start-up: removes every inline volume whose publication is not mounted any
    /// more (a crash between create and mount, a publish that never finished, a
    /// reboot). One that cannot be removed is logged and left for the next start.
    pub fn recover_inline(&self) -> Result<()> {
        if !self.ephemeral.exists() {
            return Ok(());
        }
        for entry in std::fs::read_dir(&self.ephemeral)
            .map_err(|e| sys::Error::io("read_dir", &self.ephemeral, e))?
            .flatten()
        {
            // A record being written when the process died.
            if entry.path().extension().is_some_and(|x| x == "tmp") {
                sys::fs::remove(&entry.path())?;
            }
        }
        let table = sys::mountinfo::read()?;
        for (path, record) in list_meta::<InlineRecord>(&self.ephemeral)? {
            let Some(id) = super::id_of_meta(&path, VolumeId::parse) else {
                continue;
            };
            let record = match record {
                Ok(record) => record,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable inline volume record");
                    continue;
                }
            };
            let mounted = sys::mountinfo::find_mount(&table, &record.target).is_some()
                && self.published_at(&id, &record.target)?;
            if mounted {
                continue;
            }
            match self.remove_inline(&id, &record.target) {
                Ok(()) => {
                    tracing::info!(volume.id = %id, "removed an inline volume whose publication is gone")
                }
                Err(e) => {
                    tracing::error!(volume.id = %id, error = %e, "could not remove a stale inline volume")
                }
            }
        }
        Ok(())
    }
}
