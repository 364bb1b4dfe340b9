//! ControllerModifyVolume and CreateVolume's `mutable_parameters`: thin -> thick
//! allocates the image (st_blocks), thick -> thin records thin and punches nothing,
//! repeats change nothing, and every refusal (unknown key, bad value, a pool too small)
//! leaves the volume as it was. Also over the split roles.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::cluster::*;
use common::*;
use kura::csi::proto;
use kura::csi::proto::controller_client::ControllerClient;
use tonic::Code;
use tonic::transport::Channel;

fn modify(id: &str, pairs: &[(&str, &str)]) -> proto::ControllerModifyVolumeRequest {
    proto::ControllerModifyVolumeRequest {
        volume_id: id.into(),
        mutable_parameters: string_map(pairs),
        ..Default::default()
    }
}

/// The pool of the round trips: small, since a thick volume on an image pool takes
/// its space on the host's disk too.
const SMALL_POOL: &str = "4Gi";

/// Bytes allocated to a file, from st_blocks.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// What a volume is on disk: its image's allocation and its metadata document.
fn state(image: &Path) -> (u64, String) {
    let meta = image.with_extension("json");
    (allocated(image), std::fs::read_to_string(meta).unwrap())
}

/// Thin -> thick -> thin on one volume, with the refusals in between; `root` is the
/// pool the volume lands in.
async fn modify_round_trip(controller: &mut ControllerClient<Channel>, root: &Path) {
    let size = 1536 * MIB;
    let volume = controller
        .create_volume(create_request("pvc-modify", size, &[], None))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let id = volume.volume_id;
    let image = volume_image(root, &id);
    let thin = state(&image);
    assert!(thin.0 < 64 * MIB as u64, "a new thin volume is sparse");
    assert!(thin.1.contains(r#""provisioning": "thin""#), "{}", thin.1);

    // Refusals: nothing applied, whatever else the request asks for.
    for (pairs, needle) in [
        (&[("iops", "100")][..], "iops"),
        (
            &[(PROVISIONING, "thick"), ("XXX_FakeKey", "v")],
            "XXX_FakeKey",
        ),
        (&[(PROVISIONING, "fat")], "fat"),
    ] {
        let status = controller
            .controller_modify_volume(modify(&id, pairs))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(status.message().contains(needle), "{}", status.message());
        assert_eq!(state(&image), thin, "{pairs:?} changed nothing");
    }
    assert_code(
        controller
            .controller_modify_volume(modify("", &[(PROVISIONING, "thick")]))
            .await,
        Code::InvalidArgument,
        &[],
    );
    for unknown in ["non-existing-volume-id", &id.replace("vol-", "vol-f")] {
        assert_code(
            controller
                .controller_modify_volume(modify(unknown, &[(PROVISIONING, "thick")]))
                .await,
            Code::NotFound,
            &[],
        );
    }

    // A pool too small for the blocks the volume still lacks: RESOURCE_EXHAUSTED, and
    // the image and its record are as they were.
    let filler = controller
        .create_volume(create_request(
            "pvc-filler",
            3 * GIB,
            &[(PROVISIONING, "thick")],
            None,
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_code(
        controller
            .controller_modify_volume(modify(&id, &[(PROVISIONING, "thick")]))
            .await,
        Code::ResourceExhausted,
        &[],
    );
    assert_eq!(state(&image), thin, "a refused thickening changed nothing");
    controller
        .delete_volume(delete_volume_request(&filler.volume_id))
        .await
        .unwrap();

    // The pool's filesystem frees a deleted file's blocks in the background: wait
    // until the filler's space is back.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while controller
        .controller_modify_volume(modify(&id, &[(PROVISIONING, "thick")]))
        .await
        .is_err_and(|s| s.code() == Code::ResourceExhausted)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "space never came back"
        );
        assert_eq!(state(&image), thin, "a refused thickening changed nothing");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // Thin -> thick allocated the whole image; again changes nothing.
    for _ in 0..2 {
        controller
            .controller_modify_volume(modify(&id, &[(PROVISIONING, "thick")]))
            .await
            .unwrap();
        let thick = state(&image);
        assert!(thick.0 >= size as u64, "thick: {} bytes allocated", thick.0);
        assert!(
            thick.1.contains(r#""provisioning": "thick""#),
            "{}",
            thick.1
        );
    }
    let thick = state(&image);

    // Thick -> thin records thin and keeps the blocks.
    for _ in 0..2 {
        controller
            .controller_modify_volume(modify(&id, &[(PROVISIONING, "thin")]))
            .await
            .unwrap();
        let now = state(&image);
        assert_eq!(now.0, thick.0, "thick -> thin punches nothing");
        assert!(now.1.contains(r#""provisioning": "thin""#), "{}", now.1);
    }
    controller
        .delete_volume(delete_volume_request(&id))
        .await
        .unwrap();
}

#[tokio::test]
async fn thin_becomes_thick_and_refusals_change_nothing() {
    let driver = Driver::start_with(
        PoolKind::OnHost {
            host_bytes: 8 << 30,
            pool_size: SMALL_POOL,
        },
        &[],
    )
    .await;
    let mut controller = driver.controller();
    let caps = controller
        .controller_get_capabilities(proto::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let modify_cap = proto::controller_service_capability::rpc::Type::ModifyVolume as i32;
    assert!(
        caps.capabilities.iter().any(|c| matches!(
            &c.r#type,
            Some(proto::controller_service_capability::Type::Rpc(r)) if r.r#type == modify_cap
        )),
        "MODIFY_VOLUME is advertised"
    );
    modify_round_trip(&mut controller, &driver.pool_root()).await;
}

#[tokio::test]
async fn create_honours_mutable_parameters() {
    let driver = Driver::start().await;
    let mut controller = driver.controller();
    let root = driver.pool_root();

    // Mutable parameters beat the StorageClass's.
    let mut request = create_request("pvc-vac", 256 * MIB, &[(PROVISIONING, "thin")], None);
    request.mutable_parameters = string_map(&[(PROVISIONING, "thick")]);
    for _ in 0..2 {
        let volume = controller
            .create_volume(request.clone())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert!(allocated(&volume_image(&root, &volume.volume_id)) >= 256 * MIB as u64);
    }

    // An unknown key or value: INVALID_ARGUMENT, nothing created.
    for pairs in [&[("XXX_FakeKey", "v")][..], &[(PROVISIONING, "fat")]] {
        let mut request = create_request("pvc-vac-bad", 256 * MIB, &[], None);
        request.mutable_parameters = string_map(pairs);
        assert_code(
            controller.create_volume(request).await,
            Code::InvalidArgument,
            &[],
        );
        let files: Vec<_> = std::fs::read_dir(root.join("volumes"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files.len(), 2, "only pvc-vac's files: {files:?}");
    }

    // ValidateVolumeCapabilities confirms kura's mutable parameters, not others.
    let volume_id =
        kura::pool::VolumeId::derive("pvc-vac", &kura::pool::NodeToken::for_node(NODE_ID));
    let validate = |pairs: &[(&str, &str)]| proto::ValidateVolumeCapabilitiesRequest {
        volume_id: volume_id.to_string(),
        volume_capabilities: vec![mount_cap("")],
        mutable_parameters: string_map(pairs),
        ..Default::default()
    };
    let ok = controller
        .validate_volume_capabilities(validate(&[(PROVISIONING, "thin")]))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some(), "{}", ok.message);
    let refused = controller
        .validate_volume_capabilities(validate(&[("iops", "1")]))
        .await
        .unwrap()
        .into_inner();
    assert!(refused.confirmed.is_none());
    assert!(refused.message.contains("iops"), "{}", refused.message);
}

#[tokio::test]
async fn split_roles_modify_through_the_agent() {
    let cluster = Cluster::start(&[SMALL_POOL]).await;
    let mut controller = cluster.controller().controller();
    let root = cluster.node("node-a").dir.join("state/pool");
    modify_round_trip(&mut controller, &root).await;
}

/// A volume in use is thickened under its running filesystem: what was written before
/// and after reads back from the image.
#[tokio::test]
async fn a_published_volume_is_thickened_in_place() {
    let driver = Driver::start().await;
    let mut controller = driver.controller();
    let volume = driver.create_volume("pvc-live", 256 * MIB, &[]).await;
    let cap = mount_cap("ext4");
    let (staging, target) = driver
        .stage_and_publish(&volume.volume_id, &cap, "live")
        .await;
    let data = pattern(5, 4 << 20);
    write_file(&target.join("before"), &data);
    let image = volume_image(&driver.pool_root(), &volume.volume_id);
    assert!(allocated(&image) < 256 * MIB as u64);
    controller
        .controller_modify_volume(modify(&volume.volume_id, &[(PROVISIONING, "thick")]))
        .await
        .unwrap();
    assert!(allocated(&image) >= 256 * MIB as u64);
    assert_eq!(std::fs::read(target.join("before")).unwrap(), data);
    write_file(&target.join("after"), &data);
    driver
        .unpublish_and_unstage(&volume.volume_id, &staging, &target)
        .await;
    // Read back from the image, not the page cache: staged again.
    let (staging, target) = driver
        .stage_and_publish(&volume.volume_id, &cap, "again")
        .await;
    for name in ["before", "after"] {
        assert_eq!(std::fs::read(target.join(name)).unwrap(), data, "{name}");
    }
    driver
        .unpublish_and_unstage(&volume.volume_id, &staging, &target)
        .await;
}
