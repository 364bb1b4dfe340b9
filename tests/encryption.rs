//! Encrypted volumes (`kura.csi.dev/encryption: fscrypt`) over the real socket, with real
//! loop devices, ext4 made with `-O encrypt`, the kernel's fscrypt keyring and mounts:
//! what reaches the disk is ciphertext, the right key brings the data back and a wrong
//! one is refused with nothing left mounted, snapshots, clones and restores keep the
//! encryption and the key, bad inputs change nothing, a kill mid-stage or while staged
//! is repaired by the retry, and the key never reaches a log or a file of kura's.
//!
//! The split roles carry the encryption from the controller to the node's pool, so a
//! volume made through `kura controller` is as encrypted as one of all-in-one.
//!
//! The in-process tests share this process's tracing: every event of every test, down
//! to TRACE (tonic, h2, hyper included), is captured into one buffer, which each test
//! searches for its keys in hex, base64, raw bytes and Rust's `Debug` of the bytes.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use common::cluster::*;
use common::process::Kura;
use common::*;
use kura::csi::proto;
use kura::sys::fscrypt::{self, KeyStatus, Policy};
use tonic::Code;

const ENCRYPTION: (&str, &str) = ("kura.csi.dev/encryption", "fscrypt");
const SIZE: i64 = 64 * MIB;
/// In the content of the file the test writes, and in its name.
const MARKER: &str = "KURA-PLAINTEXT-MARKER-4d1c";

// ---------------------------------------------------------------------------------
// Log capture and keys
// ---------------------------------------------------------------------------------

/// Everything every test's driver logged so far.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buffer);
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Capture(Arc::clone(&sink)))
            .try_init()
            .expect("this test binary sets the only subscriber");
        buffer
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A fresh random key: its bytes, and the hex text a Secret carries.
struct TestKey {
    raw: Vec<u8>,
    hex: String,
}

impl TestKey {
    fn new(len: usize) -> TestKey {
        let mut raw = Vec::new();
        while raw.len() < len {
            raw.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        }
        raw.truncate(len);
        let hex = raw.iter().map(|b| format!("{b:02x}")).collect();
        TestKey { raw, hex }
    }

    fn secrets(&self) -> HashMap<String, String> {
        HashMap::from([("key".to_owned(), self.hex.clone())])
    }

    /// Every form in which the key could show up in a log or a file.
    fn forms(&self) -> Vec<(String, Vec<u8>)> {
        vec![
            ("hex".into(), self.hex.clone().into_bytes()),
            ("HEX".into(), self.hex.to_uppercase().into_bytes()),
            ("raw".into(), self.raw.clone()),
            ("base64".into(), base64(&self.raw).into_bytes()),
            ("Debug".into(), format!("{:?}", self.raw).into_bytes()),
            // Half the key is already too much.
            (
                "half hex".into(),
                self.hex.as_bytes()[..self.hex.len() / 2].to_vec(),
            ),
        ]
    }

