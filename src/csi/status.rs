//! The one place where errors become gRPC status codes.
//!
//! Matches are exhaustive with no catch-all arm, so a new error variant forces a
//! decision here. The message is the error's whole `source()` chain: a kubelet event
//! is often all an operator sees.

use tonic::{Code, Status};

use crate::agent;
use crate::control;
use crate::pool;

/// The code a pool error means to a CO: the agent's table, since those codes also
/// travel on the agent wire unchanged.
pub use crate::agent::errors::pool_code as code;

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
        // Passed through unchanged: the agent built the message, and logged it.
        agent::Error::Remote {
            node,
            code,
            message,
        } => {
            let mut status = Status::new(code, message);
            if let Ok(node) = node.parse() {
                status
                    .metadata_mut()
                    .insert(agent::errors::RELAYED_FROM, node);
            }
            status
        }
        other => Status::new(agent_code(&other), chain(&other)),
    }
}

/// What a controller error means to a CO. Each refusal names the request field it is
/// about.
pub fn from_control(error: control::Error) -> Status {
    use control::Error as E;
    let message = chain(&error);
    match error {
        E::Agent(e) => from_agent(e),
        E::NameBusy(_) | E::Transferring { .. } => Status::aborted(message),
        E::NoRoom(_) => {
            Status::resource_exhausted(format!("accessibility_requirements: {message}"))
        }
        E::BeyondEveryPool { .. } => Status::out_of_range(format!("capacity_range: {message}")),
        E::SourceNotFound { .. } => Status::not_found(format!("volume_content_source: {message}")),
        E::VolumeNotFound { .. } => Status::not_found(format!("source_volume_ids: {message}")),
        E::Incompatible(_) => Status::already_exists(message),
        E::GroupMember { .. } => invalid("snapshot_id", message),
        E::NotMembers { .. } => invalid("snapshot_ids", message),
        E::NotOneMoment { .. } => precondition("source_volume_ids", message),
        // CSI spec, "GetMetadataDelta Errors": "Missing or otherwise invalid argument".
        E::NotOneVolume { .. } => invalid("target_snapshot_id", message),
    }
}

/// The controller's Probe when it cannot serve yet.
pub fn not_ready(reason: impl std::fmt::Display) -> Status {
    Status::failed_precondition(reason.to_string())
}

pub use crate::chain;

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

/// A value past what the object allows (OUT_OF_RANGE).
pub fn out_of_range(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::out_of_range(format!("{field}: {reason}"))
}

