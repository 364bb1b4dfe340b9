//! The controller's side of the agent API: [`Pools`] over every node's agent.
//!
//! # Finding agents
//!
//! Every [`DISCOVERY_INTERVAL`] the controller resolves its targets (`--agents NAME:PORT`
//! gives every address DNS returns for NAME, as for a headless Service; `--agent
//! ADDR:PORT` a fixed address) and starts watching each address it is not watching
//! yet: connect (mutual TLS), ask Info (node ID, token, pool ID, instance ID), then
//! follow the agent's status stream. The latest status is the node's capacity and
//! health. Nothing is stored: a restarted controller finds the agents again.
//!
//! # Liveness and bounds
//!
//! An agent whose stream has been silent for [`LIVENESS_DEADLINE`] (it sends one per
//! [`server::STATUS_INTERVAL`](super::server::STATUS_INTERVAL)), or whose connection
//! fails its HTTP/2 keepalive, is down: calls in flight to it end at once with
//! [`Error::Unreachable`], new calls for its volumes get the same without being sent,
//! its capacity is 0 and placement skips it. Every call also has its own timeout
//! ([`READ_TIMEOUT`], [`WRITE_TIMEOUT`]), so no call waits on a node forever.
//!
//! # Guarantees
//!
//! - A call on a node that is down, unknown or silent ends with [`Error::Unreachable`]
//!   within [`LIVENESS_DEADLINE`] (plus a keepalive round) or its own timeout: never a
//!   hang, never a success that did not happen.
//! - An agent's error comes back with its code and message unchanged.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Response, Status};

use super::errors::decode;
use super::proto::agent_client::AgentClient;
use super::{Error, Found, Node, Pools, Progress, Ranges, Result, proto, wire};
use crate::pool::cbt::Query;
use crate::pool::group::GroupSnapshot;
use crate::pool::{
    Condition, ContentSource, GroupSnapshotId, NodeToken, Provisioning, Snapshot, SnapshotId,
    Timestamp, Volume, VolumeId, VolumeSpec, size,
};

/// How often the targets are resolved again and new addresses watched.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(2);
/// An agent silent for this long is down.
pub const LIVENESS_DEADLINE: Duration = Duration::from_secs(3);
/// Connecting (TCP and TLS) to an agent.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 keepalive: a ping this often, and the connection is dropped when one is not
/// answered within [`KEEPALIVE_TIMEOUT`].
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Calls that only read.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Calls that write (a clone on a pool without reflink copies data).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(120);

/// What the controller asks agents for: its targets and its TLS identity.
#[derive(Debug, Clone)]
pub struct Config {
    /// `HOST:PORT` strings, resolved every round (an IP address resolves to itself).
    pub targets: Vec<String>,
    pub tls: ClientTlsConfig,
}

/// Every node's pool, through its agent.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Every node seen since start, live or down.
    agents: HashMap<NodeToken, Agent>,
    /// Addresses with a watcher running.
    watching: HashSet<SocketAddr>,
    registrations: u64,
}

struct Agent {
    node: Node,
    address: SocketAddr,
    instance_id: String,
    /// Which registration this is: a watcher only marks down what it registered.
    registration: u64,
    client: AgentClient<Channel>,
    /// The latest status; `None` until the first arrives and once the agent is down.
    status: Option<proto::StatusUpdate>,
    last_seen: Instant,
    /// Becomes true when the agent goes down: in-flight calls end at once.
    down: watch::Sender<bool>,
}

impl Agent {
    fn live(&self) -> bool {
        self.status.is_some()
    }
}

impl Cluster {
    /// Starts finding agents in the background; the returned handle serves at once
    /// (with no nodes until the first are found).
    pub fn start(config: Config) -> Cluster {
        let inner = Arc::new(Inner {
            config,
            state: Mutex::new(State::default()),
        });
        tokio::spawn(discover(Arc::downgrade(&inner)));
        Cluster { inner }
    }

