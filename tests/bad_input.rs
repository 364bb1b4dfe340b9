//! Hostile and malformed requests over every RPC, against the real server on its socket
//! with real loop devices and mounts: each row of the tables is a request and the code
//! it must get, and every row is checked the same way for "nothing changed": the files
//! under the state directory (pool and attachment records), the mounts and loop devices
//! under the test directory, and every path the request names are the same after the
//! call as before it.
//!
//! The classes covered: names with the control characters CSI bans; sizes no pool can
//! serve (OUT_OF_RANGE) against a pool that is merely too full (RESOURCE_EXHAUSTED);
//! mutable parameters kura does not offer; access types as part of a name's
//! compatibility; capabilities kura cannot serve, also in expansion; paths that cannot
//! be right (relative, NUL, too long, `..`, system trees, kura's own directories, the
//! wrong kind of file, symbolic links, missing parents); mount flags beyond 4 KiB or
//! off the allow-list; a publish without a staging path; unpublish and unstage of what
//! is not a kura publication or staging; requests over the message limit; malformed,
//! unknown and foreign IDs; bad tokens; oversized maps. The tests after the tables
//! cover what one request cannot show: concurrent publishes, the flags volumes are
//! really mounted with, and paths left as the CO made them.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use kura::csi::proto::group_controller_client::GroupControllerClient;
use kura::csi::proto::snapshot_metadata_client::SnapshotMetadataClient;
use kura::csi::proto::{self, volume_capability};
use tonic::{Code, Status};
use volume_capability::access_mode::Mode;

const PROVISIONING: &str = "kura.csi.dev/provisioning";
/// Well formed, on this node, naming nothing.
const UNKNOWN_VOLUME: &str = "vol-0123456789abcdef0123456789abcdef-test-node";
const UNKNOWN_SNAPSHOT: &str = "snap-0123456789abcdef0123456789abcdef-test-node";
/// Well formed, on a node kura does not know.
const FOREIGN_VOLUME: &str = "vol-0123456789abcdef0123456789abcdef-other-node";
/// Volume IDs kura could not have issued.
const MALFORMED_IDS: [&str; 8] = [
    "not-a-kura-id",
    "vol-../../etc/passwd",
    "vol-0123456789abcdef0123456789abcdef-../x",
    "vol-0123456789ABCDEF0123456789abcdef-test-node",
    "vol-0123456789abcdef0123456789abcdef-test-node\0",
    "vol-🦀",
    "/etc/passwd",
    "vol-0123456789abcdef0123456789abcdef-test-node\n",
];
const SIZE: i64 = 64 * MIB;

// ---------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------

/// One request to any RPC.
#[derive(Debug, Clone)]
enum Call {
    PluginInfo,
    PluginCapabilities,
    Probe,
    CreateVolume(proto::CreateVolumeRequest),
    DeleteVolume(proto::DeleteVolumeRequest),
    ControllerPublish(proto::ControllerPublishVolumeRequest),
    ControllerUnpublish(proto::ControllerUnpublishVolumeRequest),
    Validate(proto::ValidateVolumeCapabilitiesRequest),
    ListVolumes(proto::ListVolumesRequest),
    GetCapacity(proto::GetCapacityRequest),
    ControllerCapabilities,
    CreateSnapshot(proto::CreateSnapshotRequest),
    DeleteSnapshot(proto::DeleteSnapshotRequest),
    ListSnapshots(proto::ListSnapshotsRequest),
    ControllerExpand(proto::ControllerExpandVolumeRequest),
    GetVolume(proto::ControllerGetVolumeRequest),
    Modify(proto::ControllerModifyVolumeRequest),
    GetSnapshot(proto::GetSnapshotRequest),
    CreateGroupSnapshot(proto::CreateVolumeGroupSnapshotRequest),
    DeleteGroupSnapshot(proto::DeleteVolumeGroupSnapshotRequest),
    MetadataAllocated(proto::GetMetadataAllocatedRequest),
    Stage(proto::NodeStageVolumeRequest),
    Unstage(proto::NodeUnstageVolumeRequest),
    Publish(proto::NodePublishVolumeRequest),
    Unpublish(proto::NodeUnpublishVolumeRequest),
    Stats(proto::NodeGetVolumeStatsRequest),
    NodeExpand(proto::NodeExpandVolumeRequest),
    NodeCapabilities,
    NodeInfo,
}

impl Call {
    async fn run(self, d: &Driver) -> Result<(), Status> {
        let (mut i, mut c, mut n) = (d.identity(), d.controller(), d.node());
        let mut g = GroupControllerClient::new(d.channel.clone());
        match self {
            Call::PluginInfo => i
                .get_plugin_info(proto::GetPluginInfoRequest {})
                .await
                .map(ok),
            Call::PluginCapabilities => i
                .get_plugin_capabilities(proto::GetPluginCapabilitiesRequest {})
                .await
                .map(ok),
            Call::Probe => i.probe(proto::ProbeRequest {}).await.map(ok),
            Call::CreateVolume(r) => c.create_volume(r).await.map(ok),
            Call::DeleteVolume(r) => c.delete_volume(r).await.map(ok),
            Call::ControllerPublish(r) => c.controller_publish_volume(r).await.map(ok),
            Call::ControllerUnpublish(r) => c.controller_unpublish_volume(r).await.map(ok),
            Call::Validate(r) => c.validate_volume_capabilities(r).await.map(ok),
            Call::ListVolumes(r) => c.list_volumes(r).await.map(ok),
            Call::GetCapacity(r) => c.get_capacity(r).await.map(ok),
            Call::ControllerCapabilities => c
                .controller_get_capabilities(proto::ControllerGetCapabilitiesRequest {})
                .await
                .map(ok),
            Call::CreateSnapshot(r) => c.create_snapshot(r).await.map(ok),
            Call::DeleteSnapshot(r) => c.delete_snapshot(r).await.map(ok),
            Call::ListSnapshots(r) => c.list_snapshots(r).await.map(ok),
            Call::ControllerExpand(r) => c.controller_expand_volume(r).await.map(ok),
            Call::GetVolume(r) => c.controller_get_volume(r).await.map(ok),
            Call::Modify(r) => c.controller_modify_volume(r).await.map(ok),
            Call::GetSnapshot(r) => c.get_snapshot(r).await.map(ok),
            Call::CreateGroupSnapshot(r) => g.create_volume_group_snapshot(r).await.map(ok),
            Call::DeleteGroupSnapshot(r) => g.delete_volume_group_snapshot(r).await.map(ok),
            Call::MetadataAllocated(r) => SnapshotMetadataClient::new(d.channel.clone())
                .get_metadata_allocated(r)
                .await
                .map(ok),
            Call::Stage(r) => n.node_stage_volume(r).await.map(ok),
            Call::Unstage(r) => n.node_unstage_volume(r).await.map(ok),
            Call::Publish(r) => n.node_publish_volume(r).await.map(ok),
            Call::Unpublish(r) => n.node_unpublish_volume(r).await.map(ok),
            Call::Stats(r) => n.node_get_volume_stats(r).await.map(ok),
            Call::NodeExpand(r) => n.node_expand_volume(r).await.map(ok),
            Call::NodeCapabilities => n
                .node_get_capabilities(proto::NodeGetCapabilitiesRequest {})
                .await
                .map(ok),
            Call::NodeInfo => n.node_get_info(proto::NodeGetInfoRequest {}).await.map(ok),
        }
    }

    /// The paths the request names.
    fn paths(&self) -> Vec<String> {
        match self {
            Call::Stage(r) => vec![r.staging_target_path.clone()],
            Call::Unstage(r) => vec![r.staging_target_path.clone()],
            Call::Publish(r) => vec![r.staging_target_path.clone(), r.target_path.clone()],
            Call::Unpublish(r) => vec![r.target_path.clone()],
            Call::Stats(r) => vec![r.volume_path.clone(), r.staging_target_path.clone()],
            Call::NodeExpand(r) => vec![r.volume_path.clone(), r.staging_target_path.clone()],
            _ => vec![],
        }
    }
}

/// Drops an OK response: a row looks only at the code.
fn ok<T>(_: T) {}

/// One row: a request, the code it must get, and (for errors) a word the message must
/// contain: the field at fault, or the object.
struct Row {
    what: String,
    call: Call,
    want: Code,
    names: Option<String>,
}

#[derive(Default)]
struct Table(Vec<Row>);

impl Table {
    fn add(&mut self, what: impl Into<String>, call: Call, want: Code, names: &str) {
        self.0.push(Row {
            what: what.into(),
            call,
            want,
            names: (!names.is_empty()).then(|| names.to_owned()),
        });
    }
}

fn mode_cap(access: volume_capability::AccessType, mode: Mode) -> proto::VolumeCapability {
    cap_with_mode(access, mode)
}

fn mount_access(fs: &str, flags: &[&str]) -> volume_capability::AccessType {
    volume_capability::AccessType::Mount(volume_capability::MountVolume {
        fs_type: fs.into(),
        mount_flags: flags.iter().map(|f| f.to_string()).collect(),
        volume_mount_group: String::new(),
    })
}

fn block_access() -> volume_capability::AccessType {
    volume_capability::AccessType::Block(volume_capability::BlockVolume {})
}

fn flags_cap(flags: &[&str]) -> proto::VolumeCapability {
    mode_cap(mount_access("", flags), Mode::SingleNodeWriter)
}

fn owned_flags_cap(flags: Vec<String>) -> proto::VolumeCapability {
    let mut cap = flags_cap(&[]);
    if let Some(volume_capability::AccessType::Mount(m)) = cap.access_type.as_mut() {
        m.mount_flags = flags;
    }
    cap
}

fn no_access_type() -> proto::VolumeCapability {
    proto::VolumeCapability {
        access_type: None,
        access_mode: Some(volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn no_access_mode() -> proto::VolumeCapability {
    proto::VolumeCapability {
        access_type: Some(mount_access("", &[])),
        access_mode: None,
    }
}

fn raw_mode(mode: i32) -> proto::VolumeCapability {
    proto::VolumeCapability {
        access_type: Some(mount_access("", &[])),
        access_mode: Some(volume_capability::AccessMode { mode }),
    }
}

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A map of more than CSI's 4 KiB.
fn big_map() -> HashMap<String, String> {
    map(&[("csi.storage.k8s.io/big", &"v".repeat(5000))])
}

fn range(required: i64, limit: i64) -> Option<proto::CapacityRange> {
    Some(proto::CapacityRange {
        required_bytes: required,
        limit_bytes: limit,
    })
}

fn create(name: &str) -> proto::CreateVolumeRequest {
    create_request(name, SIZE, &[], None)
}

fn create_with(
    name: &str,
    edit: impl FnOnce(&mut proto::CreateVolumeRequest),
) -> proto::CreateVolumeRequest {
    let mut request = create(name);
    edit(&mut request);
    request
}

fn snapshot(name: &str, source: &str) -> proto::CreateSnapshotRequest {
    proto::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    }
}

fn controller_expand(id: &str, required: i64, limit: i64) -> proto::ControllerExpandVolumeRequest {
    proto::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: range(required, limit),
        ..Default::default()
    }
}

fn validate(
    id: &str,
    caps: Vec<proto::VolumeCapability>,
) -> proto::ValidateVolumeCapabilitiesRequest {
    proto::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    }
}