    /// Panics if any form of the key is in `haystack`.
    fn assert_absent(&self, haystack: &[u8], what: &str) {
        for (form, needle) in self.forms() {
            assert!(
                find(haystack, &needle).is_none(),
                "the key ({form}) appears in {what}"
            );
        }
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Where `needle` first is in `haystack`. Images are mostly holes, so 4 KiB blocks of
/// zeros are skipped with one comparison each (a debug build scans bytes slowly).
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    const BLOCK: usize = 4096;
    let zeros = [0u8; BLOCK];
    let mut start = 0;
    while start < haystack.len() {
        let end = (start + BLOCK).min(haystack.len());
        let block = &haystack[start..end];
        if block != &zeros[..block.len()] {
            // Matches that begin in this block, also those running into the next.
            let reach = (end + needle.len() - 1).min(haystack.len());
            if let Some(at) = haystack[start..reach]
                .windows(needle.len())
                .position(|w| w == needle)
            {
                return Some(start + at);
            }
        }
        start = end;
    }
    None
}

/// Every regular file under `dir`, with its bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                todo.push(entry.path());
            } else if kind.is_file() {
                out.push((entry.path(), std::fs::read(entry.path()).unwrap()));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------

fn encrypted_request(
    name: &str,
    source: Option<proto::VolumeContentSource>,
) -> proto::CreateVolumeRequest {
    create_request(name, SIZE, &[ENCRYPTION], source)
}

/// Creates an encrypted volume (from `source`, if any); returns its ID.
async fn encrypted_volume(
    kura: &impl Csi,
    name: &str,
    source: Option<proto::VolumeContentSource>,
) -> String {
    kura.create(encrypted_request(name, source))
        .await
        .expect("CreateVolume")
        .volume_id
}

fn stage_with(
    id: &str,
    staging: &Path,
    cap: &proto::VolumeCapability,
    secrets: HashMap<String, String>,
) -> proto::NodeStageVolumeRequest {
    proto::NodeStageVolumeRequest {
        secrets,
        ..stage_request(id, staging, cap)
    }
}

async fn stage_with_key(node: &impl Csi, id: &str, staging: &Path, key: &TestKey) {
    node.node()
        .node_stage_volume(stage_with(id, staging, &mount_cap(""), key.secrets()))
        .await
        .expect("NodeStageVolume with the volume's key");
}

fn marker_name() -> String {
    format!("{MARKER}.txt")
}

fn marker_content() -> Vec<u8> {
    MARKER.repeat(200).into_bytes()
}

/// Writes the marker file (and a directory named with the marker) at a publication.
fn write_marker(target: &Path) {
    write_file(&target.join(marker_name()), &marker_content());
    std::fs::create_dir(target.join(format!("{MARKER}-dir"))).unwrap();
}

fn assert_marker(target: &Path) {
    assert_eq!(
        std::fs::read(target.join(marker_name())).expect("the marker file reads back"),
        marker_content()
    );
    assert!(target.join(format!("{MARKER}-dir")).is_dir());
}

/// The key the encrypted directory under `staging` names, and whether it is loaded.
fn key_status(staging: &Path) -> KeyStatus {
    let Some(Policy::V2 { key, .. }) = fscrypt::get_policy(&staging.join("data")).unwrap() else {
        panic!("{}/data has no v2 policy", staging.display());
    };
    fscrypt::key_status(staging, &key).unwrap()
}

fn attached(pool: &Path, id: &str) -> bool {
    kura::sys::loopdev::find_by_backing(&volume_image(pool, id))
        .unwrap()
        .is_some()
}

// ---------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------

/// Write through the publication, unstage, and look at the image without the key:
/// no plaintext, ciphertext names; the right key brings the data back; stats and
/// expansion work; snapshots, restores and clones keep the encryption and the key.
#[tokio::test]
async fn the_disk_holds_ciphertext_and_the_key_brings_the_data_back() {
    let logs = logs();
    let driver = Driver::start().await;
    let (mut c, mut n) = (driver.controller(), driver.node());
    let pool = driver.pool_root();
    let key = TestKey::new(32);

    let id = encrypted_volume(&driver, "pvc-enc", None).await;
    let staging = driver.path("stage");
    let target = driver.path("target");
    for _ in 0..2 {
        stage_with_key(&driver, &id, &staging, &key).await;
    }
    for _ in 0..2 {
        driver.publish(&id, &staging, &target, &mount_cap("")).await;
    }
    assert_eq!(key_status(&staging), KeyStatus::Present);
    // The pod sees the encrypted directory only, not the filesystem's root.
    assert!(staging.join("lost+found").exists());
    assert!(!target.join("lost+found").exists());
    assert!(!target.join("data").exists());
    write_marker(&target);
    let policy = fscrypt::get_policy(&target.join(marker_name())).unwrap();
    assert!(
        matches!(policy, Some(p @ Policy::V2 { .. }) if p == fscrypt::get_policy(&staging.join("data")).unwrap().unwrap()),
        "files inherit the directory's policy: {policy:?}"
    );
    match fscrypt::get_policy(&staging.join("data")).unwrap() {
        Some(Policy::V2 {
            contents_mode,
            filenames_mode,
            flags,
            ..
        }) => assert_eq!(
            (contents_mode, filenames_mode, flags),
            (
                fscrypt::MODE_AES_256_XTS,
                fscrypt::MODE_AES_256_CTS,
                fscrypt::POLICY_FLAGS_PAD_32
            )
        ),
        other => panic!("policy {other:?}"),
    }

    // Stats and online expansion at the publication.
    let stats = |path: &Path| stats_request(&id, path);
    let before = n
        .node_get_volume_stats(stats(&target))
        .await
        .unwrap()
        .into_inner();
    assert!(!before.volume_condition.unwrap().abnormal);
    let total_before = before.usage[0].total;
    assert!(total_before > 0);
    n.node_get_volume_stats(stats(&staging)).await.unwrap();
    c.controller_expand_volume(proto::ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: 2 * SIZE,
            limit_bytes: 0,
        }),
        ..Default::default()
    })
    .await
    .expect("ControllerExpandVolume");
    // The kernel grows a mounted ext4 only with CAP_SYS_RESOURCE; without it the
    // volume is grown at its next stage (below).
    let online = n
        .node_expand_volume(proto::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await;
    match online {
        Ok(expanded) => assert_eq!(expanded.into_inner().capacity_bytes, 2 * SIZE),
        Err(refused) => {
            assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
            assert!(
                refused.message().contains("next staged"),
                "{}",
                refused.message()
            );
        }
    }
    assert_marker(&target);

    for _ in 0..2 {
        driver.unpublish(&id, &target).await;
    }
    for _ in 0..2 {
        driver.unstage(&id, &staging).await;
    }
    assert!(!attached(&pool, &id));

    // The image, read directly: no marker in any form, no key.
    let bytes = std::fs::read(volume_image(&pool, &id)).unwrap();
    assert!(
        find(&bytes, MARKER.as_bytes()).is_none(),
        "the plaintext marker is in the image"
    );
    key.assert_absent(&bytes, "the volume's image");

    // The image mounted elsewhere without the key: names are ciphertext, contents
    // cannot be read.
    let device = kura::sys::loopdev::attach_with_block_size(&volume_image(&pool, &id), true, 4096)
        .expect("attach the image read-only");
    let elsewhere = driver.path("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    kura::sys::mount::mount_fs(&device, &elsewhere, kura::sys::FsType::Ext4, &["ro".into()])
        .expect("mount the image without the key");
    let names: Vec<String> = std::fs::read_dir(elsewhere.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    for name in &names {
        assert!(!name.contains(MARKER), "a plaintext name: {name}");
    }
    let locked = names
        .iter()
        .map(|name| elsewhere.join("data").join(name))
        .find(|path| path.is_file())
        .expect("the marker file, under its ciphertext name");
    let err = std::fs::read(&locked).expect_err("a locked file reads");
    assert_eq!(err.raw_os_error(), Some(libc::ENOKEY), "{err}");
    assert!(std::fs::File::create(elsewhere.join("data/new")).is_err());
    kura::sys::mount::unmount(&elsewhere).unwrap();
    kura::sys::loopdev::detach(&device).unwrap();

    // The right key again: the data is back, and the filesystem has its new size.
    stage_with_key(&driver, &id, &staging, &key).await;
    driver.publish(&id, &staging, &target, &mount_cap("")).await;
    assert_marker(&target);
    let grown = n
        .node_get_volume_stats(stats(&target))
        .await
        .unwrap()
        .into_inner();
    assert!(
        grown.usage[0].total > total_before + SIZE / 2,
        "{total_before} -> {grown:?}"
    );

    // A snapshot (of the volume in use), and a restore with the same key.
    let snapshot = c
        .create_snapshot(snapshot_request("snap-enc", &id))
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .unwrap();
    // The volume is twice its first size now.
    let copy_of = |name: &str, source| create_request(name, 2 * SIZE, &[ENCRYPTION], Some(source));
    let restored = driver
        .create(copy_of(
            "pvc-restored",
            snapshot_source(&snapshot.snapshot_id),
        ))
        .await
        .expect("CreateVolume")
        .volume_id;
    let clone = driver
        .create(copy_of("pvc-clone", volume_source(&id)))
        .await
        .expect("CreateVolume")
        .volume_id;
    for (copy, tag) in [(&restored, "restored"), (&clone, "clone")] {
        let (s, t) = (
            driver.path(&format!("stage-{tag}")),
            driver.path(&format!("target-{tag}")),
        );
        stage_with_key(&driver, copy, &s, &key).await;
        driver.publish(copy, &s, &t, &mount_cap("")).await;
        assert_marker(&t);
        driver.unpublish(copy, &t).await;
        driver.unstage(copy, &s).await;
        let bytes = std::fs::read(volume_image(&pool, copy)).unwrap();
        assert!(
            find(&bytes, MARKER.as_bytes()).is_none(),
            "plaintext in the {tag} image"
        );
    }
    // A restore without the encryption parameter is refused, naming why.
    let err = c
        .create_volume(restore_request(
            "pvc-plain-restore",
            2 * SIZE,
            &snapshot.snapshot_id,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("encrypted"), "{}", err.message());

    driver.unpublish(&id, &target).await;
    driver.unstage(&id, &staging).await;
    for volume in [&restored, &clone, &id] {
        c.delete_volume(delete_volume_request(volume))
            .await
            .unwrap();
    }
    c.delete_snapshot(delete_snapshot_request(&snapshot.snapshot_id))
        .await
        .unwrap();
    assert_eq!(leftovers(&driver.dir, &pool), Vec::<String>::new());

    // kura wrote the key nowhere (its state directory: records, metadata, pool) and
    // logged it nowhere.
    for (path, bytes) in files_under(&driver.dir.join("state")) {
        key.assert_absent(&bytes, &path.display().to_string());
    }
    let captured = logs.lock().unwrap().clone();
    assert!(
        find(&captured, id.as_bytes()).is_some(),
        "the capture holds the driver's logs"
    );
    key.assert_absent(&captured, "the logs");
}

/// A wrong key is refused (FAILED_PRECONDITION naming the volume, not the key), and
/// leaves nothing mounted or attached; on a staged volume it changes nothing.
#[tokio::test]
async fn a_wrong_key_is_refused_and_leaves_nothing_mounted() {
    let logs = logs();
    let driver = Driver::start().await;
    let mut n = driver.node();
    let pool = driver.pool_root();
    let (key, wrong) = (TestKey::new(64), TestKey::new(48));
    let id = encrypted_volume(&driver, "pvc-wrong", None).await;
    let (staging, target) = (driver.path("stage"), driver.path("target"));
    stage_with_key(&driver, &id, &staging, &key).await;
    driver.publish(&id, &staging, &target, &mount_cap("")).await;
    write_marker(&target);
    driver.unpublish(&id, &target).await;
    driver.unstage(&id, &staging).await;

    let refused = |err: tonic::Status| {
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains(&id), "{}", err.message());
        assert!(err.message().contains("another key"), "{}", err.message());
        wrong.assert_absent(err.message().as_bytes(), "the error");
        key.assert_absent(err.message().as_bytes(), "the error");
    };
    let before = leftovers(&driver.dir, &pool);
    for _ in 0..2 {
        let err = n
            .node_stage_volume(stage_with(&id, &staging, &mount_cap(""), wrong.secrets()))
            .await
            .unwrap_err();
        refused(err);
        assert!(!is_mounted(&staging), "a refused stage left a mount");
        assert!(
            !attached(&pool, &id),
            "a refused stage left the loop device"
        );
        assert_eq!(leftovers(&driver.dir, &pool), before);
    }

    // Staged with the right key, a stage with the wrong one changes nothing.
    stage_with_key(&driver, &id, &staging, &key).await;
    let err = n
        .node_stage_volume(stage_with(&id, &staging, &mount_cap(""), wrong.secrets()))
        .await
        .unwrap_err();
    refused(err);
    assert!(is_mounted(&staging));
    assert_eq!(key_status(&staging), KeyStatus::Present);
    driver.publish(&id, &staging, &target, &mount_cap("")).await;
    assert_marker(&target);
    driver.unpublish(&id, &target).await;
    driver.unstage(&id, &staging).await;
    assert!(!is_mounted(&staging) && !attached(&pool, &id));
    let captured = logs.lock().unwrap().clone();
    key.assert_absent(&captured, "the logs");
    wrong.assert_absent(&captured, "the logs");
}

/// Bad inputs: each refused with its code, naming the field, echoing no key, and
/// changing nothing (files of the pool and state directory, mounts, loop devices).
#[tokio::test]
async fn bad_inputs_are_refused_and_change_nothing() {
    let logs = logs();
    let driver = Driver::start().await;
    let (mut c, mut n) = (driver.controller(), driver.node());
    let pool = driver.pool_root();
    let key = TestKey::new(32);
    let encrypted = encrypted_volume(&driver, "pvc-bad-enc", None).await;
    let plain = driver
        .create_volume("pvc-bad-plain", SIZE, &[])
        .await
        .volume_id;
    let snapshot = c
        .create_snapshot(snapshot_request("snap-bad", &encrypted))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    let staging = driver.path("stage");
    let param = "parameters[kura.csi.dev/encryption]";

    let with_caps = |name: &str, caps: Vec<proto::VolumeCapability>| proto::CreateVolumeRequest {
        volume_capabilities: caps,
        ..encrypted_request(name, None)
    };
    let creates = [
        (
            "block access",
            with_caps("pvc-x1", vec![block_cap()]),
            param,
        ),
        ("xfs", with_caps("pvc-x2", vec![mount_cap("xfs")]), param),
        (
            "btrfs beside ext4",
            with_caps("pvc-x3", vec![mount_cap("ext4"), mount_cap("btrfs")]),
            param,
        ),
        (
            "an unknown value",
            create_request("pvc-x4", SIZE, &[(ENCRYPTION.0, "luks")], None),
            param,
        ),
        (
            "a plain restore of an encrypted snapshot",
            restore_request("pvc-x5", SIZE, &snapshot),
            "parameters",
        ),
        (
            "a plain clone of an encrypted volume",
            clone_request("pvc-x6", SIZE, &encrypted),
            "parameters",
        ),
        (
            "an encrypted clone of a plain volume",
            encrypted_request("pvc-x7", Some(volume_source(&plain))),
            "parameters",
        ),
    ];
    for (what, request, field) in creates {
        let before = leftovers(&driver.dir, &pool);
        let err = c.create_volume(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{what}: {}",
            err.message()
        );
        assert_eq!(
            leftovers(&driver.dir, &pool),
            before,
            "{what} changed something"
        );
    }

    // The same name without encryption asks for another volume.
    let err = c
        .create_volume(create_request("pvc-bad-enc", SIZE, &[], None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // An encrypted volume does not confirm a filesystem other than ext4.
    for (cap, confirmed) in [(mount_cap("ext4"), true), (mount_cap("xfs"), false)] {
        let answer = c
            .validate_volume_capabilities(proto::ValidateVolumeCapabilitiesRequest {
                volume_id: encrypted.clone(),
                volume_capabilities: vec![cap],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.confirmed.is_some(), confirmed, "{answer:?}");
        if !confirmed {
            assert!(answer.message.contains("encrypted"), "{}", answer.message);
        }
    }

    let secrets = |value: &str| HashMap::from([("key".to_owned(), value.to_owned())]);
    let short = TestKey::new(31);
    let long = TestKey::new(65);
    let stages = [
        (
            "no secret",
            stage_with(&encrypted, &staging, &mount_cap(""), HashMap::new()),
            Code::InvalidArgument,
            "secrets[key]: is required",
        ),
        (
            "a secret without the key entry",
            stage_with(
                &encrypted,
                &staging,
                &mount_cap(""),
                HashMap::from([("password".to_owned(), key.hex.clone())]),
            ),
            Code::InvalidArgument,
            "secrets[key]: is required",
        ),
        (
            "a short key",
            stage_with(&encrypted, &staging, &mount_cap(""), short.secrets()),
            Code::InvalidArgument,
            "secrets[key]: holds 31 bytes",
        ),
        (
            "a long key",
            stage_with(&encrypted, &staging, &mount_cap(""), long.secrets()),
            Code::InvalidArgument,
            "secrets[key]: holds more than 64",
        ),
        (
            "a key that is not hex",
            stage_with(
                &encrypted,
                &staging,
                &mount_cap(""),
                secrets(&format!("{}zz", &key.hex[2..])),
            ),
            Code::InvalidArgument,
            "secrets[key]: is not hexadecimal",
        ),
        (
            "an odd number of digits",
            stage_with(&encrypted, &staging, &mount_cap(""), secrets(&key.hex[1..])),
            Code::InvalidArgument,
            "secrets[key]: has an odd number",
        ),
        (
            "block access",
            stage_with(&encrypted, &staging, &block_cap(), key.secrets()),
            Code::FailedPrecondition,
            "block access",
        ),
        (
            "xfs",
            stage_with(&encrypted, &staging, &mount_cap("xfs"), key.secrets()),
            Code::FailedPrecondition,
            "cannot be staged as xfs",
        ),
    ];
    for (what, request, code, needle) in stages {
        let before = leftovers(&driver.dir, &pool);
        let values: Vec<String> = request.secrets.values().cloned().collect();
        let err = n.node_stage_volume(request).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(err.message().contains(needle), "{what}: {}", err.message());
        if code == Code::FailedPrecondition || needle.contains("required") {
            assert!(
                err.message().contains(&encrypted),
                "{what}: {}",
                err.message()
            );
        }
        for value in values {
            assert!(
                !err.message().contains(&value[..16]),
                "{what}: the key is echoed"
            );
        }
        assert_eq!(
            leftovers(&driver.dir, &pool),
            before,
            "{what} changed something"
        );
        assert!(!staging.exists() && !attached(&pool, &encrypted), "{what}");
    }
    // A plain volume does not use a secret, so one does not hurt it.
    let plain_staging = driver.path("stage-plain");
    n.node_stage_volume(stage_with(
        &plain,
        &plain_staging,
        &mount_cap(""),
        secrets("not a key"),
    ))
    .await
    .expect("a plain volume stages whatever the secrets hold");
    // The control: a plain volume's image shows the marker the encrypted ones hide.
    write_marker(&plain_staging);
    driver.unstage(&plain, &plain_staging).await;
    let bytes = std::fs::read(volume_image(&pool, &plain)).unwrap();
    assert!(
        find(&bytes, MARKER.as_bytes()).is_some(),
        "the search finds plaintext"
    );
    let captured = logs.lock().unwrap().clone();
    for k in [&key, &short, &long] {
        k.assert_absent(&captured, "the logs");
    }
}

/// Killed mid-stage (key added, directory made, no policy yet): the retry stages.
/// Killed while staged: the key stays in the filesystem's keyring, and the unstage
/// after the restart removes it (reading which key from the directory's policy)
/// before it unmounts. The child's log files never hold the key.
#[tokio::test]
async fn kills_mid_stage_and_while_staged_are_repaired() {
    let mut kura = Kura::new(PoolKind::Image);
    kura.start().await;
    let pool = kura.pool_root();
    let key = TestKey::new(32);
    let id = encrypted_volume(&kura, "pvc-kill", None).await;
    let (staging, target) = (kura.path("stage"), kura.path("target"));

    let held = kura.pause.arm("fscrypt-dir-made");
    let in_flight = {
        let mut n = kura.node();
        let request = stage_with(&id, &staging, &mount_cap(""), key.secrets());
        tokio::spawn(async move { n.node_stage_volume(request).await })
    };
    held.held(|| in_flight.is_finished()).await;
    assert_eq!(
        fscrypt::get_policy(&staging.join("data")).unwrap(),
        None,
        "held between making the directory and setting its policy"
    );
    kura.kill();
    let _ = in_flight.await;
    drop(held);

    kura.start().await;
    stage_with_key(&kura, &id, &staging, &key).await;
    kura.publish(&id, &staging, &target, &mount_cap("")).await;
    write_marker(&target);
    kura.kill();

    kura.start().await;
    assert_eq!(
        key_status(&staging),
        KeyStatus::Present,
        "a kill leaves the key loaded"
    );
    kura.unpublish(&id, &target).await;
    let removed = kura.pause.arm("fscrypt-key-removed");
    let in_flight = {
        let (mut n, request) = (kura.node(), unstage_request(&id, &staging));
        tokio::spawn(async move { n.node_unstage_volume(request).await })
    };
    removed.held(|| in_flight.is_finished()).await;
    assert!(is_mounted(&staging), "the key goes before the unmount");
    assert_eq!(key_status(&staging), KeyStatus::Absent);
    removed.release();
    in_flight.await.unwrap().expect("NodeUnstageVolume");
    assert!(!is_mounted(&staging) && !attached(&pool, &id));

    // The data survived it all.
    stage_with_key(&kura, &id, &staging, &key).await;
    kura.publish(&id, &staging, &target, &mount_cap("")).await;
    assert_marker(&target);
    kura.unpublish(&id, &target).await;
    kura.unstage(&id, &staging).await;
    key.assert_absent(kura.logs().as_bytes(), "the child's logs");
    for (path, bytes) in files_under(&kura.dir.join("state")) {
        key.assert_absent(&bytes, &path.display().to_string());
    }
}

/// Through `kura controller` and an agent: the encryption reaches the node's pool
/// (the volume needs its key to stage, and stages encrypted), a restore through the
/// controller keeps it, and a plain restore of it is refused there too. The logs of
/// every process are free of the key.
#[tokio::test(flavor = "multi_thread")]
async fn the_split_roles_carry_the_encryption_to_the_node() {
    let cluster = Cluster::start(&["2Gi"]).await;
    let mut c = cluster.controller().controller();
    let node = cluster.node("node-a");
    let mut n = node.node();
    let key = TestKey::new(40);
    let id = encrypted_volume(cluster.controller(), "pvc-split", None).await;
    let (staging, target) = (node.path("stage"), node.path("target"));
    let err = n
        .node_stage_volume(stage_with(&id, &staging, &mount_cap(""), HashMap::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    stage_with_key(node, &id, &staging, &key).await;
    assert_eq!(key_status(&staging), KeyStatus::Present);
    node.publish(&id, &staging, &target, &mount_cap("")).await;
    write_marker(&target);
    let snapshot = c
        .create_snapshot(snapshot_request("snap-split", &id))
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    let plain = c
        .create_volume(restore_request("pvc-split-plain", SIZE, &snapshot))
        .await
        .unwrap_err();
    assert_eq!(plain.code(), Code::InvalidArgument, "{plain:?}");
    let source = Some(snapshot_source(&snapshot));
    let restored = encrypted_volume(cluster.controller(), "pvc-split-restored", source).await;
    let (s, t) = (node.path("stage-restored"), node.path("target-restored"));
    stage_with_key(node, &restored, &s, &key).await;
    node.publish(&restored, &s, &t, &mount_cap("")).await;
    assert_marker(&t);
    for (volume, s, t) in [(&restored, &s, &t), (&id, &staging, &target)] {
        node.unpublish(volume, t).await;
        node.unstage(volume, s).await;
    }
    key.assert_absent(cluster.logs().as_bytes(), "the logs of the split roles");
}