    /// Whether any agent is live; the error says where none was found.
    pub fn ready(&self) -> std::result::Result<(), String> {
        let state = self.inner.lock();
        if state.agents.values().any(Agent::live) {
            Ok(())
        } else {
            Err(format!(
                "no kura agent reachable yet among {}",
                self.inner.config.targets.join(", ")
            ))
        }
    }

    /// Every node whose agent was found since start, by node ID, and whether that
    /// agent is live now.
    pub fn agents(&self) -> Vec<(String, bool)> {
        let state = self.inner.lock();
        let mut agents: Vec<(String, bool)> = state
            .agents
            .values()
            .map(|a| (a.node.id.clone(), a.live()))
            .collect();
        agents.sort();
        agents
    }

    /// The latest status of `node`'s agent; `None` while it is down or unknown.
    fn latest_status(&self, node: &Node) -> Option<proto::StatusUpdate> {
        let state = self.inner.lock();
        state.agents.get(&node.token).and_then(|a| a.status.clone())
    }

    /// The client and down-signal of the live agent of `token`.
    fn live_agent(
        &self,
        token: &NodeToken,
    ) -> Result<(String, AgentClient<Channel>, watch::Receiver<bool>)> {
        let state = self.inner.lock();
        match state.agents.get(token) {
            None => Err(Error::Unreachable {
                node: token.as_str().to_owned(),
                reason: "no agent for this node has been found".to_owned(),
            }),
            Some(agent) if !agent.live() => Err(Error::Unreachable {
                node: agent.node.id.clone(),
                reason: format!(
                    "its agent at {} is down (last heard from {}s ago)",
                    agent.address,
                    agent.last_seen.elapsed().as_secs()
                ),
            }),
            Some(agent) => Ok((
                agent.node.id.clone(),
                agent.client.clone(),
                agent.down.subscribe(),
            )),
        }
    }

