//! Filesystem-level encryption (fscrypt, v2 policies) through its ioctls: adding a key
//! to a filesystem's keyring, setting and reading a directory's policy, asking a key's
//! status and removing it. The structures are laid out exactly as in
//! `linux/fscrypt.h`; the assertions below hold them to the kernel's sizes and offsets.
//!
//! # Guarantees
//!
//! - A [`Key`] is never printed (its `Debug` says `<redacted>`), lives in one heap
//!   buffer and is zeroed when dropped; the copy handed to the kernel is zeroed right
//!   after the call. Errors name the ioctl and the path, never key bytes.
//! - Key identifiers ([`KeyId`]) are not secret: the kernel derives them from the key
//!   one way and stores them in the filesystem in the clear.

use std::fs::File;
use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::errno::Errno;
use zeroize::Zeroize;

use super::{Error, Result};

/// `FSCRYPT_MAX_KEY_SIZE`: the longest key the kernel takes.
pub const MAX_KEY_SIZE: usize = 64;
/// The shortest key a v2 policy with AES-256-XTS contents takes: the mode's security
/// strength (the kernel refuses to unlock files with less: "key ... is too short").
pub const MIN_KEY_SIZE: usize = 32;
/// `FSCRYPT_KEY_IDENTIFIER_SIZE`.
pub const IDENTIFIER_SIZE: usize = 16;

/// `FSCRYPT_POLICY_V2`.
const POLICY_V2: u8 = 2;
/// `FSCRYPT_MODE_AES_256_XTS`, for file contents.
pub const MODE_AES_256_XTS: u8 = 1;
/// `FSCRYPT_MODE_AES_256_CTS`, for file names.
pub const MODE_AES_256_CTS: u8 = 4;
/// `FSCRYPT_POLICY_FLAGS_PAD_32`: names padded to 32 bytes, so their lengths show less.
pub const POLICY_FLAGS_PAD_32: u8 = 0x03;
/// `FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER`: a v2 key, named by its identifier.
const KEY_SPEC_TYPE_IDENTIFIER: u32 = 2;
/// `FSCRYPT_KEY_REMOVAL_STATUS_FLAG_FILES_BUSY`.
const REMOVAL_FILES_BUSY: u32 = 0x1;
/// `FSCRYPT_KEY_REMOVAL_STATUS_FLAG_OTHER_USERS`.
const REMOVAL_OTHER_USERS: u32 = 0x2;
/// `FSCRYPT_KEY_STATUS_*`.
const STATUS_ABSENT: u32 = 1;
const STATUS_PRESENT: u32 = 2;
const STATUS_INCOMPLETELY_REMOVED: u32 = 3;

/// `struct fscrypt_key_specifier`.
#[repr(C)]
#[derive(Clone, Copy)]
struct KeySpecifier {
    kind: u32,
    reserved: u32,
    /// The union of `__reserved[32]`, `descriptor[8]` and `identifier[16]`.
    u: [u8; 32],
}

impl KeySpecifier {
    fn identifier(id: Option<&KeyId>) -> Self {
        let mut u = [0; 32];
        if let Some(id) = id {
            u[..IDENTIFIER_SIZE].copy_from_slice(&id.0);
        }
        KeySpecifier {
            kind: KEY_SPEC_TYPE_IDENTIFIER,
            reserved: 0,
            u,
        }
    }
}

/// `struct fscrypt_policy_v2`.
#[repr(C)]
#[derive(Clone, Copy)]
struct PolicyV2 {
    version: u8,
    contents_encryption_mode: u8,
    filenames_encryption_mode: u8,
    flags: u8,
    /// `log2_data_unit_size` (0: the filesystem's block size), then `__reserved[3]`.
    reserved: [u8; 4],
    master_key_identifier: [u8; IDENTIFIER_SIZE],
}

/// `struct fscrypt_get_policy_ex_arg`: the size, then the union of the policy versions,
/// of which v2 is the largest (every member is bytes, so the union is v2's layout).
#[repr(C)]
struct GetPolicyExArg {
    policy_size: u64,
    policy: PolicyV2,
}

/// `struct fscrypt_add_key_arg`, with its flexible array `raw[]` sized for kura's keys.
#[repr(C)]
struct AddKeyArg {
    key_spec: KeySpecifier,
    raw_size: u32,
    key_id: u32,
    /// `__u32 flags` (newer kernels) and `__reserved[7]`: zero.
    reserved: [u32; 8],
    raw: [u8; MAX_KEY_SIZE],
}

