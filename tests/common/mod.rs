//! Test harness. [`Driver`] is a real all-in-one kura server in this process, on a
//! temporary Unix socket over a self-made image pool; [`process`] runs the `kura`
//! binary as child processes (all-in-one, node, controller) and [`cluster`] the split
//! roles from them. Whichever a test talks to, it reaches it through [`Csi`]. Every
//! test file reaches this the same way: `mod common;`, then `use common::*;` and the
//! submodules it needs.
//!
//! Everything a test makes (mounts, loop devices, files) lives under one temporary
//! directory and is removed on drop, even when the test fails.

#![allow(dead_code)]

#[macro_use]
pub mod process;
pub mod cluster;
pub mod metrics;
mod requests;

pub use requests::*;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use kura::cli::{Cli, Command};
use kura::csi::proto;
use kura::csi::proto::controller_client::ControllerClient;
use kura::csi::proto::group_controller_client::GroupControllerClient;
use kura::csi::proto::identity_client::IdentityClient;
use kura::csi::proto::node_client::NodeClient;
use kura::pool::{NodeToken, SnapshotId, VolumeId};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};

pub const MIB: i64 = 1 << 20;
pub const GIB: i64 = 1 << 30;

/// The driver's name, as GetPluginInfo and the metrics give it.
pub const DRIVER_NAME: &str = "kura.csi.dev";
/// The node ID of the all-in-one driver (in-process and child).
pub const NODE_ID: &str = "test-node";
/// The CSI socket's name in a process's directory.
pub const SOCKET: &str = "csi.sock";
/// The size of the all-in-one driver's pool image.
pub const POOL_SIZE: i64 = 16 * GIB;
/// A volume whose size does not matter to the test.
pub const SIZE: i64 = 64 * MIB;
/// The topology key kura publishes, as a CO sees it.
pub const TOPOLOGY_KEY: &str = "topology.kura.csi.dev/node";
/// The StorageClass parameter for thin or thick volumes.
pub const PROVISIONING: &str = "kura.csi.dev/provisioning";

/// Well formed, on the test node, naming nothing.
pub const UNKNOWN_VOLUME: &str = "vol-0123456789abcdef0123456789abcdef-test-node";
pub const UNKNOWN_SNAPSHOT: &str = "snap-0123456789abcdef0123456789abcdef-test-node";
/// Well formed, on a node kura does not know.
pub const FOREIGN_VOLUME: &str = "vol-0123456789abcdef0123456789abcdef-other-node";
/// Cannot be an ID of kura's.
pub const MALFORMED_ID: &str = "not-a-kura-id";

/// How the test pool is made.
pub enum PoolKind {
    /// `--pool-image`: kura makes a sparse image, loop-attaches, formats XFS, mounts.
    Image,
    /// `--pool-dir` on a directory of the test's own (whatever filesystem /tmp has).
    Dir,
    /// `--pool-image` of `pool_size` whose image lies on a small host filesystem of the
    /// test's own: ext4 on a `host_bytes` image, mounted at `<dir>/host` (see
    /// [`host_dir`]), so a test can fill the host under the pool.
    OnHost {
        host_bytes: u64,
        pool_size: &'static str,
    },
}

/// Where a [`PoolKind::OnHost`] driver living in `dir` has its host filesystem.
pub fn host_dir(dir: &Path) -> PathBuf {
    dir.join("host")
}

