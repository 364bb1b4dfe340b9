//! The SnapshotMetadata service (changed block tracking, CSI spec "Snapshot Metadata
//! Service RPCs"): checks each request into a [`Query`], asks [`crate::control`] to
//! open the stream on the snapshots' node, and turns its batches into messages. Served
//! with the Controller (all-in-one and controller sockets), never on a node's.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::proto::snapshot_metadata_server::SnapshotMetadata;
use super::proto::{self, BlockMetadataType};
use super::status::{
    from_agent, from_control, invalid, naming_snapshot, not_found, out_of_range, shown,
};
use super::validate;
use crate::agent::{Pools, Ranges};
use crate::control;
use crate::pool::SnapshotId;
use crate::pool::cbt::{Query, Range};

/// The SnapshotMetadata service over the nodes' pools.
pub struct SnapshotMetadataService<P> {
    control: control::Controller<P>,
}

impl<P: Pools> SnapshotMetadataService<P> {
    pub fn new(pools: P) -> Self {
        SnapshotMetadataService {
            control: control::Controller::new(pools),
        }
    }

    /// Opens the stream; a refusal names the field it is about.
    async fn open(
        &self,
        query: Query,
        start: u64,
        max: usize,
        fields: &[(&str, &str)],
    ) -> Result<Ranges, Status> {
        self.control
            .snapshot_ranges(query, start, max)
            .await
            .map_err(|e| naming_snapshot(from_control(e), fields))
    }
}

type MessageStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A snapshot ID field: one that cannot be kura's names no snapshot (CSI spec,
/// "GetMetadataAllocated Errors" and "GetMetadataDelta Errors": NOT_FOUND).
fn snapshot(value: &str, field: &str) -> Result<SnapshotId, Status> {
    validate::snapshot_id(value, field)?
        .ok_or_else(|| not_found(format_args!("{field}: snapshot {}", shown(value))))
}

/// `starting_offset`: negative is OUT_OF_RANGE (CSI spec, "GetMetadataAllocated
/// Errors", "Invalid starting_offset"); past the capacity is found on the node.
fn starting_offset(value: i64) -> Result<u64, Status> {
    u64::try_from(value).map_err(|_| out_of_range("starting_offset", "is negative"))
}

/// `max_results`: 0 leaves it to kura; negative is INVALID_ARGUMENT ("Missing or
/// otherwise invalid argument").
fn max_results(value: i32) -> Result<usize, Status> {
    usize::try_from(value).map_err(|_| invalid("max_results", "is negative"))
}

/// The messages of a stream, `VARIABLE_LENGTH` ranges (adjacent extents merged), each
/// with the capacity. A failure mid-stream ends it with the failure's code.
/// (VARIABLE_LENGTH: the spec, "Metadata Format", leaves the style to the plugin;
/// extents are of any length, and fixed blocks would multiply the tuples.)
fn messages<T: Send + 'static>(
    ranges: Ranges,
    message: fn(BlockMetadataType, i64, Vec<proto::BlockMetadata>) -> T,
) -> MessageStream<T> {
    let capacity = ranges.capacity as i64;
    // An empty batch after the first is the node's keepalive: not for the client.
    let batches = ranges.batches.enumerate().filter_map(|(i, batch)| {
        let keepalive = i > 0 && batch.as_ref().is_ok_and(|b| b.is_empty());
        std::future::ready((!keepalive).then_some(batch))
    });
    Box::pin(batches.map(move |batch| match batch {
        Ok(batch) => Ok(message(
            BlockMetadataType::VariableLength,
            capacity,
            batch.into_iter().map(block).collect(),
        )),
        Err(e) => {
            let status = from_agent(e);
            tracing::warn!(error = %status.message(), "snapshot metadata stream failed");
            Err(status)
        }
    }))
}

fn block((start, end): Range) -> proto::BlockMetadata {
    proto::BlockMetadata {
        byte_offset: start as i64,
        size_bytes: (end - start) as i64,
    }
}

#[tonic::async_trait]
impl<P: Pools> SnapshotMetadata for SnapshotMetadataService<P> {
    type GetMetadataAllocatedStream = MessageStream<proto::GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = MessageStream<proto::GetMetadataDeltaResponse>;

    #[instrument(skip_all, fields(snapshot.id = ?request.get_ref().snapshot_id))]
    async fn get_metadata_allocated(
        &self,
        request: Request<proto::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let req = request.into_inner();
        validate::map_size(&req.secrets, "secrets")?;
        let id = snapshot(&req.snapshot_id, "snapshot_id")?;
        let start = starting_offset(req.starting_offset)?;
        let max = max_results(req.max_results)?;
        let fields = [("snapshot_id", req.snapshot_id.as_str())];
        let ranges = self.open(Query::Allocated(id), start, max, &fields).await?;
        Ok(Response::new(messages(ranges, |kind, capacity, blocks| {
            proto::GetMetadataAllocatedResponse {
                block_metadata_type: kind as i32,
                volume_capacity_bytes: capacity,
                block_metadata: blocks,
            }
        })))
    }

    #[instrument(skip_all, fields(snapshot.id = ?request.get_ref().target_snapshot_id))]
    async fn get_metadata_delta(
        &self,
        request: Request<proto::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let req = request.into_inner();
        validate::map_size(&req.secrets, "secrets")?;
        let base = snapshot(&req.base_snapshot_id, "base_snapshot_id")?;
        let target = snapshot(&req.target_snapshot_id, "target_snapshot_id")?;
        let start = starting_offset(req.starting_offset)?;
        let max = max_results(req.max_results)?;
        let fields = [
            ("base_snapshot_id", req.base_snapshot_id.as_str()),
            ("target_snapshot_id", req.target_snapshot_id.as_str()),
        ];
        let ranges = self
            .open(Query::Delta { base, target }, start, max, &fields)
            .await?;
        Ok(Response::new(messages(ranges, |kind, capacity, blocks| {
            proto::GetMetadataDeltaResponse {
                block_metadata_type: kind as i32,
                volume_capacity_bytes: capacity,
                block_metadata: blocks,
            }
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn request_fields_are_checked_with_the_specs_codes() {
        assert_eq!(starting_offset(-1).unwrap_err().code(), Code::OutOfRange);
        assert_eq!(starting_offset(4096).unwrap(), 4096);
        assert_eq!(max_results(-1).unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(max_results(0).unwrap(), 0);
        assert_eq!(
            snapshot("", "snapshot_id").unwrap_err().code(),
            Code::InvalidArgument
        );
        let unknown = snapshot("not-ours", "base_snapshot_id").unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound);
        assert!(unknown.message().starts_with("base_snapshot_id: "));
        let named = naming_snapshot(
            Status::not_found("snapshot t-1 does not exist"),
            &[("base_snapshot_id", "b-1"), ("target_snapshot_id", "t-1")],
        );
        assert!(
            named.message().starts_with("target_snapshot_id: "),
            "{named:?}"
        );
    }
}
