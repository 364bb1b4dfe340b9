//! Where a new volume goes: a pure function of the live nodes, their free space and
//! the request's topology, so every controller replica places alike and a table test
//! covers every rule.
//!
//! - With a content source: the source's node (an instant reflink) if the requisite
//!   topology allows it; otherwise a node placed as below, other than the source's,
//!   where the source is copied across nodes.
//! - Otherwise, among the live nodes within requisite (all live nodes without one):
//!   the first preferred node with room for the volume, else the one with the most
//!   free space (ties to the first node by ID). With `--strict-topology` requisite and
//!   preferred are the one selected node: if it is down or full the answer is a
//!   refusal (RESOURCE_EXHAUSTED), and the scheduler picks again.
//! - Without requisite topology a node is chosen even when none has room: the pool's
//!   own check then says how much is missing.

use crate::agent::Node;

/// The topology a request asks for, by node ID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    /// `None` when the request names no requisite topology (any node will do);
    /// otherwise the nodes it allows (possibly none of kura's).
    pub requisite: Option<Vec<String>>,
    /// In order of preference.
    pub preferred: Vec<String>,
}

impl Topology {
    /// Whether a volume on `node` is accessible as the request requires.
    pub fn allows(&self, node: &str) -> bool {
        self.requisite
            .as_ref()
            .is_none_or(|r| r.iter().any(|n| n == node))
    }
}

/// A live node and the bytes a new volume may take there now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node: Node,
    pub free: u64,
}

/// Why no node can take the volume.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "no node within the requisite topology {requisite:?} has room for {needed} bytes \
         (most free: {most_free} bytes on {node})"
    )]
    NoRoom {
        requisite: Vec<String>,
        needed: u64,
        most_free: u64,
        node: String,
    },
    #[error("no live kura node among the requisite topologies {requisite:?}")]
    NoNodeInRequisite { requisite: Vec<String> },
    #[error("no live kura node can take a volume")]
    NoNode,
}

/// The node for a new volume of `needed` bytes. `source` is the live node holding the
/// request's content source, if it has one; `live` are the live nodes with their free
/// space, sorted by ID.
pub fn place(
    topology: &Topology,
    needed: u64,
    source: Option<&Node>,
    live: &[Candidate],
) -> Result<Node, Refusal> {
    if let Some(source) = source
        && topology.allows(&source.id)
    {
        return Ok(source.clone());
    }
    let allowed: Vec<&Candidate> = live
        .iter()
        .filter(|c| topology.allows(&c.node.id))
        // A copy goes to another node than its source's.
        .filter(|c| source.is_none_or(|s| c.node.token != s.token))
        .collect();
    let preferred_with_room = topology.preferred.iter().find_map(|id| {
        allowed
            .iter()
            .find(|c| c.node.id == *id && c.free >= needed)
    });
    if let Some(chosen) = preferred_with_room {
        return Ok(chosen.node.clone());
    }
    // Most free space; ties go to the first node by ID.
    let mut best: Option<&Candidate> = None;
    for candidate in allowed {
        if best.is_none_or(|b| candidate.free > b.free) {
            best = Some(candidate);
        }
    }
    match (best, &topology.requisite) {
        (Some(best), None) => Ok(best.node.clone()),
        (Some(best), Some(_)) if best.free >= needed => Ok(best.node.clone()),
        (Some(best), Some(requisite)) => Err(Refusal::NoRoom {
            requisite: requisite.clone(),
            needed,
            most_free: best.free,
            node: best.node.id.clone(),
        }),
        (None, Some(requisite)) => Err(Refusal::NoNodeInRequisite {
            requisite: requisite.clone(),
        }),
        (None, None) => Err(Refusal::NoNode),
    }
}

