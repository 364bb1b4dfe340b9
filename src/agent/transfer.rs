//! The bytes of a cross-node restore or clone between two agents; what each end does
//! is in [`crate::node::transfer`].
//!
//! - Source: the export calls (controller only) and [`read_export`], which streams
//!   the pinned image to a node identity that presents the grant, read in a blocking
//!   thread ahead of the stream (a bounded channel of [`READ_AHEAD`] chunks).
//! - Destination: [`ExportClient`] reads a source agent's export for the node's
//!   [`Transfers`], and [`transfer`] / [`find`] answer the controller.

use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use super::errors::{self, malformed};
use super::proto::agent_client::AgentClient;
use super::{proto, tls, wire};
use crate::node::transfer::{Broken, Fetch, Progress, Transfers};
use crate::node::{self};
use crate::pool;
use crate::pool::transfer::{Chunk, ExportRef};

/// Chunks read ahead of the stream on the source.
pub const READ_AHEAD: usize = 4;
/// HTTP/2 flow-control windows of transfer connections (both ends): the default 64
/// KiB would throttle one stream to a few round trips per chunk.
pub const WINDOW: u32 = 32 << 20;
/// Largest message a transfer stream carries (a chunk plus its framing).
pub const MAX_MESSAGE: usize = 32 << 20;

/// Refuses a caller that does not present the node identity.
fn node_identity<T>(request: &Request<T>) -> Result<(), Status> {
    match tls::caller_is(request, tls::NODE_NAME) {
        true => Ok(()),
        false => Err(errors::not_node(tls::NODE_NAME)),
    }
}

fn export_message(e: &pool::export::Export) -> proto::Export {
    proto::Export {
        export_id: e.id.clone(),
        grant: e.grant.clone(),
        expires: e.expires,
        pin: e.pin.clone(),
        size_bytes: e.size_bytes,
        encryption: wire::encryption_message(e.encryption),
    }
}

/// Source: pins the request's source and issues the grant.
pub async fn create_export(
    local: &node::Local,
    req: proto::CreateExportRequest,
) -> Result<proto::Export, Status> {
    let source = wire::source(req.source.as_ref())
        .map_err(malformed)?
        .ok_or_else(|| Status::invalid_argument("source: missing"))?;
    let export = local
        .create_export(req.key, source, req.destination_node)
        .await
        .map_err(|e| errors::status(&e))?;
    Ok(export_message(&export))
}

pub async fn delete_export(local: &node::Local, id: String) -> Result<(), Status> {
    local
        .delete_export(id)
        .await
        .map_err(|e| errors::status(&e))
}

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<proto::ExportChunk, Status>> + Send>>;

