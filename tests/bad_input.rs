//! Hostile and malformed requests over every RPC, against the real server on its socket
//! with real loop devices and mounts: each row of the tables is a request and the code
//! it must get, and every row is checked the same way for "nothing changed": the files
//! under the state directory (pool and attachment records), the mounts and loop devices
//! under the test directory, and every path the request names are the same after the
//! call as before it.
//!
//! Every bad input of the suite is a row here. The classes covered: missing fields,
//! for volumes that exist and for IDs that name nothing; names with the control
//! characters CSI bans; sizes no pool can serve (OUT_OF_RANGE) against a pool that is
//! merely too full (RESOURCE_EXHAUSTED); mutable parameters kura does not offer; access types as part of a name's
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

const REPLICAS: &str = "kura.csi.dev/replicas";
const REPLICATION_INTERVAL: &str = "kura.csi.dev/replication-interval";

/// Volume IDs kura could not have issued.
const MALFORMED_IDS: [&str; 8] = [
    MALFORMED_ID,
    "vol-../../etc/passwd",
    "vol-0123456789abcdef0123456789abcdef-../x",
    "vol-0123456789ABCDEF0123456789abcdef-test-node",
    "vol-0123456789abcdef0123456789abcdef-test-node\0",
    "vol-🦀",
    "/etc/passwd",
    "vol-0123456789abcdef0123456789abcdef-test-node\n",
];

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

/// One row: a request, the code it must get, and (for errors) the words the message
/// must contain: the field at fault, or the object.
struct Row {
    what: String,
    call: Call,
    want: Code,
    names: Vec<String>,
}

#[derive(Default)]
struct Table(Vec<Row>);

impl Table {
    /// A row whose message must name `names` (nothing, if it is empty).
    fn add(&mut self, what: impl Into<String>, call: Call, want: Code, names: &str) {
        self.add_naming(what, call, want, &[names]);
    }

    /// A row whose message must name every one of `names`.
    fn add_naming(&mut self, what: impl Into<String>, call: Call, want: Code, names: &[&str]) {
        self.0.push(Row {
            what: what.into(),
            call,
            want,
            names: names
                .iter()
                .filter(|n| !n.is_empty())
                .map(|n| n.to_string())
                .collect(),
        });
    }
}

