//! `kura inspect`: what is on this node, for an operator (text) or a script
//! (`--json`), from a survey of the pool and the attachments ([`crate::pool::survey`]).
//! Read-only: it runs in the node pod beside the serving `kura node`
//! (`kubectl exec -n kura ds/kura-node -c kura -- kura inspect`), takes no lock, runs
//! no recovery and changes nothing.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::cli::InspectArgs;
use crate::pool::Provisioning;
use crate::pool::survey::{Survey, survey};

/// The survey of the node `args` names, rendered as asked.
pub fn run(args: &InspectArgs) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    // Image and device pools are mounted at <state-dir>/pool; a --pool-dir is where it is.
    let root = args
        .pool_dir
        .clone()
        .unwrap_or_else(|| args.state_dir.join("pool"));
    if !root.is_dir() {
        return Err(format!(
            "no pool at {}: give the node's --state-dir (or --pool-dir), or KURA_STATE_DIR",
            root.display()
        )
        .into());
    }
    let found = survey(&root, &args.state_dir, args.pool_image.as_deref())?;
    Ok(if args.json {
        let mut text = serde_json::to_string_pretty(&found)?;
        text.push('\n');
        text
    } else {
        text(&found)
    })
}

/// Bytes as an operator reads them.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn mounted(yes: bool) -> &'static str {
    if yes { "mounted" } else { "NOT mounted" }
}

fn show(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map_or_else(|| "no loop device".to_owned(), |p| p.display().to_string())
}

/// The survey as text: one section per kind, problems last.
pub fn text(s: &Survey) -> String {
    let mut out = String::new();
    let now = crate::pool::Timestamp::now().seconds;
    let p = &s.pool;
    let _ = writeln!(
        out,
        "pool {} ({}): {} of {} available",
        p.root.display(),
        mounted(p.mounted),
        size(p.available_bytes),
        size(p.size_bytes)
    );
    if let Some(host) = &p.host {
        let _ = writeln!(
            out,
            "host filesystem under {}: {} of {} available",
            host.image.display(),
            size(host.available_bytes),
            size(host.size_bytes)
        );
    }
    let mut section = |title: &str, lines: Vec<String>| {
        let _ = writeln!(out, "\n{title} ({})", lines.len());
        for line in lines {
            let _ = writeln!(out, "  {line}");
        }
    };
    section(
        "VOLUMES",
        s.volumes
            .iter()
            .map(|v| {
                format!(
                    "{}  {:?}  {} {}  {}",
                    v.id,
                    v.name,
                    size(v.size_bytes),
                    match v.provisioning {
                        Provisioning::Thin => "thin",
                        Provisioning::Thick => "thick",
                    },
                    if v.abnormal { "ABNORMAL" } else { "healthy" }
                )
            })
            .collect(),
    );
    section(
        "SNAPSHOTS",
        s.snapshots
            .iter()
            .map(|x| {
                format!(
                    "{}  of {}  {}  {}{}",
                    x.id,
                    x.source_volume,
                    size(x.size_bytes),
                    if x.ready { "ready" } else { "NOT ready" },
                    x.group
                        .as_ref()
                        .map(|g| format!("  group {g}"))
                        .unwrap_or_default()
                )
            })
            .collect(),
    );
    section(
        "GROUP SNAPSHOTS",
        s.group_snapshots
            .iter()
            .map(|g| {
                format!(
                    "{}  {:?}  volumes {}  members {}",
                    g.id,
                    g.name,
                    g.sources.join(", "),
                    g.members.join(", ")
                )
            })
            .collect(),
    );
    section(
        "ATTACHMENTS",
        s.attachments
            .iter()
            .map(|a| {
                let mut line = format!(
                    "{}{}  {}  {}  staging {}",
                    a.volume_id,
                    if a.inline { " (inline)" } else { "" },
                    a.access,
                    show(&a.loop_device),
                    a.staging_path.display()
                );
                if a.access != "block" {
                    let _ = write!(line, " ({})", mounted(a.staging_mounted));
                }
                for t in &a.targets {
                    let _ = write!(
                        line,
                        "  target {} ({})",
                        t.path.display(),
                        mounted(t.mounted)
                    );
                }
                line
            })
            .collect(),
    );
    section(
        "COPIES ARRIVING (cross-node)",
        s.copies
            .iter()
            .map(|c| {
                format!(
                    "{}  {} of {} of data",
                    c.volume_id,
                    size(c.bytes_done),
                    size(c.size_bytes)
                )
            })
            .collect(),
    );
    section(
        "EXPORTS (sources pinned for copies to other nodes)",
        s.exports
            .iter()
            .map(|e| {
                format!(
                    "{}  {} for {} on node {}",
                    e.id, e.source, e.for_volume, e.destination_node
                )
            })
            .collect(),
    );
    let point = |p: &Option<u64>, taken: &Option<i64>| match (p, taken) {
        (Some(p), Some(t)) => format!("point {p}, {}s old", now - t),
        _ => "no point yet".to_owned(),
    };
    section(
        "REPLICATED (this node's volumes with copies on other nodes)",
        s.replicated
            .iter()
            .map(|r| {
                let replicas: Vec<String> = r
                    .replicas
                    .iter()
                    .map(|(node, p, t)| format!("{node}: {}", point(p, t)))
                    .collect();
                format!(
                    "{}  {} of {} copies every {}s; {}",
                    r.volume_id,
                    r.replicas.len(),
                    r.copies,
                    r.interval_secs,
                    replicas.join("; ")
                )
            })
            .collect(),
    );
    section(
        "REPLICAS (copies of other nodes' volumes held here)",
        s.replicas
            .iter()
            .map(|r| match r.deleted {
                true => format!(
                    "{}  of node {}: deleted while its node was down ({} snapshot copies kept)",
                    r.volume_id, r.source_node, r.snapshots
                ),
                false => format!(
                    "{}  of node {}: {}, {} snapshot copies",
                    r.volume_id,
                    r.source_node,
                    point(&r.point, &r.taken),
                    r.snapshots
                ),
            })
            .collect(),
    );
    section(
        "PROBLEMS",
        s.problems
            .iter()
            .map(|x| format!("{}: {}", x.subject, x.reason))
            .collect(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_an_operator_reads_them() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1 << 20), "1.0 MiB");
        assert_eq!(size(10 << 30), "10.0 GiB");
        assert_eq!(size(1536 << 20), "1.5 GiB");
    }
}
