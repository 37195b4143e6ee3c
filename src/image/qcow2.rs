//! The qcow2 header (QEMU's `docs/interop/qcow2.txt`), parsed from bytes already read, and the
//! agent's judgement of it: what in an image could make QEMU open another file (a backing file,
//! an external data file) or what the agent does not understand (an incompatible feature bit it
//! does not know) is refused.
//!
//! Only the fixed big-endian header fields and the header extensions are read; nothing the
//! header names is ever opened. No crate fitted: `imago` (a full image driver) opens an image's
//! backing and data files through a gate and reports what it refuses as I/O errors, where the
//! agent needs the finding itself; the fixed fields are read with the standard library's
//! big-endian conversions.

use std::fmt;
use std::io::{self, Read};
use std::path::Path;

/// The first four bytes of every qcow2 image.
pub const MAGIC: &[u8; 4] = b"QFI\xfb";

/// Incompatible feature bit 0: the image was not closed cleanly (QEMU repairs refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: QEMU found the metadata corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: a compression type other than zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// The incompatible feature bits the agent understands.
pub const KNOWN_INCOMPAT: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;

/// Header extension: the backing file's format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: the external data file's name.
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Length of a version 2 header, where version 3 fields would start.
const V2_HEADER_LEN: usize = 72;
/// Length of the version 3 fixed header (up to and with `header_length`).
const V3_HEADER_LEN: usize = 104;
/// QEMU's bounds on `cluster_bits`.
const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 9..=21;
/// QEMU's bound on a backing file name's length.
const MAX_BACKING_NAME: u32 = 1023;

/// What a qcow2 header says, as far as the agent's decisions need it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// The backing file's name (bytes as stored; possibly not UTF-8), when there is one.
    pub backing_file: Option<Vec<u8>>,
    /// The backing file's format name from its header extension.
    pub backing_format: Option<String>,
    /// The external data file's name from its header extension.
    pub data_file: Option<Vec<u8>>,
    /// `crypt_method`: 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// The incompatible feature bits (0 for version 2).
    pub incompatible: u64,
}

/// Why bytes that start with the qcow2 magic are not a header QEMU would accept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Qcow2Error {
    /// Fewer bytes than the fixed header.
    #[error("the header is truncated ({0} bytes)")]
    Truncated(usize),
    /// A version other than 2 or 3.
    #[error("it has unsupported version {0}")]
    Version(u32),
    /// A cluster size QEMU does not accept.
    #[error("its cluster_bits {0} is out of range")]
    ClusterBits(u32),
    /// A header length shorter than the fixed header or past the first cluster.
    #[error("its header_length {0} is invalid")]
    HeaderLength(u32),
    /// A backing file name that is too long or lies past the first cluster.
    #[error("its backing file name is out of bounds")]
    BackingName,
    /// Header extensions that run past the first cluster or past what was read.
    #[error("its header extensions run past the first cluster")]
    Extensions,
}

/// What in a well-formed header the agent refuses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// An external data file (feature bit 2, or a data file name extension): QEMU would open
    /// that file, which can be any file or device on the node.
    DataFile,
    /// A backing file: QEMU would open it, and its own chain.
    BackingFile,
    /// Incompatible feature bits the agent does not know (the mask).
    UnknownFeatures(u64),
    /// QEMU marked the image corrupt.
    Corrupt,
    /// Encrypted (QEMU needs a secret virtplane does not pass).
    Encrypted,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DataFile => f.write_str(
                "an external data file (QEMU would open that file, which can be any file or device on the node)",
            ),
            Self::BackingFile => f.write_str(
                "a backing file (QEMU would open it and its own backing chain, which can reach files outside the allowed directories)",
            ),
            Self::UnknownFeatures(mask) => {
                let bits: Vec<String> = (0..64)
                    .filter(|b| mask & (1 << b) != 0)
                    .map(|b: u32| b.to_string())
                    .collect();
                write!(
                    f,
                    "incompatible feature bit(s) {} that virtplane does not understand",
                    bits.join(", ")
                )
            }
            Self::Corrupt => f.write_str("the corrupt flag set (run qemu-img check -r all)"),
            Self::Encrypted => f.write_str("encryption, which virtplane does not support"),
        }
    }
}

