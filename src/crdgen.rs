//! The CustomResourceDefinitions of every kind, generated from the Rust types.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::api::{Hypervisor, IsoDownload, VMClone, VMInterface, VirtualMachineStorage};

/// Every CRD virtplane serves, in a stable order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        VirtualMachineStorage::crd(),
        VMInterface::crd(),
        VMClone::crd(),
        IsoDownload::crd(),
        Hypervisor::crd(),
    ]
}

/// Every CRD as one multi-document YAML stream, as `virtplane crds` prints it.
pub fn render() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in all() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
