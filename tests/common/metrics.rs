//! `/metrics` over plain HTTP, as Prometheus scrapes it: one request, and the series
//! of the answer by name and labels.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::DRIVER_NAME;
use super::cluster::free_port;

/// An HTTP answer: status code, headers (lower-case names) and body.
pub struct Answer {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

/// One HTTP/1.1 request over a fresh connection, read to its end.
pub async fn http_get(address: SocketAddr, path: &str, accept: Option<&str>) -> Answer {
    let mut stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(address),
    )
    .await
    .expect("connect in time")
    .expect("connect to /metrics");
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {address}\r\n{accept}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .unwrap();
    let text = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers end");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// Every series of a scrape, `name{labels}` -> value.
pub struct Scrape {
    pub series: HashMap<String, f64>,
    pub text: String,
}

impl Scrape {
    pub async fn of(address: SocketAddr) -> Scrape {
        let answer = http_get(address, "/metrics", None).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(
            answer.headers["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let series = answer
            .body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("series and value");
                (series.to_owned(), value.parse().expect("a number"))
            })
            .collect();
        Scrape {
            series,
            text: answer.body,
        }
    }

    pub fn value(&self, series: &str) -> Option<f64> {
        self.series.get(series).copied()
    }

    /// The value of a series that must be there.
    pub fn get(&self, series: &str) -> f64 {
        self.value(series)
            .unwrap_or_else(|| panic!("no series {series} in\n{}", self.text))
    }

    /// How many `csi_plugin_operations_seconds` observations have this method and code.
    pub fn csi_count(&self, method: &str, code: &str) -> f64 {
        self.value(&format!(
            "csi_plugin_operations_seconds_count{{driver_name=\"{DRIVER_NAME}\",method_name=\"{method}\",grpc_status_code=\"{code}\"}}"
        ))
        .unwrap_or(0.0)
    }

    pub fn agent_count(&self, method: &str, code: &str) -> f64 {
        self.value(&format!(
            "kura_agent_operations_seconds_count{{method_name=\"{method}\",grpc_status_code=\"{code}\"}}"
        ))
        .unwrap_or(0.0)
    }

    pub fn has_metric(&self, name: &str) -> bool {
        self.series.keys().any(|s| s.starts_with(name))
    }
}

/// A free address on the loopback for a process's `--metrics-listen`.
pub fn metrics_address() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port(Ipv4Addr::LOCALHOST)))
}
