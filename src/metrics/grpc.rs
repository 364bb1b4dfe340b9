//! A tower layer on a tonic server that times every call once, from its arrival to the
//! end of its answer, records it with its gRPC status code, and logs it if it failed.
//!
//! # Guarantees
//!
//! - Each call is recorded exactly once: when the status arrives (in the response
//!   headers of an error answer, or in the trailers after the message), or, if the
//!   answer never completes because the client went away, as `Canceled` when it is
//!   dropped.
//! - A failed call is logged once, in the process that decided it: a caller's mistake,
//!   or a state the caller waits out or retries (NOT_FOUND, ALREADY_EXISTS, ABORTED,
//!   UNAVAILABLE, ...), at WARN; kura's own failure (INTERNAL, DATA_LOSS, UNKNOWN,
//!   DEADLINE_EXCEEDED) at ERROR, for an operator to act on; a status the controller
//!   relays from a node unchanged (it carries [`RELAYED_FROM`]), which the node
//!   logged, and a call the client gave up on, at DEBUG.
//! - Only the services' own paths are recorded (`/csi.v1.` on a CSI server,
//!   `/kura.agent.v1.` on the agent), so a stray path cannot add series.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use hyper::body::{Body, Frame, SizeHint};

use super::{AGENT_STATUS_METHOD, AgentLabels, CsiLabels, Histograms};
use crate::agent::errors::RELAYED_FROM;

/// Where a finished call is recorded.
pub trait Record: Clone + Send + Sync + Unpin + 'static {
    /// Whether calls of this method are recorded.
    fn wants(&self, method: &str) -> bool;
    /// `code` is grpc-go's name of the call's status code ([`code_name`]).
    fn record(&self, method: &str, code: &str, seconds: f64);
}

/// `csi_plugin_operations_seconds`.
#[derive(Clone)]
pub struct CsiOperations {
    pub(super) histograms: Histograms<CsiLabels>,
    pub(super) driver_name: String,
}

impl Record for CsiOperations {
    fn wants(&self, method: &str) -> bool {
        method.starts_with("/csi.v1.")
    }

    fn record(&self, method: &str, code: &str, seconds: f64) {
        self.histograms
            .get_or_create(&CsiLabels {
                driver_name: self.driver_name.clone(),
                method_name: method.to_owned(),
                grpc_status_code: code.to_owned(),
            })
            .observe(seconds);
    }
}

/// `kura_agent_operations_seconds`.
#[derive(Clone)]
pub struct AgentOperations {
    pub(super) histograms: Histograms<AgentLabels>,
}

impl Record for AgentOperations {
    fn wants(&self, method: &str) -> bool {
        method.starts_with("/kura.agent.v1.") && method != AGENT_STATUS_METHOD
    }

    fn record(&self, method: &str, code: &str, seconds: f64) {
        self.histograms
            .get_or_create(&AgentLabels {
                method_name: method.to_owned(),
                grpc_status_code: code.to_owned(),
            })
            .observe(seconds);
    }
}

/// grpc-go's name of a status code (`codes.Code.String()`), which csi-lib-utils puts
/// in its `grpc_status_code` label, from the `grpc-status` value; a value gRPC does
/// not define is "Unknown", as gRPC reads it.
pub fn code_name(grpc_status: &[u8]) -> &'static str {
    match grpc_status {
        b"0" => "OK",
        b"1" => "Canceled",
        b"3" => "InvalidArgument",
        b"4" => "DeadlineExceeded",
        b"5" => "NotFound",
        b"6" => "AlreadyExists",
        b"7" => "PermissionDenied",
        b"8" => "ResourceExhausted",
        b"9" => "FailedPrecondition",
        b"10" => "Aborted",
        b"11" => "OutOfRange",
        b"12" => "Unimplemented",
        b"13" => "Internal",
        b"14" => "Unavailable",
        b"15" => "DataLoss",
        b"16" => "Unauthenticated",
        _ => "Unknown",
    }
}

/// How a call ended, as its `grpc-status` header or trailer says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ended {
    code: &'static str,
    message: String,
    /// The node that decided a relayed status.
    relayed_from: Option<String>,
}

impl Ended {
    fn bare(code: &'static str) -> Self {
        Ended {
            code,
            message: String::new(),
            relayed_from: None,
        }
    }
}

/// How a call ended, from a header map with a `grpc-status`, if it has one.
fn status_in(headers: &hyper::HeaderMap) -> Option<Ended> {
    let text = |name: &str| {
        headers
            .get(name)
            .map(|value| percent_decoded(value.as_bytes()))
    };
    headers.get("grpc-status").map(|value| Ended {
        code: code_name(value.as_bytes()),
        message: text("grpc-message").unwrap_or_default(),
        relayed_from: text(RELAYED_FROM),
    })
}

