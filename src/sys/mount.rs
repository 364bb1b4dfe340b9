//! Mounting and unmounting, and which mount options a volume may be mounted with.
//!
//! # Guarantees
//!
//! - Every filesystem mounted through [`mount_fs`] is mounted `nosuid,nodev`, whatever
//!   options the caller passes: a volume's contents never gain privileges on the node.
//! - Every bind mount made through [`bind`] is `nosuid`, and `nodev` when asked (a raw
//!   block publication is a device node, which `nodev` would make unusable).

use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, umount2};

use super::{Error, FsType, Result, thread};

/// Set on every filesystem mount, after the caller's options, so nothing the caller
/// passes can undo them.
const HARDENING: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

/// How long a mount may take: one on a device that stopped answering hangs in the
/// kernel, and the volume's lock must not hang with it.
const MOUNT_DEADLINE: Duration = Duration::from_secs(120);

/// The generic (VFS) options, which mount(2) takes as flags rather than in its data
/// string: each sets (`true`) or clears (`false`) its flag, applied left to right as
/// mount(8) does.
const VFS_FLAGS: &[(&str, MsFlags, bool)] = &[
    ("ro", MsFlags::MS_RDONLY, true),
    ("rw", MsFlags::MS_RDONLY, false),
    ("noexec", MsFlags::MS_NOEXEC, true),
    ("exec", MsFlags::MS_NOEXEC, false),
    ("nosuid", MsFlags::MS_NOSUID, true),
    ("nodev", MsFlags::MS_NODEV, true),
    ("noatime", MsFlags::MS_NOATIME, true),
    ("atime", MsFlags::MS_NOATIME, false),
    ("nodiratime", MsFlags::MS_NODIRATIME, true),
    ("diratime", MsFlags::MS_NODIRATIME, false),
    ("relatime", MsFlags::MS_RELATIME, true),
    ("norelatime", MsFlags::MS_RELATIME, false),
    ("strictatime", MsFlags::MS_STRICTATIME, true),
    ("nostrictatime", MsFlags::MS_STRICTATIME, false),
    ("lazytime", MsFlags::MS_LAZYTIME, true),
    ("nolazytime", MsFlags::MS_LAZYTIME, false),
    ("sync", MsFlags::MS_SYNCHRONOUS, true),
    ("async", MsFlags::MS_SYNCHRONOUS, false),
    ("dirsync", MsFlags::MS_DIRSYNC, true),
    ("iversion", MsFlags::MS_I_VERSION, true),
    ("noiversion", MsFlags::MS_I_VERSION, false),
];

/// Splits mount options into mount(2)'s flags and its data string (the filesystem's
/// own options, in their order), with `nosuid,nodev` always set.
fn mount_args(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        match VFS_FLAGS.iter().find(|(name, ..)| name == option) {
            Some(&(_, flag, set)) => flags.set(flag, set),
            None => data.push(option.as_str()),
        }
    }
    (flags | HARDENING, data.join(","))
}

/// The caller's options with kura's defaults for `fs_type` where the caller did not
/// choose.
fn with_defaults(fs_type: FsType, options: &[String]) -> Vec<String> {
    let mut options = options.to_vec();
    let chose = |names: &[&str]| options.iter().any(|o| names.contains(&o.as_str()));
    match fs_type {
        // Snapshots and clones carry their source's filesystem UUID; XFS refuses to
        // mount a second filesystem with a UUID it already has mounted unless told not
        // to check.
        FsType::Xfs if !chose(&["nouuid"]) => options.push("nouuid".to_owned()),
        // ext4 zeroes the inode tables mkfs left uninitialised in the background, once
        // mounted. A volume's image reads as zeros wherever it was never written, so
        // they are zero already; and the loop driver turns each such zeroing into a
        // hole punched in the image, which takes a thick volume's inode tables out of
        // the space reserved for it (about 1.6% of its size; the first write of each
        // inode block then allocates in the pool, and the fsync after it forces the
        // pool's log). Measured in bench/README.md ("Where a commit's time goes").
        FsType::Ext4 if !chose(&["init_itable", "noinit_itable"]) => {
            options.insert(0, "noinit_itable".to_owned())
        }
        _ => {}
    }
    options
}

