//! The reasons an IsoDownload's `Ready` and `Progressing` conditions report: the agent's own and
//! the downloader's, one closed set.

use crate::agent::refusal;
use crate::download::DownloadError;

/// Why an IsoDownload is where it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IsoReason {
    /// The URL is not http, https, ftp or ftps, or not a URL.
    InvalidUrl,
    /// The volume name is not allowed.
    InvalidName,
    /// The pool is not granted to the object's namespace.
    NotGranted,
    /// The pool does not exist or is inactive.
    PoolNotFound,
    /// The pool already has a volume of that name.
    NameConflict,
    /// The pool lacks room for the rest of the file.
    InsufficientSpace,
    /// A Secret or ConfigMap the spec names is missing or lacks the key.
    CredentialsNotFound,
    /// Waiting for a download slot.
    Queued,
    /// Transferring.
    Downloading,
    /// Checking data against the checksum: kept data before resuming, or the whole file.
    Verifying,
    /// Paused by `spec.paused`.
    Paused,
    /// The volume is in the pool.
    Completed,
    /// A transient failure; retried later.
    Retrying,
    /// Accepted; the download task starts.
    Starting,
    /// `spec.url`, `spec.name` or `spec.pool` changed after the download started.
    SpecChanged,
    /// The checksum in the spec is malformed.
    InvalidChecksum,
    /// The CA bundle does not parse.
    InvalidCa,
    /// The server has no such file.
    NotFound,
    /// The server refused the credentials.
    Unauthorized,
    /// The TLS handshake failed (an untrusted certificate, say).
    TlsError,
    /// The file does not match the checksum.
    ChecksumMismatch,
    /// The server sent another length than it announced.
    LengthMismatch,
    /// The host is in a network downloads may not reach (`--download-deny-cidr`).
    DestinationNotAllowed,
    /// Another download of the same file runs.
    DownloadBusy,
    /// The connection failed.
    NetworkError,
    /// The server stopped answering.
    Timeout,
    /// The transfer broke off.
    TransferInterrupted,
    /// The server answered with an error.
    ServerError,
    /// The server broke the protocol.
    ProtocolError,
    /// Writing to the pool failed.
    StorageError,
    /// The download was cancelled.
    Cancelled,
    /// The file is larger than the node's or the object's size limit.
    TooLarge,
    /// The server sent an HTML or XML page instead of the file.
    ErrorPage,
    /// A plain-HTTP or plain-FTP password, or a Secret not opted in for this host.
    CredentialsNotAllowed,
    /// The compressed file does not decompress (corrupt or truncated).
    CorruptImage,
    /// The downloaded qcow2 image has a backing file, a data file or features refused.
    UnsafeImage,
}

impl refusal::Reason for IsoReason {
    const ALL: &'static [Self] = &[
        Self::InvalidUrl,
        Self::InvalidName,
        Self::NotGranted,
        Self::PoolNotFound,
        Self::NameConflict,
        Self::InsufficientSpace,
        Self::CredentialsNotFound,
        Self::Queued,
        Self::Downloading,
        Self::Verifying,
        Self::Paused,
        Self::Completed,
        Self::Retrying,
        Self::Starting,
        Self::SpecChanged,
        Self::InvalidChecksum,
        Self::InvalidCa,
        Self::NotFound,
        Self::Unauthorized,
        Self::TlsError,
        Self::ChecksumMismatch,
        Self::LengthMismatch,
        Self::DestinationNotAllowed,
        Self::DownloadBusy,
        Self::NetworkError,
        Self::Timeout,
        Self::TransferInterrupted,
        Self::ServerError,
        Self::ProtocolError,
        Self::StorageError,
        Self::Cancelled,
        Self::TooLarge,
        Self::ErrorPage,
        Self::CredentialsNotAllowed,
        Self::CorruptImage,
        Self::UnsafeImage,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::InvalidUrl => "InvalidURL",
            Self::InvalidName => "InvalidName",
            Self::NotGranted => "NotGranted",
            Self::PoolNotFound => "PoolNotFound",
            Self::NameConflict => "NameConflict",
            Self::InsufficientSpace => "InsufficientSpace",
            Self::CredentialsNotFound => "CredentialsNotFound",
            Self::Queued => "Queued",
            Self::Downloading => "Downloading",
            Self::Verifying => "Verifying",
            Self::Paused => "Paused",
            Self::Completed => "Completed",
            Self::Retrying => "Retrying",
            Self::Starting => "Starting",
            Self::SpecChanged => "SpecChanged",
            Self::InvalidChecksum => "InvalidChecksum",
            Self::InvalidCa => "InvalidCa",
            Self::NotFound => "NotFound",
            Self::Unauthorized => "Unauthorized",
            Self::TlsError => "TlsError",
            Self::ChecksumMismatch => "ChecksumMismatch",
            Self::LengthMismatch => "LengthMismatch",
            Self::DestinationNotAllowed => "DestinationNotAllowed",
            Self::DownloadBusy => "DownloadBusy",
            Self::NetworkError => "NetworkError",
            Self::Timeout => "Timeout",
            Self::TransferInterrupted => "TransferInterrupted",
            Self::ServerError => "ServerError",
            Self::ProtocolError => "ProtocolError",
            Self::StorageError => "StorageError",
            Self::Cancelled => "Cancelled",
            Self::TooLarge => "TooLarge",
            Self::ErrorPage => "ErrorPage",
            Self::CredentialsNotAllowed => "CredentialsNotAllowed",
            Self::CorruptImage => "CorruptImage",
            Self::UnsafeImage => "UnsafeImage",
        }
    }

    fn waiting(self) -> bool {
        matches!(
            self,
            Self::Queued
                | Self::Downloading
                | Self::Verifying
                | Self::Paused
                | Self::Completed
                | Self::Retrying
                | Self::Starting
        )
    }
}

