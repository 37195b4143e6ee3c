//! Reasons of a VMClone's `Ready` and `Progressing` conditions.

use crate::agent::refusal::Reason;

/// Why a VMClone is where it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloneReason {
    /// The source does not exist on this node.
    SourceNotFound,
    /// The source runs; the task waits for it to shut off.
    SourceRunning,
    /// The target name is taken.
    NameConflict,
    /// No pool has room for the copies.
    InsufficientSpace,
    /// A disk lies outside the agent's allowed directories, or a pool is missing or cannot hold
    /// file copies.
    StorageNotUsable,
    /// A disk to copy is an image that could make QEMU open another file (a backing or data
    /// file), or one the agent does not understand.
    UnsafeImage,
    /// A writable disk is not a file (a block device, a network disk, a volume of a pool that is
    /// not a directory): a clone would write to the same storage as the source.
    UnsupportedDisk,
    /// The namespace is not granted the source, the target name or a pool the copies use
    /// (Namespace annotations); the task waits for a grant.
    NotGranted,
    /// Copying.
    Copying,
    /// Defining the clone.
    Defining,
    /// A copy failed.
    CopyFailed,
    /// libvirt refused the clone's definition.
    DefineFailed,
    /// The clone exists.
    Completed,
}

impl Reason for CloneReason {
    const ALL: &'static [Self] = &[
        Self::SourceNotFound,
        Self::SourceRunning,
        Self::NameConflict,
        Self::InsufficientSpace,
        Self::StorageNotUsable,
        Self::UnsupportedDisk,
        Self::UnsafeImage,
        Self::NotGranted,
        Self::Copying,
        Self::Defining,
        Self::CopyFailed,
        Self::DefineFailed,
        Self::Completed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::SourceNotFound => "SourceNotFound",
            Self::SourceRunning => "SourceRunning",
            Self::NameConflict => "NameConflict",
            Self::InsufficientSpace => "InsufficientSpace",
            Self::StorageNotUsable => "StorageNotUsable",
            Self::UnsupportedDisk => "UnsupportedDisk",
            Self::UnsafeImage => "UnsafeImage",
            Self::NotGranted => "NotGranted",
            Self::Copying => "Copying",
            Self::Defining => "Defining",
            Self::CopyFailed => "CopyFailed",
            Self::DefineFailed => "DefineFailed",
            Self::Completed => "Completed",
        }
    }

    fn waiting(self) -> bool {
        matches!(
            self,
            Self::SourceNotFound
                | Self::SourceRunning
                | Self::Copying
                | Self::Defining
                | Self::Completed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_distinct_camel_case() {
        crate::agent::refusal::assert_reasons::<CloneReason>();
        assert_eq!(CloneReason::ALL.len(), 13);
    }

    #[test]
    fn only_failures_warn() {
        let failing: Vec<_> = CloneReason::ALL
            .iter()
            .filter(|r| !r.waiting())
            .map(|r| r.as_str())
            .collect();
        assert_eq!(
            failing,
            [
                "NameConflict",
                "InsufficientSpace",
                "StorageNotUsable",
                "UnsupportedDisk",
                "UnsafeImage",
                "NotGranted",
                "CopyFailed",
                "DefineFailed"
            ]
        );
    }
}
