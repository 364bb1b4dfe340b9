//! Exports: what a source node pins for one cross-node transfer.
//!
//! An export is a private reflink of a snapshot's image, or of a volume's image taken
//! while the volume is quiesced as for a snapshot (so the copy holds one moment), in
//! `exports/<export-id>.img`, with `exports/<export-id>.json` naming the transfer (the
//! destination volume's ID), the source, the destination node, the grant (a random
//! bearer secret), its expiry and the pin (new for each pinned image). The source may
//! be deleted while the export lives; the export is independent of it.
//!
//! # Guarantees
//!
//! - One export per transfer key: repeating a create returns the same export (same
//!   pin, same grant) and extends its expiry by [`GRANT_TTL`].
//! - A read needs the export's grant, before its expiry; anything else (no export,
//!   another grant, an expired one) is refused the same way, naming nothing.
//! - Expired exports are removed at start-up and whenever an export is created, and
//!   by the agent's periodic sweep.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::encryption::Encryption;
use super::volume::ContentSource;
use super::{Error, Pool, Result, Timestamp, list_meta, partial_path, read_meta, write_meta};
use crate::sys;

/// How long a grant lasts after the controller last asked for it.
pub const GRANT_TTL: Duration = Duration::from_secs(600);

/// An export's metadata document.
#[derive(Clone, Serialize, Deserialize)]
pub struct Export {
    pub id: String,
    /// The transfer it serves: the destination volume's ID.
    pub key: String,
    pub source: ContentSource,
    pub destination_node: String,
    pub grant: String,
    /// Unix seconds.
    pub expires: i64,
    pub pin: String,
    pub size_bytes: u64,
    #[serde(default, skip_serializing_if = "Encryption::is_plain")]
    pub encryption: Encryption,
}

impl std::fmt::Debug for Export {
    // The grant is a secret: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("source", &self.source)
            .field("destination_node", &self.destination_node)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// Why a read of an export is refused.
#[derive(Debug, thiserror::Error)]
#[error("no valid grant for export {0:?}: ask the controller for a transfer")]
pub struct Denied(pub String);

/// The ID of the export serving `key`: `exp-` and 32 hex digits.
pub fn export_id(key: &str) -> String {
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6b75_7261_2d65_7870_8d1e_4f2a_9b3c_0a02);
    format!(
        "exp-{}",
        uuid::Uuid::new_v5(&NAMESPACE, key.as_bytes()).simple()
    )
}

/// Whether `id` is an export ID (so it may become part of a path).
fn valid_id(id: &str) -> bool {
    id.strip_prefix("exp-").is_some_and(|hex| {
        hex.len() == 32
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Compares without stopping at the first difference, so timing tells nothing.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Pool {
    fn export_dir(&self) -> PathBuf {
        self.root.join("exports")
    }

    fn export_image_path(&self, id: &str) -> PathBuf {
        self.export_dir().join(format!("{id}.img"))
    }

    fn export_meta_path(&self, id: &str) -> PathBuf {
        self.export_dir().join(format!("{id}.json"))
    }

    /// Pins `source` for the transfer `key` to `destination_node`, or returns the
    /// export that exists (with its grant extended). The caller holds the source's
    /// lock.
    pub fn create_export(
        &self,
        key: &str,
        source: &ContentSource,
        destination_node: &str,
    ) -> Result<Export> {
        let dir = self.export_dir();
        std::fs::create_dir_all(&dir).map_err(|e| sys::Error::io("mkdir", &dir, e))?;
        self.sweep_exports()?;
        let id = export_id(key);
        let meta_path = self.export_meta_path(&id);
        let expires = Timestamp::now().seconds + GRANT_TTL.as_secs() as i64;
        if let Some(mut existing) = read_meta::<Export>(&meta_path)? {
            if existing.source != *source || existing.destination_node != destination_node {
                return Err(Error::Incompatible(format!(
                    "transfer {key} already exports another source or to another node"
                )));
            }
            existing.expires = expires;
            write_meta(&meta_path, &existing)?;
            return Ok(existing);
        }
        let (image, size_bytes, encryption) = self.resolve_source(source)?;
        let target = self.export_image_path(&id);
        let partial = partial_path(&target);
        let pinned = {
            let _quiesced = self.quiesce(&image)?;
            self.clone_image(&image, &partial)
        }
        .and_then(|()| sys::fs::rename(&partial, &target));
        if let Err(e) = pinned {
            let _ = sys::fs::remove(&partial);
            // A source deleted between the lookup and the pin is gone.
            if !image.exists() {
                return Err(Error::NotFound {
                    kind: "content source",
                    id: source.id().to_owned(),
                });
            }
            return Err(e.into());
        }
        let export = Export {
            id: id.clone(),
            key: key.to_owned(),
            source: source.clone(),
            destination_node: destination_node.to_owned(),
            grant: secret(),
            expires,
            pin: uuid::Uuid::new_v4().to_string(),
            size_bytes,
            encryption,
        };
        if let Err(e) = write_meta(&meta_path, &export) {
            let _ = sys::fs::remove(&target);
            return Err(e);
        }
        tracing::info!(export.id = %id, source = source.id(), destination = destination_node, "export pinned");
        Ok(export)
    }

    /// Releases an export; one that is gone counts as released.
    pub fn delete_export(&self, id: &str) -> Result<()> {
        if !valid_id(id) {
            return Ok(());
        }
        sys::fs::remove(&self.export_meta_path(id))?;
        sys::fs::remove(&self.export_image_path(id))?;
        tracing::info!(export.id = %id, "export released");
        Ok(())
    }

    /// The image of export `id` if `grant` is its grant and has not expired.
    pub fn granted_export(
        &self,
        id: &str,
        grant: &str,
    ) -> Result<std::result::Result<(Export, PathBuf), Denied>> {
        let denied = || Ok(Err(Denied(id.to_owned())));
        if !valid_id(id) {
            return denied();
        }
        let Some(export) = read_meta::<Export>(&self.export_meta_path(id))? else {
            return denied();
        };
        if !same_secret(&export.grant, grant) || export.expires <= Timestamp::now().seconds {
            return denied();
        }
        let image = self.export_image_path(id);
        Ok(Ok((export, image)))
    }

    /// Removes expired exports and unfinished pins.
    pub fn sweep_exports(&self) -> Result<()> {
        let dir = self.export_dir();
        if !dir.exists() {
            return Ok(());
        }
        let now = Timestamp::now().seconds;
        for (path, listed) in list_meta::<Export>(&dir)? {
            let expired = listed.as_ref().map_or(true, |e| e.expires <= now);
            if expired {
                tracing::info!(path = %path.display(), "removing an expired export");
                sys::fs::remove(&path)?;
                sys::fs::remove(&path.with_extension("img"))?;
            }
        }
        for entry in std::fs::read_dir(&dir)
            .map_err(|e| sys::Error::io("read_dir", &dir, e))?
            .flatten()
        {
            let path = entry.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let orphan = name.ends_with(".img") && !path.with_extension("json").exists();
            if name.ends_with(".partial") || name.ends_with(".tmp") || orphan {
                sys::fs::remove(&path)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_ids_are_stable_and_checked() {
        let id = export_id("vol-x");
        assert_eq!(id, export_id("vol-x"));
        assert_ne!(id, export_id("vol-y"));
        assert!(valid_id(&id));
        for bad in ["", "exp-", "exp-../../etc", "vol-0123", &format!("{id}0")] {
            assert!(!valid_id(bad), "{bad}");
        }
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }
}
