//! The on-disk state of an unfinished download: the locked partial file and its sidecar.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::DownloadError;
use super::checksum::Hasher;
use super::names::Paths;

/// What the server said about the file when the partial data was started; a resume is only
/// allowed when the server still says the same.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Sidecar {
    /// Format version.
    pub version: u32,
    /// The URL, without credentials.
    pub url: String,
    /// The entity tag of the response.
    pub etag: Option<String>,
    /// `Last-Modified` (HTTP) or `MDTM` (FTP).
    pub last_modified: Option<String>,
    /// The file's length.
    pub total_bytes: Option<u64>,
    /// Who the partial data belongs to ([`super::DownloadRequest::owner`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

pub(crate) const SIDECAR_VERSION: u32 = 1;

impl Sidecar {
    /// Whether partial data started under this sidecar may be resumed for `url` when the
    /// partial file holds `len` bytes: same URL and something to check the remote against.
    pub(crate) fn allows_resume(&self, url: &str, len: u64) -> bool {
        self.version == SIDECAR_VERSION
            && self.url == url
            && (self.etag.is_some() || self.last_modified.is_some() || self.total_bytes.is_some())
            && self.total_bytes.is_none_or(|total| len <= total)
    }

    /// Whether the server's current description contradicts this one. A field only one side
    /// has is not a contradiction.
    pub(crate) fn contradicts(&self, now: &Sidecar) -> bool {
        fn differs<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
            matches!((a, b), (Some(a), Some(b)) if a != b)
        }
        differs(&self.etag, &now.etag)
            || differs(&self.last_modified, &now.last_modified)
            || differs(&self.total_bytes, &now.total_bytes)
    }
}

/// Reads the sidecar; `None` when it is missing or unreadable (the partial is then unusable).
pub(crate) fn load_sidecar(path: &Path) -> Option<Sidecar> {
    load(path)
}

/// Writes the sidecar atomically (temporary file, fsync, rename).
pub(crate) fn save_sidecar(path: &Path, sidecar: &Sidecar) -> Result<(), DownloadError> {
    save(path, sidecar)
}

/// What a download with an owner leaves next to the file it finished, written before the
/// final rename and kept until the owner has recorded the completion, so that after a crash
/// (or a failed status write) in between the owner recognises the file as its own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DoneRecord {
    /// Format version.
    pub version: u32,
    /// [`super::DownloadRequest::owner`].
    pub owner: String,
    /// The URL, without credentials.
    pub url: String,
    /// The file's length.
    pub bytes: u64,
    /// The verified digest, as `algorithm:hex`, when a checksum was given.
    pub digest: Option<String>,
    /// The compression the file was served with (it is stored decompressed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<super::Compression>,
}

pub(crate) const DONE_VERSION: u32 = 1;

/// Reads the record of a finished download; `None` when missing or unreadable.
pub(crate) fn load_done(path: &Path) -> Option<DoneRecord> {
    load(path).filter(|d: &DoneRecord| d.version == DONE_VERSION)
}

/// Writes the record of a finished download atomically.
pub(crate) fn save_done(path: &Path, done: &DoneRecord) -> Result<(), DownloadError> {
    save(path, done)
}

fn load<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let data = std::fs::read(path).ok()?;
    serde_json::from_slice(&data).ok()
}

/// Writes JSON atomically (temporary file, fsync, rename).
fn save<T: Serialize>(path: &Path, sidecar: &T) -> Result<(), DownloadError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let json = serde_json::to_vec(sidecar).map_err(|e| {
        DownloadError::io(
            "encode",
            path,
            std::io::Error::new(ErrorKind::InvalidData, e),
        )
    })?;
    let mut file = File::create(&tmp).map_err(|e| DownloadError::io("create", &tmp, e))?;
    file.write_all(&json)
        .and_then(|()| file.sync_all())
        .map_err(|e| DownloadError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| DownloadError::io("rename", &tmp, e))
}

/// Opens (creating if needed) and exclusively locks the partial file. The lock is held as
/// long as the returned file is open; a second download of the same file gets
/// [`DownloadError::Busy`].
pub(crate) fn open_partial(paths: &Paths) -> Result<File, DownloadError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&paths.partial)
        .map_err(|e| DownloadError::io("open", &paths.partial, e))?;
    lock(&file, paths)?;
    Ok(file)
}

