//! Decompression of xz, gzip and zstd sources while they stream in.
//!
//! The compressed bytes as served stay in the partial file (`.NAME.part`): the checksum,
//! the length checks and resuming all work on them, unchanged. The writer thread also feeds
//! them to a decoder whose output goes to `.NAME.part.out`; on completion that file, not the
//! compressed one, becomes `NAME`.
//!
//! The compression is found by the first bytes of the data ([`Compression::detect`]), never
//! by the name. None of the three decoders can save its state, so resuming rebuilds it: the
//! decoded file is truncated and the kept compressed bytes are decoded again from the start
//! ([`resume`]), then the transfer goes on from the compressed offset. That costs CPU time
//! for what was kept, not network, and works the same for xz, gzip and zstd, so no format
//! restarts from zero.
//!
//! The decoded output is held to the size limit ([`OutLimits`]): a decompression bomb fails
//! with [`DownloadError::TooLarge`]. It is held to the pool's free-space floor by the same
//! [`Floor`] as the data as served, with the same [`DownloadError::BelowFloor`]. A stream the
//! decoder rejects, or one that ends in the middle, fails with
//! [`DownloadError::CorruptImage`]. Either way the caller deletes everything. xz and gzip
//! carry a checksum of the data (CRC64 or CRC32); a zstd frame carries one when its writer
//! asked (the `zstd` tool does by default), so damage inside a zstd frame without one can
//! go unnoticed by the decoder: `spec.checksum`, over the bytes as served, catches it.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

use super::DownloadError;
use super::limits::Floor;

/// Bytes of a file's head [`Compression::detect`] needs.
pub const MAGIC_LEN: usize = 6;

/// A compression found by its magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// xz (`FD 37 7A 58 5A 00`), one or more streams.
    Xz,
    /// gzip (`1F 8B 08`), one or more members.
    Gzip,
    /// Zstandard (`28 B5 2F FD`), one or more frames.
    Zstd,
}

impl Compression {
    /// The compression `head` (a file's first bytes, [`MAGIC_LEN`] are enough) starts with.
    pub fn detect(head: &[u8]) -> Option<Self> {
        if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Some(Self::Xz)
        } else if head.starts_with(&[0x1f, 0x8b, 0x08]) {
            Some(Self::Gzip)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Self::Zstd)
        } else {
            None
        }
    }

    /// The lower-case name written in status (`xz`, `gzip`, `zstd`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Xz => "xz",
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What decoding is held to, and where its output goes.
#[derive(Clone, Debug)]
pub(crate) struct DecodeConfig {
    /// The decoded file (`.NAME.part.out`).
    pub out: PathBuf,
    /// The URL without credentials, for errors.
    pub url: String,
    /// The largest decoded file.
    pub max_bytes: Option<u64>,
    /// Bytes the pool's file system must keep free, checked by a [`Floor`].
    pub min_free_bytes: Option<u64>,
}

/// Why the output writer refused more data (carried inside an `io::Error`).
#[derive(Debug, thiserror::Error)]
enum OutLimit {
    #[error("the decoded image is larger than {0} bytes")]
    TooLarge(u64),
    /// The pool's [`Floor`] refused ([`DownloadError::BelowFloor`]).
    #[error(transparent)]
    Floor(DownloadError),
}

/// The size limit of the decoded output, pure: fed the length so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OutLimits {
    pub max_bytes: Option<u64>,
}

impl OutLimits {
    /// Checks `len` decoded bytes.
    fn check(&self, len: u64) -> Result<(), OutLimit> {
        if let Some(max) = self.max_bytes
            && len > max
        {
            return Err(OutLimit::TooLarge(max));
        }
        Ok(())
    }
}

/// The decoded file, counting and limiting what is written to it.
pub(crate) struct Out {
    file: File,
    path: PathBuf,
    len: u64,
    limits: OutLimits,
    floor: Option<Floor>,
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.limits
            .check(self.len + buf.len() as u64)
            .map_err(io::Error::other)?;
        // Before writing more: the same floor as the data as served.
        if let Some(f) = self.floor.as_mut()
            && f.due(buf.len() as u64)
        {
            f.check(&self.file, &self.path)
                .map_err(|e| io::Error::other(OutLimit::Floor(e)))?;
        }
        let n = self.file.write(buf)?;
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A running decoder.
pub(crate) enum Decoder {
    Xz(liblzma::write::XzDecoder<Out>),
    Gzip(flate2::write::MultiGzDecoder<Out>),
    Zstd(Box<zstd::stream::write::Decoder<'static, Out>>),
}

/// The decoded file once the stream ended well.
#[derive(Debug)]
pub(crate) struct Decoded {
    /// Its path.
    pub path: PathBuf,
    /// Its length.
    pub len: u64,
    /// What it was decoded from.
    pub compression: Compression,
}

/// A started decoding: the compression and its decoder.
pub(crate) struct Active {
    compression: Compression,
    decoder: Decoder,
    config: DecodeConfig,
}

/// The writer thread's decoding state.
pub(crate) enum Decode {
    /// Not decided yet: the data's first bytes, kept until [`MAGIC_LEN`] of them arrived.
    Pending(DecodeConfig, Vec<u8>),
    /// The data is not compressed.
    Plain,
    /// Decoding.
    Active(Box<Active>),
}

impl Decode {
    /// Feeds the next compressed bytes.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Result<(), DownloadError> {
        match self {
            Self::Plain => Ok(()),
            Self::Active(a) => a.write(data),
            Self::Pending(_, held) => {
                held.extend_from_slice(data);
                if held.len() >= MAGIC_LEN {
                    self.decide()?;
                }
                Ok(())
            }
        }
    }

