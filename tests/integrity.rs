//! Data integrity across snapshots, restores, clones and expansion, over the real socket
//! with real loop devices, filesystems, reflinks and freezes: what a pod wrote is what a
//! restore or clone shows, and nothing written afterwards leaks in either direction.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use kura::csi::proto;
use tonic::Code;

const PROVISIONING: &str = "kura.csi.dev/provisioning";

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

fn snapshot_request(name: &str, source: &str) -> proto::CreateSnapshotRequest {
    proto::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    }
}

async fn create_snapshot(driver: &Driver, name: &str, source: &str) -> proto::Snapshot {
    driver
        .controller()
        .create_snapshot(snapshot_request(name, source))
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .expect("snapshot in response")
}

/// Creates a volume of `size` filled from `source`.
async fn create_from(
    driver: &Driver,
    name: &str,
    size: i64,
    params: &[(&str, &str)],
    source: proto::VolumeContentSource,
) -> proto::Volume {
    let volume = driver
        .controller()
        .create_volume(create_request(name, size, params, Some(source.clone())))
        .await
        .expect("CreateVolume from a content source")
        .into_inner()
        .volume
        .expect("volume in response");
    assert_eq!(volume.capacity_bytes, size);
    assert_eq!(
        volume.content_source,
        Some(source),
        "the response names the content source"
    );
    volume
}

