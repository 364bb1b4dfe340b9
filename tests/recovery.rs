//! Crash safety: the real `kura` binary killed in the middle of a data copy, leftovers
//! of interrupted operations planted by hand, graceful shutdown on SIGTERM and restarts
//! that keep the pool. Start-up reconciliation must leave each pool holding whole
//! objects only, and never touch what is live.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::process::{DEADLINE, Kura};
use common::*;
use kura::csi::proto;
use kura::csi::proto::identity_client::IdentityClient;

/// Names of the files in a directory.
fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Every file under the pool that only an unfinished write leaves.
fn unfinished(pool: &Path) -> Vec<String> {
    ["volumes", "snapshots"]
        .iter()
        .flat_map(|dir| names(&pool.join(dir)))
        .filter(|n| n.ends_with(".partial") || n.ends_with(".tmp"))
        .collect()
}

async fn volume_ids(kura: &impl Csi) -> BTreeSet<String> {
    kura.list_volume_ids().await.into_iter().collect()
}

async fn snapshots(kura: &impl Csi) -> Vec<proto::Snapshot> {
    kura.controller()
        .list_snapshots(proto::ListSnapshotsRequest::default())
        .await
        .expect("ListSnapshots")
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.snapshot.unwrap())
        .collect()
}

/// Stages a volume as ext4 at `staging`, a directory made here.
async fn stage_ext4(kura: &impl Csi, volume_id: &str, staging: &Path) {
    std::fs::create_dir_all(staging).unwrap();
    kura.stage(volume_id, staging, &mount_cap("ext4")).await;
}
/// Cuts a snapshot and waits until it is ready to use (a background copy on a pool
/// without reflink).
async fn ready_snapshot(kura: &impl Csi, name: &str, source: &str) -> proto::Snapshot {
    let started = Instant::now();
    loop {
        let snapshot = kura.create_snapshot(name, source).await;
        if snapshot.ready_to_use {
            return snapshot;
        }
        assert!(started.elapsed() < DEADLINE, "snapshot never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const CHUNK: usize = 1 << 20;

/// The `index`th chunk of a large test file: a pattern stamped with its index, so a
/// chunk copied to the wrong place or lost does not compare equal.
fn chunk(base: &[u8], index: u64) -> Vec<u8> {
    let mut chunk = base.to_vec();
    chunk[..8].copy_from_slice(&index.to_le_bytes());
    chunk
}

fn write_big_file(path: &Path, chunks: u64) {
    use std::io::Write;
    let base = pattern(42, CHUNK);
    let mut file = std::fs::File::create(path).unwrap();
    for i in 0..chunks {
        file.write_all(&chunk(&base, i)).unwrap();
    }
    file.sync_all().unwrap();
}

fn assert_big_file(path: &Path, chunks: u64) {
    use std::io::Read;
    let base = pattern(42, CHUNK);
    let mut file = std::fs::File::open(path).unwrap();
    assert_eq!(file.metadata().unwrap().len(), chunks * CHUNK as u64);
    let mut buf = vec![0u8; CHUNK];
    for i in 0..chunks {
        file.read_exact(&mut buf).unwrap();
        assert!(
            buf == chunk(&base, i),
            "chunk {i} of {} differs",
            path.display()
        );
    }
}

/// SIGKILL in the middle of copying data (a pool without reflink), first while
/// a snapshot's background copy runs, then during a restore, each followed by a
/// restart: the half-written image is gone, the object does not exist, and the CO's
/// retry builds it whole.
#[tokio::test(flavor = "multi_thread")]
async fn killed_mid_copy_leaves_nothing_and_the_retry_succeeds() {
    const CHUNKS: u64 = 256;
    let mut kura = Kura::new(PoolKind::Dir);
    kura.start().await;
    let pool = kura.pool_root();
    let volumes = pool.join("volumes");
    assert!(
        !kura::sys::fs::supports_reflink(&pool).unwrap(),
        "the pool must copy data for this test to interrupt a copy"
    );

    // A source volume holding 256 MiB of data, and a snapshot of it.
    let source = kura
        .create(create_request("source", 2 * GIB, &[], None))
        .await
        .expect("CreateVolume source");
    let staging = kura.path("stage-source");
    stage_ext4(&kura, &source.volume_id, &staging).await;
    write_big_file(&staging.join("data"), CHUNKS);
    kura.unstage(&source.volume_id, &staging).await;

    // A snapshot is a background copy here: kill kura while it is held mid-copy.
    let copying = kura.pause.arm("copying");
    let snapshots_dir = pool.join("snapshots");
    let snap_id = snapshot_id("source-snap").to_string();
    let snap_meta = snapshots_dir.join(format!("{snap_id}.json"));
    let snap_partial = snapshots_dir.join(format!("{snap_id}.img.partial"));
    let first = kura.create_snapshot("source-snap", &source.volume_id).await;
    assert_eq!(first.snapshot_id, snap_id);
    assert!(
        !first.ready_to_use,
        "the copy is held, so it cannot be ready"
    );
    copying
        .held(|| snapshots_dir.join(format!("{snap_id}.img")).exists())
        .await;
    kura.kill();
    copying.release();
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&snap_meta).unwrap()).unwrap();
    assert_eq!(record["ready"], false, "the kill left a record not ready");
    assert!(
        snap_partial.exists(),
        "the kill left a partial snapshot image"
    );

    // Restarted, the unfinished snapshot is gone; the CO's retry cuts it anew.
    kura.start().await;
    assert!(!snap_meta.exists() && !snap_partial.exists());
    assert_eq!(unfinished(&pool), Vec::<String>::new());
    assert!(snapshots(&kura).await.is_empty());
    let snapshot = ready_snapshot(&kura, "source-snap", &source.volume_id).await;
    assert_eq!(snapshot.snapshot_id, snap_id);

    // Restore it, and kill kura once the copy has written some of the new image.
    let restored_id = volume_id("restored").to_string();
    let image = volumes.join(format!("{restored_id}.img"));
    let partial = volumes.join(format!("{restored_id}.img.partial"));
    let meta = volumes.join(format!("{restored_id}.json"));
    let request = restore_request("restored", 2 * GIB, &snapshot.snapshot_id);
    let mut controller = kura.controller();
    let copying = kura.pause.arm("copying");
    let in_flight = {
        let request = request.clone();
        tokio::spawn(async move { controller.create_volume(request).await })
    };
    copying.held(|| in_flight.is_finished()).await;
    let copied = std::fs::metadata(&partial)
        .expect("the copy has begun its image")
        .blocks()
        * 512;
    kura.kill();
    copying.release();
    assert!(
        in_flight.await.unwrap().is_err(),
        "CreateVolume must not have succeeded: the process was killed"
    );

    // What the crash left: a half-copied image and no volume.
    let left = std::fs::metadata(&partial).expect("the kill left a partial image");
    assert!(
        left.blocks() * 512 < CHUNKS * CHUNK as u64,
        "the copy was complete ({} bytes allocated) when it was killed",
        left.blocks() * 512
    );
    assert!(
        !image.exists() && !meta.exists(),
        "the volume was committed"
    );
    eprintln!(
        "killed with {copied}+ of {} bytes copied",
        CHUNKS * CHUNK as u64
    );

    // Restart: the leftover is gone and the volume does not exist.
    kura.start().await;
    assert!(!partial.exists(), "partial image survived the restart");
    assert!(!image.exists() && !meta.exists());
    assert_eq!(unfinished(&pool), Vec::<String>::new());
    assert_eq!(
        volume_ids(&kura).await,
        BTreeSet::from([source.volume_id.clone()])
    );
    let listed = snapshots(&kura).await;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].ready_to_use);
    let mut controller = kura.controller();
    let missing = controller
        .controller_get_volume(get_volume_request(&restored_id))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // The CO retries the same request: it succeeds, whole.
    let restored = controller
        .create_volume(request)
        .await
        .expect("retried CreateVolume")
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(restored.volume_id, restored_id);
    assert_eq!(restored.capacity_bytes, 2 * GIB);
    assert_eq!(
        restored.content_source,
        Some(snapshot_source(&snapshot.snapshot_id))
    );
    assert!(image.exists() && meta.exists() && !partial.exists());
    let staging = kura.path("stage-restored");
    stage_ext4(&kura, &restored_id, &staging).await;
    assert_big_file(&staging.join("data"), CHUNKS);
    kura.unstage(&restored_id, &staging).await;
}

