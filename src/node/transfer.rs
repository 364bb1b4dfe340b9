//! Cross-node restore and clone, both ends, as this node runs them; the agent carries
//! the bytes between nodes (`agent::transfer`).
//!
//! - Source: [`Local::create_export`] pins the source and issues a grant;
//!   [`Local::open_export`] reads the pinned image, chunk by chunk, for a destination
//!   that presents the grant.
//! - Destination: [`Transfers`] runs at most one transfer per volume name, keyed by
//!   the name, with its state in the pool (the checkpoint), so the stateless
//!   controller finds it again on every retry and a restarted node resumes it. Chunks
//!   are checked and written in a blocking thread; the network side only receives.
//!
//! # Guarantees
//!
//! - Repeated [`Transfers::transfer`] calls for one name never start a second
//!   transfer: they report the running one, or resume it from its checkpoint if it
//!   stopped.
//! - A damaged chunk, a digest mismatch, a full pool or a refused grant ends the
//!   transfer and removes what it wrote; the next call's caller sees the error once.
//! - A broken stream is retried from where the destination is, a few times, then left
//!   resumable for the next call.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, watch};

use super::Local;
use crate::pool::export::{Denied, Export};
use crate::pool::transfer::{Begin, Chain, Chunk, ExportRef, Import, Reader};
use crate::pool::{self, ContentSource, Volume, VolumeSpec};

/// Chunks received ahead of the writer on the destination.
pub const WRITE_AHEAD: usize = 4;
/// How long a [`Transfers::transfer`] call waits for the transfer to finish before it
/// reports progress instead.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// Broken streams retried within one run before it is left for the next call.
const STREAM_ATTEMPTS: u32 = 3;
const RETRY_AFTER: Duration = Duration::from_secs(1);

impl Local {
    /// Source: pins `source` for `destination_node` under `key` and issues the grant.
    /// No stage, expand, snapshot or delete of the source while it is being pinned.
    pub async fn create_export(
        &self,
        key: String,
        source: ContentSource,
        destination_node: String,
    ) -> pool::Result<Export> {
        let lock = source.id().to_owned();
        self.on_pool(&[lock], move |p| {
            p.create_export(&key, &source, &destination_node)
        })
        .await
    }

    pub async fn delete_export(&self, id: String) -> pool::Result<()> {
        self.on_pool(&[], move |p| p.delete_export(&id)).await
    }

    /// Source: a reader of the export's image from `offset`, for a caller presenting
    /// `grant`.
    pub async fn open_export(
        &self,
        id: String,
        grant: String,
        offset: u64,
    ) -> pool::Result<Result<(Export, ExportReader), Denied>> {
        let damage = self.pool.test_damage_in_flight();
        self.on_pool(&[], move |p| {
            let (export, image) = match p.granted_export(&id, &grant)? {
                Ok(found) => found,
                Err(denied) => return Ok(Err(denied)),
            };
            let reader = ExportReader::open(image, offset, damage)?;
            Ok(Ok((export, reader)))
        })
        .await
    }

    /// Removes expired exports every `interval`, for as long as the process lives.
    pub async fn sweep_exports(self, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            if let Err(e) = self.on_pool(&[], |p| p.sweep_exports()).await {
                tracing::warn!(error = %crate::chain(&e), "sweeping exports");
            }
        }
    }
}

/// Reads an export's image chunk by chunk (blocking calls), and gives the image's
/// digest at the end.
pub struct ExportReader {
    reader: Reader,
    chain: Chain,
    /// Test-only: each chunk's bytes change after their checksum was taken.
    damage: bool,
}

impl ExportReader {
    fn open(image: PathBuf, offset: u64, damage: bool) -> pool::Result<Self> {
        let (reader, chain) = Reader::open(&image, offset)?;
        Ok(ExportReader {
            reader,
            chain,
            damage,
        })
    }

