//! What a pool can promise now, and what it could ever hold.
//!
//! # Capacity
//!
//! - **Really free** is the pool filesystem's available bytes and, for an image pool
//!   (`--pool-image`), no more than the filesystem holding the image has available:
//!   the image is sparse, so a block the pool hands out is backed on the host only
//!   when it is first written (or allocated, below).
//! - **Thick** volumes may take what is really free.
//! - **Thin** volumes share a budget: the pool's size times the overprovision ratio,
//!   less the sizes of every thin volume already promised (and thin creates in
//!   flight), as thin-pool drivers count; and never more than what is really free
//!   times the ratio (thick volumes, snapshots and written data use that up).
//!   GetCapacity and CreateVolume read the same figure.
//!
//! # Thick volumes in an image pool
//!
//! A thick volume's blocks are allocated in the pool and, through the pool's loop
//! device, in the host's image file too: [`Pool::back_on_host`] maps the volume's
//! extents to the pool device (FIEMAP) and allocates the same ranges of the image
//! (`fallocate`, keeping its size). A thick volume's writes then never need host
//! space, and a host filesystem that fills cannot fail them. When the host cannot back
//! it, the create fails (NoSpace) and leaves nothing. The pool is mounted with
//! `discard`; and a volume's own blocks (not those a snapshot shares) are punched out
//! of the image just before its file goes ([`Pool::unback_on_host`]), so a deleted
//! volume's host space comes back at once.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use super::ids::VolumeId;
use super::volume::{Provisioning, Volume};
use super::{Error, Pool, Result, id_of_meta, list_meta, size};
use crate::sys;

/// What capacity is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Facts {
    /// The pool filesystem's size and available bytes.
    pub pool_size: u64,
    pub pool_free: u64,
    /// Available bytes of the host filesystem under an image pool.
    pub host_free: Option<u64>,
    /// Sizes of the thin volumes promised, in flight included.
    pub promised_thin: u64,
}

/// `bytes` times the overprovision ratio.
fn scaled(bytes: u64, ratio: f64) -> u64 {
    (bytes as f64 * ratio) as u64
}

impl Facts {
    /// Bytes really free: in the pool, and on the host under an image pool.
    pub fn free(&self) -> u64 {
        self.host_free
            .map_or(self.pool_free, |host| host.min(self.pool_free))
    }

    /// What thin volumes may still be promised, before real free space is counted.
    pub fn thin_budget(&self, ratio: f64) -> u64 {
        scaled(self.pool_size, ratio).saturating_sub(self.promised_thin)
    }

    /// Bytes a new volume of `provisioning` may take now.
    pub fn available(&self, provisioning: Provisioning, ratio: f64) -> u64 {
        match provisioning {
            Provisioning::Thick => self.free(),
            Provisioning::Thin => self.thin_budget(ratio).min(scaled(self.free(), ratio)),
        }
    }
}

/// Thin bytes promised by creates that have not committed their volume yet.
#[derive(Debug, Default)]
pub(super) struct InFlight(Mutex<u64>);

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Room taken for a volume until it is committed (or given up): thin bytes count as
/// promised while this lives.
#[must_use]
pub(super) struct Promise<'a> {
    in_flight: &'a InFlight,
    thin: u64,
    /// What was available when the room was taken (for a NoSpace message).
    pub available: u64,
}

impl Drop for Promise<'_> {
    fn drop(&mut self) {
        let mut held = self.in_flight.lock();
        *held = held.saturating_sub(self.thin);
    }
}

/// How a [`Pool::promise`] is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    /// A new volume (or growth) of this provisioning: blocks to allocate or promise.
    New(Provisioning),
    /// A volume that holds its blocks already becomes thin: only the thin budget.
    BecomingThin,
}

impl Pool {
    /// What capacity is computed from, now.
    pub fn capacity_facts(&self) -> Result<Facts> {
        let in_flight = *self.in_flight.lock();
        self.facts(self.promised_thin()?.saturating_add(in_flight))
    }

    /// The pool's and the host's space, with `promised_thin` as given.
    fn facts(&self, promised_thin: u64) -> Result<Facts> {
        let pool = sys::fs::usage(&self.root)?;
        Ok(Facts {
            pool_size: pool.total_bytes,
            pool_free: pool.available_bytes,
            host_free: self.host_usage()?.map(|u| u.available_bytes),
            promised_thin,
        })
    }

