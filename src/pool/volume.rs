//! Volumes: one image file each, plus metadata.
//!
//! # Sizes
//!
//! A volume is at most [`Pool::maximum`] bytes: what the pool's filesystem holds in all
//! (times the overprovision ratio for thin volumes), and never more than
//! [`size::MAX_BYTES`]. A request above that can never be served by this pool, full or
//! empty: OUT_OF_RANGE. One within it that does not fit what the pool can promise now
//! (see [`super::capacity`]) is NoSpace (RESOURCE_EXHAUSTED).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::capacity::Need;
use super::encryption::Encryption;
use super::ids::{SnapshotId, VolumeId};
use super::listing::walk;
use super::{Condition, Error, Pool, Result, Timestamp, partial_path, read_meta, size};
use crate::sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provisioning {
    /// A sparse file: blocks are allocated as they are written.
    Thin,
    /// Every block allocated up front.
    Thick,
}

/// How a volume is exposed: the access type of its capabilities, without the details
/// (filesystem, flags) that are chosen at stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessKind {
    Block,
    Mount,
}

impl std::fmt::Display for AccessKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AccessKind::Block => "block",
            AccessKind::Mount => "mount",
        })
    }
}

fn kinds(set: &BTreeSet<AccessKind>) -> String {
    set.iter()
        .map(|k| k.to_string())
        .collect::<Vec<_>>()
        .join(" and ")
}

/// What a new volume is filled from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "id")]
pub enum ContentSource {
    Snapshot(SnapshotId),
    Volume(VolumeId),
}

impl ContentSource {
    /// The source's ID, as the CO knows it.
    pub fn id(&self) -> &str {
        match self {
            ContentSource::Snapshot(id) => id.as_str(),
            ContentSource::Volume(id) => id.as_str(),
        }
    }

    /// The node whose pool holds the source.
    pub fn node(&self) -> super::NodeToken {
        match self {
            ContentSource::Snapshot(id) => id.node(),
            ContentSource::Volume(id) => id.node(),
        }
    }
}

/// A create request in pool terms.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    pub name: String,
    pub range: size::Range,
    pub provisioning: Provisioning,
    pub source: Option<ContentSource>,
    /// The access types of the request's capabilities.
    pub access: BTreeSet<AccessKind>,
    /// Whether the volume is to be encrypted (`kura.csi.dev/encryption`). A clone or
    /// restore must ask for what its source has.
    pub encryption: Encryption,
}

/// A volume's metadata document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    pub provisioning: Provisioning,
    pub source: Option<ContentSource>,
    pub created: Timestamp,
    /// The access types the volume was created for. Empty in metadata written before
    /// kura recorded them: such a volume is taken to serve any.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub access: BTreeSet<AccessKind>,
    /// How the volume's files are encrypted; metadata written before kura encrypted
    /// volumes reads as plain.
    #[serde(default, skip_serializing_if = "Encryption::is_plain")]
    pub encryption: Encryption,
    /// Copies on other nodes, if the volume asks for any ([`super::replica`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<super::replica::Replication>,
}

impl Volume {
    /// Whether the volume was created for (or, from before kura recorded it, may serve)
    /// every access type in `wanted`.
    pub fn serves(&self, wanted: &BTreeSet<AccessKind>) -> bool {
        self.access.is_empty() || wanted.is_subset(&self.access)
    }
}

impl Pool {
    /// Makes `spec`'s volume of `size_bytes` exist over its finished `image`: writes
    /// its metadata, or removes the image if that fails, so no half volume stays.
    pub(super) fn commit_volume(
        &self,
        id: VolumeId,
        spec: &VolumeSpec,
        size_bytes: u64,
        image: &std::path::Path,
    ) -> Result<Volume> {
        let volume = Volume {
            id,
            name: spec.name.clone(),
            size_bytes,
            provisioning: spec.provisioning,
            source: spec.source.clone(),
            created: Timestamp::now(),
            access: spec.access.clone(),
            encryption: spec.encryption,
            replication: None,
        };
        if let Err(e) = self.write_volume(&volume) {
            let _ = self.remove_image(image);
            return Err(e);
        }
        Ok(volume)
    }

