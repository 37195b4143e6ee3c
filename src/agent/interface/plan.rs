//! Plan (pure): from the spec, the last status and what was observed to the steps that put the
//! NIC in place, or a refusal.

use std::time::Duration;

use super::fields::{self, Outcome};
use super::mac::valid_mac;
use super::observe::Observed;
use super::reason::{Reason, Refusal};
use crate::api::{AttachMode, InterfaceType, LinkState, VMInterfaceSpec, VMInterfaceStatus};
use crate::libvirt::domain::{DomainView, NicXml};
use crate::libvirt::networks::{HostInterface, NetworkState};
use crate::libvirt::nic::{self, Bandwidth, Kept, NicSettings};
use crate::tenancy::NicSource;

/// Steps that make the spec real, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Our alias carries another MAC in the definition (edited behind our back): remove it.
    RemoveDriftedConfig {
        /// The device as libvirt has it.
        xml: String,
    },
    /// Our alias carries another MAC in the running guest: ask the guest to release it, and look
    /// again shortly (the NIC is plugged back once it is gone).
    UnplugDriftedLive {
        /// The device as libvirt has it.
        xml: String,
    },
    /// Hot-plug the NIC; `drift` when it was live before (removed behind our back).
    PlugLive {
        /// Whether it is put back rather than added.
        drift: bool,
    },
    /// Change the running guest's NIC in place (link state, network or bridge).
    UpdateLive {
        /// The `<interface>` as the running guest should have it.
        xml: String,
        /// The spec fields that change.
        fields: Vec<&'static str>,
    },
    /// Set the running guest's bandwidth to [`Plan::bandwidth`].
    SetBandwidthLive,
    /// Write the NIC into the definition; `drift` when it was there before.
    AddConfig {
        /// Whether it is put back rather than added.
        drift: bool,
    },
    /// Rewrite the definition's NIC with the spec's fields.
    UpdateConfig {
        /// The `<interface>` for the definition.
        xml: String,
        /// The spec fields that change.
        fields: Vec<&'static str>,
    },
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The domain.
    pub vm: String,
    /// The NIC's alias.
    pub alias: String,
    /// The NIC's MAC.
    pub mac: String,
    /// Whether its link is down.
    pub link_down: bool,
    /// Record the MAC in the status before anything is attached (a new MAC).
    pub record_mac: bool,
    /// The `<interface>` to attach or update.
    pub xml: String,
    /// The `<interface>` to hot-plug: without a boot order when the running guest orders
    /// booting by type (`<os><boot dev>`, which libvirt does not mix with per-device orders; the
    /// order takes effect at the next boot anyway).
    pub live_xml: String,
    /// The definition orders booting by type and the spec asks for a boot order: the NIC is
    /// written by a redefinition that turns that list into per-device orders in the same define
    /// (like virt-manager).
    pub convert_boot: bool,
    /// Whether the NIC belongs in the running guest.
    pub want_live: bool,
    /// Whether it belongs in the definition.
    pub want_config: bool,
    /// Whether the domain runs.
    pub active: bool,
    /// The bandwidth the spec asks for.
    pub bandwidth: Bandwidth,
    /// Spec fields the running guest has otherwise and gets only at its next boot.
    pub waiting: Vec<&'static str>,
    /// Whether the spec is the one already acted on: a difference found is drift.
    pub drift: bool,
    /// The steps.
    pub steps: Vec<Step>,
}

/// libvirt's name of an interface type.
pub fn type_name(t: InterfaceType) -> &'static str {
    match t {
        InterfaceType::Network => "network",
        InterfaceType::Bridge => "bridge",
        InterfaceType::Direct => "direct",
        InterfaceType::User => "user",
    }
}

/// The NIC's source: the network (default `default`), bridge or device; `None` for user mode.
pub fn source_of(spec: &VMInterfaceSpec) -> Result<Option<String>, Refusal> {
    match (spec.type_, spec.source.clone()) {
        (InterfaceType::Network, s) => Ok(Some(s.unwrap_or_else(|| "default".into()))),
        (InterfaceType::User, None) => Ok(None),
        (InterfaceType::User, Some(_)) => Err(Refusal::fix(
            Reason::InvalidSpec,
            "A user-mode interface takes no source; remove spec.source.",
        )),
        (t, None) => Err(Refusal::fix(
            Reason::InvalidSpec,
            format!(
                "A {} interface needs spec.source (the host {}).",
                type_name(t),
                if t == InterfaceType::Bridge {
                    "bridge"
                } else {
                    "device"
                }
            ),
        )),
        (_, Some(s)) => Ok(Some(s)),
    }
}

