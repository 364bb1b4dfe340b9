//! Prometheus metrics: what every role serves at `/metrics` on `--metrics-listen`.
//!
//! - `csi_plugin_operations_seconds{driver_name,method_name,grpc_status_code}`: every
//!   CSI call, counted once when its answer is complete, with the buckets and labels
//!   of csi-lib-utils (the sidecars' `csi_sidecar_operations_seconds`), so the
//!   sidecars' dashboards work unchanged. `method_name` is the full gRPC path
//!   (`/csi.v1.Controller/CreateVolume`), `grpc_status_code` grpc-go's name of the code
//!   (`OK`, `NotFound`, `Canceled`, ...).
//! - `kura_agent_operations_seconds{method_name,grpc_status_code}`: every agent call
//!   as the node serves it (`kura node` only; the status stream is not a call and is
//!   not counted). Measured where the pool work runs, so a slow node shows as that
//!   node; the controller's own view of an unreachable agent is the `Unavailable`
//!   code of its CSI calls.
//! - `kura_pool_size_bytes`, `kura_pool_available_bytes`, `kura_volumes{condition}`,
//!   `kura_snapshots`, `kura_attached_loop_devices`, each with a `node` label: read
//!   from the pool at scrape time (all-in-one and node).
//! - `kura_pool_host_filesystem_size_bytes`, `kura_pool_host_filesystem_available_bytes`
//!   (`node`): the host filesystem holding an image pool's image; absent for device
//!   and directory pools.
//! - `kura_agent_up{node}`: the agents the controller sees live (1) or down (0);
//!   all-in-one reports its own node, always 1.
//! - `kura_build_info{version,revision}`: always 1, on every role.
//! - `kura_snapshot_deltas_total{node,method}`: GetMetadataDelta streams answered on
//!   this node, `method` `extents` or `data` (see [`crate::pool::cbt`]).
//! - `kura_replica_lag_seconds{node,volume_id,replica}`: on a replicated volume's node,
//!   seconds since the point each replica holds was taken;
//!   `kura_replica_interval_seconds{node,volume_id,replica}`, the volume's interval
//!   under the same labels (an alert compares lag with it); and
//!   `kura_replica_shipped_bytes_total{node,volume_id,replica}`, data bytes sent to it
//!   since the process started (see [`crate::node::replication`]).
//!
//! [`grpc`] is the tower layer on the tonic servers; [`pool`] and [`agents`] the
//! scrape-time collectors; [`http`] the `/metrics` listener.

pub mod agents;
pub mod grpc;
pub mod http;
pub mod pool;
pub mod replication;

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// csi-lib-utils' buckets, in seconds.
pub const BUCKETS: [f64; 13] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 25.0, 50.0, 120.0, 300.0, 600.0,
];

/// The full gRPC path of the agent's status stream, which is not counted.
pub const AGENT_STATUS_METHOD: &str = "/kura.agent.v1.Agent/Status";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CsiLabels {
    pub driver_name: String,
    pub method_name: String,
    pub grpc_status_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    revision: String,
}

