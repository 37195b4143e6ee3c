//! An in-memory stand-in for libvirt behind the facade's traits, for unit tests of the agent's
//! apply steps. It keeps domains as typed XML, applies device changes the way libvirt does
//! (attach adds, update replaces by alias, detach removes by alias) and fails on request.
//! Integration tests use the real libvirtd.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use super::clones::{CloneDomain, Clones, Copies, Defined};
use super::domain::{DomainView, DomainXml, parse_domain};
use super::facade::{Affect, DeviceChange, Domains, Storage, VolumeLookup};
use super::networks::{AddressSource, GuestNic, HostInterface, NetworkState, Networks, NodeMac};
use super::volume::VolumeSource;
use super::{ErrorKind, LibvirtError};
use crate::api::StoragePoolSummary;

/// One fake domain.
#[derive(Clone, Debug, Default)]
pub struct FakeDomain {
    /// Running.
    pub active: bool,
    /// Has a persistent definition.
    pub persistent: bool,
    /// The running guest's devices.
    pub live: DomainXml,
    /// The definition's devices.
    pub config: DomainXml,
    /// Whether the guest releases devices when asked (a booting guest does not).
    pub releases: bool,
}

/// A canned failure for the next matching call.
#[derive(Clone, Debug)]
struct Failure {
    action: &'static str,
    affect: Option<Affect>,
    kind: ErrorKind,
    /// Matching calls to let through first.
    skip: usize,
}

/// State of the stand-in.
#[derive(Default)]
struct State {
    domains: BTreeMap<String, FakeDomain>,
    pools: Vec<StoragePoolSummary>,
    volumes: BTreeMap<(String, String), VolumeSource>,
    failures: VecDeque<Failure>,
    calls: Vec<String>,
    nets: FakeNets,
    /// Clones: the full XML and the task that made each domain that has them.
    xml: BTreeMap<String, String>,
    tasks: BTreeMap<String, String>,
    /// Volumes that are no files (block clone routes, see `fake_block`).
    block: Vec<super::block_clone::BlockVolume>,
    /// Volumes' capacities (volumes created through `Provision`), by pool and name.
    capacities: BTreeMap<(String, String), u64>,
}

/// In-memory libvirt.
#[derive(Default)]
pub struct FakeLibvirt {
    state: Mutex<State>,
}

impl FakeLibvirt {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a defined domain, running or not, with the devices of `devices_xml` (the inside of
    /// `<devices>`) both live and persistent.
    pub fn with_domain(self, name: &str, active: bool, devices_xml: &str) -> Self {
        let xml = format!(
            "<domain><os><type machine='pc-q35-10.0'>hvm</type></os><devices>{devices_xml}</devices></domain>"
        );
        let parsed = parse_domain(&xml).unwrap_or_default();
        self.state().domains.insert(
            name.to_string(),
            FakeDomain {
                active,
                persistent: true,
                live: parsed.clone(),
                config: parsed,
                releases: true,
            },
        );
        self
    }

    /// Adds a storage pool.
    pub fn with_pool(self, pool: StoragePoolSummary) -> Self {
        self.state().pools.push(pool);
        self
    }

    /// Adds a volume.
    pub fn with_volume(self, pool: &str, name: &str, source: VolumeSource) -> Self {
        self.state()
            .volumes
            .insert((pool.to_string(), name.to_string()), source);
        self
    }

    /// Makes the next call whose action is `action` (and, for device changes, whose affect is
    /// `affect`) fail with `kind`.
    pub fn fail_next(&self, action: &'static str, affect: Option<Affect>, kind: ErrorKind) {
        self.fail_after(action, affect, 0, kind);
    }

    /// Like [`FakeLibvirt::fail_next`], after letting `skip` matching calls through.
    pub fn fail_after(
        &self,
        action: &'static str,
        affect: Option<Affect>,
        skip: usize,
        kind: ErrorKind,
    ) {
        self.state().failures.push_back(Failure {
            action,
            affect,
            kind,
            skip,
        });
    }

    /// Makes the guest of `vm` ignore unplug requests (or honour them again).
    pub fn set_releases(&self, vm: &str, releases: bool) {
        if let Some(d) = self.state().domains.get_mut(vm) {
            d.releases = releases;
        }
    }

    /// A copy of domain `vm`.
    pub fn domain_state(&self, vm: &str) -> Option<FakeDomain> {
        self.state().domains.get(vm).cloned()
    }

    /// Every call made so far, as `action affect`.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    fn enter(&self, action: &'static str, affect: Option<Affect>) -> Result<(), LibvirtError> {
        let mut st = self.state();
        st.calls.push(match affect {
            Some(a) => format!("{action} {a:?}"),
            None => action.to_string(),
        });
        let hit = st
            .failures
            .iter()
            .position(|f| f.action == action && (f.affect.is_none() || f.affect == affect));
        if let Some(f) = hit.and_then(|i| st.failures.get_mut(i))
            && f.skip > 0
        {
            f.skip -= 1;
            return Ok(());
        }
        match hit.and_then(|i| st.failures.remove(i)) {
            Some(f) => Err(LibvirtError::Fake {
                action: action.to_string(),
                kind: f.kind,
            }),
            None => Ok(()),
        }
    }
}