impl IsoReason {
    /// The reason of a downloader error.
    pub fn of(e: &DownloadError) -> Self {
        match e {
            DownloadError::InvalidUrl { .. } => Self::InvalidUrl,
            DownloadError::InvalidName { .. } => Self::InvalidName,
            DownloadError::InvalidChecksum { .. } => Self::InvalidChecksum,
            DownloadError::InvalidCa { .. } => Self::InvalidCa,
            DownloadError::NotFound { .. } => Self::NotFound,
            DownloadError::Unauthorized { .. } => Self::Unauthorized,
            DownloadError::Tls { .. } => Self::TlsError,
            DownloadError::ChecksumMismatch { .. } => Self::ChecksumMismatch,
            DownloadError::LengthMismatch { .. } => Self::LengthMismatch,
            DownloadError::NameConflict { .. } => Self::NameConflict,
            DownloadError::DestinationNotAllowed { .. } => Self::DestinationNotAllowed,
            DownloadError::Busy { .. } => Self::DownloadBusy,
            DownloadError::Network { .. } => Self::NetworkError,
            DownloadError::Timeout { .. } | DownloadError::TooSlow { .. } => Self::Timeout,
            DownloadError::TooLarge { .. } => Self::TooLarge,
            DownloadError::ErrorPage { .. } => Self::ErrorPage,
            DownloadError::CorruptImage { .. } => Self::CorruptImage,
            DownloadError::UnsafeImage { .. } => Self::UnsafeImage,
            DownloadError::Interrupted { .. } => Self::TransferInterrupted,
            DownloadError::BelowFloor { .. } => Self::InsufficientSpace,
            // The agent admits a transfer only when its file fits in the pool.
            DownloadError::NotAdmitted { .. } => Self::InsufficientSpace,
            DownloadError::HttpStatus { .. } | DownloadError::FtpReply { .. } => Self::ServerError,
            DownloadError::Protocol { .. } => Self::ProtocolError,
            DownloadError::Io { .. } => Self::StorageError,
            DownloadError::Cancelled { .. } => Self::Cancelled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::refusal::{Reason, assert_reasons};

    #[test]
    fn reasons_are_distinct_camel_case() {
        assert_reasons::<IsoReason>();
        assert_eq!(IsoReason::InvalidUrl.as_str(), "InvalidURL");
    }

    #[test]
    fn downloader_errors_keep_their_reasons() {
        let url = "http://x/a.iso".to_string();
        let errors = [
            DownloadError::NotFound {
                url: url.clone(),
                reply: "404".into(),
            },
            DownloadError::HttpStatus {
                url: url.clone(),
                status: 503,
            },
            DownloadError::Cancelled {
                url: url.clone(),
                kept: 0,
            },
        ];
        for e in errors {
            assert_eq!(IsoReason::of(&e).as_str(), e.reason(), "{e}");
        }
    }
}