/// Mounts the filesystem on `device` at `target` with the given mount options, plus
/// `nosuid,nodev` and kura's defaults where the caller did not choose
/// ([`with_defaults`]). The options were checked against [`ALLOWED`]; they reach the kernel
/// straight through mount(2), without a mount(8) process (whose start costs more than
/// the mount itself when many volumes are staged at once).
pub fn mount_fs(device: &Path, target: &Path, fs_type: FsType, options: &[String]) -> Result<()> {
    let (flags, data) = mount_args(&with_defaults(fs_type, options));
    let (device, target) = (device.to_owned(), target.to_owned());
    let late = target.clone();
    thread::within(
        &format!("mounting {}", target.display()),
        MOUNT_DEADLINE,
        move || {
            nix::mount::mount(
                Some(&device),
                &target,
                Some(fs_type.as_str()),
                flags,
                Some(data.as_str()),
            )
            .map_err(|e| Error::errno("mount", &target, e))
        },
        // A mount that lands after its caller gave up is taken down again.
        move |()| {
            let _ = unmount(&late);
        },
    )
}

/// Per-mount flags of a bind mount. `nosuid` is always set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BindFlags {
    pub read_only: bool,
    pub no_dev: bool,
    pub no_exec: bool,
}

/// Bind-mounts `source` (a directory or a device node) on `target` with `flags`.
pub fn bind(source: &Path, target: &Path, flags: BindFlags) -> Result<()> {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| Error::errno("bind mount", target, e))?;
    // A bind mount takes its per-mount flags only from a remount; one without them
    // would also clear what the source mount had.
    let mut remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID;
    remount.set(MsFlags::MS_RDONLY, flags.read_only);
    remount.set(MsFlags::MS_NODEV, flags.no_dev);
    remount.set(MsFlags::MS_NOEXEC, flags.no_exec);
    if let Err(e) = nix::mount::mount(None::<&str>, target, None::<&str>, remount, None::<&str>) {
        // Do not leave a bind behind that lacks the flags asked for.
        let _ = umount2(target, MntFlags::empty());
        return Err(Error::errno("remount bind", target, e));
    }
    Ok(())
}

/// Unmounts `target`. A path that is not a mount point counts as done.
pub fn unmount(target: &Path) -> Result<()> {
    match umount2(target, MntFlags::empty()) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(Error::errno("unmount", target, e)),
    }
}

/// What may follow `=` in a mount option.
#[derive(Debug, Clone, Copy)]
enum Value {
    /// A bare flag: no `=`.
    Flag,
    /// A decimal number of up to 10 digits.
    Number,
    /// A number with an optional `k`, `m` or `g` suffix.
    Size,
    OneOf(&'static [&'static str]),
    /// btrfs compression: an algorithm, optionally `:level`.
    Compression,
    /// Either bare or with one of these values.
    FlagOr(&'static [&'static str]),
}

/// Generic (VFS) options: every filesystem takes them.
const ANY: &[FsType] = &[];
const ALL: &[FsType] = &FsType::ALL;
const EXT4: &[FsType] = &[FsType::Ext4];
const XFS: &[FsType] = &[FsType::Xfs];
const BTRFS: &[FsType] = &[FsType::Btrfs];
const EXT4_XFS: &[FsType] = &[FsType::Ext4, FsType::Xfs];
const EXT4_BTRFS: &[FsType] = &[FsType::Ext4, FsType::Btrfs];

