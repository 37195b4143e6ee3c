//! The end of an attempt: rebuilding a decoder when resuming, verifying, finishing the
//! decoding, checking the image, deleting or finalizing.

use std::fs::File;

use tokio_util::sync::CancellationToken;

use super::super::decompress::{self, Decode, DecodeConfig, Decoded};
use super::super::sink::SinkDone;
use super::super::state::{self, DONE_VERSION, DoneRecord};
use super::super::{DownloadError, blocking};
use super::Job;

impl Job<'_> {
    /// Rebuilds the decoder of a compressed download resuming at `offset` (see
    /// [`decompress::resume`]); `None` when cancelled first.
    pub(super) async fn rebuild(
        &self,
        config: &DecodeConfig,
        file: File,
        offset: u64,
        cancel: &CancellationToken,
    ) -> Result<(File, Option<Decode>), DownloadError> {
        let config = config.clone();
        let path = self.paths.partial.clone();
        let chunk = self.options.buffer_size;
        let token = cancel.clone();
        let rebuilt = blocking(move || {
            let decode = decompress::resume(config, &file, &path, offset, chunk, &token);
            Ok((file, decode))
        })
        .await?;
        match rebuilt {
            (file, Ok(decode)) => Ok((file, decode)),
            (file, Err(e)) => {
                if decompress::is_fatal(&e) {
                    self.discard_held(file).await?;
                }
                Err(e)
            }
        }
    }

    /// Ends the decoding of a complete compressed file, then checks the image (the decoded
    /// one, or the file as served when it is not compressed) for a disk image. A stream that
    /// stops in the middle, or an image refused (the inner error), is to delete everything.
    pub(super) async fn decoded(
        &self,
        done: &mut SinkDone,
    ) -> Result<Result<Option<Decoded>, DownloadError>, DownloadError> {
        if self.decode.is_none() {
            return Ok(Ok(None));
        }
        let active = done.decode.take();
        let partial = self.paths.partial.clone();
        let url = self.display.clone();
        blocking(move || {
            let decoded = match active {
                Some(a) => match a.finish() {
                    Ok(d) => Some(d),
                    Err(e) => return Ok(Err(e)),
                },
                None => None,
            };
            let image = decoded.as_ref().map_or(partial, |d| d.path.clone());
            let header = crate::image::qcow2::read_header(&image)
                .map_err(|e| DownloadError::io("read", &image, e))?;
            if let Some(detail) = crate::image::qcow2::judge(&header).refusal() {
                return Ok(Err(DownloadError::UnsafeImage { url, detail }));
            }
            Ok(Ok(decoded))
        })
        .await
    }

    /// Compares the digest; the outer error is an internal inconsistency, the inner one the
    /// mismatch.
    pub(super) fn verify(
        &self,
        done: &SinkDone,
    ) -> Result<Result<(), DownloadError>, DownloadError> {
        let Some((algorithm, expected)) = &self.checksum else {
            return Ok(Ok(()));
        };
        let Some(actual) = &done.digest else {
            return Err(DownloadError::Protocol {
                url: self.display.clone(),
                detail: "no digest was computed".into(),
            });
        };
        if actual == expected {
            Ok(Ok(()))
        } else {
            Ok(Err(DownloadError::ChecksumMismatch {
                url: self.display.clone(),
                algorithm: *algorithm,
                expected: expected.clone(),
                actual: actual.clone(),
            }))
        }
    }

    /// Deletes the partial file (whose lock we hold), its decoded data and its sidecar.
    pub(super) async fn discard_held(&self, file: File) -> Result<(), DownloadError> {
        let paths = self.paths.clone();
        blocking(move || {
            state::remove_if_exists(&paths.decoded)?;
            state::remove_if_exists(&paths.partial)?;
            state::remove_if_exists(&paths.sidecar)?;
            drop(file);
            if let Some(dir) = paths.partial.parent() {
                state::sync_dir(dir)?;
            }
            Ok(())
        })
        .await
    }

    /// Renames the synced partial file (or, for a compressed one, its decoded data) to its
    /// final name and removes the rest; with an owner, records the finished download first
    /// (see [`crate::download::finished`]).
    pub(super) async fn finalize(
        &self,
        file: File,
        bytes: u64,
        decoded: Option<Decoded>,
    ) -> Result<(), DownloadError> {
        let paths = self.paths.clone();
        let done = self.owner.clone().map(|owner| DoneRecord {
            version: DONE_VERSION,
            owner,
            url: self.display.clone(),
            bytes,
            digest: self
                .checksum
                .as_ref()
                .map(|(alg, hex)| format!("{alg}:{hex}")),
            compression: decoded.as_ref().map(|d| d.compression),
        });
        blocking(move || {
            if paths.target.exists() {
                return Err(DownloadError::NameConflict {
                    path: paths.target.clone(),
                });
            }
            if let Some(done) = &done {
                state::save_done(&paths.done, done)?;
            }
            let source = decoded.map_or_else(|| paths.partial.clone(), |d| d.path);
            std::fs::rename(&source, &paths.target)
                .map_err(|e| DownloadError::io("rename", &source, e))?;
            // The compressed data, when the decoded data became the file.
            state::remove_if_exists(&paths.partial)?;
            drop(file);
            state::remove_if_exists(&paths.sidecar)?;
            if let Some(dir) = paths.target.parent() {
                state::sync_dir(dir)?;
            }
            Ok(())
        })
        .await
    }
}
