//! `Hypervisor`: one node's libvirt inventory, kept current by the agent on that node.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::conditions_schema;

/// A hypervisor node: its libvirt domains, storage pools and networks, as the agent on that node
/// sees them. Named after the node; written by the agent only.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "virtplane.io",
    version = "v1alpha1",
    kind = "Hypervisor",
    plural = "hypervisors",
    shortname = "hv",
    category = "virtplane",
    status = "HypervisorStatus",
    derive = "PartialEq",
    doc = "A hypervisor node's libvirt inventory, kept current by the virtplane agent on that node.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Libvirt",
        type_ = "string",
        json_path = ".status.libvirtVersion"
    ),
    printcolumn(
        name = "Heartbeat",
        type_ = "date",
        json_path = ".status.lastHeartbeatTime"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct HypervisorSpec {
    /// libvirt connection URI the agent on this node uses (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_uri: Option<String>,
}

/// Observed state of a hypervisor node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HypervisorStatus {
    /// Version of libvirtd, for example `11.3.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_version: Option<String>,
    /// Version of the hypervisor (QEMU), for example `10.0.2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor_version: Option<String>,
    /// Domains defined or running on the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub domains: Vec<DomainSummary>,
    /// Storage pools of the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub storage_pools: Vec<StoragePoolSummary>,
    /// Virtual networks of the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub networks: Vec<NetworkSummary>,
    /// When the agent last wrote this status (written only when the inventory or readiness
    /// changed). The node's heartbeat is its Lease, kube-node-lease/virtplane-node-<node>: the
    /// controller marks the node unreachable when that is not renewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// Ready: the agent is connected to libvirt and the inventory is current.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// A libvirt domain.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainSummary {
    /// Domain name.
    pub name: String,
    /// Domain UUID.
    pub uuid: String,
    /// State: `running`, `paused`, `shutoff`, `shutdown`, `crashed`, `blocked`, `pmsuspended`.
    pub state: String,
    /// Whether the domain has a persistent definition.
    pub persistent: bool,
}

/// A libvirt storage pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoragePoolSummary {
    /// Pool name.
    pub name: String,
    /// Pool type, for example `dir`, `logical`, `netfs`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Target path of the pool, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Allocated bytes.
    pub allocation: u64,
    /// Available bytes.
    pub available: u64,
    /// Whether the pool is active.
    pub active: bool,
}

/// A libvirt virtual network.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSummary {
    /// Network name.
    pub name: String,
    /// Host bridge of the network, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Whether the network is active.
    pub active: bool,
}