    /// Sends one call to the agent of `token`, bounded by `timeout` and by the agent
    /// staying live.
    async fn call<R, F, Fut>(&self, token: &NodeToken, timeout: Duration, send: F) -> Result<R>
    where
        F: FnOnce(AgentClient<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<R>, Status>>,
    {
        let (node, client, mut down) = self.live_agent(token)?;
        tokio::select! {
            _ = down.wait_for(|down| *down) => Err(Error::Unreachable {
                node,
                reason: "its agent went down during the call".to_owned(),
            }),
            answer = tokio::time::timeout(timeout, send(client)) => match answer {
                Err(_) => Err(Error::Unreachable {
                    node,
                    reason: format!("no answer within {}s", timeout.as_secs()),
                }),
                Ok(Err(status)) => Err(decode(&node, status)),
                Ok(Ok(response)) => Ok(response.into_inner()),
            },
        }
    }

    /// Sends one call to the live agent of the node the CO names `node`: how a node
    /// reaches its peers.
    pub async fn call_node<R, F, Fut>(&self, node: &str, timeout: Duration, send: F) -> Result<R>
    where
        F: FnOnce(AgentClient<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<R>, Status>>,
    {
        self.call(&NodeToken::for_node(node), timeout, send).await
    }

    /// The address the agent of `token` was found at.
    fn address(&self, token: &NodeToken) -> Result<SocketAddr> {
        let state = self.inner.lock();
        state
            .agents
            .get(token)
            .map(|a| a.address)
            .ok_or_else(|| Error::Unreachable {
                node: token.as_str().to_owned(),
                reason: "no agent for this node has been found".to_owned(),
            })
    }

    /// Nodes whose agent is live, healthy or not.
    fn live_nodes(&self) -> Vec<Node> {
        let state = self.inner.lock();
        let mut nodes: Vec<Node> = state
            .agents
            .values()
            .filter(|a| a.live())
            .map(|a| a.node.clone())
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes
    }

    /// Calls every live node at once; a node that fails is left out (it is going
    /// down, or will be seen as down within the deadline), and logged.
    async fn on_every_node<T, F, Fut>(&self, what: &str, call: F) -> Vec<T>
    where
        F: Fn(Node) -> Fut,
        Fut: Future<Output = Result<Vec<T>>>,
    {
        let nodes = self.live_nodes();
        let answers = futures_util::future::join_all(nodes.iter().cloned().map(call)).await;
        let mut all = Vec::new();
        for (node, answer) in nodes.iter().zip(answers) {
            match answer {
                Ok(items) => all.extend(items),
                Err(e) => tracing::warn!(
                    node.id = %node.id,
                    error = %crate::chain(&e),
                    "{what}: node left out of the listing"
                ),
            }
        }
        all
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Resolves the targets every round and starts a watcher for each new address. Ends
/// when the cluster handle is dropped.
async fn discover(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let targets = strong.config.targets.clone();
        drop(strong);
        let mut addresses = Vec::new();
        for target in &targets {
            match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host(target)).await {
                Ok(Ok(found)) => addresses.extend(found),
                Ok(Err(e)) => tracing::warn!(target, error = %e, "cannot resolve agent address"),
                Err(_) => tracing::warn!(target, "resolving agent address timed out"),
            }
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        for address in addresses {
            if strong.lock().watching.insert(address) {
                tokio::spawn(watch_agent(Arc::clone(&strong), address));
            }
        }
        drop(strong);
        tokio::time::sleep(DISCOVERY_INTERVAL).await;
    }
}

/// Connects to one address and follows its agent until it fails; then the address may
/// be watched again from the next discovery round.
async fn watch_agent(inner: Arc<Inner>, address: SocketAddr) {
    let registered = follow(&inner, address).await;
    let mut state = inner.lock();
    state.watching.remove(&address);
    if let Some((token, registration, reason)) = registered
        && let Some(agent) = state.agents.get_mut(&token)
        && agent.registration == registration
    {
        if agent.live() {
            tracing::warn!(node.id = %agent.node.id, %address, reason, "agent is down");
        }
        agent.status = None;
        agent.down.send_replace(true);
    }
}

/// Registers the agent at `address` and reads its status stream until it ends or goes
/// silent. Returns what it registered and why it stopped.
async fn follow(inner: &Inner, address: SocketAddr) -> Option<(NodeToken, u64, String)> {
    let endpoint = match Endpoint::from_shared(format!("https://{address}"))
        .and_then(|e| e.tls_config(inner.config.tls.clone()))
    {
        Ok(endpoint) => endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true),
        Err(e) => {
            tracing::error!(%address, error = %e, "bad agent address");
            return None;
        }
    };
    let channel = match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(e)) => {
            tracing::debug!(%address, error = %crate::chain(&e), "cannot connect to agent");
            return None;
        }
        Err(_) => {
            tracing::debug!(%address, "connecting to agent timed out");
            return None;
        }
    };
    let mut client = AgentClient::new(channel);
    let info = match tokio::time::timeout(READ_TIMEOUT, client.info(proto::InfoRequest {})).await {
        Ok(Ok(info)) => info.into_inner(),
        Ok(Err(status)) => {
            tracing::warn!(%address, error = %status, "agent refused Info");
            return None;
        }
        Err(_) => {
            tracing::warn!(%address, "agent did not answer Info in time");
            return None;
        }
    };
    let token = NodeToken::for_node(&info.node_id);
    if token.as_str() != info.node_token {
        tracing::error!(%address, node.id = %info.node_id, "agent reports a node token kura would not derive; ignoring it");
        return None;
    }
    let registration = register(inner, address, &info, token.clone(), client.clone());
    let stopped = |reason: String| Some((token.clone(), registration, reason));

