//! Checking requests into typed arguments. Every error names the field and the reason.

use std::collections::HashMap;

use tonic::Status;

use super::proto::{self, volume_capability};
use super::status::{invalid, missing};
use crate::pool::attach::{AccessMode, AccessType, Capability};
use crate::pool::{Provisioning, SnapshotId, VolumeId, size};
use crate::sys::mkfs;

/// The StorageClass parameter that picks thin or thick provisioning.
pub const PROVISIONING_KEY: &str = "kura.csi.dev/provisioning";
/// Keys the Kubernetes sidecars add to parameters; accepted and ignored.
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";
/// CSI's limit on string fields, in bytes.
const MAX_STRING: usize = 128;
/// CSI's limit on mount_flags, in bytes.
const MAX_MOUNT_FLAGS: usize = 4096;

/// A required string field.
pub fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(missing(field));
    }
    Ok(value)
}

/// A request name (volume or snapshot).
pub fn name<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    required(value, field)?;
    if value.len() > MAX_STRING {
        return Err(invalid(
            field,
            format!("is {} bytes, more than {MAX_STRING}", value.len()),
        ));
    }
    Ok(value)
}

/// A volume ID field: required; `None` when it is not one of ours, which means the
/// volume cannot exist.
pub fn volume_id(value: &str, field: &str) -> Result<Option<VolumeId>, Status> {
    required(value, field).map(VolumeId::parse)
}

pub fn snapshot_id(value: &str, field: &str) -> Result<Option<SnapshotId>, Status> {
    required(value, field).map(SnapshotId::parse)
}

/// Why a capability cannot be used.
#[derive(Debug)]
pub enum CapabilityError {
    /// Malformed (missing parts).
    Invalid(Status),
    /// Well formed, but kura does not offer it.
    Unsupported(String),
}

impl CapabilityError {
    /// The error as INVALID_ARGUMENT, for requests where asking for an unsupported
    /// capability is bad input.
    pub fn into_invalid(self, field: &str) -> Status {
        match self {
            CapabilityError::Invalid(status) => status,
            CapabilityError::Unsupported(reason) => invalid(field, reason),
        }
    }

    /// The error for node requests, where an unsupported capability exceeds what the
    /// volume can do (FAILED_PRECONDITION).
    pub fn into_node_status(self, field: &str) -> Status {
        match self {
            CapabilityError::Invalid(status) => status,
            CapabilityError::Unsupported(reason) => {
                Status::failed_precondition(format!("{field}: {reason}"))
            }
        }
    }
}

pub fn capability(
    cap: Option<&proto::VolumeCapability>,
    field: &str,
) -> Result<Capability, CapabilityError> {
    let cap = cap.ok_or_else(|| CapabilityError::Invalid(missing(field)))?;
    let access = match &cap.access_type {
        None => {
            return Err(CapabilityError::Invalid(missing(&format!(
                "{field}.access_type"
            ))));
        }
        Some(volume_capability::AccessType::Block(_)) => AccessType::Block,
        Some(volume_capability::AccessType::Mount(mount)) => mount_access(mount, field)?,
    };
    use volume_capability::access_mode::Mode;
    let mode_field = format!("{field}.access_mode");
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| CapabilityError::Invalid(missing(&mode_field)))?;
    let mode = match Mode::try_from(mode.mode) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        Ok(
            multi @ (Mode::MultiNodeReaderOnly
            | Mode::MultiNodeSingleWriter
            | Mode::MultiNodeMultiWriter),
        ) => {
            return Err(CapabilityError::Unsupported(format!(
                "access mode {} is not supported: kura volumes are local to one node",
                multi.as_str_name()
            )));
        }
        Ok(Mode::Unknown) | Err(_) => {
            return Err(CapabilityError::Invalid(invalid(
                &mode_field,
                "is unknown or unset",
            )));
        }
    };
    Ok(Capability { access, mode })
}

