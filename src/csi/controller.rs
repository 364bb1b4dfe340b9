//! The Controller service: volumes and snapshots in the nodes' pools, reached only
//! through [`Pools`].

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::proto::controller_server::Controller;
use super::proto::{self, controller_service_capability, volume_content_source};
use super::status::{
    beyond_every_pool, busy, copying, from_agent, incompatible, invalid, missing, no_node,
    no_volume, not_found, shown, source_not_found, unimplemented,
};
use super::validate::{self, CapabilityError};
use super::{TOPOLOGY_KEY, node_topology};
use crate::agent::{Copy, Node, Pools};
use crate::pool::attach::Capability;
use crate::pool::{
    self, AccessKind, Condition, ContentSource, Snapshot, SnapshotId, Volume, VolumeId, VolumeSpec,
};

/// The Controller service over the nodes' pools.
///
/// # Guarantees
///
/// - CreateVolume and CreateSnapshot hold a lock on the request's name (in this
///   process) while they look for an object of that name on every live node and, only
///   if there is none, make one: a retried or doubled request never makes two.
/// - The per-object locks are taken by [`Pools`] in the process that owns the pool.
pub struct ControllerService<P> {
    pub(super) pools: P,
    names: Names,
}

/// Requests' names in flight in this process, each with the ID it is making once that
/// is known (so a second caller's ABORTED names the object).
#[derive(Debug, Default)]
struct Names {
    held: Arc<Mutex<HashMap<String, Option<String>>>>,
}

/// Releases its name when dropped.
pub(super) struct NameGuard {
    held: Arc<Mutex<HashMap<String, Option<String>>>>,
    key: String,
}

impl Names {
    fn try_acquire(&self, key: String) -> Result<NameGuard, Status> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = held.get(&key) {
            return Err(match id {
                Some(id) => busy(&format!("{id} ({key})")),
                None => busy(&key),
            });
        }
        held.insert(key.clone(), None);
        Ok(NameGuard {
            held: Arc::clone(&self.held),
            key,
        })
    }
}

impl NameGuard {
    /// Records the ID the holder is making.
    fn making(&self, id: &str) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.insert(self.key.clone(), Some(id.to_owned()));
    }
}

impl Drop for NameGuard {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.remove(&self.key);
    }
}

impl<P: Pools> ControllerService<P> {
    pub fn new(pools: P) -> Self {
        ControllerService {
            pools,
            names: Names::default(),
        }
    }

    /// The node to place a new volume on.
    ///
    /// - With a content source: the source's node (an instant reflink), if the
    ///   requisite topology allows it; otherwise a node placed as below, where the
    ///   source is copied to across nodes (see [`crate::agent::transfer`]).
    /// - Otherwise, among the live nodes within requisite (all live nodes without
    ///   one): the first preferred node with room for `needed` bytes, else the one
    ///   with the most free space. With `--strict-topology` requisite and preferred
    ///   are the one selected node: if it is down or full the answer is
    ///   RESOURCE_EXHAUSTED, and the scheduler picks again.
    async fn place(
        &self,
        requirements: Option<&proto::TopologyRequirement>,
        provisioning: pool::Provisioning,
        needed: u64,
        source: Option<&ContentSource>,
    ) -> Result<Node, Status> {
        let node_of = |t: &proto::Topology| t.segments.get(TOPOLOGY_KEY).cloned();
        let (requisite, preferred): (Vec<String>, Vec<String>) = match requirements {
            None => (vec![], vec![]),
            Some(r) => (
                r.requisite.iter().filter_map(node_of).collect(),
                r.preferred.iter().filter_map(node_of).collect(),
            ),
        };
        let constrained = requirements.is_some_and(|r| !r.requisite.is_empty());
        let allowed = |id: &str| !constrained || requisite.iter().any(|r| r == id);
        self.check_satisfiable(provisioning, needed).await?;
        if let Some(source) = source {
            // A source on a node kura cannot have names nothing: NOT_FOUND, not a
            // topology failure.
            let node = self.pools.locate(&source.node()).map_err(|e| match e {
                crate::agent::Error::UnknownNode { token } => source_not_found(source.id(), &token),
                other => from_agent(other),
            })?;
            if allowed(&node.id) {
                return Ok(node);
            }
        }
        let nodes: Vec<Node> = self
            .pools
            .nodes()
            .into_iter()
            .filter(|n| allowed(&n.id))
            // A copy goes to another node than its source's.
            .filter(|n| source.is_none_or(|s| n.token != s.node()))
            .collect();
        let mut free = Vec::with_capacity(nodes.len());
        for node in &nodes {
            let bytes = self
                .pools
                .available(node, provisioning)
                .await
                .map_err(from_agent)?;
            free.push((node, bytes));
        }
        let preferred_with_room = preferred.iter().find_map(|id| {
            free.iter()
                .find(|(n, bytes)| n.id == *id && *bytes >= needed)
                .map(|(n, _)| (*n).clone())
        });
        if let Some(node) = preferred_with_room {
            return Ok(node);
        }
        // Most free space; ties go to the first node by ID, so every controller
        // replica places alike.
        let mut best: Option<(u64, &Node)> = None;
        for (node, bytes) in &free {
            if best.is_none_or(|(most, _)| *bytes > most) {
                best = Some((*bytes, node));
            }
        }
        match best {
            Some((bytes, node)) if bytes >= needed || !constrained => Ok(node.clone()),
            Some((bytes, node)) => Err(no_node(format!(
                "no node within the requisite topology {requisite:?} has room for \
                 {needed} bytes (most free: {bytes} bytes on {})",
                node.id
            ))),
            None if constrained => Err(no_node(format!(
                "no live kura node among the requisite topologies {requisite:?}"
            ))),
            None => Err(no_node("no live kura node can take a volume")),
        }
    }