/// Every kind of leftover an interrupted operation can leave, planted while the driver
/// is down: reconciliation removes each one and keeps the live volume, its loop device,
/// and its snapshot.
#[tokio::test(flavor = "multi_thread")]
async fn restart_removes_planted_leftovers_and_keeps_live_objects() {
    let mut driver = Driver::start().await;
    let keep = driver.create_volume("keep", 256 * MIB, &[]).await;
    let cap = mount_cap("ext4");
    let (staging, target) = driver
        .stage_and_publish(&keep.volume_id, &cap, "keep")
        .await;
    let data = pattern(9, 3 * MIB as usize);
    std::fs::File::create(target.join("data")).unwrap();
    write_at(&target.join("data"), 0, &data);
    let snapshot = driver.create_snapshot("keep-snap", &keep.volume_id).await;
    assert!(snapshot.ready_to_use);
    driver.stop().await;

    let pool = driver.pool_root();
    let volumes = pool.join("volumes");
    let snapshots_dir = pool.join("snapshots");
    let volumes_before = names(&volumes);
    let snapshots_before = names(&snapshots_dir);
    let keep_image = volumes.join(format!("{}.img", keep.volume_id));
    let keep_loop = kura::sys::loopdev::find_by_backing(&keep_image)
        .unwrap()
        .expect("the staged volume has a loop device");
    let vol = |name: &str| volume_id(name).to_string();
    let snap = |name: &str| snapshot_id(name).to_string();
    let sparse = |path: &Path, len: u64| {
        let file = std::fs::File::create(path).unwrap();
        file.set_len(len).unwrap();
        file.sync_all().unwrap();
    };

    // A create killed while building its image.
    let partial = volumes.join(format!("{}.img.partial", vol("interrupted-create")));
    sparse(&partial, 64 * MIB as u64);
    write_at(&partial, 0, &pattern(1, 4096));
    // A create killed after the rename, before its metadata was committed.
    let orphan = volumes.join(format!("{}.img", vol("uncommitted")));
    sparse(&orphan, 64 * MIB as u64);
    // Metadata writes killed before their rename: a new volume's, and an update of the
    // live volume's (an expansion).
    let new_tmp = volumes.join(format!("{}.json.tmp", vol("uncommitted")));
    std::fs::write(&new_tmp, b"{\"id\":").unwrap();
    let keep_tmp = volumes.join(format!("{}.json.tmp", keep.volume_id));
    std::fs::write(&keep_tmp, b"{").unwrap();
    // A background snapshot copy killed half-way: a record that is not ready, its
    // half-copied image, and a metadata write of it.
    let keep_snap_meta = snapshots_dir.join(format!("{}.json", snapshot.snapshot_id));
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&keep_snap_meta).unwrap()).unwrap();
    let unready = snap("interrupted-snap");
    record["id"] = unready.clone().into();
    record["name"] = "interrupted-snap".into();
    record["ready"] = false.into();
    let unready_meta = snapshots_dir.join(format!("{unready}.json"));
    std::fs::write(&unready_meta, serde_json::to_vec(&record).unwrap()).unwrap();
    let unready_partial = snapshots_dir.join(format!("{unready}.img.partial"));
    sparse(&unready_partial, 256 * MIB as u64);
    let unready_tmp = snapshots_dir.join(format!("{unready}.json.tmp"));
    std::fs::write(&unready_tmp, b"{}").unwrap();
    // A snapshot whose delete removed the metadata and stopped.
    let snap_orphan = snapshots_dir.join(format!("{}.img", snap("half-deleted")));
    sparse(&snap_orphan, 64 * MIB as u64);
    // A volume deleted while still attached: its loop device outlives the file.
    let deleted = volumes.join(format!("{}.img", vol("deleted-while-attached")));
    sparse(&deleted, 64 * MIB as u64);
    let deleted_loop = kura::sys::loopdev::attach(&deleted, false).unwrap();
    let deleted_id = {
        let meta = std::fs::metadata(&deleted).unwrap();
        (meta.dev(), meta.ino())
    };
    std::fs::remove_file(&deleted).unwrap();
    let bound = |id: (u64, u64)| {
        kura::sys::loopdev::list_bound()
            .unwrap()
            .into_iter()
            .any(|d| (d.backing_dev, d.backing_ino) == id)
    };
    assert!(bound(deleted_id), "{} is bound", deleted_loop.display());
    let planted = [
        &partial,
        &orphan,
        &new_tmp,
        &keep_tmp,
        &unready_meta,
        &unready_partial,
        &unready_tmp,
        &snap_orphan,
    ];
    for path in planted {
        assert!(path.exists(), "{} planted", path.display());
    }

    driver.restart().await;

    for path in planted {
        assert!(!path.exists(), "{} survived the restart", path.display());
    }
    assert_eq!(names(&volumes), volumes_before);
    assert_eq!(names(&snapshots_dir), snapshots_before);
    assert!(
        !bound(deleted_id),
        "the loop device of the deleted image was not detached"
    );
    let keep_now = kura::sys::loopdev::find_by_backing(&keep_image)
        .unwrap()
        .expect("the live volume's loop device was detached");
    assert_eq!(keep_now.path, keep_loop.path);

    // The live volume and its snapshot are listed and whole.
    assert_eq!(
        volume_ids(&driver).await,
        BTreeSet::from([keep.volume_id.clone()])
    );
    let listed = snapshots(&driver).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].snapshot_id, snapshot.snapshot_id);
    assert!(listed[0].ready_to_use);
    assert_eq!(read_at(&target.join("data"), 0, data.len()), data);
    driver
        .node()
        .node_stage_volume(stage_request(&keep.volume_id, &staging, &cap))
        .await
        .expect("NodeStageVolume again");
    let restored = driver
        .create(restore_request(
            "from-keep-snap",
            256 * MIB,
            &snapshot.snapshot_id,
        ))
        .await
        .expect("restore from the kept snapshot");
    let (r_staging, r_target) = driver
        .stage_and_publish(&restored.volume_id, &cap, "restored")
        .await;
    assert_eq!(read_at(&r_target.join("data"), 0, data.len()), data);
    driver
        .unpublish_and_unstage(&restored.volume_id, &r_staging, &r_target)
        .await;
    driver
        .unpublish_and_unstage(&keep.volume_id, &staging, &target)
        .await;
    // Staged anew (a fresh loop device over an image that now shares its extents with
    // the snapshot), the live volume still mounts and holds its data.
    let (staging, target) = driver
        .stage_and_publish(&keep.volume_id, &cap, "keep-again")
        .await;
    assert_eq!(read_at(&target.join("data"), 0, data.len()), data);
    driver
        .unpublish_and_unstage(&keep.volume_id, &staging, &target)
        .await;
}

