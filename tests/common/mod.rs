//! Test harness: a real all-in-one kura server on a temporary Unix socket, over a
//! self-made image pool, with generated gRPC clients. Everything a test makes (mounts,
//! loop devices, files) lives under one temporary directory and is removed on drop,
//! even when the test fails.

#![allow(dead_code)]

pub mod process;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use kura::cli::{Cli, Command};
use kura::csi::proto::controller_client::ControllerClient;
use kura::csi::proto::identity_client::IdentityClient;
use kura::csi::proto::node_client::NodeClient;
use kura::csi::proto::{self, volume_capability};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

pub const NODE_ID: &str = "test-node";
pub const MIB: i64 = 1 << 20;
pub const GIB: i64 = 1 << 30;

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
    kura::sys::mkfs::format(&device, "ext4").expect("mkfs.ext4 on the host image");
    let mount = host_dir(dir);
    std::fs::create_dir_all(&mount).unwrap();
    kura::sys::mount::mount_fs(&device, &mount, "ext4", &[]).expect("mount the host");
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
}

impl Driver {
    pub async fn start() -> Driver {
        Self::start_with(PoolKind::Image, &[]).await
    }

    pub async fn start_with(kind: PoolKind, extra: &[&str]) -> Driver {
        let dir = test_dir();
        let socket = dir.join("csi.sock");
        let mut args = vec!["kura".to_owned()];
        args.extend(all_in_one_args(&dir, &socket, &kind));
        args.extend(extra.iter().map(|s| s.to_string()));
        let pause = PausePoints::new(&dir.join("pause"));
        let mut driver = Driver {
            pause,
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
        self.channel = connect(&self.socket).await;
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

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    /// The pool's root directory.
    pub fn pool_root(&self) -> PathBuf {
        pool_root(&self.dir, &self.args)
    }

    /// A fresh path under the test directory (not created).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates a volume and returns it.
    pub async fn create_volume(
        &self,
        name: &str,
        size: i64,
        params: &[(&str, &str)],
    ) -> proto::Volume {
        self.controller()
            .create_volume(create_request(name, size, params, None))
            .await
            .expect("CreateVolume")
            .into_inner()
            .volume
            .expect("volume in response")
    }

    /// Deletes a volume, which must succeed.
    pub async fn delete_volume(&self, id: &str) {
        self.controller()
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            })
            .await
            .expect("DeleteVolume");
    }

    /// Stages and publishes a volume; returns the target path (a directory for mount
    /// access, the device file for block access).
    pub async fn stage_and_publish(
        &self,
        volume_id: &str,
        cap: &proto::VolumeCapability,
        tag: &str,
    ) -> (PathBuf, PathBuf) {
        let staging = self.path(&format!("stage-{tag}"));
        std::fs::create_dir_all(&staging).unwrap();
        let target = self.path(&format!("target-{tag}"));
        self.node()
            .node_stage_volume(stage_request(volume_id, &staging, cap))
            .await
            .expect("NodeStageVolume");
        self.node()
            .node_publish_volume(publish_request(volume_id, &staging, &target, cap, false))
            .await
            .expect("NodePublishVolume");
        (staging, target)
    }

    pub async fn unpublish_and_unstage(&self, volume_id: &str, staging: &Path, target: &Path) {
        self.node()
            .node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
                volume_id: volume_id.into(),
                target_path: target.display().to_string(),
            })
            .await
            .expect("NodeUnpublishVolume");
        self.node()
            .node_unstage_volume(proto::NodeUnstageVolumeRequest {
                volume_id: volume_id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .expect("NodeUnstageVolume");
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
        cleanup(&self.dir);
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
    kura::sys::mkfs::format(&device, "ext4").expect("mkfs.ext4 on the pool image");
    let root = driver.pool_root();
    kura::sys::mount::mount_fs(&device, &root, "ext4", &[]).expect("mount the ext4 pool");
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
            "16Gi".into(),
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

async fn connect(socket: &Path) -> Channel {
    kura::csi::client::connect(socket)
        .await
        .expect("connects to the driver socket")
}

pub fn mount_cap(fs_type: &str) -> proto::VolumeCapability {
    cap_with_mode(
        volume_capability::AccessType::Mount(volume_capability::MountVolume {
            fs_type: fs_type.into(),
            ..Default::default()
        }),
        volume_capability::access_mode::Mode::SingleNodeWriter,
    )
}

pub fn block_cap() -> proto::VolumeCapability {
    cap_with_mode(
        volume_capability::AccessType::Block(volume_capability::BlockVolume {}),
        volume_capability::access_mode::Mode::SingleNodeWriter,
    )
}

pub fn cap_with_mode(
    access: volume_capability::AccessType,
    mode: volume_capability::access_mode::Mode,
) -> proto::VolumeCapability {
    proto::VolumeCapability {
        access_type: Some(access),
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn create_request(
    name: &str,
    size: i64,
    params: &[(&str, &str)],
    source: Option<proto::VolumeContentSource>,
) -> proto::CreateVolumeRequest {
    proto::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap("")],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
        volume_content_source: source,
        ..Default::default()
    }
}

pub fn stage_request(
    volume_id: &str,
    staging: &Path,
    cap: &proto::VolumeCapability,
) -> proto::NodeStageVolumeRequest {
    proto::NodeStageVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    }
}

pub fn publish_request(
    volume_id: &str,
    staging: &Path,
    target: &Path,
    cap: &proto::VolumeCapability,
    readonly: bool,
) -> proto::NodePublishVolumeRequest {
    proto::NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap.clone()),
        readonly,
        ..Default::default()
    }
}

pub fn snapshot_source(snapshot_id: &str) -> proto::VolumeContentSource {
    proto::VolumeContentSource {
        r#type: Some(proto::volume_content_source::Type::Snapshot(
            proto::volume_content_source::SnapshotSource {
                snapshot_id: snapshot_id.into(),
            },
        )),
    }
}

pub fn volume_source(volume_id: &str) -> proto::VolumeContentSource {
    proto::VolumeContentSource {
        r#type: Some(proto::volume_content_source::Type::Volume(
            proto::volume_content_source::VolumeSource {
                volume_id: volume_id.into(),
            },
        )),
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