    /// Creates the volume `spec` names, or returns it if it already exists with
    /// compatible arguments.
    pub fn create_volume(&self, spec: &VolumeSpec) -> Result<Volume> {
        let id = VolumeId::derive(&spec.name, &self.node);
        let meta_path = self.volume_meta_path(&id);
        if let Some(existing) = read_meta::<Volume>(&meta_path)? {
            check_compatible(&existing, spec)?;
            return Ok(existing);
        }
        let source = match &spec.source {
            None => None,
            Some(source) => Some(self.resolve_source(source)?),
        };
        if let Some((_, _, encryption)) = &source {
            check_source_encryption(*encryption, spec)?;
        }
        let minimum = source.as_ref().map_or(0, |(_, bytes, _)| *bytes);
        let size_bytes =
            size::for_new_volume(spec.range, self.options.default_volume_size, minimum)
                .map_err(Error::OutOfRange)?;
        self.check_maximum(size_bytes, spec.provisioning)?;
        // Held until the metadata is committed: a thin volume's size stays promised.
        let promise = self.promise(Need::New(spec.provisioning), size_bytes)?;
        let available = promise.available;

        let image = self.image_path(&id);
        let partial = partial_path(&image);
        let thick = spec.provisioning == Provisioning::Thick;
        let built = match &source {
            None => sys::fs::create_image(&partial, size_bytes, thick),
            Some((source_image, _, _)) => {
                // A source volume in use is made consistent for the copy, as for a
                // snapshot; a snapshot image is never attached, so this is a no-op.
                let _quiesced = self.quiesce(source_image)?;
                self.clone_image(source_image, &partial)
            }
            .and_then(|()| sys::fs::grow_image(&partial, size_bytes, thick)),
        }
        .map_err(|e| no_space_or(e, size_bytes, available))
        .and_then(|()| match thick {
            true => self.back_on_host(&partial),
            false => Ok(()),
        })
        .and_then(|()| Ok(sys::fs::rename(&partial, &image)?));
        if let Err(e) = built {
            let _ = self.remove_image(&partial);
            return Err(e);
        }

        let volume = self.commit_volume(id, spec, size_bytes, &image)?;
        drop(promise);
        tracing::info!(volume.id = %volume.id, volume.size = size_bytes, "volume created");
        Ok(volume)
    }

    /// The image, size and encryption a content source provides.
    pub(super) fn resolve_source(
        &self,
        source: &ContentSource,
    ) -> Result<(std::path::PathBuf, u64, Encryption)> {
        // Another node's volume or snapshot: from a replica this node holds of it
        // (a failover), or nothing.
        if !self.is_local(&source.node()) {
            return self.replica_source(source)?.ok_or_else(|| Error::NotFound {
                kind: match source {
                    ContentSource::Volume(_) => "volume",
                    ContentSource::Snapshot(_) => "snapshot",
                },
                id: source.id().to_owned(),
            });
        }
        match source {
            ContentSource::Volume(id) => {
                let volume = self.volume(id)?;
                let image = self.image_path(id);
                self.check_copyable(id, &image)?;
                Ok((image, volume.size_bytes, volume.encryption))
            }
            ContentSource::Snapshot(id) => {
                let snapshot = self.snapshot(id)?;
                if !snapshot.ready {
                    return Err(Error::Precondition(format!(
                        "snapshot {id} is not ready to use yet"
                    )));
                }
                Ok((
                    self.snapshot_image_path(id),
                    snapshot.size_bytes,
                    snapshot.encryption,
                ))
            }
        }
    }

    /// Deletes a volume; one that does not exist counts as deleted. Snapshots of it
    /// stay valid.
    pub fn delete_volume(&self, id: &VolumeId) -> Result<()> {
        if !self.is_local(&id.node()) {
            return Ok(());
        }
        let image = self.image_path(id);
        if image.exists()
            && let Some(device) = sys::loopdev::find_by_backing(&image)?
        {
            return Err(Error::Precondition(format!(
                "volume {id} is attached at {} on this node; unstage it first",
                device.path.display()
            )));
        }
        // Metadata first: once it is gone the volume is gone, whatever happens next.
        self.remove_volume_meta(id)?;
        self.remove_image(&image)?;
        self.remove_points(id)?;
        tracing::info!(volume.id = %id, "volume deleted");
        Ok(())
    }

