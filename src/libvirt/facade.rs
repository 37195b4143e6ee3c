//! The intents the agent asks of libvirt, as traits: the real [`super::Libvirt`] implements them
//! against libvirtd, and an in-memory stand-in (`fake`) implements them for unit tests of the
//! agent's apply steps.
//!
//! Every method names what the agent wants (read a domain's view, attach a device to the live
//! guest, look up a volume), takes and returns typed values, and fails with a [`LibvirtError`]
//! whose [`LibvirtError::kind`] says what the failure means.

use std::future::Future;

use super::LibvirtError;
use super::domain::DomainView;
use super::volume::VolumeSource;
use crate::api::StoragePoolSummary;

/// Where a device change applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Affect {
    /// The running guest only.
    Live,
    /// The persistent definition only (takes effect at the next boot).
    Config,
    /// Both.
    Both,
}

impl Affect {
    /// From "live" and "config" flags; `None` when neither is asked.
    pub fn of(live: bool, config: bool) -> Option<Self> {
        match (live, config) {
            (true, true) => Some(Self::Both),
            (true, false) => Some(Self::Live),
            (false, true) => Some(Self::Config),
            (false, false) => None,
        }
    }

    /// Whether the running guest is changed.
    pub fn live(self) -> bool {
        matches!(self, Self::Live | Self::Both)
    }

    /// Whether the persistent definition is changed.
    pub fn config(self) -> bool {
        matches!(self, Self::Config | Self::Both)
    }
}

/// A device change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceChange {
    /// Add a device.
    Attach,
    /// Change a device in place (media, link state); a locked tray is forced.
    Update,
    /// Remove a device (from a running guest: a request the guest must answer).
    Detach,
}

impl DeviceChange {
    /// What the change does, for errors and the call-latency metric's `action` label (an
    /// attach is one action whether it goes to the guest or the definition).
    pub fn action(self, affect: Affect) -> &'static str {
        match (self, affect) {
            (Self::Attach, _) => "attach a device",
            (Self::Update, _) => "update a device",
            (Self::Detach, Affect::Config) => "remove a device from the definition",
            (Self::Detach, _) => "ask the guest to release a device",
        }
    }
}

/// A volume looked up by pool and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeLookup {
    /// The volume, resolved by libvirt.
    Found(VolumeSource),
    /// No pool of that name.
    NoPool,
    /// The pool exists but is not running.
    PoolInactive,
    /// The pool has no volume of that name.
    NoVolume,
}

/// Domains and their devices.
pub trait Domains: Send + Sync {
    /// The domain's live and persistent view; `None` when no such domain exists.
    fn domain(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<DomainView>, LibvirtError>> + Send;

    /// Names of every domain on the node.
    fn domain_names(&self) -> impl Future<Output = Result<Vec<String>, LibvirtError>> + Send;

    /// Attaches, updates or detaches the device described by `xml`.
    fn change_device(
        &self,
        vm: &str,
        xml: &str,
        change: DeviceChange,
        affect: Affect,
    ) -> impl Future<Output = Result<(), LibvirtError>> + Send;
}

/// Storage pools and volumes.
pub trait Storage: Send + Sync {
    /// Every storage pool of the node, sorted by name.
    fn storage_pools(
        &self,
    ) -> impl Future<Output = Result<Vec<StoragePoolSummary>, LibvirtError>> + Send;

    /// Volume `volume` of pool `pool`, resolved through libvirt.
    fn volume(
        &self,
        pool: &str,
        volume: &str,
    ) -> impl Future<Output = Result<VolumeLookup, LibvirtError>> + Send;

    /// Re-reads pool `pool`'s volumes (after a file was added or removed behind libvirt).
    fn refresh_pool(&self, pool: &str) -> impl Future<Output = Result<(), LibvirtError>> + Send;

    /// Deletes volume `volume` of pool `pool`; one already gone is success.
    fn delete_volume(
        &self,
        pool: &str,
        volume: &str,
    ) -> impl Future<Output = Result<(), LibvirtError>> + Send;
}
