//! Request builders: one per RPC, with the fields a test usually sets; a test that
//! needs more sets them with struct update syntax (`..stage_request(...)`). Paths are
//! taken as anything path-like, so a table can pass the strings it tries verbatim.

use std::collections::HashMap;
use std::path::Path;

use kura::csi::proto::{self, volume_capability};
use volume_capability::access_mode::Mode;

fn text(path: impl AsRef<Path>) -> String {
    path.as_ref().display().to_string()
}

/// A map of strings, as parameters, contexts and secrets are.
pub fn string_map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------
// Capabilities
// ---------------------------------------------------------------------------------

pub fn mount_access(fs_type: &str, flags: &[&str]) -> volume_capability::AccessType {
    volume_capability::AccessType::Mount(volume_capability::MountVolume {
        fs_type: fs_type.into(),
        mount_flags: flags.iter().map(|f| f.to_string()).collect(),
        volume_mount_group: String::new(),
    })
}

pub fn block_access() -> volume_capability::AccessType {
    volume_capability::AccessType::Block(volume_capability::BlockVolume {})
}

pub fn cap_with_mode(access: volume_capability::AccessType, mode: Mode) -> proto::VolumeCapability {
    proto::VolumeCapability {
        access_type: Some(access),
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
    }
}

/// Mount access, SINGLE_NODE_WRITER.
pub fn mount_cap(fs_type: &str) -> proto::VolumeCapability {
    cap_with_mode(mount_access(fs_type, &[]), Mode::SingleNodeWriter)
}

/// Block access, SINGLE_NODE_WRITER.
pub fn block_cap() -> proto::VolumeCapability {
    cap_with_mode(block_access(), Mode::SingleNodeWriter)
}

pub fn is_block(cap: &proto::VolumeCapability) -> bool {
    matches!(
        cap.access_type,
        Some(volume_capability::AccessType::Block(_))
    )
}

// ---------------------------------------------------------------------------------
// Controller
// ---------------------------------------------------------------------------------

pub fn range(required: i64, limit: i64) -> Option<proto::CapacityRange> {
    Some(proto::CapacityRange {
        required_bytes: required,
        limit_bytes: limit,
    })
}

pub fn snapshot_source(snapshot_id: &str) -> proto::VolumeContentSource {
    proto::VolumeContentSource {
        r#type: Some(proto::volume_content_source::Type::Snapshot(
            proto::volume_content_source::SnapshotSource {
                snapshot_id: snapshot_id.into(),
            },
        )),
    }
}

pub fn volume_source(volume_id: &str) -> proto::VolumeContentSource {
    proto::VolumeContentSource {
        r#type: Some(proto::volume_content_source::Type::Volume(
            proto::volume_content_source::VolumeSource {
                volume_id: volume_id.into(),
            },
        )),
    }
}

/// A mount volume (no fs_type) of `size` bytes.
pub fn create_request(
    name: &str,
    size: i64,
    params: &[(&str, &str)],
    source: Option<proto::VolumeContentSource>,
) -> proto::CreateVolumeRequest {
    proto::CreateVolumeRequest {
        name: name.into(),
        capacity_range: range(size, 0),
        volume_capabilities: vec![mount_cap("")],
        parameters: string_map(params),
        volume_content_source: source,
        ..Default::default()
    }
}

/// A mount volume restored from a snapshot.
pub fn restore_request(name: &str, size: i64, snapshot_id: &str) -> proto::CreateVolumeRequest {
    create_request(name, size, &[], Some(snapshot_source(snapshot_id)))
}

/// A mount volume cloned from another.
pub fn clone_request(name: &str, size: i64, volume_id: &str) -> proto::CreateVolumeRequest {
    create_request(name, size, &[], Some(volume_source(volume_id)))
}

pub fn delete_volume_request(volume_id: &str) -> proto::DeleteVolumeRequest {
    proto::DeleteVolumeRequest {
        volume_id: volume_id.into(),
        ..Default::default()
    }
}

pub fn get_volume_request(volume_id: &str) -> proto::ControllerGetVolumeRequest {
    proto::ControllerGetVolumeRequest {
        volume_id: volume_id.into(),
    }
}

pub fn validate_request(
    volume_id: &str,
    caps: Vec<proto::VolumeCapability>,
) -> proto::ValidateVolumeCapabilitiesRequest {
    proto::ValidateVolumeCapabilitiesRequest {
        volume_id: volume_id.into(),
        volume_capabilities: caps,
        ..Default::default()
    }
}

pub fn expand_request(
    volume_id: &str,
    required: i64,
    limit: i64,
) -> proto::ControllerExpandVolumeRequest {
    proto::ControllerExpandVolumeRequest {
        volume_id: volume_id.into(),
        capacity_range: range(required, limit),
        ..Default::default()
    }
}

pub fn snapshot_request(name: &str, source_volume_id: &str) -> proto::CreateSnapshotRequest {
    proto::CreateSnapshotRequest {
        source_volume_id: source_volume_id.into(),
        name: name.into(),
        ..Default::default()
    }
}

pub fn delete_snapshot_request(snapshot_id: &str) -> proto::DeleteSnapshotRequest {
    proto::DeleteSnapshotRequest {
        snapshot_id: snapshot_id.into(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------
// Node
// ---------------------------------------------------------------------------------

pub fn stage_request(
    volume_id: &str,
    staging: impl AsRef<Path>,
    cap: &proto::VolumeCapability,
) -> proto::NodeStageVolumeRequest {
    proto::NodeStageVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: text(staging),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    }
}

pub fn unstage_request(
    volume_id: &str,
    staging: impl AsRef<Path>,
) -> proto::NodeUnstageVolumeRequest {
    proto::NodeUnstageVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: text(staging),
    }
}

pub fn publish_request(
    volume_id: &str,
    staging: impl AsRef<Path>,
    target: impl AsRef<Path>,
    cap: &proto::VolumeCapability,
    readonly: bool,
) -> proto::NodePublishVolumeRequest {
    proto::NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: text(staging),
        target_path: text(target),
        volume_capability: Some(cap.clone()),
        readonly,
        ..Default::default()
    }
}

pub fn unpublish_request(
    volume_id: &str,
    target: impl AsRef<Path>,
) -> proto::NodeUnpublishVolumeRequest {
    proto::NodeUnpublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: text(target),
    }
}

pub fn stats_request(volume_id: &str, path: impl AsRef<Path>) -> proto::NodeGetVolumeStatsRequest {
    proto::NodeGetVolumeStatsRequest {
        volume_id: volume_id.into(),
        volume_path: text(path),
        ..Default::default()
    }
}

pub fn node_expand_request(
    volume_id: &str,
    path: impl AsRef<Path>,
    required: i64,
    limit: i64,
) -> proto::NodeExpandVolumeRequest {
    proto::NodeExpandVolumeRequest {
        volume_id: volume_id.into(),
        volume_path: text(path),
        capacity_range: range(required, limit),
        ..Default::default()
    }
}