    /// A volume's metadata.
    pub fn volume(&self, id: &VolumeId) -> Result<Volume> {
        let not_found = || Error::NotFound {
            kind: "volume",
            id: id.to_string(),
        };
        if !self.is_local(&id.node()) {
            return Err(not_found());
        }
        read_meta(&self.volume_meta_path(id))?.ok_or_else(not_found)
    }

    /// A volume's metadata and condition. A volume whose metadata cannot be read is
    /// reported abnormal, from what its image shows.
    pub fn volume_status(&self, id: &VolumeId) -> Result<(Volume, Condition)> {
        match self.volume(id) {
            Ok(volume) => {
                let condition = self.condition(&volume);
                Ok((volume, condition))
            }
            Err(e @ (Error::Corrupt { .. } | Error::Sys(_))) if self.is_local(&id.node()) => {
                Ok(self.unreadable(id.clone(), &e))
            }
            Err(e) => Err(e),
        }
    }

    /// The first `limit` volumes of the pool at or after `from` in ID order, each with
    /// its condition; only their own metadata and images are read (see
    /// [`super::listing`]). A volume whose metadata cannot be read is listed as
    /// abnormal; the rest are served as ever.
    pub fn list_volumes(&self, from: Option<&VolumeId>, limit: usize) -> Vec<(Volume, Condition)> {
        walk(&self.volumes, from, limit, |id| {
            match read_meta::<Volume>(&self.volume_meta_path(id)) {
                Ok(None) => None,
                Ok(Some(volume)) => {
                    let condition = self.condition(&volume);
                    Some((volume, condition))
                }
                Err(e) => Some(self.unreadable(id.clone(), &e)),
            }
        })
    }

    /// What can be told of a volume whose metadata is unreadable: its ID and its
    /// image's size, and a condition saying what is wrong. Its image is kept as it is
    /// (start-up removes only images without any metadata document).
    fn unreadable(&self, id: VolumeId, error: &Error) -> (Volume, Condition) {
        let image = self.image_path(&id);
        let size_bytes = std::fs::metadata(&image).map_or(0, |m| m.len());
        tracing::error!(volume.id = %id, error = %error, "volume metadata is unreadable");
        let condition = Condition::abnormal(format!(
            "the volume's metadata is unreadable ({error}); its image {} is kept untouched: \
             restore the metadata or delete the volume",
            image.display()
        ));
        let volume = Volume {
            id,
            name: String::new(),
            size_bytes,
            provisioning: Provisioning::Thin,
            source: None,
            created: Timestamp::now(),
            access: BTreeSet::new(),
            encryption: Encryption::Plain,
            replication: None,
        };
        (volume, condition)
    }

    /// Whether a volume's image is present, whole and readable.
    pub fn condition(&self, volume: &Volume) -> Condition {
        let image = self.image_path(&volume.id);
        let len = match std::fs::metadata(&image) {
            Ok(meta) => meta.len(),
            Err(e) => return Condition::abnormal(format!("image {}: {e}", image.display())),
        };
        if len < volume.size_bytes {
            return Condition::abnormal(format!(
                "image {} holds {len} bytes, {} expected",
                image.display(),
                volume.size_bytes
            ));
        }
        match sys::fs::probe_read(&image) {
            Ok(()) => Condition::healthy(),
            Err(e) => Condition::abnormal(e.to_string()),
        }
    }

    /// Grows a volume's image to satisfy `range`. Returns the volume and whether it
    /// changed.
    pub fn expand_volume(&self, id: &VolumeId, range: size::Range) -> Result<(Volume, bool)> {
        let mut volume = self.volume(id)?;
        let Some(new_size) =
            size::for_expansion(range, volume.size_bytes).map_err(Error::OutOfRange)?
        else {
            return Ok((volume, false));
        };
        self.check_maximum(new_size, volume.provisioning)?;
        let growth = new_size - volume.size_bytes;
        let promise = self.promise(Need::New(volume.provisioning), growth)?;
        let image = self.image_path(id);
        let thick = volume.provisioning == Provisioning::Thick;
        let grown = sys::fs::grow_image(&image, new_size, thick)
            .map_err(|e| no_space_or(e, growth, promise.available))
            .and_then(|()| match thick {
                true => self.back_on_host(&image),
                false => Ok(()),
            });
        if let Err(e) = grown {
            // The volume keeps its size: a refused expansion changes nothing.
            self.unback_on_host(&image, volume.size_bytes);
            let _ = sys::fs::truncate(&image, volume.size_bytes);
            return Err(e);
        }
        volume.size_bytes = new_size;
        self.write_volume(&volume)?;
        drop(promise);
        tracing::info!(volume.id = %id, volume.size = new_size, "volume expanded");
        Ok((volume, true))
    }

