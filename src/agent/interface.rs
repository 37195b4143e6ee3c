//! `VMInterface`: network interfaces identified by their MAC: hot-plug, link state in place, the
//! guest's own view (name and addresses), confirmed detach, drift repair.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

use super::context::{Context, ReconcileError};
use super::device::{self, HotPlug};
use super::{finalizer, status};
use crate::api::{
    AttachMode, GuestInfoSource, GuestInterface, InterfaceType, LinkState, NODE_LABEL, VMInterface,
    VMInterfaceStatus, condition,
};
use crate::conditions::Desired;
use crate::libvirt::domain::{self, DomainXml, NicSpec};
use crate::libvirt::facade::{Affect, DeviceChange, Domains};

/// Reasons of the `Ready` condition.
pub mod reason {
    /// The interface is in place.
    pub const ATTACHED: &str = "Attached";
    /// The spec breaks a rule the API server could not enforce.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The MAC address is already used by another interface.
    pub const MAC_CONFLICT: &str = "MACConflict";
    /// The domain is not defined on this node.
    pub const DOMAIN_NOT_FOUND: &str = "DomainNotFound";
    /// The libvirt network does not exist or is inactive.
    pub const NETWORK_NOT_FOUND: &str = "NetworkNotFound";
    /// The host bridge or device does not exist.
    pub const HOST_DEVICE_NOT_FOUND: &str = "HostDeviceNotFound";
    /// libvirt refused the change.
    pub const ATTACH_FAILED: &str = "AttachFailed";
}

fn alias_of(obj: &VMInterface) -> String {
    format!("ua-vpn-{}", obj.uid().unwrap_or_default())
}

fn find_nic(d: &DomainXml, alias: &str) -> Option<String> {
    d.nic(alias).map(|x| x.xml.clone())
}

/// Checks a MAC address is well-formed and unicast; returns it in lower case.
pub fn valid_mac(mac: &str) -> Result<String, String> {
    let parts: Vec<&str> = mac.split(':').collect();
    let bytes: Option<Vec<u8>> = parts
        .iter()
        .map(|p| u8::from_str_radix(p, 16).ok().filter(|_| p.len() == 2))
        .collect();
    match bytes {
        Some(b) if b.len() == 6 => {
            if b[0] & 1 == 1 {
                Err(format!(
                    "MAC {mac} is a multicast address; a NIC needs a unicast one (even first byte)."
                ))
            } else if b.iter().all(|x| *x == 0) {
                Err(format!("MAC {mac} is all zeros."))
            } else {
                Ok(mac.to_ascii_lowercase())
            }
        }
        _ => Err(format!("MAC {mac} is not six colon-separated hex pairs.")),
    }
}

/// A random MAC in QEMU's range `52:54:00:xx:xx:xx`, not in `used`.
pub(super) fn allocate_mac(used: &[String]) -> String {
    let state = std::hash::RandomState::new();
    for attempt in 0u32.. {
        let mut h = state.build_hasher();
        h.write_u32(attempt);
        let v = h.finish();
        let mac = format!(
            "52:54:00:{:02x}:{:02x}:{:02x}",
            (v >> 16) & 0xff,
            (v >> 8) & 0xff,
            v & 0xff
        );
        if !used.contains(&mac) {
            return mac;
        }
    }
    unreachable!("an unbounded range always yields")
}

type Outcome = status::Outcome<VMInterfaceStatus>;

