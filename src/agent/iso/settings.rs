//! The node's download limits, as the agent's flags set them: slots, where downloads may
//! connect, how large a file may be, how much of a pool stays free, and how slow or long a
//! transfer may be before it gives up its slot.

use std::time::Duration;

use crate::download::{self, Cidr, DownloadOptions, MinRate};

/// The agent's download settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownloadSettings {
    /// Downloads that may transfer at once on this node.
    pub max_downloads: usize,
    /// Networks always refused (`--download-deny-cidr`, `--service-cidr`), besides the default
    /// deny list.
    pub deny: Vec<Cidr>,
    /// The cluster's pod ranges, learned from its Nodes: always refused too.
    pub cluster: super::ClusterRanges,
    /// Networks of the default deny list that are opened (`--download-allow-cidr`).
    pub allow: Vec<Cidr>,
    /// The largest file (`--download-max-bytes`); an object may set a lower limit.
    pub max_bytes: u64,
    /// Bytes every pool keeps free (`--download-min-free-bytes`).
    pub min_free_bytes: u64,
    /// The slowest transfer kept in a slot (`--download-min-rate-bytes` over
    /// `--download-rate-window-seconds`); `None` disables the check.
    pub min_rate: Option<MinRate>,
    /// The longest one attempt may transfer (`--download-deadline-seconds`); `None`: no limit.
    pub deadline: Option<Duration>,
}

impl Default for DownloadSettings {
    fn default() -> Self {
        Self {
            max_downloads: 2,
            deny: Vec::new(),
            cluster: Default::default(),
            allow: Vec::new(),
            max_bytes: 64 << 30,
            min_free_bytes: 1 << 30,
            min_rate: Some(MinRate {
                bytes_per_second: 1024,
                window: Duration::from_secs(120),
            }),
            deadline: Some(Duration::from_secs(24 * 3600)),
        }
    }
}

impl DownloadSettings {
    /// The downloader's options for one object, whose own limit is `object_max` bytes.
    pub fn options(&self, object_max: Option<u64>) -> DownloadOptions {
        DownloadOptions {
            deny: self
                .deny
                .iter()
                .copied()
                .chain(self.cluster.get())
                .collect(),
            default_deny: true,
            allow: self.allow.clone(),
            max_bytes: Some(self.max_bytes(object_max)),
            min_rate: self.min_rate,
            deadline: self.deadline,
            min_free_bytes: Some(self.min_free_bytes),
            ..DownloadOptions::default()
        }
    }

    /// The size limit of an object: its own, capped by the node's.
    pub fn max_bytes(&self, object_max: Option<u64>) -> u64 {
        object_max.map_or(self.max_bytes, |m| m.min(self.max_bytes))
    }
}

/// Parses CIDRs of a flag.
pub fn parse_cidrs(cidrs: &[String]) -> Result<Vec<Cidr>, String> {
    cidrs.iter().map(|c| download::parse_cidr(c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_limit_is_capped_by_the_node() {
        let s = DownloadSettings {
            max_bytes: 100,
            ..DownloadSettings::default()
        };
        assert_eq!(s.max_bytes(None), 100);
        assert_eq!(s.max_bytes(Some(10)), 10);
        assert_eq!(s.max_bytes(Some(1000)), 100);
        let o = s.options(Some(5));
        assert_eq!(o.max_bytes, Some(5));
        assert!(
            o.default_deny,
            "the agent always refuses the default networks"
        );
    }
}
