//! Encrypted volumes: what a volume's metadata says of its encryption, and the key a
//! node-stage Secret carries.
//!
//! # The key
//!
//! The Secret's entry [`SECRET_ENTRY`] holds the key as hexadecimal text: 64 to 128
//! digits (32 to 64 bytes), upper or lower case, an even number of them, with
//! whitespace before and after ignored (a key file's trailing newline). Those bytes
//! are the fscrypt master key itself, handed to the kernel as they are: the kernel
//! derives every file's keys from it with HKDF-SHA512, and v2 policies with AES-256-XTS
//! need at least 32 bytes. Text, because CSI's `secrets` is a map of proto3 strings,
//! which must be UTF-8: the kubelet could not send arbitrary bytes.

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::sys::fscrypt::{Key, MAX_KEY_SIZE, MIN_KEY_SIZE};

/// The entry of the node-stage Secret that holds an encrypted volume's key.
pub const SECRET_ENTRY: &str = "key";
/// How errors name that entry.
pub const SECRET_FIELD: &str = "secrets[key]";
/// The directory under an encrypted volume's filesystem root that holds its files (the
/// encrypted directory, which publications bind).
pub const DATA_DIR: &str = "data";

/// How a volume's files are encrypted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    /// Not encrypted.
    #[default]
    Plain,
    /// ext4 with fscrypt: the directory [`DATA_DIR`] under a v2 policy.
    Fscrypt,
}

impl Encryption {
    pub fn is_plain(&self) -> bool {
        *self == Encryption::Plain
    }
}

impl std::fmt::Display for Encryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Encryption::Plain => "not encrypted",
            Encryption::Fscrypt => "encrypted (fscrypt)",
        })
    }
}

/// Why a Secret's value is not a key. Never holds any of the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("is not hexadecimal text (0-9, a-f): the key is given as hex digits")]
    NotHex,
    #[error("has an odd number of hex digits; each byte is two")]
    OddDigits,
    #[error(
        "holds {bytes} bytes of key material, fewer than the {MIN_KEY_SIZE} an encrypted volume needs (64 hex digits or more)"
    )]
    TooShort { bytes: usize },
    #[error(
        "holds more than {MAX_KEY_SIZE} bytes of key material (128 hex digits), the most fscrypt takes"
    )]
    TooLong,
}

/// The key a Secret's value (hex text, see the module's doc) holds, decoded straight
/// into the key's own zeroed-on-drop buffer.
pub fn key_from_secret(value: &str) -> Result<Key, KeyError> {
    let digits = value.trim().as_bytes();
    Key::build(
        |buf| {
            if !digits.len().is_multiple_of(2) {
                // Checked after the characters, so a value that is not hex says so.
                if digits.iter().any(|&d| nibble(d).is_none()) {
                    return Err(KeyError::NotHex);
                }
                return Err(KeyError::OddDigits);
            }
            let mut len = 0;
            for pair in digits.chunks_exact(2) {
                let (Some(high), Some(low)) = (nibble(pair[0]), nibble(pair[1])) else {
                    return Err(KeyError::NotHex);
                };
                if len == MAX_KEY_SIZE {
                    return Err(KeyError::TooLong);
                }
                buf[len] = (high << 4) | low;
                len += 1;
            }
            Ok(len)
        },
        |bytes| KeyError::TooShort { bytes },
    )
}

/// Takes the key entry out of a secrets map and wipes every value in the map: the
/// caller's copy of the Secret is gone once this returns. `None` when there is no
/// such entry.
pub fn take_secret(secrets: &mut std::collections::HashMap<String, String>) -> Option<Secret> {
    let taken = secrets.remove(SECRET_ENTRY).map(Secret);
    for value in secrets.values_mut() {
        value.zeroize();
    }
    secrets.clear();
    taken
}

/// A Secret's value as the CO sent it, before it is known to be needed or well formed.
/// Never printed; wiped when dropped.
pub struct Secret(String);

impl Secret {
    /// The key this value holds.
    pub fn key(&self) -> Result<Key, KeyError> {
        key_from_secret(&self.0)
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

fn nibble(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hex_of_32_to_64_bytes() {
        let hex32 = "00112233445566778899aabbccddeeff".repeat(2);
        let key = key_from_secret(&hex32).unwrap();
        assert_eq!(key.expose().len(), 32);
        assert_eq!(key.expose()[..4], [0x00, 0x11, 0x22, 0x33]);
        assert_eq!(key.expose()[31], 0xff);
        let upper = key_from_secret(&format!("  {}\n", hex32.to_uppercase())).unwrap();
        assert_eq!(upper.expose(), key.expose());
        assert_eq!(
            key_from_secret(&"ab".repeat(64)).unwrap().expose().len(),
            64
        );

        let cases = [
            ("", KeyError::TooShort { bytes: 0 }),
            (&"ab".repeat(31)[..], KeyError::TooShort { bytes: 31 }),
            (&"ab".repeat(65)[..], KeyError::TooLong),
            (&format!("{hex32}a")[..], KeyError::OddDigits),
            (&format!("{hex32}zz")[..], KeyError::NotHex),
            (&format!("{hex32}z")[..], KeyError::NotHex),
            (&"é".repeat(40)[..], KeyError::NotHex),
            (
                &format!("{} {}", &hex32[..32], &hex32[32..])[..],
                KeyError::NotHex,
            ),
        ];
        for (value, want) in cases {
            let got = key_from_secret(value).unwrap_err();
            assert_eq!(got, want, "{value:?}");
            let message = got.to_string();
            if value.len() >= 8 {
                assert!(!message.contains(&value[..8]), "{message}");
            }
        }
    }

    #[test]
    fn taking_the_secret_wipes_the_map_and_never_prints() {
        let mut map = std::collections::HashMap::from([
            (SECRET_ENTRY.to_owned(), "ab".repeat(32)),
            ("other".to_owned(), "password".to_owned()),
        ]);
        let secret = take_secret(&mut map).expect("the key entry");
        assert!(map.is_empty());
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        assert_eq!(secret.key().unwrap().expose(), &[0xab; 32][..]);
        assert!(take_secret(&mut map).is_none());
        assert_eq!(SECRET_FIELD, format!("secrets[{SECRET_ENTRY}]"));
    }

    #[test]
    fn encryption_reads_and_writes_as_a_word() {
        assert_eq!(
            serde_json::to_string(&Encryption::Fscrypt).unwrap(),
            "\"fscrypt\""
        );
        assert!(Encryption::default().is_plain());
    }
}