fn stage(id: &str, staging: &str, cap: proto::VolumeCapability) -> proto::NodeStageVolumeRequest {
    proto::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn unstage(id: &str, staging: &str) -> proto::NodeUnstageVolumeRequest {
    proto::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
    }
}

fn publish(
    id: &str,
    staging: &str,
    target: &str,
    cap: proto::VolumeCapability,
) -> proto::NodePublishVolumeRequest {
    proto::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        target_path: target.into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn unpublish(id: &str, target: &str) -> proto::NodeUnpublishVolumeRequest {
    proto::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.into(),
    }
}

fn stats(id: &str, path: &str) -> proto::NodeGetVolumeStatsRequest {
    proto::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    }
}

fn node_expand(id: &str, path: &str, required: i64, limit: i64) -> proto::NodeExpandVolumeRequest {
    proto::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        capacity_range: range(required, limit),
        ..Default::default()
    }
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

// ---------------------------------------------------------------------------------
// "Nothing changed"
// ---------------------------------------------------------------------------------

/// Everything a request could change, as seen from outside kura.
#[derive(Debug, PartialEq, Eq)]
struct World {
    /// Every file under the state directory (pool and attachment records): kind, size,
    /// and the content of metadata; the modification time of images no loop device
    /// holds (one that is attached is written by its filesystem at its own pace).
    files: BTreeMap<PathBuf, String>,
    /// Mounts under the test directory.
    mounts: BTreeSet<String>,
    /// Loop devices backed by files under the test directory.
    loops: BTreeSet<String>,
    /// Each path the request names: what is there.
    paths: BTreeMap<String, String>,
}

fn world(driver: &Driver, paths: &[String]) -> World {
    let prefix = format!("{}/", driver.dir.display());
    let bound: Vec<_> = kura::sys::loopdev::list_bound()
        .unwrap()
        .into_iter()
        .filter(|l| l.backing_name.starts_with(&prefix))
        .collect();
    let attached: BTreeSet<(u64, u64)> = bound
        .iter()
        .map(|l| (l.backing_dev, l.backing_ino))
        .collect();
    let mut files = BTreeMap::new();
    walk(&driver.path("state"), &attached, &mut files);
    let mounts = kura::sys::mountinfo::read()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(&driver.dir))
        .map(|m| {
            format!(
                "{} {}:{} {} {} {}",
                m.mount_point.display(),
                m.major,
                m.minor,
                m.root.display(),
                m.options.join(","),
                m.fs_type
            )
        })
        .collect();
    let loops = bound
        .iter()
        .map(|l| format!("{} {}:{}", l.path.display(), l.backing_dev, l.backing_ino))
        .collect();
    let paths = paths
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| (p.clone(), describe(Path::new(p))))
        .collect();
    World {
        files,
        mounts,
        loops,
        paths,
    }
}

fn walk(dir: &Path, attached: &BTreeSet<(u64, u64)>, out: &mut BTreeMap<PathBuf, String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            out.insert(path.clone(), "dir".into());
            walk(&path, attached, out);
            continue;
        }
        let mut text = format!("len={} mode={:o}", meta.len(), meta.mode());
        if path.extension().is_some_and(|x| x == "json") {
            text.push_str(&format!(
                " content={}",
                String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default())
            ));
        } else if !attached.contains(&(meta.dev(), meta.ino())) {
            text.push_str(&format!(" mtime={}.{}", meta.mtime(), meta.mtime_nsec()));
        }
        out.insert(path, text);
    }
}

/// What is at a path: kind, mode and owner, and a directory's entries.
fn describe(path: &Path) -> String {
    match std::fs::symlink_metadata(path) {
        Err(e) => format!("cannot stat: {:?}", e.kind()),
        Ok(meta) => {
            let kind = meta.file_type();
            let what = if kind.is_symlink() {
                format!("symlink to {:?}", std::fs::read_link(path).ok())
            } else if kind.is_dir() {
                let mut names: Vec<String> = std::fs::read_dir(path)
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                names.sort();
                format!("dir {names:?}")
            } else if kind.is_file() {
                format!("file of {} bytes", meta.len())
            } else if kind.is_fifo() {
                "fifo".into()
            } else if kind.is_block_device() {
                "block device".into()
            } else {
                "other".into()
            };
            format!(
                "{what} mode={:o} owner={}:{}",
                meta.permissions().mode(),
                meta.uid(),
                meta.gid()
            )
        }
    }
}

