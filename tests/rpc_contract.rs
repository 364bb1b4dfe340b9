//! The CSI error-code contract over the real socket: what each RPC answers for missing
//! fields, unknown and malformed IDs, incompatible repeats, unsatisfiable sizes and
//! topologies, and wrong node-side state (CSI v1.12 error tables, plus kura's rules:
//! a malformed ID behaves like an unknown one, and input errors name their field).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::*;
use kura::csi::proto::{self, volume_capability};
use kura::pool::{NodeToken, VolumeId};
use tonic::{Code, Response, Status};
use volume_capability::access_mode::Mode;

const TOPOLOGY_KEY: &str = "topology.kura.csi.dev/node";
const PROVISIONING: &str = "kura.csi.dev/provisioning";
/// Well formed, on this node, naming nothing.
const UNKNOWN_VOLUME: &str = "vol-0123456789abcdef0123456789abcdef-test-node";
const UNKNOWN_SNAPSHOT: &str = "snap-0123456789abcdef0123456789abcdef-test-node";
/// Well formed, on a node kura does not know.
const FOREIGN_VOLUME: &str = "vol-0123456789abcdef0123456789abcdef-other-node";
/// Cannot be an ID of kura's.
const MALFORMED_ID: &str = "not-a-kura-id";

/// Asserts that `result` failed with `code` and a message containing every `needle`.
#[track_caller]
fn assert_code<T: std::fmt::Debug>(
    result: Result<Response<T>, Status>,
    code: Code,
    needles: &[&str],
) {
    let status = match result {
        Ok(response) => panic!("expected {code:?}, got OK: {:?}", response.get_ref()),
        Err(status) => status,
    };
    assert_eq!(status.code(), code, "message: {}", status.message());
    assert!(!status.message().is_empty(), "{code:?} without a message");
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{code:?} message {:?} does not name {needle:?}",
            status.message()
        );
    }
}

fn topology(node: &str) -> proto::Topology {
    proto::Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), node.to_owned())]),
    }
}

fn mount_cap_mode(fs_type: &str, mode: Mode) -> proto::VolumeCapability {
    cap_with_mode(
        volume_capability::AccessType::Mount(volume_capability::MountVolume {
            fs_type: fs_type.into(),
            ..Default::default()
        }),
        mode,
    )
}

/// The ID a volume of this name gets on the test node.
fn volume_id_for(name: &str) -> String {
    VolumeId::derive(name, &NodeToken::for_node(NODE_ID)).to_string()
}

/// Names of the files in the pool's volumes directory.
fn pool_volume_files(driver: &Driver) -> BTreeSet<String> {
    std::fs::read_dir(driver.pool_root().join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn image_of(driver: &Driver, volume_id: &str) -> PathBuf {
    driver
        .pool_root()
        .join("volumes")
        .join(format!("{volume_id}.img"))
}

fn is_mount_point(path: &Path) -> bool {
    kura::sys::mountinfo::read()
        .unwrap()
        .iter()
        .any(|m| m.mount_point == path)
}

fn loop_device_of(image: &Path) -> Option<PathBuf> {
    kura::sys::loopdev::find_by_backing(image)
        .unwrap()
        .map(|d| d.path)
}

fn unstage_request(volume_id: &str, staging: &Path) -> proto::NodeUnstageVolumeRequest {
    proto::NodeUnstageVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: staging.display().to_string(),
    }
}

fn unpublish_request(volume_id: &str, target: &Path) -> proto::NodeUnpublishVolumeRequest {
    proto::NodeUnpublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.display().to_string(),
    }
}

fn stats_request(volume_id: &str, path: &str) -> proto::NodeGetVolumeStatsRequest {
    proto::NodeGetVolumeStatsRequest {
        volume_id: volume_id.into(),
        volume_path: path.into(),
        ..Default::default()
    }
}

fn delete_request(volume_id: &str) -> proto::DeleteVolumeRequest {
    proto::DeleteVolumeRequest {
        volume_id: volume_id.into(),
        ..Default::default()
    }
}

fn validate_request(
    volume_id: &str,
    caps: Vec<proto::VolumeCapability>,
) -> proto::ValidateVolumeCapabilitiesRequest {
    proto::ValidateVolumeCapabilitiesRequest {
        volume_id: volume_id.into(),
        volume_capabilities: caps,
        ..Default::default()
    }
}