/// A `grpc-message` value as sent: percent-encoded UTF-8.
fn percent_decoded(value: &[u8]) -> String {
    let mut bytes = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        let hex = value
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (value[i], hex) {
            (b'%', Some(byte)) => {
                bytes.push(byte);
                i += 3;
            }
            (byte, _) => {
                bytes.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Logs a call that did not succeed, at its level (see the module's guarantees).
fn log(method: &str, ended: &Ended) {
    let (code, message) = (ended.code, ended.message.as_str());
    match (code, &ended.relayed_from) {
        ("OK", _) => {}
        (_, Some(node)) => tracing::debug!(method, code, node, message, "failed on the node"),
        ("Canceled", None) => tracing::debug!(method, code, message, "the client gave up"),
        ("Internal" | "DataLoss" | "Unknown" | "DeadlineExceeded", None) => {
            tracing::error!(method, code, message, "failed")
        }
        (_, None) => tracing::warn!(method, code, message, "refused"),
    }
}

/// One call being timed; records itself when dropped.
struct Observation<R: Record> {
    record: R,
    method: String,
    started: Instant,
    /// How the call ended once known; a call dropped before is `Canceled`.
    ended: Option<Ended>,
}

impl<R: Record> Observation<R> {
    fn finish(mut self, ended: Ended) {
        self.ended = Some(ended);
    }
}

impl<R: Record> Drop for Observation<R> {
    fn drop(&mut self) {
        let ended = self.ended.take().unwrap_or(Ended::bare("Canceled"));
        self.record.record(
            &self.method,
            ended.code,
            self.started.elapsed().as_secs_f64(),
        );
        log(&self.method, &ended);
    }
}

#[derive(Clone)]
pub struct Layer<R> {
    record: R,
}

impl<R> Layer<R> {
    pub fn new(record: R) -> Self {
        Layer { record }
    }

    /// Where it records.
    pub fn record(&self) -> &R {
        &self.record
    }
}

impl<S, R: Clone> tower::Layer<S> for Layer<R> {
    type Service = Timed<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        Timed {
            inner,
            record: self.record.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Timed<S, R> {
    inner: S,
    record: R,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, R, ReqBody, ResBody> tower::Service<hyper::Request<ReqBody>> for Timed<S, R>
where
    S: tower::Service<hyper::Request<ReqBody>, Response = hyper::Response<ResBody>>,
    S::Future: Send + 'static,
    R: Record,
{
    type Response = hyper::Response<TimedBody<ResBody, R>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: hyper::Request<ReqBody>) -> Self::Future {
        let method = request.uri().path();
        let observation = self.record.wants(method).then(|| Observation {
            record: self.record.clone(),
            method: method.to_owned(),
            started: Instant::now(),
            ended: None,
        });
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = match answer.await {
                Ok(response) => response,
                Err(e) => {
                    if let Some(observation) = observation {
                        observation.finish(Ended::bare("Unknown"));
                    }
                    return Err(e);
                }
            };
            let observation = match (observation, status_in(response.headers())) {
                // An error answer carries its status in the headers (trailers-only).
                (Some(observation), Some(ended)) => {
                    observation.finish(ended);
                    None
                }
                (observation, _) => observation,
            };
            Ok(response.map(|inner| TimedBody { inner, observation }))
        })
    }
}

/// A response body that records its call when the trailers (with the status) pass,
/// when it ends without them (`Unknown`), or when it is dropped before (`Canceled`).
pub struct TimedBody<B, R: Record> {
    inner: B,
    observation: Option<Observation<R>>,
}

impl<B, R> Body for TimedBody<B, R>
where
    B: Body + Unpin,
    R: Record,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .map(|trailers| status_in(trailers).unwrap_or(Ended::bare("Unknown"))),
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => Some(Ended::bare("Unknown")),
            Poll::Pending => None,
        };
        if let Some(ended) = ended
            && let Some(observation) = this.observation.take()
        {
            observation.finish(ended);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_grpc_gos() {
        // Every code, by number, as grpc-go's codes.Code.String() spells it.
        let go = [
            "OK",
            "Canceled",
            "Unknown",
            "InvalidArgument",
            "DeadlineExceeded",
            "NotFound",
            "AlreadyExists",
            "PermissionDenied",
            "ResourceExhausted",
            "FailedPrecondition",
            "Aborted",
            "OutOfRange",
            "Unimplemented",
            "Internal",
            "Unavailable",
            "DataLoss",
            "Unauthenticated",
        ];
        for (number, name) in go.iter().enumerate() {
            assert_eq!(code_name(number.to_string().as_bytes()), *name);
        }
        assert_eq!(code_name(b"17"), "Unknown");
        assert_eq!(code_name(b"x"), "Unknown");
    }

    #[test]
    fn status_comes_from_the_grpc_status_header() {
        let mut headers = hyper::HeaderMap::new();
        assert_eq!(status_in(&headers), None);
        headers.insert("grpc-status", "5".parse().unwrap());
        headers.insert(
            "grpc-message",
            "volume%20%22a%22 does not exist%".parse().unwrap(),
        );
        headers.insert(RELAYED_FROM, "node-a".parse().unwrap());
        assert_eq!(
            status_in(&headers),
            Some(Ended {
                code: "NotFound",
                message: "volume \"a\" does not exist%".into(),
                relayed_from: Some("node-a".into()),
            })
        );
    }

    /// What [`log`] writes for `ended`, at which level.
    fn logged(ended: Ended) -> String {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || log("/csi.v1.Controller/X", &ended));
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn a_failure_is_logged_at_its_level_and_a_relayed_one_only_for_debugging() {
        let ended = |code, relayed: Option<&str>| Ended {
            code,
            message: "m".into(),
            relayed_from: relayed.map(str::to_owned),
        };
        assert_eq!(logged(ended("OK", None)), "");
        for code in ["InvalidArgument", "NotFound", "Aborted", "Unavailable"] {
            assert!(logged(ended(code, None)).contains(" WARN "), "{code}");
        }
        for code in ["Internal", "DataLoss", "Unknown"] {
            assert!(logged(ended(code, None)).contains(" ERROR "), "{code}");
        }
        let relayed = logged(ended("Internal", Some("node-a")));
        assert!(
            relayed.contains(" DEBUG ") && relayed.contains("node-a"),
            "{relayed}"
        );
        assert!(logged(ended("Canceled", None)).contains(" DEBUG "));
    }
}