    let mut stream =
        match tokio::time::timeout(READ_TIMEOUT, client.status(proto::StatusRequest {})).await {
            Ok(Ok(stream)) => stream.into_inner(),
            Ok(Err(status)) => return stopped(format!("status stream refused: {status}")),
            Err(_) => return stopped("status stream not opened in time".to_owned()),
        };
    loop {
        match tokio::time::timeout(LIVENESS_DEADLINE, stream.message()).await {
            Ok(Ok(Some(update))) => {
                let mut state = inner.lock();
                if let Some(agent) = state.agents.get_mut(&token)
                    && agent.registration == registration
                {
                    if agent.status.is_none() {
                        tracing::info!(node.id = %agent.node.id, %address, "agent is live");
                    }
                    agent.status = Some(update);
                    agent.last_seen = Instant::now();
                } else {
                    // Another registration replaced this one (the agent restarted).
                    return None;
                }
            }
            Ok(Ok(None)) => return stopped("status stream ended".to_owned()),
            Ok(Err(status)) => return stopped(format!("status stream failed: {status}")),
            Err(_) => {
                return stopped(format!("no status for {}s", LIVENESS_DEADLINE.as_secs()));
            }
        }
    }
}

/// Records a newly found agent, replacing any earlier registration of its node (an
/// agent that restarted, perhaps at another address). Returns the registration.
fn register(
    inner: &Inner,
    address: SocketAddr,
    info: &proto::InfoResponse,
    token: NodeToken,
    client: AgentClient<Channel>,
) -> u64 {
    let mut state = inner.lock();
    state.registrations += 1;
    let registration = state.registrations;
    let (down, _) = watch::channel(false);
    let agent = Agent {
        node: Node {
            id: info.node_id.clone(),
            token: token.clone(),
        },
        address,
        instance_id: info.instance_id.clone(),
        registration,
        client,
        status: None,
        last_seen: Instant::now(),
        down,
    };
    if let Some(old) = state.agents.insert(token, agent) {
        old.down.send_replace(true);
        if old.live() && old.address != address {
            tracing::warn!(
                node.id = %info.node_id,
                old = %old.address,
                new = %address,
                "two agents claim one node; the newest wins"
            );
        }
        if old.instance_id != info.instance_id {
            tracing::info!(node.id = %info.node_id, %address, "agent restarted");
        }
    }
    tracing::info!(
        node.id = %info.node_id,
        %address,
        pool.id = %info.pool_id,
        instance.id = %info.instance_id,
        version = %info.version,
        "agent found"
    );
    registration
}

impl Pools for Cluster {
    /// Live agents whose pool is healthy.
    fn nodes(&self) -> Vec<Node> {
        let state = self.inner.lock();
        let mut nodes: Vec<Node> = state
            .agents
            .values()
            .filter(|a| a.status.as_ref().is_some_and(|s| s.healthy))
            .map(|a| a.node.clone())
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes
    }

    fn node(&self, token: &NodeToken) -> Option<Node> {
        self.inner.lock().agents.get(token).map(|a| a.node.clone())
    }

    fn locate(&self, token: &NodeToken) -> Result<Node> {
        self.live_agent(token)?;
        self.node(token).ok_or_else(|| Error::Unreachable {
            node: token.as_str().to_owned(),
            reason: "no agent for this node has been found".to_owned(),
        })
    }

    async fn find_volume(&self, node: &Node, name: String) -> Result<Option<Volume>> {
        let found = self
            .call(&node.token, READ_TIMEOUT, |mut c| async move {
                c.find_volume(proto::FindVolumeRequest { name }).await
            })
            .await?;
        Ok(found.volume.map(|v| wire::volume(Some(&v))).transpose()?)
    }

    async fn create_volume(&self, node: &Node, spec: VolumeSpec) -> Result<Volume> {
        let request = wire::create_request(&spec);
        let created = self
            .call(&node.token, WRITE_TIMEOUT, |mut c| async move {
                c.create_volume(request).await
            })
            .await?;
        Ok(wire::volume(created.volume.as_ref())?)
    }

    async fn delete_volume(&self, id: VolumeId) -> Result<()> {
        let volume_id = id.to_string();
        self.call(&id.node(), WRITE_TIMEOUT, |mut c| async move {
            c.delete_volume(proto::DeleteVolumeRequest { volume_id })
                .await
        })
        .await?;
        Ok(())
    }

