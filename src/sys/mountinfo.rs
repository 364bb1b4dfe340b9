//! Reading `/proc/self/mountinfo`. Parsing is a pure function tested on fixture text.

use std::path::{Path, PathBuf};

use super::{Error, Result};

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted filesystem's device.
    pub major: u32,
    pub minor: u32,
    /// The path inside that filesystem that is mounted (a bind mount's source).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `noatime`, ...).
    pub options: Vec<String>,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    /// Whether this mounts the filesystem on `device` (whose numbers are `numbers`).
    /// btrfs reports an anonymous device number, so the source path counts too.
    pub fn is_from(&self, device: &Path, numbers: (u32, u32)) -> bool {
        (self.major, self.minor) == numbers || Path::new(&self.source) == device
    }

    pub fn is_read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// The current mount table of this process's mount namespace.
pub fn read() -> Result<Vec<MountEntry>> {
    let path = "/proc/self/mountinfo";
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    parse(&text)
}

/// The topmost mount at `mount_point`, if any.
pub fn find_mount(table: &[MountEntry], mount_point: &Path) -> Option<MountEntry> {
    table
        .iter()
        .rev()
        .find(|m| m.mount_point == mount_point)
        .cloned()
}

/// Parses mountinfo text (see proc(5)).
pub fn parse(text: &str) -> Result<Vec<MountEntry>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Result<MountEntry> {
    let bad = || Error::Parse {
        what: "mountinfo line",
        detail: line.to_owned(),
    };
    let (before, after) = line.split_once(" - ").ok_or_else(bad)?;
    let fields: Vec<&str> = before.split(' ').collect();
    let tail: Vec<&str> = after.split(' ').collect();
    if fields.len() < 6 || tail.len() < 2 {
        return Err(bad());
    }
    let (major, minor) = fields[2].split_once(':').ok_or_else(bad)?;
    Ok(MountEntry {
        major: major.parse().map_err(|_| bad())?,
        minor: minor.parse().map_err(|_| bad())?,
        root: PathBuf::from(unescape(fields[3])),
        mount_point: PathBuf::from(unescape(fields[4])),
        options: fields[5].split(',').map(str::to_owned).collect(),
        fs_type: tail[0].to_owned(),
        source: unescape(tail[1]),
    })
}

/// Undoes the kernel's octal escaping of space, tab, newline and backslash.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(value) = u8::from_str_radix(digits, 8) {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = "\
22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
35 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw,size=10240k
120 22 7:3 / /var/lib/kura/pool rw,noatime shared:60 - xfs /dev/loop3 rw,attr2,inode64
121 22 7:4 / /tmp/stage\\040dir rw,relatime shared:61 - ext4 /dev/loop4 rw
122 22 7:4 / /tmp/target ro,relatime shared:61 - ext4 /dev/loop4 rw
123 22 0:5 /loop4 /tmp/block-target rw,nosuid shared:2 - devtmpfs udev rw,size=10240k
";

    #[test]
    fn parses_every_line() {
        let table = parse(FIXTURE).unwrap();
        assert_eq!(table.len(), 6);
        let pool = &table[2];
        assert_eq!((pool.major, pool.minor), (7, 3));
        assert_eq!(pool.mount_point, Path::new("/var/lib/kura/pool"));
        assert_eq!(pool.fs_type, "xfs");
        assert_eq!(pool.source, "/dev/loop3");
        assert!(!pool.is_read_only());
    }

    #[test]
    fn unescapes_spaces_in_paths() {
        let table = parse(FIXTURE).unwrap();
        assert_eq!(table[3].mount_point, Path::new("/tmp/stage dir"));
    }

    #[test]
    fn reads_bind_mount_root_and_read_only() {
        let table = parse(FIXTURE).unwrap();
        assert!(table[4].is_read_only());
        assert_eq!(table[5].root, Path::new("/loop4"));
    }

    #[test]
    fn finds_topmost_mount() {
        let table = parse(FIXTURE).unwrap();
        let m = find_mount(&table, Path::new("/tmp/target")).unwrap();
        assert_eq!(m.source, "/dev/loop4");
        assert!(find_mount(&table, Path::new("/tmp/nothing")).is_none());
    }

    #[test]
    fn recognises_a_device_by_number_or_source() {
        let table = parse(FIXTURE).unwrap();
        let pool = &table[2];
        assert!(pool.is_from(Path::new("/dev/other"), (7, 3)));
        assert!(pool.is_from(Path::new("/dev/loop3"), (0, 99)));
        assert!(!pool.is_from(Path::new("/dev/loop4"), (7, 4)));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("not a mountinfo line").is_err());
        assert!(parse("1 2 x / / rw - ext4 /dev/x rw").is_err());
    }

    #[test]
    fn leaves_lone_backslashes_alone() {
        assert_eq!(unescape("a\\b"), "a\\b");
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("end\\04"), "end\\04");
    }
}