/// The mount options a CO may ask for, and the filesystems that take each. Every one
/// changes only how the volume's own filesystem behaves; none reaches beyond the mount.
const ALLOWED: &[(&str, Value, &[FsType])] = &[
    // Generic (VFS) options.
    ("ro", Value::Flag, ANY),
    ("rw", Value::Flag, ANY),
    ("noexec", Value::Flag, ANY),
    ("exec", Value::Flag, ANY),
    ("nosuid", Value::Flag, ANY),
    ("nodev", Value::Flag, ANY),
    ("noatime", Value::Flag, ANY),
    ("atime", Value::Flag, ANY),
    ("nodiratime", Value::Flag, ANY),
    ("diratime", Value::Flag, ANY),
    ("relatime", Value::Flag, ANY),
    ("norelatime", Value::Flag, ANY),
    ("strictatime", Value::Flag, ANY),
    ("nostrictatime", Value::Flag, ANY),
    ("lazytime", Value::Flag, ANY),
    ("nolazytime", Value::Flag, ANY),
    ("sync", Value::Flag, ANY),
    ("async", Value::Flag, ANY),
    ("dirsync", Value::Flag, ANY),
    ("iversion", Value::Flag, ANY),
    ("noiversion", Value::Flag, ANY),
    ("discard", Value::FlagOr(&["sync", "async"]), ALL),
    ("nodiscard", Value::Flag, ALL),
    ("acl", Value::Flag, EXT4_BTRFS),
    ("noacl", Value::Flag, EXT4_BTRFS),
    ("barrier", Value::FlagOr(&["0", "1"]), EXT4_BTRFS),
    ("nobarrier", Value::Flag, EXT4_BTRFS),
    ("commit", Value::Number, EXT4_BTRFS),
    ("usrquota", Value::Flag, EXT4_XFS),
    ("grpquota", Value::Flag, EXT4_XFS),
    ("prjquota", Value::Flag, EXT4_XFS),
    ("noquota", Value::Flag, EXT4_XFS),
    // ext4.
    (
        "data",
        Value::OneOf(&["journal", "ordered", "writeback"]),
        EXT4,
    ),
    ("errors", Value::OneOf(&["continue", "remount-ro"]), EXT4),
    ("user_xattr", Value::Flag, EXT4),
    ("journal_checksum", Value::Flag, EXT4),
    ("nojournal_checksum", Value::Flag, EXT4),
    ("journal_async_commit", Value::Flag, EXT4),
    ("delalloc", Value::Flag, EXT4),
    ("nodelalloc", Value::Flag, EXT4),
    ("auto_da_alloc", Value::Flag, EXT4),
    ("noauto_da_alloc", Value::Flag, EXT4),
    ("dioread_nolock", Value::Flag, EXT4),
    ("dioread_lock", Value::Flag, EXT4),
    ("block_validity", Value::Flag, EXT4),
    ("noblock_validity", Value::Flag, EXT4),
    ("init_itable", Value::Flag, EXT4),
    ("noinit_itable", Value::Flag, EXT4),
    ("stripe", Value::Number, EXT4),
    ("inode_readahead_blks", Value::Number, EXT4),
    ("max_batch_time", Value::Number, EXT4),
    ("min_batch_time", Value::Number, EXT4),
    ("quota", Value::Flag, EXT4),
    // XFS.
    ("nouuid", Value::Flag, XFS),
    ("inode32", Value::Flag, XFS),
    ("inode64", Value::Flag, XFS),
    ("largeio", Value::Flag, XFS),
    ("nolargeio", Value::Flag, XFS),
    ("allocsize", Value::Size, XFS),
    ("logbufs", Value::Number, XFS),
    ("logbsize", Value::Size, XFS),
    ("noalign", Value::Flag, XFS),
    ("swalloc", Value::Flag, XFS),
    ("sunit", Value::Number, XFS),
    ("swidth", Value::Number, XFS),
    ("wsync", Value::Flag, XFS),
    ("filestreams", Value::Flag, XFS),
    ("ikeep", Value::Flag, XFS),
    ("noikeep", Value::Flag, XFS),
    ("uquota", Value::Flag, XFS),
    ("uqnoenforce", Value::Flag, XFS),
    ("gquota", Value::Flag, XFS),
    ("gqnoenforce", Value::Flag, XFS),
    ("pquota", Value::Flag, XFS),
    ("pqnoenforce", Value::Flag, XFS),
    ("qnoenforce", Value::Flag, XFS),
    // btrfs.
    ("compress", Value::Compression, BTRFS),
    ("compress-force", Value::Compression, BTRFS),
    ("autodefrag", Value::Flag, BTRFS),
    ("noautodefrag", Value::Flag, BTRFS),
    ("ssd", Value::Flag, BTRFS),
    ("nossd", Value::Flag, BTRFS),
    ("ssd_spread", Value::Flag, BTRFS),
    ("nossd_spread", Value::Flag, BTRFS),
    ("space_cache", Value::FlagOr(&["v1", "v2"]), BTRFS),
    ("nospace_cache", Value::Flag, BTRFS),
    ("datacow", Value::Flag, BTRFS),
    ("nodatacow", Value::Flag, BTRFS),
    ("datasum", Value::Flag, BTRFS),
    ("nodatasum", Value::Flag, BTRFS),
    ("flushoncommit", Value::Flag, BTRFS),
    ("noflushoncommit", Value::Flag, BTRFS),
    ("treelog", Value::Flag, BTRFS),
    ("notreelog", Value::Flag, BTRFS),
    ("max_inline", Value::Size, BTRFS),
    ("thread_pool", Value::Number, BTRFS),
];

