//! Volume group snapshots: one point in time across volumes, taken while a writer
//! runs. The writer writes numbered records to two volumes in turn (record n to
//! volume n % 2, each fsynced before the next is written); both members of a group
//! snapshot taken mid-stream are restored, and together they must hold exactly the
//! records 0..k for some k: no record of one volume newer than a record missing from
//! the other. Raw block members are flushed, not frozen, so for them each member is
//! checked alone (its records in order, up to the cut). Also: retries, the spec's
//! error cases, members refused by DeleteSnapshot, and members on two nodes of the
//! split roles.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::cluster::*;
use common::process::Kura;
use common::*;
use kura::csi::proto;
use kura::csi::proto::controller_client::ControllerClient;
use kura::csi::proto::group_controller_client::GroupControllerClient;
use tonic::Code;
use tonic::transport::Channel;

const MAGIC: u64 = 0x6b75_7261_6772_7031;
/// A block volume's record fills one 4 KiB block.
const BLOCK: usize = 4096;

/// Where the writer writes a volume's records.
#[derive(Clone)]
enum Log {
    /// Appended to this file of a mounted filesystem.
    File(PathBuf),
    /// One block each, in order, on this device.
    Device(PathBuf),
}

fn record(seq: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    bytes[..8].copy_from_slice(&seq.to_le_bytes());
    bytes[8..16].copy_from_slice(&MAGIC.to_le_bytes());
    bytes
}

/// The records a log holds, in order.
fn read_log(log: &Log) -> Vec<u64> {
    let (bytes, len) = match log {
        Log::File(path) => (std::fs::read(path).unwrap_or_default(), 16),
        Log::Device(path) => (std::fs::read(path).unwrap(), BLOCK),
    };
    bytes
        .chunks(len)
        .take_while(|c| c.len() == len && c[8..16] == MAGIC.to_le_bytes())
        .map(|c| u64::from_le_bytes(c[..8].try_into().unwrap()))
        .collect()
}

/// Writes records 0, 1, 2, ... to `logs[n % 2]`, each durable before the next, until
/// `stop`; counts them in `written`.
fn writer(logs: [Log; 2], stop: Arc<AtomicBool>, written: Arc<AtomicU64>) {
    let mut files: Vec<std::fs::File> = logs
        .iter()
        .map(|log| match log {
            Log::File(path) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap(),
            Log::Device(path) => std::fs::OpenOptions::new().write(true).open(path).unwrap(),
        })
        .collect();
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let i = (seq % 2) as usize;
        let file = &mut files[i];
        match &logs[i] {
            Log::File(_) => file.write_all(&record(seq, 16)).unwrap(),
            Log::Device(_) => {
                use std::os::unix::fs::FileExt;
                file.write_all_at(&record(seq, BLOCK), (seq / 2) * BLOCK as u64)
                    .unwrap()
            }
        }
        file.sync_data().unwrap();
        seq += 1;
        written.store(seq, Ordering::SeqCst);
    }
}

/// CreateVolumeGroupSnapshot, expected to succeed: the group.
async fn cut_group(
    group: &mut GroupControllerClient<Channel>,
    request: proto::CreateVolumeGroupSnapshotRequest,
) -> proto::VolumeGroupSnapshot {
    group
        .create_volume_group_snapshot(request)
        .await
        .expect("CreateVolumeGroupSnapshot")
        .into_inner()
        .group_snapshot
        .expect("group in response")
}

