//! Paging through ListVolumes and ListSnapshots while other tasks create and delete
//! volumes and snapshots: every object that exists throughout a listing is listed
//! exactly once, nothing is listed twice, and nothing unknown is listed. All-in-one,
//! and split over three nodes (whose answers the controller merges into one order).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, topology};
use common::*;
use kura::csi::proto::controller_client::ControllerClient;
use kura::csi::proto::{self};
use kura::pool::{NodeToken, SnapshotId, VolumeId};
use tonic::transport::Channel;

/// Small pages, so a listing takes many calls with changes between them.
const PAGE: i32 = 4;
/// Objects that exist throughout the listings.
const STAYING: usize = 18;
/// Snapshots of the first staying volume, for the listing filtered by source.
const OF_FIRST: usize = 6;
/// Full listings of each kind.
const ROUNDS: usize = 3;

#[tokio::test(flavor = "multi_thread")]
async fn pages_list_what_exists_throughout_once_all_in_one() {
    let driver = Driver::start().await;
    pages_under_churn(driver.controller(), &[NODE_ID]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_list_what_exists_throughout_once_split() {
    let cluster = Cluster::start(&["2Gi", "2Gi", "2Gi"]).await;
    let controller = cluster.controller().controller();
    pages_under_churn(controller, &["node-a", "node-b", "node-c"]).await;
}

/// The scenario, over a controller whose volumes go to `nodes` in turn.
async fn pages_under_churn(controller: ControllerClient<Channel>, nodes: &[&str]) {
    let place = |i: usize| nodes[i % nodes.len()];
    let mut volumes = HashSet::new();
    let mut snapshots = HashSet::new();
    let mut of_first = HashSet::new();
    for i in 0..STAYING {
        let volume = create(&controller, &format!("staying-{i}"), place(i)).await;
        snapshots.insert(snapshot(&controller, &format!("staying-{i}"), &volume).await);
        volumes.insert(volume);
    }
    let first = create(&controller, "staying-0", place(0)).await;
    of_first.insert(snapshot(&controller, "staying-0", &first).await);
    for i in 1..OF_FIRST {
        of_first.insert(snapshot(&controller, &format!("of-first-{i}"), &first).await);
    }
    snapshots.extend(of_first.iter().cloned());
    let spread: HashSet<&str> = volumes.iter().map(|v| node_part(v)).collect();
    assert_eq!(
        spread.len(),
        nodes.len(),
        "volumes on every node: {spread:?}"
    );

    let churn = Churn::start(controller.clone(), nodes);
    for _ in 0..ROUNDS {
        let listed = churn.list_volumes(&controller).await;
        check(&listed, &volumes, &churn.made(), "ListVolumes");
        let listed = churn.list_snapshots(&controller, None).await;
        check(&listed, &snapshots, &churn.made(), "ListSnapshots");
        let listed = churn.list_snapshots(&controller, Some(&first)).await;
        check(
            &listed,
            &of_first,
            &HashSet::new(),
            "ListSnapshots of one volume",
        );
    }
    let done = churn.stop().await;
    // Each page waited for at least one more round of churn.
    assert!(done >= 10, "only {done} rounds of creates and deletes ran");
}

/// One whole listing: `listed` holds each ID as often as it was listed. Checks that
/// every object of `throughout` was listed once, and that nothing was listed twice or
/// is unknown (neither one of `throughout` nor one the churn made).
fn check(
    listed: &HashMap<String, usize>,
    throughout: &HashSet<String>,
    churned: &HashSet<String>,
    what: &str,
) {
    let twice: Vec<_> = listed.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "{what}: listed more than once: {twice:?}");
    let missing: Vec<_> = throughout
        .iter()
        .filter(|id| !listed.contains_key(*id))
        .collect();
    assert!(missing.is_empty(), "{what}: skipped: {missing:?}");
    let unknown: Vec<_> = listed
        .keys()
        .filter(|id| !throughout.contains(*id) && !churned.contains(*id))
        .collect();
    assert!(unknown.is_empty(), "{what}: unknown: {unknown:?}");
}

/// A task that creates a volume and a snapshot of it and deletes the previous round's
/// pair, round after round, until stopped.
struct Churn {
    rounds: Arc<AtomicUsize>,
    made: Arc<Mutex<HashSet<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Churn {
    fn start(controller: ControllerClient<Channel>, nodes: &[&str]) -> Churn {
        let rounds = Arc::new(AtomicUsize::new(0));
        let made = Arc::new(Mutex::new(HashSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let nodes: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
        let task = tokio::spawn({
            let (rounds, made, stop) = (rounds.clone(), made.clone(), stop.clone());
            async move {
                let mut previous: Option<(String, String)> = None;
                for k in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let node = nodes[k % nodes.len()].as_str();
                    let name = format!("churn-{k}");
                    // Known before the objects exist: a listing may see them before
                    // their creates answer.
                    let token = NodeToken::for_node(node);
                    let ids = [
                        VolumeId::derive(&name, &token).to_string(),
                        SnapshotId::derive(&name, &token).to_string(),
                    ];
                    made.lock().unwrap().extend(ids.clone());
                    let volume = create(&controller, &name, node).await;
                    let snap = snapshot(&controller, &name, &volume).await;
                    assert_eq!([volume.clone(), snap.clone()], ids);
                    if let Some((volume, snap)) = previous.replace((volume, snap)) {
                        controller
                            .clone()
                            .delete_snapshot(proto::DeleteSnapshotRequest {
                                snapshot_id: snap,
                                ..Default::default()
                            })
                            .await
                            .expect("DeleteSnapshot");
                        controller
                            .clone()
                            .delete_volume(proto::DeleteVolumeRequest {
                                volume_id: volume,
                                ..Default::default()
                            })
                            .await
                            .expect("DeleteVolume");
                    }
                    rounds.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Churn {
            rounds,
            made,
            stop,
            task,
        }
    }

    fn made(&self) -> HashSet<String> {
        self.made.lock().unwrap().clone()
    }

    /// Waits until the churn has finished one more round than when called, so every
    /// page of a listing is asked for after some objects came and went.
    async fn one_more_round(&self) {
        let from = self.rounds.load(Ordering::SeqCst);
        let started = Instant::now();
        while self.rounds.load(Ordering::SeqCst) == from {
            assert!(!self.task.is_finished(), "the churn task ended");
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no churn for 60 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// A whole ListVolumes, page by page.
    async fn list_volumes(&self, controller: &ControllerClient<Channel>) -> HashMap<String, usize> {
        self.whole_listing("ListVolumes", |token| async move {
            let page = controller
                .clone()
                .list_volumes(proto::ListVolumesRequest {
                    max_entries: PAGE,
                    starting_token: token,
                })
                .await
                .expect("ListVolumes")
                .into_inner();
            let ids = page.entries.into_iter();
            (
                ids.map(|e| e.volume.unwrap().volume_id).collect(),
                page.next_token,
            )
        })
        .await
    }

    /// A whole ListSnapshots, page by page, of one volume or of all.
    async fn list_snapshots(
        &self,
        controller: &ControllerClient<Channel>,
        source: Option<&str>,
    ) -> HashMap<String, usize> {
        self.whole_listing("ListSnapshots", |token| async move {
            let page = controller
                .clone()
                .list_snapshots(proto::ListSnapshotsRequest {
                    max_entries: PAGE,
                    starting_token: token,
                    source_volume_id: source.unwrap_or_default().into(),
                    ..Default::default()
                })
                .await
                .expect("ListSnapshots")
                .into_inner();
            let mut ids = Vec::new();
            for entry in page.entries {
                let snapshot = entry.snapshot.unwrap();
                if let Some(source) = source {
                    assert_eq!(snapshot.source_volume_id, source);
                }
                ids.push(snapshot.snapshot_id);
            }
            (ids, page.next_token)
        })
        .await
    }

    /// Follows the tokens through a whole listing, `page` asking for one page (its
    /// IDs and the next token) with a churn round between pages; returns how often
    /// each ID was listed.
    async fn whole_listing<F, Fut>(&self, what: &str, mut page: F) -> HashMap<String, usize>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = (Vec<String>, String)>,
    {
        let mut listed = HashMap::new();
        let mut token = String::new();
        for _ in 0..1000 {
            let (ids, next) = page(token).await;
            assert!(
                ids.len() <= PAGE as usize,
                "{what}: a page of {}",
                ids.len()
            );
            for id in ids {
                *listed.entry(id).or_insert(0) += 1;
            }
            if next.is_empty() {
                return listed;
            }
            token = next;
            self.one_more_round().await;
        }
        panic!("{what} did not end in 1000 pages");
    }

    /// Stops the churn; returns how many rounds it ran.
    async fn stop(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("the churn task");
        self.rounds.load(Ordering::SeqCst)
    }
}

/// Creates (or finds) a 1 MiB volume on `node`; returns its ID.
async fn create(controller: &ControllerClient<Channel>, name: &str, node: &str) -> String {
    controller
        .clone()
        .create_volume(proto::CreateVolumeRequest {
            accessibility_requirements: Some(topology(&[node], &[node])),
            ..create_request(name, MIB, &[], None)
        })
        .await
        .unwrap_or_else(|e| panic!("CreateVolume {name}: {e:?}"))
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

/// Cuts a snapshot of `volume`; returns its ID.
async fn snapshot(controller: &ControllerClient<Channel>, name: &str, volume: &str) -> String {
    controller
        .clone()
        .create_snapshot(proto::CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: volume.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("CreateSnapshot {name}: {e:?}"))
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id
}

/// The node part of an ID (`vol-<uuid>-<node>`).
fn node_part(id: &str) -> &str {
    &id["vol-".len() + 33..]
}
