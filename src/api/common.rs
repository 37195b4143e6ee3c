//! Types shared by several kinds.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Condition types and reasons used across kinds.
pub mod condition {
    /// Set by the controller: the object is bound to a node.
    pub const SCHEDULED: &str = "Scheduled";
    /// Set by the agent: the object's desired state is in place. `kubectl wait --for=condition=Ready`.
    pub const READY: &str = "Ready";
    /// Set by the agent while long work (a download, a copy) runs.
    pub const PROGRESSING: &str = "Progressing";
}

/// How a device change is applied to a domain.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AttachMode {
    /// Hot-plug into the running guest and write to the persistent definition; on a shut-off
    /// domain, the definition only.
    #[default]
    LiveAndPersistent,
    /// Write the persistent definition only: the device appears at the next boot.
    Persistent,
}

/// A reference to an object in the same namespace, by name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectReference {
    /// Name of the object in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Schema of a `conditions` list: metav1 Conditions as a list-map keyed on `type`, so that
/// server-side apply lets the controller and the agent each own their own condition types.
pub fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<Condition>();
    json_schema!({
        "type": "array",
        "description": "Current state as metav1 Conditions, one per type (Scheduled by the controller; Ready and Progressing by the agent).",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}

/// Schema of a Kubernetes quantity written as a string (`10Gi`, `512Mi`, `1G`). Not the
/// int-or-string schema of `Quantity`: kube-apiserver 1.20 cannot build its OpenAPI models from
/// an int-or-string property of a custom resource, and then treats every list of that resource as
/// atomic in server-side apply, so the agent's and the controller's conditions replace each other.
pub fn quantity_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
        "maxLength": 64,
    })
}

/// Pattern of a Kubernetes node / libvirt-friendly object name (RFC 1123 subdomain).
pub const NODE_NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// Pattern of a libvirt domain name accepted by virtplane: no slashes or control characters.
pub const DOMAIN_NAME_PATTERN: &str = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}$";