/// The fixed part of `struct fscrypt_add_key_arg`, which sizes the ioctl's number.
const ADD_KEY_HEADER_SIZE: usize = 80;

/// `struct fscrypt_remove_key_arg`.
#[repr(C)]
struct RemoveKeyArg {
    key_spec: KeySpecifier,
    removal_status_flags: u32,
    reserved: [u32; 5],
}

/// `struct fscrypt_get_key_status_arg`.
#[repr(C)]
struct GetKeyStatusArg {
    key_spec: KeySpecifier,
    reserved: [u32; 6],
    status: u32,
    status_flags: u32,
    user_count: u32,
    out_reserved: [u32; 13],
}

const _: () = {
    assert!(size_of::<KeySpecifier>() == 40);
    assert!(size_of::<PolicyV2>() == 24);
    assert!(offset_of!(PolicyV2, master_key_identifier) == 8);
    assert!(size_of::<GetPolicyExArg>() == 32);
    assert!(offset_of!(GetPolicyExArg, policy) == 8);
    assert!(offset_of!(AddKeyArg, raw_size) == 40);
    assert!(offset_of!(AddKeyArg, raw) == ADD_KEY_HEADER_SIZE);
    assert!(size_of::<RemoveKeyArg>() == 64);
    assert!(offset_of!(RemoveKeyArg, removal_status_flags) == 40);
    assert!(size_of::<GetKeyStatusArg>() == 128);
    assert!(offset_of!(GetKeyStatusArg, status) == 64);
};

mod ioctl {
    use super::*;

    // The kernel's numbers: FS_IOC_SET_ENCRYPTION_POLICY is _IOR('f', 19, struct
    // fscrypt_policy_v1) (12 bytes) and takes a v2 policy too, told apart by its first
    // byte; FS_IOC_GET_ENCRYPTION_POLICY_EX is _IOWR('f', 22, __u8[9]);
    // FS_IOC_ADD_ENCRYPTION_KEY is sized by the fixed part of its argument.
    nix::ioctl_write_ptr_bad!(set_policy, nix::request_code_read!(b'f', 19, 12), PolicyV2);
    nix::ioctl_readwrite_bad!(
        get_policy_ex,
        nix::request_code_readwrite!(b'f', 22, 9),
        GetPolicyExArg
    );
    nix::ioctl_readwrite_bad!(
        add_key,
        nix::request_code_readwrite!(b'f', 23, ADD_KEY_HEADER_SIZE),
        AddKeyArg
    );
    nix::ioctl_readwrite!(remove_key, b'f', 24, RemoveKeyArg);
    nix::ioctl_readwrite!(key_status, b'f', 26, GetKeyStatusArg);
}

/// A filesystem encryption key: the raw bytes `FS_IOC_ADD_ENCRYPTION_KEY` takes, 32 to
/// 64 of them (v2 policies need at least as many bytes as the contents mode's security
/// strength: 32 for AES-256-XTS). Built in place in its heap buffer, never printed,
/// zeroed when dropped.
pub struct Key {
    bytes: Box<[u8; MAX_KEY_SIZE]>,
    len: usize,
}

impl Key {
    /// A key whose bytes `fill` writes straight into the key's own buffer (so no copy
    /// of them is left elsewhere), returning how many it wrote: from
    /// [`MIN_KEY_SIZE`] to [`MAX_KEY_SIZE`].
    pub fn build<E>(
        fill: impl FnOnce(&mut [u8; MAX_KEY_SIZE]) -> std::result::Result<usize, E>,
        too_short: impl FnOnce(usize) -> E,
    ) -> std::result::Result<Key, E> {
        let mut key = Key {
            bytes: Box::new([0; MAX_KEY_SIZE]),
            len: 0,
        };
        key.len = fill(&mut key.bytes)?.min(MAX_KEY_SIZE);
        if key.len < MIN_KEY_SIZE {
            return Err(too_short(key.len));
        }
        Ok(key)
    }

