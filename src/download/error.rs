//! The one error type of the downloader.

use std::path::PathBuf;
use std::time::Duration;

use super::ChecksumAlgorithm;

/// A boxed error from a library the downloader uses (reqwest, rustls, suppaftp).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong while probing or downloading.
///
/// [`DownloadError::reason`] gives a CamelCase condition reason for each variant, and
/// [`DownloadError::is_transient`] tells whether trying again later may succeed (the retry
/// driver [`super::download`] retries exactly those).
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The URL does not parse, or its scheme is not http, https, ftp or ftps.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// The file name is empty, too long, starts with a dot or has a character other than
    /// ASCII letters, digits, `.`, `_` and `-`.
    #[error("invalid file name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The expected checksum is not a hex digest of the right length.
    #[error("invalid {algorithm} checksum {hex:?}: expected {expected_len} hex digits")]
    InvalidChecksum {
        /// The algorithm.
        algorithm: ChecksumAlgorithm,
        /// The digest as given.
        hex: String,
        /// How many hex digits the algorithm has.
        expected_len: usize,
    },
    /// The extra CA bundle could not be used.
    #[error("failed to load the extra CA certificates: {reason}")]
    InvalidCa {
        /// Why.
        reason: String,
    },
    /// The server says the file does not exist (HTTP 404/410, FTP 550).
    #[error("failed to find {url}: the server answered {reply}")]
    NotFound {
        /// The URL (without credentials).
        url: String,
        /// The server's status line or reply.
        reply: String,
    },
    /// The server refused the credentials, or access (HTTP 401/403/407, FTP 530/532).
    #[error("failed to get access to {url}: the server answered {reply}")]
    Unauthorized {
        /// The URL (without credentials).
        url: String,
        /// The server's status line or reply.
        reply: String,
    },
    /// The TLS handshake failed: unknown CA, wrong host name, expired certificate, no TLS.
    #[error("failed to establish a TLS session with {host}: {source}")]
    Tls {
        /// The server host.
        host: String,
        /// The TLS library's error.
        #[source]
        source: BoxError,
    },
    /// The downloaded data does not have the expected digest. The data was deleted.
    #[error(
        "failed to verify {url}: expected {algorithm} {expected}, got {actual}; the downloaded data was deleted"
    )]
    ChecksumMismatch {
        /// The URL (without credentials).
        url: String,
        /// The algorithm.
        algorithm: ChecksumAlgorithm,
        /// The expected digest (lower-case hex).
        expected: String,
        /// The digest of what was downloaded (lower-case hex).
        actual: String,
    },
    /// The server sent more data than it announced, or announced a length other than the
    /// expected one (an error page served with 200, a different file). Any partial data was
    /// deleted.
    #[error(
        "failed to download {url}: expected {expected} bytes, the server {detail} {actual}; the downloaded data was deleted"
    )]
    LengthMismatch {
        /// The URL (without credentials).
        url: String,
        /// The length that was expected.
        expected: u64,
        /// The length announced or received.
        actual: u64,
        /// "announced" or "sent".
        detail: &'static str,
    },
    /// The final file already exists in the directory.
    #[error("failed to download to {path}: the file already exists")]
    NameConflict {
        /// The final path.
        path: PathBuf,
    },
    /// The host is, or resolves to, an address in a network downloads may not reach
    /// ([`super::DownloadOptions::deny`]); checked on every connection, redirects included.
    #[error(
        "failed to download {url}: {host} is at {addr}, in the network {network} that downloads may not reach"
    )]
    DestinationNotAllowed {
        /// The URL (without credentials).
        url: String,
        /// The host that was refused (after a redirect, the redirect's).
        host: String,
        /// The refused address.
        addr: std::net::IpAddr,
        /// The denied network it is in, `address/length`.
        network: String,
        /// The network is one of the default deny list's (an allow list may open it), not
        /// one denied explicitly.
        default: bool,
    },
    /// Another download of the same file holds the lock on its partial file.
    #[error("failed to lock {path}: another download of this file is running")]
    Busy {
        /// The partial file.
        path: PathBuf,
    },
    /// The connection could not be made, or broke (reset, refused, DNS failure).
    #[error("failed to transfer {url}: {source}")]
    Network {
        /// The URL (without credentials).
        url: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// The server went quiet for longer than the timeout.
    #[error("failed to transfer {url}: no answer while {phase} for {after:?}")]
    Timeout {
        /// The URL (without credentials).
        url: String,
        /// What was being waited for.
        phase: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// The transfer was slower than the minimum rate over its window, or ran past the
    /// deadline of an attempt; the received part is kept for resuming.
    #[error("failed to transfer {url}: {detail}")]
    TooSlow {
        /// The URL (without credentials).
        url: String,
        /// Which limit, with its figures.
        detail: String,
    },
    /// The file is (announced as, or turned out) larger than the limit. Any partial data was
    /// deleted.
    #[error(
        "failed to download {url}: the file is larger than the limit of {limit} bytes; the downloaded data was deleted"
    )]
    TooLarge {
        /// The URL (without credentials).
        url: String,
        /// The limit.
        limit: u64,
    },
    /// The compressed data (xz, gzip or zstd) does not decode: corrupt, or it ends before
    /// its end marker. The downloaded data was deleted.
    #[error(
        "failed to decompress {url} ({compression}): {detail}; the downloaded data was deleted"
    )]
    CorruptImage {
        /// The URL (without credentials).
        url: String,
        /// `xz`, `gzip` or `zstd`.
        compression: &'static str,
        /// What the decoder said.
        detail: String,
    },
    /// The image is a qcow2 image the agent refuses (a backing file, an external data file,
    /// unknown incompatible features, encryption, a malformed header): QEMU would open files
    /// the image names. The downloaded data was deleted.
    #[error("failed to accept {url}: it is {detail}; the downloaded data was deleted")]
    UnsafeImage {
        /// The URL (without credentials).
        url: String,
        /// What was found ("a qcow2 image with a backing file …").
        detail: String,
    },
    /// The server answered with an HTML or XML document (an error or login page), not the
    /// file. Any partial data was deleted.
    #[error(
        "failed to download {url}: the server sent {detail}, not an image (an error or login page); the downloaded data was deleted"
    )]
    ErrorPage {
        /// The URL (without credentials).
        url: String,
        /// What was seen ("a Content-Type of text/html", "an HTML document").
        detail: String,
    },
    /// The body ended before the announced length; the received part is kept for resuming.
    #[error("failed to transfer {url}: the transfer ended after {received} of {expected} bytes")]
    Interrupted {
        /// The URL (without credentials).
        url: String,
        /// Bytes in the partial file.
        received: u64,
        /// Announced length.
        expected: u64,
    },
    /// Writing more would leave less than the floor free on the destination's filesystem
    /// (`--download-min-free-bytes`). The data written so far is kept.
    #[error(
        "failed to write {path}: {available} bytes are free there, below the {floor} bytes kept free, so the download stopped"
    )]
    BelowFloor {
        /// The partial file.
        path: PathBuf,
        /// Bytes free when checked.
        available: u64,
        /// The floor.
        floor: u64,
    },
    /// The caller's admission check ([`crate::download::Admit`]) refused the server's answer
    /// before any data was written.
    #[error("failed to download {url}: {why}")]
    NotAdmitted {
        /// The URL (without credentials).
        url: String,
        /// The caller's reason, as a sentence fragment.
        why: String,
    },
    /// The HTTP server answered a status the downloader cannot use.
    #[error("failed to download {url}: the server answered HTTP {status}")]
    HttpStatus {
        /// The URL (without credentials).
        url: String,
        /// The status code.
        status: u16,
    },
    /// The FTP server refused a command.
    #[error("failed to download {url}: the FTP server answered {reply}")]
    FtpReply {
        /// The URL (without credentials).
        url: String,
        /// The reply code.
        code: u32,
        /// The reply, code and text.
        reply: String,
    },
    /// The server spoke something the client did not understand.
    #[error("failed to download {url}: protocol error: {detail}")]
    Protocol {
        /// The URL (without credentials).
        url: String,
        /// What was wrong.
        detail: String,
    },
    /// A local file operation failed (pool directory missing, disk full, permissions).
    #[error("failed to {action} {path}: {source}")]
    Io {
        /// What was being done ("write", "rename", …).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The cancellation token fired. The partial data is kept.
    #[error("download of {url} cancelled; {kept} bytes kept for resuming")]
    Cancelled {
        /// The URL (without credentials).
        url: String,
        /// Bytes in the partial file.
        kept: u64,
    },
}

