//! Inline (CSI ephemeral) volumes: NodePublishVolume with
//! `csi.storage.k8s.io/ephemeral: "true"` creates, formats and mounts a volume from
//! the pod's attributes; NodeUnpublishVolume deletes it; bad attributes create
//! nothing; a crash between create and mount is cleaned at restart, and a restart
//! keeps an inline volume that is still mounted.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::cluster::*;
use common::process::Kura;
use common::*;
use kura::csi::proto;
use kura::csi::proto::node_client::NodeClient;
use tonic::Code;
use tonic::transport::Channel;

/// A kubelet-style inline volume ID.
const INLINE_ID: &str = "csi-5c1b0d0f5b5e4a6c9f0e2d6b8a7c4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d";

fn context(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    let mut map = string_map(pairs);
    map.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    map.insert("csi.storage.k8s.io/pod.name".into(), "app-0".into());
    map
}

/// A NodePublishVolume of an inline volume with these attributes.
fn inline_publish_request(
    id: &str,
    target: &Path,
    cap: &proto::VolumeCapability,
    pairs: &[(&str, &str)],
) -> proto::NodePublishVolumeRequest {
    proto::NodePublishVolumeRequest {
        volume_context: context(pairs),
        ..publish_request(id, "", target, cap, false)
    }
}

/// The files in the pool's volume directory and kura's inline records.
fn made(dir: &Path, pool: &Path) -> Vec<String> {
    let mut all = leftovers(dir, pool);
    if let Ok(entries) = std::fs::read_dir(dir.join("state/ephemeral")) {
        all.extend(entries.flatten().map(|e| e.path().display().to_string()));
    }
    all
}

async fn publish_write_unpublish(node: &mut NodeClient<Channel>, dir: &Path, pool: &Path) {
    let target = dir.join("target");
    let cap = mount_cap("");
    let request = inline_publish_request(
        INLINE_ID,
        &target,
        &cap,
        &[("size", "96Mi"), ("fsType", "ext4")],
    );
    for _ in 0..2 {
        node.node_publish_volume(request.clone()).await.unwrap();
    }
    let data = pattern(3, 1 << 20);
    write_file(&target.join("data"), &data);
    assert_eq!(std::fs::read(target.join("data")).unwrap(), data);
    let table = kura::sys::mountinfo::read().unwrap();
    let mount = kura::sys::mountinfo::find_mount(&table, &target).expect("target is mounted");
    assert_eq!(mount.fs_type, "ext4");
    assert!(
        !made(dir, pool).is_empty(),
        "the volume exists while published"
    );

    // The kubelet asks for stats with its own ID.
    let stats = node
        .node_get_volume_stats(stats_request(INLINE_ID, &target))
        .await
        .unwrap()
        .into_inner();
    let total = stats.usage[0].total;
    assert!(total > 64 * MIB && total <= 96 * MIB, "{total}");

    node.node_unpublish_volume(unpublish_request(INLINE_ID, &target))
        .await
        .unwrap();
    assert!(!target.exists(), "unpublish removes the target");
    // Once deleted, the kubelet's ID names nothing, as any unknown ID.
    let again = node
        .node_unpublish_volume(unpublish_request(INLINE_ID, &target))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound, "{}", again.message());
    assert_eq!(made(dir, pool), Vec::<String>::new(), "the volume is gone");
}

#[tokio::test]
async fn publish_write_unpublish_deletes_the_volume() {
    let driver = Driver::start().await;
    let mut node = driver.node();
    publish_write_unpublish(&mut node, &driver.dir, &driver.pool_root()).await;

    // Block access too: the target is the device.
    let target = driver.path("block-target");
    node.node_publish_volume(inline_publish_request(
        INLINE_ID,
        &target,
        &block_cap(),
        &[("size", "8Mi"), (PROVISIONING, "thick")],
    ))
    .await
    .unwrap();
    write_at(&target, 4096, &pattern(9, 4096));
    assert_eq!(read_at(&target, 4096, 4096), pattern(9, 4096));
    node.node_unpublish_volume(unpublish_request(INLINE_ID, &target))
        .await
        .unwrap();
    assert!(!target.exists());
    assert_eq!(made(&driver.dir, &driver.pool_root()), Vec::<String>::new());
}

