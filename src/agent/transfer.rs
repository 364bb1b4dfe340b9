//! Cross-node restore and clone over the agent API, both ends.
//!
//! - Source: [`create_export`] pins the source and issues a grant (controller only);
//!   [`read_export`] streams the pinned image to a node identity that presents the
//!   grant, read with `pread` in a blocking thread ahead of the stream (a bounded
//!   channel of [`READ_AHEAD`] chunks).
//! - Destination: [`Transfers`] runs at most one transfer per volume name, keyed by
//!   the name, with its state in the pool (the checkpoint), so the stateless
//!   controller finds it again on every retry and a restarted agent resumes it. The
//!   chunks are checked and written in a blocking thread; the network side only
//!   receives.
//!
//! # Guarantees
//!
//! - Repeated `Transfer` calls for one name never start a second transfer: they
//!   report the running one, or resume it from its checkpoint if it stopped.
//! - A damaged chunk, a digest mismatch, a full pool or a refused grant ends the
//!   transfer and removes what it wrote; the next call's caller sees the code once.
//! - A broken stream is retried from where the destination is, a few times, then left
//!   resumable for the next call.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use super::proto::agent_client::AgentClient;
use super::{LocalPools, proto, tls, wire};
use crate::csi::status::{from_agent, from_malformed, from_pool};
use crate::pool::transfer::{Begin, Chunk, Source};
use crate::pool::{self, VolumeId};

