//! The filesystems kura makes on volumes: a closed set, parsed once where a name
//! enters (the command line, a request, blkid or mountinfo) and matched on everywhere
//! else.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
    Btrfs,
}

impl FsType {
    pub const ALL: [FsType; 3] = [FsType::Ext4, FsType::Xfs, FsType::Btrfs];

    /// The name mount(2), mkfs and blkid use.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
        }
    }

    /// The smallest device `mkfs` accepts.
    pub fn minimum_size(self) -> u64 {
        match self {
            FsType::Ext4 => 0,
            FsType::Xfs => 300 << 20,
            FsType::Btrfs => 114_294_784,
        }
    }

    /// Every name, for messages: "ext4, xfs, btrfs".
    pub fn names() -> String {
        FsType::ALL.map(FsType::as_str).join(", ")
    }
}

impl std::fmt::Display for FsType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for FsType {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        FsType::ALL
            .into_iter()
            .find(|fs| fs.as_str() == name)
            .ok_or_else(|| format!("{name:?} is not one of {}", FsType::names()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_others_are_refused() {
        for fs in FsType::ALL {
            assert_eq!(fs.as_str().parse::<FsType>(), Ok(fs));
            assert_eq!(serde_json::to_string(&fs).unwrap(), format!("\"{fs}\""));
        }
        assert_eq!(
            "ext3".parse::<FsType>(),
            Err("\"ext3\" is not one of ext4, xfs, btrfs".to_owned())
        );
    }
}