#[tokio::test]
async fn bad_attributes_create_nothing() {
    let driver = Driver::start().await;
    let mut node = driver.node();
    let target = driver.path("target");
    let long = "x".repeat(129);
    let kura_id = driver
        .create_volume("pvc-real", 64 * MIB, &[])
        .await
        .volume_id;
    let before = made(&driver.dir, &driver.pool_root());
    // Each row: volume ID, capability, attributes, what the message names.
    type Case<'a> = (
        String,
        proto::VolumeCapability,
        Vec<(&'a str, &'a str)>,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            INLINE_ID.into(),
            mount_cap(""),
            vec![("color", "blue")],
            "color",
        ),
        (
            INLINE_ID.into(),
            mount_cap(""),
            vec![("size", "lots")],
            "size",
        ),
        (INLINE_ID.into(), mount_cap(""), vec![("size", "0")], "size"),
        (
            INLINE_ID.into(),
            mount_cap(""),
            vec![("fsType", "ntfs")],
            "fsType",
        ),
        (
            INLINE_ID.into(),
            mount_cap("xfs"),
            vec![("fsType", "ext4")],
            "fsType",
        ),
        (
            INLINE_ID.into(),
            block_cap(),
            vec![("fsType", "ext4")],
            "fsType",
        ),
        (
            INLINE_ID.into(),
            mount_cap(""),
            vec![(PROVISIONING, "fat")],
            "provisioning",
        ),
        (
            INLINE_ID.into(),
            mount_cap(""),
            vec![("kura.csi.dev/encryption", "fscrypt")],
            "encryption",
        ),
        (long, mount_cap(""), vec![], "volume_id"),
        ("csi-\u{1}bad".into(), mount_cap(""), vec![], "volume_id"),
        (kura_id, mount_cap(""), vec![], "volume_id"),
    ];
    for (id, cap, pairs, needle) in cases {
        let status = node
            .node_publish_volume(inline_publish_request(&id, &target, &cap, &pairs))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{pairs:?}: {}",
            status.message()
        );
        assert!(status.message().contains(needle), "{}", status.message());
        assert!(!target.exists(), "{pairs:?} made the target");
        assert_eq!(made(&driver.dir, &driver.pool_root()), before, "{pairs:?}");
    }

    // A pool too small: RESOURCE_EXHAUSTED, nothing left behind.
    let status = node
        .node_publish_volume(inline_publish_request(
            INLINE_ID,
            &target,
            &mount_cap(""),
            &[("size", "64Gi")],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{}", status.message());
    assert!(!target.exists());
    assert_eq!(made(&driver.dir, &driver.pool_root()), before);

    // Unpublish of an inline name kura never made, at a target that exists: the ID
    // names nothing.
    std::fs::create_dir(&target).unwrap();
    let status = node
        .node_unpublish_volume(unpublish_request(INLINE_ID, &target))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{}", status.message());
    assert!(target.exists(), "a target kura did not make is left alone");
}

fn target_of(kura: &Kura) -> PathBuf {
    kura.path("target")
}

#[tokio::test]
async fn a_crash_between_create_and_mount_is_cleaned_at_restart() {
    let mut kura = Kura::new(PoolKind::Image);
    let channel = kura.start().await;
    let target = target_of(&kura);
    let created = kura.pause.arm("inline-created");
    let request = inline_publish_request(INLINE_ID, &target, &mount_cap(""), &[("size", "64Mi")]);
    let call = tokio::spawn({
        let mut node = NodeClient::new(channel.clone());
        let request = request.clone();
        async move { node.node_publish_volume(request).await }
    });
    created.held(|| call.is_finished()).await;
    assert!(
        !made(&kura.dir, &kura.pool_root()).is_empty(),
        "the volume exists before it is mounted"
    );
    kura.kill();
    drop(created);
    let _ = call.await;

    let channel = kura.start().await;
    assert_eq!(
        made(&kura.dir, &kura.pool_root()),
        Vec::<String>::new(),
        "start-up removed the inline volume nothing mounts"
    );

    // A published inline volume survives a restart, and is deleted by unpublish.
    let mut node = NodeClient::new(channel);
    node.node_publish_volume(request).await.unwrap();
    write_file(&target.join("kept"), b"still here");
    kura.kill();
    let mut node = NodeClient::new(kura.start().await);
    assert_eq!(std::fs::read(target.join("kept")).unwrap(), b"still here");
    node.node_unpublish_volume(unpublish_request(INLINE_ID, &target))
        .await
        .unwrap();
    assert_eq!(made(&kura.dir, &kura.pool_root()), Vec::<String>::new());
}

/// The node role serves inline volumes the same way (the controller is not involved).
#[tokio::test]
async fn the_node_role_serves_inline_volumes() {
    let cluster = Cluster::start(&["2Gi"]).await;
    let node = cluster.node("node-a");
    let mut client = node.node();
    publish_write_unpublish(&mut client, &node.dir, &node.pool_root()).await;
}
