//! Volume and snapshot IDs.
//!
//! An ID is `vol-<uuid>-<node>`, `snap-<uuid>-<node>` or `grp-<uuid>-<node>` (a group
//! snapshot, named by the node that keeps its record): the UUID is v5 of the CO's
//! request name under a fixed namespace, so a retried create lands on the same ID, and
//! the node part routes every later request without a database. A node ID that is a
//! short DNS-style name travels as itself; any other travels as `_` plus a digest, so
//! an ID always fits the spec's 128 bytes. Parsing is strict: only an ID that parses
//! ever becomes part of a path.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Namespace of kura's name-derived UUIDs. Never change it: IDs would change.
const NAMESPACE: Uuid = Uuid::from_u128(0x6b75_7261_2d63_7369_8d1e_4f2a_9b3c_0a01);
const MAX_LITERAL_NODE: usize = 63;
const DIGEST_HEX: usize = 24;

/// How a node is named inside IDs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeToken(String);

impl NodeToken {
    pub fn for_node(node_id: &str) -> Self {
        if is_literal_node(node_id) {
            NodeToken(node_id.to_owned())
        } else {
            let digest = Sha256::digest(node_id.as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            NodeToken(format!("_{}", &hex[..DIGEST_HEX]))
        }
    }

    fn parse(text: &str) -> Option<Self> {
        let digest_ok = text.strip_prefix('_').is_some_and(|hex| {
            hex.len() == DIGEST_HEX
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        (digest_ok || is_literal_node(text)).then(|| NodeToken(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_literal_node(node_id: &str) -> bool {
    let bytes = node_id.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= MAX_LITERAL_NODE
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
        && bytes.iter().all(|b| alnum(b) || *b == b'-' || *b == b'.')
}

macro_rules! id_type {
    ($name:ident, $prefix:literal, $salt:literal) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The ID a create request with this name gets on this node.
            pub fn derive(name: &str, node: &NodeToken) -> Self {
                let uuid = Uuid::new_v5(&NAMESPACE, format!("{}:{name}", $salt).as_bytes());
                $name(format!("{}{}-{}", $prefix, uuid.simple(), node.as_str()))
            }

            /// Parses an ID from the wire; `None` when it cannot be one of ours.
            pub fn parse(text: &str) -> Option<Self> {
                let rest = text.strip_prefix($prefix)?;
                let (uuid, node) = (rest.get(..32)?, rest.get(32..)?);
                let node = node.strip_prefix('-')?;
                let uuid_ok = uuid
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                (uuid_ok && NodeToken::parse(node).is_some()).then(|| $name(text.to_owned()))
            }

            /// The node that owns it.
            pub fn node(&self) -> NodeToken {
                NodeToken(self.0[$prefix.len() + 33..].to_owned())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(text: String) -> Result<Self, String> {
                Self::parse(&text).ok_or_else(|| format!("malformed ID {text:?}"))
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

id_type!(VolumeId, "vol-", "volume");
id_type!(SnapshotId, "snap-", "snapshot");
id_type!(GroupSnapshotId, "grp-", "group-snapshot");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivation_is_stable_and_name_specific() {
        let node = NodeToken::for_node("worker-1");
        let a = VolumeId::derive("pvc-1", &node);
        assert_eq!(a, VolumeId::derive("pvc-1", &node));
        assert_ne!(a, VolumeId::derive("pvc-2", &node));
        assert!(a.as_str().starts_with("vol-") && a.as_str().ends_with("-worker-1"));
        assert_eq!(a.node(), node);
    }

    #[test]
    fn volume_and_snapshot_of_one_name_differ() {
        let node = NodeToken::for_node("n");
        let v = VolumeId::derive("x", &node);
        let s = SnapshotId::derive("x", &node);
        assert_ne!(v.as_str()[4..36], s.as_str()[5..37]);
    }

    #[test]
    fn round_trips_through_parse() {
        let node = NodeToken::for_node("kind-worker2.example.com");
        let id = SnapshotId::derive("snapshot-abc", &node);
        assert_eq!(SnapshotId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(VolumeId::parse(id.as_str()), None);
    }

    #[test]
    fn long_or_odd_node_names_become_digests_within_128_bytes() {
        for node_id in ["N", &"a".repeat(256), "node_with_underscore", "-x", "x-"] {
            let token = NodeToken::for_node(node_id);
            assert!(token.as_str().starts_with('_'), "{node_id}");
            let id = VolumeId::derive(&"n".repeat(128), &token);
            assert!(id.as_str().len() <= 128);
            assert_eq!(VolumeId::parse(id.as_str()).unwrap().node(), token);
        }
        let longest = VolumeId::derive("n", &NodeToken::for_node(&"a".repeat(63)));
        assert!(longest.as_str().len() <= 128);
    }

    #[test]
    fn rejects_anything_malformed() {
        let good = VolumeId::derive("n", &NodeToken::for_node("node")).to_string();
        let bad = [
            "",
            "vol-",
            "vol-../../etc/passwd",
            "vol-0123456789abcdef0123456789abcdef",
            "vol-0123456789abcdef0123456789abcdef-",
            "vol-0123456789ABCDEF0123456789abcdef-node",
            "vol-0123456789abcdef0123456789abcdef-no/de",
            "vol-0123456789abcdef0123456789abcdef-_abc",
            "some-id",
            &format!("{good}/x"),
            &format!("{good} "),
        ];
        for text in bad {
            assert_eq!(VolumeId::parse(text), None, "{text:?}");
        }
        assert!(VolumeId::parse(&good).is_some());
    }
}