/// The NIC source as a grant names it, from the type and `source_of`'s answer.
pub fn nic_source(type_: InterfaceType, source: Option<&str>) -> NicSource {
    let name = source.unwrap_or_default().to_string();
    match type_ {
        InterfaceType::Network => NicSource::Network(name),
        InterfaceType::Bridge => NicSource::Bridge(name),
        InterfaceType::Direct => NicSource::Direct(name),
        InterfaceType::User => NicSource::User,
    }
}

/// Refuses a domain or NIC source the namespace is not granted. Checked on every reconcile, an
/// attached NIC included: after a revoke nothing changes (nothing is detached either) until the
/// grant is back or the object is deleted. Before anything else is looked at, so the answer is
/// the same whether the domain or network exists or not.
fn check_grants(spec: &VMInterfaceSpec, source: Option<&str>, o: &Observed) -> Result<(), Refusal> {
    let g = &o.grants;
    if !g.domain(&spec.vm) {
        return Err(Refusal::fix(Reason::NotGranted, g.domain_refusal(&spec.vm)));
    }
    let nic = nic_source(spec.type_, source);
    if !g.network(&nic) {
        return Err(Refusal::fix(Reason::NotGranted, g.network_refusal(&nic)));
    }
    Ok(())
}

/// Whether the NIC with `alias` is in the domain, live or persistent.
pub fn present(view: &DomainView, alias: &str) -> bool {
    view.config.nic(alias).is_some() || view.live.as_ref().is_some_and(|l| l.nic(alias).is_some())
}

fn is_down(d: &NicXml) -> bool {
    d.link_state.as_deref() == Some("down")
}

/// Refuses what the spec gets wrong by itself: immutable fields changed, a bad MAC or source.
fn validate(
    spec: &VMInterfaceSpec,
    prev: &VMInterfaceStatus,
) -> Result<(Option<String>, Option<String>), Refusal> {
    if let Some(had) = &prev.vm
        && *had != spec.vm
    {
        return Err(Refusal::fix(
            Reason::FieldImmutable,
            format!(
                "spec.vm is immutable: the interface is attached to {had}. Set spec.vm back, or delete this object (which detaches it from {had}) and create one for {}. Nothing was changed.",
                spec.vm
            ),
        ));
    }
    let spec_mac = match spec.mac.as_deref().map(valid_mac) {
        Some(Err(m)) => return Err(Refusal::fix(Reason::InvalidSpec, m)),
        Some(Ok(m)) => Some(m),
        None => None,
    };
    if let (Some(want), Some(had)) = (&spec_mac, &prev.mac)
        && want != had
    {
        return Err(Refusal::fix(
            Reason::FieldImmutable,
            format!(
                "spec.mac is immutable: the interface is {had}. Set spec.mac back, or delete and recreate the object to change it. Nothing was changed."
            ),
        ));
    }
    let source = source_of(spec)?;
    fields::validate(spec)?;
    Ok((spec_mac, source))
}

/// Refuses a new NIC whose network, bridge or device is missing on the node.
fn check_host(spec: &VMInterfaceSpec, source: Option<&str>, o: &Observed) -> Result<(), Refusal> {
    let node = &o.node;
    let again = Duration::from_secs(60);
    match (spec.type_, source) {
        (InterfaceType::Network, Some(net)) => match o.network {
            Some(NetworkState::Missing) => Err(Refusal::wait(
                Reason::NetworkNotFound,
                format!(
                    "libvirt network {net} does not exist on node {node}; check spec.source (virsh net-list --all)."
                ),
                again,
            )),
            Some(NetworkState::Inactive) => Err(Refusal::wait(
                Reason::NetworkNotFound,
                format!(
                    "libvirt network {net} is not active on node {node}; start it (virsh net-start {net})."
                ),
                again,
            )),
            Some(NetworkState::Active) | None => Ok(()),
        },
        (t @ (InterfaceType::Bridge | InterfaceType::Direct), Some(dev)) => {
            let bridge = t == InterfaceType::Bridge;
            let found = match o.host {
                Some(HostInterface::Missing) => false,
                Some(HostInterface::Present { bridge: is_bridge }) => !bridge || is_bridge,
                // No interface driver in this libvirtd: the attach itself tells.
                Some(HostInterface::Unknown) | None => true,
            };
            if found && !dev.contains('/') {
                return Ok(());
            }
            Err(Refusal::wait(
                Reason::HostDeviceNotFound,
                format!(
                    "Host {} {dev} does not exist on node {node}; check spec.source.",
                    if bridge { "bridge" } else { "network device" }
                ),
                again,
            ))
        }
        _ => Ok(()),
    }
}

