//! The writer: a blocking thread that hashes and writes the buffers the network task fills,
//! so hashing and disk writes overlap with receiving.
//!
//! Memory is bounded: the channel holds one buffer, the writer works on one and the network
//! task fills one, and written buffers come back for reuse.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::DownloadError;
use super::checksum::Hasher;
use super::decompress::{Active, Decode};
use super::limits::Floor;
use super::state::{Sidecar, save_sidecar};

/// What the writer starts from.
pub(crate) struct SinkStart {
    /// The locked partial file.
    pub file: File,
    /// Its path, for errors.
    pub path: PathBuf,
    /// Where the data received goes: the partial's length when resuming, 0 for a fresh start
    /// (the file is then truncated).
    pub start: u64,
    /// For a fresh start: the sidecar to write, after truncating and before any data.
    pub sidecar: Option<(PathBuf, Sidecar)>,
    /// The digest so far (already fed the first `start` bytes when resuming).
    pub hasher: Option<Hasher>,
    /// The free space the file's filesystem keeps, checked as data is written.
    pub floor: Option<Floor>,
    /// Decompression, for a disk image: pending for a fresh start, rebuilt from the first
    /// `start` bytes when resuming (see the `decompress` module).
    pub decode: Option<Decode>,
}

/// What the writer ends with.
pub(crate) struct SinkDone {
    /// The partial file, still locked, data synced to disk.
    pub file: File,
    /// Its length.
    pub len: u64,
    /// The digest of the whole file, when one was asked for.
    pub digest: Option<String>,
    /// The decoder, when the data is compressed; finished by the caller once the whole
    /// file arrived.
    pub decode: Option<Box<Active>>,
    /// Why decoding stopped, when it failed (the data is then to be deleted).
    pub failure: Option<DownloadError>,
}

/// The network task's end of the writer.
pub(crate) struct Sink {
    tx: Option<mpsc::Sender<Vec<u8>>>,
    recycled: mpsc::UnboundedReceiver<Vec<u8>>,
    handle: JoinHandle<Result<SinkDone, DownloadError>>,
    buffer_size: usize,
    path: PathBuf,
}

impl Sink {
    pub(crate) fn spawn(start: SinkStart, buffer_size: usize) -> Self {
        let (tx, rx) = mpsc::channel(1);
        let (recycle_tx, recycled) = mpsc::unbounded_channel();
        let path = start.path.clone();
        let handle = tokio::task::spawn_blocking(move || run(start, rx, recycle_tx));
        Self {
            tx: Some(tx),
            recycled,
            handle,
            buffer_size,
            path,
        }
    }

    /// An empty buffer to fill: a written one if available, else a new one.
    pub(crate) fn buffer(&mut self) -> Vec<u8> {
        self.recycled
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(self.buffer_size))
    }

    /// Hands a filled buffer to the writer. `false` when the writer has stopped (its error
    /// comes from [`Sink::finish`]).
    pub(crate) async fn write(&mut self, buf: Vec<u8>) -> bool {
        if buf.is_empty() {
            return true;
        }
        match &self.tx {
            Some(tx) => tx.send(buf).await.is_ok(),
            None => false,
        }
    }

    /// Waits for the writer to write everything handed to it and sync the file.
    pub(crate) async fn finish(mut self) -> Result<SinkDone, DownloadError> {
        drop(self.tx.take());
        self.handle.await.map_err(|e| {
            DownloadError::io(
                "write",
                self.path.clone(),
                std::io::Error::other(format!("the writer thread failed: {e}")),
            )
        })?
    }
}

fn run(
    start: SinkStart,
    mut rx: mpsc::Receiver<Vec<u8>>,
    recycle: mpsc::UnboundedSender<Vec<u8>>,
) -> Result<SinkDone, DownloadError> {
    let SinkStart {
        mut file,
        path,
        start,
        sidecar,
        mut hasher,
        mut floor,
        mut decode,
    } = start;
    let io = |action| {
        let path = path.clone();
        move |e| DownloadError::io(action, path, e)
    };
    // Never leave bytes past `start`: a fresh start truncates, a resume cuts anything the
    // caller did not count (there should be none).
    file.set_len(start).map_err(io("truncate"))?;
    if let Some((sidecar_path, sidecar)) = sidecar {
        save_sidecar(&sidecar_path, &sidecar)?;
    }
    file.seek(SeekFrom::Start(start)).map_err(io("seek"))?;
    let mut len = start;
    let mut result = Ok(());
    let mut failure = None;
    while let Some(mut buf) = rx.blocking_recv() {
        // Before writing more: a filesystem at its floor stops the download, data kept.
        if let Some(f) = floor.as_mut()
            && f.due(buf.len() as u64)
        {
            f.check(&file, &path)?;
        }
        if let Some(h) = hasher.as_mut() {
            h.update(&buf);
        }
        if let Err(e) = file.write_all(&buf) {
            result = Err(e);
            break;
        }
        len += buf.len() as u64;
        if let Some(Err(e)) = decode.as_mut().map(|d| d.feed(&buf)) {
            if !super::decompress::is_fatal(&e) {
                // The floor (or a write error) of the decoded data: kept, as for the data
                // as served.
                return Err(e);
            }
            // Stop receiving: the data is to be deleted.
            failure = Some(e);
            break;
        }
        buf.clear();
        // The network task may be gone; then the buffer is simply freed.
        let _ = recycle.send(buf);
    }
    result.map_err(io("write"))?;
    file.sync_data().map_err(io("sync"))?;
    if failure.is_none()
        && let Some(Err(e)) = decode.as_mut().map(Decode::decide)
    {
        // A body shorter than the magic bytes.
        failure = Some(e);
    }
    Ok(SinkDone {
        file,
        len,
        digest: hasher.map(Hasher::finish_hex),
        decode: decode.and_then(Decode::active),
        failure,
    })
}