/// The source revision kura was built from (see build.rs).
pub const REVISION: &str = env!("KURA_REVISION");

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabels {
    pub method_name: String,
    pub grpc_status_code: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// One process's metrics.
pub struct Metrics {
    registry: Registry,
    csi: Histograms<CsiLabels>,
    agent: Option<Histograms<AgentLabels>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The CSI operations histogram and the build information; add the rest with the
    /// `with_*` methods.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                revision: REVISION.to_owned(),
            })
            .set(1);
        registry.register(
            "kura_build_info",
            "kura's version and the source revision it was built from; always 1",
            build,
        );
        let csi = Histograms::<CsiLabels>::new_with_constructor(histogram as fn() -> Histogram);
        registry.register(
            "csi_plugin_operations_seconds",
            "Time taken by CSI operations, by method and gRPC status code",
            csi.clone(),
        );
        Metrics {
            registry,
            csi,
            agent: None,
        }
    }

    /// Adds the agent operations histogram (`kura node`).
    pub fn with_agent(mut self) -> Self {
        let agent = Histograms::<AgentLabels>::new_with_constructor(histogram as fn() -> Histogram);
        self.registry.register(
            "kura_agent_operations_seconds",
            "Time taken by agent API calls served by this node, by method and gRPC status code",
            agent.clone(),
        );
        self.agent = Some(agent);
        self
    }

    /// Adds the cross-node transfer gauges (`kura node`): `kura_transfer_done_bytes`
    /// and `kura_transfer_total_bytes{volume_name}`, data bytes written so far and the
    /// source image's size, for each transfer running on this node.
    pub fn with_transfers(mut self, gauges: crate::node::transfer::TransferGauges) -> Self {
        self.registry.register(
            "kura_transfer_done_bytes",
            "Data bytes a running cross-node transfer has written on this node",
            gauges.done,
        );
        self.registry.register(
            "kura_transfer_total_bytes",
            "Size of the source image of a running cross-node transfer",
            gauges.total,
        );
        self
    }

    /// Adds `kura_agent_up`, read at every scrape.
    pub fn with_agents(mut self, collector: agents::AgentsCollector) -> Self {
        self.registry.register_collector(Box::new(collector));
        self
    }

    /// Adds the replication series, read at every scrape (`kura node`).
    pub fn with_replication(mut self, collector: replication::ReplicationCollector) -> Self {
        self.registry.register_collector(Box::new(collector));
        self
    }

    /// Adds the pool gauges, read at every scrape.
    pub fn with_pool(mut self, collector: pool::PoolCollector) -> Self {
        self.registry.register_collector(Box::new(collector));
        self
    }

    /// The layer that times every call of a CSI server.
    pub fn csi_layer(&self, driver_name: &str) -> grpc::Layer<grpc::CsiOperations> {
        grpc::Layer::new(grpc::CsiOperations {
            histograms: self.csi.clone(),
            driver_name: driver_name.to_owned(),
        })
    }

    /// The layer that times every call of the agent server. Its calls are exported
    /// only if [`Metrics::with_agent`] added the histogram.
    pub fn agent_layer(&self) -> grpc::Layer<grpc::AgentOperations> {
        let histograms = self.agent.clone().unwrap_or_else(|| {
            Histograms::<AgentLabels>::new_with_constructor(histogram as fn() -> Histogram)
        });
        grpc::Layer::new(grpc::AgentOperations { histograms })
    }

    /// The text exposition of every metric: OpenMetrics 1.0, or the Prometheus text
    /// format 0.0.4. Reads the pool (blocks).
    pub fn encode(&self, format: Format) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        match format {
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut text, &self.registry)?
            }
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?
            }
        }
        Ok(text)
    }

    pub fn into_shared(self) -> Arc<Metrics> {
        Arc::new(self)
    }
}

/// Which text format a scrape gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Prometheus,
}

impl Format {
    /// OpenMetrics when the scraper's `Accept` header asks for it (Prometheus does),
    /// else the Prometheus text format.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_use_csi_lib_utils_buckets_and_labels() {
        let metrics = Metrics::new();
        metrics
            .csi
            .get_or_create(&CsiLabels {
                driver_name: "kura.csi.dev".into(),
                method_name: "/csi.v1.Controller/CreateVolume".into(),
                grpc_status_code: "OK".into(),
            })
            .observe(0.3);
        let text = metrics.encode(Format::Prometheus).unwrap();
        assert!(
            text.contains("# TYPE csi_plugin_operations_seconds histogram"),
            "{text}"
        );
        let labels = r#"driver_name="kura.csi.dev",method_name="/csi.v1.Controller/CreateVolume",grpc_status_code="OK""#;
        // As the Go client prints them.
        for le in [
            "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "15", "25", "50", "120", "300", "600",
            "+Inf",
        ] {
            let expected = if le == "0.1" || le == "0.25" { 0 } else { 1 };
            let line =
                format!("csi_plugin_operations_seconds_bucket{{{labels},le=\"{le}\"}} {expected}");
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        assert!(text.contains(&format!(
            "csi_plugin_operations_seconds_count{{{labels}}} 1"
        )));
        assert!(!text.contains("kura_agent_operations_seconds"), "{text}");
    }

    #[test]
    fn formats_follow_the_accept_header() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::from_accept(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        let metrics = Metrics::new().with_agent();
        let agent = metrics.agent_layer();
        use grpc::Record;
        agent
            .record()
            .record("/kura.agent.v1.Agent/CreateVolume", "OK", 0.01);
        let text = metrics.encode(Format::OpenMetrics).unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE kura_agent_operations_seconds histogram"));
        assert!(text.contains(r#"kura_agent_operations_seconds_count{method_name="/kura.agent.v1.Agent/CreateVolume",grpc_status_code="OK"} 1"#), "{text}");
    }
}