    /// The next chunk with data, or `None` at the end.
    pub fn next_chunk(&mut self) -> pool::Result<Option<Chunk>> {
        let Some(mut chunk) = self.reader.next_chunk()? else {
            return Ok(None);
        };
        self.chain.add(&chunk);
        if self.damage {
            let mut bytes = chunk.data.to_vec();
            if let Some(first) = bytes.first_mut() {
                *first ^= 0xff;
            }
            chunk.data = bytes.into();
        }
        Ok(Some(chunk))
    }

    /// The digest of every chunk read, for the destination to check.
    pub fn digest(&self) -> Vec<u8> {
        self.chain.bytes().to_vec()
    }
}

/// How a destination reads a source's export: the agent's client, in a cluster.
pub trait Fetch: Send + Sync + 'static {
    /// What ends a transfer, as the caller will see it (kept until reported once).
    type Error: Clone + std::fmt::Display + Send + Sync + 'static;

    /// The error a pool failure on this node is to the caller.
    fn failure(error: pool::Error) -> Self::Error;

    /// Streams the export's chunks from `offset` into `chunks`; answers the source's
    /// digest once the last chunk is sent.
    fn fetch(
        &self,
        offset: u64,
        chunks: mpsc::Sender<Chunk>,
    ) -> impl Future<Output = Result<Vec<u8>, Broken<Self::Error>>> + Send;
}

/// Why a stream ended without the digest.
pub enum Broken<E> {
    /// The source is unreachable or the stream broke: retry.
    Stream(String),
    /// Final.
    Failed(E),
}

/// Where a transfer is, as a caller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Done(Volume),
    /// Data bytes written so far, and the source image's size.
    Running {
        done: u64,
        total: u64,
    },
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
enum Outcome<E> {
    Done(Volume),
    /// Final: what it wrote is removed; the caller sees this once.
    Failed(E),
    /// The source could not be read for now: the checkpoint stays, the next call
    /// resumes.
    Interrupted(String),
}

struct Job<E> {
    done: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    outcome: watch::Receiver<Option<Outcome<E>>>,
}

impl<E> Job<E> {
    fn running(&self) -> Progress {
        Progress::Running {
            done: self.done.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
        }
    }
}

type Jobs<E> = Arc<Mutex<HashMap<String, Arc<Job<E>>>>>;

/// The destination's transfers, by volume name.
pub struct Transfers<F: Fetch> {
    local: Local,
    jobs: Jobs<F::Error>,
    gauges: TransferGauges,
}

impl<F: Fetch> Clone for Transfers<F> {
    fn clone(&self) -> Self {
        Transfers {
            local: self.local.clone(),
            jobs: Arc::clone(&self.jobs),
            gauges: self.gauges.clone(),
        }
    }
}

impl<F: Fetch> Transfers<F> {
    pub fn new(local: Local) -> Self {
        Transfers {
            local,
            jobs: Default::default(),
            gauges: TransferGauges::default(),
        }
    }

