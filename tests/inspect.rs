//! `kura inspect`, the real binary, run beside two serving `kura node` processes (it
//! takes no lock, so it runs at all), over every state it reports, each made for
//! real: volumes staged and published (mount and block), a snapshot, a group
//! snapshot, a cross-node copy held half-way (the destination's in-flight copy, the
//! source's export); and what goes wrong: an image without metadata, unreadable
//! metadata, a stuck attachment (its loop device detached and its mount gone behind
//! kura's back), a staging mount whose record is gone, a loop device bound to a
//! deleted image. It checks the text and the JSON, and that nothing changed.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::cluster::*;
use common::process::Proc;
use common::*;
use kura::csi::proto;
use kura::pool::{NodeToken, VolumeId};
use serde_json::Value;
use tonic::Code;

async fn create(controller: &Proc, request: proto::CreateVolumeRequest) -> String {
    controller
        .create(request)
        .await
        .expect("CreateVolume")
        .volume_id
}

async fn stage(node: &NodeProc, id: &str, cap: &proto::VolumeCapability, tag: &str) -> PathBuf {
    let staging = node.path(&format!("stage-{tag}"));
    std::fs::create_dir_all(&staging).unwrap();
    node.stage(id, &staging, cap).await;
    staging
}

async fn publish(
    node: &NodeProc,
    id: &str,
    staging: &Path,
    cap: &proto::VolumeCapability,
    tag: &str,
) -> PathBuf {
    let target = node.path(&format!("target-{tag}"));
    node.publish(id, staging, &target, cap).await;
    target
}

/// `kura inspect` on a node's state directory: its stdout, which must be all it wrote
/// there, after a successful exit.
fn inspect(node: &NodeProc, json: bool) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kura"));
    command
        .arg("inspect")
        .arg("--state-dir")
        .arg(node.dir.join("state"))
        .arg("--pool-image")
        .arg(node.dir.join("pool.img"))
        .env_remove("RUST_LOG");
    if json {
        command.arg("--json");
    }
    let output = command.output().expect("kura inspect runs");
    assert!(
        output.status.success(),
        "kura inspect failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Every file with its size and modification time, the mounts and the loop devices.
type Fingerprint = (BTreeMap<PathBuf, (u64, i128)>, Vec<String>, Vec<String>);

/// What a survey must leave alone: every file under the node's directory with its
/// size and modification time, the mount table and the loop devices.
fn fingerprint(dir: &Path) -> Fingerprint {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, (u64, i128)>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            // Logs grow while the nodes serve, and each status round writes and
            // removes the pool's probe file; the rest must not change.
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.ends_with(".log") || name.starts_with(".kura-probe") {
                continue;
            }
            if meta.is_dir() {
                walk(&path, out);
            } else {
                // The pools' images take the serving nodes' own writes (those probe
                // files, the filesystem's log) through their loop devices: their
                // size must not change, their time may.
                let modified = meta
                    .modified()
                    .ok()
                    .filter(|_| name != "pool.img")
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos() as i128);
                out.insert(path, (meta.len(), modified));
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(dir, &mut files);
    let mounts = kura::sys::mountinfo::read()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .map(|m| format!("{} {}", m.mount_point.display(), m.source))
        .collect();
    let prefix = format!("{}/", dir.display());
    let loops = kura::sys::loopdev::list_bound()
        .unwrap()
        .into_iter()
        .filter(|d| d.backing_name.starts_with(&prefix))
        .map(|d| format!("{} {}", d.path.display(), d.backing_name))
        .collect();
    (files, mounts, loops)
}

fn problems_about<'a>(report: &'a Value, subject: &str) -> Vec<&'a str> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["subject"].as_str().unwrap().contains(subject))
        .map(|p| p["reason"].as_str().unwrap())
        .collect()
}