    /// A size above the largest volume any live node could ever hold is OUT_OF_RANGE,
    /// whatever the topology asks: waiting or placing elsewhere cannot help. Within
    /// that, a node without room is RESOURCE_EXHAUSTED (the scheduler may pick a node
    /// that can). With no live node, or one whose bound is unknown, the node decides.
    async fn check_satisfiable(
        &self,
        provisioning: pool::Provisioning,
        needed: u64,
    ) -> Result<(), Status> {
        let mut largest = 0;
        for node in self.pools.nodes() {
            let most = self
                .pools
                .maximum(&node, provisioning)
                .await
                .map_err(from_agent)?;
            if most == 0 {
                return Ok(());
            }
            largest = largest.max(most);
        }
        if largest > 0 && needed > largest {
            return Err(beyond_every_pool(needed, largest));
        }
        Ok(())
    }

    /// The live node that holds a volume made by a create with this name, if any.
    async fn find_volume(&self, name: &str) -> Result<Option<(Node, Volume)>, Status> {
        let nodes = self.pools.nodes();
        let found = futures_util::future::join_all(
            nodes
                .iter()
                .map(|node| self.pools.find_volume(node, name.to_owned())),
        )
        .await;
        for (node, found) in nodes.into_iter().zip(found) {
            if let Some(volume) = found.map_err(from_agent)? {
                return Ok(Some((node, volume)));
            }
        }
        Ok(None)
    }

    /// The live node where a cross-node copy for a create with this name runs or
    /// may resume, if any: retries follow it rather than place again.
    async fn find_copy(&self, name: &str) -> Result<Option<Node>, Status> {
        let nodes = self.pools.nodes();
        let found = futures_util::future::join_all(
            nodes
                .iter()
                .map(|node| self.pools.find_copy(node, name.to_owned())),
        )
        .await;
        for (node, found) in nodes.into_iter().zip(found) {
            if found.map_err(from_agent)?.is_some() {
                return Ok(Some(node));
            }
        }
        Ok(None)
    }

    /// A snapshot made by a create with this name on any live node, if any.
    async fn find_snapshot(&self, name: &str) -> Result<Option<Snapshot>, Status> {
        let nodes = self.pools.nodes();
        let found = futures_util::future::join_all(
            nodes
                .iter()
                .map(|node| self.pools.find_snapshot(node, name.to_owned())),
        )
        .await;
        for found in found {
            if let Some(snapshot) = found.map_err(from_agent)? {
                return Ok(Some(snapshot));
            }
        }
        Ok(None)
    }

    /// Takes the lock on a request's name.
    pub(super) fn lock_name(&self, kind: &str, name: &str) -> Result<NameGuard, Status> {
        self.names.try_acquire(format!("{kind} name {name:?}"))
    }

