//! Multi-process harness: a controller (or several) and nodes as separate `kura`
//! processes, each node with its own sparse image pool in its own directory and its
//! agent on its own loopback address (127.0.0.2, .3, ...), certificates from
//! `kura certs` made for the run. Faults are real: SIGKILL, SIGSTOP.
//!
//! Drop kills every child this harness started (by PID), then removes the mounts,
//! loop devices and files under the run's directory, even when the test fails.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kura::csi::proto;
use kura::csi::proto::controller_client::ControllerClient;
use kura::csi::proto::identity_client::IdentityClient;
use kura::csi::proto::node_client::NodeClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::Channel;

use crate::common::{PausePoints, cleanup, test_dir};

/// How long a process may take to come up.
pub const START_DEADLINE: Duration = Duration::from_secs(60);

/// One `kura` child process and its logs.
pub struct Proc {
    pub name: String,
    pub args: Vec<String>,
    dir: PathBuf,
    child: Option<Child>,
    runs: usize,
    /// The process's test pause points (`KURA_TEST_PAUSE_DIR` points here).
    pub pause: PausePoints,
}

impl Proc {
    fn new(name: &str, dir: &Path, args: Vec<String>) -> Proc {
        Proc {
            name: name.to_owned(),
            args,
            dir: dir.to_owned(),
            child: None,
            runs: 0,
            pause: PausePoints::new(&dir.join(format!("{name}-pause"))),
        }
    }

    fn log_path(&self, run: usize) -> PathBuf {
        self.dir.join(format!("{}-{run}.log", self.name))
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        self.runs += 1;
        let log = std::fs::File::create(self.log_path(self.runs)).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kura"))
            .args(&self.args)
            .env("RUST_LOG", "info,kura=debug")
            .env(kura::sys::pause::ENV, self.pause.dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("kura starts");
        self.child = Some(child);
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// Panics with the logs if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait().unwrap()
        {
            self.child = None;
            panic!("{} exited ({status}):\n{}", self.name, self.logs());
        }
    }

    /// SIGKILL, as a crash would stop it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP, returning once every thread of the process has stopped: the signal
    /// is delivered as each thread next runs, and a thread still running could answer
    /// one more call.
    pub fn stop_signal(&self) {
        kill(self.pid(), Signal::SIGSTOP).expect("SIGSTOP");
        let tasks = format!("/proc/{}/task", self.pid());
        let all_stopped = || {
            std::fs::read_dir(&tasks).unwrap().flatten().all(|task| {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                // The state follows the parenthesised command name.
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|rest| rest.trim().chars().next());
                matches!(state, Some('T') | Some('t'))
            })
        };
        let started = std::time::Instant::now();
        while !all_stopped() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "{} did not stop",
                self.name
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    pub fn continue_signal(&self) {
        kill(self.pid(), Signal::SIGCONT).expect("SIGCONT");
    }

    pub fn logs(&self) -> String {
        (1..=self.runs)
            .map(|run| {
                let text = std::fs::read_to_string(self.log_path(run)).unwrap_or_default();
                format!("--- {} run {run} ---\n{text}", self.name)
            })
            .collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A stopped process still dies of SIGKILL; SIGCONT first anyway so
            // nothing lingers half-stopped.
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
        }
        self.kill();
    }
}

pub struct NodeProc {
    pub id: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub agent: SocketAddr,
    pub proc: Proc,
}