/// The agent's judgement of an image's first bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No qcow2 magic: the file is used as raw.
    NotQcow2,
    /// A qcow2 image the agent accepts.
    Safe(Header),
    /// A qcow2 image refused, with everything found.
    Unsafe(Vec<Finding>),
    /// qcow2 magic over a header QEMU would not accept.
    Malformed(Qcow2Error),
}

impl Verdict {
    /// Whether the bytes carry the qcow2 magic (whatever follows).
    pub fn is_qcow2(&self) -> bool {
        !matches!(self, Self::NotQcow2)
    }

    /// Why the image is refused, as the end of a sentence ("… is a qcow2 image with …"); `None`
    /// when it is not.
    pub fn refusal(&self) -> Option<String> {
        match self {
            Self::NotQcow2 | Self::Safe(_) => None,
            Self::Unsafe(found) => Some(format!(
                "a qcow2 image with {}",
                found
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; and with ")
            )),
            Self::Malformed(e) => Some(format!("a malformed qcow2 image: {e}")),
        }
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Parses the header at the start of `bytes` (the image's first cluster, or as much of it as
/// the file has). `Ok(None)` when there is no qcow2 magic.
pub fn parse(bytes: &[u8]) -> Result<Option<Header>, Qcow2Error> {
    if !bytes.starts_with(MAGIC) {
        return Ok(None);
    }
    if bytes.len() < V2_HEADER_LEN {
        return Err(Qcow2Error::Truncated(bytes.len()));
    }
    let version = be32(bytes, 4);
    if version != 2 && version != 3 {
        return Err(Qcow2Error::Version(version));
    }
    let cluster_bits = be32(bytes, 20);
    if !CLUSTER_BITS.contains(&cluster_bits) {
        return Err(Qcow2Error::ClusterBits(cluster_bits));
    }
    let cluster = 1usize << cluster_bits;
    // Everything the header holds lies in the first cluster; never look past it.
    let bytes = &bytes[..bytes.len().min(cluster)];
    let (incompatible, header_len) = if version == 2 {
        (0, V2_HEADER_LEN)
    } else {
        if bytes.len() < V3_HEADER_LEN {
            return Err(Qcow2Error::Truncated(bytes.len()));
        }
        let len = be32(bytes, 100);
        let ok = (V3_HEADER_LEN as u32..=cluster as u32).contains(&len) && len.is_multiple_of(8);
        if !ok {
            return Err(Qcow2Error::HeaderLength(len));
        }
        (be64(bytes, 72), len as usize)
    };
    let backing_offset = be64(bytes, 8);
    let backing_size = be32(bytes, 16);
    let backing_file = if backing_offset == 0 && backing_size == 0 {
        None
    } else {
        let start = usize::try_from(backing_offset).map_err(|_| Qcow2Error::BackingName)?;
        let end = start.saturating_add(backing_size as usize);
        if backing_size > MAX_BACKING_NAME || end > bytes.len() {
            return Err(Qcow2Error::BackingName);
        }
        Some(bytes[start..end].to_vec())
    };
    let mut header = Header {
        version,
        cluster_bits,
        size: be64(bytes, 24),
        backing_file,
        backing_format: None,
        data_file: None,
        crypt_method: be32(bytes, 32),
        incompatible,
    };
    // Header extensions: (type, length, data padded to 8 bytes) until type 0, or until the
    // backing file name or the end of the first cluster, as QEMU reads them.
    let limit = match usize::try_from(backing_offset) {
        Ok(o) if o != 0 && o < cluster => o,
        _ => cluster,
    };
    let mut at = header_len;
    while at < limit {
        if at + 8 > limit || at + 8 > bytes.len() {
            return Err(Qcow2Error::Extensions);
        }
        let (kind, len) = (be32(bytes, at), be32(bytes, at + 4) as usize);
        if kind == 0 {
            break;
        }
        let data = at + 8;
        if len > limit - data || data + len > bytes.len() {
            return Err(Qcow2Error::Extensions);
        }
        let value = &bytes[data..data + len];
        match kind {
            EXT_BACKING_FORMAT => {
                header.backing_format = Some(String::from_utf8_lossy(value).into_owned());
            }
            EXT_DATA_FILE => header.data_file = Some(value.to_vec()),
            _ => {}
        }
        at = data + len.div_ceil(8) * 8;
    }
    Ok(Some(header))
}

/// What the agent refuses in `header`; empty when it accepts the image.
pub fn findings(header: &Header) -> Vec<Finding> {
    let mut found = Vec::new();
    if header.incompatible & INCOMPAT_DATA_FILE != 0 || header.data_file.is_some() {
        found.push(Finding::DataFile);
    }
    if header.backing_file.is_some() {
        found.push(Finding::BackingFile);
    }
    let unknown = header.incompatible & !KNOWN_INCOMPAT;
    if unknown != 0 {
        found.push(Finding::UnknownFeatures(unknown));
    }
    if header.incompatible & INCOMPAT_CORRUPT != 0 {
        found.push(Finding::Corrupt);
    }
    if header.crypt_method != 0 {
        found.push(Finding::Encrypted);
    }
    found
}

/// Judges an image from its first bytes (see [`read_header`]).
pub fn judge(bytes: &[u8]) -> Verdict {
    match parse(bytes) {
        Ok(None) => Verdict::NotQcow2,
        Err(e) => Verdict::Malformed(e),
        Ok(Some(h)) => {
            let found = findings(&h);
            if found.is_empty() {
                Verdict::Safe(h)
            } else {
                Verdict::Unsafe(found)
            }
        }
    }
}

/// Reads what [`parse`] needs from an open image: the first 112 bytes, and when they carry the
/// qcow2 magic the rest of the first cluster (at most 2 MiB). Blocking: call it off the async
/// runtime.
pub fn read_from(mut r: impl Read) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(V3_HEADER_LEN + 8);
    (&mut r)
        .take(V3_HEADER_LEN as u64 + 8)
        .read_to_end(&mut buf)?;
    if buf.starts_with(MAGIC) && buf.len() >= 24 {
        let bits = be32(&buf, 20);
        if CLUSTER_BITS.contains(&bits) {
            let rest = (1u64 << bits).saturating_sub(buf.len() as u64);
            r.take(rest).read_to_end(&mut buf)?;
        }
    }
    Ok(buf)
}

/// [`read_from`] a file or block device at `path`. Blocking.
pub fn read_header(path: &Path) -> io::Result<Vec<u8>> {
    read_from(std::fs::File::open(path)?)
}

/// Reads and judges the image at `path`, for a caller that has a file (an IsoDownload's result,
/// a clone's source). Blocking: call it off the async runtime.
pub fn judge_file(path: &Path) -> io::Result<Verdict> {
    read_header(path).map(|b| judge(&b))
}

/// The first cluster of a version 3, 64 KiB-cluster, 1 GiB image with `incompatible` feature
/// bits and, when given, a backing file name (for other modules' tests).
#[cfg(test)]
pub(crate) fn sample(incompatible: u64, backing: Option<&[u8]>) -> Vec<u8> {
    let mut h = vec![0u8; 1 << 16];
    h[..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&16u32.to_be_bytes());
    h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
    h[72..80].copy_from_slice(&incompatible.to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes());
    h[100..104].copy_from_slice(&112u32.to_be_bytes());
    if let Some(name) = backing {
        h[8..16].copy_from_slice(&4096u64.to_be_bytes());
        h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        h[4096..4096 + name.len()].copy_from_slice(name);
    }
    h
}

#[cfg(test)]
#[path = "qcow2_tests.rs"]
mod tests;
