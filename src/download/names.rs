//! File names: the default name from a URL, validation, and the partial/sidecar paths.

use std::path::{Path, PathBuf};

use percent_encoding::percent_decode_str;

use super::DownloadError;

/// Longest accepted name in bytes, leaving room for the `.` prefix and `.part.json` suffix
/// within the usual 255-byte limit of a file name.
const MAX_NAME_LEN: usize = 240;

/// The file name a URL suggests: its last non-empty path segment, percent-decoded
/// (`https://host/isos/debian%2012.iso?x=1` gives `debian 12.iso`).
///
/// Fails with [`DownloadError::InvalidUrl`] when the URL does not parse or its path has no
/// segment, and with [`DownloadError::InvalidName`] when the segment is not a usable name.
pub fn default_name(url: &str) -> Result<String, DownloadError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| DownloadError::InvalidUrl {
        url: url.to_owned(),
        reason: e.to_string(),
    })?;
    let segment = parsed
        .path_segments()
        .and_then(|mut segments| segments.rfind(|s| !s.is_empty()))
        .ok_or_else(|| DownloadError::InvalidUrl {
            url: url.to_owned(),
            reason: "the URL path names no file".into(),
        })?;
    let name = percent_decode_str(segment)
        .decode_utf8()
        .map_err(|_| DownloadError::InvalidName {
            name: segment.to_owned(),
            reason: "it is not valid UTF-8 once decoded",
        })?
        .into_owned();
    validate_name(&name)?;
    Ok(name)
}

/// Checks that `name` is a plain file name the downloader can use: not empty, no `/` or NUL,
/// not starting with `.` (those are the downloader's own partial files), at most 240 bytes.
pub fn validate_name(name: &str) -> Result<(), DownloadError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.contains('/') || name.contains('\0') {
        Some("it must not contain '/' or NUL")
    } else if name.starts_with('.') {
        Some("it must not start with '.'")
    } else if name.len() > MAX_NAME_LEN {
        Some("it is longer than 240 bytes")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(DownloadError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Where a download of `name` into `dir` keeps its data and state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    /// The final file, `dir/name`.
    pub target: PathBuf,
    /// The partial data, `dir/.name.part`.
    pub partial: PathBuf,
    /// The resume state, `dir/.name.part.json`.
    pub sidecar: PathBuf,
}

impl Paths {
    /// The paths for `name` in `dir`. Validates the name.
    pub fn new(dir: &Path, name: &str) -> Result<Self, DownloadError> {
        validate_name(name)?;
        Ok(Self {
            target: dir.join(name),
            partial: dir.join(format!(".{name}.part")),
            sidecar: dir.join(format!(".{name}.part.json")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_name_from_url() {
        let name = |u: &str| default_name(u).unwrap();
        assert_eq!(name("https://example.org/isos/debian.iso"), "debian.iso");
        assert_eq!(
            name("https://example.org/isos/debian.iso?token=1#x"),
            "debian.iso"
        );
        assert_eq!(name("http://example.org/a/b/"), "b");
        assert_eq!(
            name("ftp://example.org/pub/Fedora%2040.iso"),
            "Fedora 40.iso"
        );
        assert!(matches!(
            default_name("https://example.org/"),
            Err(DownloadError::InvalidUrl { .. })
        ));
        assert!(matches!(
            default_name("https://example.org/.hidden"),
            Err(DownloadError::InvalidName { .. })
        ));
        assert!(matches!(
            default_name("https://example.org/a%2Fb"),
            Err(DownloadError::InvalidName { .. })
        ));
        assert!(matches!(
            default_name("not a url"),
            Err(DownloadError::InvalidUrl { .. })
        ));
    }

    #[test]
    fn name_validation() {
        assert!(validate_name("debian-12.iso").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("..").is_err());
        assert!(validate_name(".x.part").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(&"a".repeat(241)).is_err());
    }

    #[test]
    fn partial_paths() {
        let p = Paths::new(Path::new("/pool"), "x.iso").unwrap();
        assert_eq!(p.target, Path::new("/pool/x.iso"));
        assert_eq!(p.partial, Path::new("/pool/.x.iso.part"));
        assert_eq!(p.sidecar, Path::new("/pool/.x.iso.part.json"));
    }
}
