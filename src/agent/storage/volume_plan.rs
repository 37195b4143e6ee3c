//! The pure decisions of `spec.source.volume.create`: whether to create the volume, grow it or
//! leave it, or why not; and whether a golden image's backing chain may be used (every link in
//! a granted pool, judged from the headers observe read, none with a data file).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::observe::Observed;
use super::reason::StorageReason;
use super::source::{self, FileKind, Found, PathFacts, Resolved, SourceFacts};
use crate::agent::refusal::Refusal;
use crate::api::{
    BackingVolume, DiskFormat, Preallocation, VirtualMachineStorageSpec, VolumeCreate,
};
use crate::image::qcow2::{self, Finding, Verdict};
use crate::libvirt::facade::VolumeLookup;
use crate::libvirt::provision::{BackingLink, NewVolume};
use crate::tenancy::Grants;

type Refused = Refusal<StorageReason>;

/// The most links a backing chain may have (QEMU's own limit is 16).
pub const MAX_CHAIN: usize = 16;

/// What observe found about `create.backingVolume`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingFacts {
    /// The backing volume as named in the spec.
    pub volume: BackingVolume,
    /// What libvirt said of it.
    pub lookup: VolumeLookup,
    /// Its file (first) and the files of its own backing chain, in order, as far as observe
    /// followed them (it stops at the first link it may not open).
    pub links: Vec<PathFacts>,
    /// The directories of the pools granted to the namespace: where every link must lie.
    pub dirs: Vec<PathBuf>,
}

/// What to do with the volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeStep {
    /// Create it.
    Create(NewVolume),
    /// Grow it from `from` to `to` bytes.
    Grow {
        /// The capacity now.
        from: u64,
        /// The capacity asked for.
        to: u64,
    },
    /// Nothing: it is there, this object's, at the capacity asked for.
    Keep,
}

/// The bytes of a Kubernetes quantity (`10Gi`, `1.5G`, `512Mi`, `1e9`, `1000`), rounded up to
/// a whole byte; `None` when it is no quantity or not a positive number of bytes that fits.
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let mult: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        e if e.starts_with(['e', 'E']) => 10u128.checked_pow(e[1..].parse::<u32>().ok()?)?,
        _ => return None,
    };
    let digits: u128 = format!("{int}{frac}").parse().ok()?;
    let scale = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    let bytes = digits.checked_mul(mult)?.div_ceil(scale);
    u64::try_from(bytes).ok().filter(|b| *b > 0)
}

/// `bytes` rounded up to whole 512-byte sectors (what QEMU makes of a size).
fn sectors(bytes: u64) -> u64 {
    bytes.div_ceil(512).saturating_mul(512)
}

/// The libvirt name of a format.
fn format_name(f: DiskFormat) -> &'static str {
    match f {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    }
}

/// The capacity asked for, in bytes, or why it is no size.
pub fn capacity(create: &VolumeCreate) -> Result<u64, Refused> {
    quantity_bytes(&create.capacity.0).map(sectors).ok_or_else(|| {
        Refusal::fix(
            StorageReason::InvalidSpec,
            format!(
                "spec.source.volume.create.capacity {:?} is not a positive size; write it as a Kubernetes quantity such as 10Gi or 512Mi.",
                create.capacity.0
            ),
        )
    })
}