    /// A size above [`Pool::maximum`] can never be served here: OUT_OF_RANGE.
    pub(super) fn check_maximum(&self, size_bytes: u64, provisioning: Provisioning) -> Result<()> {
        let maximum = self.maximum(provisioning)?;
        if size_bytes > maximum {
            return Err(Error::OutOfRange(format!(
                "capacity_range: {size_bytes} bytes is more than the {maximum} bytes any {} volume in this pool can have",
                match provisioning {
                    Provisioning::Thin => "thin",
                    Provisioning::Thick => "thick",
                }
            )));
        }
        Ok(())
    }

    /// Copies `source` to the new file `target`: a reflink where the pool can, else a
    /// sparse copy.
    pub(super) fn clone_image(
        &self,
        source: &std::path::Path,
        target: &std::path::Path,
    ) -> sys::Result<()> {
        if self.reflink {
            sys::fs::reflink(source, target)
        } else {
            sys::copy::sparse_copy(source, target, &|| self.pause_at("copying"))
        }
    }
}

/// A repeated create must ask for what exists.
pub(super) fn check_compatible(existing: &Volume, spec: &VolumeSpec) -> Result<()> {
    let size::Range { required, limit } = spec.range;
    let size = existing.size_bytes;
    if size < required || (limit > 0 && size > limit) {
        return Err(Error::Incompatible(format!(
            "volume {:?} already exists with {size} bytes, outside the requested capacity_range",
            spec.name
        )));
    }
    if existing.provisioning != spec.provisioning {
        return Err(Error::Incompatible(format!(
            "volume {:?} already exists with {:?} provisioning",
            spec.name, existing.provisioning
        )));
    }
    if existing.source != spec.source {
        return Err(Error::Incompatible(format!(
            "volume {:?} already exists with another volume_content_source",
            spec.name
        )));
    }
    if existing.encryption != spec.encryption {
        return Err(Error::Incompatible(format!(
            "volume {:?} already exists {}",
            spec.name, existing.encryption
        )));
    }
    if !existing.serves(&spec.access) {
        return Err(Error::Incompatible(format!(
            "volume {:?} already exists for {} access, not {}",
            spec.name,
            kinds(&existing.access),
            kinds(&spec.access)
        )));
    }
    Ok(())
}

/// A clone or restore holds its source's bytes, so it is encrypted exactly when its
/// source is, with the same key: a request asking otherwise is refused rather than
/// carried over, so a StorageClass without encryption (and so without the node-stage
/// Secret) never receives an encrypted copy it could not stage, and a plain copy is
/// never taken for an encrypted one.
pub(super) fn check_source_encryption(source: Encryption, spec: &VolumeSpec) -> Result<()> {
    if source == spec.encryption {
        return Ok(());
    }
    let reason = match source {
        Encryption::Fscrypt => format!(
            "the content source {} is encrypted, so its copy must be too: give \
             kura.csi.dev/encryption: fscrypt and the same node-stage Secret",
            spec.source.as_ref().map_or("", |s| s.id())
        ),
        Encryption::Plain => format!(
            "the content source {} is not encrypted, and kura cannot encrypt data in \
             place: restore it without kura.csi.dev/encryption, or copy the files into a \
             new encrypted volume",
            spec.source.as_ref().map_or("", |s| s.id())
        ),
    };
    Err(Error::Invalid {
        field: "parameters",
        reason,
    })
}

