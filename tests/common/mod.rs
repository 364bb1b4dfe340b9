//! Test harness: a real all-in-one kura server on a temporary Unix socket, over a
//! self-made image pool, with generated gRPC clients. Everything a test makes (mounts,
//! loop devices, files) lives under one temporary directory and is removed on drop,
//! even when the test fails.

#![allow(dead_code)]

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
}

pub struct Driver {
    pub dir: PathBuf,
    socket: PathBuf,
    args: Vec<String>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    pub channel: Channel,
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
        let mut driver = Driver {
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
        let built = tokio::task::spawn_blocking(move || kura::server::AllInOneDriver::open(&args))
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

/// Reads `len` bytes at `offset` of a file or device, bypassing nothing: block devices
/// are read through O_DIRECT so the page cache cannot answer for the disk.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).expect("open for read");
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).expect("read");
    buf
}