/// Reconciles one VMInterface.
#[tracing::instrument(skip_all, fields(object = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())))]
pub(super) async fn reconcile(
    obj: Arc<VMInterface>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    if obj.labels().get(NODE_LABEL) != Some(&ctx.node) {
        return Ok(Action::await_change());
    }
    tracing::debug!("reconciling");
    let api: Api<VMInterface> =
        Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let alias = alias_of(&obj);
    // The domain the NIC went to, even if spec.vm was edited since.
    let vm = obj
        .status
        .as_ref()
        .and_then(|s| s.vm.clone())
        .unwrap_or_else(|| obj.spec.vm.clone());
    let lock = ctx.locks.get(&vm);
    let guard = lock.clone().lock_owned().await;
    let prev = obj.status.clone().unwrap_or_default();

    if obj.meta().deletion_timestamp.is_some() {
        let what = prev.mac.clone().unwrap_or_else(|| alias.clone());
        let was_attached = prev.live == Some(true) || prev.persistent == Some(true);
        let pending = VMInterfaceStatus {
            persistent: Some(false),
            ..prev.clone()
        };
        return match device::finish_detach(
            &api,
            &*obj,
            &ctx,
            &vm,
            &alias,
            &what,
            was_attached,
            find_nic,
            &prev,
            pending,
        )
        .await?
        {
            finalizer::Cleanup::Done => {
                finalizer::remove(&api, &*obj).await?;
                Ok(Action::await_change())
            }
            finalizer::Cleanup::Pending(action) => Ok(action),
        };
    }
    finalizer::add(&api, &*obj).await?;
    let outcome = match apply(&api, &obj, &ctx, &alias, &prev, guard).await {
        Ok(o) => o,
        Err(ReconcileError::Libvirt(err)) if ctx.libvirt.is_connected() => Outcome::not_ready(
            &prev,
            reason::ATTACH_FAILED,
            format!("{err}. The agent retries; check the domain and the spec."),
            Action::requeue(Duration::from_secs(30)),
        ),
        Err(e) => return Err(e),
    };
    status::write_outcome(&api, &*obj, &ctx, &prev, outcome).await
}

fn type_name(t: InterfaceType) -> &'static str {
    match t {
        InterfaceType::Network => "network",
        InterfaceType::Bridge => "bridge",
        InterfaceType::Direct => "direct",
        InterfaceType::User => "user",
    }
}

/// Every MAC of every domain on the node (live and persistent), with the alias that has it.
pub(super) async fn node_macs(
    ctx: &Context,
) -> Result<Vec<(String, Option<String>)>, ReconcileError> {
    Ok(ctx
        .libvirt
        .call("list the domains' interfaces", |c| {
            let mut out = Vec::new();
            for dom in c.list_all_domains(0)? {
                let Ok(view) = domain::view(&dom) else {
                    continue;
                };
                for nic in view
                    .config
                    .interfaces
                    .iter()
                    .chain(view.live.iter().flat_map(|l| l.interfaces.iter()))
                {
                    if let Some(mac) = &nic.mac {
                        out.push((mac.clone(), nic.alias.clone()));
                    }
                }
            }
            Ok(out)
        })
        .await?)
}