    /// The key's bytes.
    pub fn expose(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// A key's identifier, which the kernel derives from it (not secret).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyId(pub [u8; IDENTIFIER_SIZE]);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A directory's encryption policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// A v2 policy, naming its key by identifier.
    V2 {
        key: KeyId,
        contents_mode: u8,
        filenames_mode: u8,
        flags: u8,
    },
    /// A policy of another version (v1), which kura never sets.
    Other { version: u8 },
}

impl Policy {
    /// The policy kura sets: v2, AES-256-XTS contents, AES-256-CTS names padded to 32.
    pub fn kura(key: KeyId) -> Policy {
        Policy::V2 {
            key,
            contents_mode: MODE_AES_256_XTS,
            filenames_mode: MODE_AES_256_CTS,
            flags: POLICY_FLAGS_PAD_32,
        }
    }
}

/// Whether a key is in a filesystem's keyring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Absent,
    Present,
    /// Removed, but files that were open still hold it.
    IncompletelyRemoved,
}

/// What removing a key did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Removed,
    /// The key was not there.
    Absent,
    /// Removed, but open files still use it until they are closed.
    FilesBusy,
    /// Only this user's claim was removed; other users added it too.
    OtherUsers,
}

/// Opens a directory for an ioctl, not following a symbolic link.
fn open_dir(path: &Path) -> Result<File> {
    open(path, libc::O_DIRECTORY)
}

/// Opens a file or directory for an ioctl, not following a symbolic link, and never
/// blocking (on a FIFO).
fn open(path: &Path, flags: libc::c_int) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io("open", path, e))
}

/// Adds `key` to the keyring of the filesystem that `mount_root` is on, and returns its
/// identifier. Adding a key that is there already succeeds (the kernel counts one
/// claim per user).
pub fn add_key(mount_root: &Path, key: &Key) -> Result<KeyId> {
    let dir = open_dir(mount_root)?;
    let mut arg = Box::new(AddKeyArg {
        key_spec: KeySpecifier::identifier(None),
        raw_size: key.len as u32,
        key_id: 0,
        reserved: [0; 8],
        raw: [0; MAX_KEY_SIZE],
    });
    arg.raw[..key.len].copy_from_slice(key.expose());
    // SAFETY: `dir` is an open descriptor; `arg` points to a live, writable
    // `fscrypt_add_key_arg` whose `raw_size` (at most 64) bytes of `raw` follow its fixed part,
    // as the kernel reads them; the kernel writes only `key_spec` back.
    let result = unsafe { ioctl::add_key(dir.as_raw_fd(), &mut *arg) };
    arg.raw.zeroize();
    result.map_err(|e| Error::errno("FS_IOC_ADD_ENCRYPTION_KEY", mount_root, e))?;
    let mut id = [0; IDENTIFIER_SIZE];
    id.copy_from_slice(&arg.key_spec.u[..IDENTIFIER_SIZE]);
    Ok(KeyId(id))
}

/// Removes the key `id` from the keyring of the filesystem that `mount_root` is on:
/// the kernel then evicts the files it unlocked and wipes the key.
pub fn remove_key(mount_root: &Path, id: &KeyId) -> Result<Removal> {
    let dir = open_dir(mount_root)?;
    let mut arg = RemoveKeyArg {
        key_spec: KeySpecifier::identifier(Some(id)),
        removal_status_flags: 0,
        reserved: [0; 5],
    };
    // SAFETY: `dir` is an open descriptor and `arg` a live, writable
    // `fscrypt_remove_key_arg` of the size the ioctl's number names.
    match unsafe { ioctl::remove_key(dir.as_raw_fd(), &mut arg) } {
        Ok(_) if arg.removal_status_flags & REMOVAL_FILES_BUSY != 0 => Ok(Removal::FilesBusy),
        Ok(_) if arg.removal_status_flags & REMOVAL_OTHER_USERS != 0 => Ok(Removal::OtherUsers),
        Ok(_) => Ok(Removal::Removed),
        Err(Errno::ENOKEY) => Ok(Removal::Absent),
        Err(e) => Err(Error::errno("FS_IOC_REMOVE_ENCRYPTION_KEY", mount_root, e)),
    }
}

/// Whether the key `id` is in the keyring of the filesystem that `mount_root` is on.
pub fn key_status(mount_root: &Path, id: &KeyId) -> Result<KeyStatus> {
    let dir = open_dir(mount_root)?;
    let mut arg = GetKeyStatusArg {
        key_spec: KeySpecifier::identifier(Some(id)),
        reserved: [0; 6],
        status: 0,
        status_flags: 0,
        user_count: 0,
        out_reserved: [0; 13],
    };
    // SAFETY: `dir` is an open descriptor and `arg` a live, writable
    // `fscrypt_get_key_status_arg` of the size the ioctl's number names.
    unsafe { ioctl::key_status(dir.as_raw_fd(), &mut arg) }
        .map_err(|e| Error::errno("FS_IOC_GET_ENCRYPTION_KEY_STATUS", mount_root, e))?;
    match arg.status {
        STATUS_ABSENT => Ok(KeyStatus::Absent),
        STATUS_PRESENT => Ok(KeyStatus::Present),
        STATUS_INCOMPLETELY_REMOVED => Ok(KeyStatus::IncompletelyRemoved),
        other => Err(Error::Parse {
            what: "fscrypt key status",
            detail: format!("unknown status {other}"),
        }),
    }
}

