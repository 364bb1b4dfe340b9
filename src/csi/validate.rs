//! Checking requests into typed arguments. Every error names the field and the reason.
//! Pure functions: nothing here touches the OS, so a malformed value never reaches it.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use tonic::Status;

use super::proto::{self, volume_capability};
use super::status::{bad_token, invalid, missing, precondition, shown};
use crate::control::replication::ReplicationChange;
use crate::pool::attach::{AccessMode, AccessType, Capability, SYSTEM_TREES};
use crate::pool::replica::{MAX_COPIES, MIN_INTERVAL_SECS};
use crate::pool::{Encryption, Provisioning, SnapshotId, VolumeId, size};
use crate::sys::{FsType, mount};

/// The StorageClass parameter that picks thin or thick provisioning.
pub const PROVISIONING_KEY: &str = "kura.csi.dev/provisioning";
/// The StorageClass parameter that makes volumes encrypted (`fscrypt`).
pub const ENCRYPTION_KEY: &str = "kura.csi.dev/encryption";
/// Keys the Kubernetes sidecars add to parameters; accepted and ignored.
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";
/// CSI's limit on string fields, in bytes.
const MAX_STRING: usize = 128;
/// CSI's limit on mount_flags, in bytes. They are counted as mount(8) hands them to
/// the kernel: joined by commas and ended by a NUL, so each flag costs its length plus
/// one (the kernel copies at most one 4 KiB page of options).
const MAX_MOUNT_FLAGS: usize = 4096;
/// CSI's limit on a map field (keys and values together), in bytes.
const MAX_MAP: usize = 4096;
/// The longest path the kernel takes (PATH_MAX counts the terminating NUL).
pub const MAX_PATH: usize = 4095;
/// The longest path component (NAME_MAX).
pub const MAX_NAME: usize = 255;

/// A required string field.
pub fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(missing(field));
    }
    Ok(value)
}

/// A request name (volume or snapshot): at most 128 bytes, none of the control
/// characters CSI bans in names.
pub fn name<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    required(value, field)?;
    if value.len() > MAX_STRING {
        return Err(invalid(
            field,
            format!("is {} bytes, more than {MAX_STRING}", value.len()),
        ));
    }
    if let Some(c) = value.chars().find(|c| banned_in_names(*c)) {
        return Err(invalid(
            field,
            format!(
                "contains the control character U+{:04X}, which CSI does not allow in names",
                c as u32
            ),
        ));
    }
    Ok(value)
}

/// The characters CSI bans in names: the control characters other than tab, line feed
/// and carriage return (U+0000–U+0008, U+000B, U+000C, U+000E–U+001F, U+007F–U+009F).
fn banned_in_names(c: char) -> bool {
    c.is_control() && !matches!(c, '\t' | '\n' | '\r')
}

/// A map field within CSI's 4 KiB (keys and values counted together). The message
/// names the size only: maps such as secrets must not be echoed.
pub fn map_size(map: &HashMap<String, String>, field: &str) -> Result<(), Status> {
    let bytes: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_MAP {
        return Err(invalid(
            field,
            format!("holds {bytes} bytes of keys and values, more than {MAX_MAP}"),
        ));
    }
    Ok(())
}

/// What `mutable_parameters` ask to change; each part unset is left as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mutable {
    pub provisioning: Option<Provisioning>,
    pub replication: ReplicationChange,
}

/// `mutable_parameters` (CreateVolume, ControllerModifyVolume, a VolumeAttributesClass):
/// `kura.csi.dev/provisioning` (`thin` or `thick`), `kura.csi.dev/replicas` and
/// `kura.csi.dev/replication-interval` may change after creation. Checked as strictly
/// as StorageClass parameters: any other key, or an unknown value, is an error naming
/// it, and nothing is applied.
pub fn mutable_parameters(parameters: &HashMap<String, String>) -> Result<Mutable, Status> {
    let mut keys: Vec<&String> = parameters.keys().collect();
    keys.sort();
    let mut provisioning = None;
    for key in keys {
        let value = &parameters[key];
        match key.as_str() {
            PROVISIONING_KEY => {
                provisioning = Some(provisioning_value(value, "mutable_parameters")?)
            }
            REPLICAS_KEY | INTERVAL_KEY => {}
            _ => {
                return Err(invalid(
                    "mutable_parameters",
                    format!(
                        "unknown key {}: the mutable parameters are {PROVISIONING_KEY}, \
                         {REPLICAS_KEY} and {INTERVAL_KEY}",
                        shown(key)
                    ),
                ));
            }
        }
    }
    Ok(Mutable {
        provisioning,
        replication: replication_parameters(parameters, "mutable_parameters")?,
    })
}