/// Options refused with a reason of their own (everything else not in [`ALLOWED`] is
/// refused as unknown).
const REFUSED: &[(&str, &str)] = &[
    (
        "suid",
        "would let set-user-ID programs on the volume gain privileges on the node (volumes are always mounted nosuid)",
    ),
    (
        "dev",
        "would let device nodes on the volume open the node's devices (volumes are always mounted nodev)",
    ),
    ("defaults", "implies suid and dev"),
    (
        "remount",
        "changes another mount instead of mounting the volume",
    ),
    (
        "bind",
        "changes another mount instead of mounting the volume",
    ),
    (
        "rbind",
        "changes another mount instead of mounting the volume",
    ),
    (
        "move",
        "changes another mount instead of mounting the volume",
    ),
    ("loop", "makes mount(8) set up its own loop device"),
    ("offset", "makes mount(8) set up its own loop device"),
    ("sizelimit", "makes mount(8) set up its own loop device"),
    ("user", "is an fstab option for unprivileged users"),
    ("users", "is an fstab option for unprivileged users"),
    ("owner", "is an fstab option for unprivileged users"),
    ("group", "is an fstab option for unprivileged users"),
    (
        "context",
        "sets an SELinux label; kura does not offer SELinux mount labels",
    ),
    (
        "fscontext",
        "sets an SELinux label; kura does not offer SELinux mount labels",
    ),
    (
        "defcontext",
        "sets an SELinux label; kura does not offer SELinux mount labels",
    ),
    (
        "rootcontext",
        "sets an SELinux label; kura does not offer SELinux mount labels",
    ),
    ("device", "makes btrfs scan a device that is not the volume"),
    ("subvol", "mounts a part of the volume kura did not make"),
    ("subvolid", "mounts a part of the volume kura did not make"),
];