/// Decides what to do with volume `name` of pool `pool`: `existing` is its capacity (`None`
/// when there is none), `recorded` the (pool, name) of the volume this object's record says it
/// created, `chain` the judged backing chain of an overlay (see [`judge_chain`]).
pub fn decide(
    create: &VolumeCreate,
    pool: &str,
    name: &str,
    existing: Option<u64>,
    recorded: Option<(&str, &str)>,
    chain: &[BackingLink],
) -> Result<VolumeStep, Refused> {
    let invalid = |m: &str| Err(Refusal::fix(StorageReason::InvalidSpec, m.to_string()));
    // Another volume would be created and the one this object made forgotten (never reclaimed).
    if let Some((p, n)) = recorded
        && (p, n) != (pool, name)
    {
        return Err(Refusal::fix(
            StorageReason::FieldImmutable,
            format!(
                "This object created volume {n} in pool {p}; spec.source.volume cannot name another volume. Set it back, or delete this object and create a new one."
            ),
        ));
    }
    let ours = recorded.is_some();
    let want = capacity(create)?;
    let format = create.format.unwrap_or(DiskFormat::Qcow2);
    let prealloc = create.preallocation.unwrap_or_default();
    if let Some(b) = &create.backing_volume {
        if format != DiskFormat::Qcow2 {
            return invalid(
                "An overlay (create.backingVolume) is always qcow2; set create.format to qcow2 or leave it out.",
            );
        }
        if prealloc != Preallocation::Off {
            return invalid(
                "create.preallocation cannot be used with create.backingVolume: an overlay holds only what the guest writes.",
            );
        }
        if b.pool == pool && b.name == name {
            return invalid(
                "create.backingVolume names the volume itself; name the golden image to build the overlay on.",
            );
        }
    }
    if prealloc == Preallocation::Metadata && format == DiskFormat::Raw {
        return invalid(
            "create.preallocation metadata is for qcow2 only; use off or full for a raw volume.",
        );
    }
    match existing {
        None => Ok(VolumeStep::Create(NewVolume {
            name: name.to_string(),
            capacity: want,
            format: format_name(format).into(),
            allocation: if prealloc == Preallocation::Full {
                want
            } else {
                0
            },
            prealloc_metadata: prealloc == Preallocation::Metadata,
            backing: chain.first().cloned(),
        })),
        Some(_) if !ours => Err(Refusal::wait(
            StorageReason::NameConflict,
            format!(
                "Volume {name} already exists in pool {pool} and was not created by this object; nothing was changed. Choose another spec.source.volume.name, or remove create to attach the existing volume as it is."
            ),
            Duration::from_secs(60),
        )),
        Some(have) if want < have => Err(Refusal::fix(
            StorageReason::InvalidSpec,
            format!(
                "spec.source.volume.create.capacity ({want} bytes) is below the volume's size ({have} bytes); a volume is never shrunk. Set capacity to at least {have} bytes; nothing was changed."
            ),
        )),
        Some(have) if want > have => Ok(VolumeStep::Grow {
            from: have,
            to: want,
        }),
        Some(_) => Ok(VolumeStep::Keep),
    }
}

/// A refusal of the backing chain.
fn unsafe_chain(volume: &BackingVolume, why: impl std::fmt::Display) -> Refused {
    Refusal::fix(
        StorageReason::UnsafeImage,
        format!(
            "The golden image {} of pool {} cannot back an overlay: {why}. Use a standalone qcow2 or raw image, or a chain whose every image lies in a pool granted to this namespace.",
            volume.name, volume.pool
        ),
    )
}