fn not_found(action: &str) -> LibvirtError {
    LibvirtError::Fake {
        action: action.to_string(),
        kind: ErrorKind::NotFound,
    }
}

/// Applies a device change to one side of a fake domain.
fn apply_change(side: &mut DomainXml, device: &DomainXml, change: DeviceChange) {
    let same_disk = |a: &Option<String>| device.disks.iter().any(|d| d.alias == *a);
    let same_nic = |a: &Option<String>| device.interfaces.iter().any(|d| d.alias == *a);
    match change {
        DeviceChange::Attach => {
            side.disks.extend(device.disks.iter().cloned());
            side.interfaces.extend(device.interfaces.iter().cloned());
            side.controllers.extend(device.controllers.iter().cloned());
        }
        DeviceChange::Update => {
            for d in &device.disks {
                if let Some(have) = side.disks.iter_mut().find(|x| x.alias == d.alias) {
                    *have = d.clone();
                }
            }
            for n in &device.interfaces {
                if let Some(have) = side.interfaces.iter_mut().find(|x| x.alias == n.alias) {
                    *have = n.clone();
                }
            }
        }
        DeviceChange::Detach => {
            side.disks.retain(|d| !same_disk(&d.alias));
            side.interfaces.retain(|n| !same_nic(&n.alias));
            for c in &device.controllers {
                if let Some(i) = side.controllers.iter().position(|x| x == c) {
                    side.controllers.remove(i);
                }
            }
        }
    }
}

impl Domains for FakeLibvirt {
    async fn domain(&self, name: &str) -> Result<Option<DomainView>, LibvirtError> {
        self.enter("read the domain", None)?;
        Ok(self.state().domains.get(name).map(|d| DomainView {
            active: d.active,
            persistent: d.persistent,
            live: d.active.then(|| d.live.clone()),
            config: d.config.clone(),
        }))
    }

    async fn domain_names(&self) -> Result<Vec<String>, LibvirtError> {
        self.enter("list domains", None)?;
        Ok(self.state().domains.keys().cloned().collect())
    }

    async fn change_device(
        &self,
        vm: &str,
        xml: &str,
        change: DeviceChange,
        affect: Affect,
    ) -> Result<(), LibvirtError> {
        let action = change.action(affect);
        self.enter(action, Some(affect))?;
        let device = parse_domain(&format!("<domain><devices>{xml}</devices></domain>")).map_err(
            |source| LibvirtError::Xml {
                action: action.to_string(),
                source,
            },
        )?;
        let mut st = self.state();
        let dom = st.domains.get_mut(vm).ok_or_else(|| not_found(action))?;
        if affect.live() {
            if !dom.active {
                return Err(LibvirtError::Fake {
                    action: action.to_string(),
                    kind: ErrorKind::Inactive,
                });
            }
            if change != DeviceChange::Detach || dom.releases {
                apply_change(&mut dom.live, &device, change);
            }
        }
        if affect.config() {
            apply_change(&mut dom.config, &device, change);
        }
        Ok(())
    }
}

