//! The one place where errors become gRPC status codes.
//!
//! Matches are exhaustive with no catch-all arm, so a new error variant forces a
//! decision here. The message is the error's whole `source()` chain: a kubelet event
//! is often all an operator sees.

use tonic::{Code, Status};

use crate::agent;
use crate::pool;

/// The code a pool error means to a CO.
pub fn code(error: &pool::Error) -> Code {
    match error {
        pool::Error::NotFound { .. } => Code::NotFound,
        pool::Error::Incompatible(_) => Code::AlreadyExists,
        pool::Error::OutOfRange(_) => Code::OutOfRange,
        pool::Error::NoSpace { .. } => Code::ResourceExhausted,
        pool::Error::Precondition(_) => Code::FailedPrecondition,
        pool::Error::Invalid { .. } => Code::InvalidArgument,
        pool::Error::Busy(_) => Code::Aborted,
        pool::Error::Sys(_) => Code::Internal,
        pool::Error::Corrupt { .. } => Code::DataLoss,
        pool::Error::Damaged(_) => Code::DataLoss,
    }
}

pub fn from_pool(error: pool::Error) -> Status {
    Status::new(code(&error), chain(&error))
}

/// The code an error of the controller-to-pool seam means to a CO. A remote error
/// keeps the agent's code; an unreachable node is UNAVAILABLE (the outcome is unknown,
/// so the CO must retry), never a success.
pub fn agent_code(error: &agent::Error) -> Code {
    match error {
        agent::Error::Pool(e) => code(e),
        agent::Error::UnknownNode { .. } => Code::NotFound,
        agent::Error::Unreachable { .. } => Code::Unavailable,
        agent::Error::Remote { code, .. } => *code,
        agent::Error::Protocol(_) => Code::Internal,
    }
}

pub fn from_agent(error: agent::Error) -> Status {
    match error {
        // Passed through unchanged: the agent built the message.
        agent::Error::Remote { code, message } => Status::new(code, message),
        other => Status::new(agent_code(&other), chain(&other)),
    }
}

/// An agent call whose request kura's controller could not have sent.
pub fn from_malformed(error: agent::wire::Malformed) -> Status {
    Status::invalid_argument(error.to_string())
}

/// An agent's answer to a caller that is not the controller.
pub fn not_controller(name: &str) -> Status {
    Status::permission_denied(format!(
        "control calls are accepted only from the controller identity (a client \
         certificate naming {name})"
    ))
}

/// A transfer read from a caller that is not a node.
pub fn not_node(name: &str) -> Status {
    Status::permission_denied(format!(
        "exports are read only by a node identity (a client certificate naming {name}) \
         with the export's grant"
    ))
}

/// A cross-node copy still running: the provisioner retries CreateVolume (ABORTED is
/// "an operation is pending for this volume"), and the retry reports or finishes it.
pub fn copying(name: &str, source: &str, node: &str, done: u64, total: u64) -> Status {
    Status::aborted(format!(
        "volume {name:?} is being copied from {source} to node {node}: {done} of {total} \
         bytes of data so far; retry to follow it"
    ))
}