/// Judges the backing volume and its chain: its pool granted, found as a file, and every
/// link a file inside `dirs` (the directories of the granted pools) whose header is a raw
/// image or a qcow2 image with no data file, no unknown feature, no encryption, and a backing
/// file only with a declared raw or qcow2 format. The chain, nearest first, for the overlay's
/// `<backingStore>`.
pub fn judge_chain(
    facts: &BackingFacts,
    grants: &Grants,
    dirs: &[PathBuf],
) -> Result<Vec<BackingLink>, Refused> {
    let v = &facts.volume;
    if !grants.pool(&v.pool) {
        return Err(Refusal::fix(
            StorageReason::NotGranted,
            grants.pool_refusal(&v.pool),
        ));
    }
    match &facts.lookup {
        VolumeLookup::Found(found) if found.is_file => {}
        VolumeLookup::Found(_) => {
            return Err(unsafe_chain(
                v,
                "it is not a file in a directory pool, which the agent cannot check",
            ));
        }
        _ => {
            return Err(Refusal::wait(
                StorageReason::SourceNotFound,
                format!(
                    "The golden image {} does not exist in pool {}; create or download it first (the overlay is made as soon as it exists).",
                    v.name, v.pool
                ),
                Duration::from_secs(60),
            ));
        }
    }
    let mut chain = Vec::new();
    // The format the previous link declared for this one (the volume's own is read from it).
    let mut declared: Option<String> = None;
    for (i, link) in facts.links.iter().enumerate() {
        let nth = if i == 0 {
            "the image".to_string()
        } else {
            format!("link {i} of its backing chain")
        };
        let Found::Present {
            real,
            kind: Ok(FileKind::File),
            header: Some(header),
        } = &link.found
        else {
            return Err(match &link.found {
                Found::Present { real, .. } if !dirs.iter().any(|d| real.starts_with(d)) => {
                    unsafe_chain(
                        v,
                        format!("{nth} lies outside the pools granted to this namespace"),
                    )
                }
                _ => unsafe_chain(v, format!("{nth} is missing or not a readable file")),
            });
        };
        if !dirs.iter().any(|d| real.starts_with(d)) {
            return Err(unsafe_chain(
                v,
                format!("{nth} lies outside the pools granted to this namespace"),
            ));
        }
        let verdict = qcow2::judge(header);
        let (format, next) = match &verdict {
            Verdict::NotQcow2 => ("raw", None),
            Verdict::Safe(_) => ("qcow2", None),
            Verdict::Unsafe(found) if found.as_slice() == [Finding::BackingFile] => {
                let h = qcow2::parse(header).ok().flatten().unwrap_or_default();
                ("qcow2", Some(h))
            }
            other => {
                return Err(unsafe_chain(
                    v,
                    format!(
                        "{nth} is {}",
                        other.refusal().unwrap_or_else(|| "refused".into())
                    ),
                ));
            }
        };
        if let Some(d) = &declared
            && d != format
        {
            return Err(unsafe_chain(
                v,
                format!("{nth} is {format}, but the image before it declares it {d}"),
            ));
        }
        chain.push(BackingLink {
            path: real.to_string_lossy().into_owned(),
            format: format.into(),
        });
        let Some(h) = next else {
            return Ok(chain);
        };
        match h.backing_format.as_deref() {
            Some(f @ ("raw" | "qcow2")) => declared = Some(f.to_string()),
            _ => {
                return Err(unsafe_chain(
                    v,
                    format!(
                        "{nth} has a backing file without a declared raw or qcow2 format (QEMU would probe it)"
                    ),
                ));
            }
        }
        if i + 1 >= MAX_CHAIN {
            break;
        }
    }
    Err(unsafe_chain(
        v,
        format!("its backing chain is longer than {MAX_CHAIN} images or could not be followed"),
    ))
}

/// The source of `spec` resolved (see [`source::resolve`]) and, for an overlay of
/// `create.backingVolume`, its judged backing chain: the overlay's backing file is accepted only
/// when it is exactly that chain's first link.
pub fn resolve(
    spec: &VirtualMachineStorageSpec,
    observed: &Observed,
) -> Result<(Option<Resolved>, Vec<BackingLink>), Refused> {
    let dirs = observed.usable_dirs();
    let grants = &observed.grants;
    let plain = || source::resolve(&observed.source, &dirs, grants, spec.format, &observed.node);
    let (Some(backing), Some(v)) = (
        &observed.backing,
        spec.source.as_ref().and_then(|s| s.volume.as_ref()),
    ) else {
        return Ok((plain()?, Vec::new()));
    };
    if !grants.pool(&v.pool) {
        return Ok((plain()?, Vec::new()));
    }
    let chain = judge_chain(backing, grants, &backing.dirs)?;
    let ok = matches!(&observed.source, SourceFacts::Volume { file: Some(f), .. } if backed_by_chain(f, &chain));
    let resolved = source::resolve_with(
        &observed.source,
        &dirs,
        grants,
        spec.format,
        &observed.node,
        ok,
    )?;
    Ok((resolved, if ok { chain } else { Vec::new() }))
}

/// Where the backing file named in a qcow2 header points: relative names are relative to
/// the image's directory (as QEMU reads them).
pub fn backing_path(image: &Path, header: &[u8]) -> Option<PathBuf> {
    let h = qcow2::parse(header).ok().flatten()?;
    let name = String::from_utf8(h.backing_file?).ok()?;
    let p = PathBuf::from(name);
    Some(if p.is_absolute() {
        p
    } else {
        image.parent().unwrap_or(Path::new("/")).join(p)
    })
}

/// Whether the overlay at `file` is backed by exactly the first link of `chain` (then its
/// backing file is the allowed chain, and the agent accepts it).
pub fn backed_by_chain(file: &PathFacts, chain: &[BackingLink]) -> bool {
    let Found::Present {
        real,
        header: Some(header),
        ..
    } = &file.found
    else {
        return false;
    };
    let (Some(first), Some(named)) = (chain.first(), backing_path(real, header)) else {
        return false;
    };
    named == Path::new(&first.path)
}

#[cfg(test)]
#[path = "volume_plan_tests.rs"]
mod tests;
