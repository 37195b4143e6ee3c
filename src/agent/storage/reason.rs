//! The reasons a VirtualMachineStorage reports in its `Ready` condition. (`DetachPending`, while
//! the guest has not released a device, is the shared detach's, in `device.rs`.)

use crate::agent::refusal::Reason;

/// Reasons of the `Ready` condition of a VirtualMachineStorage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StorageReason {
    /// The device is in place.
    Attached,
    /// The spec breaks a rule the API server could not enforce.
    InvalidSpec,
    /// The domain is not defined on this node.
    DomainNotFound,
    /// The domain, or the pool of the source, is not granted to the object's namespace.
    NotGranted,
    /// The path is outside the allowed directories (open mode).
    PathNotAllowed,
    /// The image could make QEMU open another file (a backing file, an external data file), or
    /// has a qcow2 feature or header the agent does not understand.
    UnsafeImage,
    /// The source file, pool or volume does not exist.
    SourceNotFound,
    /// Waiting for an IsoDownload to complete.
    WaitingForDownload,
    /// Another device has the target.
    TargetConflict,
    /// A field that cannot change without replacing the device was changed (`vm`, `type`,
    /// `target`, `bus`, a disk's source or format); nothing was changed in libvirt.
    FieldImmutable,
    /// A disk's source was changed in libvirt, outside virtplane.
    DriftDetected,
    /// The device, or a changed field, is in the definition and takes effect at the next boot.
    RestartRequired,
    /// libvirt refused the change.
    AttachFailed,
    /// `create` names a volume that exists and that this object did not create.
    NameConflict,
    /// Creating or growing the volume of `create` failed.
    ProvisionFailed,
}

impl Reason for StorageReason {
    const ALL: &'static [Self] = &[
        Self::Attached,
        Self::InvalidSpec,
        Self::DomainNotFound,
        Self::NotGranted,
        Self::PathNotAllowed,
        Self::UnsafeImage,
        Self::SourceNotFound,
        Self::WaitingForDownload,
        Self::TargetConflict,
        Self::FieldImmutable,
        Self::DriftDetected,
        Self::RestartRequired,
        Self::AttachFailed,
        Self::NameConflict,
        Self::ProvisionFailed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Attached => "Attached",
            Self::InvalidSpec => "InvalidSpec",
            Self::DomainNotFound => "DomainNotFound",
            Self::NotGranted => "NotGranted",
            Self::PathNotAllowed => "PathNotAllowed",
            Self::UnsafeImage => "UnsafeImage",
            Self::SourceNotFound => "SourceNotFound",
            Self::WaitingForDownload => "WaitingForDownload",
            Self::TargetConflict => "TargetConflict",
            Self::FieldImmutable => "FieldImmutable",
            Self::DriftDetected => "DriftDetected",
            Self::RestartRequired => "RestartRequired",
            Self::AttachFailed => "AttachFailed",
            Self::NameConflict => "NameConflict",
            Self::ProvisionFailed => "ProvisionFailed",
        }
    }

    fn waiting(self) -> bool {
        self == Self::WaitingForDownload
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::refusal::assert_reasons;
    use crate::agent::status;

    #[test]
    fn reasons_are_distinct_camel_case_and_match_the_shared_ones() {
        assert_reasons::<StorageReason>();
        assert_eq!(
            StorageReason::RestartRequired.as_str(),
            status::RESTART_REQUIRED
        );
        let waiting: Vec<_> = StorageReason::ALL
            .iter()
            .filter(|r| r.waiting())
            .map(|r| r.as_str())
            .collect();
        assert_eq!(waiting, ["WaitingForDownload"]);
    }
}