/// The nodes to hold `copies` copies of a volume on `home`: the nodes placed already
/// (in order, never `home`), then the live nodes with room for `needed` bytes, the most
/// free first. A placed node in `gone` (down too long, or full) gives its place to
/// another node, and keeps it where none can take it: an old copy beats none. Fewer
/// than `copies` when no more nodes can take one.
pub fn replica_nodes(
    copies: usize,
    home: &str,
    placed: &[String],
    gone: &[String],
    live: &[Candidate],
    needed: u64,
) -> Vec<String> {
    let kept: Vec<&String> = placed
        .iter()
        .filter(|n| n.as_str() != home)
        .take(copies)
        .collect();
    let mut chosen: Vec<String> = kept
        .iter()
        .filter(|n| !gone.contains(n))
        .map(|n| (*n).clone())
        .collect();
    let mut candidates: Vec<&Candidate> = live
        .iter()
        .filter(|c| c.node.id != home && !kept.contains(&&c.node.id) && c.free >= needed)
        .collect();
    // Most free first; ties to the first node by ID.
    candidates.sort_by(|a, b| b.free.cmp(&a.free).then_with(|| a.node.id.cmp(&b.node.id)));
    for candidate in candidates {
        if chosen.len() >= copies {
            break;
        }
        chosen.push(candidate.node.id.clone());
    }
    for node in kept.into_iter().filter(|n| gone.contains(n)) {
        if chosen.len() < copies {
            chosen.push(node.clone());
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::NodeToken;

    fn node(id: &str) -> Node {
        Node {
            id: id.to_owned(),
            token: NodeToken::for_node(id),
        }
    }

    fn live(nodes: &[(&str, u64)]) -> Vec<Candidate> {
        nodes
            .iter()
            .map(|&(id, free)| Candidate {
                node: node(id),
                free,
            })
            .collect()
    }

    fn topology(requisite: Option<&[&str]>, preferred: &[&str]) -> Topology {
        let owned = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect();
        Topology {
            requisite: requisite.map(owned),
            preferred: owned(preferred),
        }
    }

    /// A case, the request's topology, the bytes needed, the source's node, the live
    /// nodes, and the answer (a node ID, or the refusal's name).
    type Row = (
        &'static str,
        Topology,
        u64,
        Option<&'static str>,
        Vec<Candidate>,
        Result<&'static str, &'static str>,
    );

    #[test]
    fn places_by_the_rules() {
        const GIB: u64 = 1 << 30;
        let three = [("a", 5 * GIB), ("b", 9 * GIB), ("c", 2 * GIB)];
        // (case, topology, needed, source node, live nodes, the answer)
        let rows: Vec<Row> = vec![
            (
                "no topology: most free",
                topology(None, &[]),
                GIB,
                None,
                live(&three),
                Ok("b"),
            ),
            (
                "no topology, none has room: most free anyway (the pool says no)",
                topology(None, &[]),
                20 * GIB,
                None,
                live(&three),
                Ok("b"),
            ),
            (
                "no topology, no live node",
                topology(None, &[]),
                GIB,
                None,
                vec![],
                Err("NoNode"),
            ),
            (
                "preferred with room first",
                topology(Some(&["a", "b", "c"]), &["c", "a"]),
                GIB,
                None,
                live(&three),
                Ok("c"),
            ),
            (
                "preferred full: the next preferred",
                topology(Some(&["a", "b", "c"]), &["c", "a"]),
                3 * GIB,
                None,
                live(&three),
                Ok("a"),
            ),
            (
                "no preferred has room: most free within requisite",
                topology(Some(&["a", "c"]), &["c"]),
                4 * GIB,
                None,
                live(&three),
                Ok("a"),
            ),
            (
                "requisite only",
                topology(Some(&["a", "c"]), &[]),
                GIB,
                None,
                live(&three),
                Ok("a"),
            ),
            (
                "requisite full",
                topology(Some(&["a", "c"]), &[]),
                6 * GIB,
                None,
                live(&three),
                Err("NoRoom"),
            ),
            (
                "requisite names no kura node",
                topology(Some(&[]), &[]),
                GIB,
                None,
                live(&three),
                Err("NoNodeInRequisite"),
            ),
            (
                "strict WaitForFirstConsumer: the selected node",
                topology(Some(&["c"]), &["c"]),
                GIB,
                None,
                live(&three),
                Ok("c"),
            ),
            (
                "strict WaitForFirstConsumer, selected node full",
                topology(Some(&["c"]), &["c"]),
                3 * GIB,
                None,
                live(&three),
                Err("NoRoom"),
            ),
            (
                "strict WaitForFirstConsumer, selected node down",
                topology(Some(&["c"]), &["c"]),
                GIB,
                None,
                live(&[("a", 5 * GIB), ("b", 9 * GIB)]),
                Err("NoNodeInRequisite"),
            ),
            (
                "a down node is never chosen",
                topology(None, &["c"]),
                GIB,
                None,
                live(&[("a", 5 * GIB)]),
                Ok("a"),
            ),
            (
                "down nodes only report 0 free: a live node with room wins",
                topology(Some(&["a", "b"]), &["a"]),
                GIB,
                None,
                live(&[("a", 0), ("b", 2 * GIB)]),
                Ok("b"),
            ),
            (
                "ties go to the first node by ID",
                topology(None, &[]),
                GIB,
                None,
                live(&[("a", GIB), ("b", GIB)]),
                Ok("a"),
            ),
            (
                "source node allowed: there, even when full",
                topology(Some(&["c"]), &[]),
                8 * GIB,
                Some("c"),
                live(&three),
                Ok("c"),
            ),
            (
                "source node outside requisite: copied to another node",
                topology(Some(&["a", "c"]), &[]),
                GIB,
                Some("b"),
                live(&three),
                Ok("a"),
            ),
            (
                "a copy never lands on the source's node",
                topology(Some(&["b", "c"]), &["b"]),
                GIB,
                Some("a"),
                live(&three),
                Ok("b"),
            ),
        ];
        for (case, topology, needed, source, live, want) in rows {
            let source = source.map(node);
            let got = place(&topology, needed, source.as_ref(), &live);
            let got = match &got {
                Ok(node) => Ok(node.id.as_str()),
                Err(Refusal::NoRoom { .. }) => Err("NoRoom"),
                Err(Refusal::NoNodeInRequisite { .. }) => Err("NoNodeInRequisite"),
                Err(Refusal::NoNode) => Err("NoNode"),
            };
            assert_eq!(got, want, "{case}");
        }
    }

    #[test]
    fn a_refusal_says_how_much_room_there_is() {
        let refused = place(
            &topology(Some(&["a"]), &["a"]),
            10,
            None,
            &live(&[("a", 4)]),
        )
        .unwrap_err();
        assert_eq!(
            refused.to_string(),
            "no node within the requisite topology [\"a\"] has room for 10 bytes (most free: 4 bytes on a)"
        );
    }

    #[test]
    fn replica_nodes_table() {
        let live = |list: &[(&str, u64)]| -> Vec<Candidate> {
            list.iter()
                .map(|(id, free)| Candidate {
                    node: Node {
                        id: (*id).to_owned(),
                        token: crate::pool::NodeToken::for_node(id),
                    },
                    free: *free,
                })
                .collect()
        };
        let names = |list: &[&str]| -> Vec<String> { list.iter().map(|s| s.to_string()).collect() };
        let nodes = live(&[("a", 50), ("b", 10), ("c", 30), ("d", 30)]);
        // (copies, home, placed, gone, needed) -> chosen
        type Case<'a> = (
            usize,
            &'a str,
            &'a [&'a str],
            &'a [&'a str],
            u64,
            &'a [&'a str],
        );
        let cases: &[Case] = &[
            // Most free first, never the home node.
            (2, "a", &[], &[], 5, &["c", "d"]),
            (1, "c", &[], &[], 5, &["a"]),
            // Room: b cannot take 20 bytes.
            (3, "a", &[], &[], 20, &["c", "d"]),
            // Placed nodes stay, in order, even when another has more room.
            (2, "a", &["b"], &[], 5, &["b", "c"]),
            // A gone node is replaced; where no node can take its copy, it keeps it.
            (1, "a", &["b"], &["b"], 5, &["c"]),
            (1, "a", &["b"], &["b"], 40, &["b"]),
            (2, "a", &["b", "c"], &["b"], 35, &["c", "b"]),
            // Fewer copies asked: the first placed are kept.
            (1, "a", &["d", "c"], &[], 5, &["d"]),
            // No node but home: none (degraded).
            (2, "a", &[], &[], 100, &[]),
            // The home node is never its own replica, placed or not.
            (1, "a", &["a"], &[], 5, &["c"]),
        ];
        for (copies, home, placed, gone, needed, want) in cases {
            assert_eq!(
                replica_nodes(*copies, home, &names(placed), &names(gone), &nodes, *needed),
                names(want),
                "copies {copies} home {home} placed {placed:?} gone {gone:?}"
            );
        }
    }
}