/// Copies on other nodes, 0 (none) to 2.
pub const REPLICAS_KEY: &str = "kura.csi.dev/replicas";
/// Time between replicated points: seconds, or a number with `s`, `m` or `h`; at
/// least 5 seconds.
pub const INTERVAL_KEY: &str = "kura.csi.dev/replication-interval";

/// The replication keys of `parameters` (in the map `field`).
pub fn replication_parameters(
    parameters: &HashMap<String, String>,
    field: &str,
) -> Result<ReplicationChange, Status> {
    let copies = match parameters.get(REPLICAS_KEY) {
        None => None,
        Some(value) => Some(
            value
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|c| *c <= MAX_COPIES)
                .ok_or_else(|| {
                    invalid(
                        &format!("{field}[{REPLICAS_KEY}]"),
                        format!(
                            "{} is not a number of copies from 0 to {MAX_COPIES}",
                            shown(value)
                        ),
                    )
                })?,
        ),
    };
    let interval_secs = match parameters.get(INTERVAL_KEY) {
        None => None,
        Some(value) => Some(interval_value(value).map_err(|reason| {
            invalid(
                &format!("{field}[{INTERVAL_KEY}]"),
                format!("{}: {reason}", shown(value)),
            )
        })?),
    };
    Ok(ReplicationChange {
        copies,
        interval_secs,
    })
}

/// Seconds of an interval: `30`, `30s`, `5m`, `1h`; at least [`MIN_INTERVAL_SECS`].
fn interval_value(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err("not a duration (a number of seconds, or with s, m or h)".into()),
    };
    let seconds = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| "not a duration (a number of seconds, or with s, m or h)".to_owned())?;
    if seconds < MIN_INTERVAL_SECS {
        return Err(format!(
            "shorter than the least interval, {MIN_INTERVAL_SECS}s"
        ));
    }
    Ok(seconds)
}

fn provisioning_value(value: &str, field: &str) -> Result<Provisioning, Status> {
    match value {
        "thin" => Ok(Provisioning::Thin),
        "thick" => Ok(Provisioning::Thick),
        other => Err(invalid(
            &format!("{field}[{PROVISIONING_KEY}]"),
            format!("{} is neither \"thin\" nor \"thick\"", shown(other)),
        )),
    }
}

/// The volume_context key the kubelet sets to "true" on an inline (CSI ephemeral)
/// volume's NodePublishVolume.
pub const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";

/// Whether a NodePublishVolume is for an inline volume.
pub fn is_ephemeral(context: &HashMap<String, String>) -> bool {
    context.get(EPHEMERAL_KEY).is_some_and(|v| v == "true")
}

/// An inline volume's attributes (the pod's `volumeAttributes`, in `volume_context`):
/// `size` (bytes or a Kubernetes quantity such as `1Gi`), `fsType` (ext4, xfs,
/// btrfs; it must agree with the capability's `fs_type` when both are given) and
/// `kura.csi.dev/provisioning`. The kubelet's own `csi.storage.k8s.io/*` keys are
/// accepted and ignored; any other key is an error naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inline {
    /// 0: the pool's default volume size.
    pub size: u64,
    pub provisioning: Provisioning,
    pub fs_type: Option<FsType>,
}

