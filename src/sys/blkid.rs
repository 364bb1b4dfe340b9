//! What is on a block device, as `blkid` low-level probing reports it.

use std::path::Path;

use super::{Result, cmd};

/// A signature found on a device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Signature {
    /// Filesystem or other superblock type (`xfs`, `ext4`, `swap`, ...), if any.
    pub fs_type: Option<String>,
    /// Partition table type (`gpt`, `dos`), if any.
    pub partition_table: Option<String>,
    pub label: Option<String>,
}

/// Probes `device`; `None` when it carries no known signature at all.
pub fn probe(device: &Path) -> Result<Option<Signature>> {
    let device = device.to_string_lossy();
    // Exit status 2 means nothing was found.
    let output = cmd::run_accepting("blkid", &["-p", "-o", "export", &device], &[0, 2])?;
    if output.status.code() == Some(2) {
        return Ok(None);
    }
    Ok(Some(parse_export(&String::from_utf8_lossy(&output.stdout))))
}

/// Parses `blkid -o export` output (`KEY=value` lines).
pub fn parse_export(text: &str) -> Signature {
    let mut sig = Signature::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = Some(value.to_owned());
        match key {
            "TYPE" => sig.fs_type = value,
            "PTTYPE" => sig.partition_table = value,
            "LABEL" => sig.label = value,
            _ => {}
        }
    }
    sig
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_filesystem_and_label() {
        let sig = parse_export(
            "DEVNAME=/dev/loop3\nLABEL=kura-pool\nUUID=4b1c\nBLOCK_SIZE=512\nTYPE=xfs\nUSAGE=filesystem\n",
        );
        assert_eq!(sig.fs_type.as_deref(), Some("xfs"));
        assert_eq!(sig.label.as_deref(), Some("kura-pool"));
        assert_eq!(sig.partition_table, None);
    }

    #[test]
    fn reads_partition_table() {
        let sig = parse_export("DEVNAME=/dev/sdb\nPTUUID=ab\nPTTYPE=gpt\n");
        assert_eq!(sig.partition_table.as_deref(), Some("gpt"));
        assert_eq!(sig.fs_type, None);
    }
}