async fn apply(
    api: &Api<VMInterface>,
    obj: &VMInterface,
    ctx: &Context,
    alias: &str,
    prev: &VMInterfaceStatus,
    guard: tokio::sync::OwnedMutexGuard<()>,
) -> Result<Outcome, ReconcileError> {
    let spec = &obj.spec;
    let vm = spec.vm.as_str();
    let invalid = |m: String| {
        Ok(Outcome::not_ready(
            prev,
            reason::INVALID_SPEC,
            m,
            Action::await_change(),
        ))
    };
    if let Some(had) = &prev.vm
        && *had != spec.vm
    {
        return invalid(format!(
            "spec.vm is immutable: the interface is attached to {had}. Set spec.vm back, or delete this object (which detaches it from {had}) and create one for {}.",
            spec.vm
        ));
    }
    let spec_mac = match spec.mac.as_deref().map(valid_mac) {
        Some(Err(m)) => return invalid(m),
        Some(Ok(m)) => Some(m),
        None => None,
    };
    if let (Some(want), Some(had)) = (&spec_mac, &prev.mac)
        && want != had
    {
        return invalid(format!(
            "spec.mac is immutable: the interface is {had}. Delete and recreate the object to change it."
        ));
    }
    let source = match (spec.type_, spec.source.clone()) {
        (InterfaceType::Network, s) => Some(s.unwrap_or_else(|| "default".into())),
        (InterfaceType::User, None) => None,
        (InterfaceType::User, Some(_)) => {
            return invalid("A user-mode interface takes no source; remove spec.source.".into());
        }
        (t, None) => {
            return invalid(format!(
                "A {} interface needs spec.source (the host {}).",
                type_name(t),
                if t == InterfaceType::Bridge {
                    "bridge"
                } else {
                    "device"
                }
            ));
        }
        (_, Some(s)) => Some(s),
    };
    let Some(view) = ctx.libvirt.domain(vm).await? else {
        return Ok(Outcome::not_ready(
            prev,
            reason::DOMAIN_NOT_FOUND,
            format!(
                "Domain {vm} is not defined on node {}; the interface is attached as soon as it is.",
                ctx.node
            ),
            Action::requeue(Duration::from_secs(300)),
        ));
    };
    let config_dev = view.config.nic(alias).cloned();
    let live_dev = view.live.as_ref().and_then(|l| l.nic(alias)).cloned();
    if config_dev.is_none() && live_dev.is_none() {
        // Check the host side only before creating: an existing NIC keeps working if it goes away.
        match (spec.type_, &source) {
            (InterfaceType::Network, Some(net)) => {
                let n = net.clone();
                let state = ctx
                    .libvirt
                    .call("look up the network", move |c| {
                        Ok(c.lookup_network_by_name(&n)
                            .ok()
                            .map(|n| n.is_active().unwrap_or(false)))
                    })
                    .await?;
                match state {
                    None => {
                        return Ok(Outcome::not_ready(
                            prev,
                            reason::NETWORK_NOT_FOUND,
                            format!(
                                "libvirt network {net} does not exist on node {}; check spec.source (virsh net-list --all).",
                                ctx.node
                            ),
                            Action::requeue(Duration::from_secs(60)),
                        ));
                    }
                    Some(false) => {
                        return Ok(Outcome::not_ready(
                            prev,
                            reason::NETWORK_NOT_FOUND,
                            format!(
                                "libvirt network {net} is not active on node {}; start it (virsh net-start {net}).",
                                ctx.node
                            ),
                            Action::requeue(Duration::from_secs(60)),
                        ));
                    }
                    Some(true) => {}
                }
            }
            (InterfaceType::Bridge | InterfaceType::Direct, Some(dev)) => {
                // Asked of libvirt, which sees the host's interfaces (the agent's pod may not).
                let (d, bridge) = (dev.clone(), spec.type_ == InterfaceType::Bridge);
                let ok = ctx
                    .libvirt
                    .call("look up the host interface", move |c| {
                        Ok(match c.lookup_interface_by_name(&d) {
                            Ok(i) => !bridge || i.xml_desc(0)?.contains("type='bridge'"),
                            Err(e) => match e.code() {
                                Enum::Known(ErrorNumber::NoInterface) => false,
                                // No interface driver in this libvirtd: the attach itself tells.
                                Enum::Known(ErrorNumber::NoSupport) => true,
                                _ => return Err(e),
                            },
                        })
                    })
                    .await?;
                if !ok || dev.contains('/') {
                    return Ok(Outcome::not_ready(
                        prev,
                        reason::HOST_DEVICE_NOT_FOUND,
                        format!(
                            "Host {} {dev} does not exist on node {}; check spec.source.",
                            if spec.type_ == InterfaceType::Bridge {
                                "bridge"
                            } else {
                                "network device"
                            },
                            ctx.node
                        ),
                        Action::requeue(Duration::from_secs(60)),
                    ));
                }
            }
            _ => {}
        }
    }

    // The MAC: the recorded one, else the requested one, else a new one; unique on the node and
    // among every VMInterface of the cluster. Checked until the NIC is in the domain; after that
    // the steady-state reconciles (the guest view refreshes every 20 s) list nothing.
    let settled = prev.mac.is_some() && (config_dev.is_some() || live_dev.is_some());
    let (others, all): (Vec<(String, Option<String>)>, Vec<VMInterface>) = if settled {
        (Vec::new(), Vec::new())
    } else {
        let all = Api::<VMInterface>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|source| ReconcileError::Api {
                action: "list",
                object: "VMInterfaces".into(),
                source,
            })?
            .items;
        (node_macs(ctx).await?, all)
    };
    let cluster_macs: Vec<String> = all
        .iter()
        .filter(|o| o.uid() != obj.uid())
        .flat_map(|o| {
            o.status
                .as_ref()
                .and_then(|s| s.mac.clone())
                .into_iter()
                .chain(o.spec.mac.as_deref().and_then(|m| valid_mac(m).ok()))
        })
        .collect();
    let mac = match prev.mac.clone().or(spec_mac) {
        Some(m) => m,
        None => {
            let mut used: Vec<String> = others.iter().map(|(m, _)| m.clone()).collect();
            used.extend(cluster_macs.iter().cloned());
            allocate_mac(&used)
        }
    };
    let conflict = others
        .iter()
        .any(|(m, a)| *m == mac && a.as_deref() != Some(alias))
        || all
            .iter()
            .any(|o| mac_claimed_before(o, obj, &mac, prev.mac.is_some()));
    if conflict {
        return Ok(Outcome::not_ready(
            prev,
            reason::MAC_CONFLICT,
            format!(
                "MAC {mac} is already used by another interface on node {} or by another VMInterface; choose another spec.mac or leave it empty.",
                ctx.node
            ),
            Action::requeue(Duration::from_secs(60)),
        ));
    }
    if prev.mac.is_none() {
        // Record the MAC before attaching, so a restart never picks another one.
        status::apply_status(api, obj, json!({ "mac": mac })).await?;
    }

    let link_down = match spec.link_state {
        Some(LinkState::Down) => true,
        Some(LinkState::Up) => false,
        None => {
            live_dev
                .as_ref()
                .or(config_dev.as_ref())
                .and_then(|d| d.link_state.as_deref())
                == Some("down")
        }
    };
    let xml = domain::nic_xml(&NicSpec {
        type_: type_name(spec.type_).into(),
        source: source.clone(),
        mac: mac.clone(),
        model: spec.model.clone(),
        link_down,
        mtu: spec.mtu,
        boot_order: spec.boot_order,
        alias: alias.to_string(),
    });
    let want_live = view.active && spec.attach == AttachMode::LiveAndPersistent;
    let want_config = view.persistent;
    let mut events = Vec::new();
    let mut restart = None;

    // Drift: our alias with another MAC (edited behind our back) is replaced.
    let mut config_dev = config_dev;
    if let Some(dev) = &config_dev
        && dev.mac.as_deref() != Some(mac.as_str())
    {
        ctx.libvirt
            .change_device(vm, &dev.xml, DeviceChange::Detach, Affect::Config)
            .await?;
        config_dev = None;
        events.push((
            EventType::Warning,
            "DriftCorrected",
            format!("The MAC of {alias} on {vm} was changed outside virtplane; it is {mac} again."),
        ));
    }
    if let Some(dev) = &live_dev
        && dev.mac.as_deref() != Some(mac.as_str())
    {
        ctx.libvirt
            .change_device(vm, &dev.xml, DeviceChange::Detach, Affect::Live)
            .await?;
        return Ok(Outcome::not_ready(
            prev,
            reason::ATTACH_FAILED,
            format!(
                "The live MAC of the interface was changed outside virtplane; the guest is asked to release it and {mac} is plugged back after."
            ),
            Action::requeue(Duration::from_secs(2)),
        ));
    }
    // Decided before the hot-plug adds its own events.
    let config_drifted = prev.persistent == Some(true) && events.is_empty();
    // The running guest first: a NIC QEMU refuses is refused before anything is written.
    let mut plugged = false;
    if want_live && live_dev.is_none() {
        match device::attach_live(&ctx.libvirt, vm, &xml).await? {
            HotPlug::Refused(e) => {
                return Ok(Outcome::not_ready(
                    prev,
                    reason::ATTACH_FAILED,
                    format!(
                        "The running {vm} refused the interface: {e}. Nothing was changed; fix the spec."
                    ),
                    Action::requeue(Duration::from_secs(300)),
                ));
            }
            HotPlug::Limit(e) => {
                restart = Some(format!(
                    "Hot-plugging into the running {vm} failed ({e}); the interface is in the definition and appears at the next boot."
                ))
            }
            HotPlug::Plugged => {
                plugged = true;
                events.push(if prev.live == Some(true) {
                    (
                        EventType::Warning,
                        "DriftCorrected",
                        format!(
                            "{mac} was removed from the running {vm} outside virtplane; it was put back."
                        ),
                    )
                } else {
                    (
                        EventType::Normal,
                        "Attached",
                        format!("Hot-plugged {mac} into {vm}."),
                    )
                });
            }
        }
    } else if let Some(dev) = &live_dev
        && (dev.link_state.as_deref() == Some("down")) != link_down
    {
        ctx.libvirt
            .change_device(vm, &xml, DeviceChange::Update, Affect::Live)
            .await?;
        events.push((
            EventType::Normal,
            "LinkChanged",
            format!(
                "Link of {mac} set {}.",
                if link_down { "down" } else { "up" }
            ),
        ));
    }
    if want_config && config_dev.is_none() {
        if let Err(message) =
            device::attach_config(&ctx.libvirt, vm, &xml, plugged, "interface").await
        {
            return Ok(Outcome::not_ready(
                prev,
                reason::ATTACH_FAILED,
                message,
                Action::await_change(),
            ));
        }
        if config_drifted {
            events.push((EventType::Warning, "DriftCorrected", format!("{mac} was removed from the definition of {vm} outside virtplane; it was put back.")));
        }
    }
    if let Some(dev) = &config_dev
        && (dev.link_state.as_deref() == Some("down")) != link_down
    {
        ctx.libvirt
            .change_device(vm, &xml, DeviceChange::Update, Affect::Config)
            .await?;
    }

    let view = ctx.libvirt.domain(vm).await?.unwrap_or_default();
    let config_now = view.config.nic(alias).filter(|_| view.persistent).cloned();
    let live_now = view.live.as_ref().and_then(|l| l.nic(alias)).cloned();
    let shown = live_now.as_ref().or(config_now.as_ref());
    // Asking the guest may take seconds: other devices of this domain need not wait for it.
    drop(guard);
    let guest = guest_view(ctx, vm, &mac, &view, spec.type_).await;
    let status = VMInterfaceStatus {
        vm: Some(vm.to_string()),
        mac: Some(mac.clone()),
        host_device: live_now.as_ref().and_then(|d| d.host_device.clone()),
        alias: Some(alias.to_string()),
        guest: Some(guest),
        link_state: shown.map(|d| {
            if d.link_state.as_deref() == Some("down") {
                LinkState::Down
            } else {
                LinkState::Up
            }
        }),
        live: Some(live_now.is_some()),
        persistent: Some(config_now.is_some()),
        ..prev.clone()
    };
    let placed = (!want_live || live_now.is_some()) && (!want_config || config_now.is_some());
    let ready = if placed {
        let where_ = match (live_now.is_some(), config_now.is_some()) {
            (true, true) => "live and persistent",
            (true, false) => "live",
            (false, _) if view.active => {
                "in the definition; it appears at the next boot (attach: Persistent)"
            }
            (false, _) => "in the definition; the domain is not running",
        };
        Desired::truthy(
            condition::READY,
            reason::ATTACHED,
            format!("{mac} is attached to {vm}, {where_}."),
        )
    } else {
        Desired::falsy(
            condition::READY,
            reason::ATTACH_FAILED,
            restart.clone().unwrap_or_else(|| {
                format!("{mac} is not attached to {vm} yet; the agent retries.")
            }),
        )
    };
    // While the domain runs, refresh the guest's view at a modest interval.
    let action = if view.active {
        Action::requeue(Duration::from_secs(20))
    } else {
        Action::requeue(Duration::from_secs(600))
    };
    Ok(Outcome {
        status,
        ready,
        restart,
        events,
        action,
    })
}