pub fn inline_attributes(
    context: &HashMap<String, String>,
    capability: &Capability,
) -> Result<Inline, Status> {
    let mut keys: Vec<&String> = context.keys().collect();
    keys.sort();
    let mut inline = Inline {
        size: 0,
        provisioning: Provisioning::Thin,
        fs_type: None,
    };
    for key in keys {
        let value = context[key].as_str();
        let field = format!("volume_context[{key}]");
        match key.as_str() {
            "size" => inline.size = size::parse(value).map_err(|e| invalid(&field, e))?,
            "fsType" => {
                let fs = value.parse::<FsType>().map_err(|_| {
                    invalid(
                        &field,
                        format!(
                            "{} is not a filesystem kura formats (one of {})",
                            shown(value),
                            FsType::names()
                        ),
                    )
                })?;
                inline.fs_type = Some(fs);
            }
            PROVISIONING_KEY => inline.provisioning = provisioning_value(value, "volume_context")?,
            k if k.starts_with(SIDECAR_PREFIX) => {}
            _ => {
                return Err(invalid(
                    "volume_context",
                    format!(
                        "unknown inline volume attribute {} (kura takes size, fsType and {PROVISIONING_KEY})",
                        shown(key)
                    ),
                ));
            }
        }
    }
    match (&capability.access, &inline.fs_type) {
        (
            AccessType::Mount {
                fs_type: Some(cap), ..
            },
            Some(attr),
        ) if cap != attr => {
            return Err(invalid(
                "volume_context[fsType]",
                format!(
                    "{} differs from volume_capability.mount.fs_type {}",
                    shown(attr.as_str()),
                    shown(cap.as_str())
                ),
            ));
        }
        (AccessType::Block, Some(_)) => {
            return Err(invalid(
                "volume_context[fsType]",
                "is given for a block volume, which has no filesystem",
            ));
        }
        _ => {}
    }
    Ok(inline)
}

/// Why a path given to the node cannot be right, or `None` when it can. `reserved` are
/// kura's own directories (state and pool), which no CO path may point into.
pub fn path_problem(value: &str, reserved: &[PathBuf]) -> Option<String> {
    if value.len() > MAX_PATH {
        return Some(format!(
            "is {} bytes, more than the {MAX_PATH} a path may have",
            value.len()
        ));
    }
    if value.contains('\0') {
        return Some(format!("{} contains a NUL byte", shown(value)));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Some(format!(
            "{} contains the control character U+{:04X}",
            shown(value),
            c as u32
        ));
    }
    let path = Path::new(value);
    if !path.is_absolute() {
        return Some(format!("{} is not an absolute path", shown(value)));
    }
    if let Some(long) = value.split('/').find(|c| c.len() > MAX_NAME) {
        return Some(format!(
            "{} has a component of {} bytes, more than the {MAX_NAME} a name may have",
            shown(value),
            long.len()
        ));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Some(format!("{} has a \"..\" component", shown(value)));
    }
    if path.parent().is_none() {
        return Some(format!("{} is the root directory", shown(value)));
    }
    if let Some(tree) = SYSTEM_TREES.iter().find(|t| path.starts_with(t)) {
        return Some(format!(
            "{} is under {tree}, where no volume may be staged or published",
            shown(value)
        ));
    }
    if let Some(own) = reserved
        .iter()
        .find(|r| path.starts_with(r) || r.starts_with(path))
    {
        return Some(format!(
            "{} overlaps kura's own directory {}",
            shown(value),
            own.display()
        ));
    }
    None
}

/// A required path of a node request that kura will create or mount on.
pub fn node_path(value: &str, field: &str, reserved: &[PathBuf]) -> Result<PathBuf, Status> {
    required(value, field)?;
    match path_problem(value, reserved) {
        Some(reason) => Err(invalid(field, reason)),
        None => Ok(PathBuf::from(value)),
    }
}

/// An optional path of a node request (empty: not given).
pub fn optional_node_path(
    value: &str,
    field: &str,
    reserved: &[PathBuf],
) -> Result<Option<PathBuf>, Status> {
    if value.is_empty() {
        return Ok(None);
    }
    node_path(value, field, reserved).map(Some)
}

/// The `volume_path` of NodeGetVolumeStats and NodeExpandVolume: required; `None` when
/// it cannot be a path (it then is not where the volume is, which is NOT_FOUND).
pub fn volume_path(value: &str, field: &str) -> Result<Option<PathBuf>, Status> {
    required(value, field)?;
    Ok(path_problem(value, &[])
        .is_none()
        .then(|| PathBuf::from(value)))
}

