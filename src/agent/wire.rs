//! Conversions between pool types and the agent protocol. What comes off the wire is
//! parsed as strictly as a CSI request: an ID that does not parse is refused.

use std::collections::BTreeSet;

use super::proto;
use crate::pool::cbt::{Query, Range};
use crate::pool::group::GroupSnapshot;
use crate::pool::replica::{MAX_COPIES, Placement, Replication};
use crate::pool::{
    self, AccessKind, Condition, ContentSource, Encryption, GroupSnapshotId, Provisioning,
    Snapshot, SnapshotId, Timestamp, Volume, VolumeId, size,
};

/// A message from the other side that kura could not have sent.
#[derive(Debug, thiserror::Error)]
#[error("malformed agent message: {field}: {reason}")]
pub struct Malformed {
    pub field: &'static str,
    pub reason: String,
}

fn malformed(field: &'static str, reason: impl Into<String>) -> Malformed {
    Malformed {
        field,
        reason: reason.into(),
    }
}

pub fn volume_id(text: &str, field: &'static str) -> Result<VolumeId, Malformed> {
    VolumeId::parse(text).ok_or_else(|| malformed(field, format!("{text:?} is not a volume ID")))
}

pub fn snapshot_id(text: &str, field: &'static str) -> Result<SnapshotId, Malformed> {
    SnapshotId::parse(text)
        .ok_or_else(|| malformed(field, format!("{text:?} is not a snapshot ID")))
}