/// Runs every row against `driver`: the code, the message, and nothing changed. All
/// failures are reported together.
async fn run_table(driver: &Driver, table: Table) -> usize {
    let count = table.0.len();
    let mut failures = Vec::new();
    for row in table.0 {
        let paths = row.call.paths();
        let before = world(driver, &paths);
        let result = row.call.clone().run(driver).await;
        let (code, message) = match &result {
            Ok(()) => (Code::Ok, String::new()),
            Err(status) => (status.code(), status.message().to_owned()),
        };
        if code != row.want {
            failures.push(format!(
                "{}: want {:?}, got {code:?} {message:?}",
                row.what, row.want
            ));
        } else if code != Code::Ok {
            if message.is_empty() {
                failures.push(format!("{}: {code:?} without a message", row.what));
            }
            if let Some(needle) = &row.names
                && !message.contains(needle.as_str())
            {
                failures.push(format!(
                    "{}: message {message:?} does not name {needle:?}",
                    row.what
                ));
            }
        }
        // Give the kernel a moment for what settles asynchronously (a loop device's
        // release), then compare.
        let mut after = world(driver, &paths);
        for _ in 0..40 {
            if after == before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            after = world(driver, &paths);
        }
        if after != before {
            failures.push(format!(
                "{}: changed something:\n  before {:?}\n  after  {:?}",
                row.what,
                diff(&before, &after),
                diff(&after, &before)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    count
}

/// What `a` has that `b` does not, for messages.
fn diff(a: &World, b: &World) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in &a.files {
        if b.files.get(k) != Some(v) {
            out.push(format!("file {} {v}", k.display()));
        }
    }
    out.extend(a.mounts.difference(&b.mounts).map(|m| format!("mount {m}")));
    out.extend(a.loops.difference(&b.loops).map(|l| format!("loop {l}")));
    for (k, v) in &a.paths {
        if b.paths.get(k) != Some(v) {
            out.push(format!("path {k:?}: {v}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// Identity and Controller
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn identity_and_controller_refuse_bad_input_and_change_nothing() {
    let driver = Driver::start().await;
    let mount_vol = driver.create_volume("fx-mount", SIZE, &[]).await.volume_id;
    let mut block_request = create("fx-block");
    block_request.volume_capabilities = vec![block_cap()];
    let block_vol = driver
        .controller()
        .create_volume(block_request.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let snap = driver
        .controller()
        .create_snapshot(snapshot("fx-snap", &mount_vol))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;

    let mut t = Table::default();
    use Code::*;

    // Identity has no input to get wrong; it answers and changes nothing.
    t.add("GetPluginInfo", Call::PluginInfo, Ok, "");
    t.add("GetPluginCapabilities", Call::PluginCapabilities, Ok, "");
    t.add("Probe", Call::Probe, Ok, "");
    t.add(
        "ControllerGetCapabilities",
        Call::ControllerCapabilities,
        Ok,
        "",
    );

    // CreateVolume: names.
    t.add(
        "name empty",
        Call::CreateVolume(create("")),
        InvalidArgument,
        "name",
    );
    t.add(
        "name of 129 bytes",
        Call::CreateVolume(create(&"n".repeat(129))),
        InvalidArgument,
        "name",
    );
    t.add(
        "name of 43 crabs (172 bytes)",
        Call::CreateVolume(create(&"🦀".repeat(43))),
        InvalidArgument,
        "name",
    );
    for c in [
        '\u{0}', '\u{7}', '\u{8}', '\u{b}', '\u{c}', '\u{e}', '\u{1b}', '\u{1f}', '\u{7f}',
        '\u{85}', '\u{9f}',
    ] {
        t.add(
            format!("name with U+{:04X}", c as u32),
            Call::CreateVolume(create(&format!("pvc-{c}-bad"))),
            InvalidArgument,
            "name",
        );
    }
    t.add(
        "banned character and no capabilities: the name is reported",
        Call::CreateVolume(create_with("pvc-\u{1}", |r| r.volume_capabilities.clear())),
        InvalidArgument,
        "name",
    );

    // CreateVolume: capabilities.
    t.add(
        "no capabilities",
        Call::CreateVolume(create_with("pvc-c1", |r| r.volume_capabilities.clear())),
        InvalidArgument,
        "volume_capabilities",
    );
    for (what, cap, names) in [
        ("no access_type", no_access_type(), "access_type"),
        ("no access_mode", no_access_mode(), "access_mode"),
        (
            "access mode UNKNOWN",
            raw_mode(Mode::Unknown as i32),
            "access_mode",
        ),
        ("access mode 99", raw_mode(99), "access_mode"),
        ("access mode -1", raw_mode(-1), "access_mode"),
        (
            "MULTI_NODE_MULTI_WRITER",
            mode_cap(mount_access("", &[]), Mode::MultiNodeMultiWriter),
            "MULTI_NODE_MULTI_WRITER",
        ),
        (
            "MULTI_NODE_READER_ONLY block",
            mode_cap(block_access(), Mode::MultiNodeReaderOnly),
            "MULTI_NODE_READER_ONLY",
        ),
        (
            "MULTI_NODE_SINGLE_WRITER",
            mode_cap(mount_access("", &[]), Mode::MultiNodeSingleWriter),
            "MULTI_NODE_SINGLE_WRITER",
        ),
        (
            "fs_type ntfs",
            mode_cap(mount_access("ntfs", &[]), Mode::SingleNodeWriter),
            "ntfs",
        ),
        (
            "fs_type a path",
            mode_cap(mount_access("../../bin/sh", &[]), Mode::SingleNodeWriter),
            "fs_type",
        ),
        (
            "volume_mount_group",
            mode_cap(
                volume_capability::AccessType::Mount(volume_capability::MountVolume {
                    volume_mount_group: "1000".into(),
                    ..Default::default()
                }),
                Mode::SingleNodeWriter,
            ),
            "volume_mount_group",
        ),
        (
            "2048 flags: 4096 bytes of characters, 6144 with separators",
            owned_flags_cap(vec!["ro".to_owned(); 2048]),
            "mount_flags",
        ),
        (
            "one flag of 5000 bytes",
            owned_flags_cap(vec!["a".repeat(5000)]),
            "mount_flags",
        ),
        ("flag suid", flags_cap(&["suid"]), "mount_flags[0]"),
        ("flag dev", flags_cap(&["noatime", "dev"]), "mount_flags[1]"),
        ("flag defaults", flags_cap(&["defaults"]), "mount_flags[0]"),
        (
            "flag X-mount.mkdir",
            flags_cap(&["X-mount.mkdir"]),
            "mount_flags",
        ),
        (
            "flag x-mount.mode",
            flags_cap(&["x-mount.mode=0777"]),
            "mount_flags",
        ),
        ("flag remount", flags_cap(&["remount"]), "mount_flags"),
        ("flag bind", flags_cap(&["bind"]), "mount_flags"),
        ("flag loop", flags_cap(&["loop"]), "mount_flags"),
        (
            "flag context",
            flags_cap(&["context=system_u:object_r:x:s0"]),
            "mount_flags",
        ),
        (
            "flag errors=panic",
            flags_cap(&["errors=panic"]),
            "mount_flags",
        ),
        (
            "suid hidden behind a comma",
            flags_cap(&["noatime,suid"]),
            "mount_flags",
        ),
        ("empty flag", flags_cap(&[""]), "mount_flags"),
        ("flag with a space", flags_cap(&["no atime"]), "mount_flags"),
        ("flag with a NUL", flags_cap(&["noatime\0"]), "mount_flags"),
        (
            "nouuid for ext4",
            mode_cap(mount_access("ext4", &["nouuid"]), Mode::SingleNodeWriter),
            "ext4",
        ),
        (
            "data=journal for xfs",
            mode_cap(
                mount_access("xfs", &["data=journal"]),
                Mode::SingleNodeWriter,
            ),
            "xfs",
        ),
    ] {
        t.add(
            format!("CreateVolume: {what}"),
            Call::CreateVolume(create_with("pvc-cap", |r| {
                r.volume_capabilities = vec![cap]
            })),
            InvalidArgument,
            names,
        );
    }
    t.add(
        "second capability bad",
        Call::CreateVolume(create_with("pvc-cap2", |r| {
            r.volume_capabilities.push(no_access_mode())
        })),
        InvalidArgument,
        "volume_capabilities[1]",
    );

    // CreateVolume: sizes.
    for (what, required, limit, code) in [
        ("negative required_bytes", -1, 0, InvalidArgument),
        ("negative limit_bytes", 0, -1, InvalidArgument),
        ("i64::MIN required", i64::MIN, 0, InvalidArgument),
        ("required above limit", 2 * SIZE, SIZE, OutOfRange),
        ("limit below one MiB", 0, 1000, OutOfRange),
        ("no whole MiB in range", MIB + 1, MIB + 2, OutOfRange),
        ("required i64::MAX", i64::MAX, 0, OutOfRange),
        (
            "required i64::MAX, limit i64::MAX",
            i64::MAX,
            i64::MAX,
            OutOfRange,
        ),
        ("required 2^62", 1 << 62, 0, OutOfRange),
        ("required 2^63 - 1 MiB", i64::MAX / MIB * MIB, 0, OutOfRange),
        ("required 1 PiB", 1 << 50, 0, OutOfRange),
        ("more than the 16 GiB pool", 17 * GIB, 0, OutOfRange),
    ] {
        t.add(
            format!("CreateVolume: {what}"),
            Call::CreateVolume(create_with("pvc-size", |r| {
                r.capacity_range = range(required, limit)
            })),
            code,
            "capacity_range",
        );
    }
    t.add(
        "more than the pool, thick",
        Call::CreateVolume(create_with("pvc-size", |r| {
            r.capacity_range = range(17 * GIB, 0);
            r.parameters = map(&[(PROVISIONING, "thick")]);
        })),
        OutOfRange,
        "capacity_range",
    );

    // CreateVolume: parameters, mutable parameters, secrets.
    for (what, params, names) in [
        ("unknown parameter", map(&[("colour", "blue")]), "colour"),
        ("provisioning fat", map(&[(PROVISIONING, "fat")]), "fat"),
        (
            "provisioning empty",
            map(&[(PROVISIONING, "")]),
            PROVISIONING,
        ),
        ("key with a NUL", map(&[("a\0b", "x")]), "parameters"),
        (
            "key that is a path",
            map(&[("../../etc", "x")]),
            "parameters",
        ),
        ("map over 4 KiB", big_map(), "parameters"),
    ] {
        t.add(
            format!("CreateVolume: {what}"),
            Call::CreateVolume(create_with("pvc-param", |r| r.parameters = params)),
            InvalidArgument,
            names,
        );
    }
    t.add(
        "an unknown mutable parameter",
        Call::CreateVolume(create_with("pvc-mutable", |r| {
            r.mutable_parameters = map(&[("iops", "100")])
        })),
        InvalidArgument,
        "mutable_parameters",
    );
    t.add(
        "mutable_parameters with a sidecar key",
        Call::CreateVolume(create_with("pvc-mutable", |r| {
            r.mutable_parameters = map(&[("csi.storage.k8s.io/pvc/name", "x")])
        })),
        InvalidArgument,
        "mutable_parameters",
    );
    t.add(
        "mutable_parameters on an existing name",
        Call::CreateVolume(create_with("fx-mount", |r| {
            r.mutable_parameters = map(&[("iops", "100")])
        })),
        InvalidArgument,
        "mutable_parameters",
    );
    t.add(
        "secrets over 4 KiB",
        Call::CreateVolume(create_with("pvc-secret", |r| r.secrets = big_map())),
        InvalidArgument,
        "secrets",
    );

    // CreateVolume: content sources.
    let source = |r#type| proto::VolumeContentSource { r#type };
    for (what, src, code, names) in [
        (
            "source without a type",
            source(None),
            InvalidArgument,
            "volume_content_source.type",
        ),
        (
            "snapshot source without an ID",
            snapshot_source(""),
            InvalidArgument,
            "snapshot_id",
        ),
        (
            "volume source without an ID",
            volume_source(""),
            InvalidArgument,
            "volume_id",
        ),
        (
            "unknown snapshot",
            snapshot_source(UNKNOWN_SNAPSHOT),
            NotFound,
            UNKNOWN_SNAPSHOT,
        ),
        (
            "malformed snapshot",
            snapshot_source("snap-x"),
            NotFound,
            "snap-x",
        ),
        (
            "a volume ID as snapshot",
            snapshot_source(&mount_vol),
            NotFound,
            "snapshot",
        ),
        (
            "unknown volume",
            volume_source(UNKNOWN_VOLUME),
            NotFound,
            UNKNOWN_VOLUME,
        ),
        (
            "foreign volume",
            volume_source(FOREIGN_VOLUME),
            NotFound,
            FOREIGN_VOLUME,
        ),
        (
            "path as volume",
            volume_source("../../etc/passwd"),
            NotFound,
            "volume",
        ),
    ] {
        t.add(
            format!("CreateVolume: {what}"),
            Call::CreateVolume(create_request("pvc-src", SIZE, &[], Some(src))),
            code,
            names,
        );
    }
    t.add(
        "clone smaller than its source",
        Call::CreateVolume(create_request(
            "pvc-small-clone",
            SIZE / 2,
            &[],
            Some(volume_source(&mount_vol)),
        )),
        OutOfRange,
        "capacity_range",
    );
    t.add(
        "restore with a limit below the snapshot",
        Call::CreateVolume(create_with("pvc-small-restore", |r| {
            r.capacity_range = range(0, SIZE / 2);
            r.volume_content_source = Some(snapshot_source(&snap));
        })),
        OutOfRange,
        "capacity_range",
    );

    // CreateVolume: topology.
    let topology = |key: &str, value: &str| proto::Topology {
        segments: map(&[(key, value)]),
    };
    for (what, requisite) in [
        (
            "requisite on another node",
            topology("topology.kura.csi.dev/node", "other-node"),
        ),
        ("requisite with an unknown key", topology("zone", "a")),
    ] {
        t.add(
            format!("CreateVolume: {what}"),
            Call::CreateVolume(create_with("pvc-topo", |r| {
                r.accessibility_requirements = Some(proto::TopologyRequirement {
                    requisite: vec![requisite.clone()],
                    preferred: vec![requisite],
                })
            })),
            ResourceExhausted,
            "accessibility_requirements",
        );
    }

    // CreateVolume: a name that exists, asked for incompatibly.
    t.add(
        "existing mount volume asked as block",
        Call::CreateVolume(create_with("fx-mount", |r| {
            r.volume_capabilities = vec![block_cap()]
        })),
        AlreadyExists,
        "fx-mount",
    );
    t.add(
        "existing mount volume asked as mount and block",
        Call::CreateVolume(create_with("fx-mount", |r| {
            r.volume_capabilities = vec![mount_cap(""), block_cap()]
        })),
        AlreadyExists,
        "fx-mount",
    );
    t.add(
        "existing block volume asked as mount",
        Call::CreateVolume(create("fx-block")),
        AlreadyExists,
        "fx-block",
    );
    t.add(
        "existing volume asked larger",
        Call::CreateVolume(create_request("fx-mount", 2 * SIZE, &[], None)),
        AlreadyExists,
        "fx-mount",
    );
    t.add(
        "existing volume asked with a limit below it",
        Call::CreateVolume(create_with("fx-mount", |r| {
            r.capacity_range = range(0, SIZE / 2)
        })),
        AlreadyExists,
        "fx-mount",
    );
    t.add(
        "existing thin volume asked thick",
        Call::CreateVolume(create_request(
            "fx-mount",
            SIZE,
            &[(PROVISIONING, "thick")],
            None,
        )),
        AlreadyExists,
        "fx-mount",
    );
    t.add(
        "existing empty volume asked from a snapshot",
        Call::CreateVolume(create_request(
            "fx-mount",
            SIZE,
            &[],
            Some(snapshot_source(&snap)),
        )),
        AlreadyExists,
        "fx-mount",
    );
    t.add(
        "existing volume asked the same",
        Call::CreateVolume(create("fx-mount")),
        Ok,
        "",
    );
    t.add(
        "existing block volume asked the same",
        Call::CreateVolume(block_request),
        Ok,
        "",
    );
    t.add(
        "request over the gRPC message limit",
        Call::CreateVolume(create_with("pvc-huge-message", |r| {
            r.parameters = map(&[("csi.storage.k8s.io/x", &"x".repeat(5 << 20))])
        })),
        ResourceExhausted,
        "too large",
    );

    // DeleteVolume.
    t.add(
        "DeleteVolume without an ID",
        Call::DeleteVolume(proto::DeleteVolumeRequest::default()),
        InvalidArgument,
        "volume_id",
    );
    for id in [UNKNOWN_VOLUME, FOREIGN_VOLUME]
        .into_iter()
        .chain(MALFORMED_IDS)
    {
        t.add(
            format!("DeleteVolume of {id:?}: gone already"),
            Call::DeleteVolume(proto::DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            }),
            Ok,
            "",
        );
    }

    t.add(
        "DeleteVolume with secrets over 4 KiB",
        Call::DeleteVolume(proto::DeleteVolumeRequest {
            volume_id: UNKNOWN_VOLUME.into(),
            secrets: big_map(),
        }),
        InvalidArgument,
        "secrets",
    );
    t.add(
        "DeleteSnapshot with secrets over 4 KiB",
        Call::DeleteSnapshot(proto::DeleteSnapshotRequest {
            snapshot_id: UNKNOWN_SNAPSHOT.into(),
            secrets: big_map(),
        }),
        InvalidArgument,
        "secrets",
    );
    t.add(
        "ListSnapshots with secrets over 4 KiB",
        Call::ListSnapshots(proto::ListSnapshotsRequest {
            secrets: big_map(),
            ..Default::default()
        }),
        InvalidArgument,
        "secrets",
    );
    t.add(
        "Validate with a volume_context over 4 KiB",
        Call::Validate(proto::ValidateVolumeCapabilitiesRequest {
            volume_context: big_map(),
            ..validate(&mount_vol, vec![mount_cap("")])
        }),
        InvalidArgument,
        "volume_context",
    );
    t.add(
        "GetCapacity with parameters over 4 KiB",
        Call::GetCapacity(proto::GetCapacityRequest {
            parameters: big_map(),
            ..Default::default()
        }),
        InvalidArgument,
        "parameters",
    );

    // ControllerPublish and ControllerUnpublish: not offered; ModifyVolume refuses an
    // unknown key.
    t.add(
        "ControllerPublishVolume",
        Call::ControllerPublish(proto::ControllerPublishVolumeRequest {
            volume_id: mount_vol.clone(),
            node_id: NODE_ID.into(),
            volume_capability: Some(mount_cap("")),
            ..Default::default()
        }),
        Unimplemented,
        "ControllerPublishVolume",
    );
    t.add(
        "ControllerPublishVolume, empty",
        Call::ControllerPublish(Default::default()),
        Unimplemented,
        "",
    );
    t.add(
        "ControllerUnpublishVolume",
        Call::ControllerUnpublish(proto::ControllerUnpublishVolumeRequest {
            volume_id: mount_vol.clone(),
            ..Default::default()
        }),
        Unimplemented,
        "ControllerUnpublishVolume",
    );
    t.add(
        "ControllerModifyVolume",
        Call::Modify(proto::ControllerModifyVolumeRequest {
            volume_id: mount_vol.clone(),
            mutable_parameters: map(&[("iops", "1")]),
            ..Default::default()
        }),
        InvalidArgument,
        "iops",
    );
    // GroupController: what a create or delete misses.
    t.add(
        "CreateVolumeGroupSnapshot without a name",
        Call::CreateGroupSnapshot(proto::CreateVolumeGroupSnapshotRequest {
            source_volume_ids: vec![mount_vol.clone()],
            ..Default::default()
        }),
        InvalidArgument,
        "name",
    );
    t.add(
        "CreateVolumeGroupSnapshot without sources",
        Call::CreateGroupSnapshot(proto::CreateVolumeGroupSnapshotRequest {
            name: "group".into(),
            ..Default::default()
        }),
        InvalidArgument,
        "source_volume_ids",
    );
    t.add(
        "DeleteVolumeGroupSnapshot without an ID",
        Call::DeleteGroupSnapshot(Default::default()),
        InvalidArgument,
        "group_snapshot_id",
    );
    t.add(
        "GetMetadataAllocated without an ID",
        Call::MetadataAllocated(Default::default()),
        InvalidArgument,
        "snapshot_id",
    );
    t.add(
        "GetMetadataAllocated at a negative offset",
        Call::MetadataAllocated(proto::GetMetadataAllocatedRequest {
            snapshot_id: snap.clone(),
            starting_offset: -1,
            ..Default::default()
        }),
        OutOfRange,
        "starting_offset",
    );

    // ValidateVolumeCapabilities.
    t.add(
        "Validate without an ID",
        Call::Validate(validate("", vec![mount_cap("")])),
        InvalidArgument,
        "volume_id",
    );
    t.add(
        "Validate without capabilities, unknown ID",
        Call::Validate(validate(UNKNOWN_VOLUME, vec![])),
        InvalidArgument,
        "volume_capabilities",
    );
    t.add(
        "Validate a capability without access_type",
        Call::Validate(validate(&mount_vol, vec![no_access_type()])),
        InvalidArgument,
        "access_type",
    );
    t.add(
        "Validate a refused flag",
        Call::Validate(validate(&mount_vol, vec![flags_cap(&["suid"])])),
        InvalidArgument,
        "mount_flags",
    );
    t.add(
        "Validate an unknown volume",
        Call::Validate(validate(UNKNOWN_VOLUME, vec![mount_cap("")])),
        NotFound,
        UNKNOWN_VOLUME,
    );
    t.add(
        "Validate a malformed volume",
        Call::Validate(validate("vol-../x", vec![mount_cap("")])),
        NotFound,
        "volume_id",
    );
    for (what, request) in [
        (
            "multi-node mode",
            validate(
                &mount_vol,
                vec![mode_cap(mount_access("", &[]), Mode::MultiNodeMultiWriter)],
            ),
        ),
        (
            "block for a mount volume",
            validate(&mount_vol, vec![block_cap()]),
        ),
        (
            "mount for a block volume",
            validate(&block_vol, vec![mount_cap("")]),
        ),
        (
            "mutable parameters",
            proto::ValidateVolumeCapabilitiesRequest {
                mutable_parameters: map(&[("iops", "1")]),
                ..validate(&mount_vol, vec![mount_cap("")])
            },
        ),
        (
            "unknown parameter",
            proto::ValidateVolumeCapabilitiesRequest {
                parameters: map(&[("colour", "blue")]),
                ..validate(&mount_vol, vec![mount_cap("")])
            },
        ),
    ] {
        t.add(
            format!("Validate (not confirmed): {what}"),
            Call::Validate(request),
            Ok,
            "",
        );
    }

    // ListVolumes, GetCapacity.
    for (what, max, token, code) in [
        ("negative max_entries", -1, "", InvalidArgument),
        ("garbage token", 0, "garbage", Aborted),
        ("token with a NUL", 0, "vol-\0", Aborted),
        ("snapshot ID as token", 0, snap.as_str(), Aborted),
        ("path as token", 0, "../../etc/passwd", Aborted),
        ("one entry", 1, "", Ok),
    ] {
        t.add(
            format!("ListVolumes: {what}"),
            Call::ListVolumes(proto::ListVolumesRequest {
                max_entries: max,
                starting_token: token.into(),
            }),
            code,
            if code == Ok {
                ""
            } else if code == Aborted {
                "starting_token"
            } else {
                "max_entries"
            },
        );
    }
    let capacity = |caps: Vec<proto::VolumeCapability>, params: &[(&str, &str)]| {
        Call::GetCapacity(proto::GetCapacityRequest {
            volume_capabilities: caps,
            parameters: map(params),
            accessible_topology: None,
        })
    };
    t.add(
        "GetCapacity: unknown parameter",
        capacity(vec![], &[("colour", "x")]),
        InvalidArgument,
        "colour",
    );
    t.add(
        "GetCapacity: no access type",
        capacity(vec![no_access_type()], &[]),
        InvalidArgument,
        "access_type",
    );
    t.add(
        "GetCapacity: multi-node (none available)",
        capacity(
            vec![mode_cap(block_access(), Mode::MultiNodeMultiWriter)],
            &[],
        ),
        Ok,
        "",
    );
    t.add(
        "GetCapacity: thick",
        capacity(vec![], &[(PROVISIONING, "thick")]),
        Ok,
        "",
    );

    // CreateSnapshot.
    for (what, request, code, names) in [
        (
            "no source",
            snapshot("s", ""),
            InvalidArgument,
            "source_volume_id",
        ),
        ("no name", snapshot("", &mount_vol), InvalidArgument, "name"),
        (
            "no name, unknown source",
            snapshot("", UNKNOWN_VOLUME),
            InvalidArgument,
            "name",
        ),
        (
            "name with NUL",
            snapshot("snap\0", &mount_vol),
            InvalidArgument,
            "name",
        ),
        (
            "name with U+0001, unknown source",
            snapshot("s\u{1}", UNKNOWN_VOLUME),
            InvalidArgument,
            "name",
        ),
        (
            "name with U+009F",
            snapshot("s\u{9f}", &mount_vol),
            InvalidArgument,
            "U+009F",
        ),
        (
            "name of 129 bytes",
            snapshot(&"s".repeat(129), &mount_vol),
            InvalidArgument,
            "name",
        ),
        (
            "unknown source",
            snapshot("s", UNKNOWN_VOLUME),
            NotFound,
            UNKNOWN_VOLUME,
        ),
        (
            "malformed source",
            snapshot("s", "vol-../x"),
            NotFound,
            "source_volume_id",
        ),
        (
            "foreign source",
            snapshot("s", FOREIGN_VOLUME),
            NotFound,
            FOREIGN_VOLUME,
        ),
        (
            "a snapshot as source",
            snapshot("s", &snap),
            NotFound,
            "source_volume_id",
        ),
        (
            "existing name, other source",
            snapshot("fx-snap", &block_vol),
            AlreadyExists,
            "fx-snap",
        ),
        (
            "existing name, same source",
            snapshot("fx-snap", &mount_vol),
            Ok,
            "",
        ),
        (
            "unknown parameter",
            proto::CreateSnapshotRequest {
                parameters: map(&[("colour", "blue")]),
                ..snapshot("s", &mount_vol)
            },
            InvalidArgument,
            "colour",
        ),
        (
            "parameters over 4 KiB",
            proto::CreateSnapshotRequest {
                parameters: big_map(),
                ..snapshot("s", &mount_vol)
            },
            InvalidArgument,
            "parameters",
        ),
        (
            "secrets over 4 KiB",
            proto::CreateSnapshotRequest {
                secrets: big_map(),
                ..snapshot("s", &mount_vol)
            },
            InvalidArgument,
            "secrets",
        ),
    ] {
        t.add(
            format!("CreateSnapshot: {what}"),
            Call::CreateSnapshot(request),
            code,
            names,
        );
    }

    // DeleteSnapshot, ListSnapshots, GetSnapshot.
    t.add(
        "DeleteSnapshot without an ID",
        Call::DeleteSnapshot(Default::default()),
        InvalidArgument,
        "snapshot_id",
    );
    for id in [
        UNKNOWN_SNAPSHOT,
        "snap-x",
        "snap-../../x",
        "snap-\0",
        mount_vol.as_str(),
    ] {
        t.add(
            format!("DeleteSnapshot of {id:?}: gone already"),
            Call::DeleteSnapshot(proto::DeleteSnapshotRequest {
                snapshot_id: id.into(),
                ..Default::default()
            }),
            Ok,
            "",
        );
    }
    for (what, request, code) in [
        (
            "negative max_entries",
            proto::ListSnapshotsRequest {
                max_entries: -5,
                ..Default::default()
            },
            InvalidArgument,
        ),
        (
            "garbage token",
            proto::ListSnapshotsRequest {
                starting_token: "garbage".into(),
                ..Default::default()
            },
            Aborted,
        ),
        (
            "malformed snapshot_id: none",
            proto::ListSnapshotsRequest {
                snapshot_id: "snap-../x".into(),
                ..Default::default()
            },
            Ok,
        ),
        (
            "unknown snapshot_id: none",
            proto::ListSnapshotsRequest {
                snapshot_id: UNKNOWN_SNAPSHOT.into(),
                ..Default::default()
            },
            Ok,
        ),
        (
            "malformed source_volume_id: none",
            proto::ListSnapshotsRequest {
                source_volume_id: "\0".into(),
                ..Default::default()
            },
            Ok,
        ),
    ] {
        t.add(
            format!("ListSnapshots: {what}"),
            Call::ListSnapshots(request),
            code,
            "",
        );
    }
    for (id, code, names) in [
        ("", InvalidArgument, "snapshot_id"),
        (UNKNOWN_SNAPSHOT, NotFound, UNKNOWN_SNAPSHOT),
        ("snap-x", NotFound, "snapshot_id"),
        ("\u{7f}", NotFound, "snapshot_id"),
    ] {
        t.add(
            format!("GetSnapshot {id:?}"),
            Call::GetSnapshot(proto::GetSnapshotRequest {
                snapshot_id: id.into(),
                ..Default::default()
            }),
            code,
            names,
        );
    }

    // ControllerExpandVolume.
    let with_cap = |cap: proto::VolumeCapability, id: &str| proto::ControllerExpandVolumeRequest {
        volume_capability: Some(cap),
        ..controller_expand(id, 2 * SIZE, 0)
    };
    for (what, request, code, names) in [
        (
            "no ID",
            controller_expand("", SIZE, 0),
            InvalidArgument,
            "volume_id",
        ),
        (
            "no capacity_range",
            proto::ControllerExpandVolumeRequest {
                volume_id: mount_vol.clone(),
                ..Default::default()
            },
            InvalidArgument,
            "capacity_range",
        ),
        (
            "empty range",
            controller_expand(&mount_vol, 0, 0),
            InvalidArgument,
            "capacity_range",
        ),
        (
            "negative required",
            controller_expand(&mount_vol, -1, 0),
            InvalidArgument,
            "required_bytes",
        ),
        (
            "negative limit",
            controller_expand(&mount_vol, 0, -1),
            InvalidArgument,
            "limit_bytes",
        ),
        (
            "unknown volume",
            controller_expand(UNKNOWN_VOLUME, 2 * SIZE, 0),
            NotFound,
            UNKNOWN_VOLUME,
        ),
        (
            "malformed volume",
            controller_expand("vol-x", 2 * SIZE, 0),
            NotFound,
            "volume_id",
        ),
        (
            "foreign volume",
            controller_expand(FOREIGN_VOLUME, 2 * SIZE, 0),
            NotFound,
            FOREIGN_VOLUME,
        ),
        (
            "a shrink",
            controller_expand(&mount_vol, 0, SIZE / 2),
            OutOfRange,
            "capacity_range",
        ),
        (
            "required above limit",
            controller_expand(&mount_vol, 4 * SIZE, 2 * SIZE),
            OutOfRange,
            "capacity_range",
        ),
        (
            "required i64::MAX",
            controller_expand(&mount_vol, i64::MAX, 0),
            OutOfRange,
            "capacity_range",
        ),
        (
            "required 2^62",
            controller_expand(&mount_vol, 1 << 62, 0),
            OutOfRange,
            "capacity_range",
        ),
        (
            "more than the pool",
            controller_expand(&mount_vol, 17 * GIB, 0),
            OutOfRange,
            "capacity_range",
        ),
        (
            "MULTI_NODE_MULTI_WRITER capability",
            with_cap(
                mode_cap(mount_access("", &[]), Mode::MultiNodeMultiWriter),
                &mount_vol,
            ),
            InvalidArgument,
            "volume_capability",
        ),
        (
            "MULTI_NODE_READER_ONLY capability, unknown volume",
            with_cap(
                mode_cap(block_access(), Mode::MultiNodeReaderOnly),
                UNKNOWN_VOLUME,
            ),
            InvalidArgument,
            "volume_capability",
        ),
        (
            "capability without access_type",
            with_cap(no_access_type(), &mount_vol),
            InvalidArgument,
            "volume_capability.access_type",
        ),
        (
            "capability with a refused flag",
            with_cap(flags_cap(&["suid"]), &mount_vol),
            InvalidArgument,
            "mount_flags",
        ),
        (
            "secrets over 4 KiB",
            proto::ControllerExpandVolumeRequest {
                secrets: big_map(),
                ..controller_expand(&mount_vol, 2 * SIZE, 0)
            },
            InvalidArgument,
            "secrets",
        ),
        (
            "to the size it has",
            controller_expand(&mount_vol, SIZE, 0),
            Ok,
            "",
        ),
        (
            "to less than it has",
            controller_expand(&mount_vol, SIZE / 2, 0),
            Ok,
            "",
        ),
    ] {
        t.add(
            format!("ControllerExpandVolume: {what}"),
            Call::ControllerExpand(request),
            code,
            names,
        );
    }

    // ControllerGetVolume.
    for (id, code, names) in [
        ("", InvalidArgument, "volume_id"),
        (UNKNOWN_VOLUME, NotFound, UNKNOWN_VOLUME),
        (FOREIGN_VOLUME, NotFound, FOREIGN_VOLUME),
        ("vol-../../etc/passwd", NotFound, "volume_id"),
        ("\0", NotFound, "volume_id"),
    ] {
        t.add(
            format!("ControllerGetVolume {id:?}"),
            Call::GetVolume(proto::ControllerGetVolumeRequest {
                volume_id: id.into(),
            }),
            code,
            names,
        );
    }

    let count = run_table(&driver, t).await;
    assert!(count >= 150, "the controller corpus has only {count} rows");
    eprintln!("identity and controller: {count} rows");
}

// ---------------------------------------------------------------------------------
// Node
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn node_refuses_bad_input_and_changes_nothing() {
    let driver = Driver::start().await;
    let co = driver.path("co");
    std::fs::create_dir(&co).unwrap();
    let at = |name: &str| co.join(name);

    // Volumes in every state: staged and published (two modes, and block), and not
    // staged at all.
    let multi = mode_cap(mount_access("ext4", &[]), Mode::SingleNodeMultiWriter);
    let single = mode_cap(mount_access("ext4", &[]), Mode::SingleNodeWriter);
    let block = mode_cap(block_access(), Mode::SingleNodeMultiWriter);
    let mut fixtures = Vec::new();
    for (name, cap) in [
        ("n-multi", &multi),
        ("n-single", &single),
        ("n-block", &block),
    ] {
        let id = driver.create_volume(name, SIZE, &[]).await.volume_id;
        let staging = at(&format!("stage-{name}"));
        std::fs::create_dir(&staging).unwrap();
        let target = at(&format!("target-{name}"));
        driver
            .node()
            .node_stage_volume(stage_request(&id, &staging, cap))
            .await
            .unwrap();
        driver
            .node()
            .node_publish_volume(publish_request(&id, &staging, &target, cap, false))
            .await
            .unwrap();
        fixtures.push((id, p(&staging), p(&target)));
    }
    let [(m, sm, tm), (s, ss, ts), (b, sb, tb)] = <[_; 3]>::try_from(fixtures).unwrap();
    let u = driver
        .create_volume("n-unstaged", SIZE, &[])
        .await
        .volume_id;

    // Paths of every kind, as a CO (or an attacker) might leave them.
    std::fs::write(at("afile"), b"x").unwrap();
    std::fs::create_dir(at("adir")).unwrap();
    std::fs::create_dir(at("fulldir")).unwrap();
    std::fs::write(at("fulldir/keep"), b"keep").unwrap();
    std::os::unix::fs::symlink(at("adir"), at("link-dir")).unwrap();
    std::os::unix::fs::symlink("/proc", at("link-proc")).unwrap();
    std::os::unix::fs::symlink(driver.path("state"), at("link-state")).unwrap();
    let fifo = std::process::Command::new("mkfifo")
        .arg(at("fifo"))
        .status()
        .unwrap();
    assert!(fifo.success());
    let (afile, adir, fulldir) = (p(&at("afile")), p(&at("adir")), p(&at("fulldir")));
    let (link_dir, fifo) = (p(&at("link-dir")), p(&at("fifo")));
    let missing = p(&at("missing"));
    let no_parent = p(&at("no-parent/child"));
    let via_proc = p(&at("link-proc/kura-x"));
    let via_state = p(&at("link-state/kura-x"));
    let in_state = p(&driver.path("state/attachments/x"));
    let in_pool = p(&driver.pool_root().join("volumes"));
    let long_path = format!("{}/{}", co.display(), "a/".repeat(2100));
    let long_name = format!("{}/{}", co.display(), "n".repeat(256));

    let mut t = Table::default();
    use Code::*;

    // Paths that cannot be right, in every field that takes one.
    let bad_paths: Vec<(&str, String)> = vec![
        ("relative", "relative/path".into()),
        ("NUL", format!("{}/nul\0x", co.display())),
        ("newline", format!("{}/new\nline", co.display())),
        ("escape", format!("{}/\u{1b}[31m", co.display())),
        ("over PATH_MAX", long_path.clone()),
        ("component over NAME_MAX", long_name.clone()),
        ("under /proc", "/proc/self/root".into()),
        ("under /sys", "/sys/kernel".into()),
        ("under /dev", "/dev/kura-test".into()),
        ("with ..", format!("{}/../{}", co.display(), "x")),
        ("root", "/".into()),
        ("in kura's state", in_state.clone()),
        ("in kura's pool", in_pool.clone()),
    ];
    for (what, path) in &bad_paths {
        t.add(
            format!("NodeStageVolume, staging path {what}"),
            Call::Stage(stage(&u, path, single.clone())),
            InvalidArgument,
            "staging_target_path",
        );
        t.add(
            format!("NodeStageVolume, staging path {what}, unknown volume"),
            Call::Stage(stage(UNKNOWN_VOLUME, path, single.clone())),
            InvalidArgument,
            "staging_target_path",
        );
        t.add(
            format!("NodePublishVolume, target path {what}"),
            Call::Publish(publish(&m, &sm, path, multi.clone())),
            InvalidArgument,
            "target_path",
        );
        t.add(
            format!("NodeUnpublishVolume, target path {what}"),
            Call::Unpublish(unpublish(&m, path)),
            InvalidArgument,
            "target_path",
        );
    }
    for (what, path) in bad_paths.iter().take(6) {
        t.add(
            format!("NodePublishVolume, staging path {what}"),
            Call::Publish(publish(&m, path, &p(&at("t-new")), multi.clone())),
            InvalidArgument,
            "staging_target_path",
        );
        t.add(
            format!("NodeUnstageVolume, staging path {what}"),
            Call::Unstage(unstage(&m, path)),
            InvalidArgument,
            "staging_target_path",
        );
        // Stats and expansion: a path that cannot be one is not where the volume is.
        t.add(
            format!("NodeGetVolumeStats, volume path {what}"),
            Call::Stats(stats(&m, path)),
            NotFound,
            "volume_path",
        );
        t.add(
            format!("NodeExpandVolume, volume path {what}"),
            Call::NodeExpand(node_expand(&m, path, 0, 0)),
            NotFound,
            "volume_path",
        );
    }

    // NodeStageVolume.
    let stage_rows: Vec<(&str, proto::NodeStageVolumeRequest, Code, &str)> = vec![
        (
            "no volume ID",
            stage("", &adir, single.clone()),
            InvalidArgument,
            "volume_id",
        ),
        (
            "no staging path",
            stage(&u, "", single.clone()),
            InvalidArgument,
            "staging_target_path",
        ),
        (
            "no capability",
            proto::NodeStageVolumeRequest {
                volume_capability: None,
                ..stage(&u, &adir, single.clone())
            },
            InvalidArgument,
            "volume_capability",
        ),
        (
            "no access type",
            stage(&u, &adir, no_access_type()),
            InvalidArgument,
            "access_type",
        ),
        (
            "flag suid",
            stage(&u, &adir, flags_cap(&["suid"])),
            InvalidArgument,
            "mount_flags",
        ),
        (
            "flags over 4 KiB",
            stage(&u, &adir, owned_flags_cap(vec!["sync".into(); 1000])),
            InvalidArgument,
            "mount_flags",
        ),
        (
            "an XFS-only flag for the default ext4",
            stage(&u, &adir, flags_cap(&["nouuid"])),
            InvalidArgument,
            "mount_flags",
        ),
        (
            "multi-node mode",
            stage(
                &u,
                &adir,
                mode_cap(mount_access("", &[]), Mode::MultiNodeMultiWriter),
            ),
            FailedPrecondition,
            "volume_capability",
        ),
        (
            "fs_type ntfs",
            stage(
                &u,
                &adir,
                mode_cap(mount_access("ntfs", &[]), Mode::SingleNodeWriter),
            ),
            FailedPrecondition,
            "ntfs",
        ),
        (
            "XFS on a volume too small for it",
            stage(
                &u,
                &adir,
                mode_cap(mount_access("xfs", &[]), Mode::SingleNodeWriter),
            ),
            FailedPrecondition,
            "too small",
        ),
        (
            "staging path a file",
            stage(&u, &afile, single.clone()),
            FailedPrecondition,
            "staging_target_path",
        ),
        (
            "staging path a FIFO",
            stage(&u, &fifo, single.clone()),
            FailedPrecondition,
            "staging_target_path",
        ),
        (
            "staging path a directory that is not empty",
            stage(&u, &fulldir, single.clone()),
            FailedPrecondition,
            "not empty",
        ),
        (
            "staging path a symlink",
            stage(&u, &link_dir, single.clone()),
            FailedPrecondition,
            "symbolic link",
        ),
        (
            "block staging path a file",
            stage(&u, &afile, block.clone()),
            FailedPrecondition,
            "staging_target_path",
        ),
        (
            "staging path without a parent",
            stage(&u, &no_parent, single.clone()),
            FailedPrecondition,
            "parent",
        ),
        (
            "staging path through a link to /proc",
            stage(&u, &via_proc, single.clone()),
            InvalidArgument,
            "/proc",
        ),
        (
            "staging path through a link into kura's state",
            stage(&u, &via_state, single.clone()),
            InvalidArgument,
            "staging_target_path",
        ),
        (
            "unknown volume",
            stage(UNKNOWN_VOLUME, &adir, single.clone()),
            NotFound,
            UNKNOWN_VOLUME,
        ),
        (
            "foreign volume",
            stage(FOREIGN_VOLUME, &adir, single.clone()),
            NotFound,
            FOREIGN_VOLUME,
        ),
        (
            "malformed volume",
            stage("vol-../x", &adir, single.clone()),
            NotFound,
            "volume_id",
        ),
        (
            "staged volume, other path",
            stage(&m, &adir, multi.clone()),
            AlreadyExists,
            "already staged",
        ),
        (
            "staged volume, other capability",
            stage(&m, &sm, block.clone()),
            AlreadyExists,
            "volume_capability",
        ),
        (
            "staged volume, other flags",
            stage(&m, &sm, flags_cap(&["noatime"])),
            AlreadyExists,
            "",
        ),
        (
            "staged volume, same arguments",
            stage(&m, &sm, multi.clone()),
            Ok,
            "",
        ),
        (
            "staged block volume, same arguments",
            stage(&b, &sb, block.clone()),
            Ok,
            "",
        ),
        (
            "secrets over 4 KiB",
            proto::NodeStageVolumeRequest {
                secrets: big_map(),
                ..stage(&u, &adir, single.clone())
            },
            InvalidArgument,
            "secrets",
        ),
        (
            "volume_context over 4 KiB",
            proto::NodeStageVolumeRequest {
                volume_context: big_map(),
                ..stage(&u, &adir, single.clone())
            },
            InvalidArgument,
            "volume_context",
        ),
    ];
    for (what, request, code, names) in stage_rows {
        t.add(
            format!("NodeStageVolume: {what}"),
            Call::Stage(request),
            code,
            names,
        );
    }

    // NodeUnstageVolume.
    let unstage_rows: Vec<(&str, proto::NodeUnstageVolumeRequest, Code, &str)> = vec![
        (
            "no volume ID",
            unstage("", &sm),
            InvalidArgument,
            "volume_id",
        ),
        (
            "no staging path",
            unstage(&m, ""),
            InvalidArgument,
            "staging_target_path",
        ),
        (
            "no staging path, unknown volume",
            unstage(UNKNOWN_VOLUME, ""),
            InvalidArgument,
            "staging_target_path",
        ),
        (
            "unknown volume",
            unstage(UNKNOWN_VOLUME, &adir),
            NotFound,
            UNKNOWN_VOLUME,
        ),
        (
            "malformed volume",
            unstage("vol-\0", &adir),
            NotFound,
            "volume_id",
        ),
        (
            "staged volume, another path: not staged there",
            unstage(&m, &adir),
            Ok,
            "",
        ),
        (
            "staged volume, another volume's staging path",
            unstage(&b, &sm),
            Ok,
            "",
        ),
        (
            "staged volume, a non-empty directory",
            unstage(&s, &fulldir),
            Ok,
            "",
        ),
        ("unstaged volume", unstage(&u, &adir), Ok, ""),
        (
            "staged volume still published",
            unstage(&m, &sm),
            FailedPrecondition,
            "published",
        ),
        (
            "staged block volume still published",
            unstage(&b, &sb),
            FailedPrecondition,
            "published",
        ),
    ];
    for (what, request, code, names) in unstage_rows {
        t.add(
            format!("NodeUnstageVolume: {what}"),
            Call::Unstage(request),
            code,
            names,
        );
    }

    // NodePublishVolume.
    let new_target = p(&at("t-new"));
    let publish_rows: Vec<(&str, proto::NodePublishVolumeRequest, Code, &str)> = vec![
        (
            "no volume ID",
            publish("", &sm, &new_target, multi.clone()),
            InvalidArgument,
            "volume_id",
        ),
        (
            "no target",
            publish(&m, &sm, "", multi.clone()),
            InvalidArgument,
            "target_path",
        ),
        (
            "no capability",
            proto::NodePublishVolumeRequest {
                volume_capability: None,
                ..publish(&m, &sm, &new_target, multi.clone())
            },
            InvalidArgument,
            "volume_capability",
        ),
        (
            "no staging path",
            publish(&m, "", &new_target, multi.clone()),
            FailedPrecondition,
            "staging_target_path",
        ),
        (
            "no staging path, unknown volume",
            publish(UNKNOWN_VOLUME, "", &new_target, multi.clone()),
            FailedPrecondition,
            "staging_target_path",
        ),
        (
            "target is the staging path",
            publish(&m, &sm, &sm, multi.clone()),
            InvalidArgument,
            "target_path",
        ),
        (
            "target inside the staging path",
            publish(&m, &sm, &format!("{sm}/sub"), multi.clone()),
            InvalidArgument,
            "target_path",
        ),
        (
            "staging path inside the target",
            publish(&m, &sm, &p(&co), multi.clone()),
            InvalidArgument,
            "target_path",
        ),
        (
            "target a file, mount access",
            publish(&m, &sm, &afile, multi.clone()),
            FailedPrecondition,
            "target_path",
        ),
        (
            "target a directory, block access",
            publish(&b, &sb, &adir, block.clone()),
            FailedPrecondition,
            "directory",
        ),
        (
            "target a FIFO",
            publish(&m, &sm, &fifo, multi.clone()),
            FailedPrecondition,
            "target_path",
        ),
        (
            "target a directory that is not empty",
            publish(&m, &sm, &fulldir, multi.clone()),
            FailedPrecondition,
            "not empty",
        ),
        (
            "block target a file that is not empty",
            publish(&b, &sb, &afile, block.clone()),
            FailedPrecondition,
            "not empty",
        ),
        (
            "target a FIFO, block",
            publish(&b, &sb, &fifo, block.clone()),
            FailedPrecondition,
            "target_path",
        ),
        (
            "target a symlink",
            publish(&m, &sm, &link_dir, multi.clone()),
            FailedPrecondition,
            "symbolic link",
        ),
        (
            "target without a parent",
            publish(&m, &sm, &no_parent, multi.clone()),
            FailedPrecondition,
            "parent",
        ),
        (
            "block target without a parent",
            publish(&b, &sb, &no_parent, block.clone()),
            FailedPrecondition,
            "parent",
        ),
        (
            "target through a link to /proc",
            publish(&m, &sm, &via_proc, multi.clone()),
            InvalidArgument,
            "/proc",
        ),
        (
            "target through a link into kura's state",
            publish(&m, &sm, &via_state, multi.clone()),
            InvalidArgument,
            "target_path",
        ),
        (
            "target is another volume's publication",
            publish(&m, &sm, &tb, multi.clone()),
            FailedPrecondition,
            "mount point",
        ),
        (
            "volume not staged",
            publish(&u, &adir, &new_target, single.clone()),
            FailedPrecondition,
            "not staged",
        ),
        (
            "other staging path",
            publish(&m, &ss, &new_target, multi.clone()),
            FailedPrecondition,
            "staged at",
        ),
        (
            "mount volume as block",
            publish(&m, &sm, &new_target, block.clone()),
            FailedPrecondition,
            "cannot be published",
        ),
        (
            "block volume as mount",
            publish(&b, &sb, &new_target, multi.clone()),
            FailedPrecondition,
            "cannot be published",
        ),
        (
            "another fs_type",
            publish(
                &m,
                &sm,
                &new_target,
                mode_cap(mount_access("xfs", &[]), Mode::SingleNodeMultiWriter),
            ),
            FailedPrecondition,
            "cannot be published",
        ),
        (
            "multi-node mode",
            publish(
                &m,
                &sm,
                &new_target,
                mode_cap(mount_access("", &[]), Mode::MultiNodeMultiWriter),
            ),
            FailedPrecondition,
            "volume_capability",
        ),
        (
            "flag suid",
            publish(&m, &sm, &new_target, flags_cap(&["suid"])),
            InvalidArgument,
            "mount_flags",
        ),
        (
            "second target of a single-writer volume",
            publish(&s, &ss, &new_target, single.clone()),
            FailedPrecondition,
            "one target",
        ),
        (
            "same target, read-only this time",
            proto::NodePublishVolumeRequest {
                readonly: true,
                ..publish(&m, &sm, &tm, multi.clone())
            },
            AlreadyExists,
            "other arguments",
        ),
        (
            "same target, same arguments",
            publish(&m, &sm, &tm, multi.clone()),
            Ok,
            "",
        ),
        (
            "same block target, same arguments",
            publish(&b, &sb, &tb, block.clone()),
            Ok,
            "",
        ),
        (
            "unknown volume",
            publish(UNKNOWN_VOLUME, &sm, &new_target, multi.clone()),
            NotFound,
            UNKNOWN_VOLUME,
        ),
        (
            "malformed volume",
            publish("vol-🦀", &sm, &new_target, multi.clone()),
            NotFound,
            "volume_id",
        ),
        (
            "secrets over 4 KiB",
            proto::NodePublishVolumeRequest {
                secrets: big_map(),
                ..publish(&m, &sm, &new_target, multi.clone())
            },
            InvalidArgument,
            "secrets",
        ),
        (
            "publish_context over 4 KiB",
            proto::NodePublishVolumeRequest {
                publish_context: big_map(),
                ..publish(&m, &sm, &new_target, multi.clone())
            },
            InvalidArgument,
            "publish_context",
        ),
    ];
    for (what, request, code, names) in publish_rows {
        t.add(
            format!("NodePublishVolume: {what}"),
            Call::Publish(request),
            code,
            names,
        );
    }

    // NodeUnpublishVolume: only a recorded publication of the volume is touched.
    let unpublish_rows: Vec<(&str, proto::NodeUnpublishVolumeRequest, Code, &str)> = vec![
        (
            "no volume ID",
            unpublish("", &tm),
            InvalidArgument,
            "volume_id",
        ),
        (
            "no target",
            unpublish(&m, ""),
            InvalidArgument,
            "target_path",
        ),
        (
            "no target, unknown volume",
            unpublish(UNKNOWN_VOLUME, ""),
            InvalidArgument,
            "target_path",
        ),
        (
            "unknown volume",
            unpublish(UNKNOWN_VOLUME, &tm),
            NotFound,
            UNKNOWN_VOLUME,
        ),
        (
            "malformed volume",
            unpublish("vol-x", &tm),
            NotFound,
            "volume_id",
        ),
        ("the volume's staging path", unpublish(&m, &sm), Ok, ""),
        (
            "the block volume's staging path",
            unpublish(&b, &sb),
            Ok,
            "",
        ),
        (
            "a non-empty directory kura did not make",
            unpublish(&m, &fulldir),
            Ok,
            "",
        ),
        (
            "an empty directory kura did not make",
            unpublish(&m, &adir),
            Ok,
            "",
        ),
        ("a file", unpublish(&b, &afile), Ok, ""),
        ("a FIFO", unpublish(&m, &fifo), Ok, ""),
        ("a symlink", unpublish(&m, &link_dir), Ok, ""),
        ("another volume's publication", unpublish(&m, &tb), Ok, ""),
        (
            "another volume's publication, same mode",
            unpublish(&m, &ts),
            Ok,
            "",
        ),
        ("another volume's staging path", unpublish(&m, &ss), Ok, ""),
        (
            "a path that does not exist",
            unpublish(&m, &missing),
            Ok,
            "",
        ),
        ("an unstaged volume", unpublish(&u, &tm), Ok, ""),
    ];
    for (what, request, code, names) in unpublish_rows {
        t.add(
            format!("NodeUnpublishVolume: {what}"),
            Call::Unpublish(request),
            code,
            names,
        );
    }

    // NodeGetVolumeStats.
    let stats_rows: Vec<(&str, proto::NodeGetVolumeStatsRequest, Code, &str)> = vec![
        ("no volume ID", stats("", &tm), InvalidArgument, "volume_id"),
        (
            "no volume path",
            stats(&m, ""),
            InvalidArgument,
            "volume_path",
        ),
        (
            "no volume path, unknown volume",
            stats(UNKNOWN_VOLUME, ""),
            InvalidArgument,
            "volume_path",
        ),
        (
            "unknown volume",
            stats(UNKNOWN_VOLUME, &tm),
            NotFound,
            UNKNOWN_VOLUME,
        ),
        (
            "malformed volume",
            stats("vol-x", &tm),
            NotFound,
            "volume_id",
        ),
        (
            "csi-sanity's some/path",
            stats(&m, "some/path"),
            NotFound,
            "volume_path",
        ),
        (
            "another volume's target",
            stats(&m, &tb),
            NotFound,
            "volume path",
        ),
        (
            "a directory kura did not make",
            stats(&m, &fulldir),
            NotFound,
            "volume path",
        ),
        (
            "under /proc",
            stats(&m, "/proc/self"),
            NotFound,
            "volume_path",
        ),
        (
            "a malformed staging path",
            proto::NodeGetVolumeStatsRequest {
                staging_target_path: "relative".into(),
                ..stats(&m, &tm)
            },
            InvalidArgument,
            "staging_target_path",
        ),
        ("the volume's target", stats(&m, &tm), Ok, ""),
        ("the volume's staging path", stats(&m, &sm), Ok, ""),
        ("the block volume's target", stats(&b, &tb), Ok, ""),
        (
            "the block volume's staging path: nothing of it is there",
            stats(&b, &sb),
            NotFound,
            "volume path",
        ),
    ];
    for (what, request, code, names) in stats_rows {
        t.add(
            format!("NodeGetVolumeStats: {what}"),
            Call::Stats(request),
            code,
            names,
        );
    }

    // NodeExpandVolume.
    let expand_cap = |cap: proto::VolumeCapability| proto::NodeExpandVolumeRequest {
        volume_capability: Some(cap),
        ..node_expand(&m, &tm, 0, 0)
    };
    let expand_rows: Vec<(&str, proto::NodeExpandVolumeRequest, Code, &str)> = vec![
        (
            "no volume ID",
            node_expand("", &tm, 0, 0),
            InvalidArgument,
            "volume_id",
        ),
        (
            "no volume path",
            node_expand(&m, "", 0, 0),
            InvalidArgument,
            "volume_path",
        ),
        (
            "unknown volume",
            node_expand(UNKNOWN_VOLUME, &tm, 0, 0),
            NotFound,
            UNKNOWN_VOLUME,
        ),
        (
            "malformed volume",
            node_expand("vol-x", &tm, 0, 0),
            NotFound,
            "volume_id",
        ),
        (
            "csi-sanity's some/path",
            node_expand(&m, "some/path", 0, 0),
            NotFound,
            "volume_path",
        ),
        (
            "another volume's target",
            node_expand(&m, &tb, 0, 0),
            NotFound,
            "volume path",
        ),
        (
            "negative required",
            node_expand(&m, &tm, -1, 0),
            InvalidArgument,
            "required_bytes",
        ),
        (
            "negative limit",
            node_expand(&m, &tm, 0, -1),
            InvalidArgument,
            "limit_bytes",
        ),
        (
            "beyond the volume's size",
            node_expand(&m, &tm, 2 * SIZE, 0),
            OutOfRange,
            "capacity_range",
        ),
        (
            "required i64::MAX",
            node_expand(&m, &tm, i64::MAX, 0),
            OutOfRange,
            "capacity_range",
        ),
        (
            "block beyond its size",
            node_expand(&b, &tb, SIZE + 1, 0),
            OutOfRange,
            "capacity_range",
        ),
        (
            "limit below the size",
            node_expand(&m, &tm, 0, SIZE / 2),
            OutOfRange,
            "capacity_range",
        ),
        (
            "required above limit",
            node_expand(&m, &tm, SIZE, SIZE / 2),
            OutOfRange,
            "capacity_range",
        ),
        (
            "multi-node capability",
            expand_cap(mode_cap(mount_access("", &[]), Mode::MultiNodeMultiWriter)),
            InvalidArgument,
            "volume_capability",
        ),
        (
            "multi-node capability, unknown volume",
            proto::NodeExpandVolumeRequest {
                volume_id: UNKNOWN_VOLUME.into(),
                ..expand_cap(mode_cap(block_access(), Mode::MultiNodeSingleWriter))
            },
            InvalidArgument,
            "volume_capability",
        ),
        (
            "capability without access_type",
            expand_cap(no_access_type()),
            InvalidArgument,
            "access_type",
        ),
        (
            "a malformed staging path",
            proto::NodeExpandVolumeRequest {
                staging_target_path: "/proc/1".into(),
                ..node_expand(&m, &tm, 0, 0)
            },
            InvalidArgument,
            "staging_target_path",
        ),
        (
            "secrets over 4 KiB",
            proto::NodeExpandVolumeRequest {
                secrets: big_map(),
                ..node_expand(&m, &tm, 0, 0)
            },
            InvalidArgument,
            "secrets",
        ),
        ("to the size it has", node_expand(&m, &tm, SIZE, 0), Ok, ""),
        (
            "the block volume's staging path",
            node_expand(&b, &sb, 0, 0),
            NotFound,
            "volume path",
        ),
    ];
    for (what, request, code, names) in expand_rows {
        t.add(
            format!("NodeExpandVolume: {what}"),
            Call::NodeExpand(request),
            code,
            names,
        );
    }

    t.add("NodeGetCapabilities", Call::NodeCapabilities, Ok, "");
    t.add("NodeGetInfo", Call::NodeInfo, Ok, "");
    // The controller side of a volume in use on the node.
    t.add(
        "DeleteVolume of a staged volume",
        Call::DeleteVolume(proto::DeleteVolumeRequest {
            volume_id: m.clone(),
            ..Default::default()
        }),
        FailedPrecondition,
        &m,
    );
    t.add(
        "CreateSnapshot with a banned name, of a staged volume",
        Call::CreateSnapshot(snapshot("snap\u{2}", &m)),
        InvalidArgument,
        "name",
    );

    let count = run_table(&driver, t).await;
    assert!(count >= 150, "the node corpus has only {count} rows");
    eprintln!("node: {count} rows");

    // The fixtures still come apart cleanly: nothing above disturbed them.
    for (id, staging, target) in [(&m, &sm, &tm), (&s, &ss, &ts), (&b, &sb, &tb)] {
        driver
            .unpublish_and_unstage(id, Path::new(staging), Path::new(target))
            .await;
        assert!(!Path::new(target).exists(), "{target} left behind");
        assert!(
            Path::new(staging).is_dir(),
            "the CO's {staging} was removed"
        );
    }
}

// ---------------------------------------------------------------------------------
// What one request cannot show
// ---------------------------------------------------------------------------------

fn mounts_at(path: &Path) -> Vec<kura::sys::mountinfo::MountEntry> {
    kura::sys::mountinfo::read()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point == path)
        .collect()
}

fn record_of(driver: &Driver, id: &str) -> serde_json::Value {
    let path = driver.path("state/attachments").join(format!("{id}.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// 16 identical publishes at once, on a volume staged and then "unstaged" at a path
/// that is not its staging path (which once dropped its record and made every publish
/// FAILED_PRECONDITION): at least one OK, the others OK or ABORTED, and one clean
/// publication afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_identical_publishes_make_one_publication() {
    let driver = Driver::start().await;
    for (name, cap) in [
        ("pvc-race-mount", mount_cap("ext4")),
        ("pvc-race-block", block_cap()),
    ] {
        let id = driver.create_volume(name, SIZE, &[]).await.volume_id;
        let staging = driver.path(&format!("stage-{name}"));
        std::fs::create_dir(&staging).unwrap();
        let target = driver.path(&format!("target-{name}"));
        let mut node = driver.node();
        node.node_stage_volume(stage_request(&id, &staging, &cap))
            .await
            .unwrap();
        node.node_unstage_volume(proto::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: p(&driver.path("elsewhere")),
        })
        .await
        .expect("an unstage at another path is OK");
        let calls: Vec<_> = (0..16)
            .map(|_| {
                let mut node = driver.node();
                let request = publish_request(&id, &staging, &target, &cap, false);
                tokio::spawn(async move { node.node_publish_volume(request).await })
            })
            .collect();
        let mut codes = Vec::new();
        for call in calls {
            codes.push(match call.await.unwrap() {
                Result::Ok(_) => Code::Ok,
                Err(status) => {
                    assert_eq!(status.code(), Code::Aborted, "{name}: {}", status.message());
                    Code::Aborted
                }
            });
        }
        assert!(
            codes.contains(&Code::Ok),
            "{name}: no publish succeeded: {codes:?}"
        );
        assert_eq!(
            mounts_at(&target).len(),
            1,
            "{name}: not one bind mount at the target"
        );
        let record = record_of(&driver, &id);
        let targets = record["targets"].as_object().unwrap();
        assert_eq!(targets.len(), 1, "{name}: {record}");
        assert!(targets.contains_key(&p(&target)), "{name}: {record}");
        assert_eq!(record["staging_path"], p(&staging));
        // And it comes apart cleanly.
        driver.unpublish_and_unstage(&id, &staging, &target).await;
        assert!(!target.exists());
        assert!(mounts_at(&staging).is_empty());
        assert!(staging.is_dir(), "the CO's staging directory was removed");
    }
}

/// Volumes are mounted nosuid,nodev whatever the flags, publications keep that (also
/// read-only ones), a block publication stays a usable device, and paths are left as
/// the CO made them: a stage and unstage with flags leave the CO's directory as it
/// was; one kura made is removed again; a failed stage leaves no directory behind.
#[tokio::test(flavor = "multi_thread")]
async fn mounts_are_hardened_and_paths_left_as_found() {
    let driver = Driver::start().await;
    let id = driver
        .create_volume("pvc-hardened", SIZE, &[])
        .await
        .volume_id;
    let cap = mode_cap(
        mount_access("ext4", &["noatime", "exec", "nosuid", "lazytime"]),
        Mode::SingleNodeMultiWriter,
    );
    let staging = driver.path("stage");
    std::fs::create_dir(&staging).unwrap();
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o750)).unwrap();
    let before = describe(&staging);
    let mut node = driver.node();
    node.node_stage_volume(stage_request(&id, &staging, &cap))
        .await
        .unwrap();
    let staged = &mounts_at(&staging)[0];
    for option in ["nosuid", "nodev", "noatime"] {
        assert!(
            staged.options.iter().any(|o| o == option),
            "{option}: {staged:?}"
        );
    }
    let (rw, ro) = (driver.path("target-rw"), driver.path("target-ro"));
    for (target, readonly) in [(&rw, false), (&ro, true)] {
        node.node_publish_volume(publish_request(&id, &staging, target, &cap, readonly))
            .await
            .unwrap();
        let bind = &mounts_at(target)[0];
        for option in ["nosuid", "nodev"] {
            assert!(
                bind.options.iter().any(|o| o == option),
                "{option}: {bind:?}"
            );
        }
        assert_eq!(bind.is_read_only(), readonly, "{bind:?}");
    }
    for target in [&rw, &ro] {
        node.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: p(target),
        })
        .await
        .unwrap();
        assert!(!target.exists());
    }
    // A target the CO made stays after unpublish; one kura made whose mount is gone
    // (a crash, a reboot) is still a recorded publication: unpublish removes it.
    let by_the_co = driver.path("target-by-the-co");
    std::fs::create_dir(&by_the_co).unwrap();
    let crashed = driver.path("target-crashed");
    for target in [&by_the_co, &crashed] {
        node.node_publish_volume(publish_request(&id, &staging, target, &cap, false))
            .await
            .unwrap();
    }
    kura::sys::mount::unmount(&crashed).unwrap();
    for target in [&by_the_co, &crashed] {
        node.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: p(target),
        })
        .await
        .unwrap();
        assert!(mounts_at(target).is_empty());
    }
    assert!(by_the_co.is_dir(), "unpublish removed the CO's target");
    assert!(!crashed.exists(), "unpublish left the target kura made");
    let targets = record_of(&driver, &id)["targets"]
        .as_object()
        .unwrap()
        .len();
    assert_eq!(targets, 0, "publications left in the record");
    // A publication whose mount is gone when the volume is unstaged: the unstage
    // removes the target kura made for it.
    let left_over = driver.path("target-left-over");
    node.node_publish_volume(publish_request(&id, &staging, &left_over, &cap, false))
        .await
        .unwrap();
    kura::sys::mount::unmount(&left_over).unwrap();
    node.node_unstage_volume(proto::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: p(&staging),
    })
    .await
    .unwrap();
    assert_eq!(
        describe(&staging),
        before,
        "the CO's staging directory changed"
    );
    assert!(!left_over.exists(), "unstage left a target kura made");

    // A staging directory kura had to make is gone again after the unstage; the parent
    // it needed was the CO's.
    let made = driver.path("stage-made-by-kura");
    node.node_stage_volume(stage_request(&id, &made, &cap))
        .await
        .unwrap();
    assert!(!mounts_at(&made).is_empty());
    node.node_unstage_volume(proto::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: p(&made),
    })
    .await
    .unwrap();
    assert!(!made.exists(), "kura left the staging directory it made");

    // A stage whose mount fails (ext4 refuses journal_async_commit in its default
    // data=ordered mode) leaves neither the directory it made nor a loop device.
    let failing = driver.path("stage-failing");
    let refused = node
        .node_stage_volume(stage_request(
            &id,
            &failing,
            &mode_cap(
                mount_access("ext4", &["journal_async_commit"]),
                Mode::SingleNodeWriter,
            ),
        ))
        .await
        .unwrap_err();
    assert_ne!(refused.code(), Code::Ok);
    assert!(!failing.exists(), "a failed stage left {failing:?}");
    let image = driver.pool_root().join("volumes").join(format!("{id}.img"));
    assert_eq!(kura::sys::loopdev::find_by_backing(&image).unwrap(), None);

    // Block: the publication is nosuid but must stay a device one can open.
    let block_id = driver
        .create_volume("pvc-hardened-block", SIZE, &[])
        .await
        .volume_id;
    let (staging, device) = driver
        .stage_and_publish(&block_id, &block_cap(), "block")
        .await;
    let bind = &mounts_at(&device)[0];
    assert!(bind.options.iter().any(|o| o == "nosuid"), "{bind:?}");
    write_at(&device, 4096, &pattern(7, 4096));
    assert_eq!(read_at(&device, 4096, 4096), pattern(7, 4096));
    driver
        .unpublish_and_unstage(&block_id, &staging, &device)
        .await;
}

