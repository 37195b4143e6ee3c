//! HTTP byte ranges: the `Range` header sent when resuming and the `Content-Range` answered.

/// The `Range` header value asking for everything from `offset` on.
pub(crate) fn range_from(offset: u64) -> String {
    format!("bytes={offset}-")
}

/// A parsed `Content-Range` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ContentRange {
    /// `bytes first-last/total` (`total` is `None` for `*`).
    Bytes {
        /// First byte position.
        first: u64,
        /// Last byte position, inclusive.
        last: u64,
        /// Complete length, when known.
        total: Option<u64>,
    },
    /// `bytes */total`, sent with 416 Range Not Satisfiable.
    Unsatisfied {
        /// Complete length.
        total: u64,
    },
}

/// Parses a `Content-Range` value (RFC 9110 §14.4). `None` when it is malformed.
pub(crate) fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes")?;
    let rest = rest.strip_prefix(' ')?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = total.trim();
    if range.trim() == "*" {
        return Some(ContentRange::Unsatisfied {
            total: parse_u64(total)?,
        });
    }
    let (first, last) = range.trim().split_once('-')?;
    let (first, last) = (parse_u64(first)?, parse_u64(last)?);
    let total = if total == "*" {
        None
    } else {
        Some(parse_u64(total)?)
    };
    if last < first || total.is_some_and(|t| last >= t) {
        return None;
    }
    Some(ContentRange::Bytes { first, last, total })
}

/// Parses a decimal number made of ASCII digits only (no sign, no spaces).
fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Whether an entity tag is strong (usable in `If-Range`, RFC 9110 §13.1.5).
pub(crate) fn is_strong_etag(etag: &str) -> bool {
    !etag.starts_with("W/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_header() {
        assert_eq!(range_from(0), "bytes=0-");
        assert_eq!(range_from(1234), "bytes=1234-");
    }

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some(ContentRange::Bytes {
                first: 100,
                last: 199,
                total: Some(1000)
            })
        );
        assert_eq!(
            parse_content_range("bytes 0-0/*"),
            Some(ContentRange::Bytes {
                first: 0,
                last: 0,
                total: None
            })
        );
        assert_eq!(
            parse_content_range("bytes */1000"),
            Some(ContentRange::Unsatisfied { total: 1000 })
        );
        assert_eq!(parse_content_range("bytes 200-100/1000"), None);
        assert_eq!(parse_content_range("bytes 0-1000/1000"), None);
        assert_eq!(parse_content_range("bytes -5-10/100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes 0-1"), None);
        assert_eq!(parse_content_range("bytes +0-1/2"), None);
    }

    #[test]
    fn strong_etags() {
        assert!(is_strong_etag("\"abc\""));
        assert!(!is_strong_etag("W/\"abc\""));
    }
}
