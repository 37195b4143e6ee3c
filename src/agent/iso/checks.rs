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

/// Parses `spec.url` as the downloader will.
pub fn check_url(url: &str) -> Result<(), IsoRefusal> {
    let invalid = |m: String| Refusal::fix(IsoReason::InvalidUrl, m);
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

/// Whether the rest of a file of `total` bytes, `kept` of which are there, fits in `available`.
pub fn check_space(
    total: Option<u64>,
    kept: u64,
    available: u64,
    pool: &str,
) -> Result<(), IsoRefusal> {
    let Some(total) = total else {
        return Ok(());
    };
    let remaining = total.saturating_sub(kept);
    if remaining > available {
        return Err(Refusal::fix(
            IsoReason::InsufficientSpace,
            format!(
                "The file needs {remaining} more bytes but pool {pool} has {available} available; free space or choose another pool."
            ),
        ));
    }
    Ok(())
}

/// What the download records before it writes anything.
pub fn target_of(spec: &IsoDownloadSpec, name: &str) -> DownloadTarget {
    DownloadTarget {
        url: spec.url.clone(),
        pool: spec.pool.clone(),
        name: name.to_string(),
    }
}

/// Which immutable field changed since the download started, as the start of a sentence.
pub fn spec_change(spec: &IsoDownloadSpec, recorded: Option<&DownloadTarget>) -> Option<String> {
    let recorded = recorded?;
    if spec.url != recorded.url {
        return Some(format!(
            "spec.url changed from {} to {}",
            recorded.url, spec.url
        ));
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
        spec.url = t.url;
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
        ..DownloadRequest::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn pool(name: &str, type_: &str, active: bool) -> StoragePoolSummary {
        StoragePoolSummary {
            name: name.into(),
            type_: type_.into(),
            path: Some(format!("/pools/{name}")),
            capacity: 100,
            allocation: 10,
            available: 90,
            active,
        }
    }

    fn spec(url: &str, name: Option<&str>, pool: &str) -> IsoDownloadSpec {
        serde_json::from_value(serde_json::json!({"url": url, "pool": pool, "name": name})).unwrap()
    }

    #[test]
    fn place_checks_url_name_and_pool_in_order() {
        let pools = [
            pool("p", "dir", true),
            pool("off", "dir", false),
            pool("lv", "logical", true),
        ];
        type Case<'a> = (
            &'a str,
            Option<&'a str>,
            &'a str,
            Result<&'a str, IsoReason>,
        );
        let cases: &[Case] = &[
            ("http://h/a.iso", None, "p", Ok("a.iso")),
            ("ftps://h/d/b.iso", Some("c.iso"), "p", Ok("c.iso")),
            (
                "http://h:99999/a.iso",
                None,
                "p",
                Err(IsoReason::InvalidUrl),
            ),
            ("file:///etc/passwd", None, "p", Err(IsoReason::InvalidUrl)),
            ("not a url", None, "p", Err(IsoReason::InvalidUrl)),
            ("http://h/", None, "p", Err(IsoReason::InvalidName)),
            (
                "http://h/a.iso",
                Some(".hidden"),
                "p",
                Err(IsoReason::InvalidName),
            ),
            (
                "http://h/a.iso",
                Some("a/b"),
                "p",
                Err(IsoReason::InvalidName),
            ),
            ("http://h/a.iso", None, "nope", Err(IsoReason::PoolNotFound)),
            ("http://h/a.iso", None, "off", Err(IsoReason::PoolNotFound)),
            ("http://h/a.iso", None, "lv", Err(IsoReason::PoolNotFound)),
            // The URL is checked before the pool.
            ("gopher://h/a.iso", None, "nope", Err(IsoReason::InvalidUrl)),
        ];
        for (url, name, p, want) in cases {
            let got = place(&spec(url, *name, p), &pools, "n1");
            match (got, want) {
                (Ok(pl), Ok(n)) => {
                    assert_eq!(pl.name, *n, "{url}");
                    assert_eq!(pl.dir, PathBuf::from("/pools/p"));
                    assert_eq!(pl.available, 90);
                }
                (Err(r), Err(w)) => {
                    assert_eq!(r.reason, *w, "{url} {name:?} {p}: {}", r.message);
                    assert!(!r.message.is_empty());
                }
                (got, want) => panic!("{url} {name:?} {p}: {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn checksums_of_the_wrong_length_are_refused_up_front() {
        let with = |alg: &str, len: usize| {
            let mut s = spec("http://h/a.iso", None, "p");
            s.checksum = serde_json::from_value(
                serde_json::json!({"algorithm": alg, "value": "a".repeat(len)}),
            )
            .unwrap();
            s
        };
        let pools = [pool("p", "dir", true)];
        for (alg, good) in [("sha256", 64), ("sha512", 128), ("sha1", 40), ("md5", 32)] {
            assert!(place(&with(alg, good), &pools, "n").is_ok(), "{alg}");
            for bad in [good - 1, good + 1, 32, 64, 128] {
                if bad == good {
                    continue;
                }
                let e = place(&with(alg, bad), &pools, "n").unwrap_err();
                assert_eq!(e.reason, IsoReason::InvalidChecksum, "{alg} {bad}");
                assert!(
                    e.message.contains(&format!("has {bad} hex digits")),
                    "{}",
                    e.message
                );
            }
        }
        // Before the pool: a bad checksum on a missing pool says what is wrong with it.
        let e = place(&with("sha256", 63), &[], "n").unwrap_err();
        assert_eq!(e.reason, IsoReason::InvalidChecksum);
    }

    #[test]
    fn pool_messages_name_the_node() {
        let e = pool_dir(&[], "x", "n7").unwrap_err();
        assert!(e.message.contains("n7") && e.message.contains("does not exist"));
        let e = pool_dir(&[pool("x", "dir", false)], "x", "n7").unwrap_err();
        assert!(e.message.contains("virsh pool-start x"), "{}", e.message);
    }

    #[test]
    fn space_counts_only_the_missing_bytes() {
        let table: &[(Option<u64>, u64, u64, bool)] = &[
            (None, 0, 0, true),
            (Some(100), 0, 100, true),
            (Some(100), 0, 99, false),
            (Some(100), 60, 40, true),
            (Some(100), 60, 39, false),
            (Some(100), 200, 0, true),
        ];
        for (total, kept, available, ok) in table {
            let r = check_space(*total, *kept, *available, "p");
            assert_eq!(r.is_ok(), *ok, "{total:?} {kept} {available}");
            if let Err(e) = r {
                assert_eq!(e.reason, IsoReason::InsufficientSpace);
                assert!(e.message.contains("pool p"), "{}", e.message);
            }
        }
    }

    #[test]
    fn spec_changes_name_the_field() {
        let recorded = DownloadTarget {
            url: "http://h/a.iso".into(),
            pool: "p".into(),
            name: "a.iso".into(),
        };
        let table: &[(IsoDownloadSpec, Option<&str>)] = &[
            (spec("http://h/a.iso", None, "p"), None),
            (spec("http://h/a.iso", Some("a.iso"), "p"), None),
            (
                spec("http://h/b.iso", Some("a.iso"), "p"),
                Some("spec.url changed"),
            ),
            (spec("http://h/a.iso", None, "q"), Some("spec.pool changed")),
            (
                spec("http://h/a.iso", Some("b.iso"), "p"),
                Some("The volume name changed"),
            ),
        ];
        for (s, want) in table {
            let got = spec_change(s, Some(&recorded));
            assert_eq!(
                got.as_deref()
                    .map(|g| g.split(" from ").next().unwrap_or_default()),
                *want,
                "{s:?}"
            );
        }
        assert_eq!(spec_change(&spec("http://h/b.iso", None, "q"), None), None);
    }

    #[test]
    fn the_request_carries_owner_and_checksum() {
        let mut s = spec("http://h/a.iso", None, "p");
        s.checksum =
            serde_json::from_value(serde_json::json!({"algorithm": "sha256", "value": "ab"}))
                .unwrap();
        let r = own_request(&s, Some("uid".into()), Path::new("/d"), "a.iso");
        assert_eq!(r.owner.as_deref(), Some("uid"));
        assert_eq!(r.dir, PathBuf::from("/d"));
        let c = r.checksum.unwrap();
        assert_eq!(
            (c.algorithm, c.hex.as_str()),
            (download::ChecksumAlgorithm::Sha256, "ab")
        );
    }
}