/// Makes and mounts the host filesystem of [`PoolKind::OnHost`]. Its image, loop
/// device and mount live under `dir`, so [`cleanup`] removes them.
fn make_host(dir: &Path, bytes: u64) {
    let image = dir.join("host.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    let device = kura::sys::loopdev::attach(&image, false).expect("attach the host image");
    kura::sys::mkfs::format(&device, kura::sys::FsType::Ext4, false)
        .expect("mkfs.ext4 on the host image");
    let mount = host_dir(dir);
    std::fs::create_dir_all(&mount).unwrap();
    kura::sys::mount::mount_fs(&device, &mount, kura::sys::FsType::Ext4, &[])
        .expect("mount the host");
}

pub struct Driver {
    pub dir: PathBuf,
    socket: PathBuf,
    args: Vec<String>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    pub channel: Channel,
    /// The driver's test pause points.
    pub pause: PausePoints,
    // Last: the server is stopped before its directory is removed.
    _dir: RemoveOnDrop,
}

impl Driver {
    pub async fn start() -> Driver {
        Self::start_with(PoolKind::Image, &[]).await
    }

    pub async fn start_with(kind: PoolKind, extra: &[&str]) -> Driver {
        let dir = test_dir();
        let socket = dir.join(SOCKET);
        let mut args = vec!["kura".to_owned()];
        args.extend(all_in_one_args(&dir, &socket, &kind));
        args.extend(extra.iter().map(|s| s.to_string()));
        let pause = PausePoints::new(&dir.join("pause"));
        let mut driver = Driver {
            pause,
            _dir: RemoveOnDrop(dir.clone()),
            dir,
            socket,
            args,
            shutdown: None,
            task: None,
            channel: Endpoint::from_static("http://unused").connect_lazy(),
        };
        driver.serve().await;
        driver
    }

    async fn serve(&mut self) {
        let Command::AllInOne(args) = Cli::parse_from(&self.args).command else {
            unreachable!("the harness builds all-in-one flags");
        };
        let pause = kura::sys::pause::Points::in_dir(self.pause.dir());
        let built = tokio::task::spawn_blocking(move || {
            kura::server::AllInOneDriver::open_with_pause(&args, pause)
        })
        .await
        .unwrap()
        .expect("driver opens");
        let listener = kura::server::bind(&self.socket).expect("socket binds");
        let (tx, rx) = oneshot::channel();
        self.shutdown = Some(tx);
        self.task = Some(tokio::spawn(async move {
            kura::server::serve(listener, built, async {
                let _ = rx.await;
            })
            .await
            .expect("server runs");
        }));
        self.channel = kura::csi::client::connect(&self.socket)
            .await
            .expect("connects to the driver socket");
    }

    /// Stops the server (letting in-flight calls finish) and starts a new one on the
    /// same state directory and pool, as a restarted process would.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.serve().await;
    }

    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// The pool's root directory.
    pub fn pool_root(&self) -> PathBuf {
        pool_root(&self.dir, &self.args)
    }
}

impl Csi for Driver {
    fn channel(&self) -> Channel {
        self.channel.clone()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A kura the test talks to over its CSI socket: the in-process [`Driver`] or a child
/// [`process::Proc`].
pub trait Csi {
    /// A channel to its CSI socket.
    fn channel(&self) -> Channel;

    /// A fresh path under its directory (not created).
    fn path(&self, name: &str) -> PathBuf;

    fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel())
    }

    fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel())
    }

    fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel())
    }

    fn group_controller(&self) -> GroupControllerClient<Channel> {
        GroupControllerClient::new(self.channel())
    }

    /// CreateVolume: the volume, or the refusal.
    async fn create(&self, request: proto::CreateVolumeRequest) -> Result<proto::Volume, Status> {
        let response = self.controller().create_volume(request).await?;
        Ok(response.into_inner().volume.expect("volume in response"))
    }

    /// Creates a volume and returns it.
    async fn create_volume(&self, name: &str, size: i64, params: &[(&str, &str)]) -> proto::Volume {
        self.create(create_request(name, size, params, None))
            .await
            .expect("CreateVolume")
    }

    async fn delete_volume(&self, volume_id: &str) -> Result<(), Status> {
        self.controller()
            .delete_volume(delete_volume_request(volume_id))
            .await
            .map(drop)
    }

    async fn get_volume(&self, volume_id: &str) -> Result<proto::Volume, Status> {
        let response = self
            .controller()
            .controller_get_volume(get_volume_request(volume_id))
            .await?;
        Ok(response.into_inner().volume.expect("volume in response"))
    }

    /// CreateVolume twice with the same request: the same answer both times.
    async fn create_twice(&self, request: proto::CreateVolumeRequest) -> proto::Volume {
        let first = self.create(request.clone()).await.expect("CreateVolume");
        let second = self.create(request).await.expect("CreateVolume repeated");
        assert_eq!(first, second, "CreateVolume is idempotent");
        first
    }

    /// Every page of ListVolumes at `max_entries` a page, following the tokens.
    async fn list_volume_pages(&self, max_entries: i32) -> Vec<proto::ListVolumesResponse> {
        let mut pages: Vec<proto::ListVolumesResponse> = Vec::new();
        loop {
            let starting_token = pages.last().map(|p| p.next_token.clone());
            let page = self
                .controller()
                .list_volumes(proto::ListVolumesRequest {
                    max_entries,
                    starting_token: starting_token.unwrap_or_default(),
                })
                .await
                .expect("ListVolumes")
                .into_inner();
            let last = page.next_token.is_empty();
            pages.push(page);
            if last {
                return pages;
            }
            assert!(pages.len() < 1000, "paging does not end");
        }
    }

    /// The IDs of every volume, in the order ListVolumes gives them.
    async fn list_volume_ids(&self) -> Vec<String> {
        self.controller()
            .list_volumes(proto::ListVolumesRequest::default())
            .await
            .expect("ListVolumes")
            .into_inner()
            .entries
            .into_iter()
            .map(|e| e.volume.unwrap().volume_id)
            .collect()
    }

    /// CreateSnapshot (also the CO's poll of one being cut): the snapshot.
    async fn create_snapshot(&self, name: &str, source_volume_id: &str) -> proto::Snapshot {
        self.controller()
            .create_snapshot(snapshot_request(name, source_volume_id))
            .await
            .expect("CreateSnapshot")
            .into_inner()
            .snapshot
            .expect("snapshot in response")
    }

    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), Status> {
        self.controller()
            .delete_snapshot(delete_snapshot_request(snapshot_id))
            .await
            .map(drop)
    }

    async fn stage(&self, volume_id: &str, staging: &Path, cap: &proto::VolumeCapability) {
        self.node()
            .node_stage_volume(stage_request(volume_id, staging, cap))
            .await
            .expect("NodeStageVolume");
    }

    async fn unstage(&self, volume_id: &str, staging: &Path) {
        self.node()
            .node_unstage_volume(unstage_request(volume_id, staging))
            .await
            .expect("NodeUnstageVolume");
    }

    async fn publish(
        &self,
        volume_id: &str,
        staging: &Path,
        target: &Path,
        cap: &proto::VolumeCapability,
    ) {
        self.node()
            .node_publish_volume(publish_request(volume_id, staging, target, cap, false))
            .await
            .expect("NodePublishVolume");
    }

    async fn unpublish(&self, volume_id: &str, target: &Path) {
        self.node()
            .node_unpublish_volume(unpublish_request(volume_id, target))
            .await
            .expect("NodeUnpublishVolume");
    }

    /// Stages and publishes a volume at `stage-<tag>` (made here) and `target-<tag>`;
    /// returns the staging path and the target path (a directory for mount access,
    /// the device file for block access).
    async fn stage_and_publish(
        &self,
        volume_id: &str,
        cap: &proto::VolumeCapability,
        tag: &str,
    ) -> (PathBuf, PathBuf) {
        let staging = self.path(&format!("stage-{tag}"));
        std::fs::create_dir_all(&staging).unwrap();
        let target = self.path(&format!("target-{tag}"));
        self.stage(volume_id, &staging, cap).await;
        self.publish(volume_id, &staging, &target, cap).await;
        (staging, target)
    }

    async fn unpublish_and_unstage(&self, volume_id: &str, staging: &Path, target: &Path) {
        self.unpublish(volume_id, target).await;
        self.unstage(volume_id, staging).await;
    }
}

/// A channel to the CSI socket at `socket`, connected at its first call.
pub fn lazy_channel(socket: &Path) -> Channel {
    kura::csi::client::connect_lazy(socket)
}

/// Removes a test directory (see [`cleanup`]) when dropped: the last field of what
/// owns the directory, so that the processes using it are stopped first.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        cleanup(&self.0);
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The test pause points of a driver (see `kura::sys::pause`): a test arms a point,
/// waits until the driver is held there, checks what it must while the operation is
/// in flight (or kills the process), and releases it.
pub struct PausePoints {
    dir: PathBuf,
}

/// An armed pause point; released when dropped, also when a test fails, so no
/// operation stays held after its test.
pub struct Armed {
    file: PathBuf,
    reached: PathBuf,
}

