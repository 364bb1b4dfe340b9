//! Capacity that never lies: an image pool on a small host filesystem the test makes
//! (ext4 on a loop device under the test's directory). GetCapacity follows the host
//! as it fills; a thick volume that the host cannot back fails up front with nothing
//! left behind, and one that was made is backed (its every block written while the
//! host is full); a thin volume's write on a full host fails loudly. Thin promises add
//! up to the pool's size times the overprovision ratio, and GetCapacity and
//! CreateVolume agree, also for creates at once.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use kura::csi::proto;
use tonic::Code;

const PROVISIONING: &str = "kura.csi.dev/provisioning";

fn params(provisioning: &str) -> Vec<(&'static str, &str)> {
    vec![(PROVISIONING, provisioning)]
}

async fn capacity(driver: &Driver, provisioning: &str) -> u64 {
    driver
        .controller()
        .get_capacity(proto::GetCapacityRequest {
            parameters: [(PROVISIONING.to_owned(), provisioning.to_owned())].into(),
            ..Default::default()
        })
        .await
        .expect("GetCapacity")
        .into_inner()
        .available_capacity as u64
}

async fn create(
    driver: &Driver,
    name: &str,
    size: u64,
    provisioning: &str,
) -> Result<proto::Volume, tonic::Status> {
    let mut request = create_request(name, size as i64, &params(provisioning), None);
    // Staged as raw block, so a test writes every byte of the volume itself.
    request.volume_capabilities = vec![block_cap()];
    driver
        .controller()
        .create_volume(request)
        .await
        .map(|r| r.into_inner().volume.expect("volume"))
}

/// Bytes available on the filesystem holding `path`.
fn free(path: &Path) -> u64 {
    kura::sys::fs::usage(path).unwrap().available_bytes
}

