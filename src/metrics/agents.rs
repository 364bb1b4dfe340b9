//! `kura_agent_up{node}`: which nodes' agents the controller sees live, read at every
//! scrape. One series per node found since start: 1 while its agent is live, 0 while
//! it is down. All-in-one reaches its one pool in-process: its own node, always 1.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use super::pool::{NodeLabel, gauge};
use crate::agent::cluster::Cluster;

/// Where the agents' states come from.
pub enum AgentsCollector {
    /// The controller's view of every agent it found.
    Cluster(Cluster),
    /// All-in-one: the process's own node.
    Local(String),
}

impl std::fmt::Debug for AgentsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentsCollector::Cluster(_) => f.write_str("AgentsCollector::Cluster"),
            AgentsCollector::Local(node) => write!(f, "AgentsCollector::Local({node})"),
        }
    }
}

impl Collector for AgentsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let agents = match self {
            AgentsCollector::Cluster(cluster) => cluster.agents(),
            AgentsCollector::Local(node) => vec![(node.clone(), true)],
        };
        let series: Vec<(NodeLabel, u64)> = agents
            .into_iter()
            .map(|(node, live)| (NodeLabel { node }, u64::from(live)))
            .collect();
        gauge(
            &mut encoder,
            "kura_agent_up",
            "1 while the controller sees this node's agent live, 0 while it is known but down",
            &series,
        )
    }
}
