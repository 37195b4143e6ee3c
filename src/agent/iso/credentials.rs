//! The login and CA bundle a spec names, read from the object's namespace.

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Client;
use kube::api::Api;

use super::checks::IsoRefusal;
use super::reason::IsoReason;
use crate::agent::refusal::Refusal;
use crate::api::IsoDownloadSpec;
use crate::download::{Credentials, TlsOptions};

/// Reads the Secret and ConfigMap `spec` names; a missing one or key is a refusal.
pub async fn credentials(
    client: &Client,
    namespace: &str,
    spec: &IsoDownloadSpec,
) -> Result<(Option<Credentials>, TlsOptions), IsoRefusal> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let missing = |what: String| Refusal::fix(IsoReason::CredentialsNotFound, what);
    let mut auth = None;
    if let Some(a) = &spec.auth {
        let s = secrets
            .get(&a.secret_ref.name)
            .await
            .map_err(|e| missing(format!("Secret {} cannot be read: {e}.", a.secret_ref.name)))?;
        let data = s.data.unwrap_or_default();
        let get = |k: &str| {
            data.get(k)
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        };
        match (get("username"), get("password")) {
            (Some(username), Some(password)) => auth = Some(Credentials { username, password }),
            _ => {
                return Err(missing(format!(
                    "Secret {} needs the keys username and password.",
                    a.secret_ref.name
                )));
            }
        }
    }
    let mut tls = TlsOptions::default();
    if let Some(t) = &spec.tls {
        tls.insecure_skip_verify = t.insecure_skip_verify;
        if let Some(ca) = &t.ca_bundle {
            if let Some(r) = &ca.secret_key_ref {
                let key = r.key.clone().unwrap_or_else(|| "ca.crt".into());
                let s = secrets
                    .get(&r.name)
                    .await
                    .map_err(|e| missing(format!("Secret {} cannot be read: {e}.", r.name)))?;
                let pem = s.data.unwrap_or_default().get(&key).map(|v| v.0.clone());
                tls.extra_ca_pem = Some(
                    pem.ok_or_else(|| missing(format!("Secret {} has no key {key}.", r.name)))?,
                );
            } else if let Some(r) = &ca.config_map_key_ref {
                let key = r.key.clone().unwrap_or_else(|| "ca.crt".into());
                let c = configmaps
                    .get(&r.name)
                    .await
                    .map_err(|e| missing(format!("ConfigMap {} cannot be read: {e}.", r.name)))?;
                let pem = c
                    .data
                    .unwrap_or_default()
                    .get(&key)
                    .map(|v| v.clone().into_bytes());
                tls.extra_ca_pem =
                    Some(pem.ok_or_else(|| {
                        missing(format!("ConfigMap {} has no key {key}.", r.name))
                    })?);
            }
        }
    }
    Ok((auth, tls))
}
