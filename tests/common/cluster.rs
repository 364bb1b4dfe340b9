//! Multi-process harness: a controller (or several) and nodes as separate `kura`
//! processes, each node with its own sparse image pool in its own directory and its
//! agent on its own loopback address (127.0.0.2, .3, ...), certificates from
//! `kura certs` made for the run. Faults are real: SIGKILL, SIGSTOP.
//!
//! Drop kills every child this harness started (by PID), then removes the mounts,
//! loop devices and files under the run's directory, even when the test fails.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kura::csi::proto;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::process::Proc;
use super::{RemoveOnDrop, SOCKET, TOPOLOGY_KEY, node_topology, test_dir};

/// A `kura node` process: its ID and its agent's address.
pub struct NodeProc {
    pub id: String,
    pub agent: SocketAddr,
    proc: Proc,
}

is_a_proc!(NodeProc);

impl NodeProc {
    pub fn pool_root(&self) -> PathBuf {
        self.dir.join("state/pool")
    }
}

/// A run: certificates, nodes and controllers under one temporary directory.
pub struct Cluster {
    pub dir: PathBuf,
    pub certs: PathBuf,
    pub controllers: Vec<Proc>,
    pub nodes: Vec<NodeProc>,
    // Last: the processes are stopped before their directory is removed.
    _dir: RemoveOnDrop,
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
            _dir: RemoveOnDrop(dir.clone()),
            dir,
            certs,
            controllers: vec![],
            nodes: vec![],
        };
        for (i, size) in sizes.iter().enumerate() {
            cluster.add_node(i, size);
        }
        // Every node finds the others itself, as replication needs.
        let agents: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.agent).collect();
        for node in &mut cluster.nodes {
            for agent in agents.iter().filter(|a| **a != node.agent) {
                node.proc
                    .args
                    .extend(["--peer".to_owned(), agent.to_string()]);
            }
        }
        cluster
    }

    fn add_node(&mut self, i: usize, size: &str) {
        let id = format!("node-{}", (b'a' + i as u8) as char);
        let ip = Ipv4Addr::new(127, 0, 0, 2 + i as u8);
        let agent = SocketAddr::from((ip, free_port(ip)));
        let dir = self.dir.join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        let args = node_args(&id, &dir, size, agent, &self.certs.join("node"));
        self.nodes.push(NodeProc {
            proc: Proc::new(&id, &dir, dir.join(SOCKET), args),
            id,
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
        self.add_controller_with(&[]).await
    }

    /// [`Cluster::add_controller`] with more flags after the harness's own.
    pub async fn add_controller_with(&mut self, extra: &[String]) -> usize {
        let controller = self
            .start_controller_with(&self.certs.join("controller"), extra)
            .await;
        let ids: Vec<&str> = self.nodes.iter().map(|n| n.id.as_str()).collect();
        controller.wait_for_nodes(&ids).await;
        self.controllers.push(controller);
        self.controllers.len() - 1
    }

    /// Starts a controller with the identity in `tls` over the static agent list,
    /// without waiting for it to find anything; it is the caller's to keep (and drop).
    pub async fn start_controller(&self, tls: &Path) -> Proc {
        self.start_controller_with(tls, &[]).await
    }

    /// [`Cluster::start_controller`] with more flags after the harness's own.
    pub async fn start_controller_with(&self, tls: &Path, extra: &[String]) -> Proc {
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
        let mut controller = Proc::new(&name, &self.dir, socket, args);
        controller.start().await;
        controller
    }

    pub fn controller(&self) -> &Proc {
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

    /// Every process's logs.
    pub fn logs(&self) -> String {
        let procs = self
            .controllers
            .iter()
            .chain(self.nodes.iter().map(|n| &n.proc));
        procs.map(Proc::logs).collect()
    }
}

/// The `node` subcommand and its flags for a node living in `dir`.
pub fn node_args(id: &str, dir: &Path, size: &str, agent: SocketAddr, tls: &Path) -> Vec<String> {
    [
        "node",
        "--endpoint",
        &format!("unix://{}", dir.join(SOCKET).display()),
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
        requisite: requisite.iter().map(|n| node_topology(n)).collect(),
        preferred: preferred.iter().map(|n| node_topology(n)).collect(),
    }
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
    volume.accessible_topology[0].segments[TOPOLOGY_KEY].clone()
}

/// A TLS client to an agent trusting `ca`, with the identity in `identity` if any.
pub fn agent_client(
    address: SocketAddr,
    ca: &Path,
    identity: Option<&Path>,
) -> kura::agent::proto::agent_client::AgentClient<Channel> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name(kura::agent::tls::NODE_NAME);
    if let Some(dir) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(dir.join("tls.crt")).unwrap(),
            std::fs::read(dir.join("tls.key")).unwrap(),
        ));
    }
    let channel = Endpoint::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy();
    kura::agent::proto::agent_client::AgentClient::new(channel)
        .max_decoding_message_size(kura::agent::transfer::MAX_MESSAGE)
}
