//! Errors of the libvirt layer, classified once from libvirt's error codes and domains (never
//! from message text) into the kinds the agent decides on.

use virt::enumutil::Enum;
use virt::error::{ErrorDomain, ErrorNumber};

/// What a failed libvirt call means for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The domain, pool, volume, network or host interface does not exist.
    NotFound,
    /// The object exists but is not running (an inactive pool or network, a shut-off domain).
    Inactive,
    /// The operation cannot be done this way (a bus or device that cannot be hot-plugged or
    /// hot-unplugged, a driver without the call).
    Unsupported,
    /// The running machine has no room for the device (no free PCI slot, controller or unit).
    NoFreeSlot,
    /// The guest or QEMU is busy with an earlier request (an unplug in progress, a job running).
    Busy,
    /// libvirtd is not reachable (no connection, RPC failure).
    Unreachable,
    /// libvirt or QEMU refused the request itself (a bad image, a locked file, bad XML).
    Refused,
    /// The call did not return in time (a hung storage backend or QEMU monitor).
    Timeout,
}

/// Errors of the libvirt layer.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// Opening the connection failed.
    #[error("failed to connect to libvirt at {uri}: {source}")]
    Connect {
        /// Connection URI.
        uri: String,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// There is no live connection right now.
    #[error("libvirt at {uri} is not reachable; the agent reconnects when libvirtd is back")]
    NotConnected {
        /// Connection URI.
        uri: String,
    },
    /// A libvirt call failed.
    #[error("failed to {action}: {}", .source.message())]
    Call {
        /// What was being done, for example "list domains".
        action: String,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// libvirt returned XML the agent could not read.
    #[error("failed to {action}: libvirt returned XML that could not be parsed: {source}")]
    Xml {
        /// What was being done.
        action: String,
        /// The parser's error.
        #[source]
        source: roxmltree::Error,
    },
    /// The event loop could not be started.
    #[error("failed to start the libvirt event loop: {0}")]
    EventLoop(#[source] virt::error::Error),
    /// A call did not return within the agent's bound.
    #[error(
        "libvirt did not answer within {}s to {action} (a hung storage pool or QEMU?); the agent tries again later",
        .after.as_secs()
    )]
    Timeout {
        /// What was being done.
        action: String,
        /// The bound.
        after: std::time::Duration,
    },
    /// A blocking task panicked or was cancelled.
    #[error("libvirt worker task failed: {0}")]
    Worker(#[from] tokio::task::JoinError),
    /// An in-memory stand-in's canned failure (unit tests only).
    #[cfg(test)]
    #[error("failed to {action}: {kind:?} (test double)")]
    Fake {
        /// What was being done.
        action: String,
        /// The kind the test asked for.
        kind: ErrorKind,
    },
}

impl LibvirtError {
    /// The libvirt error code behind this error, if any.
    pub fn code(&self) -> Option<ErrorNumber> {
        match self {
            Self::Connect { source, .. } | Self::Call { source, .. } => match source.code() {
                Enum::Known(code) => Some(code),
                Enum::Unknown(_) => None,
            },
            _ => None,
        }
    }

    /// What the failure means, from libvirt's error code and the module that reported it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Connect { .. } | Self::NotConnected { .. } => ErrorKind::Unreachable,
            Self::Call { source, .. } => {
                let domain = match source.domain() {
                    Enum::Known(d) => Some(d),
                    Enum::Unknown(_) => None,
                };
                classify(self.code(), domain)
            }
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::Xml { .. } | Self::EventLoop(_) | Self::Worker(_) => ErrorKind::Refused,
            #[cfg(test)]
            Self::Fake { kind, .. } => *kind,
        }
    }

    /// Whether the call failed because the object does not exist.
    pub fn is_not_found(&self) -> bool {
        self.kind() == ErrorKind::NotFound
    }
}

/// The kind of a libvirt error from its code and the module (`VIR_FROM_*`) that raised it.
pub fn classify(code: Option<ErrorNumber>, domain: Option<ErrorDomain>) -> ErrorKind {
    use ErrorNumber as N;
    match code {
        Some(
            N::NoDomain
            | N::NoStoragePool
            | N::NoStorageVolume
            | N::NoNetwork
            | N::NoInterface
            | N::NoNodeDevice
            | N::NoSecret
            | N::NoDomainSnapshot
            | N::NoDomainMetadata
            | N::DeviceMissing,
        ) => ErrorKind::NotFound,
        Some(N::OperationInvalid) => ErrorKind::Inactive,
        Some(N::OperationUnsupported | N::NoSupport | N::ArgumentUnsupported) => {
            ErrorKind::Unsupported
        }
        Some(
            N::ResourceBusy | N::AgentUnresponsive | N::AgentCommandTimeout | N::OperationTimeout,
        ) => ErrorKind::Busy,
        Some(N::Rpc | N::NoConnect | N::AuthFailed | N::AuthCancelled | N::AuthUnavailable) => {
            ErrorKind::Unreachable
        }
        // Address allocation (PCI slots, controllers, drive units) is reported by the generic
        // domain configuration code as an internal error: nothing else of a hot-plug fails there.
        Some(N::InternalError) if domain == Some(ErrorDomain::Domain) => ErrorKind::NoFreeSlot,
        _ => ErrorKind::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_kinds() {
        use ErrorNumber as N;
        let cases = [
            (Some(N::NoDomain), None, ErrorKind::NotFound),
            (Some(N::NoStorageVolume), None, ErrorKind::NotFound),
            (Some(N::NoNetwork), None, ErrorKind::NotFound),
            (Some(N::OperationInvalid), None, ErrorKind::Inactive),
            (
                Some(N::OperationUnsupported),
                Some(ErrorDomain::Qemu),
                ErrorKind::Unsupported,
            ),
            (Some(N::ResourceBusy), None, ErrorKind::Busy),
            (Some(N::DeviceMissing), None, ErrorKind::NotFound),
            (Some(N::Rpc), None, ErrorKind::Unreachable),
            (
                Some(N::InternalError),
                Some(ErrorDomain::Domain),
                ErrorKind::NoFreeSlot,
            ),
            (
                Some(N::InternalError),
                Some(ErrorDomain::Qemu),
                ErrorKind::Refused,
            ),
            (Some(N::OperationFailed), None, ErrorKind::Refused),
            (None, None, ErrorKind::Refused),
        ];
        for (code, domain, want) in cases {
            assert_eq!(classify(code, domain), want, "{code:?} from {domain:?}");
        }
    }

    #[test]
    fn a_timed_out_call_says_what_and_how_long() {
        let e = LibvirtError::Timeout {
            action: "refresh a storage pool".into(),
            after: std::time::Duration::from_secs(120),
        };
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(
            e.to_string()
                .starts_with("libvirt did not answer within 120s to refresh a storage pool"),
            "{e}"
        );
    }
}