    fn volume_message(&self, volume: &Volume) -> proto::Volume {
        let node_id = self
            .pools
            .node(&volume.id.node())
            .map_or_else(|| volume.id.node().as_str().to_owned(), |n| n.id);
        proto::Volume {
            capacity_bytes: volume.size_bytes as i64,
            volume_id: volume.id.to_string(),
            volume_context: HashMap::new(),
            content_source: volume.source.as_ref().map(content_source_message),
            accessible_topology: vec![node_topology(&node_id)],
        }
    }
}

fn content_source_message(source: &ContentSource) -> proto::VolumeContentSource {
    let r#type = match source {
        ContentSource::Snapshot(id) => {
            volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                snapshot_id: id.to_string(),
            })
        }
        ContentSource::Volume(id) => {
            volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                volume_id: id.to_string(),
            })
        }
    };
    proto::VolumeContentSource {
        r#type: Some(r#type),
    }
}

/// The content source of a create request; IDs that cannot be ours name nothing.
fn content_source(
    source: Option<&proto::VolumeContentSource>,
) -> Result<Option<ContentSource>, Status> {
    let Some(source) = source else {
        return Ok(None);
    };
    let not_found = |kind: &str, id: &str| {
        not_found(format_args!("volume_content_source: {kind} {}", shown(id)))
    };
    match &source.r#type {
        None => Err(missing("volume_content_source.type")),
        Some(volume_content_source::Type::Snapshot(s)) => {
            validate::snapshot_id(&s.snapshot_id, "volume_content_source.snapshot.snapshot_id")?
                .map(|id| Some(ContentSource::Snapshot(id)))
                .ok_or_else(|| not_found("snapshot", &s.snapshot_id))
        }
        Some(volume_content_source::Type::Volume(v)) => {
            validate::volume_id(&v.volume_id, "volume_content_source.volume.volume_id")?
                .map(|id| Some(ContentSource::Volume(id)))
                .ok_or_else(|| not_found("volume", &v.volume_id))
        }
    }
}

/// A volume of the requested name exists already on `node`: a request whose requisite
/// topology excludes that node asks for another volume.
fn check_existing_topology(
    requirements: Option<&proto::TopologyRequirement>,
    node: &str,
) -> Result<(), Status> {
    let Some(r) = requirements.filter(|r| !r.requisite.is_empty()) else {
        return Ok(());
    };
    let inside = r
        .requisite
        .iter()
        .any(|t| t.segments.get(TOPOLOGY_KEY).is_some_and(|n| n == node));
    if inside {
        Ok(())
    } else {
        Err(incompatible(format!(
            "a volume of this name already exists on node {node}, outside the requisite topology"
        )))
    }
}

fn condition_message(condition: Condition) -> proto::VolumeCondition {
    proto::VolumeCondition {
        abnormal: condition.abnormal,
        message: condition.message,
    }
}

pub(super) fn snapshot_message(snapshot: &Snapshot) -> proto::Snapshot {
    proto::Snapshot {
        size_bytes: snapshot.size_bytes as i64,
        snapshot_id: snapshot.id.to_string(),
        source_volume_id: snapshot.source_volume.to_string(),
        creation_time: Some(prost_types::Timestamp {
            seconds: snapshot.created.seconds,
            nanos: snapshot.created.nanos,
        }),
        ready_to_use: snapshot.ready,
        group_snapshot_id: snapshot
            .group
            .as_ref()
            .map(|g| g.to_string())
            .unwrap_or_default(),
    }
}

/// The access types a list of capabilities asks for.
fn access_kinds(caps: &[Capability]) -> BTreeSet<AccessKind> {
    caps.iter().map(|c| c.access.kind()).collect()
}

/// One page of `items` (sorted by ID) starting at `start`.
fn page<T, K: Ord>(
    items: Vec<T>,
    key: impl Fn(&T) -> &K,
    start: Option<&K>,
    max: usize,
) -> (Vec<T>, Option<T>) {
    let mut rest = items
        .into_iter()
        .filter(|item| start.is_none_or(|s| key(item) >= s));
    let page: Vec<T> = rest.by_ref().take(max).collect();
    (page, rest.next())
}

fn capability(
    kind: controller_service_capability::rpc::Type,
) -> proto::ControllerServiceCapability {
    proto::ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(
            controller_service_capability::Rpc {
                r#type: kind as i32,
            },
        )),
    }
}

