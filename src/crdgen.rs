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
        for line in serde_yaml::to_string(&crd)?.lines() {
            out.push_str(&quote_yaml11_bool(line));
            out.push('\n');
        }
    }
    Ok(out)
}

/// `- on` with the scalar quoted when YAML 1.1 would read it as a boolean. serde_yaml writes
/// YAML 1.2, where `on` and `off` are strings, but kubectl, Helm and PyYAML read YAML 1.1 and
/// would turn an enum value such as `detectZeroes: on` into `true`.
fn quote_yaml11_bool(line: &str) -> std::borrow::Cow<'_, str> {
    const YAML11_BOOLS: [&str; 8] = ["on", "off", "yes", "no", "y", "n", "On", "Off"];
    match line.trim_start().strip_prefix("- ") {
        Some(item) if YAML11_BOOLS.contains(&item) => {
            let indent = &line[..line.len() - line.trim_start().len()];
            format!("{indent}- '{item}'").into()
        }
        _ => line.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml11_booleans_in_lists_are_quoted() {
        assert_eq!(quote_yaml11_bool("    - on"), "    - 'on'");
        assert_eq!(quote_yaml11_bool("  - off"), "  - 'off'");
        assert_eq!(quote_yaml11_bool("  - unmap"), "  - unmap");
        assert_eq!(quote_yaml11_bool("  type: string"), "  type: string");
    }

    /// kube-apiserver 1.20 cannot build the OpenAPI models of a custom resource with an
    /// int-or-string property ("invalid property: anyOf"); server-side apply then treats all its
    /// lists as atomic, and the agent's and the controller's conditions replace each other.
    #[test]
    fn no_schema_has_an_int_or_string_property() {
        for crd in all() {
            let yaml = serde_yaml::to_string(&crd).expect("serialise");
            assert!(
                !yaml.contains("x-kubernetes-int-or-string") && !yaml.contains("anyOf"),
                "{}",
                crd.metadata.name.unwrap_or_default()
            );
        }
    }
}
