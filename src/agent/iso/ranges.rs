//! The cluster's own networks, which downloads may never reach: the pod ranges, learned from
//! the Nodes' `spec.podCIDRs` (and the older `spec.podCIDR`) by a watch, and the service range,
//! which the Kubernetes 1.20 API does not publish (no ServiceCIDR object), so an administrator
//! gives it with `--service-cidr` (a plain deny entry).

use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};

use crate::download::{self, Cidr};
use crate::shutdown::{self, Shutdown};

/// The pod ranges learned so far, shared by the watch and the downloads.
#[derive(Clone, Debug, Default)]
pub struct ClusterRanges(Arc<RwLock<Vec<Cidr>>>);

impl ClusterRanges {
    /// The ranges now.
    pub fn get(&self) -> Vec<Cidr> {
        self.0.read().map(|v| v.clone()).unwrap_or_default()
    }

    fn set(&self, ranges: Vec<Cidr>) {
        if let Ok(mut v) = self.0.write() {
            *v = ranges;
        }
    }
}

impl PartialEq for ClusterRanges {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for ClusterRanges {}

/// The pod ranges of `nodes`, sorted, each once; a malformed one is left out. Pure.
pub fn pod_ranges<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Vec<Cidr> {
    let mut out: Vec<Cidr> = nodes
        .into_iter()
        .filter_map(|n| n.spec.as_ref())
        .flat_map(|s| {
            s.pod_cidrs
                .iter()
                .flatten()
                .chain(s.pod_cidr.iter())
                .filter_map(|c| download::parse_cidr(c).ok())
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Keeps `ranges` equal to the pod ranges of the cluster's Nodes until shutdown. Without the
/// right to list Nodes the watch retries with back-off and the ranges stay as they were.
pub async fn watch(client: kube::Client, ranges: ClusterRanges, shutdown: Shutdown) {
    let (reader, writer) = reflector::store::<Node>();
    let events = watcher(Api::<Node>::all(client), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .take_until(shutdown::wait(shutdown));
    futures::pin_mut!(events);
    while let Some(ev) = events.next().await {
        if let Err(error) = ev {
            tracing::warn!(%error, "failed to watch Nodes for the cluster's pod ranges");
            continue;
        }
        let now = pod_ranges(reader.state().iter().map(|n| &**n));
        if now != ranges.get() {
            tracing::info!(ranges = ?now, "the cluster's pod ranges are refused to downloads");
            ranges.set(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSpec;

    fn node(cidrs: &[&str], old: Option<&str>) -> Node {
        Node {
            spec: Some(NodeSpec {
                pod_cidrs: Some(cidrs.iter().map(|c| c.to_string()).collect()),
                pod_cidr: old.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn every_nodes_ranges_once_and_malformed_ones_left_out() {
        let nodes = [
            node(
                &["100.64.1.0/24", "fd00:10:244:1::/64"],
                Some("100.64.1.0/24"),
            ),
            node(&["100.64.2.0/24"], None),
            node(&["not-a-cidr"], None),
            Node::default(),
        ];
        let got = pod_ranges(&nodes);
        let want: Vec<Cidr> = ["100.64.1.0/24", "100.64.2.0/24", "fd00:10:244:1::/64"]
            .iter()
            .map(|c| download::parse_cidr(c).unwrap())
            .collect();
        assert_eq!(got, want);
        let shared = ClusterRanges::default();
        shared.set(got.clone());
        assert_eq!(shared.clone().get(), got, "clones share the ranges");
    }

    #[test]
    fn the_learned_ranges_are_denied_with_the_flags() {
        let settings = super::super::DownloadSettings {
            deny: vec![download::parse_cidr("172.30.0.0/16").unwrap()],
            ..Default::default()
        };
        let learned = settings.clone();
        assert_eq!(settings.options(None).deny.len(), 1);
        // The watch updates the shared ranges: downloads planned afterwards refuse them.
        learned
            .cluster
            .set(pod_ranges(&[node(&["100.64.1.0/24"], None)]));
        let deny = settings.options(None).deny;
        assert_eq!(
            deny,
            [
                download::parse_cidr("172.30.0.0/16").unwrap(),
                download::parse_cidr("100.64.1.0/24").unwrap()
            ]
        );
    }
}