impl PausePoints {
    pub fn new(dir: &Path) -> PausePoints {
        std::fs::create_dir_all(dir).unwrap();
        PausePoints {
            dir: dir.to_owned(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Arms `point`: the next operation that comes to it stops there.
    pub fn arm(&self, point: &str) -> Armed {
        let file = self.dir.join(point);
        let reached = self.dir.join(format!("{point}.reached"));
        // A process killed while held there could not take its marker away.
        let _ = std::fs::remove_file(&reached);
        std::fs::write(&file, b"").unwrap();
        Armed { file, reached }
    }
}

impl Armed {
    /// Whether an operation is held at the point now.
    pub fn is_held(&self) -> bool {
        self.reached.exists()
    }

    /// Waits until an operation is held at the point. Fails if `ended` says the
    /// operation it waits for finished first, or after a generous deadline.
    pub async fn held(&self, ended: impl Fn() -> bool) {
        let started = std::time::Instant::now();
        while !self.is_held() {
            assert!(
                !ended(),
                "the operation ended before it reached {}",
                self.file.display()
            );
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no operation reached {} in 60 s",
                self.file.display()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Lets the held operation go on.
    pub fn release(self) {}
}

impl Drop for Armed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Whether the filesystem mounted at `mount_point` is frozen, found without blocking:
/// a second FIFREEZE of a frozen filesystem fails with EBUSY. (One that is not frozen
/// is frozen and thawed at once.)
pub fn is_frozen(mount_point: &Path) -> bool {
    match kura::sys::fs::freeze(mount_point) {
        Ok(()) => {
            kura::sys::fs::thaw(mount_point).expect("thaw after the probe");
            false
        }
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => true,
        Err(e) => panic!("probing {}: {e}", mount_point.display()),
    }
}

/// Thaws a filesystem when dropped, so a test that fails while a volume is frozen does
/// not leave blocked writers and an unmountable filesystem behind.
pub struct ThawOnDrop(pub PathBuf);

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        let _ = kura::sys::fs::thaw(&self.0);
    }
}

/// What a driver living in `dir` with its pool at `pool` has left on this machine
/// beyond its empty pool: volume and snapshot files, attachment records, mounts under
/// `dir` other than the pool's own, and loop devices backed by files in the pool.
pub fn leftovers(dir: &Path, pool: &Path) -> Vec<String> {
    let mut left = Vec::new();
    for sub in ["volumes", "snapshots"] {
        for entry in std::fs::read_dir(pool.join(sub))
            .into_iter()
            .flatten()
            .flatten()
        {
            left.push(format!("file {}", entry.path().display()));
        }
    }
    let records = dir.join("state/attachments");
    for entry in std::fs::read_dir(records).into_iter().flatten().flatten() {
        left.push(format!("attachment record {}", entry.path().display()));
    }
    for mount in kura::sys::mountinfo::read().unwrap() {
        if mount.mount_point.starts_with(dir) && mount.mount_point != pool {
            left.push(format!("mount {}", mount.mount_point.display()));
        }
    }
    let prefix = format!("{}/", pool.display());
    for device in kura::sys::loopdev::list_bound().unwrap() {
        if device.backing_name.starts_with(&prefix) {
            left.push(format!(
                "loop device {} on {}",
                device.path.display(),
                device.backing_name
            ));
        }
    }
    left
}

/// Puts a fresh ext4 filesystem (which cannot reflink) under the driver's pool
/// directory and restarts the driver on it; returns the pool root. The image, its loop
/// device and the mount all live under the driver's test directory, so the driver's own
/// cleanup removes them (deepest mounts first, then loop devices, in rounds) even if
/// the test fails.
pub async fn restart_on_ext4_pool(driver: &mut Driver) -> PathBuf {
    driver.stop().await;
    let image = driver.path("ext4-pool.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 * GIB as u64)
        .unwrap();
    let device = kura::sys::loopdev::attach(&image, false).expect("attach the ext4 pool image");
    kura::sys::mkfs::format(&device, kura::sys::FsType::Ext4, false)
        .expect("mkfs.ext4 on the pool image");
    let root = driver.pool_root();
    kura::sys::mount::mount_fs(&device, &root, kura::sys::FsType::Ext4, &[])
        .expect("mount the ext4 pool");
    assert!(
        !kura::sys::fs::supports_reflink(&root).unwrap(),
        "the test pool must not reflink"
    );
    driver.restart().await;
    root
}

/// A new temporary directory for one test's driver, under /tmp (short paths keep loop
/// devices' recorded backing names whole).
pub fn test_dir() -> PathBuf {
    tempfile::Builder::new()
        .prefix("kura-test")
        .tempdir_in("/tmp")
        .expect("temp dir")
        .keep()
}

/// The `all-in-one` subcommand and its flags for a driver living in `dir`.
pub fn all_in_one_args(dir: &Path, socket: &Path, kind: &PoolKind) -> Vec<String> {
    let mut args: Vec<String> = [
        "all-in-one",
        "--endpoint",
        &format!("unix://{}", socket.display()),
        "--node-id",
        NODE_ID,
        "--state-dir",
        &dir.join("state").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match kind {
        PoolKind::Image => args.extend([
            "--pool-image".into(),
            dir.join("pool.img").display().to_string(),
            "--pool-size".into(),
            format!("{}Gi", POOL_SIZE / GIB),
        ]),
        PoolKind::Dir => {
            let pool = dir.join("pool-dir");
            std::fs::create_dir_all(&pool).unwrap();
            args.extend(["--pool-dir".into(), pool.display().to_string()]);
        }
        PoolKind::OnHost {
            host_bytes,
            pool_size,
        } => {
            make_host(dir, *host_bytes);
            args.extend([
                "--pool-image".into(),
                host_dir(dir).join("pool.img").display().to_string(),
                "--pool-size".into(),
                pool_size.to_string(),
            ]);
        }
    }
    args
}

/// The pool root a driver started with `args` in `dir` uses.
pub fn pool_root(dir: &Path, args: &[String]) -> PathBuf {
    match args.iter().position(|a| a == "--pool-dir") {
        Some(i) => PathBuf::from(&args[i + 1]),
        None => dir.join("state/pool"),
    }
}

/// Removes everything under `dir`: its mounts (deepest first), the loop devices backed
/// by files under it, then the files. Several rounds, because a pool cannot be
/// unmounted while loop devices still hold its images.
pub fn cleanup(dir: &Path) {
    let prefix = format!("{}/", dir.display());
    for _ in 0..5 {
        let mounts: Vec<PathBuf> = kura::sys::mountinfo::read()
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(dir))
            .collect();
        for mount in mounts.iter().rev() {
            let _ = kura::sys::mount::unmount(mount);
        }
        let loops: Vec<_> = kura::sys::loopdev::list_bound()
            .unwrap_or_default()
            .into_iter()
            .filter(|d| d.backing_name.starts_with(&prefix))
            .collect();
        for device in &loops {
            let _ = kura::sys::loopdev::detach(&device.path);
        }
        if mounts.is_empty() && loops.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The topology segment of one node.
pub fn node_topology(node_id: &str) -> proto::Topology {
    proto::Topology {
        segments: requests::string_map(&[(TOPOLOGY_KEY, node_id)]),
    }
}

/// The ID a volume of this name gets on the test node.
pub fn volume_id(name: &str) -> VolumeId {
    VolumeId::derive(name, &NodeToken::for_node(NODE_ID))
}

/// The ID a snapshot of this name gets on the test node.
pub fn snapshot_id(name: &str) -> SnapshotId {
    SnapshotId::derive(name, &NodeToken::for_node(NODE_ID))
}

/// A volume's image in the pool at `pool`.
pub fn volume_image(pool: &Path, volume_id: &str) -> PathBuf {
    pool.join("volumes").join(format!("{volume_id}.img"))
}

/// A snapshot's image in the pool at `pool`.
pub fn snapshot_image(pool: &Path, snapshot_id: &str) -> PathBuf {
    pool.join("snapshots").join(format!("{snapshot_id}.img"))
}

/// Whether something is mounted at `path`.
pub fn is_mounted(path: &Path) -> bool {
    let table = kura::sys::mountinfo::read().expect("read mountinfo");
    kura::sys::mountinfo::find_mount(&table, path).is_some()
}

/// Asserts that `result` failed with `code` and a message containing every `needle`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(
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

/// A deterministic pattern of `len` bytes, different for each `seed`.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes `data` at `offset` of a file or device and makes it durable.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for write");
    file.write_all_at(data, offset).expect("write");
    file.sync_all().expect("fsync");
}

/// Writes `data` as the whole of a new file and makes it durable.
pub fn write_file(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("create");
    file.write_all(data).expect("write");
    file.sync_all().expect("fsync");
}

/// Reads `len` bytes at `offset` of a file or device, bypassing nothing: block devices
/// are read through O_DIRECT so the page cache cannot answer for the disk.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).expect("open for read");
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).expect("read");
    buf
}