/// NodeExpandVolume goes as far as ControllerExpandVolume went, and no further: a
/// larger `required_bytes` is OUT_OF_RANGE and the device keeps its size.
#[tokio::test(flavor = "multi_thread")]
async fn node_expansion_stops_at_the_controllers_size() {
    let driver = Driver::start().await;
    let id = driver.create_volume("pvc-grow", SIZE, &[]).await.volume_id;
    let cap = block_cap();
    let (staging, target) = driver.stage_and_publish(&id, &cap, "grow").await;
    let grown = driver
        .controller()
        .controller_expand_volume(controller_expand(&id, 2 * SIZE, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 2 * SIZE);
    let mut node = driver.node();
    let beyond = node
        .node_expand_volume(node_expand(&id, &p(&target), 3 * SIZE, 0))
        .await
        .unwrap_err();
    assert_eq!(beyond.code(), Code::OutOfRange, "{}", beyond.message());
    assert_eq!(
        kura::sys::blockdev::size(&target).unwrap(),
        SIZE as u64,
        "a refused node expansion grew the device"
    );
    let done = node
        .node_expand_volume(node_expand(&id, &p(&target), 2 * SIZE, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.capacity_bytes, 2 * SIZE);
    assert_eq!(kura::sys::blockdev::size(&target).unwrap(), 2 * SIZE as u64);
    driver.unpublish_and_unstage(&id, &staging, &target).await;
}