impl DownloadError {
    /// Whether the same download may succeed if tried again later: connection problems,
    /// timeouts, HTTP 5xx/408/429, FTP 4xx (421, 425, 426, 450, …), an interrupted body and a
    /// concurrent download of the same file.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Network { .. }
            | Self::Timeout { .. }
            | Self::TooSlow { .. }
            | Self::Interrupted { .. }
            | Self::Busy { .. } => true,
            Self::HttpStatus { status, .. } => is_transient_http(*status),
            Self::FtpReply { code, .. } => (400..500).contains(code),
            _ => false,
        }
    }

    /// A CamelCase condition reason for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidUrl { .. } => "InvalidURL",
            Self::InvalidName { .. } => "InvalidName",
            Self::InvalidChecksum { .. } => "InvalidChecksum",
            Self::InvalidCa { .. } => "InvalidCa",
            Self::NotFound { .. } => "NotFound",
            Self::Unauthorized { .. } => "Unauthorized",
            Self::Tls { .. } => "TlsError",
            Self::ChecksumMismatch { .. } => "ChecksumMismatch",
            Self::LengthMismatch { .. } => "LengthMismatch",
            Self::NameConflict { .. } => "NameConflict",
            Self::DestinationNotAllowed { .. } => "DestinationNotAllowed",
            Self::Busy { .. } => "DownloadBusy",
            Self::Network { .. } => "NetworkError",
            Self::Timeout { .. } | Self::TooSlow { .. } => "Timeout",
            Self::TooLarge { .. } => "TooLarge",
            Self::ErrorPage { .. } => "ErrorPage",
            Self::CorruptImage { .. } => "CorruptImage",
            Self::UnsafeImage { .. } => "UnsafeImage",
            Self::Interrupted { .. } => "TransferInterrupted",
            Self::BelowFloor { .. } => "InsufficientSpace",
            Self::NotAdmitted { .. } => "NotAdmitted",
            Self::HttpStatus { .. } => "ServerError",
            Self::FtpReply { .. } => "ServerError",
            Self::Protocol { .. } => "ProtocolError",
            Self::Io { .. } => "StorageError",
            Self::Cancelled { .. } => "Cancelled",
        }
    }

    pub(crate) fn denied(url: &str, denied: &super::deny::Denied) -> Self {
        Self::DestinationNotAllowed {
            url: url.to_owned(),
            host: denied.host.clone(),
            addr: denied.addr,
            network: format!("{}/{}", denied.network.0, denied.network.1),
            default: denied.default,
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// HTTP statuses worth retrying.
pub(crate) fn is_transient_http(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

/// Finds a cause of type `T` in an error chain, also looking inside `std::io::Error`s (whose
/// `source()` skips the error they wrap).
pub(crate) fn find_cause<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        if let Some(found) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| find_cause::<T>(inner))
        {
            return Some(found);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_classification() {
        let url = String::from("http://x/");
        let status = |status| DownloadError::HttpStatus {
            url: url.clone(),
            status,
        };
        assert!(status(500).is_transient());
        assert!(status(503).is_transient());
        assert!(status(429).is_transient());
        assert!(!status(400).is_transient());
        let ftp = |code| DownloadError::FtpReply {
            url: url.clone(),
            code,
            reply: String::new(),
        };
        assert!(ftp(421).is_transient());
        assert!(ftp(425).is_transient());
        assert!(ftp(426).is_transient());
        assert!(!ftp(501).is_transient());
        assert!(
            !DownloadError::NotFound {
                url: url.clone(),
                reply: "404".into()
            }
            .is_transient()
        );
    }

    #[test]
    fn finds_cause_inside_io_error() {
        let inner = std::fmt::Error;
        let io = std::io::Error::other(inner);
        assert!(find_cause::<std::fmt::Error>(&io).is_some());
        assert!(find_cause::<std::num::ParseIntError>(&io).is_none());
    }
}