/// Chunks read ahead of the stream on the source.
pub const READ_AHEAD: usize = 4;
/// Chunks received ahead of the writer on the destination.
pub const WRITE_AHEAD: usize = 4;
/// HTTP/2 flow-control windows of transfer connections (both ends): the default 64
/// KiB would throttle one stream to a few round trips per chunk.
pub const WINDOW: u32 = 32 << 20;
/// Largest message a transfer stream carries (a chunk plus its framing).
pub const MAX_MESSAGE: usize = 32 << 20;
/// How long a `Transfer` call waits for the transfer to finish before it reports
/// progress instead.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// Broken streams retried within one run before it is left for the next call.
const STREAM_ATTEMPTS: u32 = 3;
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Refuses a caller that does not present the node identity.
fn node_identity<T>(request: &Request<T>) -> Result<(), Status> {
    let certs = request.peer_certs();
    if tls::peer_has_name(certs.as_deref().map(Vec::as_slice), tls::NODE_NAME) {
        Ok(())
    } else {
        Err(crate::csi::status::not_node(tls::NODE_NAME))
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
    pools: &LocalPools,
    req: proto::CreateExportRequest,
) -> Result<proto::Export, Status> {
    let source = wire::source(req.source.as_ref())
        .map_err(from_malformed)?
        .ok_or_else(|| Status::invalid_argument("source: missing"))?;
    // No stage, expand, snapshot or delete of the source while it is pinned.
    let guard = pools.lock(source.id()).map_err(from_agent)?;
    let export = pools
        .blocking(vec![guard], move |p| {
            p.create_export(&req.key, &source, &req.destination_node)
        })
        .await
        .map_err(from_agent)?;
    Ok(export_message(&export))
}

pub async fn delete_export(pools: &LocalPools, id: String) -> Result<(), Status> {
    pools
        .blocking(vec![], move |p| p.delete_export(&id))
        .await
        .map_err(from_agent)
}

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<proto::ExportChunk, Status>> + Send>>;

/// Source: the export's image from the request's offset, to a node identity with the
/// export's grant.
pub async fn read_export(
    pools: &LocalPools,
    request: Request<proto::ReadExportRequest>,
) -> Result<ChunkStream, Status> {
    node_identity(&request)?;
    let req = request.into_inner();
    let pool = Arc::clone(pools.pool());
    let (export, image) = {
        let pool = Arc::clone(&pool);
        let id = req.export_id.clone();
        tokio::task::spawn_blocking(move || pool.granted_export(&id, &req.grant))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(from_pool)?
            .map_err(|denied| Status::permission_denied(denied.to_string()))?
    };
    tracing::info!(export.id = %export.id, offset = req.offset, destination = %export.destination_node, "export read");
    let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
    let offset = req.offset;
    tokio::task::spawn_blocking(move || {
        let sent = (|| -> pool::Result<Option<proto::ExportChunk>> {
            let (mut reader, mut chain) = pool::transfer::Reader::open(&image, offset)?;
            while let Some(chunk) = reader.next_chunk()? {
                chain.add(&chunk);
                let mut message = chunk_message(chunk);
                if pool.test_damage_in_flight() {
                    // Test-only: the bytes change after their checksum was taken.
                    let mut bytes = message.data.to_vec();
                    if let Some(first) = bytes.first_mut() {
                        *first ^= 0xff;
                    }
                    message.data = bytes.into();
                }
                if tx.blocking_send(Ok(message)).is_err() {
                    return Ok(None);
                }
            }
            Ok(Some(proto::ExportChunk {
                last: true,
                digest: chain.bytes().to_vec(),
                ..Default::default()
            }))
        })();
        let last = match sent {
            Ok(None) => return,
            Ok(Some(last)) => Ok(last),
            Err(e) => Err(from_pool(e)),
        };
        let _ = tx.blocking_send(last);
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

fn chunk_message(chunk: Chunk) -> proto::ExportChunk {
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

fn chunk(message: proto::ExportChunk) -> Chunk {
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransferLabels {
    pub volume_name: String,
}

/// `kura_transfer_done_bytes` and `kura_transfer_total_bytes`, per running transfer.
#[derive(Clone, Default)]
pub struct TransferGauges {
    pub done: Family<TransferLabels, Gauge>,
    pub total: Family<TransferLabels, Gauge>,
}

/// How a run of a transfer ended.
#[derive(Clone)]
enum Outcome {
    Done(proto::Volume),
    /// Final: what it wrote is removed; the caller sees this once.
    Failed(Status),
    /// The source could not be read for now: the checkpoint stays, the next call
    /// resumes.
    Interrupted(String),
}

struct Job {
    done: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    outcome: watch::Receiver<Option<Outcome>>,
}

/// The destination's transfers, by volume name.
#[derive(Clone)]
pub struct Transfers {
    jobs: Arc<Mutex<HashMap<String, Arc<Job>>>>,
    tls: ClientTlsConfig,
    gauges: TransferGauges,
}

impl Transfers {
    /// `tls` is this node's identity as a client (node-to-node reads).
    pub fn new(tls: ClientTlsConfig) -> Self {
        Transfers {
            jobs: Default::default(),
            tls,
            gauges: TransferGauges::default(),
        }
    }

    pub fn gauges(&self) -> TransferGauges {
        self.gauges.clone()
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Destination: starts, resumes or reports the transfer of the request.
    pub async fn transfer(
        &self,
        pools: &LocalPools,
        req: proto::TransferRequest,
    ) -> Result<proto::TransferResponse, Status> {
        let create = req
            .volume
            .ok_or_else(|| Status::invalid_argument("volume: missing"))?;
        let spec = wire::spec(&create).map_err(from_malformed)?;
        let export = req
            .export
            .ok_or_else(|| Status::invalid_argument("export: missing"))?;
        let source = Source {
            export_id: export.export_id.clone(),
            pin: export.pin.clone(),
            size_bytes: export.size_bytes,
            encryption: wire::encryption(export.encryption).map_err(from_malformed)?,
            expires: export.expires,
        };
        let name = spec.name.clone();
        let job = {
            let mut jobs = self.jobs();
            let finished = jobs.get(&name).and_then(|job| job.outcome.borrow().clone());
            match finished {
                Some(Outcome::Done(volume)) => {
                    jobs.remove(&name);
                    return Ok(done(volume));
                }
                Some(Outcome::Failed(status)) => {
                    jobs.remove(&name);
                    return Err(status);
                }
                // Resumed below from the checkpoint.
                Some(Outcome::Interrupted(reason)) => {
                    tracing::info!(volume.name = %name, reason, "resuming an interrupted transfer");
                    jobs.remove(&name);
                }
                None => {}
            }
            match jobs.get(&name) {
                Some(job) => Arc::clone(job),
                None => {
                    let job = self.start(pools, spec, source, export, req.source_address);
                    jobs.insert(name.clone(), Arc::clone(&job));
                    job
                }
            }
        };
        let mut outcome = job.outcome.clone();
        let finished = tokio::time::timeout(ANSWER_WITHIN, outcome.wait_for(Option::is_some)).await;
        let finished = match finished {
            Ok(Ok(o)) => o.clone(),
            _ => None,
        };
        match finished {
            Some(Outcome::Done(volume)) => {
                self.jobs().remove(&name);
                Ok(done(volume))
            }
            Some(Outcome::Failed(status)) => {
                self.jobs().remove(&name);
                Err(status)
            }
            Some(Outcome::Interrupted(_)) | None => Ok(proto::TransferResponse {
                state: Some(proto::transfer_response::State::Running(
                    proto::TransferProgress {
                        bytes_done: job.done.load(Ordering::Relaxed),
                        bytes_total: job.total.load(Ordering::Relaxed),
                    },
                )),
            }),
        }
    }

    /// Destination: the transfer for a volume of this name, running here or left
    /// resumable in the pool.
    pub async fn find(
        &self,
        pools: &LocalPools,
        name: String,
    ) -> Result<Option<proto::TransferProgress>, Status> {
        if let Some(job) = self.jobs().get(&name) {
            return Ok(Some(proto::TransferProgress {
                bytes_done: job.done.load(Ordering::Relaxed),
                bytes_total: job.total.load(Ordering::Relaxed),
            }));
        }
        let found = pools
            .blocking(vec![], move |p| p.import_progress(&name))
            .await
            .map_err(from_agent)?;
        Ok(
            found.map(|(bytes_done, bytes_total)| proto::TransferProgress {
                bytes_done,
                bytes_total,
            }),
        )
    }

    fn start(
        &self,
        pools: &LocalPools,
        spec: pool::VolumeSpec,
        source: Source,
        export: proto::Export,
        address: String,
    ) -> Arc<Job> {
        let (tx, rx) = watch::channel(None);
        let job = Arc::new(Job {
            done: Arc::new(AtomicU64::new(0)),
            total: Arc::new(AtomicU64::new(source.size_bytes)),
            outcome: rx,
        });
        let labels = TransferLabels {
            volume_name: spec.name.clone(),
        };
        let run = Run {
            pools: pools.clone(),
            tls: self.tls.clone(),
            done: Arc::clone(&job.done),
            gauges: self.gauges.clone(),
            labels: labels.clone(),
        };
        let gauges = self.gauges.clone();
        tokio::spawn(async move {
            let name = spec.name.clone();
            let outcome = run.run(spec, source, export, address).await;
            match &outcome {
                Outcome::Done(v) => {
                    tracing::info!(volume.name = %name, volume.id = %v.id, "transfer done")
                }
                Outcome::Failed(s) => {
                    tracing::warn!(volume.name = %name, code = ?s.code(), error = s.message(), "transfer failed; nothing kept")
                }
                Outcome::Interrupted(r) => {
                    tracing::warn!(volume.name = %name, reason = r, "transfer interrupted; resumable")
                }
            }
            gauges.done.remove(&labels);
            gauges.total.remove(&labels);
            let _ = tx.send(Some(outcome));
        });
        job
    }
}

fn done(volume: proto::Volume) -> proto::TransferResponse {
    proto::TransferResponse {
        state: Some(proto::transfer_response::State::Volume(volume)),
    }
}

/// One run of a transfer.
struct Run {
    pools: LocalPools,
    tls: ClientTlsConfig,
    done: Arc<AtomicU64>,
    gauges: TransferGauges,
    labels: TransferLabels,
}

/// Why a stream ended without the digest.
enum Broken {
    /// The source is unreachable or the stream broke: retry.
    Stream(String),
    /// Final.
    Failed(Status),
}

impl Run {
    async fn run(
        &self,
        spec: pool::VolumeSpec,
        source: Source,
        export: proto::Export,
        address: String,
    ) -> Outcome {
        let name = spec.name.clone();
        let begun = {
            let (spec, source) = (spec.clone(), source.clone());
            self.pools
                .blocking(vec![], move |p| p.begin_import(&spec, &source))
                .await
        };
        let mut import = match begun {
            Ok(Begin::Exists(volume)) => return Outcome::Done(wire::volume_message(&volume)),
            Ok(Begin::Import(import)) => import,
            Err(e) => return self.fail(&name, from_agent(e)).await,
        };
        self.gauges
            .total
            .get_or_create(&self.labels)
            .set(import.size() as i64);
        let mut attempts = 0;
        loop {
            self.progress(import.bytes_done());
            let (back, ended) = self.stream(import, &export, &address).await;
            import = back;
            match ended {
                Ok(digest) => {
                    if let Err(e) = import.check_digest(&digest) {
                        return self.fail(&name, from_pool(e)).await;
                    }
                    let id = import.id().clone();
                    let guard = match self.pools.lock(id.as_str()) {
                        Ok(guard) => guard,
                        Err(e) => return Outcome::Interrupted(e.to_string()),
                    };
                    return match self
                        .pools
                        .blocking(vec![guard], move |p| p.commit_import(import))
                        .await
                    {
                        Ok(volume) => Outcome::Done(wire::volume_message(&volume)),
                        Err(e) => self.fail(&name, from_agent(e)).await,
                    };
                }
                Err(Broken::Failed(status)) => return self.fail(&name, status).await,
                Err(Broken::Stream(reason)) => {
                    attempts += 1;
                    if attempts >= STREAM_ATTEMPTS {
                        return Outcome::Interrupted(reason);
                    }
                    tracing::warn!(volume.name = %name, offset = import.offset(), reason, "transfer stream broke; retrying");
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        }
    }

    fn progress(&self, bytes: u64) {
        self.done.store(bytes, Ordering::Relaxed);
        self.gauges
            .done
            .get_or_create(&self.labels)
            .set(bytes as i64);
    }

    /// Removes what the transfer wrote, and says why.
    async fn fail(&self, name: &str, status: Status) -> Outcome {
        let name = name.to_owned();
        if let Err(e) = self
            .pools
            .blocking(vec![], move |p| p.abandon_import(&name))
            .await
        {
            tracing::error!(error = %crate::csi::status::chain(&e), "removing a failed transfer");
        }
        Outcome::Failed(status)
    }

    /// Reads the export from where `import` is into it, until the source's digest
    /// arrives or the stream breaks. Gives `import` back either way.
    async fn stream(
        &self,
        import: Box<pool::transfer::Import>,
        export: &proto::Export,
        address: &str,
    ) -> (Box<pool::transfer::Import>, Result<Vec<u8>, Broken>) {
        let offset = import.offset();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(WRITE_AHEAD);
        let done = Arc::clone(&self.done);
        let gauge = self.gauges.done.get_or_create(&self.labels).clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut import = import;
            while let Some(chunk) = rx.blocking_recv() {
                if let Err(e) = import.write(&chunk) {
                    return (import, Err(e));
                }
                done.store(import.bytes_done(), Ordering::Relaxed);
                gauge.set(import.bytes_done() as i64);
            }
            (import, Ok(()))
        });
        let received = self.receive(export, address, offset, tx).await;
        let (import, written) = match writer.await {
            Ok(result) => result,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let ended = match (written, received) {
            (Err(e), _) => Err(Broken::Failed(from_pool(e))),
            (Ok(()), result) => result,
        };
        (import, ended)
    }

    /// Receives chunks into `tx`; the digest at the end.
    async fn receive(
        &self,
        export: &proto::Export,
        address: &str,
        offset: u64,
        tx: tokio::sync::mpsc::Sender<Chunk>,
    ) -> Result<Vec<u8>, Broken> {
        let endpoint = Endpoint::from_shared(format!("https://{address}"))
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
            .map_err(|e| Broken::Stream(crate::csi::status::chain(&e)))?;
        let mut client = AgentClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        let request = proto::ReadExportRequest {
            export_id: export.export_id.clone(),
            grant: export.grant.clone(),
            offset,
        };
        let classify = |status: Status| match status.code() {
            Code::Unavailable | Code::Cancelled | Code::Unknown | Code::DeadlineExceeded => {
                Broken::Stream(crate::csi::status::chain(&status))
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

/// Removes expired exports every `interval`, for as long as the pool lives.
pub async fn sweep(pools: LocalPools, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        if let Err(e) = pools.blocking(vec![], |p| p.sweep_exports()).await {
            tracing::warn!(error = %crate::csi::status::chain(&e), "sweeping exports");
        }
    }
}

/// The destination volume's ID a transfer of `name` to `node` makes: the export key.
pub fn key(name: &str, node: &super::Node) -> String {
    VolumeId::derive(name, &node.token).to_string()
}
