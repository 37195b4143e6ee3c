//! Checksums: the expected digest and the hasher fed while streaming.

use std::fmt;

use sha2::Digest;

use super::DownloadError;

/// A digest algorithm for [`Checksum`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChecksumAlgorithm {
    /// SHA-256.
    Sha256,
    /// SHA-512.
    Sha512,
    /// SHA-1 (weak; accepted because many mirrors still publish it).
    Sha1,
    /// MD5 (weak; accepted because many mirrors still publish it).
    Md5,
}

impl ChecksumAlgorithm {
    /// Length of the digest in hex digits.
    pub fn hex_len(self) -> usize {
        match self {
            Self::Sha256 => 64,
            Self::Sha512 => 128,
            Self::Sha1 => 40,
            Self::Md5 => 32,
        }
    }
}

impl fmt::Display for ChecksumAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
            Self::Sha1 => "sha1",
            Self::Md5 => "md5",
        })
    }
}

/// The digest the downloaded file must have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checksum {
    /// The algorithm.
    pub algorithm: ChecksumAlgorithm,
    /// The digest in hex, either case.
    pub hex: String,
}

impl Checksum {
    /// The digest in lower-case hex, after checking it has the algorithm's length.
    pub(crate) fn normalized(&self) -> Result<String, DownloadError> {
        let hex = self.hex.trim().to_ascii_lowercase();
        if hex.len() != self.algorithm.hex_len() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DownloadError::InvalidChecksum {
                algorithm: self.algorithm,
                hex: self.hex.clone(),
                expected_len: self.algorithm.hex_len(),
            });
        }
        Ok(hex)
    }
}

/// A running digest of one of the supported algorithms.
pub(crate) enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
    Sha1(sha1::Sha1),
    Md5(md5::Md5),
}

impl Hasher {
    pub(crate) fn new(algorithm: ChecksumAlgorithm) -> Self {
        match algorithm {
            ChecksumAlgorithm::Sha256 => Self::Sha256(sha2::Sha256::new()),
            ChecksumAlgorithm::Sha512 => Self::Sha512(sha2::Sha512::new()),
            ChecksumAlgorithm::Sha1 => Self::Sha1(sha1::Sha1::new()),
            ChecksumAlgorithm::Md5 => Self::Md5(md5::Md5::new()),
        }
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(data),
            Self::Sha512(h) => h.update(data),
            Self::Sha1(h) => h.update(data),
            Self::Md5(h) => h.update(data),
        }
    }

    /// The digest in lower-case hex.
    pub(crate) fn finish_hex(self) -> String {
        match self {
            Self::Sha256(h) => to_hex(&h.finalize()),
            Self::Sha512(h) => to_hex(&h.finalize()),
            Self::Sha1(h) => to_hex(&h.finalize()),
            Self::Md5(h) => to_hex(&h.finalize()),
        }
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(algorithm: ChecksumAlgorithm, data: &[u8]) -> String {
        let mut h = Hasher::new(algorithm);
        let (a, b) = data.split_at(data.len() / 2);
        h.update(a);
        h.update(b);
        h.finish_hex()
    }

    #[test]
    fn known_digests() {
        assert_eq!(
            digest(ChecksumAlgorithm::Sha256, b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            digest(ChecksumAlgorithm::Sha1, b"abc"),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            digest(ChecksumAlgorithm::Md5, b"abc"),
            "900150983cd24fb0d6963f7d28e17f72"
        );
        assert!(digest(ChecksumAlgorithm::Sha512, b"abc").starts_with("ddaf35a193617aba"));
    }

    #[test]
    fn normalizes_and_validates() {
        let c = Checksum {
            algorithm: ChecksumAlgorithm::Md5,
            hex: " 900150983CD24FB0D6963F7D28E17F72 ".into(),
        };
        assert_eq!(c.normalized().unwrap(), "900150983cd24fb0d6963f7d28e17f72");
        let short = Checksum {
            algorithm: ChecksumAlgorithm::Sha256,
            hex: "abcd".into(),
        };
        assert!(matches!(
            short.normalized(),
            Err(DownloadError::InvalidChecksum {
                expected_len: 64,
                ..
            })
        ));
        let not_hex = Checksum {
            algorithm: ChecksumAlgorithm::Md5,
            hex: "z".repeat(32),
        };
        assert!(not_hex.normalized().is_err());
    }
}