/// The `staging_target_path` of NodePublishVolume. The node advertises
/// STAGE_UNSTAGE_VOLUME, so one that is not set is FAILED_PRECONDITION (the spec's
/// table), not a missing field.
pub fn publish_staging_path(value: &str, reserved: &[PathBuf]) -> Result<PathBuf, Status> {
    let field = "staging_target_path";
    if value.is_empty() {
        return Err(precondition(
            field,
            "is not set, but this node stages volumes (STAGE_UNSTAGE_VOLUME): NodeStageVolume comes first and its path is needed here",
        ));
    }
    node_path(value, field, reserved)
}

/// A publish target and its staging path must be apart: neither inside the other.
pub fn publish_paths(target: &Path, staging: &Path) -> Result<(), Status> {
    if target.starts_with(staging) || staging.starts_with(target) {
        return Err(invalid(
            "target_path",
            format!(
                "{:?} overlaps staging_target_path {:?}; a volume is published elsewhere than where it is staged",
                target.display().to_string(),
                staging.display().to_string()
            ),
        ));
    }
    Ok(())
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
            CapabilityError::Unsupported(reason) => precondition(field, reason),
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
        name => Some(name.parse::<FsType>().map_err(|_| {
            CapabilityError::Unsupported(format!(
                "fs_type {name:?} is not supported (use one of {})",
                FsType::names()
            ))
        })?),
    };
    let flags_field = format!("{field}.mount.mount_flags");
    let flags_len = mount_flags_len(&mount.mount_flags);
    if flags_len > MAX_MOUNT_FLAGS {
        return Err(CapabilityError::Invalid(invalid(
            &flags_field,
            format!(
                "are {flags_len} bytes with their separators ({} flags), more than {MAX_MOUNT_FLAGS}",
                mount.mount_flags.len()
            ),
        )));
    }
    for (i, flag) in mount.mount_flags.iter().enumerate() {
        let reason = if flag.is_empty() {
            Some("is empty".to_owned())
        } else if flag.contains(|c: char| c.is_whitespace() || c.is_control()) {
            Some("contains whitespace or a control character".to_owned())
        } else {
            mount::check_option(flag, fs_type).err()
        };
        if let Some(reason) = reason {
            return Err(CapabilityError::Invalid(invalid(
                &format!("{flags_field}[{i}]"),
                reason,
            )));
        }
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

/// Bytes the flags take as mount(8) passes them: joined by commas, ended by a NUL.
fn mount_flags_len(flags: &[String]) -> usize {
    flags.iter().map(|f| f.len() + 1).sum()
}

/// An optional capability (expansion requests): when given it must be one kura serves.
pub fn optional_capability(
    cap: Option<&proto::VolumeCapability>,
    field: &str,
) -> Result<Option<Capability>, Status> {
    match cap {
        None => Ok(None),
        Some(cap) => capability(Some(cap), field)
            .map(Some)
            .map_err(|e| e.into_invalid(field)),
    }
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
            PROVISIONING_KEY => provisioning = provisioning_value(value, "parameters")?,
            ENCRYPTION_KEY => {
                encryption_value(value)?;
            }
            REPLICAS_KEY | INTERVAL_KEY => {}
            k if k.starts_with(SIDECAR_PREFIX) => {}
            _ => return Err(invalid("parameters", format!("unknown key {}", shown(key)))),
        }
    }
    replication_parameters(parameters, "parameters")?;
    Ok(provisioning)
}

fn encryption_value(value: &str) -> Result<Encryption, Status> {
    match value {
        "fscrypt" => Ok(Encryption::Fscrypt),
        other => Err(invalid(
            &format!("parameters[{ENCRYPTION_KEY}]"),
            format!(
                "{} is not an encryption kura offers (the one value is \"fscrypt\")",
                shown(other)
            ),
        )),
    }
}