/// SIGTERM stops the binary cleanly: exit status 0 and its socket removed, even with a
/// client still connected. A stale socket at the endpoint is replaced on start.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_cleanly_and_a_stale_socket_is_replaced() {
    let mut kura = Kura::new(PoolKind::Image);
    // A socket file nobody listens on, as a killed process leaves it.
    drop(std::os::unix::net::UnixListener::bind(&kura.socket).unwrap());
    assert!(
        std::fs::symlink_metadata(&kura.socket)
            .unwrap()
            .file_type()
            .is_socket()
    );
    assert!(
        kura::csi::client::connect(&kura.socket).await.is_err(),
        "nobody listens yet"
    );

    // Answering at all means the stale socket was replaced: binding over it fails.
    let channel = kura.start().await;
    let socket = std::fs::symlink_metadata(&kura.socket).unwrap();
    assert!(socket.file_type().is_socket());
    assert_eq!(socket.permissions().mode() & 0o777, 0o600);
    let info = IdentityClient::new(channel.clone())
        .get_plugin_info(proto::GetPluginInfoRequest {})
        .await
        .expect("GetPluginInfo")
        .into_inner();
    assert_eq!(info.name, DRIVER_NAME);

    let status = kura.terminate().await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(!kura.socket.exists(), "the socket was left behind");
    assert!(
        IdentityClient::new(channel)
            .probe(proto::ProbeRequest {})
            .await
            .is_err(),
        "nothing answers after shutdown"
    );
}