/// What the agent's gRPC status means on the controller's side of the seam. A status
/// made by the client's transport (no connection, a TLS alert, the connection closed
/// or lost) means the node is unreachable; so do UNAVAILABLE and CANCELLED, which the
/// agent itself never answers (see [`agent_code`] over pool errors). Any other status
/// is the agent's own answer, kept as it is.
pub fn agent_error(node: &str, status: Status) -> agent::Error {
    let transport = std::error::Error::source(&status)
        .is_some_and(|source| source.is::<tonic::transport::Error>());
    if transport || matches!(status.code(), Code::Unavailable | Code::Cancelled) {
        agent::Error::Unreachable {
            node: node.to_owned(),
            reason: chain(&status),
        }
    } else {
        agent::Error::Remote {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// No node can take the volume within what the request allows (the scheduler picks
/// again when the CO uses WaitForFirstConsumer).
pub fn no_node(reason: impl std::fmt::Display) -> Status {
    Status::resource_exhausted(format!("accessibility_requirements: {reason}"))
}

/// A size above the largest volume any live node's pool could ever hold, full or
/// empty: no node and no wait can serve it.
pub fn beyond_every_pool(needed: u64, largest: u64) -> Status {
    Status::out_of_range(format!(
        "capacity_range: {needed} bytes is more than the {largest} bytes the largest pool \
         of any live kura node could ever hold"
    ))
}

/// A content source whose ID names a node that cannot exist.
pub fn source_not_found(id: &str, node: &str) -> Status {
    Status::not_found(format!(
        "volume_content_source: {id} does not exist (no kura node {node})"
    ))
}

/// A name that exists with arguments the request does not allow.
pub fn incompatible(reason: impl std::fmt::Display) -> Status {
    Status::already_exists(reason.to_string())
}

/// The controller's Probe when it cannot serve yet.
pub fn not_ready(reason: impl std::fmt::Display) -> Status {
    Status::failed_precondition(reason.to_string())
}

/// An error and its sources, joined: "a: b: c".
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// A value from a request, for a message: quoted and escaped (control characters never
/// reach a log or a terminal as they are), and cut short when long.
pub fn shown(value: &str) -> String {
    const SHOWN: usize = 128;
    if value.len() <= SHOWN {
        return format!("{value:?}");
    }
    let mut end = SHOWN;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &value[..end], value.len())
}

/// A request field that is missing or malformed.
pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

pub fn missing(field: &str) -> Status {
    invalid(field, "is required")
}

/// Another operation on the same object is still running.
pub fn busy(key: &str) -> Status {
    Status::aborted(format!("an operation on {key} is already in progress"))
}

/// An object a request names that does not exist (or cannot: a malformed ID). `what`
/// says which field or kind it is and quotes the CO's value.
pub fn not_found(what: impl std::fmt::Display) -> Status {
    Status::not_found(format!("{what} does not exist"))
}

/// A volume ID that names no volume.
pub fn no_volume(field: &str, id: &str) -> Status {
    not_found(format_args!("{field}: volume {}", shown(id)))
}

/// A path that is not where the volume is staged or published.
pub fn not_at_path(field: &str, path: &str, volume: &str) -> Status {
    Status::not_found(format!(
        "{field}: volume {} is not staged or published at {}",
        shown(volume),
        shown(path)
    ))
}

/// The request cannot be served in the state things are in (FAILED_PRECONDITION).
pub fn precondition(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::failed_precondition(format!("{field}: {reason}"))
}

/// A `starting_token` kura did not hand out (the spec asks for ABORTED).
pub fn bad_token(token: &str) -> Status {
    Status::aborted(format!(
        "starting_token: {} is not a token this driver issued",
        shown(token)
    ))
}

/// An RPC kura does not offer.
pub fn unimplemented(rpc: &str, reason: &str) -> Status {
    Status::unimplemented(format!("{rpc}: {reason}"))
}

/// The text tonic's decoder gives a request over the message limit (with the code
/// OUT_OF_RANGE, where gRPC says RESOURCE_EXHAUSTED).
pub const TONIC_TOO_LARGE: &str = "Error, decoded message length too large: ";

/// Rewrites the statuses tonic makes before any handler runs, where they fall short of
/// the contract: a request over the message limit (tonic: OUT_OF_RANGE) becomes
/// RESOURCE_EXHAUSTED, as gRPC specifies; an RPC of a service kura does not serve
/// (SnapshotMetadata, or GroupController on a node's socket; tonic: UNIMPLEMENTED
/// with no message) gets a
/// message, as CSI asks of every error. Every other response passes unchanged. The
/// server applies this to every call (a tower `map_response` layer).
pub fn rewrite_transport_status<B>(
    mut response: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    if let Some(status) = Status::from_header_map(response.headers())
        && let Some(fixed) = oversized_request(&status).or_else(|| unserved(&status))
    {
        // A message of our own making always encodes; should it not, the original
        // status stands.
        let _ = fixed.add_header(response.headers_mut());
    }
    response
}

/// The status for an RPC kura does not serve, from tonic's message-less one.
pub fn unserved(status: &Status) -> Option<Status> {
    (status.code() == Code::Unimplemented && status.message().is_empty()).then(|| {
        Status::unimplemented(
            "kura does not serve this RPC here: it offers the CSI Identity, Controller, GroupController (with the Controller) and Node services",
        )
    })
}

/// The status for a request over the message limit, from tonic's: RESOURCE_EXHAUSTED,
/// as gRPC specifies. `None` for every other status, which passes unchanged.
pub fn oversized_request(status: &Status) -> Option<Status> {
    let detail = status.message().strip_prefix(TONIC_TOO_LARGE)?;
    (status.code() == Code::OutOfRange)
        .then(|| Status::resource_exhausted(format!("request message too large: {detail}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys;

    /// Every pool error, with the code a CO must see for it.
    fn every_variant() -> Vec<(pool::Error, Code)> {
        let io = sys::Error::io("open", "/x", std::io::Error::from_raw_os_error(libc::EIO));
        vec![
            (
                pool::Error::NotFound {
                    kind: "volume",
                    id: "v".into(),
                },
                Code::NotFound,
            ),
            (pool::Error::Incompatible("x".into()), Code::AlreadyExists),
            (pool::Error::OutOfRange("x".into()), Code::OutOfRange),
            (
                pool::Error::NoSpace {
                    needed: 2,
                    available: 1,
                },
                Code::ResourceExhausted,
            ),
            (
                pool::Error::Precondition("x".into()),
                Code::FailedPrecondition,
            ),
            (
                pool::Error::Invalid {
                    field: "f",
                    reason: "r".into(),
                },
                Code::InvalidArgument,
            ),
            (pool::Error::Busy("x".into()), Code::Aborted),
            (pool::Error::Sys(io), Code::Internal),
            (
                pool::Error::Corrupt {
                    path: "/m".into(),
                    reason: "r".into(),
                },
                Code::DataLoss,
            ),
        ]
    }

    #[test]
    fn every_pool_error_has_its_code() {
        for (error, want) in every_variant() {
            assert_eq!(from_pool(error).code(), want);
        }
    }

    #[test]
    fn retried_codes_are_only_the_in_progress_ones() {
        // The external-provisioner retries CreateVolume on these, believing the
        // operation is still running; only Busy means that.
        let retried = [
            Code::Aborted,
            Code::Unavailable,
            Code::Cancelled,
            Code::DeadlineExceeded,
        ];
        for (error, _) in every_variant() {
            let busy = matches!(error, pool::Error::Busy(_));
            assert_eq!(retried.contains(&code(&error)), busy, "{error:?}");
        }
    }

    /// Every seam error, with the code a CO must see for it.
    fn every_agent_variant() -> Vec<(agent::Error, Code)> {
        let mut cases: Vec<(agent::Error, Code)> = every_variant()
            .into_iter()
            .map(|(e, c)| (agent::Error::Pool(e), c))
            .collect();
        cases.extend([
            (
                agent::Error::UnknownNode { token: "n".into() },
                Code::NotFound,
            ),
            (
                agent::Error::Unreachable {
                    node: "n".into(),
                    reason: "down".into(),
                },
                Code::Unavailable,
            ),
            (
                agent::Error::Remote {
                    code: Code::FailedPrecondition,
                    message: "volume is attached".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                agent::Error::Protocol(agent::wire::Malformed {
                    field: "volume.id",
                    reason: "bad".into(),
                }),
                Code::Internal,
            ),
        ]);
        cases
    }

    #[test]
    fn every_agent_error_has_its_code() {
        for (error, want) in every_agent_variant() {
            assert_eq!(from_agent(error).code(), want);
        }
    }

    #[test]
    fn retried_agent_codes_mean_in_progress_or_unknown_outcome() {
        // UNAVAILABLE from an unreachable node: the outcome is unknown, so the CO must
        // retry; a remote ABORTED is the agent's own Busy.
        for (error, want) in every_agent_variant() {
            let retried = matches!(
                error,
                agent::Error::Pool(pool::Error::Busy(_)) | agent::Error::Unreachable { .. }
            );
            assert_eq!(
                retried,
                matches!(want, Code::Aborted | Code::Unavailable),
                "{error:?}"
            );
        }
    }

    #[test]
    fn remote_errors_keep_code_and_message_and_transport_failures_are_unreachable() {
        let remote = agent_error("n1", Status::already_exists("volume \"x\" exists"));
        let status = from_agent(remote);
        assert_eq!(status.code(), Code::AlreadyExists);
        assert_eq!(status.message(), "volume \"x\" exists");
        let lost = agent_error("n1", Status::unavailable("connection reset"));
        assert!(matches!(lost, agent::Error::Unreachable { .. }));
        let status = from_agent(lost);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("n1"), "{}", status.message());
    }

    #[test]
    fn only_the_decoders_size_error_becomes_resource_exhausted() {
        let tonic = Status::out_of_range(format!(
            "{TONIC_TOO_LARGE}found 5000000 bytes, the limit is: 4194304 bytes"
        ));
        let fixed = oversized_request(&tonic).expect("rewritten");
        assert_eq!(fixed.code(), Code::ResourceExhausted);
        assert!(fixed.message().contains("5000000"), "{}", fixed.message());
        assert!(unserved(&Status::unimplemented("")).is_some());
        assert!(unserved(&Status::unimplemented("ControllerPublishVolume: no")).is_none());
        for other in [
            Status::out_of_range("capacity_range: required_bytes 5 exceeds limit_bytes 4"),
            Status::internal(format!("{TONIC_TOO_LARGE}found 1 bytes")),
            Status::ok(""),
        ] {
            assert!(oversized_request(&other).is_none(), "{other:?}");
        }
    }

    #[test]
    fn values_are_shown_escaped_and_short() {
        assert_eq!(shown("a\nb"), "\"a\\nb\"");
        assert_eq!(shown("\u{1b}[31m"), "\"\\u{1b}[31m\"");
        let long = shown(&"é".repeat(1000));
        assert!(long.len() < 200 && long.ends_with("(2000 bytes)"), "{long}");
    }

    #[test]
    fn message_carries_the_source_chain() {
        let io = sys::Error::io(
            "open",
            "/pool/x.img",
            std::io::Error::from_raw_os_error(libc::EIO),
        );
        let status = from_pool(pool::Error::Sys(io));
        assert!(
            status.message().contains("/pool/x.img"),
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("Input/output error"),
            "{}",
            status.message()
        );
    }
}