fn flags_cap(flags: &[&str]) -> proto::VolumeCapability {
    cap_with_mode(mount_access("", flags), Mode::SingleNodeWriter)
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

/// A map of more than CSI's 4 KiB.
fn big_map() -> HashMap<String, String> {
    string_map(&[("csi.storage.k8s.io/big", &"v".repeat(5000))])
}

fn create_with(
    name: &str,
    edit: impl FnOnce(&mut proto::CreateVolumeRequest),
) -> proto::CreateVolumeRequest {
    let mut request = create_request(name, SIZE, &[], None);
    edit(&mut request);
    request
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
            for needle in row.names.iter().filter(|n| !message.contains(n.as_str())) {
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
    let mut block_request = create_request("fx-block", SIZE, &[], None);
    block_request.volume_capabilities = vec![block_cap()];
    let block_vol = driver
        .create(block_request.clone())
        .await
        .unwrap()
        .volume_id;
    let snap = driver
        .create_snapshot("fx-snap", &mount_vol)
        .await
        .snapshot_id;
    // Leaves 6 of the pool's 16 GiB free: too little for 8 GiB, thin or thick.
    driver
        .create_volume("fx-filler", 10 * GIB, &[(PROVISIONING, "thick")])
        .await;

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
        Call::CreateVolume(create_request("", SIZE, &[], None)),
        InvalidArgument,
        "name",
    );
    t.add(
        "name of 129 bytes",
        Call::CreateVolume(create_request(&"n".repeat(129), SIZE, &[], None)),
        InvalidArgument,
        "name",
    );
    t.add(
        "name of 43 crabs (172 bytes)",
        Call::CreateVolume(create_request(&"🦀".repeat(43), SIZE, &[], None)),
        InvalidArgument,
        "name",
    );
    for c in [
        '\u{0}', '\u{7}', '\u{8}', '\u{b}', '\u{c}', '\u{e}', '\u{1b}', '\u{1f}', '\u{7f}',
        '\u{85}', '\u{9f}',
    ] {
        t.add(
            format!("name with U+{:04X}", c as u32),
            Call::CreateVolume(create_request(&format!("pvc-{c}-bad"), SIZE, &[], None)),
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
        (
            "no access_type",
            no_access_type(),
            "volume_capabilities[0].access_type",
        ),
        ("no access_mode", no_access_mode(), "access_mode"),
        (
            "access mode UNKNOWN",
            raw_mode(Mode::Unknown as i32),
            "access_mode",
        ),
        ("access mode 99", raw_mode(99), "access_mode"),
        ("access mode -1", raw_mode(-1), "access_mode"),
        (
            "MULTI_NODE_READER_ONLY block",
            cap_with_mode(block_access(), Mode::MultiNodeReaderOnly),
            "MULTI_NODE_READER_ONLY",
        ),
        (
            "MULTI_NODE_SINGLE_WRITER",
            cap_with_mode(mount_access("", &[]), Mode::MultiNodeSingleWriter),
            "MULTI_NODE_SINGLE_WRITER",
        ),
        (
            "fs_type ntfs",
            cap_with_mode(mount_access("ntfs", &[]), Mode::SingleNodeWriter),
            "ntfs",
        ),
        (
            "fs_type a path",
            cap_with_mode(mount_access("../../bin/sh", &[]), Mode::SingleNodeWriter),
            "fs_type",
        ),
        (
            "volume_mount_group",
            cap_with_mode(
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
            cap_with_mode(mount_access("ext4", &["nouuid"]), Mode::SingleNodeWriter),
            "ext4",
        ),
        (
            "data=journal for xfs",
            cap_with_mode(
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
    t.add_naming(
        "CreateVolume: MULTI_NODE_MULTI_WRITER",
        Call::CreateVolume(create_with("pvc-cap", |r| {
            r.volume_capabilities = vec![cap_with_mode(
                mount_access("", &[]),
                Mode::MultiNodeMultiWriter,
            )]
        })),
        InvalidArgument,
        &["volume_capabilities", "MULTI_NODE_MULTI_WRITER"],
    );
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
        ("more than the 16 GiB pool", POOL_SIZE + GIB, 0, OutOfRange),
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
            r.capacity_range = range(POOL_SIZE + GIB, 0);
            r.parameters = string_map(&[(PROVISIONING, "thick")]);
        })),
        OutOfRange,
        "capacity_range",
    );
    // What no pool could hold is OUT_OF_RANGE; what this one cannot hold now, beside
    // the filler, is RESOURCE_EXHAUSTED.
    for (name, size, provisioning, code) in [
        ("pvc-huge-thick", 64 * GIB, "thick", OutOfRange),
        ("pvc-huge-thin", 64 * GIB, "thin", OutOfRange),
        ("pvc-full-thick", 8 * GIB, "thick", ResourceExhausted),
        ("pvc-full-thin", 8 * GIB, "thin", ResourceExhausted),
    ] {
        t.add(
            format!("CreateVolume: {name}"),
            Call::CreateVolume(create_request(
                name,
                size,
                &[(PROVISIONING, provisioning)],
                None,
            )),
            code,
            "",
        );
    }

    // CreateVolume: parameters, mutable parameters, secrets.
    for (what, params, names) in [
        (
            "unknown parameter",
            string_map(&[("colour", "blue")]),
            "colour",
        ),
        (
            "provisioning empty",
            string_map(&[(PROVISIONING, "")]),
            PROVISIONING,
        ),
        ("key with a NUL", string_map(&[("a\0b", "x")]), "parameters"),
        (
            "key that is a path",
            string_map(&[("../../etc", "x")]),
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
    t.add_naming(
        "CreateVolume: provisioning fat",
        Call::CreateVolume(create_with("pvc-param", |r| {
            r.parameters = string_map(&[(PROVISIONING, "fat")])
        })),
        InvalidArgument,
        &[PROVISIONING, "fat"],
    );
    // Replication: copies from 0 to 2, an interval of at least 5 s; refused in the
    // parameters, in the mutable parameters, and by ControllerModifyVolume.
    for (key, bad) in [
        (REPLICAS, "3"),
        (REPLICAS, "-1"),
        (REPLICAS, "two"),
        (REPLICAS, ""),
        (REPLICATION_INTERVAL, "4s"),
        (REPLICATION_INTERVAL, "0"),
        (REPLICATION_INTERVAL, "1d"),
        (REPLICATION_INTERVAL, "s"),
        (REPLICATION_INTERVAL, "99999999999999999999h"),
    ] {
        let pairs = [(key, bad), (REPLICAS, "1")];
        // The other key, where the bad one is not it, is good: only the bad one is named.
        let pairs = if key == REPLICAS {
            &pairs[..1]
        } else {
            &pairs[..]
        };
        t.add_naming(
            format!("CreateVolume: parameters {key} {bad:?}"),
            Call::CreateVolume(create_with("pvc-replicated", |r| {
                r.parameters = string_map(pairs)
            })),
            InvalidArgument,
            &[&format!("parameters[{key}]")],
        );
        t.add_naming(
            format!("CreateVolume: mutable_parameters {key} {bad:?}"),
            Call::CreateVolume(create_with("pvc-replicated", |r| {
                r.mutable_parameters = string_map(pairs)
            })),
            InvalidArgument,
            &[&format!("mutable_parameters[{key}]")],
        );
        t.add_naming(
            format!("ControllerModifyVolume: {key} {bad:?}"),
            Call::Modify(proto::ControllerModifyVolumeRequest {
                volume_id: mount_vol.clone(),
                mutable_parameters: string_map(pairs),
                ..Default::default()
            }),
            InvalidArgument,
            &[&format!("mutable_parameters[{key}]")],
        );
    }
    t.add(
        "an unknown mutable parameter",
        Call::CreateVolume(create_with("pvc-mutable", |r| {
            r.mutable_parameters = string_map(&[("iops", "100")])
        })),
        InvalidArgument,
        "mutable_parameters",
    );
    t.add(
        "mutable_parameters with a sidecar key",
        Call::CreateVolume(create_with("pvc-mutable", |r| {
            r.mutable_parameters = string_map(&[("csi.storage.k8s.io/pvc/name", "x")])
        })),
        InvalidArgument,
        "mutable_parameters",
    );
    t.add(
        "mutable_parameters on an existing name",
        Call::CreateVolume(create_with("fx-mount", |r| {
            r.mutable_parameters = string_map(&[("iops", "100")])
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
            "snapshot ID of no form of kura's",
            snapshot_source(MALFORMED_ID),
            NotFound,
            MALFORMED_ID,
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
            "volume ID of no form of kura's",
            volume_source(MALFORMED_ID),
            NotFound,
            MALFORMED_ID,
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
        Call::CreateVolume(clone_request("pvc-small-clone", SIZE / 2, &mount_vol)),
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
        segments: string_map(&[(key, value)]),
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
        Call::CreateVolume(create_request("fx-block", SIZE, &[], None)),
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
        Call::CreateVolume(restore_request("fx-mount", SIZE, &snap)),
        AlreadyExists,
        "fx-mount",
    );
    t.add(
        "existing volume asked the same",
        Call::CreateVolume(create_request("fx-mount", SIZE, &[], None)),
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
            r.parameters = string_map(&[("csi.storage.k8s.io/x", &"x".repeat(5 << 20))])
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
            Call::DeleteVolume(delete_volume_request(id)),
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
            ..validate_request(&mount_vol, vec![mount_cap("")])
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
            mutable_parameters: string_map(&[("iops", "1")]),
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
        Call::Validate(validate_request("", vec![mount_cap("")])),
        InvalidArgument,
        "volume_id",
    );
    t.add(
        "Validate without capabilities, unknown ID",
        Call::Validate(validate_request(UNKNOWN_VOLUME, vec![])),
        InvalidArgument,
        "volume_capabilities",
    );
    t.add(
        "Validate a capability without access_type",
        Call::Validate(validate_request(&mount_vol, vec![no_access_type()])),
        InvalidArgument,
        "access_type",
    );
    t.add(
        "Validate a refused flag",
        Call::Validate(validate_request(&mount_vol, vec![flags_cap(&["suid"])])),
        InvalidArgument,
        "mount_flags",
    );
    t.add(
        "Validate an unknown volume",
        Call::Validate(validate_request(UNKNOWN_VOLUME, vec![mount_cap("")])),
        NotFound,
        UNKNOWN_VOLUME,
    );
    t.add(
        "Validate a malformed volume",
        Call::Validate(validate_request("vol-../x", vec![mount_cap("")])),
        NotFound,
        "volume_id",
    );
    for id in [UNKNOWN_VOLUME, MALFORMED_ID, FOREIGN_VOLUME] {
        t.add(
            format!("Validate {id:?}, two capabilities"),
            Call::Validate(validate_request(id, vec![mount_cap("ext4"), mount_cap("")])),
            NotFound,
            "",
        );
    }
    t.add(
        "Validate without capabilities, a volume that exists",
        Call::Validate(validate_request(&mount_vol, vec![])),
        InvalidArgument,
        "volume_capabilities",
    );
    for (what, request) in [
        (
            "multi-node mode",
            validate_request(
                &mount_vol,
                vec![cap_with_mode(
                    mount_access("", &[]),
                    Mode::MultiNodeMultiWriter,
                )],
            ),
        ),
        (
            "block for a mount volume",
            validate_request(&mount_vol, vec![block_cap()]),
        ),
        (
            "mount for a block volume",
            validate_request(&block_vol, vec![mount_cap("")]),
        ),
        (
            "mutable parameters",
            proto::ValidateVolumeCapabilitiesRequest {
                mutable_parameters: string_map(&[("iops", "1")]),
                ..validate_request(&mount_vol, vec![mount_cap("")])
            },
        ),
        (
            "unknown parameter",
            proto::ValidateVolumeCapabilitiesRequest {
                parameters: string_map(&[("colour", "blue")]),
                ..validate_request(&mount_vol, vec![mount_cap("")])
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
        ("garbage token, two a page", 2, "garbage", Aborted),
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
            parameters: string_map(params),
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
        "GetCapacity: unknown parameter, with a capability",
        capacity(vec![mount_cap("")], &[("colour", "blue")]),
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
            vec![cap_with_mode(block_access(), Mode::MultiNodeMultiWriter)],
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
            snapshot_request("s", ""),
            InvalidArgument,
            "source_volume_id",
        ),
        (
            "no name",
            snapshot_request("", &mount_vol),
            InvalidArgument,
            "name",
        ),
        (
            "no name, unknown source",
            snapshot_request("", UNKNOWN_VOLUME),
            InvalidArgument,
            "name",
        ),
        (
            "name with NUL",
            snapshot_request("snap\0", &mount_vol),
            InvalidArgument,
            "name",
        ),
        (
            "name with U+0001, unknown source",
            snapshot_request("s\u{1}", UNKNOWN_VOLUME),
            InvalidArgument,
            "name",
        ),
        (
            "name with U+009F",
            snapshot_request("s\u{9f}", &mount_vol),
            InvalidArgument,
            "U+009F",
        ),
        (
            "name of 129 bytes",
            snapshot_request(&"s".repeat(129), &mount_vol),
            InvalidArgument,
            "name",
        ),
        (
            "unknown source",
            snapshot_request("s", UNKNOWN_VOLUME),
            NotFound,
            UNKNOWN_VOLUME,
        ),
        (
            "malformed source",
            snapshot_request("s", "vol-../x"),
            NotFound,
            "source_volume_id",
        ),
        (
            "foreign source",
            snapshot_request("s", FOREIGN_VOLUME),
            NotFound,
            FOREIGN_VOLUME,
        ),
        (
            "a snapshot as source",
            snapshot_request("s", &snap),
            NotFound,
            "source_volume_id",
        ),
        (
            "existing name, other source",
            snapshot_request("fx-snap", &block_vol),
            AlreadyExists,
            "fx-snap",
        ),
        (
            "existing name, same source",
            snapshot_request("fx-snap", &mount_vol),
            Ok,
            "",
        ),
        (
            "unknown parameter",
            proto::CreateSnapshotRequest {
                parameters: string_map(&[("colour", "blue")]),
                ..snapshot_request("s", &mount_vol)
            },
            InvalidArgument,
            "colour",
        ),
        (
            "parameters over 4 KiB",
            proto::CreateSnapshotRequest {
                parameters: big_map(),
                ..snapshot_request("s", &mount_vol)
            },
            InvalidArgument,
            "parameters",
        ),
        (
            "secrets over 4 KiB",
            proto::CreateSnapshotRequest {
                secrets: big_map(),
                ..snapshot_request("s", &mount_vol)
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
            Call::DeleteSnapshot(delete_snapshot_request(id)),
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
        ..expand_request(id, 2 * SIZE, 0)
    };
    for (what, request, code, names) in [
        (
            "no ID",
            expand_request("", SIZE, 0),
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
            expand_request(&mount_vol, 0, 0),
            InvalidArgument,
            "capacity_range",
        ),
        (
            "negative required",
            expand_request(&mount_vol, -1, 0),
            InvalidArgument,
            "required_bytes",
        ),
        (
            "negative limit",
            expand_request(&mount_vol, 0, -1),
            InvalidArgument,
            "limit_bytes",
        ),
        (
            "unknown volume",
            expand_request(UNKNOWN_VOLUME, 2 * SIZE, 0),
            NotFound,
            UNKNOWN_VOLUME,
        ),
        (
            "malformed volume",
            expand_request("vol-x", 2 * SIZE, 0),
            NotFound,
            "volume_id",
        ),
        (
            "foreign volume",
            expand_request(FOREIGN_VOLUME, 2 * SIZE, 0),
            NotFound,
            FOREIGN_VOLUME,
        ),
        (
            "a shrink",
            expand_request(&mount_vol, 0, SIZE / 2),
            OutOfRange,
            "capacity_range",
        ),
        (
            "required above limit",
            expand_request(&mount_vol, 4 * SIZE, 2 * SIZE),
            OutOfRange,
            "capacity_range",
        ),
        (
            "required i64::MAX",
            expand_request(&mount_vol, i64::MAX, 0),
            OutOfRange,
            "capacity_range",
        ),
        (
            "required 2^62",
            expand_request(&mount_vol, 1 << 62, 0),
            OutOfRange,
            "capacity_range",
        ),
        (
            "more than the pool",
            expand_request(&mount_vol, POOL_SIZE + GIB, 0),
            OutOfRange,
            "capacity_range",
        ),
        (
            "MULTI_NODE_MULTI_WRITER capability",
            with_cap(
                cap_with_mode(mount_access("", &[]), Mode::MultiNodeMultiWriter),
                &mount_vol,
            ),
            InvalidArgument,
            "volume_capability",
        ),
        (
            "MULTI_NODE_READER_ONLY capability, unknown volume",
            with_cap(
                cap_with_mode(block_access(), Mode::MultiNodeReaderOnly),
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
                ..expand_request(&mount_vol, 2 * SIZE, 0)
            },
            InvalidArgument,
            "secrets",
        ),
        (
            "to the size it has",
            expand_request(&mount_vol, SIZE, 0),
            Ok,
            "",
        ),
        (
            "to less than it has",
            expand_request(&mount_vol, SIZE / 2, 0),
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
        (MALFORMED_ID, NotFound, ""),
        ("vol-../../etc/passwd", NotFound, "volume_id"),
        ("\0", NotFound, "volume_id"),
    ] {
        t.add(
            format!("ControllerGetVolume {id:?}"),
            Call::GetVolume(get_volume_request(id)),
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
    let multi = cap_with_mode(mount_access("ext4", &[]), Mode::SingleNodeMultiWriter);
    let single = cap_with_mode(mount_access("ext4", &[]), Mode::SingleNodeWriter);
    let block = cap_with_mode(block_access(), Mode::SingleNodeMultiWriter);
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
            Call::Stage(stage_request(&u, path, &single)),
            InvalidArgument,
            "staging_target_path",
        );
        t.add(
            format!("NodeStageVolume, staging path {what}, unknown volume"),
            Call::Stage(stage_request(UNKNOWN_VOLUME, path, &single)),
            InvalidArgument,
            "staging_target_path",
        );
        t.add(
            format!("NodePublishVolume, target path {what}"),
            Call::Publish(publish_request(&m, &sm, path, &multi, false)),
            InvalidArgument,
            "target_path",
        );
        t.add(
            format!("NodeUnpublishVolume, target path {what}"),
            Call::Unpublish(unpublish_request(&m, path)),
            InvalidArgument,
            "target_path",
        );
    }
    for (what, path) in bad_paths.iter().take(6) {
        t.add(
            format!("NodePublishVolume, staging path {what}"),
            Call::Publish(publish_request(&m, path, p(&at("t-new")), &multi, false)),
            InvalidArgument,
            "staging_target_path",
        );
        t.add(
            format!("NodeUnstageVolume, staging path {what}"),
            Call::Unstage(unstage_request(&m, path)),
            InvalidArgument,
            "staging_target_path",
        );
        // Stats and expansion: a path that cannot be one is not where the volume is.
        t.add(
            format!("NodeGetVolumeStats, volume path {what}"),
            Call::Stats(stats_request(&m, path)),
            NotFound,
            "volume_path",
        );
        t.add(
            format!("NodeExpandVolume, volume path {what}"),
            Call::NodeExpand(node_expand_request(&m, path, 0, 0)),
            NotFound,
            "volume_path",
        );
    }

    // NodeStageVolume.
    let stage_rows: Vec<(&str, proto::NodeStageVolumeRequest, Code, &str)> = vec![
        (
            "no volume ID",
            stage_request("", &adir, &single),
            InvalidArgument,
            "volume_id",
        ),
        (
            "flag suid",
            stage_request(&u, &adir, &flags_cap(&["suid"])),
            InvalidArgument,
            "mount_flags",
        ),
        (
            "flags over 4 KiB",
            stage_request(&u, &adir, &owned_flags_cap(vec!["sync".into(); 1000])),
            InvalidArgument,
            "mount_flags",
        ),
        (
            "an XFS-only flag for the default ext4",
            stage_request(&u, &adir, &flags_cap(&["nouuid"])),
            InvalidArgument,
            "mount_flags",
        ),
        (
            "multi-node mode",
            stage_request(
                &u,
                &adir,
                &cap_with_mode(mount_access("", &[]), Mode::MultiNodeMultiWriter),
            ),
            FailedPrecondition,
            "volume_capability",
        ),
        (
            "fs_type ntfs",
            stage_request(
                &u,
                &adir,
                &cap_with_mode(mount_access("ntfs", &[]), Mode::SingleNodeWriter),
            ),
            FailedPrecondition,
            "ntfs",
        ),
        (
            "XFS on a volume too small for it",
            stage_request(
                &u,
                &adir,
                &cap_with_mode(mount_access("xfs", &[]), Mode::SingleNodeWriter),
            ),
            FailedPrecondition,
            "too small",
        ),
        (
            "staging path a file",
            stage_request(&u, &afile, &single),
            FailedPrecondition,
            "staging_target_path",
        ),
        (
            "staging path a FIFO",
            stage_request(&u, &fifo, &single),
            FailedPrecondition,
            "staging_target_path",
        ),
        (
            "staging path a directory that is not empty",
            stage_request(&u, &fulldir, &single),
            FailedPrecondition,
            "not empty",
        ),
        (
            "staging path a symlink",
            stage_request(&u, &link_dir, &single),
            FailedPrecondition,
            "symbolic link",
        ),
        (
            "block staging path a file",
            stage_request(&u, &afile, &block),
            FailedPrecondition,
            "staging_target_path",
        ),
        (
            "staging path without a parent",
            stage_request(&u, &no_parent, &single),
            FailedPrecondition,
            "parent",
        ),
        (
            "staging path through a link to /proc",
            stage_request(&u, &via_proc, &single),
            InvalidArgument,
            "/proc",
        ),
        (
            "staging path through a link into kura's state",
            stage_request(&u, &via_state, &single),
            InvalidArgument,
            "staging_target_path",
        ),
        (
            "unknown volume",
            stage_request(UNKNOWN_VOLUME, &adir, &single),
            NotFound,
            UNKNOWN_VOLUME,
        ),
        (
            "malformed volume",
            stage_request("vol-../x", &adir, &single),
            NotFound,
            "volume_id",
        ),
        (
            "staged volume, other path",
            stage_request(&m, &adir, &multi),
            AlreadyExists,
            "already staged",
        ),
        (
            "staged volume, other capability",
            stage_request(&m, &sm, &block),
            AlreadyExists,
            "volume_capability",
        ),
        (
            "staged volume, other flags",
            stage_request(&m, &sm, &flags_cap(&["noatime"])),
            AlreadyExists,
            "",
        ),
        (
            "staged volume, same arguments",
            stage_request(&m, &sm, &multi),
            Ok,
            "",
        ),
        (
            "staged block volume, same arguments",
            stage_request(&b, &sb, &block),
            Ok,
            "",
        ),
        (
            "secrets over 4 KiB",
            proto::NodeStageVolumeRequest {
                secrets: big_map(),
                ..stage_request(&u, &adir, &single)
            },
            InvalidArgument,
            "secrets",
        ),
        (
            "volume_context over 4 KiB",
            proto::NodeStageVolumeRequest {
                volume_context: big_map(),
                ..stage_request(&u, &adir, &single)
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
            unstage_request("", &sm),
            InvalidArgument,
            "volume_id",
        ),
        (
            "no staging path",
            unstage_request(&m, ""),
            InvalidArgument,
            "staging_target_path",
        ),
        (
            "unknown volume",
            unstage_request(UNKNOWN_VOLUME, &adir),
            NotFound,
            UNKNOWN_VOLUME,
        ),
        (
            "malformed volume",
            unstage_request("vol-\0", &adir),
            NotFound,
            "volume_id",
        ),
        (
            "staged volume, another path: not staged there",
            unstage_request(&m, &adir),
            Ok,
            "",
        ),
        (
            "staged volume, another volume's staging path",
            unstage_request(&b, &sm),
            Ok,
            "",
        ),
        (
            "staged volume, a non-empty directory",
            unstage_request(&s, &fulldir),
            Ok,
            "",
        ),
        ("unstaged volume", unstage_request(&u, &adir), Ok, ""),
        (
            "staged volume still published",
            unstage_request(&m, &sm),
            FailedPrecondition,
            "published",
        ),
        (
            "staged block volume still published",
            unstage_request(&b, &sb),
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
            publish_request("", &sm, &new_target, &multi, false),
            InvalidArgument,
            "volume_id",
        ),
        (
            "no target",
            publish_request(&m, &sm, "", &multi, false),
            InvalidArgument,
            "target_path",
        ),
        (
            "no capability",
            proto::NodePublishVolumeRequest {
                volume_capability: None,
                ..publish_request(&m, &sm, &new_target, &multi, false)
            },
            InvalidArgument,
            "volume_capability",
        ),
        (
            "no staging path",
            publish_request(&m, "", &new_target, &multi, false),
            FailedPrecondition,
            "staging_target_path",
        ),
        (
            "target is the staging path",
            publish_request(&m, &sm, &sm, &multi, false),
            InvalidArgument,
            "target_path",
        ),
        (
            "target inside the staging path",
            publish_request(&m, &sm, format!("{sm}/sub"), &multi, false),
            InvalidArgument,
            "target_path",
        ),
        (
            "staging path inside the target",
            publish_request(&m, &sm, p(&co), &multi, false),
            InvalidArgument,
            "target_path",
        ),
        (
            "target a file, mount access",
            publish_request(&m, &sm, &afile, &multi, false),
            FailedPrecondition,
            "target_path",
        ),
        (
            "target a directory, block access",
            publish_request(&b, &sb, &adir, &block, false),
            FailedPrecondition,
            "directory",
        ),
        (
            "target a FIFO",
            publish_request(&m, &sm, &fifo, &multi, false),
            FailedPrecondition,
            "target_path",
        ),
        (
            "target a directory that is not empty",
            publish_request(&m, &sm, &fulldir, &multi, false),
            FailedPrecondition,
            "not empty",
        ),
        (
            "block target a file that is not empty",
            publish_request(&b, &sb, &afile, &block, false),
            FailedPrecondition,
            "not empty",
        ),
        (
            "target a FIFO, block",
            publish_request(&b, &sb, &fifo, &block, false),
            FailedPrecondition,
            "target_path",
        ),
        (
            "target a symlink",
            publish_request(&m, &sm, &link_dir, &multi, false),
            FailedPrecondition,
            "symbolic link",
        ),
        (
            "target without a parent",
            publish_request(&m, &sm, &no_parent, &multi, false),
            FailedPrecondition,
            "parent",
        ),
        (
            "block target without a parent",
            publish_request(&b, &sb, &no_parent, &block, false),
            FailedPrecondition,
            "parent",
        ),
        (
            "target through a link to /proc",
            publish_request(&m, &sm, &via_proc, &multi, false),
            InvalidArgument,
            "/proc",
        ),
        (
            "target through a link into kura's state",
            publish_request(&m, &sm, &via_state, &multi, false),
            InvalidArgument,
            "target_path",
        ),
        (
            "target is another volume's publication",
            publish_request(&m, &sm, &tb, &multi, false),
            FailedPrecondition,
            "mount point",
        ),
        (
            "volume not staged",
            publish_request(&u, &adir, &new_target, &single, false),
            FailedPrecondition,
            "not staged",
        ),
        (
            "other staging path",
            publish_request(&m, &ss, &new_target, &multi, false),
            FailedPrecondition,
            "staged at",
        ),
        (
            "mount volume as block",
            publish_request(&m, &sm, &new_target, &block, false),
            FailedPrecondition,
            "cannot be published",
        ),
        (
            "block volume as mount",
            publish_request(&b, &sb, &new_target, &multi, false),
            FailedPrecondition,
            "cannot be published",
        ),
        (
            "another fs_type",
            publish_request(
                &m,
                &sm,
                &new_target,
                &cap_with_mode(mount_access("xfs", &[]), Mode::SingleNodeMultiWriter),
                false,
            ),
            FailedPrecondition,
            "cannot be published",
        ),
        (
            "multi-node mode",
            publish_request(
                &m,
                &sm,
                &new_target,
                &cap_with_mode(mount_access("", &[]), Mode::MultiNodeMultiWriter),
                false,
            ),
            FailedPrecondition,
            "volume_capability",
        ),
        (
            "flag suid",
            publish_request(&m, &sm, &new_target, &flags_cap(&["suid"]), false),
            InvalidArgument,
            "mount_flags",
        ),
        (
            "second target of a single-writer volume",
            publish_request(&s, &ss, &new_target, &single, false),
            FailedPrecondition,
            "one target",
        ),
        (
            "same target, read-only this time",
            proto::NodePublishVolumeRequest {
                readonly: true,
                ..publish_request(&m, &sm, &tm, &multi, false)
            },
            AlreadyExists,
            "other arguments",
        ),
        (
            "same target, same arguments",
            publish_request(&m, &sm, &tm, &multi, false),
            Ok,
            "",
        ),
        (
            "same block target, same arguments",
            publish_request(&b, &sb, &tb, &block, false),
            Ok,
            "",
        ),
        (
            "unknown volume",
            publish_request(UNKNOWN_VOLUME, &sm, &new_target, &multi, false),
            NotFound,
            UNKNOWN_VOLUME,
        ),
        (
            "malformed volume",
            publish_request("vol-🦀", &sm, &new_target, &multi, false),
            NotFound,
            "volume_id",
        ),
        (
            "secrets over 4 KiB",
            proto::NodePublishVolumeRequest {
                secrets: big_map(),
                ..publish_request(&m, &sm, &new_target, &multi, false)
            },
            InvalidArgument,
            "secrets",
        ),
        (
            "publish_context over 4 KiB",
            proto::NodePublishVolumeRequest {
                publish_context: big_map(),
                ..publish_request(&m, &sm, &new_target, &multi, false)
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
            unpublish_request("", &tm),
            InvalidArgument,
            "volume_id",
        ),
        (
            "no target",
            unpublish_request(&m, ""),
            InvalidArgument,
            "target_path",
        ),
        (
            "unknown volume",
            unpublish_request(UNKNOWN_VOLUME, &tm),
            NotFound,
            UNKNOWN_VOLUME,
        ),
        (
            "malformed volume",
            unpublish_request("vol-x", &tm),
            NotFound,
            "volume_id",
        ),
        (
            "the volume's staging path",
            unpublish_request(&m, &sm),
            Ok,
            "",
        ),
        (
            "the block volume's staging path",
            unpublish_request(&b, &sb),
            Ok,
            "",
        ),
        (
            "a non-empty directory kura did not make",
            unpublish_request(&m, &fulldir),
            Ok,
            "",
        ),
        (
            "an empty directory kura did not make",
            unpublish_request(&m, &adir),
            Ok,
            "",
        ),
        ("a file", unpublish_request(&b, &afile), Ok, ""),
        ("a FIFO", unpublish_request(&m, &fifo), Ok, ""),
        ("a symlink", unpublish_request(&m, &link_dir), Ok, ""),
        (
            "another volume's publication",
            unpublish_request(&m, &tb),
            Ok,
            "",
        ),
        (
            "another volume's publication, same mode",
            unpublish_request(&m, &ts),
            Ok,
            "",
        ),
        (
            "another volume's staging path",
            unpublish_request(&m, &ss),
            Ok,
            "",
        ),
        (
            "a path that does not exist",
            unpublish_request(&m, &missing),
            Ok,
            "",
        ),
        ("an unstaged volume", unpublish_request(&u, &tm), Ok, ""),
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
        (
            "no volume ID",
            stats_request("", &tm),
            InvalidArgument,
            "volume_id",
        ),
        (
            "no volume path",
            stats_request(&m, ""),
            InvalidArgument,
            "volume_path",
        ),
        (
            "unknown volume",
            stats_request(UNKNOWN_VOLUME, &tm),
            NotFound,
            UNKNOWN_VOLUME,
        ),
        (
            "malformed volume",
            stats_request("vol-x", &tm),
            NotFound,
            "volume_id",
        ),
        (
            "csi-sanity's some/path",
            stats_request(&m, "some/path"),
            NotFound,
            "volume_path",
        ),
        (
            "another volume's target",
            stats_request(&m, &tb),
            NotFound,
            "volume path",
        ),
        (
            "a directory kura did not make",
            stats_request(&m, &fulldir),
            NotFound,
            "volume path",
        ),
        (
            "under /proc",
            stats_request(&m, "/proc/self"),
            NotFound,
            "volume_path",
        ),
        (
            "a malformed staging path",
            proto::NodeGetVolumeStatsRequest {
                staging_target_path: "relative".into(),
                ..stats_request(&m, &tm)
            },
            InvalidArgument,
            "staging_target_path",
        ),
        ("the volume's target", stats_request(&m, &tm), Ok, ""),
        ("the volume's staging path", stats_request(&m, &sm), Ok, ""),
        ("the block volume's target", stats_request(&b, &tb), Ok, ""),
        (
            "the block volume's staging path: nothing of it is there",
            stats_request(&b, &sb),
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
        ..node_expand_request(&m, &tm, 0, 0)
    };
    let expand_rows: Vec<(&str, proto::NodeExpandVolumeRequest, Code, &str)> = vec![
        (
            "no volume ID",
            node_expand_request("", &tm, 0, 0),
            InvalidArgument,
            "volume_id",
        ),
        (
            "no volume path",
            node_expand_request(&m, "", 0, 0),
            InvalidArgument,
            "volume_path",
        ),
        (
            "unknown volume",
            node_expand_request(UNKNOWN_VOLUME, &tm, 0, 0),
            NotFound,
            UNKNOWN_VOLUME,
        ),
        (
            "malformed volume",
            node_expand_request("vol-x", &tm, 0, 0),
            NotFound,
            "volume_id",
        ),
        (
            "csi-sanity's some/path",
            node_expand_request(&m, "some/path", 0, 0),
            NotFound,
            "volume_path",
        ),
        (
            "another volume's target",
            node_expand_request(&m, &tb, 0, 0),
            NotFound,
            "volume path",
        ),
        (
            "negative required",
            node_expand_request(&m, &tm, -1, 0),
            InvalidArgument,
            "required_bytes",
        ),
        (
            "negative limit",
            node_expand_request(&m, &tm, 0, -1),
            InvalidArgument,
            "limit_bytes",
        ),
        (
            "beyond the volume's size",
            node_expand_request(&m, &tm, 2 * SIZE, 0),
            OutOfRange,
            "capacity_range",
        ),
        (
            "required i64::MAX",
            node_expand_request(&m, &tm, i64::MAX, 0),
            OutOfRange,
            "capacity_range",
        ),
        (
            "block beyond its size",
            node_expand_request(&b, &tb, SIZE + 1, 0),
            OutOfRange,
            "capacity_range",
        ),
        (
            "limit below the size",
            node_expand_request(&m, &tm, 0, SIZE / 2),
            OutOfRange,
            "capacity_range",
        ),
        (
            "required above limit",
            node_expand_request(&m, &tm, SIZE, SIZE / 2),
            OutOfRange,
            "capacity_range",
        ),
        (
            "multi-node capability",
            expand_cap(cap_with_mode(
                mount_access("", &[]),
                Mode::MultiNodeMultiWriter,
            )),
            InvalidArgument,
            "volume_capability",
        ),
        (
            "multi-node capability, unknown volume",
            proto::NodeExpandVolumeRequest {
                volume_id: UNKNOWN_VOLUME.into(),
                ..expand_cap(cap_with_mode(block_access(), Mode::MultiNodeSingleWriter))
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
                ..node_expand_request(&m, &tm, 0, 0)
            },
            InvalidArgument,
            "staging_target_path",
        ),
        (
            "secrets over 4 KiB",
            proto::NodeExpandVolumeRequest {
                secrets: big_map(),
                ..node_expand_request(&m, &tm, 0, 0)
            },
            InvalidArgument,
            "secrets",
        ),
        (
            "to the size it has",
            node_expand_request(&m, &tm, SIZE, 0),
            Ok,
            "",
        ),
        (
            "the block volume's staging path",
            node_expand_request(&b, &sb, 0, 0),
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

    // Missing fields, whether the volume exists or not: INVALID_ARGUMENT naming them,
    // but FAILED_PRECONDITION for a publish without a staging path (this node stages).
    for id in [u.as_str(), UNKNOWN_VOLUME] {
        let missing_rows = [
            (
                "NodeStageVolume without a staging path",
                Call::Stage(stage_request(id, "", &single)),
                InvalidArgument,
                "staging_target_path",
            ),
            (
                "NodeStageVolume without a capability",
                Call::Stage(proto::NodeStageVolumeRequest {
                    volume_capability: None,
                    ..stage_request(id, &adir, &single)
                }),
                InvalidArgument,
                "volume_capability",
            ),
            (
                "NodeStageVolume without an access type",
                Call::Stage(stage_request(id, &adir, &no_access_type())),
                InvalidArgument,
                "volume_capability.access_type",
            ),
            (
                "NodePublishVolume without a target",
                Call::Publish(publish_request(id, &adir, "", &single, false)),
                InvalidArgument,
                "target_path",
            ),
            (
                "NodePublishVolume without a staging path",
                Call::Publish(publish_request(id, "", &new_target, &multi, false)),
                FailedPrecondition,
                "staging_target_path",
            ),
            (
                "NodePublishVolume without a capability",
                Call::Publish(proto::NodePublishVolumeRequest {
                    volume_capability: None,
                    ..publish_request(id, &adir, &new_target, &single, false)
                }),
                InvalidArgument,
                "volume_capability",
            ),
            (
                "NodeUnpublishVolume without a target",
                Call::Unpublish(unpublish_request(id, "")),
                InvalidArgument,
                "target_path",
            ),
            (
                "NodeUnstageVolume without a staging path",
                Call::Unstage(unstage_request(id, "")),
                InvalidArgument,
                "staging_target_path",
            ),
            (
                "NodeGetVolumeStats without a volume path",
                Call::Stats(stats_request(id, "")),
                InvalidArgument,
                "volume_path",
            ),
        ];
        for (what, call, code, names) in missing_rows {
            t.add(format!("{what}, volume {id:?}"), call, code, names);
        }
    }

    // Volumes that do not exist, whatever the form of their ID: NOT_FOUND.
    for id in [MALFORMED_ID, FOREIGN_VOLUME] {
        let unknown_rows = [
            (
                "NodeStageVolume",
                Call::Stage(stage_request(id, &adir, &single)),
            ),
            (
                "NodePublishVolume",
                Call::Publish(publish_request(id, &adir, &new_target, &single, false)),
            ),
            (
                "NodeUnpublishVolume",
                Call::Unpublish(unpublish_request(id, &missing)),
            ),
            (
                "NodeUnstageVolume",
                Call::Unstage(unstage_request(id, &adir)),
            ),
            ("NodeGetVolumeStats", Call::Stats(stats_request(id, &adir))),
        ];
        for (what, call) in unknown_rows {
            t.add(format!("{what} of {id:?}"), call, NotFound, id);
        }
    }

    t.add("NodeGetCapabilities", Call::NodeCapabilities, Ok, "");
    t.add("NodeGetInfo", Call::NodeInfo, Ok, "");
    // The controller side of a volume in use on the node.
    t.add(
        "DeleteVolume of a staged volume",
        Call::DeleteVolume(delete_volume_request(&m)),
        FailedPrecondition,
        &m,
    );
    t.add(
        "CreateSnapshot with a banned name, of a staged volume",
        Call::CreateSnapshot(snapshot_request("snap\u{2}", &m)),
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
        node.node_unstage_volume(unstage_request(&id, driver.path("elsewhere")))
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
    let cap = cap_with_mode(
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
        node.node_unpublish_volume(unpublish_request(&id, target))
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
        node.node_unpublish_volume(unpublish_request(&id, target))
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
    node.node_unstage_volume(unstage_request(&id, &staging))
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
    node.node_unstage_volume(unstage_request(&id, &made))
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
            &cap_with_mode(
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
        .controller_expand_volume(expand_request(&id, 2 * SIZE, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 2 * SIZE);
    let mut node = driver.node();
    let beyond = node
        .node_expand_volume(node_expand_request(&id, p(&target), 3 * SIZE, 0))
        .await
        .unwrap_err();
    assert_eq!(beyond.code(), Code::OutOfRange, "{}", beyond.message());
    assert_eq!(
        kura::sys::blockdev::size(&target).unwrap(),
        SIZE as u64,
        "a refused node expansion grew the device"
    );
    let done = node
        .node_expand_volume(node_expand_request(&id, p(&target), 2 * SIZE, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.capacity_bytes, 2 * SIZE);
    assert_eq!(kura::sys::blockdev::size(&target).unwrap(), 2 * SIZE as u64);
    driver.unpublish_and_unstage(&id, &staging, &target).await;
}
