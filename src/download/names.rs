//! File names: the default name from a URL, validation, and the partial/sidecar paths.

use std::path::{Path, PathBuf};

use percent_encoding::percent_decode_str;

use super::DownloadError;

/// Longest accepted name in bytes, leaving room for the `.` prefix and `.part.json` suffix
/// within the usual 255-byte limit of a file name.
pub const MAX_NAME_LEN: usize = 240;

/// Whether `c` may appear in a name: ASCII letters, digits, `.`, `_` and `-`.
fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// The file name a URL suggests: its last non-empty path segment, percent-decoded, with
/// every character other than ASCII letters, digits, `.`, `_` and `-` (and a leading dot)
/// replaced by `_`, so it obeys [`validate_name`]
/// (`https://host/isos/debian%2012.iso?x=1` gives `debian_12.iso`).
///
/// Fails with [`DownloadError::InvalidUrl`] when the URL does not parse or its path has no
/// segment, and with [`DownloadError::InvalidName`] when the name would be longer than
/// [`MAX_NAME_LEN`] bytes.
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
    let decoded = percent_decode_str(segment).decode_utf8_lossy();
    let mut name: String = decoded
        .chars()
        .map(|c| if allowed(c) { c } else { '_' })
        .collect();
    if name.starts_with('.') {
        name.replace_range(..1, "_");
    }
    validate_name(&name)?;
    Ok(name)
}

/// Checks that `name` is a plain file name the downloader can use: only ASCII letters,
/// digits, `.`, `_` and `-`, not starting with `.` (those are the downloader's own partial
/// files), 1 to [`MAX_NAME_LEN`] bytes.
pub fn validate_name(name: &str) -> Result<(), DownloadError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if !name.chars().all(allowed) {
        Some("it may only contain ASCII letters, digits, '.', '_' and '-'")
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
    /// The decompressed data of a compressed source, `dir/.name.part.out`.
    pub decoded: PathBuf,
    /// The record of a finished download of a request with an owner, `dir/.name.done.json`.
    pub done: PathBuf,
}

impl Paths {
    /// The paths for `name` in `dir`. Validates the name.
    pub fn new(dir: &Path, name: &str) -> Result<Self, DownloadError> {
        validate_name(name)?;
        Ok(Self {
            target: dir.join(name),
            partial: dir.join(format!(".{name}.part")),
            sidecar: dir.join(format!(".{name}.part.json")),
            decoded: dir.join(format!(".{name}.part.out")),
            done: dir.join(format!(".{name}.done.json")),
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
            "Fedora_40.iso"
        );
        assert!(matches!(
            default_name("https://example.org/"),
            Err(DownloadError::InvalidUrl { .. })
        ));
        assert_eq!(name("https://example.org/.hidden"), "_hidden");
        assert_eq!(name("https://example.org/a%2Fb"), "a_b");
        assert_eq!(name("https://example.org/caf%C3%A9%00.iso"), "caf__.iso");
        assert_eq!(name("https://example.org/%FF.iso"), "_.iso");
        assert_eq!(
            name(&format!("https://example.org/{}", "a".repeat(240))).len(),
            240
        );
        assert!(matches!(
            default_name(&format!("https://example.org/{}", "a".repeat(241))),
            Err(DownloadError::InvalidName { .. })
        ));
        for url in [
            "https://example.org/x%20y%3Fz",
            "https://example.org/%2E%2E%2Fetc",
            "https://example.org/Ünïcödé.iso",
        ] {
            validate_name(&name(url)).unwrap();
        }
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
        assert!(validate_name("a b").is_err());
        assert!(validate_name("é").is_err());
        assert!(validate_name(&"a".repeat(240)).is_ok());
        assert!(validate_name(&"a".repeat(241)).is_err());
    }

    #[test]
    fn the_crd_pattern_has_the_same_length_limit() {
        let limit = format!("{{0,{}}}$", MAX_NAME_LEN - 1);
        assert!(crate::api::VOLUME_NAME_PATTERN.ends_with(&limit));
    }

    #[test]
    fn partial_paths() {
        let p = Paths::new(Path::new("/pool"), "x.iso").unwrap();
        assert_eq!(p.target, Path::new("/pool/x.iso"));
        assert_eq!(p.partial, Path::new("/pool/.x.iso.part"));
        assert_eq!(p.sidecar, Path::new("/pool/.x.iso.part.json"));
        assert_eq!(p.done, Path::new("/pool/.x.iso.done.json"));
    }
}
