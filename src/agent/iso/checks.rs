//! The pure checks of a request: URL, volume name, pool, room for the file, and which
//! immutable field changed since the download started. Each is a function of the spec and what
//! was observed; none reads anything.

use std::path::{Path, PathBuf};

use super::reason::IsoReason;
use crate::agent::refusal::Refusal;
use crate::api::{
    ChecksumAlgorithm, DownloadTarget, IsoDownload, IsoDownloadSpec, StoragePoolSummary,
};
use crate::download::{self, Checksum, DownloadRequest};
use crate::libvirt::volume::holds_files;

/// A refusal of this kind.
pub type IsoRefusal = Refusal<IsoReason>;

/// Where the file goes: the pool's directory, the volume name and the pool's free space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    /// The pool's directory.
    pub dir: PathBuf,
    /// The volume (file) name.
    pub name: String,
    /// Bytes available in the pool.
    pub available: u64,
}

/// `url` without a `user:password@` part, for status, Events and logs.
pub fn redact_url(url: &str) -> String {
    if let Ok(mut parsed) = reqwest::Url::parse(url) {
        if parsed.username().is_empty() && parsed.password().is_none() {
            return url.to_string();
        }
        // Both only fail for URLs that cannot have credentials, which then have none.
        let _ = parsed.set_password(None);
        let _ = parsed.set_username("");
        return parsed.to_string();
    }
    // Not a URL: drop whatever stands between the scheme and an `@` in the authority.
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// Whether the URL carries a user name or password.
fn has_userinfo(url: &reqwest::Url) -> bool {
    !url.username().is_empty() || url.password().is_some()
}

/// Credentials (a Secret, or `user:password@` in the URL) go over plain `http` or `ftp` only
/// when the object says so.
pub fn check_credentials_transport(spec: &IsoDownloadSpec) -> Result<(), IsoRefusal> {
    let Ok(url) = reqwest::Url::parse(&spec.url) else {
        return Ok(());
    };
    let plain = matches!(url.scheme(), "http" | "ftp");
    if plain && (spec.auth.is_some() || has_userinfo(&url)) && !spec.allow_plain_text_credentials {
        return Err(Refusal::fix(
            IsoReason::CredentialsNotAllowed,
            format!(
                "The download sends credentials over plain {}, where anyone on the path can read them; use {}s, or set spec.allowPlainTextCredentials to accept the risk.",
                url.scheme(),
                url.scheme()
            ),
        ));
    }
    Ok(())
}

/// Parses `spec.url` as the downloader will.
pub fn check_url(url: &str) -> Result<(), IsoRefusal> {
    let invalid = |m: String| Refusal::fix(IsoReason::InvalidUrl, m);
    let url = &redact_url(url);
    let parsed = reqwest::Url::parse(url).map_err(|e| {
        invalid(format!(
            "spec.url {url:?} is not a valid URL ({e}); use the form scheme://host[:port]/path/file.iso with a port up to 65535."
        ))
    })?;
    if !matches!(parsed.scheme(), "http" | "https" | "ftp" | "ftps") {
        return Err(invalid(format!(
            "spec.url {url:?} is not an http, https, ftp or ftps URL; use one of those schemes."
        )));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid(format!(
            "spec.url {url:?} has no host; use scheme://host/path/file.iso."
        )));
    }
    Ok(())
}

/// The volume name: `spec.name`, or the one derived from the URL; checked.
pub fn volume_name(spec: &IsoDownloadSpec) -> Result<String, IsoRefusal> {
    let name = match &spec.name {
        Some(n) => n.clone(),
        None => download::default_name(&spec.url).map_err(|e| {
            Refusal::fix(
                IsoReason::InvalidName,
                format!("No volume name can be derived from the URL: {e}. Set spec.name."),
            )
        })?,
    };
    download::validate_name(&name).map_err(|e| {
        Refusal::fix(
            IsoReason::InvalidName,
            format!(
                "{e}. Use ASCII letters, digits, '.', '_' and '-', no leading dot, at most {} bytes.",
                download::MAX_NAME_LEN
            ),
        )
    })?;
    Ok(name)
}

