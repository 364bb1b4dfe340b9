//! `/metrics` scraped over HTTP from real kura processes after real calls: the
//! all-in-one driver (CSI histogram and pool gauges), and a `kura node` plus a
//! `kura controller` (the agent histogram on the node, the CSI histogram on each).

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use common::metrics::{Scrape, http_get, metrics_address};
use common::process::Kura;
use common::*;
use tonic::Code;

/// csi-lib-utils' buckets as Prometheus prints them, and the overflow bucket.
const BUCKETS: [&str; 14] = [
    "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "15", "25", "50", "120", "300", "600", "+Inf",
];

/// `kura_build_info` as every role exports it: this build's version and revision.
fn assert_build_info(scrape: &Scrape) {
    let revision = kura::metrics::REVISION;
    let series = format!(
        "kura_build_info{{version=\"{}\",revision=\"{revision}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(scrape.get(&series), 1.0);
    // Built from a git checkout, the revision is a commit's full hash (the one built:
    // HEAD may have moved since, so it is not compared); elsewhere "unknown".
    let is_hash = revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit());
    assert!(is_hash || revision == "unknown", "{revision}");
}

#[tokio::test]
async fn all_in_one_counts_calls_and_reads_its_pool() {
    let address = metrics_address();
    let mut kura = Kura::with_args(PoolKind::Image, &["--metrics-listen", &address.to_string()]);
    kura.start().await;
    let mut controller = kura.controller();

    // Two identical creates (both OK), a malformed one, and a lookup of nothing.
    let request = create_request("metrics-volume", 64 * MIB, &[], None);
    let volume = kura.create(request.clone()).await.unwrap();
    kura.create(request).await.unwrap();
    let unnamed = controller
        .create_volume(create_request("", 64 * MIB, &[], None))
        .await
        .unwrap_err();
    assert_eq!(unnamed.code(), Code::InvalidArgument);
    let missing = controller
        .controller_get_volume(get_volume_request("vol-never-made"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Attach it (one loop device) and snapshot it.
    let cap = mount_cap("ext4");
    let (staging, target) = kura
        .stage_and_publish(&volume.volume_id, &cap, "metrics")
        .await;
    let snapshot = kura
        .create_snapshot("metrics-snapshot", &volume.volume_id)
        .await;

    let scrape = Scrape::of(address).await;
    let create = "/csi.v1.Controller/CreateVolume";
    assert_eq!(scrape.csi_count(create, "OK"), 2.0);
    assert_eq!(scrape.csi_count(create, "InvalidArgument"), 1.0);
    assert_eq!(
        scrape.csi_count("/csi.v1.Controller/ControllerGetVolume", "NotFound"),
        1.0
    );
    assert_eq!(scrape.csi_count("/csi.v1.Node/NodeStageVolume", "OK"), 1.0);
    assert_eq!(
        scrape.csi_count("/csi.v1.Node/NodePublishVolume", "OK"),
        1.0
    );
    assert_eq!(
        scrape.csi_count("/csi.v1.Controller/CreateSnapshot", "OK"),
        1.0
    );
    // The harness's readiness probes, at least one.
    assert!(scrape.csi_count("/csi.v1.Identity/Probe", "OK") >= 1.0);
    // Every bucket of csi-lib-utils, cumulative, ending in the count.
    let labels =
        format!("driver_name=\"{DRIVER_NAME}\",method_name=\"{create}\",grpc_status_code=\"OK\"");
    let mut previous = 0.0;
    for le in BUCKETS {
        let value = scrape.get(&format!(
            "csi_plugin_operations_seconds_bucket{{{labels},le=\"{le}\"}}"
        ));
        assert!(value >= previous, "buckets are cumulative");
        previous = value;
    }
    assert_eq!(previous, 2.0);
    assert!(scrape.get(&format!("csi_plugin_operations_seconds_sum{{{labels}}}")) > 0.0);
    let buckets = scrape
        .series
        .keys()
        .filter(|s| s.starts_with("csi_plugin_operations_seconds_bucket") && s.contains(&labels))
        .count();
    assert_eq!(buckets, BUCKETS.len(), "exactly csi-lib-utils' buckets");

    // The pool as it is: a 16 GiB image with one volume, attached, and one snapshot.
    let size = scrape.get("kura_pool_size_bytes{node=\"test-node\"}");
    let available = scrape.get("kura_pool_available_bytes{node=\"test-node\"}");
    assert!(
        size > 15.0 * GIB as f64 && size <= 16.0 * GIB as f64,
        "{size}"
    );
    assert!(available > 0.0 && available < size, "{available} of {size}");
    // The image pool's host filesystem: the one holding the test's directory (shared
    // with other work, so its free space is only checked to be within its size).
    let host = kura::sys::fs::usage(&kura.dir).unwrap();
    let host_size = scrape.get("kura_pool_host_filesystem_size_bytes{node=\"test-node\"}");
    let host_available =
        scrape.get("kura_pool_host_filesystem_available_bytes{node=\"test-node\"}");
    assert_eq!(host_size, host.total_bytes as f64);
    assert!(
        host_available > 0.0 && host_available <= host_size,
        "{host_available} of {host_size}"
    );
    assert_eq!(
        scrape.get("kura_volumes{node=\"test-node\",condition=\"healthy\"}"),
        1.0
    );
    assert_eq!(
        scrape.get("kura_volumes{node=\"test-node\",condition=\"abnormal\"}"),
        0.0
    );
    assert_eq!(scrape.get("kura_snapshots{node=\"test-node\"}"), 1.0);
    assert_eq!(
        scrape.get("kura_attached_loop_devices{node=\"test-node\"}"),
        1.0
    );
    assert!(!scrape.has_metric("kura_agent_operations_seconds"));
    // Its own pool, in-process: always up.
    assert_eq!(scrape.get("kura_agent_up{node=\"test-node\"}"), 1.0);
    assert_build_info(&scrape);

    // The gauges are read at each scrape: detached and deleted, they say so.
    kura.unpublish_and_unstage(&volume.volume_id, &staging, &target)
        .await;
    kura.delete_snapshot(&snapshot.snapshot_id).await.unwrap();
    kura.delete_volume(&volume.volume_id).await.unwrap();
    let scrape = Scrape::of(address).await;
    assert_eq!(
        scrape.get("kura_attached_loop_devices{node=\"test-node\"}"),
        0.0
    );
    assert_eq!(scrape.get("kura_snapshots{node=\"test-node\"}"), 0.0);
    assert_eq!(
        scrape.get("kura_volumes{node=\"test-node\",condition=\"healthy\"}"),
        0.0
    );
    assert_eq!(
        scrape.csi_count("/csi.v1.Controller/DeleteVolume", "OK"),
        1.0
    );

    // OpenMetrics for a scraper that asks for it (Prometheus does); nothing but
    // /metrics is served.
    let open = http_get(
        address,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0"),
    )
    .await;
    assert_eq!(open.status, 200);
    assert!(open.headers["content-type"].starts_with("application/openmetrics-text"));
    assert!(open.body.ends_with("# EOF\n"), "{}", open.body);
    assert_eq!(http_get(address, "/", None).await.status, 404);
    assert_eq!(kura.terminate().await.code(), Some(0));
}

#[tokio::test]
async fn a_pool_without_an_image_has_no_host_gauges() {
    let address = metrics_address();
    let mut kura = Kura::with_args(PoolKind::Dir, &["--metrics-listen", &address.to_string()]);
    kura.start().await;
    let scrape = Scrape::of(address).await;
    assert!(scrape.get("kura_pool_size_bytes{node=\"test-node\"}") > 0.0);
    assert!(
        !scrape.has_metric("kura_pool_host_filesystem_"),
        "{}",
        scrape.text
    );
    assert_eq!(kura.terminate().await.code(), Some(0));
}

#[tokio::test]
async fn node_counts_agent_calls_and_controller_counts_csi_calls() {
    let mut cluster = Cluster::new(&["2Gi"]);
    let node_metrics = metrics_address();
    cluster.nodes[0]
        .args
        .extend(["--metrics-listen".into(), node_metrics.to_string()]);
    cluster.nodes[0].start().await;
    let controller_metrics = metrics_address();
    let controller = cluster
        .start_controller_with(
            &cluster.certs.join("controller"),
            &["--metrics-listen".into(), controller_metrics.to_string()],
        )
        .await;
    controller.wait_for_nodes(&["node-a"]).await;

    let mut client = controller.controller();
    let volume = client
        .create_volume(create_request("split-metrics", 64 * MIB, &[], None))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    // A well-formed ID on node-a that names nothing: the agent answers NOT_FOUND.
    let never =
        kura::pool::VolumeId::derive("never-made", &kura::pool::NodeToken::for_node("node-a"));
    let missing = client
        .controller_get_volume(get_volume_request(never.as_str()))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let on_controller = Scrape::of(controller_metrics).await;
    assert_eq!(
        on_controller.csi_count("/csi.v1.Controller/CreateVolume", "OK"),
        1.0
    );
    assert_eq!(
        on_controller.csi_count("/csi.v1.Controller/ControllerGetVolume", "NotFound"),
        1.0
    );
    assert!(on_controller.csi_count("/csi.v1.Controller/GetCapacity", "OK") >= 1.0);
    assert!(
        !on_controller.has_metric("kura_pool_"),
        "the controller has no pool"
    );
    assert!(!on_controller.has_metric("kura_agent_operations_seconds"));
    assert_eq!(on_controller.get("kura_agent_up{node=\"node-a\"}"), 1.0);
    assert_build_info(&on_controller);

    let on_node = Scrape::of(node_metrics).await;
    assert_eq!(
        on_node.agent_count("/kura.agent.v1.Agent/CreateVolume", "OK"),
        1.0
    );
    assert!(on_node.agent_count("/kura.agent.v1.Agent/FindVolume", "OK") >= 1.0);
    assert_eq!(
        on_node.agent_count("/kura.agent.v1.Agent/GetVolume", "NotFound"),
        1.0
    );
    assert!(on_node.agent_count("/kura.agent.v1.Agent/Info", "OK") >= 1.0);
    assert!(
        !on_node.text.contains(kura::metrics::AGENT_STATUS_METHOD),
        "the status stream is not a call"
    );
    // The node's own CSI socket: the harness probed it.
    assert!(on_node.csi_count("/csi.v1.Identity/Probe", "OK") >= 1.0);
    assert_eq!(
        on_node.get("kura_volumes{node=\"node-a\",condition=\"healthy\"}"),
        1.0
    );
    assert!(on_node.get("kura_pool_size_bytes{node=\"node-a\"}") > GIB as f64);
    assert!(on_node.get("kura_pool_host_filesystem_size_bytes{node=\"node-a\"}") > 0.0);

    client
        .delete_volume(delete_volume_request(&volume.volume_id))
        .await
        .unwrap();
    let on_node = Scrape::of(node_metrics).await;
    assert_eq!(
        on_node.agent_count("/kura.agent.v1.Agent/DeleteVolume", "OK"),
        1.0
    );
    assert_build_info(&on_node);
    assert!(
        !on_node.has_metric("kura_agent_up"),
        "only the controller sees agents"
    );

    // The agent killed: the controller's gauge turns 0 within the liveness deadline
    // (and the node stays listed: it is known, and down).
    cluster.nodes[0].kill();
    let deadline = std::time::Instant::now() + 4 * kura::agent::cluster::LIVENESS_DEADLINE;
    loop {
        let scrape = Scrape::of(controller_metrics).await;
        if scrape.get("kura_agent_up{node=\"node-a\"}") == 0.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", scrape.text);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(controller);
}
