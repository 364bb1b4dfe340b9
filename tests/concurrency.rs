//! One operation at a time per volume, over the real socket: while an operation on a
//! volume is in flight, every other operation on it is refused with ABORTED (which the
//! CO retries) before it touches anything, other volumes are not held up, and the first
//! operation then finishes as if it had been alone.
//!
//! Operations are real, not mocks: on a pool that cannot reflink, a clone is a
//! synchronous full copy and a snapshot a background one; a stage attaches and formats.
//! Each is held in flight at a test pause point (`kura::sys::pause`) for exactly as
//! long as the test needs, whatever the machine's speed, and then released.

mod common;

use std::fmt::Debug;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use kura::csi::proto;
use kura::pool::VolumeId;
use tokio::task::{AbortHandle, JoinHandle};
use tonic::{Code, Response, Status};

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

/// Size of the volumes that are copied: several of the copy's chunks, so a copy held
/// after its first chunk is truly half done.
const VOLUME: i64 = 256 * MIB;
/// Unit in which volume contents are written and compared.
const CHUNK: usize = 4 << 20;
/// How long a copy may take before the test gives up on it.
const COPY_DEADLINE: Duration = Duration::from_secs(120);

/// CHUNK bytes of xorshift noise: the raw material of every chunk a volume holds.
fn noise() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(CHUNK);
    while out.len() < CHUNK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// What chunk `index` of a filled volume holds: the noise rotated by an amount that
/// depends on the index, stamped with the index, so no two chunks are alike and a
/// chunk that lands in the wrong place is caught.
fn chunk(noise: &[u8], index: usize) -> Vec<u8> {
    let turn = index.wrapping_mul(65_537) % noise.len();
    let mut out = Vec::with_capacity(noise.len());
    out.extend_from_slice(&noise[turn..]);
    out.extend_from_slice(&noise[..turn]);
    out[..8].copy_from_slice(&(index as u64).to_le_bytes());
    out
}

/// Fills the whole of a device with the chunks and makes them durable.
fn fill(device: &Path, len: usize) {
    let noise = noise();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(device)
        .expect("open device for write");
    for index in 0..len / CHUNK {
        file.write_all_at(&chunk(&noise, index), (index * CHUNK) as u64)
            .expect("write");
    }
    file.sync_all().expect("fsync");
}

/// Checks that a device or image holds exactly what [`fill`] wrote, over its whole
/// length.
fn assert_filled(path: &Path, len: usize, what: &str) {
    let noise = noise();
    let file = std::fs::File::open(path).expect("open for read");
    let mut buf = vec![0u8; CHUNK];
    for index in 0..len / CHUNK {
        file.read_exact_at(&mut buf, (index * CHUNK) as u64)
            .unwrap_or_else(|e| panic!("{what}: reading chunk {index}: {e}"));
        assert!(
            buf == chunk(&noise, index),
            "{what}: the {} MiB at offset {} differ from the source",
            CHUNK >> 20,
            index * CHUNK
        );
    }
    let mut past = [0u8; 1];
    assert_eq!(
        file.read_at(&mut past, len as u64)
            .expect("read past the end"),
        0,
        "{what} is longer than {len} bytes"
    );
}

/// Creates a volume and fills all of it with data through a block device.
async fn filled_volume(driver: &Driver, name: &str) -> String {
    let id = driver.create_volume(name, VOLUME, &[]).await.volume_id;
    let (staging, device) = driver.stage_and_publish(&id, &block_cap(), name).await;
    let started = Instant::now();
    let written = device.clone();
    tokio::task::spawn_blocking(move || fill(&written, VOLUME as usize))
        .await
        .unwrap();
    eprintln!("{name}: {VOLUME} bytes written in {:?}", started.elapsed());
    driver.unpublish_and_unstage(&id, &staging, &device).await;
    id
}

