//! The split driver as a cluster runs it: `kura controller` and three `kura node`
//! processes, each node with its own image pool and its agent on its own loopback
//! address, talking mutual TLS with certificates from `kura certs`. Placement,
//! capacity, races, snapshots and clones on the owning node, staging through the
//! owning node's socket, agents killed and stopped, two controllers, and every
//! refused credential.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;
use kura::csi::proto;
use tonic::Code;

/// Three nodes with pools of different sizes, so "most free" is node-c.
const SIZES: [&str; 3] = ["2Gi", "3Gi", "4Gi"];
/// Hang guard for a call on an unreachable node: the liveness deadline is 3 s.
const UNREACHABLE_BOUND: Duration = Duration::from_secs(15);

fn with_topology(
    name: &str,
    size: i64,
    topology: Option<proto::TopologyRequirement>,
) -> proto::CreateVolumeRequest {
    proto::CreateVolumeRequest {
        accessibility_requirements: topology,
        ..create_request(name, size, &[], None)
    }
}

/// A volume only `node` may hold, and it is preferred (WaitForFirstConsumer's request).
fn strictly_on(name: &str, size: i64, node: &str) -> proto::CreateVolumeRequest {
    with_topology(name, size, Some(topology(&[node], &[node])))
}

/// A 64 MiB volume only `node` may hold.
fn requiring(name: &str, node: &str) -> proto::CreateVolumeRequest {
    with_topology(name, 64 * MIB, Some(topology(&[node], &[])))
}

/// Metadata documents in a node's pool: the volumes it really holds.
fn volumes_on_disk(node: &NodeProc) -> usize {
    let dir = node.pool_root().join("volumes");
    std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0)
}