    pub fn gauges(&self) -> TransferGauges {
        self.gauges.clone()
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Job<F::Error>>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts, resumes or reports the transfer making the volume `spec` names from
    /// `source`, read through `fetch`.
    pub async fn transfer(
        &self,
        spec: VolumeSpec,
        source: ExportRef,
        fetch: F,
    ) -> Result<Progress, F::Error> {
        let name = spec.name.clone();
        let job = {
            let mut jobs = self.jobs();
            let finished = jobs.get(&name).and_then(|job| job.outcome.borrow().clone());
            match finished {
                Some(Outcome::Done(volume)) => {
                    jobs.remove(&name);
                    return Ok(Progress::Done(volume));
                }
                Some(Outcome::Failed(error)) => {
                    jobs.remove(&name);
                    return Err(error);
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
                    let job = self.start(spec, source, fetch);
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
                Ok(Progress::Done(volume))
            }
            Some(Outcome::Failed(error)) => {
                self.jobs().remove(&name);
                Err(error)
            }
            Some(Outcome::Interrupted(_)) | None => Ok(job.running()),
        }
    }

    /// The transfer for a volume of this name, running here or left resumable in the
    /// pool.
    pub async fn find(&self, name: String) -> pool::Result<Option<Progress>> {
        if let Some(job) = self.jobs().get(&name) {
            return Ok(Some(job.running()));
        }
        let found = self
            .local
            .on_pool(&[], move |p| p.import_progress(&name))
            .await?;
        Ok(found.map(|(done, total)| Progress::Running { done, total }))
    }

    fn start(&self, spec: VolumeSpec, source: ExportRef, fetch: F) -> Arc<Job<F::Error>> {
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
            local: self.local.clone(),
            fetch,
            done: Arc::clone(&job.done),
            gauges: self.gauges.clone(),
            labels: labels.clone(),
        };
        let gauges = self.gauges.clone();
        tokio::spawn(async move {
            let name = spec.name.clone();
            let outcome = run.run(spec, source).await;
            match &outcome {
                Outcome::Done(v) => {
                    tracing::info!(volume.name = %name, volume.id = %v.id, "transfer done")
                }
                Outcome::Failed(e) => {
                    tracing::warn!(volume.name = %name, error = %e, "transfer failed; nothing kept")
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

/// One run of a transfer.
struct Run<F> {
    local: Local,
    fetch: F,
    done: Arc<AtomicU64>,
    gauges: TransferGauges,
    labels: TransferLabels,
}

impl<F: Fetch> Run<F> {
    async fn run(&self, spec: VolumeSpec, source: ExportRef) -> Outcome<F::Error> {
        let name = spec.name.clone();
        let begun = self
            .local
            .on_pool(&[], move |p| p.begin_import(&spec, &source))
            .await;
        let mut import = match begun {
            Ok(Begin::Exists(volume)) => return Outcome::Done(volume),
            Ok(Begin::Import(import)) => import,
            Err(e) => return self.fail(&name, F::failure(e)).await,
        };
        self.gauges
            .total
            .get_or_create(&self.labels)
            .set(import.size() as i64);
        let mut attempts = 0;
        loop {
            self.progress(import.bytes_done());
            let (back, ended) = self.stream(import).await;
            import = back;
            match ended {
                Ok(digest) => {
                    if let Err(e) = import.check_digest(&digest) {
                        return self.fail(&name, F::failure(e)).await;
                    }
                    let id = import.id().clone();
                    return match self
                        .local
                        .on_pool(&[id.to_string()], move |p| p.commit_import(import))
                        .await
                    {
                        Ok(volume) => Outcome::Done(volume),
                        Err(e @ pool::Error::Busy(_)) => Outcome::Interrupted(e.to_string()),
                        Err(e) => self.fail(&name, F::failure(e)).await,
                    };
                }
                Err(Broken::Failed(error)) => return self.fail(&name, error).await,
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
    async fn fail(&self, name: &str, error: F::Error) -> Outcome<F::Error> {
        let name = name.to_owned();
        if let Err(e) = self
            .local
            .on_pool(&[], move |p| p.abandon_import(&name))
            .await
        {
            tracing::error!(error = %crate::chain(&e), "removing a failed transfer");
        }
        Outcome::Failed(error)
    }

    /// Reads the export from where `import` is into it, until the source's digest
    /// arrives or the stream breaks. Gives `import` back either way.
    async fn stream(
        &self,
        import: Box<Import>,
    ) -> (Box<Import>, Result<Vec<u8>, Broken<F::Error>>) {
        let offset = import.offset();
        let (tx, mut rx) = mpsc::channel::<Chunk>(WRITE_AHEAD);
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
        let received = self.fetch.fetch(offset, tx).await;
        let (import, written) = match writer.await {
            Ok(result) => result,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let ended = match (written, received) {
            (Err(e), _) => Err(Broken::Failed(F::failure(e))),
            (Ok(()), result) => result,
        };
        (import, ended)
    }
}
