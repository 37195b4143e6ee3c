//! The login and CA bundle a spec names, read from the object's namespace.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Client;
use kube::api::Api;

use super::checks::IsoRefusal;
use super::reason::IsoReason;
use crate::agent::refusal::Refusal;
use crate::api::IsoDownloadSpec;
use crate::download::{Credentials, TlsOptions};

/// The label that lets a Secret's login be sent to any download host.
pub const OPT_IN_LABEL: &str = "virtplane.io/download-credentials";
/// The annotation listing the hosts (comma-separated) a Secret's login may be sent to.
pub const HOSTS_ANNOTATION: &str = "virtplane.io/download-hosts";

/// Whether a Secret with `labels` and `annotations` opted in to being sent to `host`; the
/// refusal's message otherwise.
pub fn opted_in(
    name: &str,
    labels: Option<&BTreeMap<String, String>>,
    annotations: Option<&BTreeMap<String, String>>,
    host: &str,
) -> Result<(), IsoRefusal> {
    if labels
        .and_then(|l| l.get(OPT_IN_LABEL))
        .is_some_and(|v| v == "true")
    {
        return Ok(());
    }
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let listed = annotations.and_then(|a| a.get(HOSTS_ANNOTATION));
    if listed.is_some_and(|l| {
        l.split(',')
            .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
            .any(|h| !h.is_empty() && h == host)
    }) {
        return Ok(());
    }
    let fix = match listed {
        Some(_) => format!("add {host} to its annotation {HOSTS_ANNOTATION}"),
        None => format!(
            "annotate it {HOSTS_ANNOTATION}={host} (or label it {OPT_IN_LABEL}=true for any host)"
        ),
    };
    Err(Refusal::fix(
        IsoReason::CredentialsNotAllowed,
        format!("Secret {name} is not allowed to be sent to {host}: {fix}."),
    ))
}

/// Reads the Secret and ConfigMap `spec` names; a missing one or key is a refusal, and so is a
/// login Secret that did not opt in for the URL's host ([`opted_in`]).
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
        let host = reqwest::Url::parse(&spec.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_default();
        opted_in(
            &a.secret_ref.name,
            s.metadata.labels.as_ref(),
            s.metadata.annotations.as_ref(),
            &host,
        )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn map(k: &str, v: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(k.to_string(), v.to_string())])
    }

    #[test]
    fn secrets_opt_in_by_label_or_host_list() {
        let label = map(OPT_IN_LABEL, "true");
        let hosts = map(HOSTS_ANNOTATION, "mirror.example.org, Other.example.");
        type Case<'a> = (
            Option<&'a BTreeMap<String, String>>,
            Option<&'a BTreeMap<String, String>>,
            &'a str,
            bool,
        );
        let table: &[Case] = &[
            (Some(&label), None, "anything.example", true),
            (None, Some(&hosts), "mirror.example.org", true),
            (None, Some(&hosts), "MIRROR.example.org.", true),
            (None, Some(&hosts), "other.example", true),
            (None, Some(&hosts), "evil.example", false),
            (None, Some(&hosts), "example.org", false),
            (None, None, "mirror.example.org", false),
            (Some(&map(OPT_IN_LABEL, "false")), None, "h", false),
            (None, Some(&map(HOSTS_ANNOTATION, "")), "h", false),
        ];
        for (labels, annotations, host, ok) in table {
            let got = opted_in("s", *labels, *annotations, host);
            assert_eq!(got.is_ok(), *ok, "{host}");
            if let Err(e) = got {
                assert_eq!(e.reason, IsoReason::CredentialsNotAllowed);
                assert!(e.message.contains(HOSTS_ANNOTATION), "{}", e.message);
            }
        }
    }
}