fn mount_access(
    mount: &volume_capability::MountVolume,
    field: &str,
) -> Result<AccessType, CapabilityError> {
    let fs_type = match mount.fs_type.as_str() {
        "" => None,
        fs if mkfs::SUPPORTED.contains(&fs) => Some(fs.to_owned()),
        other => {
            return Err(CapabilityError::Unsupported(format!(
                "fs_type {other:?} is not supported (use one of {})",
                mkfs::SUPPORTED.join(", ")
            )));
        }
    };
    let flags_len: usize = mount.mount_flags.iter().map(String::len).sum();
    if flags_len > MAX_MOUNT_FLAGS {
        return Err(CapabilityError::Invalid(invalid(
            &format!("{field}.mount.mount_flags"),
            format!("are {flags_len} bytes, more than {MAX_MOUNT_FLAGS}"),
        )));
    }
    if let Some(flag) = mount
        .mount_flags
        .iter()
        .find(|f| f.is_empty() || f.contains(char::is_whitespace))
    {
        return Err(CapabilityError::Invalid(invalid(
            &format!("{field}.mount.mount_flags"),
            format!("{flag:?} is not a mount option"),
        )));
    }
    if !mount.volume_mount_group.is_empty() {
        return Err(CapabilityError::Unsupported(
            "volume_mount_group is not supported".to_owned(),
        ));
    }
    Ok(AccessType::Mount {
        fs_type,
        flags: mount.mount_flags.clone(),
    })
}

/// Every capability in a list, which must not be empty.
pub fn capabilities(
    caps: &[proto::VolumeCapability],
    field: &str,
) -> Result<Vec<Capability>, CapabilityError> {
    if caps.is_empty() {
        return Err(CapabilityError::Invalid(missing(field)));
    }
    caps.iter()
        .enumerate()
        .map(|(i, c)| capability(Some(c), &format!("{field}[{i}]")))
        .collect()
}

pub fn range(range: Option<&proto::CapacityRange>) -> Result<size::Range, Status> {
    let Some(range) = range else {
        return Ok(size::Range::default());
    };
    if range.required_bytes < 0 {
        return Err(invalid("capacity_range.required_bytes", "is negative"));
    }
    if range.limit_bytes < 0 {
        return Err(invalid("capacity_range.limit_bytes", "is negative"));
    }
    Ok(size::Range {
        required: range.required_bytes as u64,
        limit: range.limit_bytes as u64,
    })
}

/// Volume parameters: the provisioning choice and the sidecars' keys; anything else
/// is an error naming the key.
pub fn volume_parameters(parameters: &HashMap<String, String>) -> Result<Provisioning, Status> {
    let mut provisioning = Provisioning::Thin;
    for (key, value) in parameters {
        match key.as_str() {
            PROVISIONING_KEY => {
                provisioning = match value.as_str() {
                    "thin" => Provisioning::Thin,
                    "thick" => Provisioning::Thick,
                    other => {
                        return Err(invalid(
                            &format!("parameters[{key}]"),
                            format!("{other:?} is neither \"thin\" nor \"thick\""),
                        ));
                    }
                }
            }
            k if k.starts_with(SIDECAR_PREFIX) => {}
            _ => return Err(invalid("parameters", format!("unknown key {key:?}"))),
        }
    }
    Ok(provisioning)
}

/// Snapshot parameters: only the sidecars' keys.
pub fn snapshot_parameters(parameters: &HashMap<String, String>) -> Result<(), Status> {
    match parameters.keys().find(|k| !k.starts_with(SIDECAR_PREFIX)) {
        Some(key) => Err(invalid("parameters", format!("unknown key {key:?}"))),
        None => Ok(()),
    }
}

/// A paging token: the ID listing resumes at. A token kura did not hand out gives
/// ABORTED, as the spec asks.
pub fn starting_token<T>(
    token: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    parse(token).map(Some).ok_or_else(|| {
        Status::aborted(format!(
            "starting_token: {token:?} is not a token this driver issued"
        ))
    })
}

