//! `IsoDownload`: an ISO image fetched into a storage pool on a node.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{LocalObjectReference, NODE_NAME_PATTERN, conditions_schema};

/// Pattern of a download URL: http, https, ftp or ftps only.
pub const URL_PATTERN: &str = r"^(https?|ftps?)://[^\s/?#]+([/?#]\S*)?$";
/// Pattern of a volume name: `[A-Za-z0-9._-]`, no leading dot, at most 240 bytes (the
/// downloader's `MAX_NAME_LEN`: its partial files add a dot and `.part.json` to the name
/// within the 255-byte limit of a file name).
pub const VOLUME_NAME_PATTERN: &str = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,239}$";

/// An ISO image downloaded into a libvirt storage pool on a node, by the agent on that node.
/// Pause and resume with `spec.paused`; delete the object to cancel.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "virtplane.io",
    version = "v1alpha1",
    kind = "IsoDownload",
    plural = "isodownloads",
    shortname = "iso",
    category = "virtplane",
    namespaced,
    status = "IsoDownloadStatus",
    derive = "PartialEq",
    doc = "An ISO image downloaded into a libvirt storage pool on a node.",
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.url"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress"),
    printcolumn(name = "Size", type_ = "integer", json_path = ".status.totalBytes"),
    printcolumn(name = "Rate", type_ = "integer", json_path = ".status.bytesPerSecond"),
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
pub struct IsoDownloadSpec {
    /// URL to fetch: `http`, `https`, `ftp` or `ftps` (explicit TLS). A URL that does not
    /// parse fails with reason `InvalidURL`. Immutable once the download started (a change
    /// fails it with reason `SpecChanged`). A file served compressed with xz, gzip or zstd
    /// (found by its magic bytes, not its name) is decompressed while it downloads and
    /// stored decompressed (`status.compression`); a corrupt or truncated one fails with
    /// reason `CorruptImage`, a qcow2 image with a backing or data file with `UnsafeImage`.
    #[schemars(pattern(URL_PATTERN), length(max = 4096))]
    pub url: String,
    /// Name of the volume to create: ASCII letters, digits, `.`, `_` and `-`, no leading dot,
    /// at most 240 bytes. Default: the last segment of the URL's path, percent-decoded, with
    /// every other character (and a leading dot) replaced by `_` (`Fedora%2040.iso` gives
    /// `Fedora_40.iso`); when that is longer than 240 bytes, or the path names no file, the
    /// download fails with reason `InvalidName` and this field must be set. Immutable once the
    /// download started (a change fails it with reason `SpecChanged`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(VOLUME_NAME_PATTERN))]
    pub name: Option<String>,
    /// Storage pool to download into. Immutable once the download started (a change fails it
    /// with reason `SpecChanged`).
    #[serde(default = "default_pool")]
    #[schemars(length(min = 1, max = 255))]
    pub pool: String,
    /// Node whose pool receives the file. Leave empty when only one node has the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(NODE_NAME_PATTERN))]
    pub node_name: Option<String>,
    /// Stop the transfer and keep the partial data; set back to false to resume where it stopped.
    #[serde(default)]
    pub paused: bool,
    /// Expected checksum of the file, verified before the volume is made available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<Checksum>,
    /// Credentials for basic auth or FTP login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<DownloadAuth>,
    /// TLS settings for https and ftps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<DownloadTls>,
    /// What happens to a completed volume when this object is deleted: `Retain` (default) keeps
    /// it, `Delete` removes it. Partial data is always removed.
    #[serde(default)]
    pub reclaim_policy: ReclaimPolicy,
    /// The largest file accepted, in bytes: a larger announced length, or more data, fails
    /// the download with reason `TooLarge` and deletes the partial data. For a compressed
    /// file it bounds the decompressed size too. Capped by the node's limit (the agent's
    /// `--download-max-bytes`), which applies when this is unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_bytes: Option<u64>,
    /// Accept a response that is an HTML or XML document. By default such a response (by
    /// its `Content-Type` or its first bytes) is an error or login page, not an image: the
    /// download fails with reason `ErrorPage` and its data is deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_markup: bool,
    /// Send credentials (`spec.auth`, or `user:password@` in the URL) over plain `http` or
    /// `ftp`, where anyone on the path can read them. Without it such a download fails with
    /// reason `CredentialsNotAllowed` before it starts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_plain_text_credentials: bool,
}