/// The MAC: the recorded one, else the requested one, else a fresh one; refused when another
/// NIC of the node or another VMInterface holds it.
fn choose_mac(
    alias: &str,
    uid: &str,
    created: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    spec_mac: Option<String>,
    prev: &VMInterfaceStatus,
    o: &Observed,
) -> Result<String, Refusal> {
    let fresh = o.macs.as_ref().map(|m| m.fresh.clone());
    let Some(mac) = prev.mac.clone().or(spec_mac).or(fresh) else {
        // Observe reads the MACs in use whenever no MAC is recorded; nothing to choose from.
        return Err(Refusal::wait(
            Reason::AttachFailed,
            "The MACs in use on the node are not known yet; the agent retries.",
            Duration::from_secs(5),
        ));
    };
    let Some(macs) = &o.macs else {
        return Ok(mac);
    };
    let recorded = prev.mac.is_some();
    let conflict = macs
        .node
        .iter()
        .any(|n| n.mac == mac && n.alias.as_deref() != Some(alias))
        || macs.claims.iter().any(|c| c.beats(uid, created, recorded));
    if conflict {
        return Err(Refusal::wait(
            Reason::MacConflict,
            format!(
                "MAC {mac} is already used by another interface on node {} or by another VMInterface; choose another spec.mac or leave it empty.",
                o.node
            ),
            Duration::from_secs(60),
        ));
    }
    Ok(mac)
}

/// Who the object is.
pub struct Identity<'a> {
    /// The object's alias in the domain.
    pub alias: &'a str,
    /// Its UID.
    pub uid: &'a str,
    /// Its creation time.
    pub created: Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Its `metadata.generation`.
    pub generation: Option<i64>,
}

/// The settings of a NIC as libvirt has it, and what an update keeps of it.
fn read(dev: &NicXml) -> Result<(NicSettings, Kept), Refusal> {
    nic::parse(&dev.xml).map_err(|e| {
        Refusal::wait(
            Reason::AttachFailed,
            format!("The interface's XML in libvirt could not be read ({e}); the agent retries."),
            Duration::from_secs(60),
        )
    })
}

/// Refuses a spec that changes an immutable field of the NIC as libvirt has it.
fn check_immutable(want: &NicSettings, have: Option<&NicSettings>) -> Result<(), Refusal> {
    let Some(have) = have else { return Ok(()) };
    match fields::changed(want, have)
        .into_iter()
        .find(|f| fields::outcome(f, InterfaceType::Network) == Outcome::Immutable)
    {
        Some(f) => Err(fields::immutable(f, have)),
        None => Ok(()),
    }
}