/// Turns an out-of-space failure into [`Error::NoSpace`], and a file the pool's
/// filesystem cannot make that large (EFBIG) into [`Error::OutOfRange`].
pub(super) fn no_space_or(e: sys::Error, needed: u64, available: u64) -> Error {
    if e.is_no_space() {
        Error::NoSpace { needed, available }
    } else if e.raw_os_error() == Some(libc::EFBIG) {
        Error::OutOfRange(format!(
            "capacity_range: the pool's filesystem cannot hold a file that large ({e})"
        ))
    } else {
        Error::Sys(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(access: &[AccessKind]) -> Volume {
        Volume {
            id: VolumeId::derive("n", &super::super::NodeToken::for_node("node")),
            name: "n".into(),
            size_bytes: size::MIB,
            provisioning: Provisioning::Thin,
            source: None,
            created: Timestamp::now(),
            access: access.iter().copied().collect(),
            encryption: Encryption::Plain,
            replication: None,
        }
    }

    fn spec(access: &[AccessKind]) -> VolumeSpec {
        VolumeSpec {
            name: "n".into(),
            range: size::Range::default(),
            provisioning: Provisioning::Thin,
            source: None,
            access: access.iter().copied().collect(),
            encryption: Encryption::Plain,
        }
    }

    #[test]
    fn access_type_is_part_of_compatibility() {
        use AccessKind::*;
        let cases = [
            (&[Mount][..], &[Mount][..], true),
            (&[Block], &[Block], true),
            (&[Mount], &[Block], false),
            (&[Block], &[Mount], false),
            (&[Mount], &[Mount, Block], false),
            (&[Mount, Block], &[Block], true),
            // Metadata from before the access type was recorded serves any.
            (&[], &[Block], true),
        ];
        for (created, asked, ok) in cases {
            let got = check_compatible(&volume(created), &spec(asked));
            assert_eq!(got.is_ok(), ok, "{created:?} asked {asked:?}: {got:?}");
            if let Err(e) = got {
                assert!(matches!(e, Error::Incompatible(_)), "{e:?}");
            }
        }
    }

    #[test]
    fn metadata_without_access_types_still_reads() {
        let old = r#"{"id":"vol-0123456789abcdef0123456789abcdef-node","name":"n","size_bytes":1048576,"provisioning":"thin","source":null,"created":{"seconds":1,"nanos":0}}"#;
        let volume: Volume = serde_json::from_str(old).unwrap();
        assert!(volume.access.is_empty());
        assert_eq!(volume.encryption, Encryption::Plain);
        let new = serde_json::to_string(&Volume {
            access: [AccessKind::Block].into(),
            ..volume
        })
        .unwrap();
        assert!(new.contains(r#""access":["block"]"#), "{new}");
        assert!(!new.contains("encryption"), "{new}");
        let encrypted = serde_json::to_string(&Volume {
            encryption: Encryption::Fscrypt,
            ..serde_json::from_str(&new).unwrap()
        })
        .unwrap();
        assert!(
            encrypted.contains(r#""encryption":"fscrypt""#),
            "{encrypted}"
        );
    }

    #[test]
    fn encryption_is_part_of_compatibility_and_copies_keep_it() {
        let plain = volume(&[AccessKind::Mount]);
        let mut asked = spec(&[AccessKind::Mount]);
        asked.encryption = Encryption::Fscrypt;
        assert!(matches!(
            check_compatible(&plain, &asked),
            Err(Error::Incompatible(_))
        ));
        asked.source = Some(ContentSource::Volume(plain.id.clone()));
        for (source, wanted, ok) in [
            (Encryption::Fscrypt, Encryption::Fscrypt, true),
            (Encryption::Plain, Encryption::Plain, true),
            (Encryption::Fscrypt, Encryption::Plain, false),
            (Encryption::Plain, Encryption::Fscrypt, false),
        ] {
            asked.encryption = wanted;
            let got = check_source_encryption(source, &asked);
            assert_eq!(got.is_ok(), ok, "{source:?} into {wanted:?}");
            if let Err(e) = got {
                assert!(
                    matches!(
                        &e,
                        Error::Invalid {
                            field: "parameters",
                            ..
                        }
                    ),
                    "{e:?}"
                );
                assert!(e.to_string().contains(plain.id.as_str()), "{e}");
            }
        }
    }

    #[test]
    fn a_file_too_large_is_out_of_range() {
        let efbig = sys::Error::io(
            "truncate",
            "/p",
            std::io::Error::from_raw_os_error(libc::EFBIG),
        );
        assert!(matches!(no_space_or(efbig, 1, 0), Error::OutOfRange(_)));
        let enospc = sys::Error::io(
            "truncate",
            "/p",
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(matches!(no_space_or(enospc, 1, 0), Error::NoSpace { .. }));
    }
}