/// What the pool's volume directory holds: no file at all once a refused create is
/// undone (no image, no `.partial`, no metadata).
fn volume_files(driver: &Driver) -> Vec<PathBuf> {
    std::fs::read_dir(driver.pool_root().join("volumes"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// Allocates a file of `bytes` on the host (`fallocate`): the host fills as other
/// workloads on the node would fill it.
fn fill(host: &Path, name: &str, bytes: u64) -> PathBuf {
    let path = host.join(name);
    kura::sys::fs::create_image(&path, bytes, true).expect("fill the host");
    path
}

/// Fills the host to its last allocatable block.
fn fill_up(host: &Path, name: &str) {
    let mut chunk = free(host);
    let mut n = 0;
    while chunk >= 4096 {
        match kura::sys::fs::create_image(&host.join(format!("{name}-{n}")), chunk, true) {
            Ok(()) => n += 1,
            Err(e) if e.is_no_space() => {
                let _ = std::fs::remove_file(host.join(format!("{name}-{n}")));
                chunk /= 2;
            }
            Err(e) => panic!("filling the host: {e}"),
        }
    }
    assert!(free(host) < MIB as u64, "{} bytes still free", free(host));
}

/// Waits until the host has at least `bytes` available again: at once, give or take
/// the host filesystem's own bookkeeping (a deleted volume's blocks are punched out
/// of the pool's image as it goes, not left for the pool's discard 30 s later).
async fn host_recovers(host: &Path, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while free(host) < bytes {
        assert!(
            Instant::now() < deadline,
            "the host has {} bytes available, {bytes} expected",
            free(host)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_pool_promises_only_what_its_host_can_back() {
    const SLACK: u64 = 32 << 20;
    let driver = Driver::start_with(
        PoolKind::OnHost {
            host_bytes: GIB as u64,
            pool_size: "4Gi",
        },
        &[],
    )
    .await;
    let host = host_dir(&driver.dir);

    // A 4 GiB sparse pool on a 1 GiB host: what the host can back, not the pool's
    // free space.
    let thick = capacity(&driver, "thick").await;
    let thin = capacity(&driver, "thin").await;
    let host_free = free(&host);
    assert!(
        thick <= host_free && thick + SLACK > host_free,
        "{thick} of {host_free}"
    );
    assert!(
        thin <= host_free,
        "thin {thin}: ratio 1 bounds it by what is free"
    );

    // The host fills: GetCapacity shrinks with it.
    let filler = fill(&host, "filler", 256 << 20);
    let after = capacity(&driver, "thick").await;
    assert!(
        after + (256 << 20) <= thick + SLACK && after < thick,
        "{after} after 256 MiB taken from {thick}"
    );

    // A thick volume the host cannot back: RESOURCE_EXHAUSTED up front, nothing made.
    let before = free(&host);
    let refused = create(&driver, "too-thick", after + (64 << 20), "thick")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        volume_files(&driver).is_empty(),
        "{:?}",
        volume_files(&driver)
    );
    assert!(free(&host) + SLACK >= before, "the host lost space");

    // The host fills while a thick create runs (after the check, before the volume
    // is backed): the create still fails as a whole, and the host gets its space back.
    let armed = driver.pause.arm("backing-on-host");
    let racing = {
        let mut controller = driver.controller();
        let request = create_request("racing", 300 << 20, &params("thick"), None);
        tokio::spawn(async move { controller.create_volume(request).await })
    };
    armed.held(|| racing.is_finished()).await;
    let squeeze = fill(&host, "squeeze", free(&host).saturating_sub(100 << 20));
    armed.release();
    let raced = racing.await.unwrap().unwrap_err();
    assert_eq!(raced.code(), Code::ResourceExhausted, "{raced:?}");
    assert!(
        volume_files(&driver).is_empty(),
        "{:?}",
        volume_files(&driver)
    );
    std::fs::remove_file(&squeeze).unwrap();
    std::fs::remove_file(&filler).unwrap();
    host_recovers(&host, host_free - SLACK).await;

    // A thick volume that was made is backed on the host: with the host full, every
    // block of it is still written.
    let thick_volume = create(&driver, "thick", 128 << 20, "thick").await.unwrap();
    let thin_volume = create(&driver, "thin", 128 << 20, "thin").await.unwrap();
    let cap = block_cap();
    let (_, thick_device) = driver
        .stage_and_publish(&thick_volume.volume_id, &cap, "thick")
        .await;
    let (_, thin_device) = driver
        .stage_and_publish(&thin_volume.volume_id, &cap, "thin")
        .await;
    // What the thin volume's application wrote and synced before the host filled.
    let synced = pattern(3, MIB as usize);
    write_at(&thin_device, 0, &synced);
    fill_up(&host, "full");
    assert_eq!(capacity(&driver, "thick").await, 0);
    assert_eq!(capacity(&driver, "thin").await, 0);
    let none = create(&driver, "nothing-left", MIB as u64, "thin")
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::ResourceExhausted, "{none:?}");
    let data = pattern(7, 128 << 20);
    write_at(&thick_device, 0, &data);
    assert_eq!(read_at(&thick_device, 0, data.len()), data);

    // A thin volume's new blocks need host space: the write fails, and says so
    // (ENOSPC or EIO at the write or at fsync), never silently; what was synced
    // before stays as it was.
    let rest = &data[..data.len() - synced.len()];
    let write_rest = || {
        use std::io::{Seek, Write};
        let mut device = std::fs::OpenOptions::new()
            .write(true)
            .open(&thin_device)
            .unwrap();
        device.seek(std::io::SeekFrom::Start(MIB as u64)).unwrap();
        device.write_all(rest).and_then(|()| device.sync_all())
    };
    let error = write_rest().expect_err("a thin volume's write on a full host fails");
    eprintln!("a thin volume's write on a full host: {error}");
    assert_eq!(read_at(&thin_device, 0, synced.len()), synced);

    // Space back on the host: the same write succeeds, and the pool serves as before.
    for n in 0.. {
        if std::fs::remove_file(host.join(format!("full-{n}"))).is_err() {
            break;
        }
    }
    write_rest().expect("the write succeeds once the host has room");
    assert_eq!(read_at(&thin_device, MIB as u64, rest.len()), rest);
    for (volume, tag) in [(&thick_volume, "thick"), (&thin_volume, "thin")] {
        driver
            .unpublish_and_unstage(
                &volume.volume_id,
                &driver.path(&format!("stage-{tag}")),
                &driver.path(&format!("target-{tag}")),
            )
            .await;
        driver
            .delete_volume(&volume.volume_id)
            .await
            .expect("DeleteVolume");
    }
    assert!(
        volume_files(&driver).is_empty(),
        "{:?}",
        volume_files(&driver)
    );
    host_recovers(&host, host_free - SLACK).await;
    assert!(capacity(&driver, "thick").await + SLACK > host_free);
}

#[tokio::test(flavor = "multi_thread")]
async fn thin_promises_add_up_to_the_pool_size_times_the_ratio() {
    // A host with room to spare: only the pool and its promises count.
    let driver = Driver::start_with(
        PoolKind::OnHost {
            host_bytes: 4 * GIB as u64,
            pool_size: "1Gi",
        },
        &["--overprovision-ratio", "2"],
    )
    .await;
    let pool_size = kura::sys::fs::usage(&driver.pool_root())
        .unwrap()
        .total_bytes;
    let budget = 2 * pool_size;
    let first = create(&driver, "first", 512 << 20, "thin").await.unwrap();
    assert_eq!(capacity(&driver, "thin").await, budget - (512 << 20));

    // Exactly what GetCapacity says fits; then not one MiB more.
    let rest = capacity(&driver, "thin").await / MIB as u64 * MIB as u64;
    let second = create(&driver, "second", rest, "thin").await.unwrap();
    let left = capacity(&driver, "thin").await;
    assert!(left < MIB as u64, "{left} left");
    let refused = create(&driver, "third", MIB as u64, "thin")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // Expanding a thin volume promises more too.
    let grow = driver
        .controller()
        .controller_expand_volume(proto::ControllerExpandVolumeRequest {
            volume_id: first.volume_id.clone(),
            capacity_range: Some(proto::CapacityRange {
                required_bytes: (512 << 20) + MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(grow.code(), Code::ResourceExhausted, "{grow:?}");

    // Creates at once never promise the same bytes: of eight quarter-sized ones,
    // exactly four fit.
    driver
        .delete_volume(&second.volume_id)
        .await
        .expect("DeleteVolume");
    let quarter = capacity(&driver, "thin").await / 4 / MIB as u64 * MIB as u64;
    let creates = (0..8).map(|i| {
        let mut controller = driver.controller();
        let request = create_request(&format!("at-once-{i}"), quarter as i64, &[], None);
        tokio::spawn(async move { controller.create_volume(request).await })
    });
    let answers = futures_util::future::join_all(creates).await;
    let made: Vec<_> = answers
        .into_iter()
        .map(|a| a.unwrap())
        .filter_map(|a| match a {
            Ok(r) => Some(r.into_inner().volume.unwrap().volume_id),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                None
            }
        })
        .collect();
    assert_eq!(made.len(), 4, "{made:?}");
    for id in made.iter().chain([&first.volume_id]) {
        driver.delete_volume(id).await.expect("DeleteVolume");
    }
    // Every promise is released with its volume: what is left is the budget, or the
    // real free space times the ratio where the pool's own metadata takes some.
    let released = capacity(&driver, "thin").await;
    let pool_free = kura::sys::fs::usage(&driver.pool_root())
        .unwrap()
        .available_bytes;
    // (The pool's free space moves by a few blocks as it settles in the background.)
    let expected = budget.min(2 * pool_free);
    assert!(
        released.abs_diff(expected) < MIB as u64,
        "{released}, {expected} expected"
    );
}
