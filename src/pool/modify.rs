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
//!   against the thin capacity from now on: its size must fit what thin volumes may
//!   still be promised, or the answer is NoSpace and nothing changed.
//! - In an image pool, thin -> thick backs the image's blocks on the host as a new
//!   thick volume's are (see [`super::capacity`]).
//!
//! # Guarantees
//!
//! - Asking for what the volume has already changes nothing and succeeds.
//! - The metadata is rewritten (atomically) only after the image is allocated, so a
//!   crash in between leaves a thin volume whose blocks happen to be allocated, which a
//!   retry completes.

use super::capacity::Need;
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
        // Checked before anything is allocated: a failed fallocate may leave some of
        // the blocks it took behind, and a refusal must change nothing.
        let promise = match provisioning {
            Provisioning::Thick => {
                let allocated = sys::fs::allocated_bytes(&image)?;
                let needed = volume.size_bytes.saturating_sub(allocated);
                let promise = self.promise(Need::New(Provisioning::Thick), needed)?;
                sys::fs::grow_image(&image, volume.size_bytes, true).map_err(|e| {
                    if e.is_no_space() {
                        Error::NoSpace {
                            needed,
                            available: promise.available,
                        }
                    } else {
                        Error::Sys(e)
                    }
                })?;
                self.back_on_host(&image)?;
                promise
            }
            // Its blocks are there already; its size joins the thin promises.
            Provisioning::Thin => self.promise(Need::BecomingThin, volume.size_bytes)?,
        };
        volume.provisioning = provisioning;
        self.write_volume(&volume)?;
        drop(promise);
        tracing::info!(volume.id = %id, volume.provisioning = ?provisioning, "volume modified");
        Ok((volume, true))
    }
}