fn lock(file: &File, paths: &Paths) -> Result<(), DownloadError> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(DownloadError::Busy {
            path: paths.partial.clone(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(DownloadError::io("lock", &paths.partial, e)),
    }
}

/// Removes the partial file and its sidecar, if there. Fails with [`DownloadError::Busy`]
/// while a download of the same file runs.
pub(crate) fn discard(paths: &Paths) -> Result<(), DownloadError> {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .open(&paths.partial)
    {
        Ok(file) => {
            lock(&file, paths)?;
            remove_if_exists(&paths.partial)?;
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(DownloadError::io("open", &paths.partial, e)),
    }
    remove_if_exists(&paths.decoded)?;
    remove_if_exists(&paths.sidecar)
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<(), DownloadError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DownloadError::io("remove", path, e)),
    }
}

/// Feeds the first `len` bytes of `file` to `hasher`, in `chunk`-sized reads. Returns `false`
/// when `cancel` fired first.
pub(crate) fn hash_prefix(
    file: &File,
    path: &Path,
    len: u64,
    hasher: &mut Hasher,
    chunk: usize,
    cancel: &CancellationToken,
) -> Result<bool, DownloadError> {
    let mut buf = vec![0u8; chunk.max(4096)];
    let mut pos = 0u64;
    while pos < len {
        if cancel.is_cancelled() {
            return Ok(false);
        }
        let want = usize::try_from(len - pos)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = file
            .read_at(&mut buf[..want], pos)
            .map_err(|e| DownloadError::io("read", path, e))?;
        if n == 0 {
            return Err(DownloadError::io(
                "read",
                path,
                std::io::Error::new(ErrorKind::UnexpectedEof, "the partial file shrank"),
            ));
        }
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(true)
}

/// fsyncs a directory, so a rename or removal in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), DownloadError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| DownloadError::io("sync", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar(etag: Option<&str>, lm: Option<&str>, total: Option<u64>) -> Sidecar {
        Sidecar {
            version: SIDECAR_VERSION,
            url: "http://h/f".into(),
            etag: etag.map(Into::into),
            last_modified: lm.map(Into::into),
            total_bytes: total,
            owner: None,
        }
    }

    #[test]
    fn resume_needs_a_validator_and_same_url() {
        assert!(sidecar(Some("\"a\""), None, None).allows_resume("http://h/f", 10));
        assert!(sidecar(None, None, Some(10)).allows_resume("http://h/f", 10));
        assert!(!sidecar(None, None, Some(10)).allows_resume("http://h/f", 11));
        assert!(!sidecar(None, None, None).allows_resume("http://h/f", 1));
        assert!(!sidecar(Some("\"a\""), None, None).allows_resume("http://h/g", 1));
    }

    #[test]
    fn contradiction_needs_both_sides() {
        let a = sidecar(Some("\"a\""), Some("Mon"), Some(10));
        assert!(!a.contradicts(&a));
        assert!(a.contradicts(&sidecar(Some("\"b\""), Some("Mon"), Some(10))));
        assert!(a.contradicts(&sidecar(None, Some("Tue"), None)));
        assert!(a.contradicts(&sidecar(None, None, Some(11))));
        assert!(!a.contradicts(&sidecar(None, None, None)));
    }

    #[test]
    fn sidecar_round_trip_and_lock() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path(), "x.iso").unwrap();
        let s = sidecar(Some("\"a\""), None, Some(3));
        save_sidecar(&paths.sidecar, &s).unwrap();
        assert_eq!(load_sidecar(&paths.sidecar), Some(s));
        let held = open_partial(&paths).unwrap();
        assert!(matches!(
            open_partial(&paths),
            Err(DownloadError::Busy { .. })
        ));
        assert!(matches!(discard(&paths), Err(DownloadError::Busy { .. })));
        drop(held);
        discard(&paths).unwrap();
        assert!(!paths.partial.exists());
        assert!(!paths.sidecar.exists());
        std::fs::write(&paths.decoded, b"x").unwrap();
        discard(&paths).unwrap();
        assert!(!paths.decoded.exists(), "the decoded data goes too");
        discard(&paths).unwrap();
    }
}