    /// The host filesystem holding an image pool's image, if this is one.
    pub fn host_usage(&self) -> Result<Option<sys::fs::Usage>> {
        match &self.options.host_image {
            None => Ok(None),
            Some(image) => Ok(Some(sys::fs::usage(image)?)),
        }
    }

    /// The sum of the sizes of the pool's thin volumes. A volume whose metadata cannot
    /// be read counts with its image's size.
    pub fn promised_thin(&self) -> Result<u64> {
        let mut promised = 0u64;
        for (path, listed) in list_meta::<Volume>(&self.volume_dir())? {
            let bytes = match listed {
                Ok(v) if v.provisioning == Provisioning::Thin => v.size_bytes,
                Ok(_) => 0,
                Err(_) => id_of_meta(&path, VolumeId::parse)
                    .and_then(|id| std::fs::metadata(self.image_path(&id)).ok())
                    .map_or(0, |m| m.len()),
            };
            promised = promised.saturating_add(bytes);
        }
        Ok(promised)
    }

    /// Bytes a new volume of the given provisioning may take now.
    pub fn available(&self, provisioning: Provisioning) -> Result<u64> {
        let facts = match provisioning {
            Provisioning::Thin => self.capacity_facts()?,
            // Thick volumes take real space only: no need to read the promises.
            Provisioning::Thick => self.facts(0)?,
        };
        Ok(facts.available(provisioning, self.options.overprovision_ratio))
    }