fn ids(report: &Value, section: &str, key: &str) -> Vec<String> {
    report[section]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x[key].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn inspect_reports_every_state_and_changes_nothing() {
    let cluster = Cluster::start(&["2Gi", "2Gi"]).await;
    let controller = cluster.controller();
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    let pool = a.dir.join("state/pool");
    let mount = mount_cap("ext4");
    let block = block_cap();

    // Healthy states: a published mount volume, a staged block volume, a snapshot,
    // a group snapshot of both.
    let published = create(
        controller,
        on_node("pvc-published", 256 * MIB, "node-a", mount.clone(), None),
    )
    .await;
    let staging = stage(a, &published, &mount, "published").await;
    let target = publish(a, &published, &staging, &mount, "published").await;
    let blockvol = create(
        controller,
        on_node("pvc-block", 256 * MIB, "node-a", block.clone(), None),
    )
    .await;
    let block_staging = stage(a, &blockvol, &block, "block").await;
    let snap = controller
        .create_snapshot("snap-inspect", &published)
        .await
        .snapshot_id;
    let group = kura::csi::proto::group_controller_client::GroupControllerClient::new(
        kura::csi::client::connect(&controller.socket)
            .await
            .unwrap(),
    )
    .create_volume_group_snapshot(proto::CreateVolumeGroupSnapshotRequest {
        name: "group-inspect".into(),
        source_volume_ids: vec![published.clone(), blockvol.clone()],
        ..Default::default()
    })
    .await
    .expect("CreateVolumeGroupSnapshot")
    .into_inner()
    .group_snapshot
    .unwrap()
    .group_snapshot_id;

    // A clone to node-b held after its first checkpoint: arriving on node-b, an
    // export pinned on node-a.
    let held = b.pause.arm("transfer-checkpoint");
    let copying = controller
        .controller()
        .create_volume(on_node(
            "pvc-copy",
            256 * MIB,
            "node-b",
            mount.clone(),
            Some(volume_source(&blockvol)),
        ))
        .await
        .unwrap_err();
    assert_eq!(copying.code(), Code::Aborted, "{copying:?}");
    held.held(|| false).await;

    // What goes wrong. An image without metadata (a create that never committed).
    let orphan = VolumeId::derive("pvc-orphan", &NodeToken::for_node("node-a"));
    std::fs::write(pool.join(format!("volumes/{orphan}.img")), b"").unwrap();
    // Unreadable metadata.
    let corrupt = create(
        controller,
        on_node("pvc-corrupt", 256 * MIB, "node-a", mount.clone(), None),
    )
    .await;
    std::fs::write(pool.join(format!("volumes/{corrupt}.json")), b"{").unwrap();
    // A stuck attachment: staged, then its mount and loop device gone behind kura's back.
    let stuck = create(
        controller,
        on_node("pvc-stuck", 256 * MIB, "node-a", mount.clone(), None),
    )
    .await;
    let stuck_staging = stage(a, &stuck, &mount, "stuck").await;
    let image = pool.join(format!("volumes/{stuck}.img"));
    let device = kura::sys::loopdev::find_by_backing(&image)
        .unwrap()
        .unwrap();
    kura::sys::mount::unmount(&stuck_staging).unwrap();
    kura::sys::loopdev::detach(&device.path).unwrap();
    // A staging mount whose record is gone.
    let unrecorded = create(
        controller,
        on_node("pvc-unrecorded", 256 * MIB, "node-a", mount.clone(), None),
    )
    .await;
    let unrecorded_staging = stage(a, &unrecorded, &mount, "unrecorded").await;
    std::fs::remove_file(a.dir.join(format!("state/attachments/{unrecorded}.json"))).unwrap();
    // A loop device bound to an image that was deleted.
    let deleted = pool.join("volumes/deleted-behind-kuras-back.img");
    std::fs::File::create(&deleted)
        .unwrap()
        .set_len(MIB as u64)
        .unwrap();
    let dangling = kura::sys::loopdev::attach(&deleted, false).unwrap();
    std::fs::remove_file(&deleted).unwrap();

    let before = fingerprint(&cluster.dir);
    let report: Value = serde_json::from_str(&inspect(a, true)).expect("JSON");
    let text = inspect(a, false);
    let on_b: Value = serde_json::from_str(&inspect(b, true)).expect("JSON");
    assert_eq!(
        fingerprint(&cluster.dir),
        before,
        "inspect changed something"
    );

    // The pool, the volumes (the unreadable one abnormal), snapshots and the group.
    assert_eq!(report["pool"]["root"], pool.display().to_string());
    assert_eq!(report["pool"]["mounted"], true);
    assert!(report["pool"]["host"]["size_bytes"].as_u64().unwrap() > 0);
    let volumes = ids(&report, "volumes", "id");
    for id in [&published, &blockvol, &corrupt, &stuck, &unrecorded] {
        assert!(volumes.contains(id), "{id} missing from {volumes:?}");
    }
    let abnormal: Vec<String> = report["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["abnormal"] == true)
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(abnormal, vec![corrupt.clone()]);
    let snapshots = ids(&report, "snapshots", "id");
    assert!(snapshots.contains(&snap), "{snapshots:?}");
    assert_eq!(snapshots.len(), 3, "one snapshot and two group members");
    assert_eq!(ids(&report, "group_snapshots", "id"), vec![group.clone()]);

    // Attachments: loop device, staging and targets, mounted or not.
    let attachment = |id: &str| -> Value {
        report["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["volume_id"] == id)
            .unwrap_or_else(|| panic!("no attachment {id}: {report:#}"))
            .clone()
    };
    let p = attachment(&published);
    assert!(p["loop_device"].as_str().unwrap().starts_with("/dev/loop"));
    assert_eq!(p["staging_path"], staging.display().to_string());
    assert_eq!(p["staging_mounted"], true);
    assert_eq!(p["targets"][0]["path"], target.display().to_string());
    assert_eq!(p["targets"][0]["mounted"], true);
    let k = attachment(&blockvol);
    assert_eq!(k["access"], "block");
    assert_eq!(k["staging_path"], block_staging.display().to_string());
    assert!(k["loop_device"].is_string());
    let s = attachment(&stuck);
    assert!(s["loop_device"].is_null());
    assert_eq!(s["staging_mounted"], false);

    // The copy: arriving on node-b, its export on node-a.
    let copies = on_b["copies"].as_array().unwrap();
    assert_eq!(copies.len(), 1, "{on_b:#}");
    assert!(copies[0]["bytes_done"].as_u64().is_some());
    assert_eq!(report["exports"].as_array().unwrap().len(), 1, "{report:#}");
    assert_eq!(report["exports"][0]["source"], blockvol);
    assert_eq!(report["exports"][0]["destination_node"], "node-b");
    assert!(
        !report.to_string().contains("grant"),
        "the grant is never shown"
    );

    // Each problem, with its reason; nothing about the healthy ones.
    let reasons = |s: &str| problems_about(&report, s);
    assert!(reasons(&format!("{orphan}.img"))[0].contains("without metadata"));
    assert!(reasons(&corrupt)[0].contains("unreadable"));
    let stuck_reasons = reasons(&stuck).join(" | ");
    assert!(
        stuck_reasons.contains("stuck attachment"),
        "{stuck_reasons}"
    );
    assert!(
        stuck_reasons.contains("not mounted at its staging path"),
        "{stuck_reasons}"
    );
    let unrecorded_reasons = reasons(&unrecorded_staging.display().to_string()).join(" | ");
    assert!(
        unrecorded_reasons.contains("no attachment record"),
        "{unrecorded_reasons}"
    );
    assert!(reasons(&dangling.display().to_string())[0].contains("deleted image"));
    for healthy in [&published, &blockvol, &snap, &group] {
        assert!(
            reasons(healthy).is_empty(),
            "{healthy}: {:?}",
            reasons(healthy)
        );
    }
    assert!(on_b["problems"].as_array().unwrap().is_empty(), "{on_b:#}");

    // The text says the same, by section.
    for needle in [
        "VOLUMES (5)",
        "SNAPSHOTS (3)",
        "GROUP SNAPSHOTS (1)",
        "ATTACHMENTS (3)",
        "EXPORTS (sources pinned for copies to other nodes) (1)",
        "stuck attachment",
        "deleted image",
        "NOT mounted",
        published.as_str(),
    ] {
        assert!(text.contains(needle), "{needle:?} missing from\n{text}");
    }

    // The stuck attachment, as the reason says: the kubelet's NodeUnstageVolume
    // clears it.
    a.node()
        .node_unstage_volume(proto::NodeUnstageVolumeRequest {
            volume_id: stuck.clone(),
            staging_target_path: stuck_staging.display().to_string(),
        })
        .await
        .expect("NodeUnstageVolume");
    let after: Value = serde_json::from_str(&inspect(a, true)).unwrap();
    assert!(problems_about(&after, &stuck).is_empty(), "{after:#}");
    assert!(!ids(&after, "attachments", "volume_id").contains(&stuck));

    held.release();
    kura::sys::loopdev::detach(&dangling).unwrap();
}
