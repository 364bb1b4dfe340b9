//! The pool's gauges, read at every scrape: nothing is cached, so a scrape shows the
//! pool as it is.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::pool::Pool;
use crate::pool::cbt::Method;
use crate::sys;

/// What a scrape reports of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolFacts {
    pub size_bytes: u64,
    pub available_bytes: u64,
    pub healthy_volumes: u64,
    pub abnormal_volumes: u64,
    pub snapshots: u64,
    /// Loop devices bound to one of the pool's volume images (same device and inode).
    pub attached: u64,
    /// The host filesystem holding an image pool's image: size and available bytes.
    pub host: Option<(u64, u64)>,
    /// Deltas answered since the process started, by how they were found.
    pub deltas: [(Method, u64); 2],
}

impl PoolFacts {
    /// Reads the pool. Blocks.
    pub fn read(pool: &Pool, root: &std::path::Path) -> Result<PoolFacts, crate::pool::Error> {
        let usage = sys::fs::usage(root)?;
        let volumes = pool.list_volumes(None, usize::MAX);
        let abnormal = volumes.iter().filter(|(_, c)| c.abnormal).count() as u64;
        let images: HashSet<(u64, u64)> = volumes
            .iter()
            .filter_map(|(v, _)| std::fs::metadata(pool.image_path(&v.id)).ok())
            .map(|meta| (meta.dev(), meta.ino()))
            .collect();
        let attached = sys::loopdev::list_bound()?
            .iter()
            .filter(|d| images.contains(&(d.backing_dev, d.backing_ino)))
            .count() as u64;
        Ok(PoolFacts {
            size_bytes: usage.total_bytes,
            available_bytes: usage.available_bytes,
            healthy_volumes: volumes.len() as u64 - abnormal,
            abnormal_volumes: abnormal,
            snapshots: pool.list_snapshots(None, usize::MAX, None).len() as u64,
            attached,
            host: pool
                .host_usage()?
                .map(|u| (u.total_bytes, u.available_bytes)),
            deltas: pool.deltas.counts(),
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct NodeLabel {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    node: String,
    condition: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    node: String,
    method: &'static str,
}

/// Collects [`PoolFacts`] at every scrape.
#[derive(Debug)]
pub struct PoolCollector {
    pool: Arc<Pool>,
    root: PathBuf,
    node: String,
}

impl PoolCollector {
    pub fn new(pool: Arc<Pool>, root: PathBuf, node: &str) -> Self {
        PoolCollector {
            pool,
            root,
            node: node.to_owned(),
        }
    }
}

/// Encodes one gauge with the given series.
pub(super) fn gauge<S: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(S, u64)],
) -> Result<(), std::fmt::Error> {
    let first = ConstGauge::new(0i64);
    let mut metric = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, value) in series {
        let value = i64::try_from(*value).unwrap_or(i64::MAX);
        ConstGauge::new(value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let facts = match PoolFacts::read(&self.pool, &self.root) {
            Ok(facts) => facts,
            Err(e) => {
                // A scrape still serves the other metrics; the pool's own health shows
                // in Probe (and so in the liveness probe).
                tracing::warn!(error = %crate::chain(&e), "metrics: cannot read the pool");
                return Ok(());
            }
        };
        let node = || NodeLabel {
            node: self.node.clone(),
        };
        gauge(
            &mut encoder,
            "kura_pool_size_bytes",
            "Size of the pool's filesystem",
            &[(node(), facts.size_bytes)],
        )?;
        gauge(
            &mut encoder,
            "kura_pool_available_bytes",
            "Bytes available in the pool's filesystem",
            &[(node(), facts.available_bytes)],
        )?;
        let volumes = |condition| VolumeLabels {
            node: self.node.clone(),
            condition,
        };
        gauge(
            &mut encoder,
            "kura_volumes",
            "Volumes in the pool, by condition (abnormal: image missing, short or unreadable, or metadata unreadable)",
            &[
                (volumes("healthy"), facts.healthy_volumes),
                (volumes("abnormal"), facts.abnormal_volumes),
            ],
        )?;
        gauge(
            &mut encoder,
            "kura_snapshots",
            "Snapshots in the pool",
            &[(node(), facts.snapshots)],
        )?;
        gauge(
            &mut encoder,
            "kura_attached_loop_devices",
            "Loop devices attached to the pool's volumes",
            &[(node(), facts.attached)],
        )?;
        if let Some((size, available)) = facts.host {
            gauge(
                &mut encoder,
                "kura_pool_host_filesystem_size_bytes",
                "Size of the host filesystem holding the pool's image (--pool-image)",
                &[(node(), size)],
            )?;
            gauge(
                &mut encoder,
                "kura_pool_host_filesystem_available_bytes",
                "Bytes available on the host filesystem holding the pool's image (--pool-image)",
                &[(node(), available)],
            )?;
        }
        let mut deltas = encoder.encode_descriptor(
            "kura_snapshot_deltas",
            "GetMetadataDelta streams answered, by method: extents (shared extents of reflinks) or data (compared block by block)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (method, count) in facts.deltas {
            let labels = MethodLabels {
                node: self.node.clone(),
                method: method.as_str(),
            };
            ConstCounter::new(count).encode(deltas.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Format, Metrics};

    #[test]
    fn deltas_are_counted_by_method() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Arc::new(Pool::open(dir.path(), "n", Default::default()).unwrap());
        pool.deltas.record(Method::Extents);
        pool.deltas.record(Method::Extents);
        pool.deltas.record(Method::Data);
        let metrics =
            Metrics::new().with_pool(PoolCollector::new(pool, dir.path().to_owned(), "n"));
        let text = metrics.encode(Format::Prometheus).unwrap();
        for line in [
            "kura_snapshot_deltas_total{node=\"n\",method=\"extents\"} 2",
            "kura_snapshot_deltas_total{node=\"n\",method=\"data\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