/// Reads a staged and published block volume back and checks it holds the data of
/// [`filled_volume`].
async fn assert_volume_filled(driver: &Driver, id: &str, tag: &str) {
    let (staging, device) = driver.stage_and_publish(id, &block_cap(), tag).await;
    let read = device.clone();
    let what = format!("volume {tag}");
    tokio::task::spawn_blocking(move || assert_filled(&read, VOLUME as usize, &what))
        .await
        .unwrap();
    driver.unpublish_and_unstage(id, &staging, &device).await;
}

/// The file a volume image is built in until it is complete.
fn partial_image(root: &Path, id: &VolumeId) -> PathBuf {
    root.join("volumes").join(format!("{id}.img.partial"))
}

/// The first operation is still in flight: its task has not ended and it is still held
/// at its pause point. A refusal only proves the lock if the operation holding it was
/// still running when the refusal came.
fn assert_in_flight<T>(task: &JoinHandle<T>, still: bool, after: &str) {
    assert!(
        !task.is_finished() && still,
        "the first operation was no longer in flight when {after} was answered, so that \
         answer proves nothing"
    );
}

/// A call that must be refused because an operation on `key` is in flight.
fn assert_aborted<T: Debug>(result: Result<Response<T>, Status>, key: &str, what: &str) {
    let status = result.map(Response::into_inner).expect_err(what);
    assert_eq!(status.code(), Code::Aborted, "{what}: {status:?}");
    assert!(
        status.message().contains(key),
        "{what}: the message names {key}: {}",
        status.message()
    );
}

/// Waits, when dropped, until the server has no operation running in the test
/// directory: the tasks it was given have ended and no file under the directory is
/// open in this process (a copy thread holds its source and its `.partial`). Declared
/// after the [`Driver`], it is dropped first, so when a test fails mid-operation the
/// driver's cleanup does not meet a pool that a copy still holds busy.
struct Settle {
    dir: PathBuf,
    tasks: Vec<AbortHandle>,
}

impl Settle {
    fn new(driver: &Driver) -> Settle {
        Settle {
            dir: driver.dir.clone(),
            tasks: Vec::new(),
        }
    }

    fn watch<T>(&mut self, task: &JoinHandle<T>) {
        self.tasks.push(task.abort_handle());
    }