async fn delete_snapshot(driver: &Driver, id: &str) -> Result<(), tonic::Status> {
    driver
        .controller()
        .delete_snapshot(proto::DeleteSnapshotRequest {
            snapshot_id: id.into(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// Creates (or truncates) a file, writes `data` and makes it durable.
fn write_file(path: &Path, data: &[u8]) {
    let file = std::fs::File::create(path).expect("create file");
    file.write_all_at(data, 0).expect("write");
    file.sync_all().expect("fsync");
}

/// Writes a file and leaves it in the page cache: only a freeze (or a sync) puts it on
/// the volume.
fn write_unsynced(path: &Path, data: &[u8]) {
    std::fs::write(path, data).expect("write without fsync");
}

/// Writes a file and fsyncs it within `deadline`: a frozen filesystem would block it.
async fn write_promptly(path: &Path, data: Vec<u8>, deadline: Duration) {
    let path = path.to_owned();
    let shown = path.display().to_string();
    let write = tokio::task::spawn_blocking(move || write_file(&path, &data));
    match tokio::time::timeout(deadline, write).await {
        Ok(joined) => joined.expect("write task"),
        Err(_) => panic!("writing {shown} blocked for {deadline:?}: the filesystem stayed frozen"),
    }
}

/// Total bytes of the filesystem mounted at `path`, from statvfs.
fn fs_total(path: &Path) -> u64 {
    kura::sys::fs::usage(path).expect("statvfs").total_bytes
}

/// Total bytes NodeGetVolumeStats reports for a volume at `path`.
async fn stats_total(driver: &Driver, volume_id: &str, path: &Path) -> i64 {
    let stats = driver
        .node()
        .node_get_volume_stats(proto::NodeGetVolumeStatsRequest {
            volume_id: volume_id.into(),
            volume_path: path.display().to_string(),
            ..Default::default()
        })
        .await
        .expect("NodeGetVolumeStats")
        .into_inner();
    stats.usage.first().expect("usage reported").total
}

fn expand_request(
    volume_id: &str,
    required: i64,
    limit: i64,
) -> proto::ControllerExpandVolumeRequest {
    proto::ControllerExpandVolumeRequest {
        volume_id: volume_id.into(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        ..Default::default()
    }
}

fn node_expand_request(
    volume_id: &str,
    target: &Path,
    staging: &Path,
    required: i64,
    cap: &proto::VolumeCapability,
) -> proto::NodeExpandVolumeRequest {
    proto::NodeExpandVolumeRequest {
        volume_id: volume_id.into(),
        volume_path: target.display().to_string(),
        staging_target_path: staging.display().to_string(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    }
}

/// Offsets a block test writes at: the first sector, an unaligned spot, the middle and
/// the last MiB of a 512 MiB volume.
const BLOCK_OFFSETS: [u64; 4] = [0, 12_345_678, 256 << 20, (511 << 20) + 4096];
const CHUNK: usize = 256 << 10;

fn write_blocks(device: &Path, seed: u8) {
    for (i, offset) in BLOCK_OFFSETS.iter().enumerate() {
        write_at(device, *offset, &pattern(seed.wrapping_add(i as u8), CHUNK));
    }
}

fn assert_blocks(device: &Path, seed: u8, what: &str) {
    for (i, offset) in BLOCK_OFFSETS.iter().enumerate() {
        assert!(
            read_at(device, *offset, CHUNK) == pattern(seed.wrapping_add(i as u8), CHUNK),
            "{what}: data at offset {offset} differs from pattern {seed}"
        );
    }
}

/// Whether this process may grow a mounted ext4 filesystem (EXT4_IOC_RESIZE_FS needs
/// CAP_SYS_RESOURCE).
fn can_grow_ext4_online() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .expect("CapEff in /proc/self/status");
    effective & (1 << CAP_SYS_RESOURCE) != 0
}

fn is_block(cap: &proto::VolumeCapability) -> bool {
    matches!(
        cap.access_type,
        Some(proto::volume_capability::AccessType::Block(_))
    )
}

// ---------------------------------------------------------------------------------
// a) A snapshot of a mounted filesystem, restored larger
// ---------------------------------------------------------------------------------

async fn snapshot_mounted_and_restore_larger(fs: &str) {
    let driver = Driver::start().await;
    let cap = mount_cap(fs);
    let source = driver
        .create_volume(&format!("pvc-{fs}-src"), 512 * MIB, &[])
        .await;
    let (staging, target) = driver
        .stage_and_publish(&source.volume_id, &cap, "src")
        .await;
    let old_total = fs_total(&target);

    let before = pattern(1, 4 << 20);
    write_file(&target.join("data"), &before);
    // Still in the page cache when the snapshot is requested: only the freeze kura
    // does around the clone puts it into the image.
    let cached = pattern(9, 1 << 20);
    write_unsynced(&target.join("cached"), &cached);

    let snapshot = create_snapshot(&driver, &format!("snap-{fs}"), &source.volume_id).await;
    assert!(snapshot.ready_to_use, "a reflink snapshot is ready at once");
    assert_eq!(snapshot.source_volume_id, source.volume_id);
    assert_eq!(snapshot.size_bytes, 512 * MIB);

    // Thawed afterwards: a write and fsync go through at once.
    write_promptly(
        &target.join("after"),
        pattern(3, 1 << 20),
        Duration::from_secs(5),
    )
    .await;
    let after = pattern(2, 4 << 20);
    write_file(&target.join("data"), &after);

    let restored = create_from(
        &driver,
        &format!("pvc-{fs}-restored"),
        768 * MIB,
        &[],
        snapshot_source(&snapshot.snapshot_id),
    )
    .await;
    let (_, restored_target) = driver
        .stage_and_publish(&restored.volume_id, &cap, "restored")
        .await;

    assert!(
        std::fs::read(restored_target.join("data")).unwrap() == before,
        "the restored file holds the data of snapshot time"
    );
    assert!(
        std::fs::read(restored_target.join("cached")).unwrap() == cached,
        "data still cached at snapshot time is in the snapshot (the filesystem was frozen)"
    );
    assert!(
        !restored_target.join("after").exists(),
        "a file written after the snapshot is not in it"
    );
    let new_total = fs_total(&restored_target);
    assert!(
        new_total > old_total + 200 * MIB as u64,
        "the restored {fs} filesystem fills its 768 MiB volume: {new_total} bytes, source had {old_total}"
    );
    assert_eq!(
        stats_total(&driver, &restored.volume_id, &restored_target).await,
        new_total as i64
    );

    // The source kept its own writes, and it still mounts now that it shares extents
    // with its snapshot.
    assert!(std::fs::read(target.join("data")).unwrap() == after);
    driver
        .unpublish_and_unstage(&source.volume_id, &staging, &target)
        .await;
    let (_, target) = driver
        .stage_and_publish(&source.volume_id, &cap, "src-again")
        .await;
    assert!(std::fs::read(target.join("data")).unwrap() == after);
}

#[tokio::test(flavor = "multi_thread")]
async fn ext4_snapshot_of_mounted_volume_restores_larger() {
    snapshot_mounted_and_restore_larger("ext4").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn xfs_snapshot_of_mounted_volume_restores_larger() {
    snapshot_mounted_and_restore_larger("xfs").await;
}

/// A small ext4 volume gets 1 KiB blocks from mkfs; it must mount on its loop device
/// whatever the image's sharing state, before and after a snapshot, and restored.
#[tokio::test(flavor = "multi_thread")]
async fn small_ext4_volume_mounts_after_a_snapshot() {
    let driver = Driver::start().await;
    let cap = mount_cap("ext4");
    let source = driver.create_volume("pvc-small", 64 * MIB, &[]).await;
    let id = source.volume_id;
    let (staging, target) = driver.stage_and_publish(&id, &cap, "src").await;
    let data = pattern(7, 1 << 20);
    write_file(&target.join("data"), &data);
    let snapshot = create_snapshot(&driver, "snap-small", &id).await;
    driver.unpublish_and_unstage(&id, &staging, &target).await;
    let (_, target) = driver.stage_and_publish(&id, &cap, "src-again").await;
    assert!(std::fs::read(target.join("data")).unwrap() == data);
    let restored = create_from(
        &driver,
        "pvc-small-restored",
        64 * MIB,
        &[],
        snapshot_source(&snapshot.snapshot_id),
    )
    .await;
    let (_, restored_target) = driver
        .stage_and_publish(&restored.volume_id, &cap, "restored")
        .await;
    assert!(std::fs::read(restored_target.join("data")).unwrap() == data);
}

// ---------------------------------------------------------------------------------
// b) and d) Clones are independent of their source, both ways
// ---------------------------------------------------------------------------------

async fn clone_independence(cap: proto::VolumeCapability, tag: &str) {
    let driver = Driver::start().await;
    let source = driver
        .create_volume(&format!("pvc-{tag}-src"), 512 * MIB, &[])
        .await;
    let (_, source_target) = driver
        .stage_and_publish(&source.volume_id, &cap, "src")
        .await;
    let block = is_block(&cap);
    let source_file = if block {
        source_target.clone()
    } else {
        source_target.join("data")
    };
    if block {
        write_blocks(&source_file, 10);
    } else {
        write_file(&source_file, &pattern(10, 4 << 20));
        // Not yet on the volume when the clone is requested.
        write_unsynced(&source_target.join("cached"), &pattern(11, 1 << 20));
    }

    // Cloned while the source is in use, as a PVC clone of a running pod's volume is.
    let clone = create_from(
        &driver,
        &format!("pvc-{tag}-clone"),
        512 * MIB,
        &[],
        volume_source(&source.volume_id),
    )
    .await;
    let (_, clone_target) = driver
        .stage_and_publish(&clone.volume_id, &cap, "clone")
        .await;
    let clone_file = if block {
        clone_target.clone()
    } else {
        clone_target.join("data")
    };

    if block {
        assert_blocks(&clone_file, 10, "clone right after cloning");
        write_blocks(&clone_file, 20);
        assert_blocks(&source_file, 10, "source after writes to the clone");
        write_blocks(&source_file, 30);
        assert_blocks(&clone_file, 20, "clone after writes to the source");
        assert_blocks(&source_file, 30, "source after its own writes");
    } else {
        assert!(std::fs::read(&clone_file).unwrap() == pattern(10, 4 << 20));
        assert!(
            std::fs::read(clone_target.join("cached")).unwrap() == pattern(11, 1 << 20),
            "data still cached in the source when it was cloned is in the clone"
        );
        write_file(&clone_file, &pattern(20, 4 << 20));
        write_file(&clone_target.join("clone-only"), b"clone");
        assert!(
            std::fs::read(&source_file).unwrap() == pattern(10, 4 << 20),
            "a write to the clone does not reach the source"
        );
        assert!(!source_target.join("clone-only").exists());
        write_file(&source_file, &pattern(30, 4 << 20));
        assert!(
            std::fs::read(&clone_file).unwrap() == pattern(20, 4 << 20),
            "a write to the source does not reach the clone"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn xfs_clone_is_independent_of_its_source() {
    clone_independence(mount_cap("xfs"), "xfs").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ext4_clone_is_independent_of_its_source() {
    clone_independence(mount_cap("ext4"), "ext4").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn block_clone_is_independent_of_its_source() {
    clone_independence(block_cap(), "block").await;
}

// ---------------------------------------------------------------------------------
// c) A snapshot outlives its source volume
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_survives_deletion_of_its_source() {
    let driver = Driver::start().await;
    let cap = mount_cap("ext4");
    let source = driver.create_volume("pvc-doomed", 512 * MIB, &[]).await;
    let (staging, target) = driver
        .stage_and_publish(&source.volume_id, &cap, "src")
        .await;
    let data = pattern(5, 8 << 20);
    write_file(&target.join("data"), &data);
    let snapshot = create_snapshot(&driver, "snap-orphan", &source.volume_id).await;
    driver
        .unpublish_and_unstage(&source.volume_id, &staging, &target)
        .await;

    // Deleting a volume that has snapshots is allowed, and the snapshot stays.
    driver.delete_volume(&source.volume_id).await;
    let gone = driver
        .controller()
        .controller_get_volume(proto::ControllerGetVolumeRequest {
            volume_id: source.volume_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert!(
        !driver
            .pool_root()
            .join(format!("volumes/{}.img", source.volume_id))
            .exists()
    );
    let kept = driver
        .controller()
        .get_snapshot(proto::GetSnapshotRequest {
            snapshot_id: snapshot.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("GetSnapshot after the source is gone")
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(kept, snapshot);

    let restored = create_from(
        &driver,
        "pvc-from-orphan",
        512 * MIB,
        &[],
        snapshot_source(&snapshot.snapshot_id),
    )
    .await;
    let (_, restored_target) = driver
        .stage_and_publish(&restored.volume_id, &cap, "restored")
        .await;
    assert!(std::fs::read(restored_target.join("data")).unwrap() == data);

    // And the snapshot can go while its restore lives on.
    delete_snapshot(&driver, &snapshot.snapshot_id)
        .await
        .unwrap();
    assert!(std::fs::read(restored_target.join("data")).unwrap() == data);
}

// ---------------------------------------------------------------------------------
// d) Raw block: snapshot, overwrite, restore
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn block_snapshot_restores_the_data_of_snapshot_time() {
    let driver = Driver::start().await;
    let cap = block_cap();
    let source = driver.create_volume("pvc-block-src", 512 * MIB, &[]).await;
    let (_, device) = driver
        .stage_and_publish(&source.volume_id, &cap, "src")
        .await;
    write_blocks(&device, 40);

    let snapshot = create_snapshot(&driver, "snap-block", &source.volume_id).await;
    assert!(snapshot.ready_to_use);
    write_blocks(&device, 50);

    let restored = create_from(
        &driver,
        "pvc-block-restored",
        768 * MIB,
        &[],
        snapshot_source(&snapshot.snapshot_id),
    )
    .await;
    let (_, restored_device) = driver
        .stage_and_publish(&restored.volume_id, &cap, "restored")
        .await;
    assert_eq!(
        kura::sys::blockdev::size(&restored_device).unwrap(),
        768 * MIB as u64,
        "the restored device has the requested size"
    );
    assert_blocks(&restored_device, 40, "restored volume");
    assert!(
        read_at(&restored_device, 700 << 20, 4096) == vec![0; 4096],
        "the grown part of a restore reads as zeroes"
    );
    assert_blocks(&device, 50, "source after the overwrite");
}

// ---------------------------------------------------------------------------------
// e) Expansion
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn xfs_volume_grows_online() {
    let driver = Driver::start().await;
    let cap = mount_cap("xfs");
    let volume = driver.create_volume("pvc-grow-xfs", 512 * MIB, &[]).await;
    let id = volume.volume_id;
    let (staging, target) = driver.stage_and_publish(&id, &cap, "grow").await;
    let data = pattern(60, 4 << 20);
    write_file(&target.join("data"), &data);
    let old_total = fs_total(&target);

    let expanded = driver
        .controller()
        .controller_expand_volume(expand_request(&id, GIB, 0))
        .await
        .expect("ControllerExpandVolume")
        .into_inner();
    assert_eq!(expanded.capacity_bytes, GIB);
    assert!(expanded.node_expansion_required);

    for _ in 0..2 {
        let node = driver
            .node()
            .node_expand_volume(node_expand_request(&id, &target, &staging, GIB, &cap))
            .await
            .expect("NodeExpandVolume on a mounted xfs volume")
            .into_inner();
        assert_eq!(node.capacity_bytes, GIB);
    }
    let new_total = fs_total(&target);
    assert!(
        new_total > old_total + 400 * MIB as u64,
        "xfs grew while mounted: {old_total} -> {new_total}"
    );
    assert_eq!(stats_total(&driver, &id, &target).await, new_total as i64);
    assert!(std::fs::read(target.join("data")).unwrap() == data);
    write_file(&target.join("more"), &pattern(61, 600 << 20));
}

#[tokio::test(flavor = "multi_thread")]
async fn block_volume_grows_online() {
    let driver = Driver::start().await;
    let cap = block_cap();
    let volume = driver.create_volume("pvc-grow-block", 512 * MIB, &[]).await;
    let id = volume.volume_id;
    let (staging, device) = driver.stage_and_publish(&id, &cap, "grow").await;
    write_blocks(&device, 70);

    let expanded = driver
        .controller()
        .controller_expand_volume(expand_request(&id, GIB, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expanded.capacity_bytes, GIB);
    assert!(
        expanded.node_expansion_required,
        "the loop device must re-read its size on the node"
    );
    let node = driver
        .node()
        .node_expand_volume(node_expand_request(&id, &device, &staging, GIB, &cap))
        .await
        .expect("NodeExpandVolume on a block volume")
        .into_inner();
    assert_eq!(node.capacity_bytes, GIB);
    assert_eq!(kura::sys::blockdev::size(&device).unwrap(), GIB as u64);
    assert_eq!(stats_total(&driver, &id, &device).await, GIB);
    assert_blocks(&device, 70, "block volume after growing");
    let tail = pattern(71, CHUNK);
    write_at(&device, (GIB as u64) - CHUNK as u64, &tail);
    assert!(read_at(&device, (GIB as u64) - CHUNK as u64, CHUNK) == tail);
}

#[tokio::test(flavor = "multi_thread")]
async fn ext4_volume_grows_online_or_at_next_stage() {
    let driver = Driver::start().await;
    let cap = mount_cap("ext4");
    let volume = driver.create_volume("pvc-grow-ext4", 512 * MIB, &[]).await;
    let id = volume.volume_id;
    let (staging, target) = driver.stage_and_publish(&id, &cap, "grow").await;
    let data = pattern(80, 4 << 20);
    write_file(&target.join("data"), &data);
    let old_total = fs_total(&target);

    let expanded = driver
        .controller()
        .controller_expand_volume(expand_request(&id, GIB, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expanded.capacity_bytes, GIB);
    assert!(expanded.node_expansion_required);

    let online = driver
        .node()
        .node_expand_volume(node_expand_request(&id, &target, &staging, GIB, &cap))
        .await;
    let target = if can_grow_ext4_online() {
        online.expect("NodeExpandVolume grows a mounted ext4 filesystem");
        target
    } else {
        // Without CAP_SYS_RESOURCE the kernel refuses to grow a mounted ext4.
        let refused = online.expect_err("the kernel refuses to grow a mounted ext4 here");
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(
            refused
                .message()
                .contains("grown when the volume is next staged"),
            "the message says what happens next: {}",
            refused.message()
        );
        assert_eq!(
            fs_total(&target),
            old_total,
            "nothing changed in the mounted filesystem"
        );
        driver.unpublish_and_unstage(&id, &staging, &target).await;
        let (_, target) = driver.stage_and_publish(&id, &cap, "regrow").await;
        target
    };
    let new_total = fs_total(&target);
    assert!(
        new_total > old_total + 400 * MIB as u64,
        "ext4 fills the grown volume: {old_total} -> {new_total}"
    );
    assert!(std::fs::read(target.join("data")).unwrap() == data);
}

#[tokio::test(flavor = "multi_thread")]
async fn expansion_never_shrinks_and_repeats_cleanly() {
    let driver = Driver::start().await;
    let volume = driver.create_volume("pvc-range", 512 * MIB, &[]).await;
    let id = volume.volume_id;
    let mut controller = driver.controller();

    let below = controller
        .controller_expand_volume(expand_request(&id, 256 * MIB, 256 * MIB))
        .await
        .unwrap_err();
    assert_eq!(below.code(), Code::OutOfRange, "{below:?}");

    for _ in 0..2 {
        let grown = controller
            .controller_expand_volume(expand_request(&id, 640 * MIB, 0))
            .await
            .expect("ControllerExpandVolume, repeated")
            .into_inner();
        assert_eq!(grown.capacity_bytes, 640 * MIB);
    }
    // Asking for less than the volume has is satisfied by what it has.
    let smaller = controller
        .controller_expand_volume(expand_request(&id, 600 * MIB, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(smaller.capacity_bytes, 640 * MIB);
    let shrink = controller
        .controller_expand_volume(expand_request(&id, 512 * MIB, 600 * MIB))
        .await
        .unwrap_err();
    assert_eq!(shrink.code(), Code::OutOfRange, "{shrink:?}");
    let image = driver.pool_root().join(format!("volumes/{id}.img"));
    assert_eq!(std::fs::metadata(image).unwrap().len(), 640 * MIB as u64);

    let unknown = controller
        .controller_expand_volume(expand_request(&unknown_volume_id(), GIB, 0))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

// ---------------------------------------------------------------------------------
// f) The snapshot RPCs' contract
// ---------------------------------------------------------------------------------

/// A well-formed volume ID of this node that names no volume.
/// The ID a CreateVolume named `name` gets on the test node.
fn derived_clone_id(name: &str) -> String {
    kura::pool::VolumeId::derive(name, &kura::pool::NodeToken::for_node(NODE_ID)).to_string()
}

fn unknown_volume_id() -> String {
    kura::pool::VolumeId::derive("never-created", &kura::pool::NodeToken::for_node(NODE_ID))
        .to_string()
}

async fn list_snapshots(
    driver: &Driver,
    request: proto::ListSnapshotsRequest,
) -> Result<proto::ListSnapshotsResponse, tonic::Status> {
    driver
        .controller()
        .list_snapshots(request)
        .await
        .map(|r| r.into_inner())
}

fn ids(response: &proto::ListSnapshotsResponse) -> Vec<String> {
    response
        .entries
        .iter()
        .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_rpcs_follow_the_contract() {
    let driver = Driver::start().await;
    let a = driver
        .create_volume("pvc-a", 512 * MIB, &[])
        .await
        .volume_id;
    let b = driver
        .create_volume("pvc-b", 512 * MIB, &[])
        .await
        .volume_id;
    let mut controller = driver.controller();

    // Idempotent by name and source.
    let first = create_snapshot(&driver, "snap-1", &a).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let again = create_snapshot(&driver, "snap-1", &a).await;
    assert_eq!(first.snapshot_id, again.snapshot_id);
    assert_eq!(
        first.creation_time, again.creation_time,
        "a repeated CreateSnapshot reports the original creation time"
    );
    assert_eq!(first, again);
    assert!(first.creation_time.is_some());

    let taken = controller
        .create_snapshot(snapshot_request("snap-1", &b))
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
    for unknown in [unknown_volume_id(), "not-a-kura-id".to_owned()] {
        let missing = controller
            .create_snapshot(snapshot_request("snap-x", &unknown))
            .await
            .unwrap_err();
        assert_eq!(
            missing.code(),
            Code::NotFound,
            "source {unknown}: {missing:?}"
        );
    }

    let second = create_snapshot(&driver, "snap-2", &a).await;
    let third = create_snapshot(&driver, "snap-3", &a).await;
    let of_b = create_snapshot(&driver, "snap-b", &b).await;
    let mut all = vec![
        first.snapshot_id.clone(),
        second.snapshot_id.clone(),
        third.snapshot_id.clone(),
        of_b.snapshot_id.clone(),
    ];
    all.sort();

    // Filters.
    let by_id = list_snapshots(
        &driver,
        proto::ListSnapshotsRequest {
            snapshot_id: second.snapshot_id.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(by_id.entries.len(), 1);
    assert_eq!(by_id.entries[0].snapshot.as_ref().unwrap(), &second);
    let by_source = list_snapshots(
        &driver,
        proto::ListSnapshotsRequest {
            source_volume_id: b.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ids(&by_source), vec![of_b.snapshot_id.clone()]);
    let of_a = list_snapshots(
        &driver,
        proto::ListSnapshotsRequest {
            source_volume_id: a.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(of_a.entries.len(), 3);
    assert!(
        of_a.entries
            .iter()
            .all(|e| e.snapshot.as_ref().unwrap().source_volume_id == a)
    );

    // Paging: two, then the rest.
    let page1 = list_snapshots(
        &driver,
        proto::ListSnapshotsRequest {
            max_entries: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(page1.entries.len(), 2);
    assert!(!page1.next_token.is_empty());
    let page2 = list_snapshots(
        &driver,
        proto::ListSnapshotsRequest {
            starting_token: page1.next_token.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(page2.next_token.is_empty());
    let mut paged = ids(&page1);
    paged.extend(ids(&page2));
    paged.sort();
    assert_eq!(paged, all, "the pages hold every snapshot exactly once");
    let bad = list_snapshots(
        &driver,
        proto::ListSnapshotsRequest {
            starting_token: "no-such-token".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(bad.code(), Code::Aborted);

    // Get.
    let got = controller
        .get_snapshot(proto::GetSnapshotRequest {
            snapshot_id: third.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(got, third);

    // A restore must hold the whole snapshot.
    let small = controller
        .create_volume(create_request(
            "pvc-too-small",
            256 * MIB,
            &[],
            Some(snapshot_source(&first.snapshot_id)),
        ))
        .await
        .unwrap_err();
    assert_eq!(small.code(), Code::OutOfRange, "{small:?}");

    // Delete, twice; then it is gone everywhere.
    for _ in 0..2 {
        delete_snapshot(&driver, &third.snapshot_id).await.unwrap();
    }
    let gone = controller
        .get_snapshot(proto::GetSnapshotRequest {
            snapshot_id: third.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let listed = list_snapshots(
        &driver,
        proto::ListSnapshotsRequest {
            snapshot_id: third.snapshot_id.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(listed.entries.is_empty());
    let restore_gone = controller
        .create_volume(create_request(
            "pvc-from-deleted",
            512 * MIB,
            &[],
            Some(snapshot_source(&third.snapshot_id)),
        ))
        .await
        .unwrap_err();
    assert_eq!(restore_gone.code(), Code::NotFound);
    assert!(
        !driver
            .pool_root()
            .join(format!("snapshots/{}.img", third.snapshot_id))
            .exists()
    );
}

// ---------------------------------------------------------------------------------
// g) Thick volumes
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn thick_volume_snapshots_and_restores() {
    let driver = Driver::start().await;
    let cap = mount_cap("ext4");
    let thick = [(PROVISIONING, "thick")];
    let source = driver.create_volume("pvc-thick", 512 * MIB, &thick).await;
    let image = |id: &str| driver.pool_root().join(format!("volumes/{id}.img"));
    assert!(
        kura::sys::fs::allocated_bytes(&image(&source.volume_id)).unwrap() >= 512 * MIB as u64,
        "a thick volume is allocated up front"
    );
    let (_, target) = driver
        .stage_and_publish(&source.volume_id, &cap, "src")
        .await;
    let data = pattern(90, 8 << 20);
    write_file(&target.join("data"), &data);

    let snapshot = create_snapshot(&driver, "snap-thick", &source.volume_id).await;
    assert!(snapshot.ready_to_use);
    write_file(&target.join("data"), &pattern(91, 8 << 20));

    let restored = create_from(
        &driver,
        "pvc-thick-restored",
        768 * MIB,
        &thick,
        snapshot_source(&snapshot.snapshot_id),
    )
    .await;
    assert!(
        kura::sys::fs::allocated_bytes(&image(&restored.volume_id)).unwrap() >= 768 * MIB as u64,
        "a thick restore is allocated to its full new size"
    );
    let (_, restored_target) = driver
        .stage_and_publish(&restored.volume_id, &cap, "restored")
        .await;
    assert!(std::fs::read(restored_target.join("data")).unwrap() == data);
}

// ---------------------------------------------------------------------------------
// h) A pool without reflink: snapshots are copies made in the background
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn non_reflink_pool_copies_snapshots_in_the_background() {
    let mut driver = Driver::start_with(PoolKind::Dir, &[]).await;
    restart_on_ext4_pool(&mut driver).await;
    let cap = mount_cap("ext4");
    let source = driver.create_volume("pvc-copied", GIB, &[]).await;
    let id = source.volume_id;
    let (staging, target) = driver.stage_and_publish(&id, &cap, "src").await;
    // Enough data that the copy takes a moment.
    let bulk = pattern(100, 1 << 20);
    {
        let file = std::fs::File::create(target.join("bulk")).unwrap();
        for i in 0..384u64 {
            file.write_all_at(&bulk, i << 20).unwrap();
        }
        file.sync_all().unwrap();
    }
    let data = pattern(101, 4 << 20);
    write_file(&target.join("data"), &data);

    // A copy of a volume that is being written would mix data of different moments.
    let in_use = driver
        .controller()
        .create_snapshot(snapshot_request("snap-copied", &id))
        .await
        .unwrap_err();
    assert_eq!(in_use.code(), Code::FailedPrecondition, "{in_use:?}");
    assert!(in_use.message().contains("unstage"), "{}", in_use.message());
    // So would a clone, which is the same copy made at once.
    let clone_in_use = driver
        .controller()
        .create_volume(create_request(
            "pvc-copied-clone",
            512 * MIB,
            &[],
            Some(volume_source(&id)),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        clone_in_use.code(),
        Code::FailedPrecondition,
        "{clone_in_use:?}"
    );
    assert!(
        !driver
            .pool_root()
            .join("volumes")
            .read_dir()
            .unwrap()
            .any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(&derived_clone_id("pvc-copied-clone"))),
        "a refused clone leaves nothing behind"
    );
    driver.unpublish_and_unstage(&id, &staging, &target).await;

    let started = Instant::now();
    let first = create_snapshot(&driver, "snap-copied", &id).await;
    eprintln!(
        "first CreateSnapshot answered in {:?} with ready_to_use={}",
        started.elapsed(),
        first.ready_to_use
    );

    // While the copy runs, the source cannot be staged (and so not written).
    let staging = driver.path("stage-during-copy");
    std::fs::create_dir_all(&staging).unwrap();
    match driver
        .node()
        .node_stage_volume(stage_request(&id, &staging, &cap))
        .await
    {
        Err(status) => {
            assert_eq!(status.code(), Code::Aborted, "{status:?}");
            assert!(status.message().contains("copied"), "{}", status.message());
        }
        Ok(_) => {
            // Staging is refused until the copy is recorded as done, so it is done.
            let now = create_snapshot(&driver, "snap-copied", &id).await;
            assert!(now.ready_to_use, "the source was staged while its copy ran");
            driver
                .node()
                .node_unstage_volume(proto::NodeUnstageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: staging.display().to_string(),
                })
                .await
                .unwrap();
        }
    }

    // The CO polls CreateSnapshot by name until the snapshot is ready.
    let mut snapshot = first.clone();
    while !snapshot.ready_to_use {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the background copy did not finish in 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        snapshot = create_snapshot(&driver, "snap-copied", &id).await;
        assert_eq!(snapshot.snapshot_id, first.snapshot_id);
        assert_eq!(snapshot.creation_time, first.creation_time);
    }
    eprintln!("snapshot ready after {:?}", started.elapsed());

    // The source changes after the snapshot; the restore does not see it.
    let (staging, target) = driver.stage_and_publish(&id, &cap, "src-again").await;
    write_file(&target.join("data"), &pattern(102, 4 << 20));
    driver.unpublish_and_unstage(&id, &staging, &target).await;

    let restored = create_from(
        &driver,
        "pvc-copied-restored",
        GIB,
        &[],
        snapshot_source(&snapshot.snapshot_id),
    )
    .await;
    let (_, restored_target) = driver
        .stage_and_publish(&restored.volume_id, &cap, "restored")
        .await;
    assert!(std::fs::read(restored_target.join("data")).unwrap() == data);
    let bulk_back = std::fs::read(restored_target.join("bulk")).unwrap();
    assert_eq!(bulk_back.len(), 384 << 20);
    assert!(bulk_back.chunks(1 << 20).all(|c| c == bulk.as_slice()));
}