/// Plans one reconcile of a VMInterface.
pub fn plan(
    id: &Identity<'_>,
    spec: &VMInterfaceSpec,
    prev: &VMInterfaceStatus,
    o: &Observed,
) -> Result<Plan, Refusal> {
    let (spec_mac, source) = validate(spec, prev)?;
    check_grants(spec, source.as_deref(), o)?;
    let vm = spec.vm.as_str();
    let Some(view) = &o.domain else {
        return Err(Refusal::wait(
            Reason::DomainNotFound,
            format!(
                "Domain {vm} is not defined on node {}; the interface is attached as soon as it is.",
                o.node
            ),
            Duration::from_secs(300),
        ));
    };
    let alias = id.alias;
    let config_dev = view.config.nic(alias);
    let live_dev = view.live.as_ref().and_then(|l| l.nic(alias));
    if config_dev.is_none() && live_dev.is_none() {
        check_host(spec, source.as_deref(), o)?;
    }
    let mac = choose_mac(alias, id.uid, id.created, spec_mac, prev, o)?;

    let link_down = match spec.link_state {
        Some(LinkState::Down) => true,
        Some(LinkState::Up) => false,
        None => live_dev.or(config_dev).is_some_and(is_down),
    };
    let want = fields::wanted(spec, source, link_down);
    let xml = nic::interface_xml(&want, &mac, alias, &Kept::default());
    let by_type = |side: Option<&crate::libvirt::domain::DomainXml>| {
        want.boot_order.is_some() && side.is_some_and(|d| !d.os_boot.is_empty())
    };
    let live_xml = if by_type(view.live.as_ref()) {
        let unbooted = NicSettings {
            boot_order: None,
            ..want.clone()
        };
        nic::interface_xml(&unbooted, &mac, alias, &Kept::default())
    } else {
        xml.clone()
    };
    let convert_boot = view.persistent && by_type(Some(&view.config));
    let want_live = view.active && spec.attach == AttachMode::LiveAndPersistent;
    let want_config = view.persistent;
    let mut steps = Vec::new();

    // Drift: our alias with another MAC (edited behind our back) is replaced.
    let mut config_dev = config_dev;
    if let Some(dev) = config_dev
        && dev.mac.as_deref() != Some(mac.as_str())
    {
        steps.push(Step::RemoveDriftedConfig {
            xml: dev.xml.clone(),
        });
        config_dev = None;
    }
    let config_mac_drifted = !steps.is_empty();
    let live_same_mac = live_dev.filter(|d| d.mac.as_deref() == Some(mac.as_str()));
    // Both sides are read before any step: an immutable field is refused with nothing changed.
    let config_now = config_dev.map(read).transpose()?;
    let live_now = live_same_mac.map(read).transpose()?;
    check_immutable(&want, config_now.as_ref().map(|(s, _)| s))?;
    check_immutable(&want, live_now.as_ref().map(|(s, _)| s))?;

    let mut waiting = Vec::new();
    if let Some(dev) = live_dev
        && live_same_mac.is_none()
    {
        steps.push(Step::UnplugDriftedLive {
            xml: dev.xml.clone(),
        });
    } else if want_live && live_dev.is_none() {
        // The running guest first: a NIC QEMU refuses is refused before anything is written.
        steps.push(Step::PlugLive {
            drift: prev.live == Some(true),
        });
    } else if let Some((have, kept)) = &live_now {
        let changed = fields::changed(&want, have);
        let live: Vec<&'static str> = changed
            .iter()
            .copied()
            .filter(|f| *f != "bandwidth" && fields::outcome(f, spec.type_) == Outcome::Live)
            .collect();
        if !live.is_empty() {
            steps.push(Step::UpdateLive {
                xml: nic::interface_xml(&want, &mac, alias, kept),
                fields: live,
            });
        }
        if changed.contains(&"bandwidth") {
            steps.push(Step::SetBandwidthLive);
        }
        waiting = changed
            .into_iter()
            .filter(|f| fields::outcome(f, spec.type_) == Outcome::NextBoot)
            .collect();
    }
    if want_config && config_dev.is_none() {
        steps.push(Step::AddConfig {
            drift: prev.persistent == Some(true) && !config_mac_drifted,
        });
    }
    if let Some((have, kept)) = &config_now {
        let changed = fields::changed(&want, have);
        if !changed.is_empty() {
            let kept = Kept {
                address: kept.address.clone(),
                restart_only: None,
            };
            let keep_order = NicSettings {
                boot_order: want.boot_order.or(have.boot_order),
                ..want.clone()
            };
            steps.push(Step::UpdateConfig {
                xml: nic::interface_xml(&keep_order, &mac, alias, &kept),
                fields: changed,
            });
        }
    }
    let drift = prev.observed_generation.is_some() && prev.observed_generation == id.generation;
    Ok(Plan {
        vm: vm.to_string(),
        alias: alias.to_string(),
        mac,
        link_down,
        record_mac: prev.mac.is_none(),
        xml,
        live_xml,
        convert_boot,
        want_live,
        want_config,
        active: view.active,
        bandwidth: want.bandwidth,
        waiting,
        drift,
        steps,
    })
}