/// An optional ID: empty is none.
pub fn optional<T>(
    text: &str,
    field: &'static str,
    parse: fn(&str, &'static str) -> Result<T, Malformed>,
) -> Result<Option<T>, Malformed> {
    (!text.is_empty()).then(|| parse(text, field)).transpose()
}

/// A listing's limit on the wire, where 0 is none: a limit of 0 asks for one entry
/// (a node may always send more than asked), one beyond `u32` for all.
pub fn limit_message(limit: usize) -> u32 {
    u32::try_from(limit.max(1)).unwrap_or(0)
}

pub fn limit(value: u32) -> usize {
    match value {
        0 => usize::MAX,
        n => n as usize,
    }
}

pub fn provisioning_message(p: Provisioning) -> proto::Provisioning {
    match p {
        Provisioning::Thin => proto::Provisioning::Thin,
        Provisioning::Thick => proto::Provisioning::Thick,
    }
}

pub fn provisioning(value: i32) -> Result<Provisioning, Malformed> {
    match proto::Provisioning::try_from(value) {
        Ok(proto::Provisioning::Thin) => Ok(Provisioning::Thin),
        Ok(proto::Provisioning::Thick) => Ok(Provisioning::Thick),
        Ok(proto::Provisioning::Unspecified) | Err(_) => Err(malformed(
            "provisioning",
            format!("{value} is not thin or thick"),
        )),
    }
}

pub fn encryption_message(e: Encryption) -> i32 {
    match e {
        Encryption::Plain => proto::Encryption::None as i32,
        Encryption::Fscrypt => proto::Encryption::Fscrypt as i32,
    }
}

pub fn encryption(value: i32) -> Result<Encryption, Malformed> {
    match proto::Encryption::try_from(value) {
        Ok(proto::Encryption::None) => Ok(Encryption::Plain),
        Ok(proto::Encryption::Fscrypt) => Ok(Encryption::Fscrypt),
        Err(_) => Err(malformed(
            "encryption",
            format!("{value} is not an encryption kura knows"),
        )),
    }
}

pub fn access_message(set: &BTreeSet<AccessKind>) -> Vec<i32> {
    set.iter()
        .map(|kind| match kind {
            AccessKind::Mount => proto::AccessKind::Mount as i32,
            AccessKind::Block => proto::AccessKind::Block as i32,
        })
        .collect()
}

pub fn access(values: &[i32]) -> Result<BTreeSet<AccessKind>, Malformed> {
    values
        .iter()
        .map(|&value| match proto::AccessKind::try_from(value) {
            Ok(proto::AccessKind::Mount) => Ok(AccessKind::Mount),
            Ok(proto::AccessKind::Block) => Ok(AccessKind::Block),
            Ok(proto::AccessKind::Unspecified) | Err(_) => Err(malformed(
                "access",
                format!("{value} is not mount or block"),
            )),
        })
        .collect()
}

pub fn source_message(source: &ContentSource) -> proto::ContentSource {
    let kind = match source {
        ContentSource::Snapshot(id) => proto::content_source::Kind::SnapshotId(id.to_string()),
        ContentSource::Volume(id) => proto::content_source::Kind::VolumeId(id.to_string()),
    };
    proto::ContentSource { kind: Some(kind) }
}

pub fn source(message: Option<&proto::ContentSource>) -> Result<Option<ContentSource>, Malformed> {
    match message.and_then(|m| m.kind.as_ref()) {
        None => Ok(None),
        Some(proto::content_source::Kind::SnapshotId(id)) => Ok(Some(ContentSource::Snapshot(
            snapshot_id(id, "source.snapshot_id")?,
        ))),
        Some(proto::content_source::Kind::VolumeId(id)) => Ok(Some(ContentSource::Volume(
            volume_id(id, "source.volume_id")?,
        ))),
    }
}

pub fn timestamp_message(t: Timestamp) -> proto::Timestamp {
    proto::Timestamp {
        seconds: t.seconds,
        nanos: t.nanos,
    }
}

pub fn timestamp(t: Option<&proto::Timestamp>) -> Timestamp {
    t.map_or(
        Timestamp {
            seconds: 0,
            nanos: 0,
        },
        |t| Timestamp {
            seconds: t.seconds,
            nanos: t.nanos,
        },
    )
}

pub fn volume_message(v: &Volume) -> proto::Volume {
    proto::Volume {
        id: v.id.to_string(),
        name: v.name.clone(),
        size_bytes: v.size_bytes,
        provisioning: provisioning_message(v.provisioning) as i32,
        source: v.source.as_ref().map(source_message),
        created: Some(timestamp_message(v.created)),
        access: access_message(&v.access),
        encryption: encryption_message(v.encryption),
        replication: v.replication.as_ref().map(replication_message),
    }
}

/// A volume's replication without its secrets, which never leave its node.
pub fn replication_message(r: &Replication) -> proto::Replication {
    proto::Replication {
        copies: r.copies.into(),
        interval_seconds: r.interval_secs,
        nodes: r.nodes().map(str::to_owned).collect(),
        full_nodes: r.full.clone(),
    }
}

/// A replication as another node describes it: the placements carry no secrets.
pub fn replication(m: &proto::Replication) -> Result<Replication, Malformed> {
    let copies = u8::try_from(m.copies)
        .ok()
        .filter(|c| (1..=MAX_COPIES).contains(c))
        .ok_or_else(|| {
            malformed(
                "replication.copies",
                format!("{} is not 1 to {MAX_COPIES}", m.copies),
            )
        })?;
    Ok(Replication {
        copies,
        interval_secs: m.interval_seconds,
        replicas: m
            .nodes
            .iter()
            .map(|node| Placement {
                node: node.clone(),
                secret: String::new(),
            })
            .collect(),
        full: m.full_nodes.clone(),
    })
}

pub fn volume(m: Option<&proto::Volume>) -> Result<Volume, Malformed> {
    let m = m.ok_or_else(|| malformed("volume", "missing"))?;
    Ok(Volume {
        id: volume_id(&m.id, "volume.id")?,
        name: m.name.clone(),
        size_bytes: m.size_bytes,
        provisioning: provisioning(m.provisioning)?,
        source: source(m.source.as_ref())?,
        created: timestamp(m.created.as_ref()),
        access: access(&m.access)?,
        encryption: encryption(m.encryption)?,
        replication: m.replication.as_ref().map(replication).transpose()?,
    })
}

pub fn condition_message(c: &Condition) -> proto::Condition {
    proto::Condition {
        abnormal: c.abnormal,
        message: c.message.clone(),
    }
}

pub fn condition(c: Option<&proto::Condition>) -> Condition {
    c.map_or_else(
        || Condition::abnormal("the node reported no condition"),
        |c| Condition {
            abnormal: c.abnormal,
            message: c.message.clone(),
        },
    )
}

pub fn volume_response(v: &Volume, c: &Condition) -> proto::VolumeResponse {
    proto::VolumeResponse {
        volume: Some(volume_message(v)),
        condition: Some(condition_message(c)),
    }
}

pub fn volume_and_condition(r: &proto::VolumeResponse) -> Result<(Volume, Condition), Malformed> {
    Ok((volume(r.volume.as_ref())?, condition(r.condition.as_ref())))
}

pub fn snapshot_message(s: &Snapshot) -> proto::Snapshot {
    proto::Snapshot {
        id: s.id.to_string(),
        name: s.name.clone(),
        source_volume_id: s.source_volume.to_string(),
        size_bytes: s.size_bytes,
        created: Some(timestamp_message(s.created)),
        ready: s.ready,
        encryption: encryption_message(s.encryption),
        group_snapshot_id: s.group.as_ref().map(|g| g.to_string()).unwrap_or_default(),
    }
}

pub fn snapshot(m: Option<&proto::Snapshot>) -> Result<Snapshot, Malformed> {
    let m = m.ok_or_else(|| malformed("snapshot", "missing"))?;
    Ok(Snapshot {
        id: snapshot_id(&m.id, "snapshot.id")?,
        name: m.name.clone(),
        source_volume: volume_id(&m.source_volume_id, "snapshot.source_volume_id")?,
        size_bytes: m.size_bytes,
        created: timestamp(m.created.as_ref()),
        ready: m.ready,
        encryption: encryption(m.encryption)?,
        group: match m.group_snapshot_id.as_str() {
            "" => None,
            id => Some(group_id(id, "snapshot.group_snapshot_id")?),
        },
        // How the image was made matters only on its node, which reads its own
        // record; it does not travel.
        image: None,
    })
}

pub fn group_id(text: &str, field: &'static str) -> Result<GroupSnapshotId, Malformed> {
    GroupSnapshotId::parse(text)
        .ok_or_else(|| malformed(field, format!("{text:?} is not a group snapshot ID")))
}

pub fn volume_ids(texts: &[String], field: &'static str) -> Result<Vec<VolumeId>, Malformed> {
    texts.iter().map(|t| volume_id(t, field)).collect()
}

pub fn group_message(g: &GroupSnapshot) -> proto::GroupSnapshot {
    proto::GroupSnapshot {
        id: g.id.to_string(),
        name: g.name.clone(),
        source_volume_ids: g.sources.iter().map(|v| v.to_string()).collect(),
        member_snapshot_ids: g.members.iter().map(|s| s.to_string()).collect(),
        created: Some(timestamp_message(g.created)),
    }
}

pub fn group(m: Option<&proto::GroupSnapshot>) -> Result<GroupSnapshot, Malformed> {
    let m = m.ok_or_else(|| malformed("group", "missing"))?;
    Ok(GroupSnapshot {
        id: group_id(&m.id, "group.id")?,
        name: m.name.clone(),
        sources: volume_ids(&m.source_volume_ids, "group.source_volume_ids")?,
        members: m
            .member_snapshot_ids
            .iter()
            .map(|s| snapshot_id(s, "group.member_snapshot_ids"))
            .collect::<Result<_, _>>()?,
        created: timestamp(m.created.as_ref()),
    })
}

pub fn create_request(spec: &pool::VolumeSpec) -> proto::CreateVolumeRequest {
    proto::CreateVolumeRequest {
        name: spec.name.clone(),
        required_bytes: spec.range.required,
        limit_bytes: spec.range.limit,
        provisioning: provisioning_message(spec.provisioning) as i32,
        source: spec.source.as_ref().map(source_message),
        access: access_message(&spec.access),
        encryption: encryption_message(spec.encryption),
    }
}

pub fn spec(m: &proto::CreateVolumeRequest) -> Result<pool::VolumeSpec, Malformed> {
    if m.name.is_empty() {
        return Err(malformed("name", "is required"));
    }
    Ok(pool::VolumeSpec {
        name: m.name.clone(),
        range: size::Range {
            required: m.required_bytes,
            limit: m.limit_bytes,
        },
        provisioning: provisioning(m.provisioning)?,
        source: source(m.source.as_ref())?,
        access: access(&m.access)?,
        encryption: encryption(m.encryption)?,
    })
}

/// A changed block tracking query as the agent is asked it.
pub fn ranges_request(query: &Query, start: u64, max: usize) -> proto::SnapshotRangesRequest {
    let (snapshot, base) = match query {
        Query::Allocated(id) => (id, None),
        Query::Delta { base, target } => (target, Some(base)),
    };
    proto::SnapshotRangesRequest {
        snapshot_id: snapshot.to_string(),
        base_snapshot_id: base.map(|b| b.to_string()).unwrap_or_default(),
        starting_offset: start,
        max_results: max.min(u32::MAX as usize) as u32,
    }
}

/// The query of a [`ranges_request`].
pub fn ranges_query(m: &proto::SnapshotRangesRequest) -> Result<Query, Malformed> {
    let snapshot = snapshot_id(&m.snapshot_id, "snapshot_id")?;
    Ok(match m.base_snapshot_id.as_str() {
        "" => Query::Allocated(snapshot),
        base => Query::Delta {
            base: snapshot_id(base, "base_snapshot_id")?,
            target: snapshot,
        },
    })
}

pub fn ranges_message(capacity: u64, ranges: &[Range]) -> proto::SnapshotRangesBatch {
    proto::SnapshotRangesBatch {
        capacity_bytes: capacity,
        ranges: ranges
            .iter()
            .map(|&(start, end)| proto::Extent {
                offset: start,
                length: end - start,
            })
            .collect(),
    }
}

/// The ranges of a batch, each checked to lie within the capacity.
pub fn ranges(m: &proto::SnapshotRangesBatch) -> Result<Vec<Range>, Malformed> {
    m.ranges
        .iter()
        .map(|e| match e.offset.checked_add(e.length) {
            Some(end) if e.length > 0 && end <= m.capacity_bytes => Ok((e.offset, end)),
            _ => Err(malformed(
                "ranges",
                format!(
                    "[{}, +{}) is empty or past the capacity of {} bytes",
                    e.offset, e.length, m.capacity_bytes
                ),
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::NodeToken;

    #[test]
    fn listing_limits_round_trip() {
        for asked in [1, 101, u32::MAX as usize, usize::MAX] {
            assert_eq!(limit(limit_message(asked)), asked, "{asked}");
        }
        // 0 on the wire is no limit; a limit of 0 asks for one entry.
        assert_eq!(limit(0), usize::MAX);
        assert_eq!(limit_message(0), 1);
        assert_eq!(limit_message(u32::MAX as usize + 1), 0);
        let id = VolumeId::derive("n", &NodeToken::for_node("node"));
        assert_eq!(optional("", "start_id", volume_id).unwrap(), None);
        assert_eq!(
            optional(id.as_str(), "start_id", volume_id).unwrap(),
            Some(id)
        );
        assert!(optional("vol-x", "start_id", volume_id).is_err());
    }

    #[test]
    fn volumes_and_snapshots_round_trip() {
        let node = NodeToken::for_node("worker-1");
        let snap = SnapshotId::derive("s", &node);
        let volume = Volume {
            id: VolumeId::derive("v", &node),
            name: "v".into(),
            size_bytes: 1 << 30,
            provisioning: Provisioning::Thick,
            source: Some(ContentSource::Snapshot(snap.clone())),
            created: Timestamp {
                seconds: 7,
                nanos: 9,
            },
            access: [AccessKind::Block, AccessKind::Mount].into(),
            encryption: Encryption::Fscrypt,
            // The secrets stay on the volume's node.
            replication: Some(Replication {
                copies: 2,
                interval_secs: 30,
                replicas: vec![Placement {
                    node: "worker-2".into(),
                    secret: String::new(),
                }],
                full: vec!["worker-2".into()],
            }),
        };
        assert_eq!(
            super::volume(Some(&volume_message(&volume))).unwrap(),
            volume
        );
        let snapshot = Snapshot {
            id: snap,
            name: "s".into(),
            source_volume: volume.id.clone(),
            size_bytes: 5,
            created: volume.created,
            ready: false,
            encryption: Encryption::Fscrypt,
            group: None,
            image: None,
        };
        assert_eq!(
            super::snapshot(Some(&snapshot_message(&snapshot))).unwrap(),
            snapshot
        );
        let member = Snapshot {
            group: Some(GroupSnapshotId::derive("g", &volume.id.node())),
            ..snapshot.clone()
        };
        assert_eq!(
            super::snapshot(Some(&snapshot_message(&member))).unwrap(),
            member
        );
        let group = GroupSnapshot {
            id: GroupSnapshotId::derive("g", &volume.id.node()),
            name: "g".into(),
            sources: vec![volume.id.clone()],
            members: vec![member.id.clone()],
            created: volume.created,
        };
        assert_eq!(super::group(Some(&group_message(&group))).unwrap(), group);
        let spec = pool::VolumeSpec {
            name: "c".into(),
            range: size::Range {
                required: 3,
                limit: 4,
            },
            provisioning: Provisioning::Thin,
            source: Some(ContentSource::Volume(volume.id.clone())),
            access: [AccessKind::Mount].into(),
            encryption: Encryption::Fscrypt,
        };
        let back = self::spec(&create_request(&spec)).unwrap();
        assert_eq!(
            (
                back.name,
                back.range,
                back.provisioning,
                back.source,
                back.access,
                back.encryption
            ),
            (
                spec.name,
                spec.range,
                spec.provisioning,
                spec.source,
                spec.access,
                spec.encryption
            )
        );
    }

    #[test]
    fn malformed_messages_are_refused() {
        let mut m = volume_message(&Volume {
            id: VolumeId::derive("v", &NodeToken::for_node("n")),
            name: "v".into(),
            size_bytes: 1,
            provisioning: Provisioning::Thin,
            source: None,
            created: Timestamp {
                seconds: 0,
                nanos: 0,
            },
            access: BTreeSet::new(),
            encryption: Encryption::Plain,
            replication: None,
        });
        assert_eq!(m.encryption, proto::Encryption::None as i32);
        m.encryption = 9;
        assert!(volume(Some(&m)).is_err());
        m.encryption = 0;
        m.id = "vol-../../etc".into();
        assert!(volume(Some(&m)).is_err());
        assert!(volume(None).is_err());
        assert!(provisioning(0).is_err());
        assert!(provisioning(99).is_err());
        assert!(access(&[0]).is_err());
        assert!(access(&[7]).is_err());
    }
}
