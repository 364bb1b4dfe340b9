//! Replicas: a controller and two or three nodes as real processes. A replicated
//! volume's node ships points to other nodes; when it is lost, a clone or a restore is
//! served from the newest replica; a delete while it is down leaves tombstones, and the
//! node deletes its copy when it comes back (back before, it ships only the changes);
//! a replica killed mid-commit keeps its previous point; a full replica pool degrades
//! the volume, which serves on; grants keep nodes to what they hold; ModifyVolume
//! turns replication on and off; copies go to distinct nodes, and a lost replica node
//! is replaced.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::cluster::*;
use common::metrics::{Scrape, metrics_address};
use common::process::Proc;
use common::*;
use kura::csi::proto;
use serde_json::Value;
use tonic::Code;

const SIZES: [&str; 3] = ["2Gi", "2Gi", "2Gi"];
/// Two nodes: the volume's and one to hold its copy.
const TWO: [&str; 2] = ["2Gi", "2Gi"];
const REPLICAS: &str = "kura.csi.dev/replicas";
const INTERVAL_KEY: &str = "kura.csi.dev/replication-interval";
const RECORD: u64 = 4096;
const INTERVAL: &str = "5s";
/// Longer than any wait below should ever take.
const DEADLINE: Duration = Duration::from_secs(120);

/// Parameters of a volume with `copies` replicas every [`INTERVAL`].
fn replicated(copies: &str) -> Vec<(&'static str, String)> {
    replicated_every(copies, INTERVAL)
}

/// Parameters of a volume with `copies` replicas every `interval`.
fn replicated_every(copies: &str, interval: &str) -> Vec<(&'static str, String)> {
    vec![
        (REPLICAS, copies.to_owned()),
        (INTERVAL_KEY, interval.to_owned()),
    ]
}

fn params<'a>(list: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    list.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A block volume on `node` with `parameters`; its ID.
async fn block_volume(
    controller: &Proc,
    name: &str,
    node: &str,
    parameters: &[(&str, &str)],
) -> String {
    let mut request = on_node(name, 64 * MIB, node, block_cap(), None);
    request.parameters = parameters
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    controller
        .create(request)
        .await
        .expect("CreateVolume")
        .volume_id
}

/// Record `n`: its number, again and again, in one block.
fn record(n: u64) -> Vec<u8> {
    n.to_le_bytes().repeat((RECORD / 8) as usize)
}

/// How many records from the start of `device` are whole, and whether anything
/// follows the first missing one (a replica must hold a prefix, nothing after a gap).
fn prefix_of_records(device: &Path, written: u64) -> (u64, bool) {
    let bytes = read_at(device, 0, (written * RECORD) as usize);
    let mut prefix = None;
    let mut after_gap = false;
    for n in 0..written {
        let block = &bytes[(n * RECORD) as usize..((n + 1) * RECORD) as usize];
        let whole = block == record(n).as_slice();
        match prefix {
            None if !whole => prefix = Some(n),
            Some(_) if block.iter().any(|b| *b != 0) => after_gap = true,
            _ => {}
        }
    }
    (prefix.unwrap_or(written), after_gap)
}

/// Writes numbered records to `device`, each made durable before the next, until
/// `stop`; `count` is the number written, `times` when each was.
struct Writer {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<Instant>>,
}

impl Writer {
    fn start(device: std::path::PathBuf) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, c) = (Arc::clone(&stop), Arc::clone(&count));
        let task = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&device)
                .unwrap();
            let mut times = Vec::new();
            let mut n = 0u64;
            while !s.load(Ordering::SeqCst) && (n + 1) * RECORD < 64 * MIB as u64 {
                // A write that fails (the node was killed under it) ends the stream.
                if file.write_all_at(&record(n), n * RECORD).is_err() || file.sync_data().is_err() {
                    break;
                }
                times.push(Instant::now());
                n += 1;
                c.store(n, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
            times
        });
        Writer { stop, count, task }
    }

    async fn stop(self) -> Vec<Instant> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

/// CreateVolume again while the answer is ABORTED or UNAVAILABLE (a copy running, a
/// node not yet seen down), until it is something else.
async fn create_until_done(
    controller: &Proc,
    request: proto::CreateVolumeRequest,
) -> Result<proto::Volume, tonic::Status> {
    until_done(|| controller.create(request.clone())).await
}

