//! Backing chains for callers that hold a file (a VMClone's disk): an image whose only finding is
//! its backing file is accepted when every link of its chain lies in the allowed directories,
//! declares the next link's format (raw or qcow2), and is itself judged safe; the headers are
//! read, nothing else of an image is opened, and nothing outside the directories at all.

use std::path::{Path, PathBuf};

use super::qcow2::{self, Finding, Verdict};

/// The most links a chain may have (QEMU's own limit is 16).
const MAX_CHAIN: usize = 16;

/// The backing files of the image at `real` (judged `verdict`; symlinks resolved, nearest first,
/// empty for a standalone image) when it may be used, or why not: like [`Verdict::refusal`],
/// except that a backing file is accepted when its whole chain is inside `dirs` (see the module).
/// Blocking: reads headers.
pub fn allowed(real: &Path, verdict: Verdict, dirs: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    match &verdict {
        Verdict::Unsafe(found) if found.as_slice() == [Finding::BackingFile] => check(real, dirs),
        other => other.refusal().map_or(Ok(Vec::new()), Err),
    }
}

/// Follows the chain below `image`; the backing files, nearest first.
fn check(image: &Path, dirs: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let inside = |p: &Path| dirs.iter().any(|d| p.starts_with(d));
    let mut chain = Vec::new();
    let mut current = image.to_path_buf();
    let mut header = qcow2::read_header(image).map_err(|e| format!("unreadable ({e})"))?;
    for depth in 1..=MAX_CHAIN {
        let h = match qcow2::parse(&header) {
            Ok(Some(h)) => h,
            _ => return Err("a malformed qcow2 image".into()),
        };
        let Some(name) = h.backing_file.and_then(|n| String::from_utf8(n).ok()) else {
            return Ok(chain);
        };
        let declared = match h.backing_format.as_deref() {
            Some(f @ ("raw" | "qcow2")) => f.to_string(),
            _ => {
                return Err(format!(
                    "a qcow2 image whose backing file (link {depth}) has no declared raw or qcow2 format"
                ));
            }
        };
        let named = PathBuf::from(&name);
        let named = if named.is_absolute() {
            named
        } else {
            current.parent().unwrap_or(Path::new("/")).join(named)
        };
        let real = std::fs::canonicalize(&named)
            .ok()
            .filter(|r| inside(r))
            .ok_or_else(|| {
                format!(
                    "a qcow2 image whose backing chain (link {depth}) leaves the directories this namespace may use"
                )
            })?;
        header = qcow2::read_header(&real).map_err(|e| format!("unreadable ({e})"))?;
        let verdict = qcow2::judge(&header);
        let format = if verdict.is_qcow2() { "qcow2" } else { "raw" };
        if format != declared {
            return Err(format!(
                "a qcow2 image whose backing file (link {depth}) is {format} but declared {declared}"
            ));
        }
        match &verdict {
            Verdict::NotQcow2 | Verdict::Safe(_) => {}
            Verdict::Unsafe(found) if found.as_slice() == [Finding::BackingFile] => {}
            other => {
                return Err(format!(
                    "a qcow2 image whose backing file (link {depth}) is {}",
                    other.refusal().unwrap_or_default()
                ));
            }
        }
        chain.push(real.clone());
        current = real;
    }
    Err(format!(
        "a qcow2 image whose backing chain is longer than {MAX_CHAIN}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_img(args: &[&str]) -> bool {
        Command::new("qemu-img")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    #[test]
    fn chains_inside_the_directories_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let (a, b) = (root.join("a"), root.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let base = b.join("base.qcow2");
        let over = a.join("over.qcow2");
        let probed = a.join("probed.qcow2");
        let s = |p: &Path| p.to_str().unwrap().to_string();
        assert!(
            qemu_img(&["create", "-q", "-f", "qcow2", &s(&base), "1M"]),
            "qemu-img is needed for this test"
        );
        assert!(qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            &s(&base),
            &s(&over)
        ]));
        // qemu-img no longer writes a backing file without its format: a header by hand.
        std::fs::write(&probed, qcow2::sample(0, Some(s(&base).as_bytes()))).unwrap();
        let judge =
            |p: &Path, dirs: &[PathBuf]| allowed(p, qcow2::judge_file(p).unwrap(), dirs).err();
        assert_eq!(judge(&over, &[a.clone(), b.clone()]), None);
        assert_eq!(judge(&base, std::slice::from_ref(&b)), None, "standalone");
        let outside = judge(&over, std::slice::from_ref(&a)).unwrap();
        assert!(outside.contains("leaves the directories"), "{outside}");
        assert!(!outside.contains("base.qcow2"), "{outside}");
        let undeclared = judge(&probed, &[a, b]).unwrap();
        assert!(undeclared.contains("no declared"), "{undeclared}");
    }
}