impl Storage for FakeLibvirt {
    async fn storage_pools(&self) -> Result<Vec<StoragePoolSummary>, LibvirtError> {
        self.enter("list storage pools", None)?;
        Ok(self.state().pools.clone())
    }

    async fn volume(&self, pool: &str, volume: &str) -> Result<VolumeLookup, LibvirtError> {
        self.enter("look up a storage volume", None)?;
        let st = self.state();
        let Some(p) = st.pools.iter().find(|p| p.name == pool) else {
            return Ok(VolumeLookup::NoPool);
        };
        if !p.active {
            return Ok(VolumeLookup::PoolInactive);
        }
        Ok(st
            .volumes
            .get(&(pool.to_string(), volume.to_string()))
            .cloned()
            .map_or(VolumeLookup::NoVolume, VolumeLookup::Found))
    }

    async fn refresh_pool(&self, _pool: &str) -> Result<(), LibvirtError> {
        self.enter("refresh a storage pool", None)
    }

    async fn delete_volume(&self, pool: &str, volume: &str) -> Result<(), LibvirtError> {
        self.enter("delete a storage volume", None)?;
        let mut st = self.state();
        st.volumes.remove(&(pool.to_string(), volume.to_string()));
        st.block
            .retain(|b| (b.pool.as_str(), b.volume.as_str()) != (pool, volume));
        Ok(())
    }
}

// --- Networks (VMInterface) ---

/// Networks, host interfaces and guest answers of the stand-in.
#[derive(Default)]
struct FakeNets {
    networks: BTreeMap<String, bool>,
    host_interfaces: BTreeMap<String, HostInterface>,
    no_interface_driver: bool,
    guest: BTreeMap<(String, AddressSource, String), GuestNic>,
}

impl FakeLibvirt {
    /// Adds a libvirt network, running or not.
    pub fn with_network(self, name: &str, active: bool) -> Self {
        self.state().nets.networks.insert(name.to_string(), active);
        self
    }

    /// Adds a host interface.
    pub fn with_host_interface(self, name: &str, bridge: bool) -> Self {
        self.state()
            .nets
            .host_interfaces
            .insert(name.to_string(), HostInterface::Present { bridge });
        self
    }

    /// Makes host interfaces unknowable (a libvirtd without interface driver).
    pub fn without_interface_driver(self) -> Self {
        self.state().nets.no_interface_driver = true;
        self
    }

    /// Makes `source` report `nic` for the interface of `vm` with `mac`.
    pub fn with_guest_nic(self, vm: &str, source: AddressSource, mac: &str, nic: GuestNic) -> Self {
        self.state()
            .nets
            .guest
            .insert((vm.to_string(), source, mac.to_string()), nic);
        self
    }
}

impl Networks for FakeLibvirt {
    async fn network(&self, name: &str) -> Result<NetworkState, LibvirtError> {
        self.enter("look up the network", None)?;
        Ok(match self.state().nets.networks.get(name) {
            None => NetworkState::Missing,
            Some(false) => NetworkState::Inactive,
            Some(true) => NetworkState::Active,
        })
    }

    async fn host_interface(&self, name: &str) -> Result<HostInterface, LibvirtError> {
        self.enter("look up the host interface", None)?;
        let st = self.state();
        if st.nets.no_interface_driver {
            return Ok(HostInterface::Unknown);
        }
        Ok(st
            .nets
            .host_interfaces
            .get(name)
            .copied()
            .unwrap_or(HostInterface::Missing))
    }

    async fn guest_addresses(
        &self,
        vm: &str,
        mac: &str,
        source: AddressSource,
    ) -> Result<Option<GuestNic>, LibvirtError> {
        self.enter("ask for the guest's interfaces", None)?;
        let st = self.state();
        if !st.domains.get(vm).is_some_and(|d| d.active) {
            return Err(LibvirtError::Fake {
                action: "ask for the guest's interfaces".into(),
                kind: ErrorKind::Inactive,
            });
        }
        Ok(st
            .nets
            .guest
            .get(&(vm.to_string(), source, mac.to_string()))
            .cloned())
    }