    fn busy(&self) -> bool {
        let open = std::fs::read_dir("/proc/self/fd")
            .map(|fds| {
                fds.flatten()
                    .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                    .any(|path| path.starts_with(&self.dir))
            })
            .unwrap_or(false);
        open || self.tasks.iter().any(|t| !t.is_finished())
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        let started = Instant::now();
        while self.busy() && started.elapsed() < COPY_DEADLINE {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// ---------------------------------------------------------------------------------
// a) A clone being copied holds its new volume
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_clone_being_copied_holds_its_volume() {
    let mut driver = Driver::start_with(PoolKind::Dir, &[]).await;
    let root = restart_on_ext4_pool(&mut driver).await;
    let mut settle = Settle::new(&driver);
    let source = filled_volume(&driver, "pvc-source").await;

    let clone_id = volume_id("pvc-clone");
    let key = clone_id.as_str();
    let partial = partial_image(&root, &clone_id);
    let request = clone_request("pvc-clone", VOLUME, &source);
    let copying = driver.pause.arm("copying");
    let first = tokio::spawn({
        let mut controller = driver.controller();
        let request = request.clone();
        async move { controller.create_volume(request).await }
    });
    settle.watch(&first);
    copying.held(|| first.is_finished()).await;
    let running = || copying.is_held() && partial.exists();

    // The CO's retry of the same CreateVolume, and every other operation on the
    // volume, controller and node side alike.
    let mut controller = driver.controller();
    let mut node = driver.node();
    assert_aborted(
        controller.create_volume(request.clone()).await,
        key,
        "a repeated CreateVolume",
    );
    assert_in_flight(&first, running(), "the repeated CreateVolume");
    assert_aborted(
        controller.delete_volume(delete_volume_request(key)).await,
        key,
        "DeleteVolume",
    );
    assert_in_flight(&first, running(), "DeleteVolume");
    assert_aborted(
        controller
            .controller_expand_volume(expand_request(key, 2 * VOLUME, 0))
            .await,
        key,
        "ControllerExpandVolume",
    );
    assert_aborted(
        controller
            .create_snapshot(snapshot_request("snap-of-clone", key))
            .await,
        key,
        "CreateSnapshot of the volume",
    );
    let staging = driver.path("stage-during-clone");
    std::fs::create_dir_all(&staging).unwrap();
    let target = driver.path("target-during-clone");
    assert_aborted(
        node.node_stage_volume(stage_request(key, &staging, &block_cap()))
            .await,
        key,
        "NodeStageVolume",
    );
    assert_aborted(
        node.node_publish_volume(publish_request(key, &staging, &target, &block_cap(), false))
            .await,
        key,
        "NodePublishVolume",
    );
    assert_aborted(
        node.node_expand_volume(node_expand_request(key, &target, 2 * VOLUME, 0))
            .await,
        key,
        "NodeExpandVolume",
    );
    assert_aborted(
        node.node_unpublish_volume(unpublish_request(key, &target))
            .await,
        key,
        "NodeUnpublishVolume",
    );
    assert_aborted(
        node.node_unstage_volume(unstage_request(key, &staging))
            .await,
        key,
        "NodeUnstageVolume",
    );
    assert_in_flight(&first, running(), "the node calls");

    // The lock is taken after validation: a malformed request is still told so.
    let mut malformed = request.clone();
    malformed.volume_capabilities.clear();
    let invalid = controller.create_volume(malformed).await.unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
    // One lock per volume: other volumes are served meanwhile.
    let other = driver.create_volume("pvc-other", 64 * MIB, &[]).await;
    controller
        .delete_volume(delete_volume_request(&other.volume_id))
        .await
        .expect("DeleteVolume of another volume");
    assert_in_flight(&first, running(), "the calls on other volumes");

    // The refused calls left nothing behind.
    assert!(!is_mounted(&staging), "a refused stage mounted {staging:?}");
    assert!(!target.exists(), "a refused publish made {target:?}");

    // The clone finishes as if it had been alone.
    copying.release();
    let volume = tokio::time::timeout(COPY_DEADLINE, first)
        .await
        .expect("the clone finishes")
        .unwrap()
        .expect("CreateVolume of the clone")
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(volume.volume_id, key);
    assert_eq!(volume.capacity_bytes, VOLUME);
    assert_eq!(volume.content_source, Some(volume_source(&source)));
    assert!(!partial.exists(), "{partial:?} is left over");
    let snapshots = controller
        .list_snapshots(proto::ListSnapshotsRequest {
            source_volume_id: key.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        snapshots.entries.is_empty(),
        "a refused CreateSnapshot cut a snapshot: {snapshots:?}"
    );

    // Once the lock is free, the CO's retry gets the clone.
    let again = controller
        .create_volume(request)
        .await
        .expect("CreateVolume repeated after the clone")
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, volume);
    assert_volume_filled(&driver, key, "clone").await;
    controller
        .delete_volume(delete_volume_request(key))
        .await
        .expect("DeleteVolume after the clone");
}

// ---------------------------------------------------------------------------------
// b) A snapshot copied in the background holds its source and itself
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_background_snapshot_copy_holds_its_source_and_itself() {
    let mut driver = Driver::start_with(PoolKind::Dir, &[]).await;
    let root = restart_on_ext4_pool(&mut driver).await;
    let _settle = Settle::new(&driver);
    let source = filled_volume(&driver, "pvc-snapped").await;

    let copying = driver.pause.arm("copying");
    let first = driver.create_snapshot("snap-copied", &source).await;
    let id = first.snapshot_id.clone();
    assert_eq!(id, snapshot_id("snap-copied").as_str());
    assert!(
        !first.ready_to_use,
        "a snapshot on a pool without reflink is a background copy"
    );
    let image = root.join("snapshots").join(format!("{id}.img"));
    copying.held(|| image.exists()).await;

    // While it is copied, the source cannot be staged (and so not written), nor the
    // snapshot deleted.
    let mut node = driver.node();
    let staging = driver.path("stage-during-copy");
    std::fs::create_dir_all(&staging).unwrap();
    assert_aborted(
        node.node_stage_volume(stage_request(&source, &staging, &block_cap()))
            .await,
        &source,
        "NodeStageVolume of the source",
    );
    assert!(!is_mounted(&staging));
    assert_aborted(
        driver
            .controller()
            .delete_snapshot(delete_snapshot_request(&id))
            .await,
        &id,
        "DeleteSnapshot",
    );
    // The CO's poll is answered, with the same snapshot, still not ready: the refusals
    // above came while the copy ran.
    let polled = driver.create_snapshot("snap-copied", &source).await;
    assert_eq!(polled, first);
    assert!(copying.is_held() && !image.exists());

    copying.release();
    let started = Instant::now();
    let mut snapshot = polled;
    while !snapshot.ready_to_use {
        assert!(
            started.elapsed() < COPY_DEADLINE,
            "the background copy did not finish in {COPY_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        snapshot = driver.create_snapshot("snap-copied", &source).await;
    }
    eprintln!("snapshot ready after {:?}", started.elapsed());
    assert_eq!(snapshot.snapshot_id, id);
    assert_eq!(snapshot.creation_time, first.creation_time);
    let copied = image.clone();
    tokio::task::spawn_blocking(move || assert_filled(&copied, VOLUME as usize, "snapshot"))
        .await
        .unwrap();

    // Once it is ready, both go through.
    node.node_stage_volume(stage_request(&source, &staging, &block_cap()))
        .await
        .expect("NodeStageVolume of the source after the copy");
    node.node_unstage_volume(unstage_request(&source, &staging))
        .await
        .expect("NodeUnstageVolume");
    driver
        .controller()
        .delete_snapshot(delete_snapshot_request(&id))
        .await
        .expect("DeleteSnapshot after the copy");
    assert!(!image.exists(), "DeleteSnapshot left {image:?}");
    let listed = driver
        .controller()
        .list_snapshots(proto::ListSnapshotsRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");
}

// ---------------------------------------------------------------------------------
// c) A stage in progress holds its volume
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_stage_in_progress_holds_its_volume() {
    let driver = Driver::start().await;
    let mut settle = Settle::new(&driver);
    let id = driver.create_volume("pvc-staged", GIB, &[]).await.volume_id;
    let image = driver.pool_root().join("volumes").join(format!("{id}.img"));
    let cap = mount_cap("ext4");
    let staging = driver.path("stage-held");
    std::fs::create_dir_all(&staging).unwrap();

    // The stage attaches the volume and is held before it formats and mounts it.
    let staging_point = driver.pause.arm("staging");
    let first = tokio::spawn({
        let mut node = driver.node();
        let request = stage_request(&id, &staging, &cap);
        async move { node.node_stage_volume(request).await }
    });
    settle.watch(&first);
    staging_point.held(|| first.is_finished()).await;
    assert!(
        kura::sys::loopdev::find_by_backing(&image)
            .unwrap()
            .is_some(),
        "the held stage has attached the volume"
    );
    let running = || staging_point.is_held() && !is_mounted(&staging);
    assert_in_flight(&first, running(), "the stage is held");

    let mut node = driver.node();
    let mut controller = driver.controller();
    assert_aborted(
        node.node_stage_volume(stage_request(&id, &staging, &cap))
            .await,
        &id,
        "a repeated NodeStageVolume",
    );
    let target = driver.path("target-held");
    assert_aborted(
        node.node_publish_volume(publish_request(&id, &staging, &target, &cap, false))
            .await,
        &id,
        "NodePublishVolume",
    );
    assert_aborted(
        node.node_unstage_volume(unstage_request(&id, &staging))
            .await,
        &id,
        "NodeUnstageVolume",
    );
    assert_aborted(
        controller.delete_volume(delete_volume_request(&id)).await,
        &id,
        "DeleteVolume",
    );
    assert_aborted(
        controller
            .controller_expand_volume(expand_request(&id, 2 * GIB, 0))
            .await,
        &id,
        "ControllerExpandVolume",
    );
    assert_aborted(
        controller
            .create_snapshot(snapshot_request("snap-of-staged", &id))
            .await,
        &id,
        "CreateSnapshot of the volume",
    );
    assert!(!target.exists(), "a refused publish made {target:?}");
    assert_in_flight(&first, running(), "the refused calls");

    staging_point.release();
    tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("the stage finishes once released")
        .unwrap()
        .expect("NodeStageVolume");
    let table = kura::sys::mountinfo::read().unwrap();
    let mount = kura::sys::mountinfo::find_mount(&table, &staging).expect("staging is mounted");
    assert_eq!(mount.fs_type, "ext4");
    assert_eq!(
        driver
            .controller()
            .list_snapshots(proto::ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .len(),
        0,
        "a refused CreateSnapshot cut a snapshot"
    );

    // The lock is free again: the same stage repeats, and the volume is served.
    node.node_stage_volume(stage_request(&id, &staging, &cap))
        .await
        .expect("NodeStageVolume repeated");
    driver
        .node()
        .node_publish_volume(publish_request(&id, &staging, &target, &cap, false))
        .await
        .expect("NodePublishVolume");
    std::fs::write(target.join("file"), b"staged").unwrap();
    driver.unpublish_and_unstage(&id, &staging, &target).await;
    controller
        .delete_volume(delete_volume_request(&id))
        .await
        .expect("DeleteVolume");
}

// ---------------------------------------------------------------------------------
// d) A clone being copied holds its source
// ---------------------------------------------------------------------------------

/// A full copy holds the data of one moment only if nothing writes to the source while
/// it runs, as for a snapshot copy (b): CreateVolume holds its source's lock for the
/// whole copy, so the source cannot be staged (and written) mid-copy.
#[tokio::test(flavor = "multi_thread")]
async fn a_clone_being_copied_holds_its_source() {
    let mut driver = Driver::start_with(PoolKind::Dir, &[]).await;
    let root = restart_on_ext4_pool(&mut driver).await;
    let mut settle = Settle::new(&driver);
    let source = filled_volume(&driver, "pvc-source").await;

    let clone_id = volume_id("pvc-clone");
    let partial = partial_image(&root, &clone_id);
    let request = clone_request("pvc-clone", VOLUME, &source);
    let copying = driver.pause.arm("copying");
    let first = tokio::spawn({
        let mut controller = driver.controller();
        async move { controller.create_volume(request).await }
    });
    settle.watch(&first);
    copying.held(|| first.is_finished()).await;

    let staging = driver.path("stage-source-during-clone");
    std::fs::create_dir_all(&staging).unwrap();
    let staged = driver
        .node()
        .node_stage_volume(stage_request(&source, &staging, &block_cap()))
        .await;
    let in_flight = copying.is_held() && !first.is_finished() && partial.exists();
    if staged.is_ok() {
        driver
            .node()
            .node_unstage_volume(unstage_request(&source, &staging))
            .await
            .expect("NodeUnstageVolume");
    }
    assert_aborted(staged, &source, "NodeStageVolume of the clone's source");
    assert_in_flight(&first, in_flight, "NodeStageVolume of the source");

    copying.release();
    tokio::time::timeout(COPY_DEADLINE, first)
        .await
        .expect("the clone finishes")
        .unwrap()
        .expect("CreateVolume of the clone");
    assert_volume_filled(&driver, clone_id.as_str(), "clone").await;
}