    async fn volume(&self, id: VolumeId) -> Result<(Volume, Condition)> {
        let volume_id = id.to_string();
        let answer = self
            .call(&id.node(), READ_TIMEOUT, |mut c| async move {
                c.get_volume(proto::GetVolumeRequest { volume_id }).await
            })
            .await?;
        Ok(wire::volume_and_condition(&answer)?)
    }

    async fn list_volumes(
        &self,
        from: Option<VolumeId>,
        limit: usize,
    ) -> Result<Vec<(Volume, Condition)>> {
        let request = proto::ListVolumesRequest {
            start_id: from.map(String::from).unwrap_or_default(),
            limit: wire::limit_message(limit),
        };
        let request = &request;
        Ok(self
            .on_every_node("ListVolumes", |node| async move {
                let answer = self
                    .call(&node.token, READ_TIMEOUT, |mut c| async move {
                        c.list_volumes(request.clone()).await
                    })
                    .await?;
                answer
                    .volumes
                    .iter()
                    .map(|v| wire::volume_and_condition(v).map_err(Error::from))
                    .collect()
            })
            .await)
    }

    async fn expand_volume(&self, id: VolumeId, range: size::Range) -> Result<(Volume, bool)> {
        let request = proto::ExpandVolumeRequest {
            volume_id: id.to_string(),
            required_bytes: range.required,
            limit_bytes: range.limit,
        };
        let answer = self
            .call(&id.node(), WRITE_TIMEOUT, |mut c| async move {
                c.expand_volume(request).await
            })
            .await?;
        Ok((wire::volume(answer.volume.as_ref())?, answer.changed))
    }

    async fn modify_volume(
        &self,
        id: VolumeId,
        provisioning: Provisioning,
    ) -> Result<(Volume, bool)> {
        let request = proto::ModifyVolumeRequest {
            volume_id: id.to_string(),
            provisioning: wire::provisioning_message(provisioning) as i32,
        };
        let answer = self
            .call(&id.node(), WRITE_TIMEOUT, |mut c| async move {
                c.modify_volume(request).await
            })
            .await?;
        Ok((wire::volume(answer.volume.as_ref())?, answer.changed))
    }

    /// From the agent's latest status: 0 for a node that is down or unknown.
    async fn available(&self, node: &Node, provisioning: Provisioning) -> Result<u64> {
        let status = self.latest_status(node);
        Ok(match (status.as_ref(), provisioning) {
            (None, _) => 0,
            (Some(s), _) if !s.healthy => 0,
            (Some(s), Provisioning::Thin) => s.available_thin,
            (Some(s), Provisioning::Thick) => s.available_thick,
        })
    }

    /// From the agent's latest status: 0 (unknown) for a node that is down or unknown.
    async fn maximum(&self, node: &Node, provisioning: Provisioning) -> Result<u64> {
        Ok(match (self.latest_status(node), provisioning) {
            (None, _) => 0,
            (Some(s), Provisioning::Thin) => s.maximum_thin,
            (Some(s), Provisioning::Thick) => s.maximum_thick,
        })
    }

    async fn find_snapshot(&self, node: &Node, name: String) -> Result<Option<Snapshot>> {
        let found = self
            .call(&node.token, READ_TIMEOUT, |mut c| async move {
                c.find_snapshot(proto::FindSnapshotRequest { name }).await
            })
            .await?;
        Ok(found
            .snapshot
            .map(|s| wire::snapshot(Some(&s)))
            .transpose()?)
    }

    async fn create_snapshot(&self, name: String, source: VolumeId) -> Result<Snapshot> {
        let request = proto::CreateSnapshotRequest {
            name,
            source_volume_id: source.to_string(),
        };
        let answer = self
            .call(&source.node(), WRITE_TIMEOUT, |mut c| async move {
                c.create_snapshot(request).await
            })
            .await?;
        Ok(wire::snapshot(answer.snapshot.as_ref())?)
    }

    async fn delete_snapshot(&self, id: SnapshotId) -> Result<()> {
        let snapshot_id = id.to_string();
        self.call(&id.node(), WRITE_TIMEOUT, |mut c| async move {
            c.delete_snapshot(proto::DeleteSnapshotRequest { snapshot_id })
                .await
        })
        .await?;
        Ok(())
    }