    /// Takes room for `bytes` as `need` says, or answers NoSpace. Thin bytes stay
    /// promised until the returned [`Promise`] is dropped (after the volume's metadata
    /// is committed, which counts them from then on): two creates at once never
    /// promise the same bytes.
    pub(super) fn promise(&self, need: Need, bytes: u64) -> Result<Promise<'_>> {
        let mut held = self.in_flight.lock();
        let promised = match need {
            Need::New(Provisioning::Thick) => 0,
            Need::New(Provisioning::Thin) | Need::BecomingThin => {
                self.promised_thin()?.saturating_add(*held)
            }
        };
        let facts = self.facts(promised)?;
        let ratio = self.options.overprovision_ratio;
        let available = match need {
            Need::New(provisioning) => facts.available(provisioning, ratio),
            Need::BecomingThin => facts.thin_budget(ratio),
        };
        if bytes > available {
            return Err(Error::NoSpace {
                needed: bytes,
                available,
            });
        }
        let thin = match need {
            Need::New(Provisioning::Thick) => 0,
            Need::New(Provisioning::Thin) | Need::BecomingThin => bytes,
        };
        *held += thin;
        Ok(Promise {
            in_flight: &self.in_flight,
            thin,
            available,
        })
    }

    /// The largest volume of `provisioning` this pool could ever hold: its
    /// filesystem's whole size (times the overprovision ratio for thin volumes; for a
    /// thick volume in an image pool, no more than the host filesystem's size), within
    /// [`size::MAX_BYTES`], in whole MiB.
    pub fn maximum(&self, provisioning: Provisioning) -> Result<u64> {
        let total = sys::fs::usage(&self.root)?.total_bytes;
        let bytes = match provisioning {
            Provisioning::Thick => match self.host_usage()? {
                Some(host) => total.min(host.total_bytes),
                None => total,
            },
            Provisioning::Thin => scaled(total, self.options.overprovision_ratio),
        };
        Ok(bytes.min(size::MAX_BYTES) / size::MIB * size::MIB)
    }

    /// Backs every block of `image` (a file in the pool) on the host filesystem
    /// under an image pool; nothing to do for other pools. NoSpace when the host
    /// cannot hold them: the caller gives the volume up (with [`Pool::unback_on_host`]).
    pub(super) fn back_on_host(&self, image: &Path) -> Result<()> {
        let Some(host) = &self.options.host_image else {
            return Ok(());
        };
        self.pause_at("backing-on-host");
        let ranges = sys::extents::merge(
            sys::extents::map(image, 0)?
                .into_iter()
                .map(|e| e.device)
                .collect(),
        );
        let needed: u64 = ranges.iter().map(|r| r.length).sum();
        sys::extents::allocate(host, &ranges).map_err(|e| {
            if e.is_no_space() {
                let available = sys::fs::usage(host).map_or(0, |u| u.available_bytes);
                tracing::warn!(image = %image.display(), host = %host.display(), needed, available, "the host filesystem cannot back a thick volume");
                Error::NoSpace { needed, available }
            } else {
                Error::Sys(e)
            }
        })
    }

    /// Removes a volume image (or a `.partial`) for good, its host space with it.
    pub(super) fn remove_image(&self, image: &Path) -> Result<()> {
        self.unback_on_host(image, 0);
        Ok(sys::fs::remove(image)?)
    }

    /// Gives the host back the blocks under `image` from byte `from` on that `image`
    /// alone holds (not those a snapshot shares), just before the pool frees them:
    /// the file is being removed or cut, so what they read no longer matters. The
    /// pool's `discard` would give back the written ones, but only once XFS commits
    /// the free (up to 30 s later, capacity reading low meanwhile), and never the
    /// allocated but unwritten ones of a thick volume. Nothing to do for other
    /// pools. Failing costs host space, never data: it is logged, not returned.
    pub(super) fn unback_on_host(&self, image: &Path, from: u64) {
        let Some(host) = &self.options.host_image else {
            return;
        };
        let released = sys::extents::map(image, from).and_then(|extents| {
            let ranges: Vec<_> = extents
                .into_iter()
                .filter(|e| !e.shared)
                .map(|e| e.device)
                .collect();
            sys::extents::punch(host, &sys::extents::merge(ranges))
        });
        match released {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => {
                tracing::warn!(image = %image.display(), error = %e, "could not give a volume's host space back")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn facts(pool_size: u64, pool_free: u64, host_free: Option<u64>, promised: u64) -> Facts {
        Facts {
            pool_size,
            pool_free,
            host_free,
            promised_thin: promised,
        }
    }

    #[test]
    fn capacity_table() {
        use Provisioning::{Thick, Thin};
        let cases = [
            // An empty 20 GiB image pool on a host with 5 GiB free: 5 GiB, not 20.
            (
                facts(20 * GIB, 20 * GIB, Some(5 * GIB), 0),
                1.0,
                Thick,
                5 * GIB,
            ),
            (
                facts(20 * GIB, 20 * GIB, Some(5 * GIB), 0),
                1.0,
                Thin,
                5 * GIB,
            ),
            // The host has room to spare: the pool's own free space.
            (
                facts(20 * GIB, 7 * GIB, Some(50 * GIB), 0),
                1.0,
                Thick,
                7 * GIB,
            ),
            // Ratio 1: thin promises add up to the pool's size.
            (facts(10 * GIB, 10 * GIB, None, 6 * GIB), 1.0, Thin, 4 * GIB),
            (facts(10 * GIB, 10 * GIB, None, 10 * GIB), 1.0, Thin, 0),
            (facts(10 * GIB, 10 * GIB, None, 12 * GIB), 1.0, Thin, 0),
            // 1,000 volumes of 64 MiB on a 6 GiB pool at ratio 15: 90 - 62.5 GiB.
            (
                facts(6 * GIB, 6 * GIB, None, 1000 * (64 << 20)),
                15.0,
                Thin,
                90 * GIB - (1000 * (64 << 20)),
            ),
            // Thick volumes use real space: the ratio applies to what is free.
            (facts(10 * GIB, 2 * GIB, None, 0), 4.0, Thin, 8 * GIB),
            (facts(10 * GIB, 2 * GIB, None, 0), 4.0, Thick, 2 * GIB),
            // A full host stops thin volumes too.
            (facts(10 * GIB, 10 * GIB, Some(0), 0), 15.0, Thin, 0),
        ];
        for (facts, ratio, provisioning, want) in cases {
            assert_eq!(
                facts.available(provisioning, ratio),
                want,
                "{facts:?} ratio {ratio} {provisioning:?}"
            );
        }
    }

    #[test]
    fn becoming_thin_needs_only_the_budget() {
        let f = facts(10 * GIB, GIB, None, 3 * GIB);
        assert_eq!(f.thin_budget(1.0), 7 * GIB);
        assert_eq!(f.available(Provisioning::Thin, 1.0), GIB);
    }
}
