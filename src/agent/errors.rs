//! How errors cross the agent API: the node encodes a pool error as a gRPC status
//! whose code is the one a CO must see for it (the controller passes it on unchanged),
//! and the controller decodes a status back into an [`Error`]: the agent's own
//! answer ([`Error::Remote`]), or an unreachable node ([`Error::Unreachable`]).
//!
//! The table of pool errors' codes is here, not in `csi::status`, because those codes
//! travel on the agent wire: a controller of another version reads them as they are.

use tonic::{Code, Status};

use super::Error;
use crate::pool;

/// The code a pool error means to a CO. Exhaustive: a new variant needs a code.
pub fn pool_code(error: &pool::Error) -> Code {
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

/// A pool error as the agent answers it: its code and its whole source chain.
pub fn status(error: &pool::Error) -> Status {
    Status::new(pool_code(error), crate::chain(error))
}

/// What the agent's gRPC status means on the controller's side of the seam. A status
/// made by the client's transport (no connection, a TLS alert, the connection closed
/// or lost) means the node is unreachable; so do UNAVAILABLE and CANCELLED, which the
/// agent itself never answers (see [`pool_code`]). Any other status is the agent's own
/// answer, kept as it is.
pub fn decode(node: &str, status: Status) -> Error {
    let transport = std::error::Error::source(&status)
        .is_some_and(|source| source.is::<tonic::transport::Error>());
    if transport || matches!(status.code(), Code::Unavailable | Code::Cancelled) {
        Error::Unreachable {
            node: node.to_owned(),
            reason: crate::chain(&status),
        }
    } else {
        Error::Remote {
            node: node.to_owned(),
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// The metadata key of a status a controller relays from a node unchanged: the node
/// that decided it, and logged it (see `metrics::grpc`, which logs every failed call
/// once).
pub const RELAYED_FROM: &str = "kura-relayed-from";

/// An agent call whose request kura's controller could not have sent.
pub fn malformed(error: super::wire::Malformed) -> Status {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_errors_keep_code_and_message_and_transport_failures_are_unreachable() {
        let remote = decode("n1", Status::already_exists("volume \"x\" exists"));
        assert!(
            matches!(&remote, Error::Remote { code: Code::AlreadyExists, message, node } if message == "volume \"x\" exists" && node == "n1"),
            "{remote:?}"
        );
        for code in [Code::Unavailable, Code::Cancelled] {
            let lost = decode("n1", Status::new(code, "connection reset"));
            assert!(
                matches!(&lost, Error::Unreachable { node, .. } if node == "n1"),
                "{lost:?}"
            );
        }
    }
}