/// Checks one mount option against the allow-list for `fs_type` (`None`: the
/// filesystem is not known yet, and any supported one will do). The reason never
/// repeats the option's value, which may be sensitive.
pub fn check_option(option: &str, fs_type: Option<FsType>) -> std::result::Result<(), String> {
    let (name, value) = match option.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (option, None),
    };
    if name.starts_with("x-") || name.starts_with("X-") {
        return Err(format!(
            "option {name:?} is a mount(8) userspace option, which acts on the mount point itself; not allowed"
        ));
    }
    if let Some((_, reason)) = REFUSED.iter().find(|(refused, _)| *refused == name) {
        return Err(format!("option {name:?} is not allowed: it {reason}"));
    }
    let Some((_, kind, filesystems)) = ALLOWED.iter().find(|(allowed, ..)| *allowed == name) else {
        return Err(format!(
            "{:?} is not a mount option kura allows (see the README's allow-list)",
            printable(name)
        ));
    };
    if let Some(fs) = fs_type
        && !filesystems.is_empty()
        && !filesystems.contains(&fs)
    {
        return Err(format!(
            "option {name:?} does not apply to {fs} (only to {})",
            filesystems
                .iter()
                .map(|f| f.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if value_fits(*kind, value) {
        Ok(())
    } else {
        Err(format!("option {name:?} {}", expectation(*kind)))
    }
}

fn value_fits(kind: Value, value: Option<&str>) -> bool {
    let number = |v: &str| !v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit());
    match (kind, value) {
        (Value::Flag, None) => true,
        (Value::FlagOr(_), None) => true,
        (Value::FlagOr(values) | Value::OneOf(values), Some(v)) => values.contains(&v),
        (Value::Number, Some(v)) => number(v),
        (Value::Size, Some(v)) => number(v.trim_end_matches(['k', 'K', 'm', 'M', 'g', 'G'])),
        (Value::Compression, None) => true,
        (Value::Compression, Some(v)) => {
            let (algorithm, level) = match v.split_once(':') {
                Some((a, l)) => (a, Some(l)),
                None => (v, None),
            };
            ["zlib", "lzo", "zstd", "no"].contains(&algorithm)
                && level.is_none_or(|l| l.len() <= 2 && number(l))
        }
        (Value::Flag, Some(_)) | (Value::Number | Value::Size | Value::OneOf(_), None) => false,
    }
}

fn expectation(kind: Value) -> String {
    match kind {
        Value::Flag => "takes no value".to_owned(),
        Value::Number => "takes a number of up to 10 digits".to_owned(),
        Value::Size => "takes a size (digits, optionally k, m or g)".to_owned(),
        Value::OneOf(values) => format!("takes one of: {}", values.join(", ")),
        Value::FlagOr(values) => format!("takes no value or one of: {}", values.join(", ")),
        Value::Compression => "takes zlib, lzo, zstd or no, optionally :level".to_owned(),
    }
}

/// At most 32 characters of an option name, for messages.
fn printable(name: &str) -> String {
    name.chars().take(32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfs_options_become_flags_in_order_and_the_rest_data() {
        let options: Vec<String> = [
            "ro",
            "noatime",
            "discard",
            "rw",
            "atime",
            "noatime",
            "data=ordered",
            "exec",
        ]
        .iter()
        .map(|o| o.to_string())
        .collect();
        let (flags, data) = mount_args(&options);
        assert_eq!(flags, MsFlags::MS_NOATIME | HARDENING);
        assert_eq!(data, "discard,data=ordered");
        assert_eq!(mount_args(&[]), (HARDENING, String::new()));
    }

    #[test]
    fn every_vfs_option_is_allowed_for_any_filesystem() {
        for (name, ..) in VFS_FLAGS {
            assert_eq!(check_option(name, None), Ok(()), "{name}");
        }
    }

    #[test]
    fn defaults_fill_in_what_the_caller_left() {
        let owned = |o: &[&str]| o.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            with_defaults(FsType::Xfs, &owned(&["noatime"])),
            owned(&["noatime", "nouuid"])
        );
        assert_eq!(
            with_defaults(FsType::Xfs, &owned(&["nouuid"])),
            owned(&["nouuid"])
        );
        assert_eq!(
            with_defaults(FsType::Ext4, &owned(&["noatime"])),
            owned(&["noinit_itable", "noatime"])
        );
        assert_eq!(
            with_defaults(FsType::Ext4, &owned(&["init_itable"])),
            owned(&["init_itable"])
        );
        assert_eq!(with_defaults(FsType::Btrfs, &[]), owned(&[]));
    }

    #[test]
    fn allows_listed_options_for_their_filesystems() {
        let ok = [
            ("noatime", None),
            ("noatime", Some(FsType::Btrfs)),
            ("ro", Some(FsType::Xfs)),
            ("exec", Some(FsType::Ext4)),
            ("data=journal", Some(FsType::Ext4)),
            ("errors=remount-ro", Some(FsType::Ext4)),
            ("commit=30", Some(FsType::Btrfs)),
            ("nouuid", Some(FsType::Xfs)),
            ("nouuid", None),
            ("allocsize=64k", Some(FsType::Xfs)),
            ("compress=zstd:3", Some(FsType::Btrfs)),
            ("compress", Some(FsType::Btrfs)),
            ("discard", Some(FsType::Xfs)),
            ("discard=async", Some(FsType::Btrfs)),
            ("space_cache=v2", Some(FsType::Btrfs)),
            ("barrier=0", Some(FsType::Ext4)),
        ];
        for (option, fs) in ok {
            assert_eq!(check_option(option, fs), Ok(()), "{option} on {fs:?}");
        }
    }

    #[test]
    fn refuses_everything_else_with_a_reason() {
        let refused = [
            ("suid", None, "nosuid"),
            ("dev", Some(FsType::Ext4), "nodev"),
            ("defaults", None, "suid"),
            ("remount", None, "another mount"),
            ("bind", None, "another mount"),
            ("loop", None, "loop device"),
            ("X-mount.mkdir", None, "mount point"),
            ("x-mount.mode=0777", None, "mount point"),
            ("context=system_u:object_r:x:s0", None, "SELinux"),
            ("device=/dev/sda", Some(FsType::Btrfs), "device"),
            ("subvol=/", Some(FsType::Btrfs), "kura did not make"),
            ("errors=panic", Some(FsType::Ext4), "one of"),
            ("nouuid", Some(FsType::Ext4), "does not apply to ext4"),
            ("data=journal", Some(FsType::Xfs), "does not apply to xfs"),
            ("noatime=1", None, "no value"),
            ("commit", Some(FsType::Ext4), "number"),
            ("commit=-1", Some(FsType::Ext4), "number"),
            ("commit=12345678901", Some(FsType::Ext4), "number"),
            ("allocsize=1t", Some(FsType::Xfs), "size"),
            ("compress=gzip", Some(FsType::Btrfs), "zlib"),
            ("noatime,suid", None, "not a mount option"),
            ("mode=0777", None, "not a mount option"),
            ("uid=0", None, "not a mount option"),
        ];
        for (option, fs, needle) in refused {
            let reason = check_option(option, fs).expect_err(option);
            assert!(reason.contains(needle), "{option}: {reason}");
        }
    }

    #[test]
    fn reasons_never_repeat_values() {
        for option in ["context=secret-label", "errors=secret", "mode=secret"] {
            let reason = check_option(option, None).unwrap_err();
            assert!(!reason.contains("secret"), "{option}: {reason}");
        }
    }
}