#[tonic::async_trait]
impl<P: Pools> Controller for ControllerService<P> {
    #[instrument(err, skip_all, fields(volume.name = ?request.get_ref().name))]
    async fn create_volume(
        &self,
        request: Request<proto::CreateVolumeRequest>,
    ) -> Result<Response<proto::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = validate::name(&req.name, "name")?;
        let capabilities = validate::capabilities(&req.volume_capabilities, "volume_capabilities")
            .map_err(|e| e.into_invalid("volume_capabilities"))?;
        let range = validate::range(req.capacity_range.as_ref())?;
        validate::map_size(&req.parameters, "parameters")?;
        let provisioning = validate::volume_parameters(&req.parameters)?;
        let encryption = validate::encryption(&req.parameters, &capabilities)?;
        validate::map_size(&req.mutable_parameters, "mutable_parameters")?;
        // Mutable parameters (a VolumeAttributesClass) beat the StorageClass's.
        let provisioning =
            validate::mutable_parameters(&req.mutable_parameters)?.unwrap_or(provisioning);
        validate::map_size(&req.secrets, "secrets")?;
        let source = content_source(req.volume_content_source.as_ref())?;
        let name_guard = self.lock_name("volume", name)?;
        let requirements = req.accessibility_requirements.as_ref();
        let (node, exists) = match self.find_volume(name).await? {
            Some((node, _)) => {
                check_existing_topology(requirements, &node.id)?;
                (node, true)
            }
            None => match self.find_copy(name).await? {
                Some(node) => (node, false),
                None => (
                    self.place(requirements, provisioning, range.required, source.as_ref())
                        .await?,
                    false,
                ),
            },
        };
        let copy_from = source
            .as_ref()
            .filter(|s| !exists && s.node() != node.token)
            .map(|s| s.id().to_owned());
        name_guard.making(VolumeId::derive(name, &node.token).as_str());
        let spec = VolumeSpec {
            name: name.to_owned(),
            range,
            provisioning,
            source,
            access: access_kinds(&capabilities),
            encryption,
        };
        let volume = match copy_from {
            None => self
                .pools
                .create_volume(&node, spec)
                .await
                .map_err(from_agent)?,
            Some(source) => match self
                .pools
                .copy_volume(&node, spec)
                .await
                .map_err(from_agent)?
            {
                Copy::Done(volume) => volume,
                Copy::Running { done, total } => {
                    return Err(copying(name, &source, &node.id, done, total));
                }
            },
        };
        Ok(Response::new(proto::CreateVolumeResponse {
            volume: Some(self.volume_message(&volume)),
        }))
    }

    #[instrument(err, skip_all, fields(volume.id = ?request.get_ref().volume_id))]
    async fn delete_volume(
        &self,
        request: Request<proto::DeleteVolumeRequest>,
    ) -> Result<Response<proto::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = validate::volume_id(&req.volume_id, "volume_id")?;
        validate::map_size(&req.secrets, "secrets")?;
        // An ID that cannot be ours names a volume that is already gone.
        if let Some(id) = id {
            self.pools.delete_volume(id).await.map_err(from_agent)?;
        }
        Ok(Response::new(proto::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _request: Request<proto::ControllerPublishVolumeRequest>,
    ) -> Result<Response<proto::ControllerPublishVolumeResponse>, Status> {
        Err(unimplemented(
            "ControllerPublishVolume",
            "kura volumes are local; there is nothing to attach",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _request: Request<proto::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<proto::ControllerUnpublishVolumeResponse>, Status> {
        Err(unimplemented(
            "ControllerUnpublishVolume",
            "kura volumes are local; there is nothing to detach",
        ))
    }

    #[instrument(err, skip_all, fields(volume.id = ?request.get_ref().volume_id))]
    async fn validate_volume_capabilities(
        &self,
        request: Request<proto::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<proto::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let id = validate::volume_id(&req.volume_id, "volume_id")?;
        for (map, field) in [
            (&req.volume_context, "volume_context"),
            (&req.parameters, "parameters"),
            (&req.mutable_parameters, "mutable_parameters"),
            (&req.secrets, "secrets"),
        ] {
            validate::map_size(map, field)?;
        }
        let checked = validate::capabilities(&req.volume_capabilities, "volume_capabilities");
        if let Err(CapabilityError::Invalid(status)) = checked {
            return Err(status);
        }
        let id = id.ok_or_else(|| no_volume("volume_id", &req.volume_id))?;
        let (volume, _) = self.pools.volume(id).await.map_err(from_agent)?;
        let verdict = checked
            .map_err(|e| e.into_invalid("volume_capabilities").message().to_owned())
            .and_then(|caps| {
                let encrypted = format!("volume {} is encrypted", volume.id);
                validate::encryption_fits(volume.encryption, &caps, &encrypted)
                    .map_err(|s| s.message().to_owned())?;
                let asked = access_kinds(&caps);
                if volume.serves(&asked) {
                    Ok(())
                } else {
                    Err(format!(
                        "volume_capabilities: volume {} was created for other access types than {}",
                        volume.id,
                        asked
                            .iter()
                            .map(|k| k.to_string())
                            .collect::<Vec<_>>()
                            .join(" and ")
                    ))
                }
            })
            .and_then(|()| {
                validate::volume_parameters(&req.parameters).map_err(|s| s.message().to_owned())
            })
            .and_then(|_| {
                validate::mutable_parameters(&req.mutable_parameters)
                    .map_err(|s| s.message().to_owned())
            });
        let response = match verdict {
            Ok(_) => proto::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(proto::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: req.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(message) => proto::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            },
        };
        Ok(Response::new(response))
    }

    #[instrument(err, skip_all)]
    async fn list_volumes(
        &self,
        request: Request<proto::ListVolumesRequest>,
    ) -> Result<Response<proto::ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let max = validate::max_entries(req.max_entries)?;
        let start = validate::starting_token(&req.starting_token, VolumeId::parse)?;
        let mut volumes = self.pools.list_volumes().await.map_err(from_agent)?;
        // Tokens are IDs: one order over every node keeps paging stable.
        volumes.sort_by(|(a, _), (b, _)| a.id.cmp(&b.id));
        let (page, next) = page(volumes, |(v, _)| &v.id, start.as_ref(), max);
        let entries = page
            .into_iter()
            .map(|(volume, condition)| proto::list_volumes_response::Entry {
                volume: Some(self.volume_message(&volume)),
                status: Some(proto::list_volumes_response::VolumeStatus {
                    published_node_ids: vec![],
                    volume_condition: Some(condition_message(condition)),
                }),
            })
            .collect();
        Ok(Response::new(proto::ListVolumesResponse {
            entries,
            next_token: next.map(|(v, _)| v.id.to_string()).unwrap_or_default(),
        }))
    }

    #[instrument(err, skip_all)]
    async fn get_capacity(
        &self,
        request: Request<proto::GetCapacityRequest>,
    ) -> Result<Response<proto::GetCapacityResponse>, Status> {
        let req = request.into_inner();
        validate::map_size(&req.parameters, "parameters")?;
        let provisioning = validate::volume_parameters(&req.parameters)?;
        let mut unusable = false;
        for (i, cap) in req.volume_capabilities.iter().enumerate() {
            match validate::capability(Some(cap), &format!("volume_capabilities[{i}]")) {
                Ok(_) => {}
                Err(CapabilityError::Invalid(status)) => return Err(status),
                Err(CapabilityError::Unsupported(_)) => unusable = true,
            }
        }
        let nodes: Vec<Node> = match &req.accessible_topology {
            None => self.pools.nodes(),
            Some(topology) => {
                let wanted = topology.segments.get(TOPOLOGY_KEY);
                self.pools
                    .nodes()
                    .into_iter()
                    .filter(|n| wanted == Some(&n.id))
                    .collect()
            }
        };
        let mut available = 0u64;
        let mut largest = 0u64;
        if !unusable {
            for node in &nodes {
                let free = self
                    .pools
                    .available(node, provisioning)
                    .await
                    .map_err(from_agent)?;
                available = available.saturating_add(free);
                largest = largest.max(free);
            }
        }
        let largest = largest / pool::size::MIB * pool::size::MIB;
        Ok(Response::new(proto::GetCapacityResponse {
            available_capacity: available.min(i64::MAX as u64) as i64,
            maximum_volume_size: Some(largest.min(i64::MAX as u64) as i64),
            minimum_volume_size: Some(pool::size::MIB as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<proto::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<proto::ControllerGetCapabilitiesResponse>, Status> {
        use controller_service_capability::rpc::Type;
        let capabilities = [
            Type::CreateDeleteVolume,
            Type::ListVolumes,
            Type::GetCapacity,
            Type::GetVolume,
            Type::VolumeCondition,
            Type::SingleNodeMultiWriter,
            Type::CreateDeleteSnapshot,
            Type::ListSnapshots,
            // Alpha in CSI 1.12; csi-sanity runs its GetSnapshot specs from v5.5.0 on
            // when it is listed (v5.4.0 fails any capability it does not know:
            // csi-sanity/run.sh skips that one spec there).
            Type::GetSnapshot,
            Type::CloneVolume,
            Type::ExpandVolume,
            Type::ModifyVolume,
        ]
        .into_iter()
        .map(capability)
        .collect();
        Ok(Response::new(proto::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    #[instrument(err, skip_all, fields(snapshot.name = ?request.get_ref().name, volume.id = ?request.get_ref().source_volume_id))]
    async fn create_snapshot(
        &self,
        request: Request<proto::CreateSnapshotRequest>,
    ) -> Result<Response<proto::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let source = validate::volume_id(&req.source_volume_id, "source_volume_id")?;
        let name = validate::name(&req.name, "name")?;
        validate::map_size(&req.parameters, "parameters")?;
        validate::snapshot_parameters(&req.parameters)?;
        validate::map_size(&req.secrets, "secrets")?;
        let source = source.ok_or_else(|| no_volume("source_volume_id", &req.source_volume_id))?;
        let name_guard = self.lock_name("snapshot", name)?;
        name_guard.making(SnapshotId::derive(name, &source.node()).as_str());
        if let Some(existing) = self.find_snapshot(name).await?
            && existing.source_volume != source
        {
            return Err(incompatible(format!(
                "snapshot {name:?} already exists for volume {}",
                existing.source_volume
            )));
        }
        let snapshot = self
            .pools
            .create_snapshot(name.to_owned(), source)
            .await
            .map_err(from_agent)?;
        Ok(Response::new(proto::CreateSnapshotResponse {
            snapshot: Some(snapshot_message(&snapshot)),
        }))
    }

    #[instrument(err, skip_all, fields(snapshot.id = ?request.get_ref().snapshot_id))]
    async fn delete_snapshot(
        &self,
        request: Request<proto::DeleteSnapshotRequest>,
    ) -> Result<Response<proto::DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        let id = validate::snapshot_id(&req.snapshot_id, "snapshot_id")?;
        validate::map_size(&req.secrets, "secrets")?;
        if let Some(id) = id {
            self.check_not_grouped(&id).await?;
            self.pools.delete_snapshot(id).await.map_err(from_agent)?;
        }
        Ok(Response::new(proto::DeleteSnapshotResponse {}))
    }

    #[instrument(err, skip_all)]
    async fn list_snapshots(
        &self,
        request: Request<proto::ListSnapshotsRequest>,
    ) -> Result<Response<proto::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let max = validate::max_entries(req.max_entries)?;
        validate::map_size(&req.secrets, "secrets")?;
        let start = validate::starting_token(&req.starting_token, SnapshotId::parse)?;
        let empty = || Ok(Response::new(proto::ListSnapshotsResponse::default()));
        let mut snapshots = if req.snapshot_id.is_empty() {
            self.pools.list_snapshots().await.map_err(from_agent)?
        } else {
            let Some(id) = SnapshotId::parse(&req.snapshot_id) else {
                return empty();
            };
            match self.pools.snapshot(id).await {
                Ok(snapshot) => vec![snapshot],
                Err(e) if e.is_not_found() => return empty(),
                Err(e) => return Err(from_agent(e)),
            }
        };
        if !req.source_volume_id.is_empty() {
            snapshots.retain(|s| s.source_volume.as_str() == req.source_volume_id);
        }
        snapshots.sort_by(|a, b| a.id.cmp(&b.id));
        let (page, next) = page(snapshots, |s| &s.id, start.as_ref(), max);
        Ok(Response::new(proto::ListSnapshotsResponse {
            entries: page
                .iter()
                .map(|s| proto::list_snapshots_response::Entry {
                    snapshot: Some(snapshot_message(s)),
                })
                .collect(),
            next_token: next.map(|s| s.id.to_string()).unwrap_or_default(),
        }))
    }

    #[instrument(err, skip_all, fields(volume.id = ?request.get_ref().volume_id))]
    async fn controller_expand_volume(
        &self,
        request: Request<proto::ControllerExpandVolumeRequest>,
    ) -> Result<Response<proto::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = validate::volume_id(&req.volume_id, "volume_id")?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| missing("capacity_range"))?;
        let range = validate::range(Some(range))?;
        if range.required == 0 && range.limit == 0 {
            return Err(invalid("capacity_range", "asks for no size"));
        }
        validate::optional_capability(req.volume_capability.as_ref(), "volume_capability")?;
        validate::map_size(&req.secrets, "secrets")?;
        let id = id.ok_or_else(|| no_volume("volume_id", &req.volume_id))?;
        let (volume, _) = self
            .pools
            .expand_volume(id, range)
            .await
            .map_err(from_agent)?;
        Ok(Response::new(proto::ControllerExpandVolumeResponse {
            capacity_bytes: volume.size_bytes as i64,
            // The loop device must re-read the size on the node, even for block access.
            node_expansion_required: true,
        }))
    }

    #[instrument(err, skip_all, fields(volume.id = ?request.get_ref().volume_id))]
    async fn controller_get_volume(
        &self,
        request: Request<proto::ControllerGetVolumeRequest>,
    ) -> Result<Response<proto::ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = validate::volume_id(&req.volume_id, "volume_id")?
            .ok_or_else(|| no_volume("volume_id", &req.volume_id))?;
        let (volume, condition) = self.pools.volume(id).await.map_err(from_agent)?;
        Ok(Response::new(proto::ControllerGetVolumeResponse {
            volume: Some(self.volume_message(&volume)),
            status: Some(proto::controller_get_volume_response::VolumeStatus {
                published_node_ids: vec![],
                volume_condition: Some(condition_message(condition)),
            }),
        }))
    }

    #[instrument(err, skip_all, fields(volume.id = ?request.get_ref().volume_id))]
    async fn controller_modify_volume(
        &self,
        request: Request<proto::ControllerModifyVolumeRequest>,
    ) -> Result<Response<proto::ControllerModifyVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = validate::volume_id(&req.volume_id, "volume_id")?;
        validate::map_size(&req.secrets, "secrets")?;
        validate::map_size(&req.mutable_parameters, "mutable_parameters")?;
        let provisioning = validate::mutable_parameters(&req.mutable_parameters)?;
        let id = id.ok_or_else(|| no_volume("volume_id", &req.volume_id))?;
        match provisioning {
            Some(provisioning) => {
                self.pools
                    .modify_volume(id, provisioning)
                    .await
                    .map_err(from_agent)?;
            }
            // No key, nothing to change (the spec: only the keys given are
            // modified); the volume must still exist.
            None => {
                self.pools.volume(id).await.map_err(from_agent)?;
            }
        }
        Ok(Response::new(proto::ControllerModifyVolumeResponse {}))
    }

    #[instrument(err, skip_all, fields(snapshot.id = ?request.get_ref().snapshot_id))]
    async fn get_snapshot(
        &self,
        request: Request<proto::GetSnapshotRequest>,
    ) -> Result<Response<proto::GetSnapshotResponse>, Status> {
        let req = request.into_inner();
        let id = validate::snapshot_id(&req.snapshot_id, "snapshot_id")?.ok_or_else(|| {
            not_found(format_args!(
                "snapshot_id: snapshot {}",
                shown(&req.snapshot_id)
            ))
        })?;
        let snapshot = self.pools.snapshot(id).await.map_err(from_agent)?;
        Ok(Response::new(proto::GetSnapshotResponse {
            snapshot: Some(snapshot_message(&snapshot)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_resume_at_the_token() {
        let items = vec![1, 2, 3, 4, 5];
        assert_eq!(page(items.clone(), |x| x, None, 2), (vec![1, 2], Some(3)));
        assert_eq!(
            page(items.clone(), |x| x, Some(&3), 2),
            (vec![3, 4], Some(5))
        );
        assert_eq!(page(items.clone(), |x| x, Some(&5), 2), (vec![5], None));
        assert_eq!(
            page(items, |x| x, None, usize::MAX),
            (vec![1, 2, 3, 4, 5], None)
        );
    }
}
