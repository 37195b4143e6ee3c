//! `VMInterface`: a network interface of a libvirt domain, identified by its MAC address.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{AttachMode, DOMAIN_NAME_PATTERN, NODE_NAME_PATTERN, conditions_schema};

/// Pattern of a MAC address written as six colon-separated hex pairs.
pub const MAC_PATTERN: &str = r"^([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}$";

/// A network interface of a virtual machine, identified by its MAC address. The agent hot-plugs
/// it, shows the name the guest gives it, and detaches it when this object is deleted.
///
/// Every spec field has one of three outcomes when it changes: `linkState`, `bandwidth` and the
/// `source` of a `network` or `bridge` interface change in the running guest and the definition;
/// `model`, `mtu`, `queues`, `bootOrder` and the `source` of a `direct` interface are written to
/// the definition and take effect at the next boot (`RestartRequired=True` lists them until the
/// domain has restarted); `vm`, `type` and `mac` cannot change (`FieldImmutable`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "virtplane.io",
    version = "v1alpha1",
    kind = "VMInterface",
    plural = "vminterfaces",
    shortname = "vmif",
    category = "virtplane",
    namespaced,
    status = "VMInterfaceStatus",
    derive = "PartialEq",
    doc = "A network interface of a libvirt virtual machine, identified by its MAC.",
    printcolumn(name = "VM", type_ = "string", json_path = ".spec.vm"),
    printcolumn(name = "MAC", type_ = "string", json_path = ".status.mac"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.source"),
    printcolumn(name = "Guest", type_ = "string", json_path = ".status.guest.name"),
    printcolumn(name = "Link", type_ = "string", json_path = ".status.linkState"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".status.nodeName",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VMInterfaceSpec {
    /// Name of the libvirt domain (VM) the interface belongs to. Immutable (`FieldImmutable`).
    #[schemars(pattern(DOMAIN_NAME_PATTERN))]
    pub vm: String,
    /// Node whose hypervisor runs the VM. Leave empty to let the controller find it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(NODE_NAME_PATTERN))]
    pub node_name: Option<String>,
    /// Kind of interface: `network` (a libvirt network, the default), `bridge` (a host bridge),
    /// `direct` (macvtap on a host device) or `user` (user-mode networking). Immutable once the
    /// interface is attached (`FieldImmutable`).
    #[serde(rename = "type", default)]
    pub type_: InterfaceType,
    /// The libvirt network, host bridge or host device, depending on `type`. For `network` it
    /// defaults to `default`; `user` takes none. A new network or bridge is switched to in the
    /// running guest; a new `direct` device waits for the next boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub source: Option<String>,
    /// MAC address (for example `52:54:00:12:34:56`); must be unicast. When empty one is allocated
    /// from the QEMU range and kept in `status.mac` for good. Immutable (`FieldImmutable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(MAC_PATTERN))]
    pub mac: Option<String>,
    /// Device model seen by the guest, for example `virtio` (the default), `e1000e` or `rtl8139`.
    /// A change takes effect at the next boot.
    #[serde(default = "default_model")]
    #[schemars(pattern(r"^[A-Za-z0-9_-]{1,32}$"))]
    pub model: String,
    /// Link state of the interface: `up` or `down`. Changed in place, without a detach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_state: Option<LinkState>,
    /// MTU of the interface (libvirt's `<mtu size>`), seen by the host side and, with virtio,
    /// offered to the guest. A change takes effect at the next boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 68, max = 65535))]
    pub mtu: Option<u32>,
    /// Number of queue pairs of a multiqueue `virtio` interface (libvirt's `<driver queues>`),
    /// usually the number of vCPUs. Only with `model: virtio`. A change takes effect at the next
    /// boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub queues: Option<u32>,
    /// Bandwidth limits (libvirt's `<bandwidth>`), applied to the running guest in place. Leave
    /// empty for no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
    /// Boot priority of the interface (1 boots first). A change is written to the definition and
    /// takes effect at the next boot. On a domain that orders boot devices by type
    /// (`<os><boot dev=.../>`) that order is turned into per-device boot orders in the same
    /// write, keeping the other devices' relative order (an Event says how). Deleting the object
    /// removes the interface with its order; the other devices keep theirs.
    /// Unset leaves the order the definition has (such as one a conversion gave it), so
    /// removing the field does not remove an order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub boot_order: Option<u32>,
    /// `LiveAndPersistent` (default) hot-plugs into a running guest and writes the definition;
    /// `Persistent` writes the definition only, for the next boot.
    #[serde(default)]
    pub attach: AttachMode,
}

fn default_model() -> String {
    "virtio".to_string()
}

/// Bandwidth limits of an interface, in each direction as seen from the guest.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Bandwidth {
    /// Traffic into the guest. Leave empty for no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<BandwidthLimit>,
    /// Traffic out of the guest. Leave empty for no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<BandwidthLimit>,
}

/// One direction of a bandwidth limit, in libvirt's units.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BandwidthLimit {
    /// Average rate in kibibytes per second (KiB/s).
    #[schemars(range(min = 1))]
    pub average: u32,
    /// Highest rate in KiB/s while bursting; not below `average`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub peak: Option<u32>,
    /// How many KiB may be sent at `peak` in one burst.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
}

/// Kind of network interface.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InterfaceType {
    /// Attached to a libvirt virtual network.
    #[default]
    Network,
    /// Attached to a host bridge.
    Bridge,
    /// macvtap on a host network device.
    Direct,
    /// QEMU user-mode networking.
    User,
}

/// Link state of a network interface.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// Link up.
    Up,
    /// Link down: the guest sees the cable unplugged.
    Down,
}

/// Observed state of a `VMInterface`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VMInterfaceStatus {
    /// Domain the device was attached to. `spec.vm` is immutable: a change is refused
    /// (`FieldImmutable`) and the device stays on this domain until the object is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// MAC address of the interface: `spec.mac`, or the one allocated; never changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Host-side device (for example `vnet3`) while the guest runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_device: Option<String>,
    /// libvirt user alias (`ua-...`) by which the agent recognises its own interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// The interface as the guest sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestInterface>,
    /// Link state of the live interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_state: Option<LinkState>,
    /// Bandwidth limits in effect: the running guest's, else the definition's. Empty when
    /// unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
    /// Spec fields written to the definition that the running guest does not have yet: they take
    /// effect at the next boot of the domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for_restart: Vec<String>,
    /// Whether the interface is present in the running guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<bool>,
    /// Whether the interface is present in the persistent domain definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    /// Node the object is bound to (set by the controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The `metadata.generation` the agent last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Scheduled and Ready conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// What the guest reports about an interface.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestInterface {
    /// Name the guest gives the interface, for example `eth0` (known only from the guest agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// IP addresses with prefix length, for example `192.168.122.10/24`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
    /// Where this came from: `agent` (QEMU guest agent), `lease` (libvirt DHCP leases) or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<GuestInfoSource>,
    /// Why nothing is known, when `source` is `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Origin of guest interface information.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum GuestInfoSource {
    /// The QEMU guest agent inside the guest.
    Agent,
    /// DHCP leases of the libvirt network.
    Lease,
    /// Nothing is known.
    None,
}