/// A restarted binary reuses its pool as it is, and again after a node reboot (pool
/// unmounted and detached): the volume is listed, its data is there, and staging it
/// again is idempotent.
#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_the_pool_and_its_volumes() {
    let mut kura = Kura::new(PoolKind::Image);
    kura.start().await;
    let volume = kura
        .create(create_request("kept", 512 * MIB, &[], None))
        .await
        .expect("CreateVolume");
    let id = volume.volume_id.clone();
    let staging = kura.path("stage");
    stage_ext4(&kura, &id, &staging).await;
    let data = pattern(3, 5 * MIB as usize);
    std::fs::File::create(staging.join("data")).unwrap();
    write_at(&staging.join("data"), 0, &data);
    let pool_image = kura.path("pool.img");
    let pool_loop = kura::sys::loopdev::find_by_backing(&pool_image)
        .unwrap()
        .expect("the pool image is attached");

    // Restart while the volume stays staged.
    let status = kura.terminate().await;
    assert!(status.success(), "exit status {status}");
    kura.start().await;
    assert_eq!(
        kura::sys::loopdev::find_by_backing(&pool_image)
            .unwrap()
            .map(|d| d.path),
        Some(pool_loop.path),
        "the pool's loop device was reused"
    );
    assert_eq!(volume_ids(&kura).await, BTreeSet::from([id.clone()]));
    let got = kura
        .controller()
        .controller_get_volume(get_volume_request(&id))
        .await
        .expect("ControllerGetVolume")
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 512 * MIB);
    stage_ext4(&kura, &id, &staging).await;
    assert_eq!(read_at(&staging.join("data"), 0, data.len()), data);
    kura.unstage(&id, &staging).await;

    // A node reboot: the process, the pool's mount and its loop device all go away.
    let status = kura.terminate().await;
    assert!(status.success(), "exit status {status}");
    let pool_mount = kura.path("state/pool");
    kura::sys::mount::unmount(&pool_mount).unwrap();
    let pool_loop = kura::sys::loopdev::find_by_backing(&pool_image)
        .unwrap()
        .expect("the pool image is attached");
    kura::sys::loopdev::detach(&pool_loop.path).unwrap();
    kura.start().await;
    assert_eq!(volume_ids(&kura).await, BTreeSet::from([id.clone()]));
    stage_ext4(&kura, &id, &staging).await;
    stage_ext4(&kura, &id, &staging).await;
    assert_eq!(read_at(&staging.join("data"), 0, data.len()), data);
    kura.unstage(&id, &staging).await;
}