    async fn node_macs(&self) -> Result<Vec<NodeMac>, LibvirtError> {
        self.enter("list the domains' interfaces", None)?;
        let st = self.state();
        Ok(st
            .domains
            .values()
            .flat_map(|d| {
                d.config.interfaces.iter().chain(
                    d.active
                        .then_some(&d.live)
                        .into_iter()
                        .flat_map(|l| l.interfaces.iter()),
                )
            })
            .filter_map(|n| {
                n.mac.clone().map(|mac| NodeMac {
                    mac,
                    alias: n.alias.clone(),
                })
            })
            .collect())
    }
}

/// NIC tuning: the live `<interface>` is rewritten with the new `<bandwidth>`.
impl super::nic::NicTuning for FakeLibvirt {
    async fn set_live_bandwidth(
        &self,
        vm: &str,
        mac: &str,
        bandwidth: &super::nic::Bandwidth,
    ) -> Result<(), LibvirtError> {
        const ACTION: &str = "set the interface bandwidth";
        self.enter(ACTION, Some(Affect::Live))?;
        let mut st = self.state();
        let dom = st.domains.get_mut(vm).ok_or_else(|| not_found(ACTION))?;
        let nic = dom
            .live
            .interfaces
            .iter_mut()
            .find(|n| dom.active && n.mac.as_deref() == Some(mac))
            .ok_or_else(|| not_found(ACTION))?;
        let xml_err = |source| LibvirtError::Xml {
            action: ACTION.into(),
            source,
        };
        let (mut s, kept) = super::nic::parse(&nic.xml).map_err(xml_err)?;
        s.bandwidth = *bandwidth;
        let alias = nic.alias.clone().unwrap_or_default();
        let xml = super::nic::interface_xml(&s, mac, &alias, &kept);
        let parsed =
            parse_domain(&format!("<domain><devices>{xml}</devices></domain>")).map_err(xml_err)?;
        if let Some(new) = parsed.interfaces.into_iter().next() {
            let host_device = nic.host_device.take();
            *nic = new;
            nic.host_device = host_device;
        }
        Ok(())
    }
}

/// Clones: a domain's definition is its full XML; the task that made it is read from the
/// metadata of the XML it was defined with.
impl FakeLibvirt {
    /// Adds a shut-off domain defined by the full `xml` (a clone's source, or a clone when its
    /// metadata names a task).
    pub fn with_domain_xml(self, name: &str, xml: &str) -> Self {
        self.insert_xml(name, xml);
        self
    }

    fn insert_xml(&self, name: &str, xml: &str) {
        let parsed = parse_domain(xml).unwrap_or_default();
        let mut st = self.state();
        st.domains.insert(
            name.to_string(),
            FakeDomain {
                active: false,
                persistent: true,
                live: parsed.clone(),
                config: parsed,
                releases: true,
            },
        );
        st.xml.insert(name.to_string(), xml.to_string());
        match super::clone_xml::clone_task_of(xml) {
            Some(task) => st.tasks.insert(name.to_string(), task),
            None => st.tasks.remove(name),
        };
    }

    /// The full XML of domain `name`, as defined.
    pub fn domain_xml(&self, name: &str) -> Option<String> {
        self.state().xml.get(name).cloned()
    }

    /// Starts or stops domain `name`.
    pub fn set_active(&self, name: &str, active: bool) {
        if let Some(d) = self.state().domains.get_mut(name) {
            d.active = active;
        }
    }

    /// Restarts domain `name`: the running guest takes the definition's devices.
    pub fn restart(&self, name: &str) {
        if let Some(d) = self.state().domains.get_mut(name) {
            d.active = true;
            d.live = d.config.clone();
        }
    }
}

impl Clones for FakeLibvirt {
    async fn clone_domain(&self, name: &str) -> Result<Option<CloneDomain>, LibvirtError> {
        self.enter("read the domain", None)?;
        let st = self.state();
        Ok(st.domains.get(name).map(|_| CloneDomain {
            task: st.tasks.get(name).cloned(),
            uuid: format!("uuid-{name}"),
        }))
    }

