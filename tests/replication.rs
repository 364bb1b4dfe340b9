//! Replicas: a controller and three nodes as real processes. A replicated volume's node
//! ships points to other nodes; when it is lost, a clone or a restore is served from
//! the newest replica; deletes while it is down leave tombstones; grants keep nodes
//! to what they hold.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::process::Proc;
use common::*;
use kura::csi::proto;
use tonic::Code;

const SIZES: [&str; 3] = ["2Gi", "2Gi", "2Gi"];
const RECORD: u64 = 4096;
const INTERVAL: &str = "5s";
/// Longer than any wait below should ever take.
const DEADLINE: Duration = Duration::from_secs(120);

/// Parameters of a volume with `copies` replicas every [`INTERVAL`].
fn replicated(copies: &str) -> Vec<(&'static str, String)> {
    vec![
        ("kura.csi.dev/replicas", copies.to_owned()),
        ("kura.csi.dev/replication-interval", INTERVAL.to_owned()),
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
    let started = Instant::now();
    loop {
        match controller.create(request.clone()).await {
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

/// Reads the records of a volume made from a replica, on its node.
async fn records_on(
    cluster: &Cluster,
    volume: &proto::Volume,
    tag: &str,
    written: u64,
) -> (u64, bool) {
    let node = cluster.node(&volume_node(volume));
    let cap = block_cap();
    let (staging, device) = node.stage_and_publish(&volume.volume_id, &cap, tag).await;
    let read = device.clone();
    let found = tokio::task::spawn_blocking(move || prefix_of_records(&read, written))
        .await
        .unwrap();
    node.unpublish_and_unstage(&volume.volume_id, &staging, &device)
        .await;
    found
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