/// The encryption the parameters ask for, checked against the capabilities the
/// volume is created for ([`encryption_fits`]).
pub fn encryption(
    parameters: &HashMap<String, String>,
    capabilities: &[Capability],
) -> Result<Encryption, Status> {
    let Some(value) = parameters.get(ENCRYPTION_KEY) else {
        return Ok(Encryption::Plain);
    };
    let encryption = encryption_value(value)?;
    encryption_fits(
        encryption,
        capabilities,
        &format!("parameters[{ENCRYPTION_KEY}]"),
    )?;
    Ok(encryption)
}

/// Whether a volume of `encryption` can serve `capabilities`: fscrypt encrypts files of
/// an ext4 filesystem, so every capability must be mount access with `fs_type` ext4
/// or empty (an encrypted volume is ext4 whatever `--default-fs-type` says). `field`
/// names what asked for the encryption.
pub fn encryption_fits(
    encryption: Encryption,
    capabilities: &[Capability],
    field: &str,
) -> Result<(), Status> {
    if encryption.is_plain() {
        return Ok(());
    }
    for (i, capability) in capabilities.iter().enumerate() {
        match &capability.access {
            AccessType::Block => {
                return Err(invalid(
                    field,
                    format!(
                        "fscrypt encrypts the files of a filesystem, but volume_capabilities[{i}] asks for block access, which it cannot protect"
                    ),
                ));
            }
            AccessType::Mount {
                fs_type: Some(fs), ..
            } if *fs != FsType::Ext4 => {
                return Err(invalid(
                    field,
                    format!(
                        "fscrypt volumes are ext4, but volume_capabilities[{i}] asks for fs_type {}",
                        shown(fs.as_str())
                    ),
                ));
            }
            AccessType::Mount { .. } => {}
        }
    }
    Ok(())
}