/// The directory of pool `pool` when it is an active directory pool.
pub fn pool_dir(
    pools: &[StoragePoolSummary],
    pool: &str,
    node: &str,
) -> Result<(PathBuf, u64), IsoRefusal> {
    let Some(p) = pools.iter().find(|p| p.name == pool) else {
        return Err(Refusal::fix(
            IsoReason::PoolNotFound,
            format!(
                "Storage pool {pool} does not exist on node {node}; create it or fix spec.pool."
            ),
        ));
    };
    match &p.path {
        Some(dir) if p.active && holds_files(&p.type_) => Ok((PathBuf::from(dir), p.available)),
        _ => Err(Refusal::fix(
            IsoReason::PoolNotFound,
            format!(
                "Storage pool {pool} on node {node} is not an active directory pool; start it (virsh pool-start {pool}) or choose another."
            ),
        )),
    }
}

/// A checksum whose digest has the wrong number of hex digits for its algorithm is refused
/// before the download waits for a slot.
pub fn check_checksum(spec: &IsoDownloadSpec) -> Result<(), IsoRefusal> {
    let Some(c) = &spec.checksum else {
        return Ok(());
    };
    let alg = algorithm(c.algorithm);
    let value = c.value.trim();
    if value.len() != alg.hex_len() {
        return Err(Refusal::fix(
            IsoReason::InvalidChecksum,
            format!(
                "spec.checksum.value has {} hex digits, but a {alg} digest has {}; copy the whole digest from the mirror's checksum file, or fix spec.checksum.algorithm.",
                value.len(),
                alg.hex_len()
            ),
        ));
    }
    if !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Refusal::fix(
            IsoReason::InvalidChecksum,
            "spec.checksum.value has characters other than hex digits (0-9, a-f).".to_string(),
        ));
    }
    Ok(())
}

/// URL, name, checksum and pool checked, in that order: where the file goes.
pub fn place(
    spec: &IsoDownloadSpec,
    pools: &[StoragePoolSummary],
    node: &str,
) -> Result<Place, IsoRefusal> {
    check_url(&spec.url)?;
    let name = volume_name(spec)?;
    check_checksum(spec)?;
    check_credentials_transport(spec)?;
    let (dir, available) = pool_dir(pools, &spec.pool, node)?;
    Ok(Place {
        dir,
        name,
        available,
    })
}

/// The refusal when the pool already has a file or volume of the name that is not this
/// object's finished download.
pub fn name_conflict(pool: &str, name: &str) -> IsoRefusal {
    Refusal::fix(
        IsoReason::NameConflict,
        format!(
            "Pool {pool} already has a volume named {name}; choose another spec.name or remove it."
        ),
    )
}

/// The refusal when another object's unfinished (say, paused) download of the name is in the
/// pool: the name stays reserved for it.
pub fn partial_conflict(pool: &str, name: &str) -> IsoRefusal {
    Refusal::fix(
        IsoReason::NameConflict,
        format!(
            "Pool {pool} holds another download's unfinished data for the name {name}; choose another spec.name."
        ),
    )
}

/// The space a download needs and the pool it goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space<'a> {
    /// The file's length, when announced.
    pub total: Option<u64>,
    /// Bytes of it already there.
    pub kept: u64,
    /// Bytes free in the pool.
    pub available: u64,
    /// Bytes the pool keeps free (`--download-min-free-bytes`).
    pub floor: u64,
    /// The pool's name.
    pub pool: &'a str,
}