/// The guest's name and addresses for `mac`: from the guest agent, else DHCP leases, never
/// waiting more than a few seconds for a guest that does not answer.
async fn guest_view(
    ctx: &Context,
    vm: &str,
    mac: &str,
    view: &domain::DomainView,
    type_: InterfaceType,
) -> GuestInterface {
    let none = |message: String| GuestInterface {
        source: Some(GuestInfoSource::None),
        message: Some(message),
        ..Default::default()
    };
    if !view.active {
        return none(format!("{vm} is not running."));
    }
    let has_agent = view.live.as_ref().is_some_and(|l| l.has_guest_agent);
    let query = |source: u32| {
        let (name, mac) = (vm.to_string(), mac.to_string());
        let call = ctx
            .libvirt
            .call("ask for the guest's interfaces", move |c| {
                let dom = c.lookup_domain_by_name(&name)?;
                let ifaces = dom.interface_addresses(source, 0)?;
                Ok(ifaces.into_iter().find(|i| {
                    i.hwaddr.as_deref().map(str::to_ascii_lowercase).as_deref()
                        == Some(mac.as_str())
                }))
            });
        tokio::time::timeout(Duration::from_secs(3), call)
    };
    let agent_error = if has_agent {
        match query(virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT).await {
            Ok(Ok(Some(i))) => {
                return GuestInterface {
                    name: Some(i.name),
                    ip_addresses: i
                        .addrs
                        .iter()
                        .map(|a| format!("{}/{}", a.addr, a.prefix))
                        .collect(),
                    source: Some(GuestInfoSource::Agent),
                    message: None,
                };
            }
            Ok(Ok(None)) => "the guest agent does not list this MAC yet".to_string(),
            Ok(Err(e)) => format!("the guest agent does not answer ({e})"),
            Err(_) => "the guest agent did not answer within 3s".to_string(),
        }
    } else {
        format!("{vm} has no QEMU guest agent channel (org.qemu.guest_agent.0)")
    };
    if type_ == InterfaceType::Network
        && let Ok(Ok(Some(i))) = query(virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE).await
        && !i.addrs.is_empty()
    {
        return GuestInterface {
            name: None,
            ip_addresses: i
                .addrs
                .iter()
                .map(|a| format!("{}/{}", a.addr, a.prefix))
                .collect(),
            source: Some(GuestInfoSource::Lease),
            message: Some(format!(
                "The guest's name for the interface is unknown: {agent_error}."
            )),
        };
    }
    none(format!(
        "Nothing is known about this interface inside the guest: {agent_error}, and no DHCP lease is known."
    ))
}

