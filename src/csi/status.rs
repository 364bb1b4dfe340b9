//! The one place where errors become gRPC status codes.
//!
//! Matches are exhaustive with no catch-all arm, so a new error variant forces a
//! decision here. The message is the error's whole `source()` chain: a kubelet event
//! is often all an operator sees.

use tonic::{Code, Status};

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
    }
}

pub fn from_pool(error: pool::Error) -> Status {
    Status::new(code(&error), chain(&error))
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