/// Snapshot parameters: only the sidecars' keys.
pub fn snapshot_parameters(parameters: &HashMap<String, String>) -> Result<(), Status> {
    match parameters.keys().find(|k| !k.starts_with(SIDECAR_PREFIX)) {
        Some(key) => Err(invalid("parameters", format!("unknown key {}", shown(key)))),
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
    parse(token).map(Some).ok_or_else(|| bad_token(token))
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
                fs_type: Some(FsType::Xfs),
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
    fn replication_parameters_are_checked() {
        let p = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        let ok = |pairs: &[(&str, &str)]| replication_parameters(&p(pairs), "parameters").unwrap();
        assert_eq!(ok(&[]), ReplicationChange::default());
        assert_eq!(ok(&[(REPLICAS_KEY, "0")]).copies, Some(0));
        assert_eq!(ok(&[(REPLICAS_KEY, "2")]).copies, Some(2));
        for (text, seconds) in [("5", 5), ("5s", 5), ("30s", 30), ("2m", 120), ("1h", 3600)] {
            assert_eq!(
                ok(&[(INTERVAL_KEY, text)]).interval_secs,
                Some(seconds),
                "{text}"
            );
        }
        for (key, bad) in [
            (REPLICAS_KEY, "3"),
            (REPLICAS_KEY, "-1"),
            (REPLICAS_KEY, "two"),
            (REPLICAS_KEY, ""),
            (INTERVAL_KEY, "4s"),
            (INTERVAL_KEY, "0"),
            (INTERVAL_KEY, "10d"),
            (INTERVAL_KEY, "s"),
            (INTERVAL_KEY, "99999999999999999999h"),
        ] {
            let err = replication_parameters(&p(&[(key, bad)]), "parameters").unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
            assert!(
                err.message().starts_with(&format!("parameters[{key}]: ")),
                "{}",
                err.message()
            );
            // The StorageClass check refuses it the same way.
            assert!(volume_parameters(&p(&[(key, bad)])).is_err());
        }
        assert!(volume_parameters(&p(&[(REPLICAS_KEY, "1"), (INTERVAL_KEY, "10s")])).is_ok());
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
        assert!(volume_parameters(&p(&[(ENCRYPTION_KEY, "fscrypt")])).is_ok());
        let err = volume_parameters(&p(&[(ENCRYPTION_KEY, "luks")])).unwrap_err();
        assert!(
            err.message()
                .starts_with("parameters[kura.csi.dev/encryption]: "),
            "{}",
            err.message()
        );
    }

    #[test]
    fn encryption_wants_ext4_mount_capabilities() {
        let params = HashMap::from([(ENCRYPTION_KEY.to_owned(), "fscrypt".to_owned())]);
        let with = |access: AccessType| Capability {
            access,
            mode: AccessMode::SingleNodeWriter,
        };
        let mount = |fs: Option<&str>| {
            with(AccessType::Mount {
                fs_type: fs.map(|f| f.parse().unwrap()),
                flags: vec![],
            })
        };
        assert_eq!(
            encryption(&HashMap::new(), &[with(AccessType::Block)]).unwrap(),
            Encryption::Plain
        );
        assert_eq!(
            encryption(&params, &[mount(None), mount(Some("ext4"))]).unwrap(),
            Encryption::Fscrypt
        );
        for (caps, needle) in [
            (vec![with(AccessType::Block)], "block access"),
            (
                vec![mount(None), mount(Some("xfs"))],
                "volume_capabilities[1]",
            ),
            (vec![mount(Some("btrfs"))], "btrfs"),
        ] {
            let err = encryption(&params, &caps).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
            assert!(err.message().contains(needle), "{}", err.message());
            assert!(
                err.message()
                    .starts_with("parameters[kura.csi.dev/encryption]: "),
                "{}",
                err.message()
            );
        }
        let bad = HashMap::from([(ENCRYPTION_KEY.to_owned(), "yes".to_owned())]);
        assert!(
            encryption(&bad, &[mount(None)])
                .unwrap_err()
                .message()
                .contains("yes")
        );
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

    #[test]
    fn names_refuse_exactly_the_control_characters_csi_bans() {
        let banned = [
            '\u{0}', '\u{8}', '\u{b}', '\u{c}', '\u{e}', '\u{1f}', '\u{7f}', '\u{80}', '\u{9f}',
        ];
        for c in banned {
            let err = name(&format!("pvc-{c}-x"), "name").unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{c:?}");
            let hex = format!("U+{:04X}", c as u32);
            assert!(err.message().contains(&hex), "{}", err.message());
            assert!(err.message().starts_with("name: "), "{}", err.message());
        }
        for allowed in [
            "tab\there",
            "line\nfeed",
            "cr\r",
            "nbsp\u{a0}",
            "ünïcødé",
            "🦀",
            "\u{202e}rtl",
        ] {
            assert_eq!(name(allowed, "name").unwrap(), allowed);
        }
        // 128 bytes is the limit, counted in bytes, not characters.
        assert!(name(&"é".repeat(64), "name").is_ok());
        assert!(name(&"é".repeat(65), "name").is_err());
    }

    #[test]
    fn paths_that_cannot_be_right() {
        let reserved = [PathBuf::from("/var/lib/kura")];
        let long_name = format!("/mnt/{}", "n".repeat(256));
        let long_path = format!("/{}", "a/".repeat(2048));
        let bad = [
            ("relative/path", "absolute"),
            ("", "absolute"),
            ("/mnt/nul\0byte", "NUL"),
            ("/mnt/new\nline", "U+000A"),
            ("/mnt/esc\u{1b}[31m", "U+001B"),
            ("/mnt/../etc", "\"..\""),
            ("/mnt/a/..", "\"..\""),
            ("/", "root"),
            ("/proc/self", "/proc"),
            ("/proc", "/proc"),
            ("/sys/fs/cgroup", "/sys"),
            ("/dev/sda", "/dev"),
            ("//dev/sda", "/dev"),
            ("/dev/./sda", "/dev"),
            ("/var/lib/kura/pool/volumes", "kura's own"),
            ("/var/lib/kura", "kura's own"),
            ("/var/lib", "kura's own"),
            (long_name.as_str(), "255"),
            (long_path.as_str(), "4095"),
        ];
        for (path, needle) in bad {
            let reason = path_problem(path, &reserved).unwrap_or_else(|| panic!("{path:?} passed"));
            assert!(reason.contains(needle), "{path:?}: {reason}");
        }
        let fine = [
            "/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/pv/mount",
            "/var/lib/kura-other",
            "/devices/x",
            "/procfs",
            "/mnt/with space/and:colon",
            "/mnt/./dot",
            "/mnt/trailing/",
            "/mnt/ünïcødé",
        ];
        for path in fine {
            assert_eq!(path_problem(path, &reserved), None, "{path:?}");
        }
        let at_limit = format!("/{}", "a".repeat(MAX_NAME));
        assert_eq!(path_problem(&at_limit, &reserved), None);
        assert_eq!(
            node_path("", "target_path", &reserved)
                .unwrap_err()
                .message(),
            "target_path: is required"
        );
        let err = node_path("/proc/1", "target_path", &reserved).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with("target_path: "));
        // A stats or expand path that cannot be a path names no place of the volume.
        assert_eq!(volume_path("some/path", "volume_path").unwrap(), None);
        assert_eq!(
            volume_path("", "volume_path").unwrap_err().code(),
            Code::InvalidArgument
        );
        assert!(volume_path("/mnt/x", "volume_path").unwrap().is_some());
        assert_eq!(
            publish_staging_path("", &reserved).unwrap_err().code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            publish_staging_path("rel", &reserved).unwrap_err().code(),
            Code::InvalidArgument
        );
        for (target, staging, ok) in [
            ("/t", "/s", true),
            ("/s", "/s", false),
            ("/s/sub", "/s", false),
            ("/t", "/t/sub", false),
            ("/st", "/s", true),
        ] {
            assert_eq!(
                publish_paths(Path::new(target), Path::new(staging)).is_ok(),
                ok,
                "{target} {staging}"
            );
        }
    }

    #[test]
    fn mount_flags_count_their_separators_and_follow_the_allow_list() {
        let with_flags = |flags: Vec<String>, fs: &str| {
            capability(
                Some(&proto::VolumeCapability {
                    access_type: Some(volume_capability::AccessType::Mount(
                        volume_capability::MountVolume {
                            fs_type: fs.into(),
                            mount_flags: flags,
                            volume_mount_group: String::new(),
                        },
                    )),
                    access_mode: Some(volume_capability::AccessMode {
                        mode: Mode::SingleNodeWriter as i32,
                    }),
                }),
                "c",
            )
        };
        // 1365 flags of 2 bytes take 4095 bytes with their commas and NUL; 2048 take
        // 6144, though their characters alone are 4096.
        assert!(with_flags(vec!["ro".into(); 1365], "").is_ok());
        match with_flags(vec!["ro".into(); 2048], "") {
            Err(CapabilityError::Invalid(status)) => {
                assert!(status.message().contains("4096"), "{}", status.message())
            }
            other => panic!("{other:?}"),
        }
        let refused = [
            (vec!["suid"], "", "c.mount.mount_flags[0]"),
            (vec!["noatime", "dev"], "", "c.mount.mount_flags[1]"),
            (vec!["noatime,suid"], "", "not a mount option"),
            (vec!["x-mount.mkdir"], "", "mount point"),
            (vec!["nouuid"], "ext4", "does not apply to ext4"),
            (vec![""], "", "empty"),
            (vec!["no atime"], "", "whitespace"),
            (vec!["tab\tx"], "", "whitespace"),
        ];
        for (flags, fs, needle) in refused {
            let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
            match with_flags(flags.clone(), fs) {
                Err(CapabilityError::Invalid(status)) => {
                    assert_eq!(status.code(), Code::InvalidArgument);
                    assert!(
                        status.message().contains(needle),
                        "{flags:?}: {}",
                        status.message()
                    );
                }
                other => panic!("{flags:?}: {other:?}"),
            }
        }
        assert!(with_flags(vec!["noatime".into(), "nouuid".into()], "xfs").is_ok());
        assert!(with_flags(vec!["data=journal".into()], "").is_ok());
    }

    #[test]
    fn inline_attributes_are_checked_like_parameters() {
        let context = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        let mount = |fs: Option<&str>| Capability {
            access: AccessType::Mount {
                fs_type: fs.map(|f| f.parse().unwrap()),
                flags: vec![],
            },
            mode: AccessMode::SingleNodeWriter,
        };
        let ok = inline_attributes(
            &context(&[
                ("size", "1Gi"),
                ("fsType", "xfs"),
                (PROVISIONING_KEY, "thick"),
                (EPHEMERAL_KEY, "true"),
                ("csi.storage.k8s.io/pod.name", "p"),
            ]),
            &mount(Some("xfs")),
        )
        .unwrap();
        assert_eq!(
            ok,
            Inline {
                size: 1 << 30,
                provisioning: Provisioning::Thick,
                fs_type: Some(FsType::Xfs),
            }
        );
        assert_eq!(
            inline_attributes(&context(&[]), &mount(None)).unwrap().size,
            0
        );
        let block = Capability {
            access: AccessType::Block,
            mode: AccessMode::SingleNodeWriter,
        };
        for (pairs, cap, needle) in [
            (&[("color", "blue")][..], mount(None), "color"),
            (&[("size", "big")], mount(None), "size"),
            (&[("size", "0")], mount(None), "size"),
            (&[("fsType", "vfat")], mount(None), "vfat"),
            (&[("fsType", "ext4")], mount(Some("xfs")), "fsType"),
            (&[("fsType", "ext4")], block, "fsType"),
            (&[(PROVISIONING_KEY, "fat")], mount(None), "fat"),
            (&[(ENCRYPTION_KEY, "fscrypt")], mount(None), "encryption"),
        ] {
            let err = inline_attributes(&context(pairs), &cap).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{pairs:?}");
            assert!(err.message().contains(needle), "{}", err.message());
        }
        assert!(is_ephemeral(&context(&[(EPHEMERAL_KEY, "true")])));
        assert!(!is_ephemeral(&context(&[(EPHEMERAL_KEY, "false")])));
        assert!(!is_ephemeral(&context(&[])));
    }

    #[test]
    fn maps_and_mutable_parameters() {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        assert_eq!(mutable_parameters(&map(&[])).unwrap(), Mutable::default());
        assert_eq!(
            mutable_parameters(&map(&[(PROVISIONING_KEY, "thick")]))
                .unwrap()
                .provisioning,
            Some(Provisioning::Thick)
        );
        let asked = mutable_parameters(&map(&[(REPLICAS_KEY, "2"), (INTERVAL_KEY, "1m")])).unwrap();
        assert_eq!(
            asked.replication,
            ReplicationChange {
                copies: Some(2),
                interval_secs: Some(60)
            }
        );
        let err = mutable_parameters(&map(&[(PROVISIONING_KEY, "fat")])).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("fat"), "{}", err.message());
        let err =
            mutable_parameters(&map(&[(PROVISIONING_KEY, "thick"), ("iops", "100")])).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with("mutable_parameters: "),
            "{}",
            err.message()
        );
        assert!(err.message().contains("iops"), "{}", err.message());
        let big = "v".repeat(4000);
        assert!(map_size(&map(&[("k", &big)]), "secrets").is_ok());
        let err = map_size(&map(&[("k", &big), ("l", &big)]), "secrets").unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            !err.message().contains(&big[..16]),
            "secrets are not echoed"
        );
        assert!(err.message().starts_with("secrets: "), "{}", err.message());
    }

    #[test]
    fn expansion_capabilities_must_be_servable() {
        assert!(
            optional_capability(None, "volume_capability")
                .unwrap()
                .is_none()
        );
        let ok = cap(block(), Some(Mode::SingleNodeWriter));
        assert!(
            optional_capability(Some(&ok), "volume_capability")
                .unwrap()
                .is_some()
        );
        for bad in [
            cap(block(), Some(Mode::MultiNodeMultiWriter)),
            cap(mount("", &[]), Some(Mode::MultiNodeSingleWriter)),
            cap(None, Some(Mode::SingleNodeWriter)),
            cap(block(), None),
        ] {
            let err = optional_capability(Some(&bad), "volume_capability").unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
            assert!(
                err.message().contains("volume_capability"),
                "{}",
                err.message()
            );
        }
    }
}
