//! A volume's whole life over the real socket, with real loop devices, mkfs and mounts,
//! for ext4, xfs, btrfs and raw block; every mutating call made twice.

mod common;

use std::path::Path;

use common::*;
use kura::csi::proto;
use tonic::Code;

async fn lifecycle(cap: proto::VolumeCapability, tag: &str) {
    let driver = Driver::start().await;
    let mut controller = driver.controller();
    let mut node = driver.node();
    let request = create_request(&format!("pvc-{tag}"), 512 * MIB, &[], None);
    let volume = driver.create_twice(request).await;
    assert_eq!(volume.capacity_bytes, 512 * MIB);
    let id = volume.volume_id.clone();

    let staging = driver.path("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let target = driver.path("target");
    for _ in 0..2 {
        node.node_stage_volume(stage_request(&id, &staging, &cap))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        node.node_publish_volume(publish_request(&id, &staging, &target, &cap, false))
            .await
            .unwrap();
    }

    let image = volume_image(&driver.pool_root(), &id);
    let device = kura::sys::loopdev::find_by_backing(&image)
        .unwrap()
        .expect("volume is attached");
    assert!(
        device.direct_io,
        "loop device uses direct I/O: no double page cache"
    );
    let nomerges = Path::new("/sys/block")
        .join(device.path.file_name().unwrap())
        .join("queue/nomerges");
    assert_eq!(
        std::fs::read_to_string(nomerges).unwrap(),
        "1\n",
        "the pool below merges requests, the volume's loop device does not"
    );

    let data = pattern(7, 1 << 20);
    let file = match is_block(&cap) {
        true => target.clone(),
        false => target.join("data"),
    };
    if !file.exists() {
        std::fs::write(&file, b"").unwrap();
    }
    write_at(&file, 4096, &data);
    assert_eq!(read_at(&file, 4096, data.len()), data);

    let stats = node
        .node_get_volume_stats(stats_request(&id, &target))
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.usage.is_empty());
    assert!(stats.usage[0].total > 0);
    assert!(!stats.volume_condition.unwrap().abnormal);

    for _ in 0..2 {
        node.node_unpublish_volume(unpublish_request(&id, &target))
            .await
            .unwrap();
    }
    assert!(!target.exists(), "unpublish removes the target");
    for _ in 0..2 {
        node.node_unstage_volume(unstage_request(&id, &staging))
            .await
            .unwrap();
    }
    assert!(
        kura::sys::loopdev::find_by_backing(&image)
            .unwrap()
            .is_none(),
        "unstage detaches the loop device"
    );

    // Staged again, the data is still there: the filesystem was not reformatted.
    let (staging, target) = driver.stage_and_publish(&id, &cap, "again").await;
    let file = match is_block(&cap) {
        true => target.clone(),
        false => target.join("data"),
    };
    assert_eq!(read_at(&file, 4096, data.len()), data);
    driver.unpublish_and_unstage(&id, &staging, &target).await;

    for _ in 0..2 {
        controller
            .delete_volume(delete_volume_request(&id))
            .await
            .unwrap();
    }
    let gone = controller
        .controller_get_volume(get_volume_request(&id))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn ext4_volume_lifecycle() {
    lifecycle(mount_cap("ext4"), "ext4").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn xfs_volume_lifecycle() {
    lifecycle(mount_cap("xfs"), "xfs").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn btrfs_volume_lifecycle() {
    lifecycle(mount_cap("btrfs"), "btrfs").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn block_volume_lifecycle() {
    lifecycle(block_cap(), "block").await;
}