impl Space<'_> {
    /// The bytes to reserve: the rest of the file (nothing when its length is unknown; the
    /// size limit bounds it then).
    pub fn need(&self) -> u64 {
        self.total.map_or(0, |t| t.saturating_sub(self.kept))
    }

    /// Whether the rest of the file fits in the pool, next to `others` bytes reserved by
    /// other downloads in flight, leaving the floor free.
    pub fn check(&self, others: u64) -> Result<(), IsoRefusal> {
        let need = self.need();
        let usable = self
            .available
            .saturating_sub(others)
            .saturating_sub(self.floor);
        if need > usable || (self.total.is_none() && usable == 0) {
            let pool = self.pool;
            let available = self.available;
            let floor = self.floor;
            return Err(Refusal::fix(
                IsoReason::InsufficientSpace,
                format!(
                    "The file needs {need} more bytes; pool {pool} has {available} available, of which {others} are reserved by other downloads in flight and {floor} are kept free; free space or choose another pool."
                ),
            ));
        }
        Ok(())
    }
}

/// What the download records before it writes anything.
pub fn target_of(spec: &IsoDownloadSpec, name: &str) -> DownloadTarget {
    DownloadTarget {
        url: redact_url(&spec.url),
        pool: spec.pool.clone(),
        name: name.to_string(),
    }
}

/// Which immutable field changed since the download started, as the start of a sentence.
pub fn spec_change(spec: &IsoDownloadSpec, recorded: Option<&DownloadTarget>) -> Option<String> {
    let recorded = recorded?;
    let (now, then) = (redact_url(&spec.url), redact_url(&recorded.url));
    if now != then {
        return Some(format!("spec.url changed from {then} to {now}"));
    }
    if spec.pool != recorded.pool {
        return Some(format!(
            "spec.pool changed from {} to {}",
            recorded.pool, spec.pool
        ));
    }
    let name = spec
        .name
        .clone()
        .or_else(|| download::default_name(&spec.url).ok());
    if name.as_deref() != Some(recorded.name.as_str()) {
        return Some(format!(
            "The volume name changed from {} to {}",
            recorded.name,
            name.as_deref().unwrap_or("(none)")
        ));
    }
    None
}

/// The spec as the download started it: `url`, `pool` and `name` as recorded in
/// `status.target` (the spec itself when nothing was recorded).
pub fn as_started(obj: &IsoDownload) -> IsoDownloadSpec {
    let mut spec = obj.spec.clone();
    if let Some(t) = obj.status.as_ref().and_then(|s| s.target.clone()) {
        // The recorded URL has no credentials; the spec's (the same URL) keeps them.
        if redact_url(&spec.url) != redact_url(&t.url) {
            spec.url = t.url;
        }
        spec.pool = t.pool;
        spec.name = Some(t.name);
    }
    spec
}

fn algorithm(a: ChecksumAlgorithm) -> download::ChecksumAlgorithm {
    match a {
        ChecksumAlgorithm::Sha256 => download::ChecksumAlgorithm::Sha256,
        ChecksumAlgorithm::Sha512 => download::ChecksumAlgorithm::Sha512,
        ChecksumAlgorithm::Sha1 => download::ChecksumAlgorithm::Sha1,
        ChecksumAlgorithm::Md5 => download::ChecksumAlgorithm::Md5,
    }
}

/// The parts of the download request that identify it: URL, place, checksum and owner (the
/// object's UID), without credentials.
pub fn own_request(
    spec: &IsoDownloadSpec,
    owner: Option<String>,
    dir: &Path,
    name: &str,
) -> DownloadRequest {
    DownloadRequest {
        url: spec.url.clone(),
        dir: dir.to_owned(),
        name: name.to_owned(),
        checksum: spec.checksum.as_ref().map(|c| Checksum {
            algorithm: algorithm(c.algorithm),
            hex: c.value.clone(),
        }),
        owner,
        allow_markup: spec.allow_markup,
        disk_image: true,
        ..DownloadRequest::default()
    }
}

#[cfg(test)]
#[path = "checks_tests.rs"]
mod tests;