/// Sets kura's policy ([`Policy::kura`]) with key `id` on the empty directory `dir`.
/// The key must be in the filesystem's keyring.
pub fn set_policy(dir: &Path, id: &KeyId) -> Result<()> {
    let file = open_dir(dir)?;
    let policy = PolicyV2 {
        version: POLICY_V2,
        contents_encryption_mode: MODE_AES_256_XTS,
        filenames_encryption_mode: MODE_AES_256_CTS,
        flags: POLICY_FLAGS_PAD_32,
        reserved: [0; 4],
        master_key_identifier: id.0,
    };
    // SAFETY: `file` is an open descriptor and `policy` a live `fscrypt_policy_v2`,
    // which the kernel only reads (its first byte tells it the version, hence size).
    unsafe { ioctl::set_policy(file.as_raw_fd(), &policy) }
        .map_err(|e| Error::errno("FS_IOC_SET_ENCRYPTION_POLICY", dir, e))?;
    Ok(())
}

/// The encryption policy of the directory (or unlocked file) `path`, or `None` when
/// it has none. A directory's needs no key.
pub fn get_policy(path: &Path) -> Result<Option<Policy>> {
    let dir = path;
    let file = open(path, 0)?;
    let mut arg = GetPolicyExArg {
        policy_size: size_of::<PolicyV2>() as u64,
        policy: PolicyV2 {
            version: 0,
            contents_encryption_mode: 0,
            filenames_encryption_mode: 0,
            flags: 0,
            reserved: [0; 4],
            master_key_identifier: [0; IDENTIFIER_SIZE],
        },
    };
    // SAFETY: `file` is an open descriptor; `arg` is a live, writable
    // `fscrypt_get_policy_ex_arg` whose `policy_size` says how many bytes of policy
    // follow, which is all the kernel writes.
    match unsafe { ioctl::get_policy_ex(file.as_raw_fd(), &mut arg) } {
        Ok(_) => {}
        Err(Errno::ENODATA) => return Ok(None),
        Err(e) => return Err(Error::errno("FS_IOC_GET_ENCRYPTION_POLICY_EX", dir, e)),
    }
    let p = arg.policy;
    Ok(Some(match p.version {
        POLICY_V2 => Policy::V2 {
            key: KeyId(p.master_key_identifier),
            contents_mode: p.contents_encryption_mode,
            filenames_mode: p.filenames_encryption_mode,
            flags: p.flags,
        },
        version => Policy::Other { version },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_never_print_and_ids_print_as_hex() {
        let key = Key::build(
            |b| {
                b.fill(0xab);
                Ok(40)
            },
            |_| (),
        )
        .unwrap();
        assert_eq!(format!("{key:?}"), "Key(<redacted>)");
        assert_eq!(key.expose(), &[0xab; 40][..]);
        let short = Key::build(|_| Ok(31), |len| len).unwrap_err();
        assert_eq!(short, 31);
        let mut id = [0u8; IDENTIFIER_SIZE];
        id[0] = 0x0f;
        id[15] = 0xa0;
        assert_eq!(KeyId(id).to_string(), "0f0000000000000000000000000000a0");
    }

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // From linux/fscrypt.h, as the kernel's _IO* macros compute them.
        assert_eq!(nix::request_code_read!(b'f', 19, 12), 0x800c_6613);
        assert_eq!(nix::request_code_readwrite!(b'f', 22, 9), 0xc009_6616);
        assert_eq!(
            nix::request_code_readwrite!(b'f', 23, ADD_KEY_HEADER_SIZE),
            0xc050_6617
        );
        assert_eq!(
            nix::request_code_readwrite!(b'f', 24, size_of::<RemoveKeyArg>()),
            0xc040_6618
        );
        assert_eq!(
            nix::request_code_readwrite!(b'f', 26, size_of::<GetKeyStatusArg>()),
            0xc080_661a
        );
    }
}
