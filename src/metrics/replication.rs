//! Replication's series, read at every scrape from the volume's node: how far behind
//! each replica is, and how much it was sent.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;

use super::pool::gauge;
use crate::node::Local;
use crate::pool::Timestamp;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    node: String,
    volume_id: String,
    replica: String,
}

/// One (volume, replica node) of this node's replicated volumes.
struct Series {
    labels: ReplicaLabels,
    /// Seconds since the point the replica holds was taken (since the volume was
    /// created, while it holds none).
    lag: u64,
    /// The volume's interval, beside each lag with the same labels, so an alert can
    /// compare the two series one to one (the interval differs by volume and may be
    /// modified).
    interval: u64,
    shipped: u64,
}

/// Collects the replication series of this node's volumes at every scrape.
pub struct ReplicationCollector {
    local: Local,
}

impl std::fmt::Debug for ReplicationCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationCollector")
            .finish_non_exhaustive()
    }
}

impl ReplicationCollector {
    pub fn new(local: Local) -> Self {
        ReplicationCollector { local }
    }

    fn read(&self) -> Result<Vec<Series>, crate::pool::Error> {
        let pool = self.local.pool();
        let now = Timestamp::now().seconds;
        let mut out = Vec::new();
        for id in pool.replicated_volumes()? {
            let Ok(volume) = pool.volume(&id) else {
                continue;
            };
            let Some(replication) = &volume.replication else {
                continue;
            };
            let points = pool.points(&id)?;
            for replica in replication.nodes() {
                let since = points
                    .shipped
                    .get(replica)
                    .map_or(volume.created, |s| s.taken);
                let state = self.local.replica_states().get(&id, replica);
                out.push(Series {
                    labels: ReplicaLabels {
                        node: self.local.node_id().to_owned(),
                        volume_id: id.to_string(),
                        replica: replica.to_owned(),
                    },
                    lag: (now - since.seconds).max(0) as u64,
                    interval: replication.interval_secs,
                    shipped: state.bytes_shipped,
                });
            }
        }
        Ok(out)
    }
}

impl Collector for ReplicationCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let series = match self.read() {
            Ok(series) => series,
            Err(e) => {
                tracing::warn!(error = %crate::chain(&e), "metrics: cannot read replication");
                return Ok(());
            }
        };
        let column = |value: fn(&Series) -> u64| -> Vec<(ReplicaLabels, u64)> {
            series
                .iter()
                .map(|s| (s.labels.clone(), value(s)))
                .collect()
        };
        gauge(
            &mut encoder,
            "kura_replica_lag_seconds",
            "Seconds since the point a replica holds was taken (since the volume was created, while it holds none), by volume and replica node",
            &column(|s| s.lag),
        )?;
        gauge(
            &mut encoder,
            "kura_replica_interval_seconds",
            "The replicated volume's interval between points, in seconds, by volume and replica node (the labels of kura_replica_lag_seconds)",
            &column(|s| s.interval),
        )?;
        let mut shipped = encoder.encode_descriptor(
            "kura_replica_shipped_bytes",
            "Data bytes this node sent a replica node since it started, by volume and replica node",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for s in &series {
            ConstCounter::new(s.shipped).encode(shipped.encode_family(&s.labels)?)?;
        }
        Ok(())
    }
}
