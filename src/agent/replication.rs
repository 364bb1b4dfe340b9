//! The requests and bytes of replication between agents; what each end does is in
//! [`crate::node::replication`].
//!
//! - [`ClusterPeers`]: how a node reaches the other nodes: the same discovery the
//!   controller runs ([`Cluster`], with `--peers` as its targets), with the node's own
//!   identity. Nodes find each other without any controller.
//! - The agent's handlers: [`replicate`] and [`read_point`] for nodes (node identity;
//!   a read also needs the grant the volume's node made), [`find_replica`] and
//!   [`drop_replica`] for the controller.

use std::pin::Pin;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio_stream::Stream;
use tonic::{Request, Status};

use super::cluster::Cluster;
use super::errors::{self, malformed};
use super::transfer::{MAX_MESSAGE, chunk, chunk_message};
use super::{proto, tls, wire};
use crate::node::replication::{Peers, Piece, ReadRequest, Replicator, ShipAnswer, ShipRequest};
use crate::pool::replica::ReadTarget;
use crate::pool::{ContentSource, SnapshotId, VolumeId};

/// How long a replica may take to pull one point (its first, full copy included).
pub const REPLICATE_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long a read may go without a message.
pub const READ_STALL: Duration = Duration::from_secs(30);

/// The other nodes, found as the controller finds them.
#[derive(Clone)]
pub struct ClusterPeers(pub Cluster);

impl Peers for ClusterPeers {
    async fn replicate(&self, node: &str, request: ShipRequest) -> Result<ShipAnswer, String> {
        let message = ship_message(&request);
        let answer = self
            .0
            .call_node(node, REPLICATE_TIMEOUT, |mut c| async move {
                c.replicate(message).await
            })
            .await
            .map_err(|e| e.to_string())?;
        ship_answer(answer).map_err(|e| e.to_string())
    }

    async fn read_point(
        &self,
        node: &str,
        request: ReadRequest,
    ) -> Result<BoxStream<'static, Result<Piece, String>>, String> {
        let message = proto::ReadPointRequest {
            volume_id: request.volume.to_string(),
            node: request.node,
            grant: request.grant,
            target: Some(match request.target {
                ReadTarget::Point(n) => proto::read_point_request::Target::Point(n),
                ReadTarget::Snapshot(s) => {
                    proto::read_point_request::Target::SnapshotId(s.to_string())
                }
            }),
            base_point: request.base.unwrap_or(0),
        };
        let stream = self
            .0
            .call_node(node, READ_STALL, |c| async move {
                // A chunk of data is 16 MiB: past tonic's default 4 MiB limit.
                let mut c = c.max_decoding_message_size(MAX_MESSAGE);
                c.read_point(message).await
            })
            .await
            .map_err(|e| e.to_string())?;
        let pieces = futures_util::stream::unfold(stream, |mut stream| async move {
            let next = match tokio::time::timeout(READ_STALL, stream.message()).await {
                Err(_) => Err(format!("no message for {}s", READ_STALL.as_secs())),
                Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
                Ok(Ok(None)) => return None,
                Ok(Ok(Some(message))) => Ok(piece(message)),
            };
            Some((next, stream))
        });
        Ok(pieces.boxed())
    }
}

/// One message of a read as the replica's side sees it.
fn piece(message: proto::PointChunk) -> Piece {
    match message.chunk {
        None => Piece::Header {
            size_bytes: message.size_bytes,
            delta: message.delta,
        },
        Some(c) if c.last => Piece::Digest(c.digest),
        Some(c) => Piece::Chunk(chunk(c)),
    }
}

fn ship_message(r: &ShipRequest) -> proto::ReplicateRequest {
    proto::ReplicateRequest {
        volume: Some(wire::volume_message(&r.volume)),
        source_node: r.source_node.clone(),
        grant: r.grant.clone(),
        point: r.point,
        taken: Some(wire::timestamp_message(r.taken)),
        size_bytes: r.size_bytes,
        snapshots: r.snapshots.iter().map(wire::snapshot_message).collect(),
        snapshots_deleted: r.snapshots_deleted.iter().map(|s| s.to_string()).collect(),
    }
}

fn ship_request(m: proto::ReplicateRequest) -> Result<ShipRequest, wire::Malformed> {
    Ok(ShipRequest {
        volume: wire::volume(m.volume.as_ref())?,
        source_node: m.source_node,
        grant: m.grant,
        point: m.point,
        taken: wire::timestamp(m.taken.as_ref()),
        size_bytes: m.size_bytes,
        snapshots: m
            .snapshots
            .iter()
            .map(|s| wire::snapshot(Some(s)))
            .collect::<Result<_, _>>()?,
        snapshots_deleted: snapshot_ids(&m.snapshots_deleted, "snapshots_deleted")?,
    })
}

fn answer_message(a: &ShipAnswer) -> proto::ReplicateResponse {
    proto::ReplicateResponse {
        point: a.point,
        taken: a.taken.map(wire::timestamp_message),
        snapshot_ids: a.snapshots.iter().map(|s| s.to_string()).collect(),
        volume_deleted: a.volume_deleted,
        snapshots_deleted: a.snapshots_deleted.iter().map(|s| s.to_string()).collect(),
        bytes_received: a.bytes_received,
    }
}

