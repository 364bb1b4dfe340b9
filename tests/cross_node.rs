//! Cross-node restore and clone: a controller and two nodes as real processes, the
//! copy pulled node to node over the agent API. Timing is made deterministic with the
//! nodes' pause points (`transfer-checkpoint` holds a destination after a checkpoint)
//! and the source's one-shot `damage-chunk` hook.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::process::Proc;
use common::*;
use kura::csi::proto;
use kura::pool::{NodeToken, VolumeId};
use sha2::{Digest, Sha256};
use tonic::Code;

const SIZES: [&str; 2] = ["2Gi", "2Gi"];
const COPY_DEADLINE: Duration = Duration::from_secs(180);

/// A new empty volume on `node`; its ID.
async fn volume_on(
    controller: &Proc,
    name: &str,
    size: i64,
    node: &str,
    cap: &proto::VolumeCapability,
) -> String {
    let request = on_node(name, size, node, cap.clone(), None);
    controller
        .create(request)
        .await
        .expect("CreateVolume")
        .volume_id
}

/// CreateVolume as the provisioner calls it: again while the answer is ABORTED (a
/// copy in progress), until it is something else.
async fn create_until_copied(
    controller: &Proc,
    request: proto::CreateVolumeRequest,
) -> Result<proto::Volume, tonic::Status> {
    let started = Instant::now();
    loop {
        match controller.create(request.clone()).await {
            Err(status) if status.code() == Code::Aborted => {
                assert!(
                    started.elapsed() < COPY_DEADLINE,
                    "the copy never finished: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

fn sha256(path: &Path) -> String {
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path).unwrap();
    std::io::copy(&mut file, &mut hasher).unwrap();
    format!("{:x}", hasher.finalize())
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Files a transfer may leave: `.partial`, `.transfer`, exports.
fn transfer_leftovers(node: &NodeProc) -> Vec<String> {
    let mut found = Vec::new();
    for dir in ["volumes", "exports"] {
        let Ok(entries) = std::fs::read_dir(node.pool_root().join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dir == "exports" || name.ends_with(".partial") || name.ends_with(".transfer") {
                found.push(format!("{}: {dir}/{name}", node.id));
            }
        }
    }
    found
}

/// A block volume on node-a with `data` MiB of pattern at its start and 1 MiB at 3/4
/// of it, the rest never written; returns its ID.
async fn block_source(cluster: &Cluster, name: &str, size: i64, data: usize) -> String {
    let controller = cluster.controller();
    let node = cluster.node("node-a");
    let cap = block_cap();
    let id = volume_on(controller, name, size, "node-a", &cap).await;
    let (staging, device) = node.stage_and_publish(&id, &cap, name).await;
    let at = (size as u64) / 4 * 3;
    let written = device.clone();
    tokio::task::spawn_blocking(move || {
        write_at(&written, 0, &pattern(7, data << 20));
        write_at(&written, at, &pattern(9, 1 << 20));
    })
    .await
    .unwrap();
    node.unpublish_and_unstage(&id, &staging, &device).await;
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn restores_across_nodes_keep_data_and_sparseness_fs_and_block() {
    let cluster = Cluster::start(&SIZES).await;
    let controller = cluster.controller();
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));

    // Filesystem: a file written on node-a reads back on node-b.
    let cap = mount_cap("ext4");
    let fs = volume_on(controller, "pvc-fs", 256 * MIB, "node-a", &cap).await;
    let (staging, target) = a.stage_and_publish(&fs, &cap, "fs").await;
    let data = pattern(5, 3 << 20);
    write_file(&target.join("data"), &data);
    a.unpublish_and_unstage(&fs, &staging, &target).await;
    let snap = controller.create_snapshot("snap-fs", &fs).await;
    let restored = create_until_copied(
        controller,
        on_node(
            "pvc-fs-restored",
            256 * MIB,
            "node-b",
            cap.clone(),
            Some(snapshot_source(&snap.snapshot_id)),
        ),
    )
    .await
    .expect("restore across nodes");
    assert_eq!(volume_node(&restored), "node-b");
    assert!(restored.content_source.is_some());
    let source_image = snapshot_image(&a.pool_root(), &snap.snapshot_id);
    let copy_image = volume_image(&b.pool_root(), &restored.volume_id);
    assert_eq!(sha256(&source_image), sha256(&copy_image));
    let (staging, target) = b
        .stage_and_publish(&restored.volume_id, &cap, "fs-restored")
        .await;
    assert_eq!(std::fs::read(target.join("data")).unwrap(), data);
    b.unpublish_and_unstage(&restored.volume_id, &staging, &target)
        .await;

    // Block: the image is the same, and no more allocated than the source's.
    let block = block_source(&cluster, "pvc-block", 256 * MIB, 40).await;
    let snap = controller.create_snapshot("snap-block", &block).await;
    let restored = create_until_copied(
        controller,
        on_node(
            "pvc-block-restored",
            256 * MIB,
            "node-b",
            block_cap(),
            Some(snapshot_source(&snap.snapshot_id)),
        ),
    )
    .await
    .expect("restore across nodes");
    let source_image = snapshot_image(&a.pool_root(), &snap.snapshot_id);
    let copy_image = volume_image(&b.pool_root(), &restored.volume_id);
    assert_eq!(sha256(&source_image), sha256(&copy_image));
    let (source_alloc, copy_alloc) = (allocated(&source_image), allocated(&copy_image));
    assert!(
        copy_alloc <= source_alloc && copy_alloc >= 41 * MIB as u64,
        "the copy allocates {copy_alloc} bytes, the source {source_alloc}"
    );
    // A repeated call returns the same volume, and nothing of the transfer is left.
    let again = controller
        .create(on_node(
            "pvc-block-restored",
            256 * MIB,
            "node-b",
            block_cap(),
            Some(snapshot_source(&snap.snapshot_id)),
        ))
        .await
        .unwrap();
    assert_eq!(again.volume_id, restored.volume_id);
    let left: Vec<String> = [a, b].iter().flat_map(|n| transfer_leftovers(n)).collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clone_across_nodes_of_a_volume_in_use_holds_one_moment() {
    let cluster = Cluster::start(&SIZES).await;
    let controller = cluster.controller();
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    let cap = mount_cap("ext4");
    let source = volume_on(controller, "pvc-live", 256 * MIB, "node-a", &cap).await;
    let (staging, target) = a.stage_and_publish(&source, &cap, "live").await;
    let before = pattern(1, 2 << 20);
    write_file(&target.join("data"), &before);

    // Held after its first checkpoint: the clone is pinned and half copied.
    let held = b.pause.arm("transfer-checkpoint");
    let request = on_node(
        "pvc-live-clone",
        256 * MIB,
        "node-b",
        cap.clone(),
        Some(volume_source(&source)),
    );
    let first = controller.create(request.clone()).await.unwrap_err();
    assert_eq!(first.code(), Code::Aborted, "{first:?}");
    assert!(first.message().contains("being copied"), "{first}");
    held.held(|| false).await;
    // The source, still in use, changes meanwhile.
    write_file(&target.join("data"), &pattern(2, 2 << 20));
    write_file(&target.join("later"), b"after the clone");
    held.release();
    let clone = create_until_copied(controller, request)
        .await
        .expect("clone across nodes");
    assert_eq!(volume_node(&clone), "node-b");
    let (copy_staging, copy) = b.stage_and_publish(&clone.volume_id, &cap, "clone").await;
    assert_eq!(std::fs::read(copy.join("data")).unwrap(), before);
    assert!(!copy.join("later").exists());
    b.unpublish_and_unstage(&clone.volume_id, &copy_staging, &copy)
        .await;
    a.unpublish_and_unstage(&source, &staging, &target).await;
    let left: Vec<String> = [a, b].iter().flat_map(|n| transfer_leftovers(n)).collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Log text without its ANSI colour sequences.
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_destination_resumes_from_its_checkpoint() {
    let mut cluster = Cluster::start(&SIZES).await;
    let block = block_source(&cluster, "pvc-big", 256 * MIB, 128).await;
    let snap = cluster
        .controller()
        .create_snapshot("snap-big", &block)
        .await;
    let request = on_node(
        "pvc-big-restored",
        256 * MIB,
        "node-b",
        block_cap(),
        Some(snapshot_source(&snap.snapshot_id)),
    );
    let id = VolumeId::derive("pvc-big-restored", &NodeToken::for_node("node-b"));
    let checkpoint = cluster
        .node("node-b")
        .pool_root()
        .join("volumes")
        .join(format!("{id}.transfer"));
    {
        let held = cluster.node("node-b").pause.arm("transfer-checkpoint");
        let first = cluster
            .controller()
            .create(request.clone())
            .await
            .unwrap_err();
        assert_eq!(first.code(), Code::Aborted, "{first:?}");
        held.held(|| false).await;
        cluster.node_mut("node-b").kill();
    }
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&checkpoint).unwrap()).unwrap();
    let offset = state["offset"].as_u64().unwrap();
    assert!(offset > 0, "{state}");

    cluster.node_mut("node-b").start().await;
    cluster
        .controller()
        .wait_for_nodes(&["node-a", "node-b"])
        .await;
    let restored = create_until_copied(cluster.controller(), request)
        .await
        .expect("the restore resumes");
    assert_eq!(restored.volume_id, id.as_str());
    let logs = without_colours(&cluster.node("node-b").logs());
    let resumed = logs
        .split("--- node-b run 2 ---")
        .nth(1)
        .unwrap()
        .lines()
        .find(|l| l.contains("transfer resumed from its checkpoint"))
        .unwrap_or_else(|| panic!("no resume in:\n{logs}"))
        .to_owned();
    assert!(resumed.contains(&format!("offset={offset}")), "{resumed}");
    assert_eq!(
        sha256(&snapshot_image(
            &cluster.node("node-a").pool_root(),
            &snap.snapshot_id
        )),
        sha256(&volume_image(
            &cluster.node("node-b").pool_root(),
            id.as_str()
        ))
    );
    assert!(!checkpoint.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_damaged_in_flight_is_refused_and_nothing_is_kept() {
    let cluster = Cluster::start(&SIZES).await;
    let controller = cluster.controller();
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    let block = block_source(&cluster, "pvc-src", 128 * MIB, 8).await;
    let snap = controller.create_snapshot("snap-src", &block).await;
    let request = on_node(
        "pvc-damaged",
        128 * MIB,
        "node-b",
        block_cap(),
        Some(snapshot_source(&snap.snapshot_id)),
    );
    let damage = a.pause.arm("damage-chunk");
    let refused = create_until_copied(controller, request.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::DataLoss, "{refused:?}");
    assert!(refused.message().contains("checksum"), "{refused}");
    drop(damage);
    let id = VolumeId::derive("pvc-damaged", &NodeToken::for_node("node-b"));
    assert!(!volume_image(&b.pool_root(), id.as_str()).exists());
    let left: Vec<String> = [a, b].iter().flat_map(|n| transfer_leftovers(n)).collect();
    assert!(left.is_empty(), "{left:?}");
    let listed = controller
        .controller()
        .list_volumes(proto::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        !listed
            .entries
            .iter()
            .any(|e| e.volume.as_ref().unwrap().volume_id == id.as_str())
    );
    // The hook fired once: the CO's next try copies whole data.
    let copied = create_until_copied(controller, request)
        .await
        .expect("a retry copies");
    assert_eq!(
        sha256(&snapshot_image(&a.pool_root(), &snap.snapshot_id)),
        sha256(&volume_image(&b.pool_root(), &copied.volume_id))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_source_snapshot_deleted_mid_transfer_does_not_stop_it() {
    let cluster = Cluster::start(&SIZES).await;
    let controller = cluster.controller();
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    let block = block_source(&cluster, "pvc-orig", 256 * MIB, 64).await;
    let snap = controller.create_snapshot("snap-gone", &block).await;
    let request = on_node(
        "pvc-from-gone",
        256 * MIB,
        "node-b",
        block_cap(),
        Some(snapshot_source(&snap.snapshot_id)),
    );
    let held = b.pause.arm("transfer-checkpoint");
    let first = controller.create(request.clone()).await.unwrap_err();
    assert_eq!(first.code(), Code::Aborted, "{first:?}");
    held.held(|| false).await;
    controller
        .controller()
        .delete_snapshot(delete_snapshot_request(&snap.snapshot_id))
        .await
        .expect("DeleteSnapshot during the transfer");
    assert!(!snapshot_image(&a.pool_root(), &snap.snapshot_id).exists());
    held.release();
    let restored = create_until_copied(controller, request)
        .await
        .expect("the transfer completes");
    // The source volume has not changed since the snapshot.
    assert_eq!(
        sha256(&volume_image(&a.pool_root(), &block)),
        sha256(&volume_image(&b.pool_root(), &restored.volume_id))
    );
    let left: Vec<String> = [a, b].iter().flat_map(|n| transfer_leftovers(n)).collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_identity_reads_only_what_a_grant_names() {
    use kura::agent::proto as agent;
    let cluster = Cluster::start(&SIZES).await;
    let a = cluster.node("node-a");
    let block = block_source(&cluster, "pvc-secret", 64 * MIB, 4).await;
    let node_identity = cluster.certs.join("node");
    let ca = cluster.certs.join("ca.crt");
    let mut as_node = agent_client(a.agent, &ca, Some(&node_identity));
    let mut as_controller = agent_client(a.agent, &ca, Some(&cluster.certs.join("controller")));

    // A node may not ask for an export itself.
    let source = Some(agent::ContentSource {
        kind: Some(agent::content_source::Kind::VolumeId(block.clone())),
    });
    let export_request = agent::CreateExportRequest {
        key: "vol-test".into(),
        source,
        destination_node: "node-b".into(),
    };
    let refused = as_node
        .create_export(export_request.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let export = as_controller
        .create_export(export_request)
        .await
        .expect("the controller pins an export")
        .into_inner();

    let read = |export_id: &str, grant: &str| agent::ReadExportRequest {
        export_id: export_id.into(),
        grant: grant.into(),
        offset: 0,
    };
    let cases = [
        ("no grant", read(&export.export_id, "")),
        ("another grant", read(&export.export_id, &"0".repeat(64))),
        (
            "an export that does not exist",
            read("exp-0123", &export.grant),
        ),
        ("a volume's ID", read(&block, &export.grant)),
    ];
    for (what, request) in cases {
        let refused = as_node.read_export(request).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Code::PermissionDenied,
            "{what}: {refused:?}"
        );
    }
    // The grant is for a node identity only.
    let refused = as_controller
        .read_export(read(&export.export_id, &export.grant))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // With it, the node reads.
    let mut stream = as_node
        .read_export(read(&export.export_id, &export.grant))
        .await
        .expect("read with the grant")
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.offset, 0);
    assert!(!first.data.is_empty());
    drop(stream);
    // Released, the grant reads nothing.
    as_controller
        .delete_export(agent::DeleteExportRequest {
            export_id: export.export_id.clone(),
        })
        .await
        .unwrap();
    let refused = as_node
        .read_export(read(&export.export_id, &export.grant))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
}