/// `call` again while its answer is ABORTED or UNAVAILABLE, until it is something else.
async fn until_done<T, F: std::future::Future<Output = Result<T, tonic::Status>>>(
    mut call: impl FnMut() -> F,
) -> Result<T, tonic::Status> {
    let started = Instant::now();
    loop {
        match call().await {
            Err(status)
                if matches!(status.code(), Code::Aborted | Code::Unavailable)
                    && started.elapsed() < DEADLINE =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
}

/// Waits until the volume's condition, as the controller reports it, satisfies `ok`.
async fn wait_for_condition(
    controller: &Proc,
    id: &str,
    ok: impl Fn(&proto::VolumeCondition) -> bool,
) -> proto::VolumeCondition {
    let started = Instant::now();
    loop {
        let got = controller
            .controller()
            .controller_get_volume(proto::ControllerGetVolumeRequest {
                volume_id: id.to_owned(),
            })
            .await
            .ok()
            .and_then(|r| r.into_inner().status)
            .and_then(|s| s.volume_condition);
        if let Some(condition) = got {
            if ok(&condition) {
                return condition;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "the condition stayed {condition:?}"
            );
        }
        assert!(started.elapsed() < DEADLINE, "no condition for {id}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn source_volume(id: &str) -> Option<proto::VolumeContentSource> {
    Some(proto::VolumeContentSource {
        r#type: Some(proto::volume_content_source::Type::Volume(
            proto::volume_content_source::VolumeSource {
                volume_id: id.to_owned(),
            },
        )),
    })
}

fn source_snapshot(id: &str) -> Option<proto::VolumeContentSource> {
    Some(proto::VolumeContentSource {
        r#type: Some(proto::volume_content_source::Type::Snapshot(
            proto::volume_content_source::SnapshotSource {
                snapshot_id: id.to_owned(),
            },
        )),
    })
}

/// Stages and publishes volume `id` on `node` as a block device (at `stage-<tag>`),
/// runs `f` on the device in a blocking thread, then unpublishes and unstages.
async fn on_device<T: Send + 'static>(
    node: &NodeProc,
    id: &str,
    tag: &str,
    f: impl FnOnce(&Path) -> T + Send + 'static,
) -> T {
    let cap = block_cap();
    let (staging, device) = node.stage_and_publish(id, &cap, tag).await;
    let on = device.clone();
    let out = tokio::task::spawn_blocking(move || f(&on)).await.unwrap();
    node.unpublish_and_unstage(id, &staging, &device).await;
    out
}

/// Reads the records of a volume made from a replica, on its node.
async fn records_on(
    cluster: &Cluster,
    volume: &proto::Volume,
    tag: &str,
    written: u64,
) -> (u64, bool) {
    let node = cluster.node(&volume_node(volume));
    on_device(node, &volume.volume_id, tag, move |device| {
        prefix_of_records(device, written)
    })
    .await
}

/// Nodes of `sizes` and a controller with `controller_flags`; node-a exports its
/// metrics at `metrics`, if given.
async fn start_cluster(
    sizes: &[&str],
    metrics: Option<SocketAddr>,
    controller_flags: &[&str],
) -> Cluster {
    let mut cluster = Cluster::new(sizes);
    if let Some(address) = metrics {
        let a = cluster.node_mut("node-a");
        a.args
            .extend(["--metrics-listen".to_owned(), address.to_string()]);
    }
    for node in &mut cluster.nodes {
        node.start().await;
    }
    let flags: Vec<String> = controller_flags.iter().map(|f| f.to_string()).collect();
    cluster.add_controller_with(&flags).await;
    cluster
}