fn ship_answer(m: proto::ReplicateResponse) -> Result<ShipAnswer, wire::Malformed> {
    Ok(ShipAnswer {
        point: m.point,
        taken: m.taken.as_ref().map(|t| wire::timestamp(Some(t))),
        snapshots: snapshot_ids(&m.snapshot_ids, "snapshot_ids")?
            .into_iter()
            .collect(),
        volume_deleted: m.volume_deleted,
        snapshots_deleted: snapshot_ids(&m.snapshots_deleted, "snapshots_deleted")?,
        bytes_received: m.bytes_received,
    })
}

fn snapshot_ids(ids: &[String], field: &'static str) -> Result<Vec<SnapshotId>, wire::Malformed> {
    ids.iter()
        .map(|id| {
            SnapshotId::parse(id).ok_or_else(|| wire::Malformed {
                field,
                reason: format!("{id:?} is not a snapshot ID"),
            })
        })
        .collect()
}

/// Refuses a caller that does not present the node identity.
fn node_identity<T>(request: &Request<T>) -> Result<(), Status> {
    match tls::caller_is(request, tls::NODE_NAME) {
        true => Ok(()),
        false => Err(Status::permission_denied(format!(
            "replication calls are accepted only from a node identity (a client \
             certificate naming {})",
            tls::NODE_NAME
        ))),
    }
}

/// Replica side: takes the point the calling node offers.
pub async fn replicate(
    replicator: &Replicator<ClusterPeers>,
    request: Request<proto::ReplicateRequest>,
) -> Result<proto::ReplicateResponse, Status> {
    node_identity(&request)?;
    let request = ship_request(request.into_inner()).map_err(malformed)?;
    let answer = replicator
        .receive(request)
        .await
        .map_err(|e| errors::status(&e))?;
    Ok(answer_message(&answer))
}

pub type PointStream = Pin<Box<dyn Stream<Item = Result<proto::PointChunk, Status>> + Send>>;

/// Source side: a point or snapshot, to a node with a grant for it.
pub async fn read_point(
    replicator: &Replicator<ClusterPeers>,
    request: Request<proto::ReadPointRequest>,
) -> Result<PointStream, Status> {
    node_identity(&request)?;
    let m = request.into_inner();
    // An ID that cannot be kura's names no volume of this node.
    let volume = VolumeId::parse(&m.volume_id)
        .ok_or_else(|| Status::not_found(format!("volume {:?} does not exist", m.volume_id)))?;
    let target = match m.target {
        Some(proto::read_point_request::Target::Point(n)) => ReadTarget::Point(n),
        Some(proto::read_point_request::Target::SnapshotId(s)) => ReadTarget::Snapshot(
            SnapshotId::parse(&s)
                .ok_or_else(|| Status::not_found(format!("snapshot {s:?} does not exist")))?,
        ),
        None => return Err(Status::invalid_argument("target: missing")),
    };
    let read = ReadRequest {
        volume,
        node: m.node,
        grant: m.grant,
        target,
        base: Some(m.base_point).filter(|n| *n > 0),
    };
    let pieces = replicator
        .open_point(read)
        .await
        .map_err(|e| errors::status(&e))?
        .map_err(|denied| Status::permission_denied(denied.to_string()))?;
    let messages = tokio_stream::wrappers::ReceiverStream::new(pieces).map(|piece| {
        Ok(match piece.map_err(|e| errors::status(&e))? {
            Piece::Header { size_bytes, delta } => proto::PointChunk {
                size_bytes,
                delta,
                chunk: None,
            },
            Piece::Chunk(c) => proto::PointChunk {
                chunk: Some(chunk_message(c)),
                ..Default::default()
            },
            Piece::Digest(digest) => proto::PointChunk {
                chunk: Some(proto::ExportChunk {
                    last: true,
                    digest,
                    ..Default::default()
                }),
                ..Default::default()
            },
        })
    });
    Ok(Box::pin(messages))
}

/// The content source a FindReplica or DropReplica names.
pub fn replica_source(
    volume_id: Option<&str>,
    snapshot_id: Option<&str>,
) -> Result<Option<ContentSource>, Status> {
    Ok(match (volume_id, snapshot_id) {
        (Some(v), None) => VolumeId::parse(v).map(ContentSource::Volume),
        (None, Some(s)) => SnapshotId::parse(s).map(ContentSource::Snapshot),
        _ => return Err(Status::invalid_argument("source: missing")),
    })
}

/// Replica side, controller only: what this node holds of a source.
pub async fn find_replica(
    local: &crate::node::Local,
    source: Option<ContentSource>,
) -> Result<proto::FindReplicaResponse, Status> {
    let Some(source) = source else {
        return Ok(proto::FindReplicaResponse::default());
    };
    let found = local
        .find_replica(source)
        .await
        .map_err(|e| errors::status(&e))?;
    Ok(match found {
        None => proto::FindReplicaResponse::default(),
        Some(found) => proto::FindReplicaResponse {
            found: true,
            point: found.point,
            taken: found.taken.map(wire::timestamp_message),
            size_bytes: found.size_bytes,
        },
    })
}

/// Replica side, controller only: removes this node's copy of a source.
pub async fn drop_replica(
    local: &crate::node::Local,
    source: Option<ContentSource>,
    tombstone: bool,
) -> Result<proto::DropReplicaResponse, Status> {
    let Some(source) = source else {
        return Ok(proto::DropReplicaResponse { held: false });
    };
    let held = local
        .drop_replica(source, tombstone)
        .await
        .map_err(|e| errors::status(&e))?;
    Ok(proto::DropReplicaResponse { held })
}