/// Whether `other` holds `mac` ahead of `obj`. A MAC recorded in a status is a claim; a MAC only
/// requested in a spec is a claim until its object records one. Between two claims of the same
/// kind the older object wins, so a newer object can never take a MAC from an attached NIC.
fn mac_claimed_before(other: &VMInterface, obj: &VMInterface, mac: &str, recorded: bool) -> bool {
    if other.uid() == obj.uid() {
        return false;
    }
    let other_recorded = other.status.as_ref().and_then(|s| s.mac.as_deref());
    let other_requested = other
        .spec
        .mac
        .as_deref()
        .and_then(|m| valid_mac(m).ok())
        .filter(|_| other_recorded.is_none());
    let older = (other.creation_timestamp(), other.uid()) < (obj.creation_timestamp(), obj.uid());
    match (
        other_recorded == Some(mac),
        other_requested.as_deref() == Some(mac),
    ) {
        // A recorded claim beats a request, and the older of two recorded claims wins.
        (true, _) => !recorded || older,
        // A request never takes a recorded MAC; of two requests the older wins.
        (false, true) => !recorded && older,
        (false, false) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_must_be_unicast_and_well_formed() {
        assert_eq!(valid_mac("52:54:00:AB:cd:01").unwrap(), "52:54:00:ab:cd:01");
        assert!(
            valid_mac("01:00:5e:00:00:01")
                .unwrap_err()
                .contains("multicast")
        );
        assert!(valid_mac("00:00:00:00:00:00").is_err());
        assert!(valid_mac("52:54:00:00:01").is_err());
        assert!(valid_mac("52:54:00:0:001:01").is_err());
    }

    #[test]
    fn allocated_macs_are_in_the_qemu_range_and_unused() {
        let used: Vec<String> = (0..50).map(|_| allocate_mac(&[])).collect();
        let mac = allocate_mac(&used);
        assert!(mac.starts_with("52:54:00:"));
        assert!(!used.contains(&mac));
        assert!(valid_mac(&mac).is_ok());
    }

    fn nic(uid: &str, created: i64, spec_mac: Option<&str>, recorded: Option<&str>) -> VMInterface {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let mut o = VMInterface::new(
            uid,
            serde_json::from_value(serde_json::json!({"vm": "v", "type": "user", "mac": spec_mac}))
                .unwrap(),
        );
        o.metadata.uid = Some(uid.into());
        o.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
        ));
        o.status = Some(VMInterfaceStatus {
            mac: recorded.map(Into::into),
            ..Default::default()
        });
        o
    }

    #[test]
    fn a_newer_object_never_takes_a_recorded_mac() {
        let m = "52:54:00:00:00:01";
        let attached = nic("a", 1, None, Some(m));
        let newcomer = nic("b", 2, Some(m), None);
        // The newcomer is refused; the attached NIC keeps its MAC.
        assert!(mac_claimed_before(&attached, &newcomer, m, false));
        assert!(!mac_claimed_before(&newcomer, &attached, m, true));
        // Two recorded claims (a race): the older wins.
        let racer = nic("c", 3, None, Some(m));
        assert!(mac_claimed_before(&attached, &racer, m, true));
        assert!(!mac_claimed_before(&racer, &attached, m, true));
        // Two requests: the older wins.
        let first = nic("d", 4, Some(m), None);
        let second = nic("e", 5, Some(m), None);
        assert!(mac_claimed_before(&first, &second, m, false));
        assert!(!mac_claimed_before(&second, &first, m, false));
        // Itself and other MACs never conflict.
        assert!(!mac_claimed_before(&attached, &attached, m, true));
        assert!(!mac_claimed_before(
            &attached,
            &newcomer,
            "52:54:00:00:00:02",
            false
        ));
    }
}