pub fn max_entries(value: i32) -> Result<usize, Status> {
    if value < 0 {
        return Err(invalid("max_entries", "is negative"));
    }
    Ok(if value == 0 {
        usize::MAX
    } else {
        value as usize
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;
    use volume_capability::access_mode::Mode;

    fn cap(
        access: Option<volume_capability::AccessType>,
        mode: Option<Mode>,
    ) -> proto::VolumeCapability {
        proto::VolumeCapability {
            access_type: access,
            access_mode: mode.map(|m| volume_capability::AccessMode { mode: m as i32 }),
        }
    }

    fn mount(fs: &str, flags: &[&str]) -> Option<volume_capability::AccessType> {
        Some(volume_capability::AccessType::Mount(
            volume_capability::MountVolume {
                fs_type: fs.into(),
                mount_flags: flags.iter().map(|f| f.to_string()).collect(),
                volume_mount_group: String::new(),
            },
        ))
    }

    fn block() -> Option<volume_capability::AccessType> {
        Some(volume_capability::AccessType::Block(
            volume_capability::BlockVolume {},
        ))
    }

    #[test]
    fn accepts_single_node_capabilities() {
        let c = capability(
            Some(&cap(
                mount("xfs", &["noatime"]),
                Some(Mode::SingleNodeWriter),
            )),
            "c",
        )
        .unwrap();
        assert_eq!(c.mode, AccessMode::SingleNodeWriter);
        assert_eq!(
            c.access,
            AccessType::Mount {
                fs_type: Some("xfs".into()),
                flags: vec!["noatime".into()]
            }
        );
        let c = capability(Some(&cap(block(), Some(Mode::SingleNodeMultiWriter))), "c").unwrap();
        assert_eq!(c.access, AccessType::Block);
        let c = capability(
            Some(&cap(mount("", &[]), Some(Mode::SingleNodeReaderOnly))),
            "c",
        )
        .unwrap();
        assert_eq!(
            c.access,
            AccessType::Mount {
                fs_type: None,
                flags: vec![]
            }
        );
    }

    #[test]
    fn names_the_field_of_malformed_capabilities() {
        let cases = [
            (None, "c: is required"),
            (
                Some(cap(None, Some(Mode::SingleNodeWriter))),
                "c.access_type: is required",
            ),
            (Some(cap(block(), None)), "c.access_mode: is required"),
            (
                Some(cap(block(), Some(Mode::Unknown))),
                "c.access_mode: is unknown or unset",
            ),
            (
                Some(cap(
                    mount("ext4", &["bad flag"]),
                    Some(Mode::SingleNodeWriter),
                )),
                "c.mount.mount_flags",
            ),
        ];
        for (input, want) in cases {
            match capability(input.as_ref(), "c") {
                Err(CapabilityError::Invalid(status)) => {
                    assert_eq!(status.code(), Code::InvalidArgument);
                    assert!(
                        status.message().starts_with(want),
                        "{} vs {want}",
                        status.message()
                    );
                }
                other => panic!("{want}: got {other:?}"),
            }
        }
    }

    #[test]
    fn refuses_multi_node_and_unknown_filesystems() {
        for c in [
            cap(block(), Some(Mode::MultiNodeMultiWriter)),
            cap(block(), Some(Mode::MultiNodeReaderOnly)),
            cap(mount("ntfs", &[]), Some(Mode::SingleNodeWriter)),
        ] {
            assert!(
                matches!(
                    capability(Some(&c), "c"),
                    Err(CapabilityError::Unsupported(_))
                ),
                "{c:?}"
            );
        }
        assert_eq!(
            capabilities(&[], "caps")
                .unwrap_err()
                .into_invalid("caps")
                .code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn parameters() {
        let p = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        assert_eq!(volume_parameters(&p(&[])).unwrap(), Provisioning::Thin);
        assert_eq!(
            volume_parameters(&p(&[(PROVISIONING_KEY, "thick")])).unwrap(),
            Provisioning::Thick
        );
        assert!(volume_parameters(&p(&[("csi.storage.k8s.io/pvc/name", "x")])).is_ok());
        let err = volume_parameters(&p(&[("color", "blue")])).unwrap_err();
        assert!(err.message().contains("color"), "{}", err.message());
        let err = volume_parameters(&p(&[(PROVISIONING_KEY, "fat")])).unwrap_err();
        assert!(err.message().contains("fat"), "{}", err.message());
        assert!(snapshot_parameters(&p(&[("x", "y")])).is_err());
    }

    #[test]
    fn ranges_tokens_and_names() {
        let r = |required, limit| proto::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        };
        assert_eq!(range(None).unwrap(), size::Range::default());
        assert!(range(Some(&r(-1, 0))).is_err());
        assert!(range(Some(&r(0, -1))).is_err());
        assert_eq!(starting_token("", VolumeId::parse).unwrap(), None);
        assert_eq!(
            starting_token("garbage", VolumeId::parse)
                .unwrap_err()
                .code(),
            Code::Aborted
        );
        assert_eq!(max_entries(0).unwrap(), usize::MAX);
        assert!(max_entries(-1).is_err());
        assert!(name(&"n".repeat(128), "name").is_ok());
        assert!(name(&"n".repeat(129), "name").is_err());
        assert_eq!(
            volume_id("", "volume_id").unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(volume_id("no-such", "volume_id").unwrap(), None);
    }
}