fn default_pool() -> String {
    "ISO".to_string()
}

/// An expected checksum.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Checksum {
    /// Hash algorithm.
    pub algorithm: ChecksumAlgorithm,
    /// Expected digest, in hexadecimal.
    #[schemars(pattern(r"^[0-9A-Fa-f]{32,128}$"))]
    pub value: String,
}

/// Hash algorithm of a checksum.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChecksumAlgorithm {
    /// SHA-256.
    Sha256,
    /// SHA-512.
    Sha512,
    /// SHA-1 (weak; for old mirrors only).
    Sha1,
    /// MD5 (weak; for old mirrors only).
    Md5,
}

/// Credentials of a download.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DownloadAuth {
    /// Secret in the same namespace with keys `username` and `password`. The Secret must
    /// opt in: the label `virtplane.io/download-credentials: "true"` lets it be sent to any
    /// host, the annotation `virtplane.io/download-hosts` (comma-separated host names) to
    /// those hosts only. Otherwise the download fails with reason `CredentialsNotAllowed`.
    pub secret_ref: LocalObjectReference,
}

/// TLS settings of a download.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DownloadTls {
    /// Extra CA certificates (PEM) trusted for this download, from a Secret or ConfigMap in the
    /// same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<CaBundleSource>,
    /// Skip verification of the server's certificate. Dangerous: use only for testing.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// Where a CA bundle comes from: exactly one of a Secret or a ConfigMap key.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("maxProperties" = 1, "minProperties" = 1))]
pub struct CaBundleSource {
    /// A key of a Secret in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeyRef>,
    /// A key of a ConfigMap in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeyRef>,
}

/// A key of a Secret or ConfigMap.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    /// Name of the object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the object; default `ca.crt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// What happens to a completed volume when its `IsoDownload` is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ReclaimPolicy {
    /// Keep the volume.
    #[default]
    Retain,
    /// Delete the volume.
    Delete,
}

/// Phase of a download.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum DownloadPhase {
    /// Waiting to start (for example for a free download slot).
    Pending,
    /// Transferring.
    Downloading,
    /// Stopped by `spec.paused`; partial data kept.
    Paused,
    /// Checking data against the checksum: the data kept from an earlier run before resuming,
    /// or the finished file; `downloadedBytes` counts the data being checked.
    Verifying,
    /// The volume is in the pool.
    Completed,
    /// Failed; see the Ready condition.
    Failed,
}

/// Observed state of an `IsoDownload`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IsoDownloadStatus {
    /// Phase of the download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<DownloadPhase>,
    /// Size announced by the server; absent when it does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// Bytes written so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downloaded_bytes: Option<u64>,
    /// Progress as a percentage, for example `42%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Recent transfer rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<u64>,
    /// The URL, pool and volume name the agent started with. `spec.url`, `spec.name` and
    /// `spec.pool` cannot change afterwards: a change fails the download with reason
    /// `SpecChanged`. Cleanup uses these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<DownloadTarget>,
    /// The volume, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<DownloadedVolume>,
    /// Whether the checksum was verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum_verified: Option<bool>,
    /// The format the completed file's magic bytes show: `iso9660`, `udf`, `qcow2` or `raw`
    /// (none of these); for a file served compressed, that of the decompressed image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// The compression the file was served with, found by its magic bytes (not its name):
    /// `xz`, `gzip` or `zstd`. Such a file is decompressed while it downloads and stored
    /// decompressed; `format` is then the decompressed image's, and `spec.checksum` applies to
    /// the compressed bytes as served. Unset for a file served uncompressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Number of attempts so far. A transient failure (connection, timeout, HTTP 5xx, FTP 4xx)
    /// is retried after 5 s, doubling up to 5 min (back to 5 s after an attempt that received
    /// data); the Ready message says when the next attempt starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// When the transfer started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the download completed or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Node the object is bound to (set by the controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The `metadata.generation` the agent last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Scheduled, Progressing and Ready conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// What a download started with.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DownloadTarget {
    /// The URL.
    pub url: String,
    /// Storage pool.
    pub pool: String,
    /// Volume name (`spec.name`, or the one derived from the URL).
    pub name: String,
}

/// A downloaded volume.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DownloadedVolume {
    /// Storage pool.
    pub pool: String,
    /// Volume name.
    pub name: String,
    /// Path on the node.
    pub path: String,
}
