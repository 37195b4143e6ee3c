//! The reasons a VMInterface's `Ready` condition reports.

use crate::agent::refusal;
use crate::agent::status::DETACH_PENDING;

/// Reasons of the `Ready` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The interface is in place.
    Attached,
    /// The spec breaks a rule the API server could not enforce.
    InvalidSpec,
    /// The spec changes a field that cannot change without replacing the interface.
    FieldImmutable,
    /// The spec's fields are in the definition; some wait for the domain's next boot.
    WaitingForRestart,
    /// The MAC address is already used by another interface.
    MacConflict,
    /// The domain is not defined on this node.
    DomainNotFound,
    /// The libvirt network does not exist or is inactive.
    NetworkNotFound,
    /// The host bridge or device does not exist.
    HostDeviceNotFound,
    /// libvirt refused the change.
    AttachFailed,
    /// The namespace is not granted the domain or the NIC source (Namespace annotations).
    NotGranted,
    /// The object is deleted and the guest has not released the interface yet. Reported by
    /// the shared detach (`device::pending_outcome`); listed here so the labels are complete.
    #[allow(dead_code)]
    DetachPending,
}

impl refusal::Reason for Reason {
    const ALL: &'static [Self] = &[
        Self::Attached,
        Self::InvalidSpec,
        Self::FieldImmutable,
        Self::WaitingForRestart,
        Self::MacConflict,
        Self::DomainNotFound,
        Self::NetworkNotFound,
        Self::HostDeviceNotFound,
        Self::AttachFailed,
        Self::NotGranted,
        Self::DetachPending,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Attached => "Attached",
            Self::InvalidSpec => "InvalidSpec",
            Self::FieldImmutable => "FieldImmutable",
            Self::WaitingForRestart => "WaitingForRestart",
            Self::MacConflict => "MACConflict",
            Self::DomainNotFound => "DomainNotFound",
            Self::NetworkNotFound => "NetworkNotFound",
            Self::HostDeviceNotFound => "HostDeviceNotFound",
            Self::AttachFailed => "AttachFailed",
            Self::NotGranted => "NotGranted",
            Self::DetachPending => DETACH_PENDING,
        }
    }

    fn waiting(self) -> bool {
        matches!(self, Self::DetachPending | Self::WaitingForRestart)
    }
}

/// Why a VMInterface will not go ahead.
pub type Refusal = refusal::Refusal<Reason>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::refusal::{Reason as _, assert_reasons};

    #[test]
    fn reasons_are_distinct_camel_case_and_keep_their_names() {
        assert_reasons::<Reason>();
        let names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "Attached",
                "InvalidSpec",
                "FieldImmutable",
                "WaitingForRestart",
                "MACConflict",
                "DomainNotFound",
                "NetworkNotFound",
                "HostDeviceNotFound",
                "AttachFailed",
                "NotGranted",
                "DetachPending"
            ]
        );
        assert!(Reason::DetachPending.waiting());
        assert!(!Reason::MacConflict.waiting());
    }
}