    /// Decides on what arrived so far (at the end of a short body).
    pub(crate) fn decide(&mut self) -> Result<(), DownloadError> {
        if let Self::Pending(config, held) = self {
            let held = std::mem::take(held);
            *self = match Compression::detect(&held) {
                None => Self::Plain,
                Some(c) => {
                    let mut a = Active::start(c, config.clone())?;
                    a.write(&held)?;
                    Self::Active(Box::new(a))
                }
            };
        }
        Ok(())
    }

    /// The compression in use, once decided.
    pub(crate) fn active(self) -> Option<Box<Active>> {
        match self {
            Self::Active(a) => Some(a),
            _ => None,
        }
    }
}

impl Active {
    fn start(compression: Compression, config: DecodeConfig) -> Result<Self, DownloadError> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&config.out)
            .map_err(|e| DownloadError::io("create", &config.out, e))?;
        let out = Out {
            file,
            path: config.out.clone(),
            len: 0,
            limits: OutLimits {
                max_bytes: config.max_bytes,
            },
            floor: config.min_free_bytes.map(Floor::new),
        };
        let decoder = match compression {
            Compression::Xz => Decoder::Xz(liblzma::write::XzDecoder::new_multi_decoder(out)),
            Compression::Gzip => Decoder::Gzip(flate2::write::MultiGzDecoder::new(out)),
            Compression::Zstd => Decoder::Zstd(Box::new(
                zstd::stream::write::Decoder::new(out)
                    .map_err(|e| DownloadError::io("start decoding into", &config.out, e))?,
            )),
        };
        Ok(Self {
            compression,
            decoder,
            config,
        })
    }

    fn write(&mut self, data: &[u8]) -> Result<(), DownloadError> {
        let r = match &mut self.decoder {
            Decoder::Xz(d) => d.write_all(data),
            Decoder::Gzip(d) => d.write_all(data),
            Decoder::Zstd(d) => d.write_all(data),
        };
        r.map_err(|e| self.error(e))
    }

    /// Ends the stream: fails when it stopped in the middle; syncs the decoded file.
    pub(crate) fn finish(self) -> Result<Decoded, DownloadError> {
        let Self {
            compression,
            decoder,
            config,
        } = self;
        let finished = match decoder {
            Decoder::Xz(d) => d.finish(),
            Decoder::Gzip(d) => d.finish(),
            Decoder::Zstd(d) => d.finish(),
        };
        let out = finished.map_err(|e| classify(&config, compression, e))?;
        out.file
            .sync_data()
            .map_err(|e| DownloadError::io("sync", &config.out, e))?;
        Ok(Decoded {
            path: config.out,
            len: out.len,
            compression,
        })
    }

    fn error(&self, e: io::Error) -> DownloadError {
        classify(&self.config, self.compression, e)
    }
}

/// Sorts a decoder's error: a limit of the output, a write error of the pool, or bad data.
fn classify(config: &DecodeConfig, compression: Compression, e: io::Error) -> DownloadError {
    let e = match e.downcast::<OutLimit>() {
        Ok(OutLimit::TooLarge(limit)) => {
            return DownloadError::TooLarge {
                url: config.url.clone(),
                limit,
            };
        }
        Ok(OutLimit::Floor(e)) => return e,
        Err(e) => e,
    };
    if e.raw_os_error().is_some() {
        return DownloadError::io("write", &config.out, e);
    }
    DownloadError::CorruptImage {
        url: config.url.clone(),
        compression: compression.as_str(),
        detail: if e.kind() == ErrorKind::UnexpectedEof {
            "the compressed stream ends before its end marker (truncated)".into()
        } else {
            e.to_string()
        },
    }
}

/// Whether the errors mean the data must be deleted (not kept for resuming). The floor
/// ([`DownloadError::BelowFloor`]) keeps it, whichever of the two files reached it.
pub(crate) fn is_fatal(e: &DownloadError) -> bool {
    matches!(
        e,
        DownloadError::TooLarge { .. } | DownloadError::CorruptImage { .. }
    )
}

/// Rebuilds the decoder of a download resuming at `offset` from the kept `partial` file: its
/// compression from the first bytes, then the kept bytes decoded again into a truncated
/// decoded file. `Ok(None)` when `cancel` fired first.
pub(crate) fn resume(
    config: DecodeConfig,
    partial: &File,
    path: &Path,
    offset: u64,
    chunk: usize,
    cancel: &CancellationToken,
) -> Result<Option<Decode>, DownloadError> {
    let mut head = [0u8; MAGIC_LEN];
    let want = usize::try_from(offset).unwrap_or(MAGIC_LEN).min(MAGIC_LEN);
    let n = partial
        .read_at(&mut head[..want], 0)
        .map_err(|e| DownloadError::io("read", path, e))?;
    let mut decode = Decode::Pending(config, Vec::new());
    if n < MAGIC_LEN {
        // Too little kept to decide: feed it, the rest of the head follows.
        decode.feed(&head[..n])?;
        return Ok(Some(decode));
    }
    decode.feed(&head)?;
    if matches!(decode, Decode::Plain) {
        return Ok(Some(decode));
    }
    let mut buf = vec![0u8; chunk.max(4096)];
    let mut pos = MAGIC_LEN as u64;
    while pos < offset {
        if cancel.is_cancelled() {
            return Ok(None);
        }
        let want = usize::try_from(offset - pos)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = partial
            .read_at(&mut buf[..want], pos)
            .map_err(|e| DownloadError::io("read", path, e))?;
        if n == 0 {
            return Err(DownloadError::io(
                "read",
                path,
                io::Error::new(ErrorKind::UnexpectedEof, "the partial file shrank"),
            ));
        }
        decode.feed(&buf[..n])?;
        pos += n as u64;
    }
    Ok(Some(decode))
}

#[cfg(test)]
#[path = "decompress_tests.rs"]
mod tests;