/// Names the request field an error of a stream's opening is about, where the
/// message does not start with one: the snapshot field whose ID it quotes.
pub fn naming_snapshot(status: Status, fields: &[(&str, &str)]) -> Status {
    let message = status.message();
    let named = fields
        .iter()
        .any(|(field, _)| message.starts_with(&format!("{field}: ")));
    match fields.iter().find(|(_, id)| message.contains(id)) {
        Some((field, _)) if !named && status.code() == Code::NotFound => Status::with_metadata(
            status.code(),
            format!("{field}: {message}"),
            status.metadata().clone(),
        ),
        _ => status,
    }
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
/// (SnapshotMetadata or GroupController on a node's socket; tonic: UNIMPLEMENTED
/// with no message) gets a message, as CSI asks of every error. Every other response passes unchanged. The
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
            "kura does not serve this RPC here: it offers the CSI Identity, Controller, GroupController and SnapshotMetadata (with the Controller) and Node services",
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

    /// One example of every pool error, with the code a CO must see for it. The
    /// witness match has no catch-all: a new variant does not compile until it is
    /// named there, beside this list, where its example and code go too.
    fn every_variant() -> Vec<(pool::Error, Code)> {
        let io = sys::Error::io("open", "/x", std::io::Error::from_raw_os_error(libc::EIO));
        let examples = vec![
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
            (pool::Error::Damaged("crc".into()), Code::DataLoss),
        ];
        let witness = |e: &pool::Error| match e {
            pool::Error::NotFound { .. }
            | pool::Error::Incompatible(_)
            | pool::Error::OutOfRange(_)
            | pool::Error::NoSpace { .. }
            | pool::Error::Precondition(_)
            | pool::Error::Invalid { .. }
            | pool::Error::Busy(_)
            | pool::Error::Sys(_)
            | pool::Error::Corrupt { .. }
            | pool::Error::Damaged(_) => std::mem::discriminant(e),
        };
        distinct(examples.iter().map(|(e, _)| witness(e)), 10);
        examples
    }

    /// Asserts that the examples are `count` distinct variants: one each.
    fn distinct<T: std::hash::Hash + Eq>(variants: impl Iterator<Item = T>, count: usize) {
        let seen: std::collections::HashSet<T> = variants.collect();
        assert_eq!(seen.len(), count, "one example of every variant");
    }

    #[test]
    fn every_pool_error_has_its_code() {
        for (error, want) in every_variant() {
            assert_eq!(from_pool(error).code(), want);
        }
    }

    /// The external-provisioner retries CreateVolume on these, believing the operation
    /// is still running (or its outcome unknown).
    const RETRIED: [Code; 4] = [
        Code::Aborted,
        Code::Unavailable,
        Code::Cancelled,
        Code::DeadlineExceeded,
    ];

    #[test]
    fn retried_codes_are_only_the_in_progress_ones() {
        // Of the pool's errors only Busy means that.
        for (error, _) in every_variant() {
            let busy = matches!(error, pool::Error::Busy(_));
            assert_eq!(RETRIED.contains(&from_pool(error).code()), busy);
        }
    }

    /// One example of every seam error, with the code a CO must see for it (see
    /// [`every_variant`] for the witness).
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
                    node: "n".into(),
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
        let witness = |e: &agent::Error| match e {
            agent::Error::Pool(_)
            | agent::Error::UnknownNode { .. }
            | agent::Error::Unreachable { .. }
            | agent::Error::Remote { .. }
            | agent::Error::Protocol(_) => std::mem::discriminant(e),
        };
        distinct(cases.iter().map(|(e, _)| witness(e)), 5);
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
        for (error, _) in every_agent_variant() {
            let retried = matches!(
                error,
                agent::Error::Pool(pool::Error::Busy(_)) | agent::Error::Unreachable { .. }
            );
            assert_eq!(RETRIED.contains(&from_agent(error).code()), retried,);
        }
    }

    /// One example of every controller error, with the code a CO must see for it and
    /// the request field its message names (see [`every_variant`] for the witness).
    fn every_control_variant() -> Vec<(control::Error, Code, &'static str)> {
        use control::Error as E;
        let refusal = control::placement::Refusal::NoNode;
        let cases = vec![
            (
                E::Agent(agent::Error::UnknownNode { token: "n".into() }),
                Code::NotFound,
                "",
            ),
            (E::NameBusy("volume name \"a\"".into()), Code::Aborted, ""),
            (
                E::NoRoom(refusal),
                Code::ResourceExhausted,
                "accessibility_requirements",
            ),
            (
                E::BeyondEveryPool {
                    needed: 2,
                    largest: 1,
                },
                Code::OutOfRange,
                "capacity_range",
            ),
            (
                E::SourceNotFound {
                    id: "s".into(),
                    node: "n".into(),
                },
                Code::NotFound,
                "volume_content_source",
            ),
            (
                E::VolumeNotFound {
                    id: "v".into(),
                    node: "n".into(),
                },
                Code::NotFound,
                "source_volume_ids",
            ),
            (
                E::Transferring {
                    name: "a".into(),
                    from: "s".into(),
                    node: "n".into(),
                    done: 1,
                    total: 2,
                },
                Code::Aborted,
                "",
            ),
            (E::Incompatible("x".into()), Code::AlreadyExists, ""),
            (
                E::GroupMember {
                    snapshot: "s".into(),
                    group: "g".into(),
                },
                Code::InvalidArgument,
                "snapshot_id",
            ),
            (
                E::NotMembers {
                    group: "g".into(),
                    members: 2,
                },
                Code::InvalidArgument,
                "snapshot_ids",
            ),
            (
                E::NotOneMoment {
                    volumes: vec!["a".into(), "b".into()],
                },
                Code::FailedPrecondition,
                "source_volume_ids",
            ),
            (
                E::NotOneVolume {
                    base: "b".into(),
                    target: "t".into(),
                },
                Code::InvalidArgument,
                "target_snapshot_id",
            ),
        ];
        let witness = |e: &control::Error| match e {
            E::Agent(_)
            | E::NameBusy(_)
            | E::NoRoom(_)
            | E::BeyondEveryPool { .. }
            | E::SourceNotFound { .. }
            | E::VolumeNotFound { .. }
            | E::Transferring { .. }
            | E::Incompatible(_)
            | E::GroupMember { .. }
            | E::NotMembers { .. }
            | E::NotOneMoment { .. }
            | E::NotOneVolume { .. } => std::mem::discriminant(e),
        };
        distinct(cases.iter().map(|(e, ..)| witness(e)), 12);
        cases
    }

    #[test]
    fn every_control_error_has_its_code_and_names_its_field() {
        for (error, want, field) in every_control_variant() {
            let retried = matches!(
                error,
                control::Error::NameBusy(_) | control::Error::Transferring { .. }
            );
            let status = from_control(error);
            assert_eq!(status.code(), want, "{status:?}");
            assert!(status.message().starts_with(field), "{status:?}");
            // Only a name in flight or a copy still running is "in progress".
            assert_eq!(RETRIED.contains(&status.code()), retried, "{status:?}");
        }
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