fn group_request(name: &str, sources: &[&str]) -> proto::CreateVolumeGroupSnapshotRequest {
    proto::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: sources.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Where a member lives: the controller that makes it, and the node (or all-in-one
/// driver) it is staged on.
struct Side<'a, N: Csi> {
    controller: ControllerClient<Channel>,
    node: &'a N,
}

impl<'a, N: Csi> Side<'a, N> {
    /// A side whose controller is `node` itself.
    fn new(node: &'a N) -> Self {
        Side {
            controller: node.controller(),
            node,
        }
    }
}

/// The log the writer keeps at a publication.
fn log_at(target: PathBuf, cap: &proto::VolumeCapability) -> Log {
    match is_block(cap) {
        true => Log::Device(target),
        false => Log::File(target.join("log")),
    }
}

/// Creates a volume on `topology`'s node (any, if none), stages and publishes it;
/// returns its ID, its log and its staging path.
async fn make_volume(
    side: &mut Side<'_, impl Csi>,
    name: &str,
    cap: &proto::VolumeCapability,
    topology: Option<proto::TopologyRequirement>,
) -> (String, Log, PathBuf) {
    let mut request = create_request(name, 64 * MIB, &[], None);
    request.volume_capabilities = vec![cap.clone()];
    request.accessibility_requirements = topology;
    let id = side
        .controller
        .create_volume(request)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let (staging, target) = side.node.stage_and_publish(&id, cap, name).await;
    (id, log_at(target, cap), staging)
}

/// Restores a member snapshot into a new volume on `side` and reads its log.
async fn restore(
    side: &mut Side<'_, impl Csi>,
    snapshot: &proto::Snapshot,
    cap: &proto::VolumeCapability,
    tag: &str,
) -> Vec<u64> {
    let mut request = restore_request(tag, 64 * MIB, &snapshot.snapshot_id);
    request.volume_capabilities = vec![cap.clone()];
    let id = side
        .controller
        .create_volume(request)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let (_, target) = side.node.stage_and_publish(&id, cap, tag).await;
    read_log(&log_at(target, cap))
}

/// The writer runs; a group snapshot is taken mid-stream; both members restored hold
/// a prefix of the records between them. Returns the group.
async fn consistent_group(
    sides: &mut [Side<'_, impl Csi>; 2],
    group: &mut GroupControllerClient<Channel>,
    caps: [&proto::VolumeCapability; 2],
    topologies: [Option<proto::TopologyRequirement>; 2],
) -> proto::VolumeGroupSnapshot {
    let [a_side, b_side] = sides;
    let (a, a_log, a_staging) = make_volume(a_side, "pvc-a", caps[0], topologies[0].clone()).await;
    let (b, b_log, b_staging) = make_volume(b_side, "pvc-b", caps[1], topologies[1].clone()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let thread = std::thread::spawn({
        let (stop, written) = (Arc::clone(&stop), Arc::clone(&written));
        move || writer([a_log, b_log], stop, written)
    });
    while written.load(Ordering::SeqCst) < 40 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let request = group_request("group-1", &[&a, &b]);
    let cut = group.create_volume_group_snapshot(request.clone()).await;
    let at_cut = written.load(Ordering::SeqCst);
    while written.load(Ordering::SeqCst) < at_cut + 40 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::SeqCst);
    thread.join().unwrap();
    let total = written.load(Ordering::SeqCst);
    let cut = cut.unwrap().into_inner().group_snapshot.unwrap();
    for (staging, cap) in [(&a_staging, caps[0]), (&b_staging, caps[1])] {
        if !is_block(cap) {
            assert!(!is_frozen(staging), "every member is thawed");
        }
    }

    // A retry returns the same group.
    let again = cut_group(group, request).await;
    assert_eq!(again, cut, "CreateVolumeGroupSnapshot is idempotent");
    assert_eq!(cut.snapshots.len(), 2);
    assert!(cut.ready_to_use);
    for s in &cut.snapshots {
        assert_eq!(s.group_snapshot_id, cut.group_snapshot_id);
        assert_eq!(s.creation_time, cut.creation_time, "one point in time");
        assert!(s.ready_to_use);
    }
    let member_of = |id: &str| {
        cut.snapshots
            .iter()
            .find(|s| s.source_volume_id == id)
            .unwrap()
            .clone()
    };
    let a_records = restore(a_side, &member_of(&a), caps[0], "restore-a").await;
    let b_records = restore(b_side, &member_of(&b), caps[1], "restore-b").await;

    // Each member holds its own volume's records in order, without a hole.
    let a_count = a_records.len() as u64;
    let b_count = b_records.len() as u64;
    assert_eq!(a_records, (0..a_count).map(|i| 2 * i).collect::<Vec<_>>());
    assert_eq!(
        b_records,
        (0..b_count).map(|i| 2 * i + 1).collect::<Vec<_>>()
    );
    assert!(
        a_count + b_count >= 40,
        "records written before the cut are in"
    );
    let mut all: Vec<u64> = a_records.iter().chain(&b_records).copied().collect();
    all.sort();
    let k = all.len() as u64;
    assert_eq!(
        all,
        (0..k).collect::<Vec<_>>(),
        "the members together hold a prefix of the records (a: {a_records:?}, b: {b_records:?})"
    );
    assert!(k >= 40, "records written before the cut are in: {k}");
    assert!(
        k < total,
        "records written after the cut are not: {k} of {total}"
    );
    cut
}

/// The spec's error cases and the delete rules, on a group that exists.
async fn errors_and_delete(
    controller: &mut ControllerClient<Channel>,
    group: &mut GroupControllerClient<Channel>,
    cut: &proto::VolumeGroupSnapshot,
) {
    let sources: Vec<String> = cut
        .snapshots
        .iter()
        .map(|s| s.source_volume_id.clone())
        .collect();
    let a = sources[0].as_str();
    let b = sources[1].as_str();
    let unknown = a.replace(&a[4..12], "00000000");
    assert_code(
        group
            .create_volume_group_snapshot(group_request("", &[a]))
            .await,
        Code::InvalidArgument,
        &[],
    );
    assert_code(
        group
            .create_volume_group_snapshot(group_request("g", &[]))
            .await,
        Code::InvalidArgument,
        &[],
    );
    assert_code(
        group
            .create_volume_group_snapshot(group_request("g", &[a, a]))
            .await,
        Code::InvalidArgument,
        &[],
    );
    assert_code(
        group
            .create_volume_group_snapshot(group_request("g", &[a, &unknown]))
            .await,
        Code::NotFound,
        &[],
    );
    assert_code(
        group
            .create_volume_group_snapshot(group_request("g", &[a, MALFORMED_ID]))
            .await,
        Code::NotFound,
        &[],
    );
    let mut bad_param = group_request("g", &[a]);
    bad_param.parameters.insert("color".into(), "blue".into());
    assert_code(
        group.create_volume_group_snapshot(bad_param).await,
        Code::InvalidArgument,
        &[],
    );
    // The same name with other sources.
    assert_code(
        group
            .create_volume_group_snapshot(group_request("group-1", &[a]))
            .await,
        Code::AlreadyExists,
        &[],
    );

    let members: Vec<String> = cut
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.clone())
        .collect();
    let get = |ids: &[String]| proto::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: cut.group_snapshot_id.clone(),
        snapshot_ids: ids.to_vec(),
        ..Default::default()
    };
    let got = group
        .get_volume_group_snapshot(get(&members))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.group_snapshot.as_ref(), Some(cut));
    group.get_volume_group_snapshot(get(&[])).await.unwrap();
    assert_code(
        group.get_volume_group_snapshot(get(&members[..1])).await,
        Code::InvalidArgument,
        &[],
    );
    assert_code(
        group
            .get_volume_group_snapshot(proto::GetVolumeGroupSnapshotRequest::default())
            .await,
        Code::InvalidArgument,
        &[],
    );

    // Members are listed with their group, and cannot be deleted alone.
    let listed = controller
        .list_snapshots(proto::ListSnapshotsRequest {
            snapshot_id: members[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.entries[0]
            .snapshot
            .as_ref()
            .unwrap()
            .group_snapshot_id,
        cut.group_snapshot_id
    );
    assert_code(
        controller
            .delete_snapshot(delete_snapshot_request(&members[0]))
            .await,
        Code::InvalidArgument,
        &[],
    );

    // Delete: a wrong member list changes nothing; then the whole group goes, twice.
    let delete = |ids: &[String]| proto::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: cut.group_snapshot_id.clone(),
        snapshot_ids: ids.to_vec(),
        ..Default::default()
    };
    assert_code(
        group
            .delete_volume_group_snapshot(delete(&members[1..]))
            .await,
        Code::InvalidArgument,
        &[],
    );
    group
        .get_volume_group_snapshot(get(&members))
        .await
        .unwrap();
    for _ in 0..2 {
        group
            .delete_volume_group_snapshot(delete(&members))
            .await
            .unwrap();
    }
    assert_code(
        group.get_volume_group_snapshot(get(&[])).await,
        Code::NotFound,
        &[],
    );
    for member in &members {
        let left = controller
            .list_snapshots(proto::ListSnapshotsRequest {
                snapshot_id: member.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(left.entries.is_empty(), "member {member} is gone");
    }
    // The name is free again: a new cut of both volumes.
    let fresh = cut_group(group, group_request("group-1", &[b, a])).await;
    assert_eq!(fresh.group_snapshot_id, cut.group_snapshot_id);
}

async fn all_in_one(members: [proto::VolumeCapability; 2]) {
    let driver = Driver::start().await;
    let mut sides = [Side::new(&driver), Side::new(&driver)];
    let mut group = driver.group_controller();
    let caps = group
        .group_controller_get_capabilities(proto::GroupControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities.len(), 1);
    let cut = consistent_group(
        &mut sides,
        &mut group,
        [&members[0], &members[1]],
        [None, None],
    )
    .await;
    errors_and_delete(&mut driver.controller(), &mut group, &cut).await;
}

#[tokio::test]
async fn filesystem_members_hold_one_point_in_time() {
    all_in_one([mount_cap("ext4"), mount_cap("ext4")]).await;
}

/// A raw block member in use is flushed, not frozen (a loop device cannot be held
/// still), and is cut while the filesystem member stays frozen: together they still
/// hold one point in time.
#[tokio::test]
async fn a_block_member_beside_a_frozen_one_holds_one_point_in_time() {
    all_in_one([block_cap(), mount_cap("ext4")]).await;
}

/// Two raw block volumes in use cannot be cut at one instant: the spec asks for a
/// failure then. FAILED_PRECONDITION and no member left; once one of
/// them is unstaged the same request succeeds.
#[tokio::test]
async fn two_block_members_in_use_are_refused() {
    let driver = Driver::start().await;
    let mut side = Side::new(&driver);
    let mut group = driver.group_controller();
    let cap = block_cap();
    let (a, _, a_staging) = make_volume(&mut side, "pvc-a", &cap, None).await;
    let (b, _, _) = make_volume(&mut side, "pvc-b", &cap, None).await;
    let request = group_request("group-1", &[&a, &b]);
    let refused = group
        .create_volume_group_snapshot(request.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("source_volume_ids") && refused.message().contains(&a),
        "the message names the field and the volumes: {}",
        refused.message()
    );
    let snapshots = side
        .controller
        .list_snapshots(proto::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        snapshots.entries.is_empty(),
        "no member left: {snapshots:?}"
    );

    let target = side.node.path("target-pvc-a");
    side.node
        .unpublish_and_unstage(&a, &a_staging, &target)
        .await;
    let cut = cut_group(&mut group, request).await;
    assert_eq!(cut.snapshots.len(), 2);
}

#[tokio::test]
async fn split_members_on_two_nodes() {
    let cluster = Cluster::start(&["2Gi", "2Gi"]).await;
    let controller = cluster.controller().controller();
    let mut group = cluster.controller().group_controller();
    let mut sides = ["node-a", "node-b"].map(|id| Side {
        controller: controller.clone(),
        node: cluster.node(id),
    });
    let cut = consistent_group(
        &mut sides,
        &mut group,
        [&mount_cap("ext4"), &block_cap()],
        [
            Some(topology(&["node-a"], &["node-a"])),
            Some(topology(&["node-b"], &["node-b"])),
        ],
    )
    .await;
    let nodes: Vec<&str> = cut
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.rsplit('-').next().unwrap())
        .collect();
    assert!(
        nodes.contains(&"a") && nodes.contains(&"b"),
        "members on both nodes: {nodes:?}"
    );
    errors_and_delete(&mut controller.clone(), &mut group, &cut).await;
}

/// A crash while every member is frozen (held at the `group-frozen` pause point) leaves
/// nothing frozen once kura starts again, and no group; the retry cuts it.
#[tokio::test]
async fn a_crash_while_frozen_thaws_at_restart() {
    let mut kura = Kura::new(PoolKind::Image);
    let channel = kura.start().await;
    let mut side = Side::new(&kura);
    let cap = mount_cap("ext4");
    let (a, _, a_staging) = make_volume(&mut side, "pvc-a", &cap, None).await;
    let (b, _, b_staging) = make_volume(&mut side, "pvc-b", &cap, None).await;
    let _thaw = [ThawOnDrop(a_staging.clone()), ThawOnDrop(b_staging.clone())];
    let frozen = kura.pause.arm("group-frozen");
    let call = tokio::spawn({
        let mut group = GroupControllerClient::new(channel);
        let request = group_request("group-crash", &[&a, &b]);
        async move { group.create_volume_group_snapshot(request).await }
    });
    frozen.held(|| call.is_finished()).await;
    assert!(
        is_frozen(&a_staging) && is_frozen(&b_staging),
        "both members are frozen together"
    );
    kura.kill();
    drop(frozen);
    let _ = call.await;

    let channel = kura.start().await;
    assert!(
        !is_frozen(&a_staging) && !is_frozen(&b_staging),
        "start-up thawed both"
    );
    let mut group = GroupControllerClient::new(channel);
    let cut = cut_group(&mut group, group_request("group-crash", &[&a, &b])).await;
    assert_eq!(cut.snapshots.len(), 2);
    assert!(!is_frozen(&a_staging) && !is_frozen(&b_staging));
}

/// A member that cannot be frozen (node-b's volume is busy: a snapshot of it is held
/// mid-way) fails the group with ABORTED, and every node is thawed and left without
/// members; once the volume is free the same request cuts the group.
#[tokio::test]
async fn a_failing_member_thaws_every_node() {
    let cluster = Cluster::start(&["2Gi", "2Gi"]).await;
    let mut controller = cluster.controller().controller();
    let mut group = cluster.controller().group_controller();
    let cap = mount_cap("ext4");
    let mut made = Vec::new();
    for id in ["node-a", "node-b"] {
        let node = cluster.node(id);
        let mut side = Side {
            controller: controller.clone(),
            node,
        };
        let topology = Some(topology(&[id], &[id]));
        made.push(make_volume(&mut side, &format!("pvc-{id}"), &cap, topology).await);
    }
    let (a, _, a_staging) = made[0].clone();
    let (b, _, b_staging) = made[1].clone();
    let _thaw = [ThawOnDrop(a_staging.clone()), ThawOnDrop(b_staging.clone())];

    let held = cluster.node("node-b").pause.arm("quiesced");
    let snapshot = tokio::spawn({
        let mut controller = controller.clone();
        let request = snapshot_request("snap-b", &b);
        async move { controller.create_snapshot(request).await }
    });
    held.held(|| snapshot.is_finished()).await;
    assert_code(
        group
            .create_volume_group_snapshot(group_request("group-busy", &[&a, &b]))
            .await,
        Code::Aborted,
        &[],
    );
    assert!(
        !is_frozen(&a_staging),
        "node-a is thawed after node-b failed"
    );
    let members = controller
        .list_snapshots(proto::ListSnapshotsRequest {
            source_volume_id: a.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(members.entries.is_empty(), "no member is left: {members:?}");
    drop(held);
    snapshot.await.unwrap().unwrap();
    assert!(!is_frozen(&b_staging));
    let cut = cut_group(&mut group, group_request("group-busy", &[&a, &b])).await;
    assert_eq!(cut.snapshots.len(), 2);
    assert!(!is_frozen(&a_staging) && !is_frozen(&b_staging));
}

/// A controller that never ends its freeze (held after the cut, before the thaw)
/// cannot keep the members frozen or locked: past the deadline the node thaws them and
/// frees their locks by itself.
#[tokio::test]
async fn a_freeze_nobody_ends_is_ended_by_the_deadline() {
    let driver = Driver::start().await;
    let mut side = Side::new(&driver);
    let cap = mount_cap("ext4");
    let (a, _, a_staging) = make_volume(&mut side, "pvc-a", &cap, None).await;
    let (b, _, b_staging) = make_volume(&mut side, "pvc-b", &cap, None).await;
    let _thaw = [ThawOnDrop(a_staging.clone()), ThawOnDrop(b_staging.clone())];
    let cut = driver.pause.arm("group-cut");
    let call = tokio::spawn({
        let mut group = driver.group_controller();
        let request = group_request("group-late", &[&a, &b]);
        async move { group.create_volume_group_snapshot(request).await }
    });
    cut.held(|| call.is_finished()).await;
    assert!(is_frozen(&a_staging) && is_frozen(&b_staging));
    let snapshot = |name: &str| snapshot_request(name, &a);
    assert_code(
        side.controller
            .create_snapshot(snapshot("snap-early"))
            .await,
        Code::Aborted,
        &[],
    );
    tokio::time::sleep(kura::node::GROUP_HOLD_DEADLINE + Duration::from_secs(2)).await;
    assert!(
        !is_frozen(&a_staging) && !is_frozen(&b_staging),
        "the deadline thawed both"
    );
    side.controller
        .create_snapshot(snapshot("snap-late"))
        .await
        .expect("the deadline freed the locks");
    drop(cut);
    call.await.unwrap().unwrap();
}