    async fn snapshot(&self, id: SnapshotId) -> Result<Snapshot> {
        let snapshot_id = id.to_string();
        let answer = self
            .call(&id.node(), READ_TIMEOUT, |mut c| async move {
                c.get_snapshot(proto::GetSnapshotRequest { snapshot_id })
                    .await
            })
            .await?;
        Ok(wire::snapshot(answer.snapshot.as_ref())?)
    }

    async fn list_snapshots(
        &self,
        from: Option<SnapshotId>,
        limit: usize,
        source: Option<VolumeId>,
    ) -> Result<Vec<Snapshot>> {
        let request = proto::ListSnapshotsRequest {
            start_id: from.map(String::from).unwrap_or_default(),
            limit: wire::limit_message(limit),
            source_volume_id: source.map(String::from).unwrap_or_default(),
        };
        let request = &request;
        Ok(self
            .on_every_node("ListSnapshots", |node| async move {
                let answer = self
                    .call(&node.token, READ_TIMEOUT, |mut c| async move {
                        c.list_snapshots(request.clone()).await
                    })
                    .await?;
                answer
                    .snapshots
                    .iter()
                    .map(|s| wire::snapshot(Some(s)).map_err(Error::from))
                    .collect()
            })
            .await)
    }

    async fn freeze_group(
        &self,
        node: &Node,
        hold: String,
        volumes: Vec<VolumeId>,
    ) -> Result<Vec<VolumeId>> {
        let request = proto::FreezeGroupRequest {
            hold,
            volume_ids: volumes.iter().map(|v| v.to_string()).collect(),
        };
        let answer = self
            .call(&node.token, WRITE_TIMEOUT, |mut c| async move {
                c.freeze_group(request).await
            })
            .await?;
        wire::volume_ids(&answer.flushed_volume_ids, "flushed_volume_ids").map_err(Error::from)
    }

    async fn cut_group_members(
        &self,
        node: &Node,
        hold: String,
        group: GroupSnapshotId,
        volumes: Vec<VolumeId>,
        created: Timestamp,
    ) -> Result<Vec<Snapshot>> {
        let request = proto::CutGroupMembersRequest {
            hold,
            group_snapshot_id: group.to_string(),
            volume_ids: volumes.iter().map(|v| v.to_string()).collect(),
            created: Some(wire::timestamp_message(created)),
        };
        let answer = self
            .call(&node.token, WRITE_TIMEOUT, |mut c| async move {
                c.cut_group_members(request).await
            })
            .await?;
        Ok(answer
            .snapshots
            .iter()
            .map(|s| wire::snapshot(Some(s)))
            .collect::<std::result::Result<_, _>>()?)
    }

    async fn thaw_group(&self, node: &Node, hold: String) -> Result<()> {
        self.call(&node.token, WRITE_TIMEOUT, |mut c| async move {
            c.thaw_group(proto::ThawGroupRequest { hold }).await
        })
        .await?;
        Ok(())
    }

    async fn put_group(&self, group: GroupSnapshot) -> Result<()> {
        let request = proto::PutGroupRequest {
            group: Some(wire::group_message(&group)),
        };
        self.call(&group.id.node(), WRITE_TIMEOUT, |mut c| async move {
            c.put_group(request).await
        })
        .await?;
        Ok(())
    }

    async fn group(&self, id: GroupSnapshotId) -> Result<GroupSnapshot> {
        let group_snapshot_id = id.to_string();
        let answer = self
            .call(&id.node(), READ_TIMEOUT, |mut c| async move {
                c.get_group(proto::GetGroupRequest { group_snapshot_id })
                    .await
            })
            .await?;
        Ok(wire::group(answer.group.as_ref())?)
    }

    async fn delete_group(&self, id: GroupSnapshotId) -> Result<()> {
        let group_snapshot_id = id.to_string();
        self.call(&id.node(), WRITE_TIMEOUT, |mut c| async move {
            c.delete_group(proto::DeleteGroupRequest { group_snapshot_id })
                .await
        })
        .await?;
        Ok(())
    }

