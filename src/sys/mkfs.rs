//! Making and growing filesystems.

use std::path::Path;

use super::{Error, FsType, Result, cmd};

/// Formats `device` with `fs`, over whatever it holds: callers check first that the
/// device is blank (or holds only an interrupted format of kura's). With `encrypt`, an
/// ext4 that takes fscrypt policies (`-O encrypt`); only ext4 is made encryptable.
pub fn format(device: &Path, fs: FsType, encrypt: bool) -> Result<()> {
    if encrypt && fs != FsType::Ext4 {
        return Err(Error::Parse {
            what: "filesystem type",
            detail: format!("{fs} cannot be made with encryption; only ext4 is"),
        });
    }
    let device = device.to_string_lossy();
    match fs {
        // Lazy init keeps mkfs instant on large sparse volumes; the kernel zeroes the
        // inode tables in the background.
        FsType::Ext4 => {
            let mut args = vec![
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            ];
            if encrypt {
                args.extend(["-O", "encrypt"]);
            }
            args.push(&device);
            cmd::run("mkfs.ext4", &args)
        }
        // -f: a format interrupted by a crash may have left a signature behind.
        FsType::Xfs => cmd::run("mkfs.xfs", &["-q", "-f", "-K", &device]),
        FsType::Btrfs => cmd::run("mkfs.btrfs", &["-q", "-f", "-K", &device]),
    }?;
    Ok(())
}

/// Formats a pool device: XFS with reflink, labelled so kura recognises it later.
pub fn format_pool(device: &Path, label: &str) -> Result<()> {
    let device = device.to_string_lossy();
    cmd::run(
        "mkfs.xfs",
        &["-q", "-K", "-m", "reflink=1", "-L", label, &device],
    )?;
    Ok(())
}

/// Grows a mounted filesystem to fill its device. A kernel that refuses an online ext4
/// grow (EPERM without CAP_SYS_RESOURCE) is [`Error::GrowRefused`].
pub fn grow_online(fs: FsType, device: &Path, mount_point: &Path) -> Result<()> {
    let dev = device.to_string_lossy();
    let mount_point = mount_point.to_string_lossy();
    let result = match fs {
        FsType::Ext4 => cmd::run("resize2fs", &[&dev]),
        FsType::Xfs => cmd::run("xfs_growfs", &["-d", &mount_point]),
        FsType::Btrfs => cmd::run("btrfs", &["filesystem", "resize", "max", &mount_point]),
    };
    match result {
        Ok(_) => Ok(()),
        // resize2fs reports the kernel's EPERM as "Permission denied to resize
        // filesystem".
        Err(Error::Command { stderr, .. })
            if stderr.contains("Operation not permitted")
                || stderr.contains("Permission denied to resize") =>
        {
            Err(Error::GrowRefused {
                fs,
                device: device.to_owned(),
                stderr,
            })
        }
        Err(e) => Err(e),
    }
}

/// Grows an unmounted ext filesystem to fill its device. XFS and btrfs can only grow
/// mounted, so for them the caller mounts first and uses [`grow_online`].
pub fn grow_offline_ext(device: &Path) -> Result<()> {
    let device = device.to_string_lossy();
    // resize2fs insists on a freshly checked filesystem. e2fsck exits 1 when it fixed
    // something, which is not a failure.
    cmd::run_accepting("e2fsck", &["-f", "-p", &device], &[0, 1])?;
    cmd::run("resize2fs", &[&device])?;
    Ok(())
}

/// Size in bytes of the ext filesystem on `device`, from its superblock.
pub fn ext_size(device: &Path) -> Result<u64> {
    let output = cmd::run("dumpe2fs", &["-h", &device.to_string_lossy()])?;
    parse_ext_size(&String::from_utf8_lossy(&output.stdout))
}

fn parse_ext_size(text: &str) -> Result<u64> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    match (field("Block count:"), field("Block size:")) {
        (Some(count), Some(size)) => Ok(count * size),
        _ => Err(Error::Parse {
            what: "dumpe2fs output",
            detail: "no block count or block size".to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ext_size_from_dumpe2fs() {
        let text = "Filesystem volume name:   <none>\nBlock count:              262144\nReserved block count:     13107\nBlock size:               4096\n";
        assert_eq!(parse_ext_size(text).unwrap(), 1 << 30);
        assert!(parse_ext_size("nothing").is_err());
    }
}