impl NodeProc {
    pub async fn channel(&self) -> Channel {
        kura::csi::client::connect(&self.socket)
            .await
            .expect("connects to the node socket")
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    /// A fresh path under the node's directory (not created).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Starts the node and waits until its CSI socket answers Probe.
    pub async fn start(&mut self) {
        self.proc.spawn();
        let started = Instant::now();
        loop {
            self.proc.assert_running();
            if let Ok(channel) = kura::csi::client::connect(&self.socket).await
                && IdentityClient::new(channel)
                    .probe(proto::ProbeRequest {})
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                started.elapsed() < START_DEADLINE,
                "{} did not come up:\n{}",
                self.id,
                self.proc.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub struct ControllerProc {
    pub socket: PathBuf,
    pub proc: Proc,
}

impl ControllerProc {
    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(
            kura::csi::client::connect(&self.socket)
                .await
                .expect("connects to the controller socket"),
        )
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(
            kura::csi::client::connect(&self.socket)
                .await
                .expect("connects to the controller socket"),
        )
    }

    /// Starts the controller and waits until its socket answers.
    pub async fn start(&mut self) {
        self.proc.spawn();
        let started = Instant::now();
        loop {
            self.proc.assert_running();
            if let Ok(channel) = kura::csi::client::connect(&self.socket).await
                && IdentityClient::new(channel)
                    .probe(proto::ProbeRequest {})
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                started.elapsed() < START_DEADLINE,
                "controller did not come up:\n{}",
                self.proc.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Available capacity the controller reports for one node's segment.
    pub async fn capacity(&self, node_id: &str) -> i64 {
        self.controller()
            .await
            .get_capacity(proto::GetCapacityRequest {
                accessible_topology: Some(kura::csi::node_topology(node_id)),
                ..Default::default()
            })
            .await
            .expect("GetCapacity")
            .into_inner()
            .available_capacity
    }

    /// Waits until the controller reports capacity for every one of `nodes`.
    pub async fn wait_for_nodes(&self, nodes: &[&str]) {
        let started = Instant::now();
        for node in nodes {
            while self.capacity(node).await == 0 {
                assert!(
                    started.elapsed() < START_DEADLINE,
                    "the controller did not find {node}:\n{}",
                    self.proc.logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A run: certificates, nodes and controllers under one temporary directory.
pub struct Cluster {
    pub dir: PathBuf,
    pub certs: PathBuf,
    // Dropped before `dir` is cleaned: children first.
    pub controllers: Vec<ControllerProc>,
    pub nodes: Vec<NodeProc>,
}

/// A free TCP port on `ip` (bound and released at once).
pub fn free_port(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .expect("bind a loopback address")
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `kura certs --out dir`.
pub fn make_certs(dir: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_kura"))
        .args(["certs", "--out"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("kura certs runs");
    assert!(status.success(), "kura certs failed: {status}");
}

impl Cluster {
    /// Makes certificates and the node processes' flags (not started). Node `i` is
    /// `node-<letter>` on 127.0.0.(2+i) with a pool of `sizes[i]`.
    pub fn new(sizes: &[&str]) -> Cluster {
        let dir = test_dir();
        let certs = dir.join("certs");
        make_certs(&certs);
        let mut cluster = Cluster {
            dir,
            certs,
            controllers: vec![],
            nodes: vec![],
        };
        for (i, size) in sizes.iter().enumerate() {
            cluster.add_node(i, size);
        }
        cluster
    }

    fn add_node(&mut self, i: usize, size: &str) {
        let id = format!("node-{}", (b'a' + i as u8) as char);
        let ip = Ipv4Addr::new(127, 0, 0, 2 + i as u8);
        let agent = SocketAddr::from((ip, free_port(ip)));
        let dir = self.dir.join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("csi.sock");
        let args = node_args(&id, &dir, size, agent, &self.certs.join("node"));
        self.nodes.push(NodeProc {
            proc: Proc::new(&id, &dir, args),
            id,
            dir,
            socket,
            agent,
        });
    }

    /// Starts every node and one controller, and waits until it sees every node.
    pub async fn start(sizes: &[&str]) -> Cluster {
        let mut cluster = Cluster::new(sizes);
        for node in &mut cluster.nodes {
            node.start().await;
        }
        cluster.add_controller().await;
        cluster
    }

    /// Starts another controller over the static agent list and waits until it sees
    /// every node; returns its index.
    pub async fn add_controller(&mut self) -> usize {
        let controller = self.start_controller(&self.certs.join("controller")).await;
        let ids: Vec<&str> = self.nodes.iter().map(|n| n.id.as_str()).collect();
        controller.wait_for_nodes(&ids).await;
        self.controllers.push(controller);
        self.controllers.len() - 1
    }

    /// Starts a controller with the identity in `tls` over the static agent list,
    /// without waiting for it to find anything; it is the caller's to keep (and drop).
    pub async fn start_controller(&self, tls: &Path) -> ControllerProc {
        self.start_controller_with(tls, &[]).await
    }

    /// [`Cluster::start_controller`] with more flags after the harness's own.
    pub async fn start_controller_with(&self, tls: &Path, extra: &[String]) -> ControllerProc {
        let name = format!("controller-{}", free_port(Ipv4Addr::LOCALHOST));
        let socket = self.dir.join(format!("{name}.sock"));
        let mut args: Vec<String> = vec![
            "controller".into(),
            "--endpoint".into(),
            format!("unix://{}", socket.display()),
            "--tls-dir".into(),
            tls.display().to_string(),
        ];
        for node in &self.nodes {
            args.extend(["--agent".into(), node.agent.to_string()]);
        }
        args.extend(extra.iter().cloned());
        let mut controller = ControllerProc {
            socket,
            proc: Proc::new(&name, &self.dir, args),
        };
        controller.start().await;
        controller
    }

    pub fn controller(&self) -> &ControllerProc {
        &self.controllers[0]
    }

    pub fn node(&self, id: &str) -> &NodeProc {
        self.nodes.iter().find(|n| n.id == id).expect("known node")
    }

    pub fn node_mut(&mut self, id: &str) -> &mut NodeProc {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .expect("known node")
    }

    /// Every process's logs, for a failing test.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for c in &self.controllers {
            all.push_str(&c.proc.logs());
        }
        for n in &self.nodes {
            all.push_str(&n.proc.logs());
        }
        all
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.controllers.clear();
        self.nodes.clear();
        cleanup(&self.dir);
    }
}

/// The `node` subcommand and its flags for a node living in `dir`.
pub fn node_args(id: &str, dir: &Path, size: &str, agent: SocketAddr, tls: &Path) -> Vec<String> {
    [
        "node",
        "--endpoint",
        &format!("unix://{}", dir.join("csi.sock").display()),
        "--node-id",
        id,
        "--state-dir",
        &dir.join("state").display().to_string(),
        "--pool-image",
        &dir.join("pool.img").display().to_string(),
        "--pool-size",
        size,
        "--agent-listen",
        &agent.to_string(),
        "--tls-dir",
        &tls.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A topology requirement naming nodes: `requisite` and `preferred` in order.
pub fn topology(requisite: &[&str], preferred: &[&str]) -> proto::TopologyRequirement {
    proto::TopologyRequirement {
        requisite: requisite
            .iter()
            .map(|n| kura::csi::node_topology(n))
            .collect(),
        preferred: preferred
            .iter()
            .map(|n| kura::csi::node_topology(n))
            .collect(),
    }
}

/// A snapshot of `volume` named `name`, which must be cut.
pub async fn snapshot(controller: &ControllerProc, volume: &str, name: &str) -> proto::Snapshot {
    controller
        .controller()
        .await
        .create_snapshot(proto::CreateSnapshotRequest {
            source_volume_id: volume.into(),
            name: name.into(),
            ..Default::default()
        })
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .unwrap()
}

/// A create request for a volume on one node (the strict topology the provisioner
/// sends with WaitForFirstConsumer).
pub fn on_node(
    name: &str,
    size: i64,
    node: &str,
    cap: proto::VolumeCapability,
    source: Option<proto::VolumeContentSource>,
) -> proto::CreateVolumeRequest {
    proto::CreateVolumeRequest {
        accessibility_requirements: Some(topology(&[node], &[node])),
        volume_capabilities: vec![cap],
        ..crate::common::create_request(name, size, &[], source)
    }
}

/// The node a volume is accessible on.
pub fn volume_node(volume: &proto::Volume) -> String {
    volume.accessible_topology[0].segments[kura::csi::TOPOLOGY_KEY].clone()
}