    async fn remove_member(&self, id: SnapshotId) -> Result<()> {
        let snapshot_id = id.to_string();
        self.call(&id.node(), WRITE_TIMEOUT, |mut c| async move {
            c.remove_member(proto::RemoveMemberRequest { snapshot_id })
                .await
        })
        .await?;
        Ok(())
    }

    /// Asks the source's agent for the export (pinning it the first time, extending
    /// its grant after), then the destination's agent to run or report the transfer.
    /// The export is released once the volume is done or the transfer failed.
    async fn transfer_volume(
        &self,
        node: &Node,
        spec: VolumeSpec,
        from: &NodeToken,
    ) -> Result<Progress> {
        let source = spec.source.clone().ok_or_else(|| wire::Malformed {
            field: "volume_content_source",
            reason: "a copy needs a content source".to_owned(),
        })?;
        let source_node = from.clone();
        let request = proto::CreateExportRequest {
            // The export key: the destination volume's ID.
            key: VolumeId::derive(&spec.name, &node.token).to_string(),
            source: Some(wire::source_message(&source)),
            destination_node: node.id.clone(),
        };
        let export = self
            .call(&source_node, WRITE_TIMEOUT, |mut c| async move {
                c.create_export(request).await
            })
            .await?;
        let export_id = export.export_id.clone();
        let request = proto::TransferRequest {
            volume: Some(wire::create_request(&spec)),
            export: Some(export),
            source_address: self.address(&source_node)?.to_string(),
        };
        let answer = self
            .call(&node.token, WRITE_TIMEOUT, |mut c| async move {
                c.transfer(request).await
            })
            .await;
        let release = || async {
            let export_id = export_id.clone();
            let released = self
                .call(&source_node, WRITE_TIMEOUT, |mut c| async move {
                    c.delete_export(proto::DeleteExportRequest { export_id })
                        .await
                })
                .await;
            // An export left behind expires and is swept on the source.
            if let Err(e) = released {
                tracing::warn!(error = %crate::chain(&e), "releasing an export");
            }
        };
        use proto::transfer_response::State;
        match answer {
            Ok(proto::TransferResponse {
                state: Some(State::Volume(volume)),
            }) => {
                release().await;
                Ok(Progress::Done(wire::volume(Some(&volume))?))
            }
            Ok(proto::TransferResponse {
                state: Some(State::Running(p)),
            }) => Ok(Progress::Running {
                done: p.bytes_done,
                total: p.bytes_total,
            }),
            Ok(proto::TransferResponse { state: None }) => Err(wire::Malformed {
                field: "state",
                reason: "missing".to_owned(),
            }
            .into()),
            Err(e @ Error::Unreachable { .. }) => Err(e),
            Err(e) => {
                release().await;
                Err(e)
            }
        }
    }

    async fn find_transfer(&self, node: &Node, name: String) -> Result<Option<Progress>> {
        let found = self
            .call(&node.token, READ_TIMEOUT, |mut c| async move {
                c.find_transfer(proto::FindTransferRequest { name }).await
            })
            .await?;
        Ok(found.progress.map(|p| Progress::Running {
            done: p.bytes_done,
            total: p.bytes_total,
        }))
    }

    async fn set_replication(
        &self,
        id: VolumeId,
        wanted: Option<(u8, u64)>,
        nodes: Vec<String>,
    ) -> Result<Volume> {
        let request = proto::SetReplicationRequest {
            volume_id: id.to_string(),
            replication: wanted.map(|(copies, interval)| proto::Replication {
                copies: copies.into(),
                interval_seconds: interval,
                nodes,
                full_nodes: vec![],
            }),
        };
        let answer = self
            .call(&id.node(), WRITE_TIMEOUT, |mut c| async move {
                c.set_replication(request).await
            })
            .await?;
        Ok(wire::volume(answer.volume.as_ref())?)
    }

