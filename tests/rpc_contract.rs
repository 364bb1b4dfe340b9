//! The CSI contract over the real socket for what is not bad input (every bad input,
//! missing fields, unknown and malformed IDs and incompatible repeats among them, is a
//! row of tests/bad_input.rs's tables): identity, allocation, idempotent repeats,
//! placement, validation's answers, paging, capacity, volume condition, and the access
//! modes' rules over a volume's life (CSI v1.12).

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::*;
use kura::csi::proto::{self, volume_capability};
use tonic::Code;
use volume_capability::access_mode::Mode;

/// Names of the files in the pool's volumes directory.
fn pool_volume_files(driver: &Driver) -> BTreeSet<String> {
    std::fs::read_dir(driver.pool_root().join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn loop_device_of(image: &Path) -> Option<PathBuf> {
    kura::sys::loopdev::find_by_backing(image)
        .unwrap()
        .map(|d| d.path)
}

fn capacity_request(
    params: &[(&str, &str)],
    topology: Option<proto::Topology>,
) -> proto::GetCapacityRequest {
    proto::GetCapacityRequest {
        volume_capabilities: vec![mount_cap("")],
        parameters: string_map(params),
        accessible_topology: topology,
    }
}

async fn get_volume(driver: &Driver, volume_id: &str) -> proto::ControllerGetVolumeResponse {
    driver
        .controller()
        .controller_get_volume(get_volume_request(volume_id))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_reports_name_version_capabilities_and_readiness() {
    use proto::plugin_capability::{self, service, volume_expansion};
    let driver = Driver::start().await;
    let mut identity = driver.identity();

    let info = identity
        .get_plugin_info(proto::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, DRIVER_NAME);
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    let caps = identity
        .get_plugin_capabilities(proto::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let has = |wanted: plugin_capability::Type| caps.iter().any(|c| c.r#type == Some(wanted));
    for kind in [
        service::Type::ControllerService,
        service::Type::VolumeAccessibilityConstraints,
    ] {
        assert!(
            has(plugin_capability::Type::Service(
                plugin_capability::Service {
                    r#type: kind as i32
                }
            )),
            "{kind:?} missing from {caps:?}"
        );
    }
    assert!(
        has(plugin_capability::Type::VolumeExpansion(
            plugin_capability::VolumeExpansion {
                r#type: volume_expansion::Type::Online as i32
            }
        )),
        "online expansion missing from {caps:?}"
    );

    let probe = identity
        .probe(proto::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
}

#[tokio::test(flavor = "multi_thread")]
async fn create_volume_allocates_repeats_and_places() {
    let driver = Driver::start().await;
    let mut controller = driver.controller();

    // Thick allocates the whole image, thin allocates (almost) nothing.
    let thick = driver
        .create_volume("pvc-thick", 64 * MIB, &[(PROVISIONING, "thick")])
        .await;
    assert_eq!(thick.capacity_bytes, 64 * MIB);
    let allocated = std::fs::metadata(volume_image(&driver.pool_root(), &thick.volume_id))
        .unwrap()
        .blocks()
        * 512;
    assert!(
        allocated >= 64 * MIB as u64,
        "thick image has only {allocated} bytes allocated"
    );
    let thin = driver
        .create_volume("pvc-thin", 64 * MIB, &[(PROVISIONING, "thin")])
        .await;
    let allocated = std::fs::metadata(volume_image(&driver.pool_root(), &thin.volume_id))
        .unwrap()
        .blocks()
        * 512;
    assert!(
        allocated < MIB as u64,
        "thin image has {allocated} bytes allocated"
    );

    // The sidecars' keys are accepted.
    driver
        .create_volume(
            "pvc-sidecar-keys",
            64 * MIB,
            &[
                ("csi.storage.k8s.io/pvc/name", "claim"),
                ("csi.storage.k8s.io/pvc/namespace", "default"),
                ("csi.storage.k8s.io/pv/name", "pvc-sidecar-keys"),
            ],
        )
        .await;

    // Same name and arguments: the same volume.
    driver
        .create_twice(create_request("pvc-again", 64 * MIB, &[], None))
        .await;
    // Sizes round up to whole MiB.
    let odd = driver.create_volume("pvc-odd", MIB + 1, &[]).await;
    assert_eq!(odd.capacity_bytes, 2 * MIB);
    assert_eq!(
        std::fs::metadata(volume_image(&driver.pool_root(), &odd.volume_id))
            .unwrap()
            .len(),
        2 * MIB as u64
    );

    // Topology: a requisite naming our node among others is met on ours.
    let mut request = create_request("pvc-topology", 64 * MIB, &[], None);
    request.accessibility_requirements = Some(proto::TopologyRequirement {
        requisite: vec![node_topology("other-node"), node_topology(NODE_ID)],
        preferred: vec![node_topology("other-node"), node_topology(NODE_ID)],
    });
    let placed = controller
        .create_volume(request)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(placed.accessible_topology, vec![node_topology(NODE_ID)]);
    assert!(placed.volume_id.ends_with(NODE_ID));
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_and_validate_volume() {
    let driver = Driver::start().await;
    let mut controller = driver.controller();
    let mut node = driver.node();

    // A staged volume is in use.
    let volume = driver.create_volume("pvc-staged", 64 * MIB, &[]).await;
    let id = volume.volume_id;
    let staging = driver.path("staging");
    std::fs::create_dir_all(&staging).unwrap();
    node.node_stage_volume(stage_request(&id, &staging, &mount_cap("ext4")))
        .await
        .unwrap();
    assert_code(
        controller.delete_volume(delete_volume_request(&id)).await,
        Code::FailedPrecondition,
        &[&id],
    );
    assert!(
        volume_image(&driver.pool_root(), &id).exists(),
        "a refused delete removed the image"
    );

    // ValidateVolumeCapabilities.
    let caps = vec![mount_cap("ext4"), mount_cap("")];
    let confirmed = controller
        .validate_volume_capabilities(validate_request(&id, caps.clone()))
        .await
        .unwrap()
        .into_inner()
        .confirmed
        .expect("supported capabilities are confirmed");
    assert_eq!(confirmed.volume_capabilities, caps);
    let refused = controller
        .validate_volume_capabilities(validate_request(
            &id,
            vec![
                mount_cap("ext4"),
                cap_with_mode(mount_access("ext4", &[]), Mode::MultiNodeReaderOnly),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refused.confirmed, None);
    assert!(
        refused.message.contains("MULTI_NODE_READER_ONLY"),
        "{}",
        refused.message
    );
    // The volume was created for mount access: block is not confirmed for it.
    let refused = controller
        .validate_volume_capabilities(validate_request(&id, vec![block_cap()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refused.confirmed, None);
    assert!(refused.message.contains("block"), "{}", refused.message);

    // Unstaged, it can go, and going again is fine.
    node.node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
    for _ in 0..2 {
        controller
            .delete_volume(delete_volume_request(&id))
            .await
            .unwrap();
    }
    assert!(!volume_image(&driver.pool_root(), &id).exists());
    assert_code(
        controller
            .controller_get_volume(get_volume_request(&id))
            .await,
        Code::NotFound,
        &[],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn list_volumes_capacity_and_condition() {
    let driver = Driver::start().await;
    let mut controller = driver.controller();

    // Paging collects every volume exactly once.
    let mut created = BTreeSet::new();
    for i in 0..5 {
        let volume = driver
            .create_volume(&format!("pvc-list-{i}"), 16 * MIB, &[])
            .await;
        created.insert(volume.volume_id);
    }
    let pages = driver.list_volume_pages(2).await;
    assert_eq!(pages.len(), 3);
    let mut seen = Vec::new();
    for page in pages {
        assert!(page.entries.len() <= 2, "page of {}", page.entries.len());
        for entry in page.entries {
            let condition = entry
                .status
                .and_then(|s| s.volume_condition)
                .expect("entries carry a volume condition");
            assert!(!condition.abnormal, "{condition:?}");
            seen.push(entry.volume.unwrap().volume_id);
        }
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), created);

    // GetCapacity.
    for params in [
        &[][..],
        &[(PROVISIONING, "thin")],
        &[(PROVISIONING, "thick")],
    ] {
        let capacity = controller
            .get_capacity(capacity_request(params, Some(node_topology(NODE_ID))))
            .await
            .unwrap()
            .into_inner();
        assert!(capacity.available_capacity > 0, "{params:?}: {capacity:?}");
        let largest = capacity.maximum_volume_size.expect("maximum_volume_size");
        assert!(largest > 0 && largest <= POOL_SIZE, "{capacity:?}");
    }
    let elsewhere = controller
        .get_capacity(capacity_request(&[], Some(node_topology("other-node"))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(elsewhere.available_capacity, 0, "{elsewhere:?}");

    // ControllerGetVolume: abnormal when the image disappears behind kura's back.
    let id = created.first().unwrap().clone();
    let healthy = get_volume(&driver, &id).await;
    assert_eq!(healthy.volume.as_ref().unwrap().volume_id, id);
    assert!(!healthy.status.unwrap().volume_condition.unwrap().abnormal);
    std::fs::remove_file(volume_image(&driver.pool_root(), &id)).unwrap();
    let condition = get_volume(&driver, &id)
        .await
        .status
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(condition.abnormal, "{condition:?}");
    assert!(!condition.message.is_empty());
    controller
        .delete_volume(delete_volume_request(&id))
        .await
        .unwrap();
    assert!(pool_volume_files(&driver).iter().all(|f| !f.contains(&id)));
}

#[tokio::test(flavor = "multi_thread")]
async fn node_errors_and_access_modes() {
    use proto::node_service_capability::{self, rpc};
    let driver = Driver::start().await;
    let mut node = driver.node();

    let info = node
        .node_get_info(proto::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, NODE_ID);
    assert_eq!(info.accessible_topology, Some(node_topology(NODE_ID)));
    assert!(info.max_volumes_per_node > 0);
    let caps = node
        .node_get_capabilities(proto::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    for kind in [
        rpc::Type::StageUnstageVolume,
        rpc::Type::GetVolumeStats,
        rpc::Type::VolumeCondition,
        rpc::Type::SingleNodeMultiWriter,
        rpc::Type::ExpandVolume,
    ] {
        let wanted = Some(node_service_capability::Type::Rpc(
            node_service_capability::Rpc {
                r#type: kind as i32,
            },
        ));
        assert!(caps.iter().any(|c| c.r#type == wanted), "{kind:?} missing");
    }

    let staging = driver.path("stage-a");
    std::fs::create_dir_all(&staging).unwrap();
    let target = driver.path("target-a");
    let id = driver
        .create_volume("pvc-node-a", 64 * MIB, &[])
        .await
        .volume_id;

    // SINGLE_NODE_SINGLE_WRITER: staged once; another fs_type or mode on the same
    // path is ALREADY_EXISTS; a second target is FAILED_PRECONDITION.
    let single = cap_with_mode(mount_access("ext4", &[]), Mode::SingleNodeSingleWriter);
    for _ in 0..2 {
        node.node_stage_volume(stage_request(&id, &staging, &single))
            .await
            .unwrap();
    }
    for other in [
        cap_with_mode(mount_access("xfs", &[]), Mode::SingleNodeSingleWriter),
        cap_with_mode(mount_access("ext4", &[]), Mode::SingleNodeMultiWriter),
    ] {
        assert_code(
            node.node_stage_volume(stage_request(&id, &staging, &other))
                .await,
            Code::AlreadyExists,
            &[],
        );
    }
    assert!(is_mounted(&staging), "a refused stage undid the staging");
    for _ in 0..2 {
        node.node_publish_volume(publish_request(&id, &staging, &target, &single, false))
            .await
            .unwrap();
    }
    assert_code(
        node.node_publish_volume(publish_request(&id, &staging, &target, &single, true))
            .await,
        Code::AlreadyExists,
        &[],
    );
    let second = driver.path("target-a2");
    assert_code(
        node.node_publish_volume(publish_request(&id, &staging, &second, &single, false))
            .await,
        Code::FailedPrecondition,
        &[],
    );
    assert!(!second.exists(), "a refused publish made its target");
    // Stats answer only at the volume's own paths.
    node.node_get_volume_stats(stats_request(&id, target.display().to_string()))
        .await
        .unwrap();
    for elsewhere in [
        driver.dir.display().to_string(),
        second.display().to_string(),
        "some/path".to_owned(),
    ] {
        assert_code(
            node.node_get_volume_stats(stats_request(&id, &elsewhere))
                .await,
            Code::NotFound,
            &[],
        );
    }
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
    assert!(!is_mounted(&staging));
    assert_eq!(
        loop_device_of(&volume_image(&driver.pool_root(), &id)),
        None
    );

    // SINGLE_NODE_MULTI_WRITER: two targets share the data; a read-only one refuses
    // writes; the same target with another readonly is ALREADY_EXISTS.
    let multi = cap_with_mode(mount_access("ext4", &[]), Mode::SingleNodeMultiWriter);
    let id_b = driver
        .create_volume("pvc-node-b", 64 * MIB, &[])
        .await
        .volume_id;
    let staging_b = driver.path("stage-b");
    std::fs::create_dir_all(&staging_b).unwrap();
    node.node_stage_volume(stage_request(&id_b, &staging_b, &multi))
        .await
        .unwrap();
    let targets: Vec<PathBuf> = ["t1", "t2", "t-ro"]
        .iter()
        .map(|t| driver.path(&format!("target-b-{t}")))
        .collect();
    for (target, readonly) in targets.iter().zip([false, false, true]) {
        node.node_publish_volume(publish_request(&id_b, &staging_b, target, &multi, readonly))
            .await
            .unwrap();
    }
    let data = pattern(3, 64 << 10);
    std::fs::write(targets[0].join("shared"), &data).unwrap();
    assert_eq!(std::fs::read(targets[1].join("shared")).unwrap(), data);
    assert_eq!(std::fs::read(targets[2].join("shared")).unwrap(), data);
    let denied = std::fs::write(targets[2].join("denied"), b"x").unwrap_err();
    assert_eq!(denied.raw_os_error(), Some(libc::EROFS), "{denied}");
    assert_code(
        node.node_publish_volume(publish_request(
            &id_b,
            &staging_b,
            &targets[2],
            &multi,
            false,
        ))
        .await,
        Code::AlreadyExists,
        &[],
    );
    assert_code(
        node.node_publish_volume(publish_request(
            &id_b,
            &staging_b,
            &targets[0],
            &multi,
            true,
        ))
        .await,
        Code::AlreadyExists,
        &[],
    );
    // Another volume's path is not this volume's.
    node.node_get_volume_stats(stats_request(&id_b, targets[1].display().to_string()))
        .await
        .unwrap();
    assert_code(
        node.node_get_volume_stats(stats_request(&id, targets[1].display().to_string()))
            .await,
        Code::NotFound,
        &[],
    );
    for target in &targets {
        for _ in 0..2 {
            node.node_unpublish_volume(unpublish_request(&id_b, target))
                .await
                .unwrap();
        }
        assert!(!target.exists(), "{} left behind", target.display());
    }
    node.node_unstage_volume(unstage_request(&id_b, &staging_b))
        .await
        .unwrap();

    // Block: the target is a file bind-mounted over the volume's device.
    let id_c = driver
        .create_volume("pvc-node-block", 16 * MIB, &[])
        .await
        .volume_id;
    let staging_c = driver.path("stage-c");
    std::fs::create_dir_all(&staging_c).unwrap();
    let target_c = driver.path("target-c");
    node.node_stage_volume(stage_request(&id_c, &staging_c, &block_cap()))
        .await
        .unwrap();
    node.node_publish_volume(publish_request(
        &id_c,
        &staging_c,
        &target_c,
        &block_cap(),
        false,
    ))
    .await
    .unwrap();
    let file_type = std::fs::metadata(&target_c).unwrap().file_type();
    assert!(file_type.is_block_device(), "{file_type:?}");
    let data = pattern(9, 1 << 20);
    write_at(&target_c, 8192, &data);
    assert_eq!(read_at(&target_c, 8192, data.len()), data);
    assert_eq!(
        read_at(&volume_image(&driver.pool_root(), &id_c), 8192, data.len()),
        data,
        "the block target is not the volume"
    );
    let stats = node
        .node_get_volume_stats(stats_request(&id_c, target_c.display().to_string()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage[0].total, 16 * MIB);
    for _ in 0..2 {
        node.node_unpublish_volume(unpublish_request(&id_c, &target_c))
            .await
            .unwrap();
    }
    assert!(
        !target_c.exists(),
        "unpublish removes the block target file"
    );
    node.node_unstage_volume(unstage_request(&id_c, &staging_c))
        .await
        .unwrap();
    assert_eq!(
        loop_device_of(&volume_image(&driver.pool_root(), &id_c)),
        None
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn staging_never_reformats() {
    let driver = Driver::start().await;
    let mut node = driver.node();
    let id = driver
        .create_volume("pvc-keep", 64 * MIB, &[])
        .await
        .volume_id;
    let image = volume_image(&driver.pool_root(), &id);

    let (staging, target) = driver
        .stage_and_publish(&id, &mount_cap("ext4"), "keep")
        .await;
    std::fs::write(target.join("kept"), b"still here").unwrap();
    driver.unpublish_and_unstage(&id, &staging, &target).await;

    // Staged again with no fs_type: mounted as it is, the file survives.
    let (staging, target) = driver.stage_and_publish(&id, &mount_cap(""), "keep").await;
    assert_eq!(std::fs::read(target.join("kept")).unwrap(), b"still here");
    let mount = kura::sys::mountinfo::read()
        .unwrap()
        .into_iter()
        .find(|m| m.mount_point == staging)
        .unwrap();
    assert_eq!(mount.fs_type, "ext4");
    driver.unpublish_and_unstage(&id, &staging, &target).await;

    // Asked for another filesystem: refused, nothing mounted, nothing attached.
    assert_code(
        node.node_stage_volume(stage_request(&id, &staging, &mount_cap("xfs")))
            .await,
        Code::FailedPrecondition,
        &["ext4", "xfs"],
    );
    assert!(!is_mounted(&staging));
    assert_eq!(loop_device_of(&image), None);

    // And the data is still intact.
    let (staging, target) = driver
        .stage_and_publish(&id, &mount_cap("ext4"), "keep")
        .await;
    assert_eq!(std::fs::read(target.join("kept")).unwrap(), b"still here");
    driver.unpublish_and_unstage(&id, &staging, &target).await;
}
