//! Changing a volume's mutable parameters (ControllerModifyVolume): its provisioning.
//!
//! # Thin and thick
//!
//! - thin -> thick allocates every block of the image (`fallocate` over the whole
//!   file; blocks already written stay as they are). The pool must hold the blocks the
//!   image does not have yet: if it cannot, the answer is NoSpace and nothing changed.
//! - thick -> thin records the volume as thin and punches nothing: blocks already
//!   allocated stay allocated (freeing them would need to know which hold data), but
//!   later growth (expansion) is no longer allocated up front, and the volume counts
//!   against the thin capacity from now on.
//!
//! # Guarantees
//!
//! - Asking for what the volume has already changes nothing and succeeds.
//! - The metadata is rewritten (atomically) only after the image is allocated, so a
//!   crash in between leaves a thin volume whose blocks happen to be allocated, which a
//!   retry completes.

use super::ids::VolumeId;
use super::volume::{Provisioning, Volume};
use super::{Error, Pool, Result};
use crate::sys;

impl Pool {
    /// Gives a volume the provisioning asked for. Returns the volume and whether it
    /// changed.
    pub fn modify_volume(
        &self,
        id: &VolumeId,
        provisioning: Provisioning,
    ) -> Result<(Volume, bool)> {
        let mut volume = self.volume(id)?;
        if volume.provisioning == provisioning {
            return Ok((volume, false));
        }
        let image = self.image_path(id);
        if provisioning == Provisioning::Thick {
            let allocated = sys::fs::allocated_bytes(&image)?;
            let needed = volume.size_bytes.saturating_sub(allocated);
            let available = self.available(Provisioning::Thick)?;
            // Checked before allocating: a failed fallocate may leave some of the
            // blocks it took behind, and a refusal must change nothing.
            if needed > available {
                return Err(Error::NoSpace { needed, available });
            }
            sys::fs::grow_image(&image, volume.size_bytes, true).map_err(|e| {
                if e.is_no_space() {
                    Error::NoSpace { needed, available }
                } else {
                    Error::Sys(e)
                }
            })?;
        }
        volume.provisioning = provisioning;
        self.write_volume(&volume)?;
        tracing::info!(volume.id = %id, volume.provisioning = ?provisioning, "volume modified");
        Ok((volume, true))
    }
}