    async fn find_replica(&self, node: &Node, source: ContentSource) -> Result<Option<Found>> {
        use proto::find_replica_request::Source;
        let request = proto::FindReplicaRequest {
            source: Some(match &source {
                ContentSource::Volume(id) => Source::VolumeId(id.to_string()),
                ContentSource::Snapshot(id) => Source::SnapshotId(id.to_string()),
            }),
        };
        let found = self
            .call(&node.token, READ_TIMEOUT, |mut c| async move {
                c.find_replica(request).await
            })
            .await?;
        Ok(found.found.then(|| Found {
            point: found.point,
            taken: found.taken.as_ref().map(|t| wire::timestamp(Some(t))),
            size_bytes: found.size_bytes,
        }))
    }

    async fn drop_replica(
        &self,
        node: &Node,
        source: ContentSource,
        tombstone: bool,
    ) -> Result<bool> {
        use proto::drop_replica_request::Source;
        let request = proto::DropReplicaRequest {
            source: Some(match &source {
                ContentSource::Volume(id) => Source::VolumeId(id.to_string()),
                ContentSource::Snapshot(id) => Source::SnapshotId(id.to_string()),
            }),
            tombstone,
        };
        let dropped = self
            .call(&node.token, WRITE_TIMEOUT, |mut c| async move {
                c.drop_replica(request).await
            })
            .await?;
        Ok(dropped.held)
    }

    /// Opens the stream on the snapshots' node. Each batch must come within
    /// [`READ_TIMEOUT`] (a silent node ends the stream as unreachable), and dropping
    /// the returned stream cancels the call, which stops the node's work and unpins.
    async fn snapshot_ranges(&self, query: Query, start: u64, max: usize) -> Result<Ranges> {
        use futures_util::StreamExt;
        let token = match &query {
            Query::Allocated(id) | Query::Delta { target: id, .. } => id.node(),
        };
        let request = wire::ranges_request(&query, start, max);
        let (node, mut client, _) = self.live_agent(&token)?;
        let mut stream =
            match tokio::time::timeout(READ_TIMEOUT, client.snapshot_ranges(request)).await {
                Err(_) => return Err(silent(&node)),
                Ok(Err(status)) => return Err(decode(&node, status)),
                Ok(Ok(response)) => response.into_inner(),
            };
        let Some(first) = next_batch(&node, &mut stream).await? else {
            return Err(Error::Protocol(wire::Malformed {
                field: "snapshot_ranges",
                reason: "the stream ended before its first batch".to_owned(),
            }));
        };
        let capacity = first.capacity_bytes;
        let first = wire::ranges(&first)?;
        // The state is `None` once the stream ended or failed: nothing follows an error.
        let rest = futures_util::stream::unfold(Some((stream, node)), |state| async move {
            let (mut stream, node) = state?;
            match next_batch(&node, &mut stream).await {
                Ok(None) => None,
                Ok(Some(batch)) => Some((
                    wire::ranges(&batch).map_err(Error::from),
                    Some((stream, node)),
                )),
                Err(e) => Some((Err(e), None)),
            }
        });
        Ok(Ranges {
            capacity,
            batches: futures_util::stream::once(async { Ok(first) })
                .chain(rest)
                .boxed(),
        })
    }
}

/// A node that did not answer within [`READ_TIMEOUT`].
fn silent(node: &str) -> Error {
    Error::Unreachable {
        node: node.to_owned(),
        reason: format!("no answer within {}s", READ_TIMEOUT.as_secs()),
    }
}

/// The next batch of a ranges stream, within [`READ_TIMEOUT`]; `None` at its end.
async fn next_batch(
    node: &str,
    stream: &mut tonic::Streaming<proto::SnapshotRangesBatch>,
) -> Result<Option<proto::SnapshotRangesBatch>> {
    match tokio::time::timeout(READ_TIMEOUT, stream.message()).await {
        Err(_) => Err(silent(node)),
        Ok(Err(status)) => Err(decode(node, status)),
        Ok(Ok(batch)) => Ok(batch),
    }
}