/// Source: the export's image from the request's offset, to a node identity with the
/// export's grant.
pub async fn read_export(
    local: &node::Local,
    request: Request<proto::ReadExportRequest>,
) -> Result<ChunkStream, Status> {
    node_identity(&request)?;
    let req = request.into_inner();
    let (export, mut reader) = local
        .open_export(req.export_id, req.grant, req.offset)
        .await
        .map_err(|e| errors::status(&e))?
        .map_err(|denied| Status::permission_denied(denied.to_string()))?;
    tracing::info!(export.id = %export.id, offset = req.offset, destination = %export.destination_node, "export read");
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        loop {
            let message = match reader.next_chunk() {
                Ok(Some(chunk)) => Ok(chunk_message(chunk)),
                Ok(None) => break,
                Err(e) => Err(errors::status(&e)),
            };
            let failed = message.is_err();
            if tx.blocking_send(message).is_err() || failed {
                return;
            }
        }
        let _ = tx.blocking_send(Ok(proto::ExportChunk {
            last: true,
            digest: reader.digest(),
            ..Default::default()
        }));
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

pub(super) fn chunk_message(chunk: Chunk) -> proto::ExportChunk {
    proto::ExportChunk {
        offset: chunk.offset,
        length: chunk.length,
        extents: chunk
            .extents
            .iter()
            .map(|&(offset, length)| proto::Extent { offset, length })
            .collect(),
        data: chunk.data,
        crc32c: chunk.crc,
        last: false,
        digest: vec![],
    }
}

pub(super) fn chunk(message: proto::ExportChunk) -> Chunk {
    Chunk {
        offset: message.offset,
        length: message.length,
        extents: message
            .extents
            .iter()
            .map(|e| (e.offset, e.length))
            .collect(),
        data: message.data,
        crc: message.crc32c,
    }
}

/// Destination: starts, resumes or reports the transfer a controller asks for.
pub async fn transfer(
    transfers: &Transfers<ExportClient>,
    tls: &ClientTlsConfig,
    req: proto::TransferRequest,
) -> Result<proto::TransferResponse, Status> {
    let create = req
        .volume
        .ok_or_else(|| Status::invalid_argument("volume: missing"))?;
    let spec = wire::spec(&create).map_err(malformed)?;
    let export = req
        .export
        .ok_or_else(|| Status::invalid_argument("export: missing"))?;
    let source = ExportRef {
        export_id: export.export_id.clone(),
        pin: export.pin.clone(),
        size_bytes: export.size_bytes,
        encryption: wire::encryption(export.encryption).map_err(malformed)?,
        expires: export.expires,
    };
    let client = ExportClient {
        tls: tls.clone(),
        address: req.source_address,
        export,
    };
    let progress = transfers.transfer(spec, source, client).await?;
    use proto::transfer_response::State;
    let state = match progress {
        Progress::Done(volume) => State::Volume(wire::volume_message(&volume)),
        Progress::Running { done, total } => State::Running(progress_message(done, total)),
    };
    Ok(proto::TransferResponse { state: Some(state) })
}

/// Destination: the transfer for a volume of this name, running or resumable here.
pub async fn find(
    transfers: &Transfers<ExportClient>,
    name: String,
) -> Result<Option<proto::TransferProgress>, Status> {
    let found = transfers.find(name).await.map_err(|e| errors::status(&e))?;
    Ok(found.map(|progress| match progress {
        Progress::Running { done, total } => progress_message(done, total),
        // A finished transfer is reported by `transfer`, not found.
        Progress::Done(v) => progress_message(v.size_bytes, v.size_bytes),
    }))
}

fn progress_message(bytes_done: u64, bytes_total: u64) -> proto::TransferProgress {
    proto::TransferProgress {
        bytes_done,
        bytes_total,
    }
}

/// Reads one export from its source agent, with this node's identity.
pub struct ExportClient {
    tls: ClientTlsConfig,
    address: String,
    export: proto::Export,
}

impl Fetch for ExportClient {
    type Error = Status;

    fn failure(error: pool::Error) -> Status {
        errors::status(&error)
    }

    async fn fetch(&self, offset: u64, tx: mpsc::Sender<Chunk>) -> Result<Vec<u8>, Broken<Status>> {
        let endpoint = Endpoint::from_shared(format!("https://{}", self.address))
            .and_then(|e| e.tls_config(self.tls.clone()))
            .map_err(|e| Broken::Failed(Status::invalid_argument(format!("source_address: {e}"))))?
            .connect_timeout(super::cluster::CONNECT_TIMEOUT)
            .http2_keep_alive_interval(super::cluster::KEEPALIVE_INTERVAL)
            .keep_alive_timeout(super::cluster::KEEPALIVE_TIMEOUT)
            .initial_stream_window_size(WINDOW)
            .initial_connection_window_size(WINDOW)
            .tcp_nodelay(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| Broken::Stream(crate::chain(&e)))?;
        let mut client = AgentClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        let request = proto::ReadExportRequest {
            export_id: self.export.export_id.clone(),
            grant: self.export.grant.clone(),
            offset,
        };
        let classify = |status: Status| match status.code() {
            Code::Unavailable | Code::Cancelled | Code::Unknown | Code::DeadlineExceeded => {
                Broken::Stream(crate::chain(&status))
            }
            _ => Broken::Failed(status),
        };
        let mut stream = client
            .read_export(request)
            .await
            .map_err(classify)?
            .into_inner();
        loop {
            match stream.message().await {
                Ok(Some(message)) if message.last => return Ok(message.digest),
                Ok(Some(message)) => {
                    if tx.send(chunk(message)).await.is_err() {
                        // The writer stopped: its error says why.
                        return Err(Broken::Stream("the writer stopped".to_owned()));
                    }
                }
                Ok(None) => {
                    return Err(Broken::Stream(
                        "the source ended the stream early".to_owned(),
                    ));
                }
                Err(status) => return Err(classify(status)),
            }
        }
    }
}