fn capacity_request(
    params: &[(&str, &str)],
    topology: Option<proto::Topology>,
) -> proto::GetCapacityRequest {
    proto::GetCapacityRequest {
        volume_capabilities: vec![mount_cap("")],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        accessible_topology: topology,
    }
}

async fn get_volume(driver: &Driver, volume_id: &str) -> proto::ControllerGetVolumeResponse {
    driver
        .controller()
        .controller_get_volume(proto::ControllerGetVolumeRequest {
            volume_id: volume_id.into(),
        })
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
    assert_eq!(info.name, "kura.csi.dev");
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
async fn controller_lists_exactly_the_rpcs_it_serves() {
    use proto::controller_service_capability::{self, rpc::Type};
    let driver = Driver::start().await;
    let caps = driver
        .controller()
        .controller_get_capabilities(proto::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let mut listed: Vec<i32> = caps
        .iter()
        .map(|c| match &c.r#type {
            Some(controller_service_capability::Type::Rpc(r)) => r.r#type,
            other => panic!("not an RPC capability: {other:?}"),
        })
        .collect();
    listed.sort();
    // GET_SNAPSHOT included: kura serves GetSnapshot, and csi-sanity v5.5 tests it
    // only when listed. Never PUBLISH_UNPUBLISH_VOLUME: volumes are local.
    let mut served: Vec<i32> = [
        Type::CreateDeleteVolume,
        Type::ListVolumes,
        Type::GetCapacity,
        Type::GetVolume,
        Type::VolumeCondition,
        Type::SingleNodeMultiWriter,
        Type::CreateDeleteSnapshot,
        Type::ListSnapshots,
        Type::GetSnapshot,
        Type::CloneVolume,
        Type::ExpandVolume,
        Type::ModifyVolume,
    ]
    .into_iter()
    .map(|t| t as i32)
    .collect();
    served.sort();
    assert_eq!(listed, served);
}

#[tokio::test(flavor = "multi_thread")]
async fn create_volume_errors_and_idempotency() {
    let driver = Driver::start().await;
    let mut controller = driver.controller();

    // Missing and malformed input: INVALID_ARGUMENT naming the field.
    let mut request = create_request("", 64 * MIB, &[], None);
    assert_code(
        controller.create_volume(request.clone()).await,
        Code::InvalidArgument,
        &["name"],
    );
    request.name = "pvc-no-caps".into();
    request.volume_capabilities.clear();
    assert_code(
        controller.create_volume(request.clone()).await,
        Code::InvalidArgument,
        &["volume_capabilities"],
    );
    request.volume_capabilities = vec![proto::VolumeCapability {
        access_type: None,
        access_mode: Some(volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }];
    assert_code(
        controller.create_volume(request.clone()).await,
        Code::InvalidArgument,
        &["volume_capabilities[0].access_type"],
    );
    request.volume_capabilities = vec![mount_cap_mode("", Mode::MultiNodeMultiWriter)];
    assert_code(
        controller.create_volume(request).await,
        Code::InvalidArgument,
        &["volume_capabilities", "MULTI_NODE_MULTI_WRITER"],
    );
    assert_code(
        controller
            .create_volume(create_request(
                "pvc-param",
                64 * MIB,
                &[("colour", "blue")],
                None,
            ))
            .await,
        Code::InvalidArgument,
        &["colour"],
    );
    assert_code(
        controller
            .create_volume(create_request(
                "pvc-param",
                64 * MIB,
                &[(PROVISIONING, "fat")],
                None,
            ))
            .await,
        Code::InvalidArgument,
        &[PROVISIONING, "fat"],
    );

    // Thick allocates the whole image, thin allocates (almost) nothing.
    let thick = driver
        .create_volume("pvc-thick", 64 * MIB, &[(PROVISIONING, "thick")])
        .await;
    assert_eq!(thick.capacity_bytes, 64 * MIB);
    let allocated = std::fs::metadata(image_of(&driver, &thick.volume_id))
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
    let allocated = std::fs::metadata(image_of(&driver, &thin.volume_id))
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

    // Same name and arguments: the same volume; same name, another size: ALREADY_EXISTS.
    let request = create_request("pvc-again", 64 * MIB, &[], None);
    let first = controller
        .create_volume(request.clone())
        .await
        .unwrap()
        .into_inner();
    let second = controller
        .create_volume(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, second);
    assert_code(
        controller
            .create_volume(create_request("pvc-again", 128 * MIB, &[], None))
            .await,
        Code::AlreadyExists,
        &["pvc-again"],
    );
    assert_code(
        controller
            .create_volume(create_request(
                "pvc-again",
                64 * MIB,
                &[(PROVISIONING, "thick")],
                None,
            ))
            .await,
        Code::AlreadyExists,
        &["pvc-again"],
    );

    // Sizes: required above limit is OUT_OF_RANGE; sizes round up to whole MiB.
    let mut request = create_request("pvc-range", 128 * MIB, &[], None);
    request.capacity_range = Some(proto::CapacityRange {
        required_bytes: 128 * MIB,
        limit_bytes: 64 * MIB,
    });
    assert_code(
        controller.create_volume(request).await,
        Code::OutOfRange,
        &["capacity_range"],
    );
    let odd = driver.create_volume("pvc-odd", MIB + 1, &[]).await;
    assert_eq!(odd.capacity_bytes, 2 * MIB);
    assert_eq!(
        std::fs::metadata(image_of(&driver, &odd.volume_id))
            .unwrap()
            .len(),
        2 * MIB as u64
    );

    // Topology: a requisite naming only another node cannot be met; ours can.
    let mut request = create_request("pvc-topology", 64 * MIB, &[], None);
    request.accessibility_requirements = Some(proto::TopologyRequirement {
        requisite: vec![topology("other-node")],
        preferred: vec![topology("other-node")],
    });
    assert_code(
        controller.create_volume(request.clone()).await,
        Code::ResourceExhausted,
        &["accessibility_requirements"],
    );
    request.accessibility_requirements = Some(proto::TopologyRequirement {
        requisite: vec![topology("other-node"), topology(NODE_ID)],
        preferred: vec![topology("other-node"), topology(NODE_ID)],
    });
    let placed = controller
        .create_volume(request)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(placed.accessible_topology, vec![topology(NODE_ID)]);
    assert!(placed.volume_id.ends_with(NODE_ID));

    // Bigger than the whole pool (16Gi) could ever hold: OUT_OF_RANGE. Within it, but
    // bigger than the free space: RESOURCE_EXHAUSTED. Nothing left behind either way.
    let filler = driver
        .create_volume("pvc-filler", 10 * GIB, &[(PROVISIONING, "thick")])
        .await;
    let before = pool_volume_files(&driver);
    for (name, size, provisioning, code) in [
        ("pvc-huge-thick", 64 * GIB, "thick", Code::OutOfRange),
        ("pvc-huge-thin", 64 * GIB, "thin", Code::OutOfRange),
        ("pvc-full-thick", 8 * GIB, "thick", Code::ResourceExhausted),
        ("pvc-full-thin", 8 * GIB, "thin", Code::ResourceExhausted),
    ] {
        assert_code(
            controller
                .create_volume(create_request(
                    name,
                    size,
                    &[(PROVISIONING, provisioning)],
                    None,
                ))
                .await,
            code,
            &[],
        );
        let id = volume_id_for(name);
        let after = pool_volume_files(&driver);
        assert!(
            after.iter().all(|f| !f.contains(&id)),
            "{name} left {after:?}"
        );
        assert_eq!(before, after);
    }
    controller
        .delete_volume(delete_request(&filler.volume_id))
        .await
        .unwrap();

    // Content sources that name nothing: NOT_FOUND, whatever their form.
    for (source, id) in [
        (snapshot_source(UNKNOWN_SNAPSHOT), UNKNOWN_SNAPSHOT),
        (snapshot_source(MALFORMED_ID), MALFORMED_ID),
        (volume_source(UNKNOWN_VOLUME), UNKNOWN_VOLUME),
        (volume_source(MALFORMED_ID), MALFORMED_ID),
        (volume_source(FOREIGN_VOLUME), FOREIGN_VOLUME),
    ] {
        assert_code(
            controller
                .create_volume(create_request(
                    "pvc-from-nothing",
                    64 * MIB,
                    &[],
                    Some(source),
                ))
                .await,
            Code::NotFound,
            &[id],
        );
    }
    assert!(
        pool_volume_files(&driver)
            .iter()
            .all(|f| !f.contains(&volume_id_for("pvc-from-nothing")))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_and_validate_volume() {
    let driver = Driver::start().await;
    let mut controller = driver.controller();
    let mut node = driver.node();

    // DeleteVolume: what does not exist is deleted; the ID is required.
    for id in [UNKNOWN_VOLUME, MALFORMED_ID, FOREIGN_VOLUME] {
        controller
            .delete_volume(delete_request(id))
            .await
            .unwrap_or_else(|e| panic!("delete {id}: {e}"));
    }
    assert_code(
        controller.delete_volume(delete_request("")).await,
        Code::InvalidArgument,
        &["volume_id"],
    );

    // A staged volume is in use.
    let volume = driver.create_volume("pvc-staged", 64 * MIB, &[]).await;
    let id = volume.volume_id;
    let staging = driver.path("staging");
    std::fs::create_dir_all(&staging).unwrap();
    node.node_stage_volume(stage_request(&id, &staging, &mount_cap("ext4")))
        .await
        .unwrap();
    assert_code(
        controller.delete_volume(delete_request(&id)).await,
        Code::FailedPrecondition,
        &[&id],
    );
    assert!(
        image_of(&driver, &id).exists(),
        "a refused delete removed the image"
    );

    // ValidateVolumeCapabilities.
    let caps = vec![mount_cap("ext4"), mount_cap("")];
    for unknown in [UNKNOWN_VOLUME, MALFORMED_ID, FOREIGN_VOLUME] {
        assert_code(
            controller
                .validate_volume_capabilities(validate_request(unknown, caps.clone()))
                .await,
            Code::NotFound,
            &[],
        );
    }
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
                mount_cap_mode("ext4", Mode::MultiNodeReaderOnly),
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
    for volume_id in [id.as_str(), UNKNOWN_VOLUME] {
        assert_code(
            controller
                .validate_volume_capabilities(validate_request(volume_id, vec![]))
                .await,
            Code::InvalidArgument,
            &["volume_capabilities"],
        );
    }
    assert_code(
        controller
            .validate_volume_capabilities(validate_request("", caps))
            .await,
        Code::InvalidArgument,
        &["volume_id"],
    );

    // Unstaged, it can go, and going again is fine.
    node.node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
    for _ in 0..2 {
        controller.delete_volume(delete_request(&id)).await.unwrap();
    }
    assert!(!image_of(&driver, &id).exists());
    assert_code(
        controller
            .controller_get_volume(proto::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            })
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
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = controller
            .list_volumes(proto::ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.entries.len() <= 2, "page of {}", page.entries.len());
        for entry in page.entries {
            let condition = entry
                .status
                .and_then(|s| s.volume_condition)
                .expect("entries carry a volume condition");
            assert!(!condition.abnormal, "{condition:?}");
            seen.push(entry.volume.unwrap().volume_id);
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), created);
    assert_code(
        controller
            .list_volumes(proto::ListVolumesRequest {
                max_entries: 2,
                starting_token: "garbage".into(),
            })
            .await,
        Code::Aborted,
        &["starting_token"],
    );

    // GetCapacity.
    for params in [
        &[][..],
        &[(PROVISIONING, "thin")],
        &[(PROVISIONING, "thick")],
    ] {
        let capacity = controller
            .get_capacity(capacity_request(params, Some(topology(NODE_ID))))
            .await
            .unwrap()
            .into_inner();
        assert!(capacity.available_capacity > 0, "{params:?}: {capacity:?}");
        let largest = capacity.maximum_volume_size.expect("maximum_volume_size");
        assert!(largest > 0 && largest <= 16 * GIB, "{capacity:?}");
    }
    let elsewhere = controller
        .get_capacity(capacity_request(&[], Some(topology("other-node"))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(elsewhere.available_capacity, 0, "{elsewhere:?}");
    assert_code(
        controller
            .get_capacity(capacity_request(&[("colour", "blue")], None))
            .await,
        Code::InvalidArgument,
        &["colour"],
    );

    // ControllerGetVolume: NOT_FOUND for what does not exist; abnormal when the
    // image disappears behind kura's back.
    for unknown in [UNKNOWN_VOLUME, MALFORMED_ID, FOREIGN_VOLUME] {
        assert_code(
            controller
                .controller_get_volume(proto::ControllerGetVolumeRequest {
                    volume_id: unknown.into(),
                })
                .await,
            Code::NotFound,
            &[],
        );
    }
    let id = created.first().unwrap().clone();
    let healthy = get_volume(&driver, &id).await;
    assert_eq!(healthy.volume.as_ref().unwrap().volume_id, id);
    assert!(!healthy.status.unwrap().volume_condition.unwrap().abnormal);
    std::fs::remove_file(image_of(&driver, &id)).unwrap();
    let condition = get_volume(&driver, &id)
        .await
        .status
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(condition.abnormal, "{condition:?}");
    assert!(!condition.message.is_empty());
    controller.delete_volume(delete_request(&id)).await.unwrap();
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
    assert_eq!(info.accessible_topology, Some(topology(NODE_ID)));
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

    let cap = mount_cap("ext4");
    let staging = driver.path("stage-a");
    std::fs::create_dir_all(&staging).unwrap();
    let target = driver.path("target-a");
    let id = driver
        .create_volume("pvc-node-a", 64 * MIB, &[])
        .await
        .volume_id;

    // Missing fields: INVALID_ARGUMENT naming them, even for IDs that name nothing.
    for volume_id in [id.as_str(), UNKNOWN_VOLUME] {
        let mut stage = stage_request(volume_id, &staging, &cap);
        stage.volume_id.clear();
        assert_code(
            node.node_stage_volume(stage).await,
            Code::InvalidArgument,
            &["volume_id"],
        );
        let mut stage = stage_request(volume_id, &staging, &cap);
        stage.staging_target_path.clear();
        assert_code(
            node.node_stage_volume(stage).await,
            Code::InvalidArgument,
            &["staging_target_path"],
        );
        let mut stage = stage_request(volume_id, &staging, &cap);
        stage.volume_capability = None;
        assert_code(
            node.node_stage_volume(stage).await,
            Code::InvalidArgument,
            &["volume_capability"],
        );
        let mut stage = stage_request(volume_id, &staging, &cap);
        stage.volume_capability.as_mut().unwrap().access_type = None;
        assert_code(
            node.node_stage_volume(stage).await,
            Code::InvalidArgument,
            &["volume_capability.access_type"],
        );

        let publish = || publish_request(volume_id, &staging, &target, &cap, false);
        let mut request = publish();
        request.volume_id.clear();
        assert_code(
            node.node_publish_volume(request).await,
            Code::InvalidArgument,
            &["volume_id"],
        );
        let mut request = publish();
        request.target_path.clear();
        assert_code(
            node.node_publish_volume(request).await,
            Code::InvalidArgument,
            &["target_path"],
        );
        // This node advertises STAGE_UNSTAGE_VOLUME: a publish without a staging path
        // is FAILED_PRECONDITION (the spec's table).
        let mut request = publish();
        request.staging_target_path.clear();
        assert_code(
            node.node_publish_volume(request).await,
            Code::FailedPrecondition,
            &["staging_target_path"],
        );
        let mut request = publish();
        request.volume_capability = None;
        assert_code(
            node.node_publish_volume(request).await,
            Code::InvalidArgument,
            &["volume_capability"],
        );

        assert_code(
            node.node_unpublish_volume(unpublish_request("", &target))
                .await,
            Code::InvalidArgument,
            &["volume_id"],
        );
        assert_code(
            node.node_unpublish_volume(unpublish_request(volume_id, Path::new("")))
                .await,
            Code::InvalidArgument,
            &["target_path"],
        );
        assert_code(
            node.node_unstage_volume(unstage_request("", &staging))
                .await,
            Code::InvalidArgument,
            &["volume_id"],
        );
        assert_code(
            node.node_unstage_volume(unstage_request(volume_id, Path::new("")))
                .await,
            Code::InvalidArgument,
            &["staging_target_path"],
        );
        assert_code(
            node.node_get_volume_stats(stats_request(volume_id, ""))
                .await,
            Code::InvalidArgument,
            &["volume_path"],
        );
    }
    assert_code(
        node.node_get_volume_stats(stats_request("", &target.display().to_string()))
            .await,
        Code::InvalidArgument,
        &["volume_id"],
    );

    // Volumes that do not exist: NOT_FOUND.
    for unknown in [UNKNOWN_VOLUME, MALFORMED_ID, FOREIGN_VOLUME] {
        assert_code(
            node.node_stage_volume(stage_request(unknown, &staging, &cap))
                .await,
            Code::NotFound,
            &[],
        );
        assert_code(
            node.node_publish_volume(publish_request(unknown, &staging, &target, &cap, false))
                .await,
            Code::NotFound,
            &[],
        );
        assert_code(
            node.node_unpublish_volume(unpublish_request(unknown, &target))
                .await,
            Code::NotFound,
            &[],
        );
        assert_code(
            node.node_unstage_volume(unstage_request(unknown, &staging))
                .await,
            Code::NotFound,
            &[],
        );
        assert_code(
            node.node_get_volume_stats(stats_request(unknown, &staging.display().to_string()))
                .await,
            Code::NotFound,
            &[],
        );
    }
    assert!(!is_mount_point(&staging) && !target.exists());

    // Publish comes after stage.
    assert_code(
        node.node_publish_volume(publish_request(&id, &staging, &target, &cap, false))
            .await,
        Code::FailedPrecondition,
        &["not staged"],
    );
    assert!(!target.exists(), "a refused publish made its target");

    // SINGLE_NODE_SINGLE_WRITER: staged once; another fs_type or mode on the same
    // path is ALREADY_EXISTS; a second target is FAILED_PRECONDITION.
    let single = mount_cap_mode("ext4", Mode::SingleNodeSingleWriter);
    for _ in 0..2 {
        node.node_stage_volume(stage_request(&id, &staging, &single))
            .await
            .unwrap();
    }
    for other in [
        mount_cap_mode("xfs", Mode::SingleNodeSingleWriter),
        mount_cap_mode("ext4", Mode::SingleNodeMultiWriter),
    ] {
        assert_code(
            node.node_stage_volume(stage_request(&id, &staging, &other))
                .await,
            Code::AlreadyExists,
            &[],
        );
    }
    assert!(
        is_mount_point(&staging),
        "a refused stage undid the staging"
    );
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
    node.node_get_volume_stats(stats_request(&id, &target.display().to_string()))
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
    assert!(!is_mount_point(&staging));
    assert_eq!(loop_device_of(&image_of(&driver, &id)), None);

    // SINGLE_NODE_MULTI_WRITER: two targets share the data; a read-only one refuses
    // writes; the same target with another readonly is ALREADY_EXISTS.
    let multi = mount_cap_mode("ext4", Mode::SingleNodeMultiWriter);
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
    node.node_get_volume_stats(stats_request(&id_b, &targets[1].display().to_string()))
        .await
        .unwrap();
    assert_code(
        node.node_get_volume_stats(stats_request(&id, &targets[1].display().to_string()))
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
        read_at(&image_of(&driver, &id_c), 8192, data.len()),
        data,
        "the block target is not the volume"
    );
    let stats = node
        .node_get_volume_stats(stats_request(&id_c, &target_c.display().to_string()))
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
    assert_eq!(loop_device_of(&image_of(&driver, &id_c)), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn staging_never_reformats() {
    let driver = Driver::start().await;
    let mut node = driver.node();
    let id = driver
        .create_volume("pvc-keep", 64 * MIB, &[])
        .await
        .volume_id;
    let image = image_of(&driver, &id);

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
    assert!(!is_mount_point(&staging));
    assert_eq!(loop_device_of(&image), None);

    // And the data is still intact.
    let (staging, target) = driver
        .stage_and_publish(&id, &mount_cap("ext4"), "keep")
        .await;
    assert_eq!(std::fs::read(target.join("kept")).unwrap(), b"still here");
    driver.unpublish_and_unstage(&id, &staging, &target).await;
}