/// Calls `call` until it returns `want`, within the bound; returns how long it took.
async fn until_code<F, Fut, T>(what: &str, want: Code, mut call: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let started = Instant::now();
    loop {
        let outcome = tokio::time::timeout(UNREACHABLE_BOUND, call())
            .await
            .unwrap_or_else(|_| panic!("{what}: hung past {UNREACHABLE_BOUND:?}"));
        let code = match outcome {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        if code == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < UNREACHABLE_BOUND,
            "{what}: still {code:?}, not {want:?}, after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn placement_capacity_and_listing() {
    let cluster = Cluster::start(&SIZES).await;
    let controller = cluster.controller();

    // GetCapacity per node segment: ordered as the pools, 0 for an unknown node, the
    // sum without topology, and the largest node as maximum_volume_size.
    let (a, b, c) = (
        controller.capacity("node-a").await,
        controller.capacity("node-b").await,
        controller.capacity("node-c").await,
    );
    assert!(0 < a && a < b && b < c, "capacities {a} {b} {c}");
    assert_eq!(controller.capacity("node-x").await, 0);
    let all = controller
        .controller()
        .get_capacity(proto::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.available_capacity, a + b + c);
    assert_eq!(all.maximum_volume_size, Some(c / MIB * MIB));

    // No topology: the node with the most free space.
    let v = controller
        .create(with_topology("pvc-free", 64 * MIB, None))
        .await
        .unwrap();
    assert_eq!(volume_node(&v), "node-c");
    assert!(v.volume_id.ends_with("-node-c"), "{}", v.volume_id);

    // The first preferred node within requisite.
    let all_nodes = ["node-a", "node-b", "node-c"];
    let v = controller
        .create(with_topology(
            "pvc-preferred",
            64 * MIB,
            Some(topology(&all_nodes, &["node-a", "node-b"])),
        ))
        .await
        .unwrap();
    assert_eq!(volume_node(&v), "node-a");

    // A preferred node outside requisite is not taken.
    let v = controller
        .create(with_topology(
            "pvc-requisite",
            64 * MIB,
            Some(topology(&["node-b"], &["node-a", "node-b"])),
        ))
        .await
        .unwrap();
    assert_eq!(volume_node(&v), "node-b");

    // Strict topology (WaitForFirstConsumer): the one selected node...
    let v = controller
        .create(strictly_on("pvc-strict", 64 * MIB, "node-a"))
        .await
        .unwrap();
    assert_eq!(volume_node(&v), "node-a");
    // ... and when it is full, RESOURCE_EXHAUSTED so the scheduler picks again.
    let full = controller
        .create(strictly_on("pvc-too-big", 3 * GIB, "node-a"))
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    // The same on the big node fits.
    let v = controller
        .create(strictly_on("pvc-too-big", 3 * GIB, "node-c"))
        .await
        .unwrap();
    assert_eq!(volume_node(&v), "node-c");
    // A size no live node's pool could ever hold: OUT_OF_RANGE, with topology or
    // without (rescheduling cannot help), and nothing is made anywhere.
    for (name, size) in [("pvc-beyond", i64::MAX), ("pvc-beyond-4g", 4 * GIB + MIB)] {
        for requirements in [None, Some(topology(&["node-a"], &["node-a"]))] {
            let beyond = controller
                .create(with_topology(name, size, requirements))
                .await
                .unwrap_err();
            assert_eq!(beyond.code(), Code::OutOfRange, "{beyond:?}");
            assert!(beyond.message().contains("capacity_range"), "{beyond:?}");
        }
    }
    // A requisite naming no kura node.
    let none = controller
        .create(strictly_on("pvc-nowhere", 64 * MIB, "node-x"))
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::ResourceExhausted, "{none:?}");

    // A retry of a create lands on the volume that exists, wherever the topology
    // would place a new one now; a requisite that excludes its node is another
    // volume (ALREADY_EXISTS).
    let again = controller
        .create(with_topology("pvc-preferred", 64 * MIB, None))
        .await
        .unwrap();
    assert_eq!(volume_node(&again), "node-a");
    let excluded = controller
        .create(requiring("pvc-preferred", "node-b"))
        .await
        .unwrap_err();
    assert_eq!(excluded.code(), Code::AlreadyExists, "{excluded:?}");

    // Listing covers every node, sorted by ID, and pages across nodes.
    let ids = controller.list_volume_ids().await;
    assert_eq!(ids.len(), 5, "{ids:?}");
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    let nodes: HashSet<&str> = ids
        .iter()
        .map(|id| id.rsplit('-').next().unwrap())
        .collect();
    assert_eq!(nodes.len(), 3, "{ids:?}");
    let mut paged = Vec::new();
    for page in controller.list_volume_pages(2).await {
        assert!(page.entries.len() <= 2);
        paged.extend(
            page.entries
                .into_iter()
                .map(|e| e.volume.unwrap().volume_id),
        );
    }
    assert_eq!(paged, ids);

    // Deleting is idempotent across nodes too.
    for id in &ids {
        controller.delete_volume(id).await.unwrap();
        controller.delete_volume(id).await.unwrap();
    }
    assert!(controller.list_volume_ids().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_identical_creates_make_one_volume() {
    let cluster = Cluster::start(&SIZES).await;
    let controller = cluster.controller();
    let request = with_topology("pvc-race", 256 * MIB, None);
    let mut calls = Vec::new();
    for _ in 0..16 {
        let mut client = controller.controller();
        let request = request.clone();
        calls.push(tokio::spawn(
            async move { client.create_volume(request).await },
        ));
    }
    let mut ids = HashSet::new();
    for call in calls {
        match call.await.unwrap() {
            Ok(r) => {
                ids.insert(r.into_inner().volume.unwrap().volume_id);
            }
            // Another of the same calls is still making it: the CO retries.
            Err(status) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
        }
    }
    // The retry after the race settles on the same volume.
    let settled = controller.create(request).await.unwrap();
    ids.insert(settled.volume_id.clone());
    assert_eq!(ids.len(), 1, "{ids:?}");
    let on_disk: usize = cluster.nodes.iter().map(volumes_on_disk).sum();
    assert_eq!(on_disk, 1);
    assert_eq!(controller.list_volume_ids().await, vec![settled.volume_id]);
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_clones_and_stage_stay_on_the_owning_node() {
    let cluster = Cluster::start(&SIZES).await;
    let controller = cluster.controller();
    let owner = cluster.node("node-b");
    let volume = controller
        .create(strictly_on("pvc-data", 64 * MIB, "node-b"))
        .await
        .unwrap();
    let id = volume.volume_id.clone();

    // Stage and publish through the owning node's socket; write data.
    let cap = block_cap();
    let staging = owner.path("stage");
    std::fs::create_dir_all(&staging).unwrap();
    let target = owner.path("target");
    let mut node = owner.node();
    node.node_stage_volume(stage_request(&id, &staging, &cap))
        .await
        .expect("stage on the owner");
    node.node_publish_volume(publish_request(&id, &staging, &target, &cap, false))
        .await
        .expect("publish on the owner");
    let data = pattern(7, MIB as usize);
    write_at(&target, 0, &data);

    // Another node's socket does not know the volume.
    let elsewhere = cluster
        .node("node-a")
        .node()
        .node_stage_volume(stage_request(&id, cluster.node("node-a").path("s"), &cap))
        .await
        .unwrap_err();
    assert_eq!(elsewhere.code(), Code::NotFound, "{elsewhere:?}");

    // A staged volume cannot be deleted, through the controller either.
    let staged = controller.delete_volume(&id).await.unwrap_err();
    assert_eq!(staged.code(), Code::FailedPrecondition, "{staged:?}");

    // Snapshot, clone and restore land on the owner.
    let mut client = controller.controller();
    let snapshot = client
        .create_snapshot(snapshot_request("snap-data", &id))
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snapshot.snapshot_id.ends_with("-node-b"));
    assert!(snapshot.ready_to_use);
    // The same name for another volume is refused, even on another node.
    let other = controller
        .create(strictly_on("pvc-other", 64 * MIB, "node-a"))
        .await
        .unwrap();
    let reused = client
        .create_snapshot(snapshot_request("snap-data", &other.volume_id))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");

    let clone = controller
        .create(clone_request("pvc-clone", 64 * MIB, &id))
        .await
        .unwrap();
    assert_eq!(volume_node(&clone), "node-b");
    let restore = controller
        .create(restore_request(
            "pvc-restore",
            64 * MIB,
            &snapshot.snapshot_id,
        ))
        .await
        .unwrap();
    assert_eq!(volume_node(&restore), "node-b");
    assert!(restore.content_source.is_some());

    // A restore the topology forbids on the source's node is copied to the node it
    // allows (tests/cross_node.rs checks the copy itself); retries follow it.
    let elsewhere = proto::CreateVolumeRequest {
        accessibility_requirements: Some(topology(&["node-a"], &["node-a"])),
        ..create_request(
            "pvc-elsewhere",
            64 * MIB,
            &[],
            Some(snapshot_source(&snapshot.snapshot_id)),
        )
    };
    let copied = loop {
        match controller.create(elsewhere.clone()).await {
            Ok(volume) => break volume,
            Err(status) if status.code() == Code::Aborted => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(status) => panic!("copy across nodes: {status:?}"),
        }
    };
    assert_eq!(volume_node(&copied), "node-a");
    controller.delete_volume(&copied.volume_id).await.unwrap();

    // The restore holds the data, read through the owner's socket.
    let staging2 = owner.path("stage2");
    std::fs::create_dir_all(&staging2).unwrap();
    let target2 = owner.path("target2");
    node.node_stage_volume(stage_request(&restore.volume_id, &staging2, &cap))
        .await
        .unwrap();
    node.node_publish_volume(publish_request(
        &restore.volume_id,
        &staging2,
        &target2,
        &cap,
        false,
    ))
    .await
    .unwrap();
    assert_eq!(read_at(&target2, 0, data.len()), data);

    // Expansion goes to the owner too.
    let expanded = client
        .controller_expand_volume(proto::ControllerExpandVolumeRequest {
            volume_id: clone.volume_id.clone(),
            capacity_range: Some(proto::CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 128 * MIB);

    for (vol, stage, target) in [
        (&id, &staging, &target),
        (&restore.volume_id, &staging2, &target2),
    ] {
        node.node_unpublish_volume(unpublish_request(vol, target))
            .await
            .unwrap();
        node.node_unstage_volume(unstage_request(vol, stage))
            .await
            .unwrap();
    }
    controller.delete_volume(&id).await.unwrap();
    let snapshots = client
        .list_snapshots(proto::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(snapshots.len(), 1, "the snapshot outlives its volume");
    client
        .delete_snapshot(delete_snapshot_request(&snapshot.snapshot_id))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agent_is_unavailable_then_served_again_after_restart() {
    let mut cluster = Cluster::start(&SIZES).await;
    let on_c = cluster
        .controller()
        .create(with_topology("pvc-c", 64 * MIB, None))
        .await
        .unwrap();
    assert_eq!(volume_node(&on_c), "node-c");
    let on_b = cluster
        .controller()
        .create(requiring("pvc-b", "node-b"))
        .await
        .unwrap();

    cluster.node_mut("node-c").kill();
    let controller = cluster.controller();
    let took = until_code("GetVolume on a killed node", Code::Unavailable, || {
        controller.get_volume(&on_c.volume_id)
    })
    .await;
    eprintln!("UNAVAILABLE {took:?} after SIGKILL");
    // Never a false success: deleting a volume on an unreachable node is UNAVAILABLE.
    let delete = controller.delete_volume(&on_c.volume_id).await.unwrap_err();
    assert_eq!(delete.code(), Code::Unavailable, "{delete:?}");
    assert_eq!(controller.capacity("node-c").await, 0);
    // The other nodes serve, and placement skips the dead one.
    controller.get_volume(&on_b.volume_id).await.unwrap();
    let placed = controller
        .create(with_topology("pvc-while-down", 64 * MIB, None))
        .await
        .unwrap();
    assert_eq!(volume_node(&placed), "node-b");
    // Strict topology on the dead node: RESOURCE_EXHAUSTED, the scheduler picks again.
    let strict = controller
        .create(strictly_on("pvc-strict-down", 64 * MIB, "node-c"))
        .await
        .unwrap_err();
    assert_eq!(strict.code(), Code::ResourceExhausted, "{strict:?}");
    // Listing shows the live nodes' volumes.
    let listed = controller.list_volume_ids().await;
    assert!(!listed.contains(&on_c.volume_id), "{listed:?}");
    assert!(listed.contains(&on_b.volume_id), "{listed:?}");

    // A second `kura node` on the same pool is refused while the first holds it;
    // here the first is dead, so show it with node-b instead.
    let b = cluster.node("node-b");
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_kura"))
        .args(node_args(
            "node-b",
            &b.dir,
            "3Gi",
            std::net::SocketAddr::from(([127, 0, 0, 3], free_port([127, 0, 0, 3].into()))),
            &cluster.certs.join("node"),
        ))
        .output()
        .expect("second node runs");
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("one kura node serves a pool at a time"),
        "{stderr}"
    );

    // Restarted: served again, with its volume intact.
    cluster.node_mut("node-c").start().await;
    let controller = cluster.controller();
    until_code("GetVolume after restart", Code::Ok, || {
        controller.get_volume(&on_c.volume_id)
    })
    .await;
    let back = controller.get_volume(&on_c.volume_id).await.unwrap();
    assert_eq!(back.capacity_bytes, 64 * MIB);
    assert!(controller.capacity("node-c").await > 0);
    controller.delete_volume(&on_c.volume_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_agent_gives_bounded_unavailable_not_a_hang() {
    let cluster = Cluster::start(&SIZES[..2]).await;
    let controller = cluster.controller();
    let on_b = controller
        .create(requiring("pvc-b", "node-b"))
        .await
        .unwrap();
    let on_a = controller
        .create(requiring("pvc-a", "node-a"))
        .await
        .unwrap();

    let stopped = cluster.node("node-b");
    stopped.stop_signal();
    // The first call goes out while the controller still thinks the agent is live:
    // it must end with UNAVAILABLE once the agent is seen silent, not hang.
    let started = Instant::now();
    let first = tokio::time::timeout(UNREACHABLE_BOUND, controller.get_volume(&on_b.volume_id))
        .await
        .expect("GetVolume on a stopped agent hung")
        .unwrap_err();
    assert_eq!(first.code(), Code::Unavailable, "{first:?}");
    eprintln!("UNAVAILABLE {:?} after SIGSTOP", started.elapsed());
    let delete = tokio::time::timeout(UNREACHABLE_BOUND, controller.delete_volume(&on_b.volume_id))
        .await
        .expect("DeleteVolume on a stopped agent hung")
        .unwrap_err();
    assert_eq!(delete.code(), Code::Unavailable, "{delete:?}");
    assert_eq!(controller.capacity("node-b").await, 0);
    controller.get_volume(&on_a.volume_id).await.unwrap();

    stopped.continue_signal();
    until_code("GetVolume after SIGCONT", Code::Ok, || {
        controller.get_volume(&on_b.volume_id)
    })
    .await;
    controller.delete_volume(&on_b.volume_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn two_controllers_serve_the_same_nodes() {
    let mut cluster = Cluster::start(&SIZES[..2]).await;
    cluster.add_controller().await;
    let (one, two) = (&cluster.controllers[0], &cluster.controllers[1]);

    let made = one
        .create(with_topology("pvc-shared", 64 * MIB, None))
        .await
        .unwrap();
    let seen = two.get_volume(&made.volume_id).await.unwrap();
    assert_eq!(seen.volume_id, made.volume_id);
    // The same create through the other controller finds it rather than making one.
    let again = two
        .create(with_topology("pvc-shared", 64 * MIB, None))
        .await
        .unwrap();
    assert_eq!(again.volume_id, made.volume_id);
    assert_eq!(two.list_volume_ids().await, vec![made.volume_id.clone()]);

    // Identical creates through both at once, as two replicas might after a
    // failover, with a preferred node: one volume.
    let request = with_topology(
        "pvc-both",
        64 * MIB,
        Some(topology(&["node-a", "node-b"], &["node-b"])),
    );
    let (x, y) = tokio::join!(one.create(request.clone()), two.create(request.clone()));
    let mut ids = HashSet::new();
    for outcome in [x, y] {
        match outcome {
            Ok(v) => {
                ids.insert(v.volume_id);
            }
            Err(status) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
        }
    }
    ids.insert(one.create(request).await.unwrap().volume_id);
    assert_eq!(ids.len(), 1, "{ids:?}");
    let on_disk: usize = cluster.nodes.iter().map(volumes_on_disk).sum();
    assert_eq!(on_disk, 2);

    two.delete_volume(&made.volume_id).await.unwrap();
    let gone = one.get_volume(&made.volume_id).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_refuses_every_credential_but_the_controllers() {
    let mut cluster = Cluster::new(&SIZES[..1]);
    cluster.nodes[0].start().await;
    let agent = cluster.nodes[0].agent;
    let certs = cluster.certs.clone();
    let foreign = cluster.dir.join("foreign-certs");
    make_certs(&foreign);
    let ca = certs.join("ca.crt");
    let agent_create = || kura::agent::proto::CreateVolumeRequest {
        name: "pvc-intruder".into(),
        required_bytes: MIB as u64,
        provisioning: kura::agent::proto::Provisioning::Thin as i32,
        ..Default::default()
    };

    // The controller identity may do everything.
    let mut controller = agent_client(agent, &ca, Some(&certs.join("controller")));
    let info = controller
        .info(kura::agent::proto::InfoRequest {})
        .await
        .expect("Info as the controller")
        .into_inner();
    assert_eq!(info.node_id, "node-a");
    controller
        .list_volumes(kura::agent::proto::ListVolumesRequest::default())
        .await
        .expect("ListVolumes as the controller");

    // The node identity: who-is-this, and the status the nodes replicating to this
    // one follow; control calls PERMISSION_DENIED.
    let mut node = agent_client(agent, &ca, Some(&certs.join("node")));
    node.info(kura::agent::proto::InfoRequest {})
        .await
        .expect("Info as a node");
    let mut status = node
        .status(kura::agent::proto::StatusRequest {})
        .await
        .expect("Status as a node")
        .into_inner();
    let update = status.message().await.expect("a status update");
    assert!(update.is_some_and(|u| u.healthy));
    let denied = node.create_volume(agent_create()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = node
        .list_volumes(kura::agent::proto::ListVolumesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // No client certificate, or one from another CA: the agent's side of the TLS 1.3
    // handshake fails, it sends an alert and closes the connection. The client's side
    // of the handshake had finished, so its call ends with a transport error whose
    // code depends on what arrives first: UNKNOWN ("transport error", with the alert
    // CertificateRequired or UnknownCA as its source), CANCELLED ("connection
    // closed") or UNAVAILABLE. Never an answer.
    let closed = |code: Code| matches!(code, Code::Unavailable | Code::Cancelled | Code::Unknown);
    let refused = [
        ("no client certificate", agent_client(agent, &ca, None)),
        (
            "a certificate of another CA",
            agent_client(agent, &ca, Some(&foreign.join("controller"))),
        ),
    ];
    for (what, mut client) in refused {
        let error = client.create_volume(agent_create()).await.unwrap_err();
        eprintln!("{what}: {:?}: {}", error.code(), error.message());
        assert!(closed(error.code()), "{what}: {error:?}");
        let error = client
            .info(kura::agent::proto::InfoRequest {})
            .await
            .unwrap_err();
        assert!(closed(error.code()), "{what}: {error:?}");
    }

    // A controller that does not trust the agent's CA never finds it.
    let mut wrong = agent_client(
        agent,
        &foreign.join("ca.crt"),
        Some(&foreign.join("controller")),
    );
    let error = wrong
        .info(kura::agent::proto::InfoRequest {})
        .await
        .unwrap_err();
    eprintln!(
        "an agent of another CA: {:?}: {}",
        error.code(),
        error.message()
    );
    assert_eq!(error.code(), Code::Unavailable, "{error:?}");

    // A controller process with the other CA's identity: the agent refuses it, so it
    // finds no node and has nowhere to place a volume. Its Probe still says ready (a
    // controller without agents is alive: restarting it would not help), and
    // `kura_agent_up` says what it sees.
    let lost = cluster.start_controller(&foreign.join("controller")).await;
    tokio::time::sleep(2 * kura::agent::cluster::DISCOVERY_INTERVAL).await;
    let probe = lost
        .identity()
        .probe(proto::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    assert!(
        lost.logs().contains("no agent is live"),
        "the missing agents are logged"
    );
    assert_eq!(lost.capacity("node-a").await, 0);
    let nowhere = lost
        .create(with_topology("pvc-nowhere", MIB, None))
        .await
        .unwrap_err();
    assert_eq!(nowhere.code(), Code::ResourceExhausted, "{nowhere:?}");
    let unreachable = lost
        .get_volume(
            kura::pool::VolumeId::derive("pvc-x", &kura::pool::NodeToken::for_node("node-a"))
                .as_str(),
        )
        .await
        .unwrap_err();
    assert_eq!(unreachable.code(), Code::Unavailable, "{unreachable:?}");
    assert!(lost.logs().contains("agent"), "the refusal is logged");

    assert_eq!(volumes_on_disk(&cluster.nodes[0]), 0, "nothing was created");
}

/// Puts an ext4 filesystem (which cannot reflink, so clones are real copies that take
/// a while) under the node's directory and points the node at it with `--pool-dir`.
/// The image, its loop device and the mount live under the run's directory, so the
/// cluster's cleanup removes them.
fn ext4_pool(node: &mut NodeProc) {
    let image = node.dir.join("ext4-pool.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 * GIB as u64)
        .unwrap();
    let device = kura::sys::loopdev::attach(&image, false).expect("attach the ext4 pool image");
    kura::sys::mkfs::format(&device, kura::sys::FsType::Ext4, false)
        .expect("mkfs.ext4 on the pool image");
    let root = node.dir.join("pool-dir");
    std::fs::create_dir_all(&root).unwrap();
    kura::sys::mount::mount_fs(&device, &root, kura::sys::FsType::Ext4, &[])
        .expect("mount the ext4 pool");
    let args = &mut node.args;
    let at = args.iter().position(|a| a == "--pool-image").unwrap();
    args.splice(
        at..at + 4,
        ["--pool-dir".to_owned(), root.display().to_string()],
    );
}

/// Writes `len` bytes of non-zero data to a device, so a sparse copy must copy it all.
fn fill(device: &std::path::Path, len: usize) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(device)
        .unwrap();
    let chunk = pattern(3, 4 << 20);
    for _ in 0..len / chunk.len() {
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clone_through_the_agent_holds_its_source_against_the_node_service() {
    let mut cluster = Cluster::new(&SIZES[..1]);
    ext4_pool(&mut cluster.nodes[0]);
    cluster.nodes[0].start().await;
    cluster.add_controller().await;
    let controller = cluster.controller();
    let owner = &cluster.nodes[0];
    // Several of the copy's chunks, so a copy held after its first is half done.
    let size = 256 * MIB;
    let source = controller
        .create(with_topology("pvc-source", size, None))
        .await
        .unwrap()
        .volume_id;

    let cap = block_cap();
    let staging = owner.path("stage");
    std::fs::create_dir_all(&staging).unwrap();
    let device = owner.path("device");
    let mut node = owner.node();
    node.node_stage_volume(stage_request(&source, &staging, &cap))
        .await
        .unwrap();
    node.node_publish_volume(publish_request(&source, &staging, &device, &cap, false))
        .await
        .unwrap();
    let written = device.clone();
    tokio::task::spawn_blocking(move || fill(&written, size as usize))
        .await
        .unwrap();
    node.node_unpublish_volume(unpublish_request(&source, &device))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_request(&source, &staging))
        .await
        .unwrap();

    // The clone copies through the agent in the node process...
    let clone_id =
        kura::pool::VolumeId::derive("pvc-clone", &kura::pool::NodeToken::for_node(&owner.id));
    let partial = owner
        .dir
        .join("pool-dir/volumes")
        .join(format!("{clone_id}.img.partial"));
    // Held mid-copy at a pause point for as long as the checks below take.
    let copying = owner.pause.arm("copying");
    let first = tokio::spawn({
        let mut client = controller.controller();
        let request = clone_request("pvc-clone", size, &source);
        async move { client.create_volume(request).await }
    });
    copying.held(|| first.is_finished()).await;
    // ... so the node's own service (another caller in that process) and the
    // controller's other calls on the source are refused while it runs.
    let stage = node
        .node_stage_volume(stage_request(&source, &staging, &cap))
        .await
        .unwrap_err();
    assert_eq!(stage.code(), Code::Aborted, "{stage:?}");
    assert!(stage.message().contains(&source), "{}", stage.message());
    let snapshot = controller
        .controller()
        .create_snapshot(snapshot_request("snap-during-clone", &source))
        .await
        .unwrap_err();
    assert_eq!(snapshot.code(), Code::Aborted, "{snapshot:?}");
    let delete = controller.delete_volume(&source).await.unwrap_err();
    assert_eq!(delete.code(), Code::Aborted, "{delete:?}");
    assert!(
        copying.is_held() && !first.is_finished() && partial.exists(),
        "the clone was no longer in flight when the other calls were answered"
    );

    copying.release();
    let clone = first.await.unwrap().expect("the clone completes");
    assert_eq!(
        clone.into_inner().volume.unwrap().volume_id,
        clone_id.as_str()
    );
    // Released: the source can be staged again.
    node.node_stage_volume(stage_request(&source, &staging, &cap))
        .await
        .expect("stage after the clone");
    node.node_unstage_volume(unstage_request(&source, &staging))
        .await
        .unwrap();
}
