//! Tells an image's format from its magic bytes, and an HTML or XML page (a server's error or
//! login page) from an image. Pure functions of a file's first bytes, plus [`sniff_file`]
//! which reads them.

use std::io::Read;
use std::path::Path;

/// Bytes of a file's head that [`format`] looks at: the system area (32 KiB) and sixteen
/// 2 KiB sectors of ISO 9660 volume descriptors or the UDF volume recognition sequence.
pub const HEAD_LEN: usize = SYSTEM_AREA + 16 * SECTOR;

/// Bytes of a response's head that [`markup`] needs at most (it also decides on fewer, at
/// the end of a short body).
pub const MARKUP_LEN: usize = 1024;

const SYSTEM_AREA: usize = 32 * 1024;
const SECTOR: usize = 2048;
const QCOW2_MAGIC: &[u8] = b"QFI\xfb";

/// An image format found by its magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// An ISO 9660 file system (`CD001` volume descriptors), without UDF.
    Iso9660,
    /// A UDF file system (an `NSR02`/`NSR03` descriptor in the volume recognition sequence),
    /// UDF-only or a UDF bridge disc that also has ISO 9660 descriptors.
    Udf,
    /// A qcow2 image (`QFI\xfb`).
    Qcow2,
    /// None of these: raw data.
    Raw,
}

impl Format {
    /// The lower-case name written in status (`iso9660`, `udf`, `qcow2`, `raw`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Iso9660 => "iso9660",
            Self::Udf => "udf",
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The format of a file whose first bytes are `head` (up to [`HEAD_LEN`] of them are used).
pub fn format(head: &[u8]) -> Format {
    if head.starts_with(QCOW2_MAGIC) {
        return Format::Qcow2;
    }
    // Volume descriptors (ISO 9660) and the volume recognition sequence (UDF, ECMA-167 2/8)
    // share the sector layout: a type byte, then a 5-byte standard identifier.
    let mut iso = false;
    let mut udf = false;
    let mut at = SYSTEM_AREA;
    while at + 6 <= head.len().min(HEAD_LEN) {
        match &head[at + 1..at + 6] {
            b"CD001" => iso = true,
            b"NSR02" | b"NSR03" => udf = true,
            b"BEA01" | b"TEA01" | b"BOOT2" | b"CDW02" => {}
            _ => break,
        }
        at += SECTOR;
    }
    match (udf, iso) {
        (true, _) => Format::Udf,
        (false, true) => Format::Iso9660,
        (false, false) => Format::Raw,
    }
}

/// Whether a `Content-Type` names an HTML or XML document.
pub fn markup_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    matches!(
        essence.as_str(),
        "text/html" | "application/xhtml+xml" | "text/xml" | "application/xml"
    ) || essence.ends_with("+xml") && essence.starts_with("application/")
}

/// What kind of document `head` starts with, when it is HTML or XML: a UTF-8 byte-order mark
/// and white space, then a tag that opens an HTML or XML document.
pub fn markup(head: &[u8]) -> Option<&'static str> {
    let head = head.strip_prefix(b"\xef\xbb\xbf").unwrap_or(head);
    let start = head.iter().position(|b| !b.is_ascii_whitespace())?;
    let rest = &head[start..];
    let lower: Vec<u8> = rest.iter().take(16).map(u8::to_ascii_lowercase).collect();
    const HTML: &[&[u8]] = &[
        b"<!doctype html",
        b"<html",
        b"<head",
        b"<body",
        b"<title",
        b"<!--",
        b"<script",
        b"<meta",
        b"<h1",
        b"<p>",
        b"<div",
        b"<center",
    ];
    if HTML.iter().any(|t| lower.starts_with(t)) {
        return Some("an HTML document");
    }
    if lower.starts_with(b"<?xml") || lower.starts_with(b"<!doctype") {
        return Some("an XML document");
    }
    None
}

/// The format of the file at `path`, from its first [`HEAD_LEN`] bytes. Blocking.
pub fn sniff_file(path: &Path) -> std::io::Result<Format> {
    let file = std::fs::File::open(path)?;
    let mut head = Vec::with_capacity(HEAD_LEN);
    file.take(HEAD_LEN as u64).read_to_end(&mut head)?;
    Ok(format(&head))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_descriptors(ids: &[&[u8; 5]]) -> Vec<u8> {
        let mut v = vec![0u8; SYSTEM_AREA];
        for id in ids {
            let mut sector = vec![0u8; SECTOR];
            sector[0] = 1;
            sector[1..6].copy_from_slice(*id);
            v.extend_from_slice(&sector);
        }
        v.extend_from_slice(&[0u8; SECTOR]);
        v
    }

    #[test]
    fn formats_by_magic() {
        let cases: &[(Vec<u8>, Format)] = &[
            (b"QFI\xfb\0\0\0\x03rest".to_vec(), Format::Qcow2),
            (with_descriptors(&[b"CD001", b"CD001"]), Format::Iso9660),
            (
                with_descriptors(&[b"BEA01", b"NSR02", b"TEA01"]),
                Format::Udf,
            ),
            (
                with_descriptors(&[b"CD001", b"BEA01", b"NSR03", b"TEA01"]),
                Format::Udf,
            ),
            (with_descriptors(&[b"XXXXX", b"CD001"]), Format::Raw),
            (vec![0u8; 1 << 20], Format::Raw),
            (b"short".to_vec(), Format::Raw),
            (Vec::new(), Format::Raw),
        ];
        for (head, want) in cases {
            assert_eq!(format(head), *want, "{} bytes", head.len());
        }
        // A truncated head past the first descriptor still counts what it has.
        let iso = with_descriptors(&[b"CD001"]);
        assert_eq!(format(&iso[..SYSTEM_AREA + 6]), Format::Iso9660);
        assert_eq!(Format::Udf.to_string(), "udf");
    }

    #[test]
    fn markup_by_content() {
        let html: &[&[u8]] = &[
            b"<!DOCTYPE html><html>",
            b"\xef\xbb\xbf  \r\n<HTML><body>Not found",
            b"<html>",
            b"<!-- error --><p>x</p>",
            b"\n\n<head><title>403",
        ];
        for h in html {
            assert_eq!(markup(h), Some("an HTML document"), "{h:?}");
        }
        for x in [&b"<?xml version=\"1.0\"?><Error>"[..], b"<!DOCTYPE foo>"] {
            assert_eq!(markup(x), Some("an XML document"), "{x:?}");
        }
        let not: &[&[u8]] = &[
            b"QFI\xfb",
            b"\0\0\0\0<html>",
            b"",
            b"   ",
            b"<",
            b"\xeb\x63\x90<html>",
            b"plain text <html>",
        ];
        for n in not {
            assert_eq!(markup(n), None, "{n:?}");
        }
    }

    #[test]
    fn markup_by_type() {
        for t in [
            "text/html",
            "text/html; charset=utf-8",
            " TEXT/HTML ",
            "application/xhtml+xml",
            "application/xml",
            "text/xml",
            "application/atom+xml",
        ] {
            assert!(markup_type(t), "{t}");
        }
        for t in [
            "application/octet-stream",
            "application/x-iso9660-image",
            "text/plain",
            "",
        ] {
            assert!(!markup_type(t), "{t}");
        }
    }
}