/// SIGKILL while a snapshot holds its volume's filesystem frozen (held there at a pause
/// point, between FIFREEZE and FITHAW). The application's writes block while kura is
/// dead; the restart thaws the filesystem before serving, the writes go through, the
/// CO's retried snapshot succeeds and holds the data, and unstage and delete leave
/// nothing behind. A filesystem found frozen already when a snapshot freezes it is
/// thawed and frozen again, never an error.
#[tokio::test(flavor = "multi_thread")]
async fn killed_while_a_freeze_is_held_restarts_thawed() {
    let mut kura = Kura::new(PoolKind::Image);
    kura.start().await;
    let pool = kura.pool_root();
    let mut controller = kura.controller();
    let id = controller
        .create_volume(create_request("frozen", 256 * MIB, &[], None))
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging = kura.path("stage-frozen");
    stage_ext4(&kura, &id, &staging).await;
    let _thaw = ThawOnDrop(staging.clone());
    let before = pattern(1, 1 << 20);
    write_file(&staging.join("before"), &before);

    // The snapshot freezes the volume and is held there; kura dies holding the freeze.
    let quiesced = kura.pause.arm("quiesced");
    let request = snapshot_request("snap-frozen", &id);
    let in_flight = {
        let mut controller = controller.clone();
        let request = request.clone();
        tokio::spawn(async move { controller.create_snapshot(request).await })
    };
    quiesced.held(|| in_flight.is_finished()).await;
    assert!(is_frozen(&staging), "the held snapshot froze the volume");
    kura.kill();
    quiesced.release();
    assert!(in_flight.await.unwrap().is_err(), "the killed call failed");
    drop(controller);
    assert!(
        is_frozen(&staging),
        "nothing thaws the volume while kura is down"
    );

    // An application writes meanwhile: it blocks until the filesystem is thawed.
    let during = pattern(2, 1 << 20);
    let (written, write_done) = std::sync::mpsc::channel();
    {
        let (path, data) = (staging.join("during"), during.clone());
        std::thread::spawn(move || {
            write_file(&path, &data);
            let _ = written.send(());
        });
    }

    // The restart thaws it before it serves: the write completes.
    kura.start().await;
    write_done
        .recv_timeout(DEADLINE)
        .expect("the application's write completes once kura is back");
    assert!(!is_frozen(&staging), "the restart thawed the volume");

    // A filesystem found frozen already (as if by a kura that died a moment ago) is
    // thawed and frozen again by the next snapshot, which then thaws it.
    kura::sys::fs::freeze(&staging).unwrap();
    let mut controller = kura.controller();
    let snapshot = controller
        .create_snapshot(request)
        .await
        .expect("the retried CreateSnapshot succeeds on a frozen volume")
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snapshot.ready_to_use);
    assert!(!is_frozen(&staging), "the snapshot left the volume frozen");
    assert_eq!(unfinished(&pool), Vec::<String>::new());

    // The snapshot holds what was written and fsynced before it was cut.
    controller
        .create_volume(restore_request(
            "from-frozen",
            256 * MIB,
            &snapshot.snapshot_id,
        ))
        .await
        .expect("restore the snapshot");
    let restored = volume_id("from-frozen").to_string();
    let restored_staging = kura.path("stage-restored");
    stage_ext4(&kura, &restored, &restored_staging).await;
    assert_eq!(
        read_at(&restored_staging.join("before"), 0, before.len()),
        before
    );
    assert_eq!(
        read_at(&restored_staging.join("during"), 0, during.len()),
        during
    );

    // Everything comes apart cleanly.
    kura.unstage(&restored, &restored_staging).await;
    kura.unstage(&id, &staging).await;
    for volume in [&restored, &id] {
        controller
            .delete_volume(delete_volume_request(volume))
            .await
            .expect("DeleteVolume");
    }
    controller
        .delete_snapshot(delete_snapshot_request(&snapshot.snapshot_id))
        .await
        .expect("DeleteSnapshot");
    assert_eq!(leftovers(&kura.dir, &pool), Vec::<String>::new());
}