/// Polls `found` until it answers something; fails after [`DEADLINE`], saying `what`
/// was waited for.
async fn wait_for<T>(what: &str, mut found: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = found() {
            return value;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "waited {DEADLINE:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn read_json(path: &Path) -> Option<Value> {
    let bytes = std::fs::read(path).ok()?;
    Some(serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// Where `node` keeps what it holds of another node's volume `id`.
fn replica_dir(node: &NodeProc, id: &str) -> PathBuf {
    node.pool_root().join("replicas").join(id)
}

/// `node`'s record of what it holds of volume `id`.
fn replica_record(node: &NodeProc, id: &str) -> Option<Value> {
    read_json(&replica_dir(node, id).join("record.json"))
}

/// The point of volume `id` that `node` holds whole: its number, and when it was
/// taken (Unix seconds).
fn held_point(node: &NodeProc, id: &str) -> Option<(u64, i64)> {
    let record = replica_record(node, id)?;
    let point = record.get("point")?;
    Some((
        point["number"].as_u64()?,
        point["taken"]["seconds"].as_i64()?,
    ))
}

fn replica_point_image(node: &NodeProc, id: &str, number: u64) -> PathBuf {
    replica_dir(node, id).join(format!("point-{number}.img"))
}

/// Waits until `node` holds a point of volume `id` taken after `after` (Unix
/// seconds); its number.
async fn wait_for_point_after(node: &NodeProc, id: &str, after: i64) -> u64 {
    let what = format!("{} to hold a point of {id} taken after {after}", node.id);
    wait_for(&what, || {
        held_point(node, id)
            .filter(|(_, taken)| *taken > after)
            .map(|(number, _)| number)
    })
    .await
}

/// The volume's record on its own node.
fn volume_record(node: &NodeProc, id: &str) -> Option<Value> {
    read_json(&node.pool_root().join("volumes").join(format!("{id}.json")))
}

/// The nodes placed to hold copies of volume `id`, as its node's record names them.
fn placed(node: &NodeProc, id: &str) -> Vec<String> {
    let record = volume_record(node, id).unwrap_or_default();
    let replicas = record["replication"]["replicas"].as_array().cloned();
    replicas
        .unwrap_or_default()
        .iter()
        .map(|p| p["node"].as_str().unwrap().to_owned())
        .collect()
}

/// The point of volume `id` its node (`source`) last recorded `replica` as holding.
fn shipped_to(source: &NodeProc, id: &str, replica: &str) -> Option<u64> {
    let state = read_json(
        &source
            .pool_root()
            .join("replication")
            .join(id)
            .join("state.json"),
    )?;
    state["shipped"][replica]["point"].as_u64()
}

/// Writes `data` at `offset` of volume `id` on `node` and makes it durable; answers
/// when the write was done (Unix seconds).
async fn write_volume(node: &NodeProc, id: &str, tag: &str, offset: u64, data: Vec<u8>) -> i64 {
    on_device(node, id, tag, move |device| write_at(device, offset, &data)).await;
    now_secs()
}

/// Waits until the volume's node has recorded `replica` as holding the point it
/// holds: from then on the node keeps that point as the base of the next delta.
async fn wait_until_recorded(source: &NodeProc, replica: &NodeProc, id: &str) -> u64 {
    let what = format!("{} to record the point {} holds", source.id, replica.id);
    wait_for(&what, || {
        let (held, _) = held_point(replica, id)?;
        (shipped_to(source, id, &replica.id) == Some(held)).then_some(held)
    })
    .await
}

fn shipped_series(id: &str, replica: &str) -> String {
    format!(
        "kura_replica_shipped_bytes_total{{node=\"node-a\",volume_id=\"{id}\",replica=\"{replica}\"}}"
    )
}

/// ControllerModifyVolume with `pairs` as mutable parameters.
async fn modify(controller: &Proc, id: &str, pairs: &[(&str, &str)]) {
    controller
        .controller()
        .controller_modify_volume(proto::ControllerModifyVolumeRequest {
            volume_id: id.to_owned(),
            mutable_parameters: string_map(pairs),
            ..Default::default()
        })
        .await
        .expect("ControllerModifyVolume");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_node_costs_at_most_an_interval_clone_and_restore_from_replicas() {
    let mut cluster = Cluster::start(&SIZES).await;
    let controller = cluster.controller();
    let id = block_volume(
        controller,
        "pvc-records",
        "node-a",
        &params(&replicated("1")),
    )
    .await;
    let condition = wait_for_condition(controller, &id, |c| !c.abnormal).await;
    assert!(condition.message.contains("replicated to"), "{condition:?}");

    let a = cluster.node("node-a");
    let cap = block_cap();
    let (_staging, device) = a.stage_and_publish(&id, &cap, "records").await;
    let writer = Writer::start(device);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let before_snapshot = writer.count.load(Ordering::SeqCst);
    let snapshot = controller.create_snapshot("snap-records", &id).await;
    let after_snapshot = writer.count.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(12)).await;

    // The disk is lost with its node: killed, never to come back.
    cluster.node_mut("node-a").kill();
    let killed = Instant::now();
    let times = writer.stop().await;
    let written = times.len() as u64;
    assert!(written > 100, "only {written} records were written");
    let controller = cluster.controller();

    let clone = create_until_done(
        controller,
        create_request("pvc-clone", 64 * MIB, &[], source_volume(&id)),
    )
    .await
    .expect("a clone of a volume whose node is lost");
    assert_ne!(volume_node(&clone), "node-a");
    let restore = create_until_done(
        controller,
        create_request(
            "pvc-restore",
            64 * MIB,
            &[],
            source_snapshot(&snapshot.snapshot_id),
        ),
    )
    .await
    .expect("a restore of a snapshot whose node is lost");
    assert_ne!(volume_node(&restore), "node-a");

    let (kept, gap) = records_on(&cluster, &clone, "clone", written).await;
    assert!(!gap, "the clone holds records after a missing one");
    let lost = written - kept;
    // What a point cannot have: the records written after it was taken, at most one
    // interval plus the shipping before the loss.
    let window = Duration::from_secs(5) + Duration::from_secs(5);
    let oldest_lost = times.get(kept as usize).copied().unwrap_or(killed);
    println!(
        "records written {written}, kept by the clone {kept}, lost {lost} (the first lost \
         written {:.1}s before the loss)",
        killed.duration_since(oldest_lost).as_secs_f64()
    );
    assert!(
        killed.duration_since(oldest_lost) <= window,
        "lost {lost} records, from {:?} before the loss",
        killed.duration_since(oldest_lost)
    );

    let (in_restore, gap) = records_on(&cluster, &restore, "restore", written).await;
    assert!(!gap, "the restore holds records after a missing one");
    assert!(
        (before_snapshot..=after_snapshot).contains(&in_restore),
        "the restore holds {in_restore} records; {before_snapshot} to {after_snapshot} \
         were written while the snapshot was cut"
    );
}

/// Reads `len` bytes at `offset` of the point of volume `id` that `node` holds now;
/// answers its number too. (The point is replaced as newer ones come: an image
/// removed between finding and opening it is looked for again.)
async fn read_held(node: &NodeProc, id: &str, offset: u64, len: usize) -> (u64, Vec<u8>) {
    use std::os::unix::fs::FileExt;
    let what = format!("a point of {id} on {} to read", node.id);
    let (number, file) = wait_for(&what, || {
        let (number, _) = held_point(node, id)?;
        let file = std::fs::File::open(replica_point_image(node, id, number)).ok()?;
        Some((number, file))
    })
    .await;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .expect("read a replica's point");
    (number, buf)
}

/// The names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Waits until the controller no longer counts `node` among the live nodes (it
/// reports no capacity there).
async fn wait_until_seen_down(controller: &Proc, node: &str) {
    let started = Instant::now();
    loop {
        let capacity = controller
            .controller()
            .get_capacity(proto::GetCapacityRequest {
                accessible_topology: Some(node_topology(node)),
                ..Default::default()
            })
            .await
            .map_or(0, |r| r.into_inner().available_capacity);
        if capacity == 0 {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the controller still sees {node}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_back_after_its_volume_was_deleted_removes_its_copy() {
    let mut cluster = start_cluster(&TWO, None, &[]).await;
    let id = block_volume(
        cluster.controller(),
        "pvc-deleted",
        "node-a",
        &params(&replicated("1")),
    )
    .await;
    let data = pattern(1, MIB as usize);
    let written = write_volume(cluster.node("node-a"), &id, "data", 0, data).await;
    wait_for_point_after(cluster.node("node-b"), &id, written).await;

    // The node is lost (its pool kept); the volume is deleted meanwhile.
    cluster.node_mut("node-a").kill();
    let controller = cluster.controller();
    until_done(|| controller.delete_volume(&id))
        .await
        .expect("DeleteVolume with the volume's node down");
    let b = cluster.node("node-b");
    let record = replica_record(b, &id).expect("a tombstone on node-b");
    assert_eq!(record["deleted"], true, "{record}");
    assert!(record["point"].is_null(), "{record}");
    assert_eq!(
        names_in(&replica_dir(b, &id)),
        ["record.json"],
        "the copy is gone, the tombstone stays"
    );
    // The CO retries a delete: done already, still done.
    controller
        .delete_volume(&id)
        .await
        .expect("DeleteVolume again");

    // It comes back with its pool: node-b's tombstone tells it, and its copy goes.
    let a = cluster.node_mut("node-a");
    assert!(
        volume_record(a, &id).is_some(),
        "node-a's pool kept the volume"
    );
    a.start().await;
    let came_back = Instant::now();
    let a = cluster.node("node-a");
    let image = volume_image(&a.pool_root(), &id);
    wait_for("node-a to delete its copy", || {
        (volume_record(a, &id).is_none() && !image.exists()).then_some(())
    })
    .await;
    println!(
        "node-a deleted its copy {:.1}s after it came back",
        came_back.elapsed().as_secs_f64()
    );
    assert!(!a.pool_root().join("replication").join(&id).exists());
    assert_code(
        cluster
            .controller()
            .controller()
            .controller_get_volume(get_volume_request(&id))
            .await,
        Code::NotFound,
        &[],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_back_before_the_deletion_resumes_and_ships_only_the_changes() {
    const BEFORE: usize = 32 << 20;
    const AFTER: usize = 1 << 20;
    let metrics = metrics_address();
    let mut cluster = start_cluster(&TWO, Some(metrics), &[]).await;
    let id = block_volume(
        cluster.controller(),
        "pvc-resumed",
        "node-a",
        &params(&replicated("1")),
    )
    .await;
    let first = pattern(1, BEFORE);
    let written = write_volume(cluster.node("node-a"), &id, "before", 0, first.clone()).await;
    wait_for_point_after(cluster.node("node-b"), &id, written).await;
    let held = wait_until_recorded(cluster.node("node-a"), cluster.node("node-b"), &id).await;
    let series = shipped_series(&id, "node-b");
    let full = Scrape::of(metrics).await.get(&series);
    assert!(full >= BEFORE as f64, "the first copy shipped {full} bytes");

    // Lost and back with its pool, before anyone deleted the volume.
    cluster.node_mut("node-a").kill();
    cluster.node_mut("node-a").start().await;
    let second = pattern(2, AFTER);
    let rewritten = write_volume(cluster.node("node-a"), &id, "after", 0, second.clone()).await;
    let b = cluster.node("node-b");
    wait_for_point_after(b, &id, rewritten).await;
    let (number, image) = read_held(b, &id, 0, BEFORE).await;
    assert!(number > held, "point {number} after point {held}");
    assert_eq!(image[..AFTER], second, "the replica holds the new data");
    assert_eq!(image[AFTER..], first[AFTER..], "and the old data around it");
    let delta = Scrape::of(metrics).await.get(&series);
    println!(
        "shipped: {full} bytes for the first copy of {BEFORE} bytes, {delta} bytes after \
         the restart for {AFTER} bytes rewritten"
    );
    assert!(
        (AFTER as f64..(4 * AFTER) as f64).contains(&delta),
        "{delta} bytes shipped after the restart"
    );
    let condition = wait_for_condition(cluster.controller(), &id, |c| !c.abnormal).await;
    assert!(condition.message.contains("node-b"), "{condition:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_mid_commit_keeps_its_previous_point_and_catches_up() {
    let mut cluster = start_cluster(&TWO, None, &[]).await;
    let id = block_volume(
        cluster.controller(),
        "pvc-commit",
        "node-a",
        &params(&replicated("1")),
    )
    .await;
    let old = pattern(3, MIB as usize);
    let written = write_volume(cluster.node("node-a"), &id, "old", 0, old.clone()).await;
    wait_for_point_after(cluster.node("node-b"), &id, written).await;

    // node-b's next commit is held after its fsync, before its rename; it dies there.
    let armed = cluster.node("node-b").pause.arm("replica-before-commit");
    let new = pattern(4, MIB as usize);
    write_volume(cluster.node("node-a"), &id, "new", 0, new.clone()).await;
    armed.held(|| false).await;
    cluster.node_mut("node-b").kill();
    drop(armed);
    let b = cluster.node("node-b");
    let (kept, _) = held_point(b, &id).expect("node-b's record names a point");
    let left = names_in(&replica_dir(b, &id));
    assert!(
        left.iter()
            .any(|n| n.starts_with("point-") && n.ends_with(".img.partial")),
        "the commit was cut after its fsync: {left:?}"
    );
    assert_eq!(
        read_at(&replica_point_image(b, &id, kept), 0, MIB as usize),
        old
    );

    // The volume's node is lost too; node-b comes back: the cut commit is gone, the
    // point before it whole, and a clone is made from it.
    cluster.node_mut("node-a").kill();
    cluster.node_mut("node-b").start().await;
    let b = cluster.node("node-b");
    assert_eq!(
        names_in(&replica_dir(b, &id)),
        [format!("point-{kept}.img"), "record.json".to_owned()]
    );
    let controller = cluster.controller();
    let clone = create_until_done(
        controller,
        create_request("pvc-commit-clone", 64 * MIB, &[], source_volume(&id)),
    )
    .await
    .expect("a clone of a volume whose node is down");
    assert_eq!(volume_node(&clone), "node-b");
    let cloned = on_device(b, &clone.volume_id, "clone", |device| {
        read_at(device, 0, MIB as usize)
    })
    .await;
    assert!(cloned == old, "the clone holds the point node-b committed");

    // The volume's node comes back: node-b catches up.
    cluster.node_mut("node-a").start().await;
    let b = cluster.node("node-b");
    let what = format!("node-b to take a point after point {kept}");
    wait_for(&what, || held_point(b, &id).filter(|(n, _)| *n > kept)).await;
    let (number, data) = read_held(b, &id, 0, MIB as usize).await;
    assert!(number > kept);
    assert!(
        data == new,
        "point {number} holds the data written before the cut"
    );
}

/// Fills `node`'s pool with a thick volume of what is free there; its ID.
async fn fill_pool(controller: &Proc, node: &NodeProc) -> String {
    let free = kura::sys::fs::usage(&node.pool_root())
        .unwrap()
        .available_bytes as i64;
    let mut size = free / MIB * MIB;
    loop {
        let mut request = on_node(
            &format!("pvc-filler-{size}"),
            size,
            &node.id,
            block_cap(),
            None,
        );
        request.parameters = string_map(&[(PROVISIONING, "thick")]);
        match controller.create(request).await {
            Ok(volume) => return volume.volume_id,
            // The filesystem's own blocks: a little less.
            Err(s) if s.code() == Code::ResourceExhausted && size > free / 2 => size -= 4 * MIB,
            Err(s) => panic!("filling {}: {s:?}", node.id),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_replica_pool_degrades_the_volume_which_keeps_serving() {
    const CHANGE: usize = 48 << 20;
    let cluster = start_cluster(&["2Gi", "1Gi"], None, &[]).await;
    let controller = cluster.controller();
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    let id = block_volume(controller, "pvc-full", "node-a", &params(&replicated("1"))).await;
    let first = pattern(5, MIB as usize);
    let written = write_volume(a, &id, "first", 0, first.clone()).await;
    wait_for_point_after(b, &id, written).await;

    let filler = fill_pool(controller, b).await;
    let free = kura::sys::fs::usage(&b.pool_root())
        .unwrap()
        .available_bytes;
    assert!(free < CHANGE as u64, "{free} bytes still free on node-b");
    let cap = block_cap();
    let (staging, device) = a.stage_and_publish(&id, &cap, "serving").await;
    let on = device.clone();
    tokio::task::spawn_blocking(move || write_at(&on, 0, &pattern(6, CHANGE)))
        .await
        .unwrap();
    let condition = wait_for_condition(controller, &id, |c| c.abnormal).await;
    println!("with node-b's pool full: {}", condition.message);
    assert!(
        condition.message.contains("replication degraded")
            && condition.message.contains("replica on node-b is failing")
            && condition.message.contains("not enough space"),
        "{condition:?}"
    );

    // The volume serves on: its I/O never waits for its replica.
    let started = Instant::now();
    let on = device.clone();
    let more = pattern(7, MIB as usize);
    let expected = more.clone();
    let read = tokio::task::spawn_blocking(move || {
        write_at(&on, CHANGE as u64, &more);
        read_at(&on, CHANGE as u64, MIB as usize)
    })
    .await
    .unwrap();
    assert!(read == expected, "a write and a read while degraded");
    assert!(started.elapsed() < Duration::from_secs(10));
    a.unpublish_and_unstage(&id, &staging, &device).await;
    // The replica still holds its last whole point.
    let (_, held) = read_held(b, &id, 0, MIB as usize).await;
    assert!(
        held == first,
        "node-b's point is the one before its pool filled"
    );

    // Room again: the replica catches up, and the volume is healthy.
    controller
        .delete_volume(&filler)
        .await
        .expect("delete the filler");
    let freed = now_secs();
    wait_for_point_after(b, &id, freed).await;
    wait_for_condition(controller, &id, |c| !c.abnormal).await;
    let (_, caught_up) = read_held(b, &id, 0, MIB as usize).await;
    assert!(caught_up == pattern(6, MIB as usize));
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_placed_node_with_a_valid_grant_reads_a_point() {
    use kura::agent::proto as agent;
    use kura::pool::VolumeId;
    use kura::pool::replica::grant;
    let cluster = start_cluster(&TWO, None, &[]).await;
    // One point, kept for the whole test: the next is an hour away.
    let id = block_volume(
        cluster.controller(),
        "pvc-grants",
        "node-a",
        &params(&replicated_every("1", "1h")),
    )
    .await;
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    let number = wait_for_point_after(b, &id, 0).await;
    let record = volume_record(a, &id).unwrap();
    let secret = record["replication"]["replicas"][0]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let volume = VolumeId::parse(&id).unwrap();
    let later = now_secs() + 600;
    let read = |node: &str, grant: String| agent::ReadPointRequest {
        volume_id: id.clone(),
        node: node.to_owned(),
        grant,
        target: Some(agent::read_point_request::Target::Point(number)),
        base_point: 0,
    };
    let ca = cluster.certs.join("ca.crt");
    let mut as_node = agent_client(a.agent, &ca, Some(&cluster.certs.join("node")));
    let mut as_controller = agent_client(a.agent, &ca, Some(&cluster.certs.join("controller")));

    for (what, request, needle) in [
        (
            "a node that holds no replica",
            read("node-c", grant(&secret, &volume, "node-c", later)),
            "holds no replica",
        ),
        (
            "a forged grant",
            read("node-b", grant("guessed", &volume, "node-b", later)),
            "not valid",
        ),
        (
            "another node's grant",
            read("node-b", grant(&secret, &volume, "node-c", later)),
            "not valid",
        ),
        (
            "an expired grant",
            read("node-b", grant(&secret, &volume, "node-b", now_secs() - 60)),
            "expired",
        ),
    ] {
        println!("{what}");
        assert_code(
            as_node.read_point(request).await,
            Code::PermissionDenied,
            &[needle],
        );
    }
    let valid = read("node-b", grant(&secret, &volume, "node-b", later));
    assert_code(
        as_controller.read_point(valid.clone()).await,
        Code::PermissionDenied,
        &["node identity"],
    );

    // The placed node's grant reads the point: the very bytes node-b holds.
    let mut stream = as_node
        .read_point(valid)
        .await
        .expect("ReadPoint with a valid grant")
        .into_inner();
    let header = stream.message().await.unwrap().expect("a header");
    assert_eq!(header.size_bytes, 64 * MIB as u64);
    assert!(!header.delta && header.chunk.is_none(), "{header:?}");
    let digest = loop {
        let message = stream
            .message()
            .await
            .unwrap()
            .expect("a digest at the end");
        let chunk = message.chunk.expect("a chunk");
        if chunk.last {
            break chunk.digest;
        }
    };
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let held = replica_record(b, &id).unwrap();
    assert_eq!(held["point"]["digest"], hex.as_str(), "{held}");
}

#[tokio::test(flavor = "multi_thread")]
async fn modify_volume_turns_replication_on_with_a_full_copy_and_off() {
    const DATA: usize = 8 << 20;
    let cluster = start_cluster(&TWO, None, &[]).await;
    let controller = cluster.controller();
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    let id = block_volume(controller, "pvc-modify", "node-a", &[]).await;
    let data = pattern(8, DATA);
    write_volume(a, &id, "data", 0, data.clone()).await;

    modify(
        controller,
        &id,
        &[(REPLICAS, "1"), (INTERVAL_KEY, INTERVAL)],
    )
    .await;
    assert_eq!(placed(a, &id), ["node-b"]);
    let condition = wait_for_condition(controller, &id, |c| !c.abnormal).await;
    assert!(
        condition.message.contains("replicated to node-b every 5s"),
        "{condition:?}"
    );
    // Its first point is the whole volume: the data written before.
    let (_, held) = read_held(b, &id, 0, DATA).await;
    assert!(held == data, "node-b's first point holds the volume's data");

    // Off while node-b is taking a point (its commit held there): its copy goes all
    // the same, once that commit is done.
    let armed = b.pause.arm("replica-before-commit");
    armed.held(|| false).await;
    let release = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(armed);
    };
    tokio::join!(modify(controller, &id, &[(REPLICAS, "0")]), release);
    assert!(placed(a, &id).is_empty());
    assert!(!a.pool_root().join("replication").join(&id).exists());
    assert!(
        !replica_dir(b, &id).exists(),
        "node-b still holds {:?}",
        names_in(&replica_dir(b, &id))
    );
    // And it stays so: nothing ships any more.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!replica_dir(b, &id).exists());
    let condition = wait_for_condition(controller, &id, |_| true).await;
    assert!(
        !condition.abnormal && !condition.message.contains("replicat"),
        "{condition:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn copies_go_to_distinct_other_nodes_and_too_few_nodes_degrade() {
    let mut cluster = start_cluster(&SIZES, None, &[]).await;
    let controller = cluster.controller();
    let id = block_volume(controller, "pvc-two", "node-a", &params(&replicated("2"))).await;
    let condition = wait_for_condition(controller, &id, |c| !c.abnormal).await;
    let a = cluster.node("node-a");
    let mut nodes = placed(a, &id);
    nodes.sort();
    assert_eq!(nodes, ["node-b", "node-c"]);
    for node in ["node-b", "node-c"] {
        assert!(condition.message.contains(node), "{condition:?}");
        assert!(held_point(cluster.node(node), &id).is_some(), "{node}");
    }

    // One other node left: a volume asking for two copies gets one, and says so.
    cluster.node_mut("node-c").kill();
    let controller = cluster.controller();
    wait_until_seen_down(controller, "node-c").await;
    let lonely = block_volume(
        controller,
        "pvc-two-of-one",
        "node-a",
        &params(&replicated("2")),
    )
    .await;
    let condition = wait_for_condition(controller, &lonely, |c| c.abnormal).await;
    assert!(
        condition.message.contains("1 of 2 copies placed"),
        "{condition:?}"
    );
    assert_eq!(placed(cluster.node("node-a"), &lonely), ["node-b"]);
    wait_for_point_after(cluster.node("node-b"), &lonely, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_node_lost_for_good_is_replaced() {
    let mut cluster = start_cluster(&SIZES, None, &["--replace-replicas-after", "5"]).await;
    let id = block_volume(
        cluster.controller(),
        "pvc-replaced",
        "node-a",
        &params(&replicated("1")),
    )
    .await;
    wait_for_condition(cluster.controller(), &id, |c| !c.abnormal).await;
    let lost = placed(cluster.node("node-a"), &id);
    assert_eq!(lost.len(), 1, "{lost:?}");
    let lost = lost[0].clone();
    let other = if lost == "node-b" { "node-c" } else { "node-b" };

    cluster.node_mut(&lost).kill();
    let killed = Instant::now();
    let a = cluster.node("node-a");
    let what = format!("the copy of {lost} to be placed on {other}");
    wait_for(&what, || (placed(a, &id) == [other]).then_some(())).await;
    wait_for_point_after(cluster.node(other), &id, 0).await;
    println!(
        "{other} holds a point {:.1}s after {lost} was lost",
        killed.elapsed().as_secs_f64()
    );
    let condition = wait_for_condition(cluster.controller(), &id, |c| !c.abnormal).await;
    assert!(condition.message.contains(other), "{condition:?}");
}