    async fn source_xml(&self, source: &str) -> Result<String, LibvirtError> {
        self.enter("read the source's definition", None)?;
        self.state()
            .xml
            .get(source)
            .cloned()
            .ok_or_else(|| not_found("read the source's definition"))
    }

    async fn define_clone(
        &self,
        name: &str,
        task: &str,
        xml: &str,
    ) -> Result<Defined, LibvirtError> {
        self.enter("define the clone", None)?;
        if self.state().domains.contains_key(name) {
            let ours = self.state().tasks.get(name).map(String::as_str) == Some(task);
            return Ok(if ours {
                Defined::Clone(format!("uuid-{name}"))
            } else {
                Defined::NameConflict
            });
        }
        self.insert_xml(name, xml);
        Ok(Defined::Clone(format!("uuid-{name}")))
    }

    async fn start_domain(&self, name: &str) -> Result<(), LibvirtError> {
        self.enter("start the clone", None)?;
        let mut st = self.state();
        let d = st
            .domains
            .get_mut(name)
            .ok_or_else(|| not_found("start the clone"))?;
        d.active = true;
        Ok(())
    }

    async fn undefine_owned_clone(&self, name: &str, task: &str) -> Result<bool, LibvirtError> {
        self.enter("remove the unfinished clone", None)?;
        let mut st = self.state();
        if task.is_empty() || st.tasks.get(name).map(String::as_str) != Some(task) {
            return Ok(false);
        }
        st.domains.remove(name);
        st.xml.remove(name);
        st.tasks.remove(name);
        Ok(true)
    }

    async fn refresh_active_pools(&self) -> Result<(), LibvirtError> {
        self.enter("refresh storage pools", None)
    }

    async fn copy_volume(
        &self,
        pool: &str,
        volume: &str,
        copies: &Copies,
    ) -> Result<Option<(String, String)>, LibvirtError> {
        self.enter("look up the copy of a volume", None)?;
        let st = self.state();
        let Some(found) = st.volumes.get(&(pool.to_string(), volume.to_string())) else {
            return Ok(None);
        };
        let Some((copy, Some(dest_pool))) = copies.get(&found.path) else {
            return Ok(None);
        };
        let name = copy.rsplit('/').next().unwrap_or(copy).to_string();
        Ok(Some((dest_pool.clone(), name)))
    }
}

#[path = "fake_tuning.rs"]
mod tuning;

#[path = "fake_block.rs"]
mod block;

#[path = "fake_provision.rs"]
mod provision;

#[cfg(test)]
mod tests {
    use super::*;

    const DISK: &str = "<disk type='file' device='disk'><source file='/p/a.img'/><target dev='sda' bus='scsi'/><alias name='ua-vps-1'/></disk>";

    #[tokio::test]
    async fn device_changes_follow_libvirt() {
        let fake = FakeLibvirt::default().with_domain("vm", true, "");
        fake.change_device("vm", DISK, DeviceChange::Attach, Affect::Both)
            .await
            .unwrap();
        let view = fake.domain("vm").await.unwrap().unwrap();
        assert!(view.config.disk("ua-vps-1").is_some());
        assert!(view.live.unwrap().disk("ua-vps-1").is_some());
        fake.set_releases("vm", false);
        fake.change_device("vm", DISK, DeviceChange::Detach, Affect::Both)
            .await
            .unwrap();
        let d = fake.domain_state("vm").unwrap();
        assert!(
            d.config.disk("ua-vps-1").is_none(),
            "gone from the definition"
        );
        assert!(
            d.live.disk("ua-vps-1").is_some(),
            "the guest did not release it"
        );
    }

    #[tokio::test]
    async fn canned_failures_hit_once() {
        let fake = FakeLibvirt::default().with_domain("vm", true, "");
        fake.fail_next("attach a device", Some(Affect::Live), ErrorKind::NoFreeSlot);
        let err = fake
            .change_device("vm", DISK, DeviceChange::Attach, Affect::Live)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoFreeSlot);
        assert!(
            fake.change_device("vm", DISK, DeviceChange::Attach, Affect::Live)
                .await
                .is_ok()
        );
        assert!(fake.domain("nope").await.unwrap().is_none());
    }
}
