//! `IsoDownload`: an ISO fetched into a storage pool on this node, resumably, with pause,
//! resume, cancel, progress and verification. The transfer itself is `crate::download`; this
//! module checks the request, schedules it within the node's download slots, reports progress
//! at most about once a second, and cleans up.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::context::{Context, ReconcileError};
use super::{finalizer, status};
use crate::api::{
    ChecksumAlgorithm, DownloadPhase, DownloadTarget, DownloadedVolume, IsoDownload,
    IsoDownloadStatus, NODE_LABEL, ReclaimPolicy, condition,
};
use crate::conditions::Desired;
use crate::download::{self, Checksum, Credentials, DownloadError, DownloadRequest, TlsOptions};
use crate::libvirt::facade::Storage;

/// Reasons of the `Ready` and `Progressing` conditions (besides the downloader's own).
pub mod reason {
    /// The URL is not http, https, ftp or ftps, or not a URL.
    pub const INVALID_URL: &str = "InvalidURL";
    /// The volume name is not allowed.
    pub const INVALID_NAME: &str = "InvalidName";
    /// The pool does not exist or is inactive.
    pub const POOL_NOT_FOUND: &str = "PoolNotFound";
    /// The pool already has a volume of that name.
    pub const NAME_CONFLICT: &str = "NameConflict";
    /// The pool lacks room for the rest of the file.
    pub const INSUFFICIENT_SPACE: &str = "InsufficientSpace";
    /// A Secret or ConfigMap the spec names is missing or lacks the key.
    pub const CREDENTIALS_NOT_FOUND: &str = "CredentialsNotFound";
    /// Waiting for a download slot.
    pub const QUEUED: &str = "Queued";
    /// Transferring.
    pub const DOWNLOADING: &str = "Downloading";
    /// Checking data against the checksum: kept data before resuming, or the whole file.
    pub const VERIFYING: &str = "Verifying";
    /// Paused by `spec.paused`.
    pub const PAUSED: &str = "Paused";
    /// The volume is in the pool.
    pub const COMPLETED: &str = "Completed";
    /// A transient failure; retried later.
    pub const RETRYING: &str = "Retrying";
    /// Accepted; the download task starts.
    pub const STARTING: &str = "Starting";
    /// `spec.url`, `spec.name` or `spec.pool` changed after the download started.
    pub const SPEC_CHANGED: &str = "SpecChanged";
}

/// Downloads of this node: their tasks, the download slots and the deny list.
pub struct Downloads {
    jobs: Mutex<HashMap<String, Job>>,
    slots: Arc<tokio::sync::Semaphore>,
    limit: usize,
    deny: Vec<download::Cidr>,
    stopping: std::sync::atomic::AtomicBool,
}

/// The task of one object: it queues, attempts, waits between attempts and reports.
struct Job {
    /// Stops the task, keeping partial data; it then reports Paused unless `abandon` (or the
    /// agent's shutdown) fired.
    cancel: CancellationToken,
    /// Stops the task without a word: the object is being deleted and its data cleaned up.
    /// Cancelling it cancels `cancel` too.
    abandon: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Downloads {
    /// At most `limit` transfers at once; hosts resolving into `deny` (CIDRs) are refused.
    pub fn new(limit: usize, deny: Vec<download::Cidr>) -> Self {
        Self {
            jobs: Mutex::default(),
            slots: Arc::new(tokio::sync::Semaphore::new(limit.max(1))),
            limit: limit.max(1),
            deny,
            stopping: Default::default(),
        }
    }

    fn running(&self, uid: &str) -> bool {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .is_some_and(|j| !j.handle.is_finished())
    }

    fn take(&self, uid: &str) -> Option<Job> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid)
    }

    /// Stops every transfer, keeping partial data: the agent is shutting down and the next one
    /// resumes.
    pub fn stop_all(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for job in self.jobs.lock().unwrap_or_else(|p| p.into_inner()).values() {
            job.cancel.cancel();
        }
    }

    fn cancel(&self, uid: &str) {
        if let Some(j) = self.jobs.lock().unwrap_or_else(|p| p.into_inner()).get(uid) {
            j.cancel.cancel();
        }
    }
}

struct Refusal(&'static str, String);

fn algorithm(a: ChecksumAlgorithm) -> download::ChecksumAlgorithm {
    match a {
        ChecksumAlgorithm::Sha256 => download::ChecksumAlgorithm::Sha256,
        ChecksumAlgorithm::Sha512 => download::ChecksumAlgorithm::Sha512,
        ChecksumAlgorithm::Sha1 => download::ChecksumAlgorithm::Sha1,
        ChecksumAlgorithm::Md5 => download::ChecksumAlgorithm::Md5,
    }
}

/// Writes the agent's part of the status with its Ready and Progressing conditions.
async fn write(
    api: &Api<IsoDownload>,
    obj: &IsoDownload,
    status: &IsoDownloadStatus,
    ready: Desired<'_>,
    progressing: Desired<'_>,
) -> Result<(), ReconcileError> {
    let prev = obj.status.clone().unwrap_or_default();
    status::write_status(api, obj, &prev, status.clone(), &[ready, progressing]).await
}

/// `status.progress` for `done` of `total` bytes, rounded down.
fn percent(done: u64, total: Option<u64>) -> Option<String> {
    let p = download::Progress {
        bytes_done: done,
        total_bytes: total,
        ..download::Progress::default()
    };
    p.percent().map(|x| format!("{x}%"))
}

/// Fails the object for good: phase Failed, Ready and Progressing False with `reason`, and a
/// Warning Event.
async fn fail(
    api: &Api<IsoDownload>,
    obj: &IsoDownload,
    ctx: &Context,
    status: &IsoDownloadStatus,
    reason: &str,
    message: String,
) -> Result<(), ReconcileError> {
    write(
        api,
        obj,
        &failed(status),
        Desired::falsy(condition::READY, reason, message.clone()),
        Desired::falsy(condition::PROGRESSING, reason, message.clone()),
    )
    .await?;
    status::publish(
        &ctx.recorder,
        obj,
        EventType::Warning,
        "DownloadFailed",
        message,
    )
    .await;
    Ok(())
}

fn failed(status: &IsoDownloadStatus) -> IsoDownloadStatus {
    IsoDownloadStatus {
        phase: Some(DownloadPhase::Failed),
        completion_time: Some(Time(Timestamp::now())),
        bytes_per_second: None,
        ..status.clone()
    }
}

/// Parses `spec.url` as the downloader will; the error is a message for the user.
fn parse_url(url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| {
        format!(
            "spec.url {url:?} is not a valid URL ({e}); use the form scheme://host[:port]/path/file.iso with a port up to 65535."
        )
    })?;
    if !matches!(parsed.scheme(), "http" | "https" | "ftp" | "ftps") {
        return Err(format!(
            "spec.url {url:?} is not an http, https, ftp or ftps URL; use one of those schemes."
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "spec.url {url:?} has no host; use scheme://host/path/file.iso."
        ));
    }
    Ok(parsed)
}

/// Where the file goes: the pool's directory and the volume name.
struct Target {
    dir: PathBuf,
    name: String,
    available: u64,
    /// The file is already there because this object's download finished it; only the
    /// Completed status is missing (the agent stopped, or the write failed, after the rename).
    finished: Option<download::Finished>,
}

/// The parts of the download request that identify it: URL, place, checksum and owner (the
/// object's UID), without credentials.
fn own_request(obj: &IsoDownload, dir: &std::path::Path, name: &str) -> DownloadRequest {
    DownloadRequest {
        url: obj.spec.url.clone(),
        dir: dir.to_owned(),
        name: name.to_owned(),
        checksum: obj.spec.checksum.as_ref().map(|c| Checksum {
            algorithm: algorithm(c.algorithm),
            hex: c.value.clone(),
        }),
        owner: obj.uid(),
        ..DownloadRequest::default()
    }
}

/// Checks the URL, name and pool; nothing is written.
async fn check(
    obj: &IsoDownload,
    ctx: &Context,
) -> Result<Result<Target, Refusal>, ReconcileError> {
    let url = &obj.spec.url;
    if let Err(message) = parse_url(url) {
        return Ok(Err(Refusal(reason::INVALID_URL, message)));
    }
    let name = match &obj.spec.name {
        Some(n) => n.clone(),
        None => match download::default_name(url) {
            Ok(n) => n,
            Err(e) => {
                return Ok(Err(Refusal(
                    reason::INVALID_NAME,
                    format!("No volume name can be derived from the URL: {e}. Set spec.name."),
                )));
            }
        },
    };
    if let Err(e) = download::validate_name(&name) {
        return Ok(Err(Refusal(
            reason::INVALID_NAME,
            format!(
                "{e}. Use ASCII letters, digits, '.', '_' and '-', no leading dot, at most {} bytes.",
                download::MAX_NAME_LEN
            ),
        )));
    }
    let pool_name = obj.spec.pool.clone();
    let pools = ctx
        .libvirt
        .call("list storage pools", crate::libvirt::collect_storage_pools)
        .await?;
    let Some(pool) = pools.into_iter().find(|p| p.name == pool_name) else {
        return Ok(Err(Refusal(
            reason::POOL_NOT_FOUND,
            format!(
                "Storage pool {pool_name} does not exist on node {}; create it or fix spec.pool.",
                ctx.node
            ),
        )));
    };
    let Some(dir) = pool
        .path
        .clone()
        .filter(|_| pool.active && matches!(pool.type_.as_str(), "dir" | "fs" | "netfs"))
    else {
        return Ok(Err(Refusal(
            reason::POOL_NOT_FOUND,
            format!(
                "Storage pool {pool_name} on node {} is not an active directory pool; start it (virsh pool-start {pool_name}) or choose another.",
                ctx.node
            ),
        )));
    };
    let dir = PathBuf::from(dir);
    let finished = download::finished(&own_request(obj, &dir, &name))
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "failed to look for a finished download");
            None
        });
    let taken = match finished {
        Some(_) => false,
        None => {
            dir.join(&name).exists() || {
                let (p, n) = (pool_name.clone(), name.clone());
                ctx.libvirt
                    .call("look up the volume", move |c| {
                        Ok(c.lookup_storage_pool_by_name(&p)?
                            .lookup_storage_vol_by_name(&n)
                            .is_ok())
                    })
                    .await
                    .unwrap_or(false)
            }
        }
    };
    if taken {
        return Ok(Err(Refusal(
            reason::NAME_CONFLICT,
            format!(
                "Pool {pool_name} already has a volume named {name}; choose another spec.name or remove it."
            ),
        )));
    }
    Ok(Ok(Target {
        dir,
        name,
        available: pool.available,
        finished,
    }))
}

/// Reconciles one IsoDownload.
#[tracing::instrument(skip_all, fields(object = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())))]
pub(super) async fn reconcile(
    obj: Arc<IsoDownload>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    if obj.labels().get(NODE_LABEL) != Some(&ctx.node) {
        return Ok(Action::await_change());
    }
    tracing::debug!("reconciling");
    let api: Api<IsoDownload> =
        Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let uid = obj.uid().unwrap_or_default();
    let status = obj.status.clone().unwrap_or_default();
    let downloads = &ctx.downloads;

    if obj.meta().deletion_timestamp.is_some() {
        if let Some(job) = downloads.take(&uid) {
            job.abandon.cancel();
            let _ = job.handle.await;
        }
        cleanup(&obj, &ctx).await;
        finalizer::remove(&api, &*obj).await?;
        return Ok(Action::await_change());
    }
    finalizer::add(&api, &*obj).await?;
    if matches!(
        status.phase,
        Some(DownloadPhase::Completed | DownloadPhase::Failed)
    ) {
        return Ok(Action::await_change());
    }
    if let Some(change) = spec_change(&obj) {
        // Immutable fields changed: stop, remove what the download wrote under the names it
        // started with, and fail.
        if let Some(job) = downloads.take(&uid) {
            job.abandon.cancel();
            let _ = job.handle.await;
        }
        let removed = discard_started(&obj, &ctx).await;
        let mut message = format!(
            "{change} after the download started; spec.url, spec.name and spec.pool cannot change."
        );
        if removed > 0 {
            message.push_str(&format!(
                " The {removed} bytes of partial data were removed."
            ));
        }
        message.push_str(" Delete this object and create a new one for the new file.");
        fail(&api, &obj, &ctx, &status, reason::SPEC_CHANGED, message).await?;
        return Ok(Action::await_change());
    }
    if downloads.running(&uid) {
        if obj.spec.paused {
            downloads.cancel(&uid);
        }
        return Ok(Action::await_change());
    }
    let target = match check(&obj, &ctx).await? {
        Ok(t) => t,
        Err(Refusal(reason, message)) => {
            fail(&api, &obj, &ctx, &status, reason, message).await?;
            return Ok(Action::await_change());
        }
    };
    if let Some(finished) = &target.finished {
        // The file is in place but the Completed status was never written.
        complete(&api, &obj, &ctx, &status, &target, finished, None).await?;
        clear_finished(&target).await;
        return Ok(Action::await_change());
    }
    let recorded = DownloadTarget {
        url: obj.spec.url.clone(),
        pool: obj.spec.pool.clone(),
        name: target.name.clone(),
    };
    if obj.spec.paused {
        let kept = download::partial_len(&target.dir, &target.name)
            .await
            .unwrap_or(0);
        let st = IsoDownloadStatus {
            phase: Some(DownloadPhase::Paused),
            downloaded_bytes: Some(kept),
            bytes_per_second: None,
            target: Some(recorded),
            ..status.clone()
        };
        let msg = format!(
            "Paused with {kept} bytes kept; set spec.paused to false to resume where it stopped."
        );
        write(
            &api,
            &obj,
            &st,
            Desired::falsy(condition::READY, reason::PAUSED, msg.clone()),
            Desired::falsy(condition::PROGRESSING, reason::PAUSED, msg),
        )
        .await?;
        return Ok(Action::await_change());
    }
    if status.phase == Some(DownloadPhase::Paused) {
        status::publish(
            &ctx.recorder,
            &*obj,
            EventType::Normal,
            "Resumed",
            "Resuming the download.".into(),
        )
        .await;
    }
    let mut obj = obj;
    if status.target.is_none() {
        // Record what the download starts with before it writes anything.
        let st = IsoDownloadStatus {
            phase: Some(DownloadPhase::Pending),
            target: Some(recorded),
            ..status.clone()
        };
        let msg = format!(
            "Starting the download of {} into pool {}.",
            obj.spec.url, obj.spec.pool
        );
        write(
            &api,
            &obj,
            &st,
            Desired::falsy(condition::READY, reason::STARTING, msg.clone()),
            Desired::truthy(condition::PROGRESSING, reason::STARTING, msg),
        )
        .await?;
        let mut started = (*obj).clone();
        started.status = Some(st);
        obj = Arc::new(started);
    }
    let abandon = CancellationToken::new();
    let cancel = abandon.child_token();
    let task = Task {
        api,
        obj: obj.clone(),
        ctx: ctx.clone(),
        target,
        cancel: cancel.clone(),
        abandon: abandon.clone(),
    };
    let handle = tokio::spawn(task.run());
    downloads
        .jobs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            uid,
            Job {
                cancel,
                abandon,
                handle,
            },
        );
    Ok(Action::await_change())
}

/// Which immutable field changed since the download started, as the start of a sentence.
fn spec_change(obj: &IsoDownload) -> Option<String> {
    let recorded = obj.status.as_ref()?.target.as_ref()?;
    let spec = &obj.spec;
    if spec.url != recorded.url {
        return Some(format!(
            "spec.url changed from {} to {}",
            recorded.url, spec.url
        ));
    }
    if spec.pool != recorded.pool {
        return Some(format!(
            "spec.pool changed from {} to {}",
            recorded.pool, spec.pool
        ));
    }
    let name = spec
        .name
        .clone()
        .or_else(|| download::default_name(&spec.url).ok());
    if name.as_deref() != Some(recorded.name.as_str()) {
        return Some(format!(
            "The volume name changed from {} to {}",
            recorded.name,
            name.as_deref().unwrap_or("(none)")
        ));
    }
    None
}

/// The object as the download started it: `spec.url`, `spec.pool` and `spec.name` as
/// recorded in `status.target` (the spec itself when nothing was recorded).
fn as_started(obj: &IsoDownload) -> IsoDownload {
    let mut o = obj.clone();
    if let Some(t) = obj.status.as_ref().and_then(|s| s.target.clone()) {
        o.spec.url = t.url;
        o.spec.pool = t.pool;
        o.spec.name = Some(t.name);
    }
    o
}

/// Removes the partial data under the names the download started with; returns how many
/// bytes it held.
async fn discard_started(obj: &IsoDownload, ctx: &Context) -> u64 {
    let Some(t) = obj.status.as_ref().and_then(|s| s.target.clone()) else {
        return 0;
    };
    let dir = ctx
        .libvirt
        .call("list storage pools", crate::libvirt::collect_storage_pools)
        .await
        .ok()
        .and_then(|pools| pools.into_iter().find(|p| p.name == t.pool))
        .and_then(|p| p.path)
        .map(PathBuf::from);
    let Some(dir) = dir else {
        return 0;
    };
    let kept = download::partial_len(&dir, &t.name).await.unwrap_or(0);
    match download::discard_partial(&dir, &t.name).await {
        Ok(()) => kept,
        Err(e) => {
            tracing::warn!(error = %e, "failed to remove the partial data");
            0
        }
    }
}

/// Removes partial data, and the completed volume under `reclaimPolicy: Delete`, by the
/// names the download started with.
async fn cleanup(obj: &IsoDownload, ctx: &Context) {
    let obj = &as_started(obj);
    let status = obj.status.clone().unwrap_or_default();
    let delete = obj.spec.reclaim_policy == ReclaimPolicy::Delete;
    if status.phase == Some(DownloadPhase::Completed) {
        if let Some(vol) = status.volume {
            if delete {
                delete_volume(ctx, &vol).await;
            }
            // A record of the finished download left by a failed removal.
            if let Some(dir) = std::path::Path::new(&vol.path).parent() {
                let _ = download::clear_finished(dir, &vol.name).await;
            }
        }
        return;
    }
    if let Ok(Ok(target)) = check(obj, ctx).await.map(|r| r.map_err(|_| ())) {
        if let Some(finished) = &target.finished {
            // Finished, but deleted before the Completed status was written: the volume is
            // this object's all the same.
            if delete {
                let vol = DownloadedVolume {
                    pool: obj.spec.pool.clone(),
                    name: target.name.clone(),
                    path: finished.path.display().to_string(),
                };
                delete_volume(ctx, &vol).await;
            }
            clear_finished(&target).await;
        }
        let _ = download::discard_partial(&target.dir, &target.name).await;
    } else if let Some(name) = obj
        .spec
        .name
        .clone()
        .or_else(|| download::default_name(&obj.spec.url).ok())
    {
        // The pool may be gone or the name taken by now; discard by what can still be found.
        let pools = ctx
            .libvirt
            .call("list storage pools", crate::libvirt::collect_storage_pools)
            .await;
        if let Some(dir) = pools
            .ok()
            .and_then(|pools| pools.into_iter().find(|p| p.name == obj.spec.pool))
            .and_then(|p| p.path)
        {
            let _ = download::discard_partial(&PathBuf::from(dir), &name).await;
        }
    }
}

/// Deletes a downloaded volume through libvirt, or its file when libvirt cannot.
async fn delete_volume(ctx: &Context, vol: &DownloadedVolume) {
    let (pool, name) = (vol.pool.clone(), vol.name.clone());
    let deleted = ctx
        .libvirt
        .call("delete the volume", move |c| {
            c.lookup_storage_pool_by_name(&pool)?
                .lookup_storage_vol_by_name(&name)?
                .delete(0)
        })
        .await;
    if deleted.is_err() {
        let _ = tokio::fs::remove_file(&vol.path).await;
    }
}

async fn credentials(
    obj: &IsoDownload,
    ctx: &Context,
) -> Result<(Option<Credentials>, TlsOptions), Refusal> {
    let ns = obj.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let configmaps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let missing = |what: String| Refusal(reason::CREDENTIALS_NOT_FOUND, what);
    let mut auth = None;
    if let Some(a) = &obj.spec.auth {
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
    if let Some(t) = &obj.spec.tls {
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

/// The first wait after a transient failure; it doubles per failed attempt up to
/// [`RETRY_MAX`], and starts over once an attempt received data.
const RETRY_FIRST: Duration = Duration::from_secs(5);
/// The longest wait between attempts.
const RETRY_MAX: Duration = Duration::from_secs(300);

/// The wait after `current`.
fn next_backoff(current: Duration) -> Duration {
    (current * 2).min(RETRY_MAX)
}

/// The background work of one object: queue for a slot, probe, check space, transfer, and
/// after a transient failure wait (by its own timer, not a watch event) and try again.
struct Task {
    api: Api<IsoDownload>,
    obj: Arc<IsoDownload>,
    ctx: Arc<Context>,
    target: Target,
    cancel: CancellationToken,
    abandon: CancellationToken,
}

/// What a task learns across its attempts.
#[derive(Default)]
struct RunState {
    /// The server's description of the file, from the task's one successful probe.
    remote: Option<download::RemoteInfo>,
    /// Why an attempt last started again from byte 0.
    restarted: Option<download::RestartReason>,
    /// Whether the current attempt received any data.
    received: bool,
}

/// How one attempt ended, short of success.
enum Stop {
    /// A downloader error.
    Error(DownloadError),
    /// A refusal of the agent's own (space, credentials).
    Refused(Refusal),
}

impl Task {
    async fn run(self) {
        let mut status = self.obj.status.clone().unwrap_or_default();
        let base_attempts = status.attempts.unwrap_or(0);
        let mut attempt = 0u32;
        let mut backoff = RETRY_FIRST;
        let mut state = RunState::default();
        loop {
            let Some(permit) = self.slot(&mut status).await else {
                self.stopped(status).await;
                return;
            };
            attempt += 1;
            status.attempts = Some(base_attempts + attempt);
            state.received = false;
            let outcome = self.attempt(&mut status, &mut state).await;
            drop(permit);
            let e = match outcome {
                Ok(()) => return,
                Err(Stop::Error(DownloadError::Cancelled { .. })) => {
                    self.stopped(status).await;
                    return;
                }
                Err(Stop::Error(e)) if e.is_transient() => e,
                Err(Stop::Error(e)) => {
                    let msg = match e {
                        DownloadError::DestinationNotAllowed { .. } => {
                            format!("{e} (the agent's --download-deny-cidr).")
                        }
                        _ => format!("{e}."),
                    };
                    let keep = matches!(e, DownloadError::NameConflict { .. });
                    self.fail(&status, e.reason(), msg, keep).await;
                    return;
                }
                Err(Stop::Refused(Refusal(reason, msg))) => {
                    self.fail(&status, reason, msg, false).await;
                    return;
                }
            };
            if state.received {
                backoff = RETRY_FIRST;
            }
            self.retrying(&mut status, &e, attempt, backoff).await;
            tokio::select! {
                () = self.cancel.cancelled() => {
                    self.stopped(status).await;
                    return;
                }
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = next_backoff(backoff);
        }
    }

    /// A download slot; `None` when cancelled while waiting in the queue.
    async fn slot(
        &self,
        status: &mut IsoDownloadStatus,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let downloads = &self.ctx.downloads;
        if let Ok(p) = downloads.slots.clone().try_acquire_owned() {
            return Some(p);
        }
        status.phase = Some(DownloadPhase::Pending);
        status.bytes_per_second = None;
        let msg = format!(
            "Queued: {} downloads already run on node {} (the limit, --max-downloads).",
            downloads.limit, self.ctx.node
        );
        self.write(
            status,
            Desired::falsy(condition::READY, reason::QUEUED, msg.clone()),
            Desired::falsy(condition::PROGRESSING, reason::QUEUED, msg),
        )
        .await;
        tokio::select! {
            p = downloads.slots.clone().acquire_owned() => p.ok(),
            () = self.cancel.cancelled() => None,
        }
    }

    /// The task was cancelled: a pause is reported; a deletion (the reconciler cleans up) or
    /// the agent stopping (the next agent resumes) is not.
    async fn stopped(&self, status: IsoDownloadStatus) {
        let stopping = self
            .ctx
            .downloads
            .stopping
            .load(std::sync::atomic::Ordering::SeqCst);
        if stopping || self.abandon.is_cancelled() {
            return;
        }
        paused(&self.api, &self.obj, &self.ctx, &self.target, status).await;
    }

    /// Reports a transient failure and when the next attempt is.
    async fn retrying(
        &self,
        status: &mut IsoDownloadStatus,
        e: &DownloadError,
        attempt: u32,
        wait: Duration,
    ) {
        let kept = download::partial_len(&self.target.dir, &self.target.name)
            .await
            .unwrap_or(0);
        let at = Timestamp::now()
            .checked_add(wait)
            .unwrap_or_else(|_| Timestamp::now());
        status.phase = Some(DownloadPhase::Pending);
        status.bytes_per_second = None;
        let resume = if kept > 0 {
            format!("resuming from the {kept} bytes kept")
        } else {
            "from the beginning".to_string()
        };
        let msg = format!(
            "{e}. Attempt {} failed; the next one starts at {} (in {}s), {resume}.",
            status.attempts.unwrap_or(attempt),
            at.round(k8s_openapi::jiff::Unit::Second).unwrap_or(at),
            wait.as_secs()
        );
        tracing::info!(attempt, ?wait, error = %e, "download attempt failed; retrying");
        self.write(
            status,
            Desired::falsy(condition::READY, reason::RETRYING, msg.clone()),
            Desired::truthy(condition::PROGRESSING, reason::RETRYING, msg),
        )
        .await;
    }

    /// Fails the object for good, removing partial data unless `keep` (a name conflict: the
    /// file there is someone else's).
    async fn fail(
        &self,
        status: &IsoDownloadStatus,
        reason: &'static str,
        mut msg: String,
        keep: bool,
    ) {
        if !keep {
            let kept = download::partial_len(&self.target.dir, &self.target.name)
                .await
                .unwrap_or(0);
            let removed = download::discard_partial(&self.target.dir, &self.target.name).await;
            if kept > 0 && removed.is_ok() {
                msg = format!("{msg} The {kept} bytes of partial data were removed.");
            }
        }
        if let Err(e) = fail(&self.api, &self.obj, &self.ctx, status, reason, msg).await {
            tracing::warn!(error = %e, "failed to write the download status");
        }
    }

    /// Writes the status; a failure is logged (the next write or reconcile catches up).
    async fn write(
        &self,
        status: &IsoDownloadStatus,
        ready: Desired<'_>,
        progressing: Desired<'_>,
    ) {
        if let Err(e) = write(&self.api, &self.obj, status, ready, progressing).await {
            tracing::warn!(error = %e, "failed to write the download status");
        }
    }

    /// One attempt: probe (once per task), check space, then a single transfer attempt that
    /// resumes from the partial data.
    async fn attempt(
        &self,
        status: &mut IsoDownloadStatus,
        state: &mut RunState,
    ) -> Result<(), Stop> {
        let (obj, ctx, target) = (&*self.obj, &*self.ctx, &self.target);
        let (auth, tls) = credentials(obj, ctx).await.map_err(Stop::Refused)?;
        let mut request = DownloadRequest {
            auth,
            tls,
            ..own_request(obj, &target.dir, &target.name)
        };
        let options = download::DownloadOptions {
            deny: ctx.downloads.deny.clone(),
            ..download::DownloadOptions::default()
        };
        let info = match &state.remote {
            Some(info) => info.clone(),
            None => {
                let info = tokio::select! {
                    () = self.cancel.cancelled() => {
                        return Err(Stop::Error(DownloadError::Cancelled {
                            url: obj.spec.url.clone(),
                            kept: 0,
                        }));
                    }
                    info = download::probe(&request, &options) => info.map_err(Stop::Error)?,
                };
                let kept = download::partial_len(&target.dir, &target.name)
                    .await
                    .unwrap_or(0);
                if let Some(total) = info.total_bytes {
                    let remaining = total.saturating_sub(kept);
                    if remaining > target.available {
                        return Err(Stop::Refused(Refusal(
                            reason::INSUFFICIENT_SPACE,
                            format!(
                                "The file needs {remaining} more bytes but pool {} has {} available; free space or choose another pool.",
                                obj.spec.pool, target.available
                            ),
                        )));
                    }
                }
                state.remote = Some(info.clone());
                info
            }
        };
        request.expected_size = info.total_bytes;
        let kept = download::partial_len(&target.dir, &target.name)
            .await
            .unwrap_or(0);

        let first = status.start_time.is_none();
        status.phase = Some(DownloadPhase::Downloading);
        status.total_bytes = info.total_bytes;
        status.downloaded_bytes = Some(kept);
        status.progress = percent(kept, info.total_bytes);
        status.start_time.get_or_insert(Time(Timestamp::now()));
        let downloading = |restarted: Option<download::RestartReason>| {
            let mut msg = format!("Downloading {} into pool {}.", obj.spec.url, obj.spec.pool);
            if let Some(r) = restarted {
                msg.push_str(&format!(
                    " Downloading from the beginning again because {r}."
                ));
            } else if !info.accepts_ranges {
                msg.push_str(
                    " The server does not announce support for resuming: a pause or an interruption restarts from the beginning.",
                );
            }
            msg
        };
        let msg = downloading(state.restarted);
        self.write(
            status,
            Desired::falsy(condition::READY, reason::DOWNLOADING, msg.clone()),
            Desired::truthy(condition::PROGRESSING, reason::DOWNLOADING, msg.clone()),
        )
        .await;
        if first {
            status::publish(
                &ctx.recorder,
                obj,
                EventType::Normal,
                "Started",
                msg.clone(),
            )
            .await;
        }

        let (tx, mut rx) = tokio::sync::watch::channel(download::Progress::default());
        let metrics = crate::metrics::get();
        metrics.downloads_in_flight.inc();
        let work = download::download_once(&request, &options, &self.cancel, &tx);
        tokio::pin!(work);
        let mut last_write = Instant::now();
        let mut written = (DownloadPhase::Downloading, msg);
        let mut counted = kept;
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                changed = rx.changed() => {
                    if changed.is_err() { continue; }
                    let p = rx.borrow_and_update().clone();
                    if p.bytes_done > p.resumed_from {
                        state.received = true;
                    }
                    if p.restarted.is_some() {
                        state.restarted = p.restarted;
                    }
                    if p.phase == download::Phase::Completed {
                        // Written as Completed below.
                        continue;
                    }
                    let (phase, reason, msg) = match p.phase {
                        download::Phase::VerifyingPartial => (
                            DownloadPhase::Verifying,
                            reason::VERIFYING,
                            format!("Checking the {} bytes kept from an earlier run against the checksum before resuming.", p.bytes_done),
                        ),
                        download::Phase::Finalizing if request.checksum.is_some() => (
                            DownloadPhase::Verifying,
                            reason::VERIFYING,
                            format!("Verifying the checksum of the {} bytes downloaded.", p.bytes_done),
                        ),
                        _ => (DownloadPhase::Downloading, reason::DOWNLOADING, downloading(state.restarted)),
                    };
                    // Before a transfer starts the counts are not known yet: keep the last.
                    if !matches!(p.phase, download::Phase::Starting | download::Phase::Connecting) {
                        metrics.downloaded_bytes.inc_by(p.bytes_done.saturating_sub(counted));
                        counted = counted.max(p.bytes_done);
                        status.downloaded_bytes = Some(p.bytes_done);
                        status.total_bytes = p.total_bytes.or(status.total_bytes);
                        status.progress = percent(p.bytes_done, status.total_bytes);
                        status.bytes_per_second = Some(p.bytes_per_second);
                    }
                    status.phase = Some(phase);
                    // At once when the phase or message changes, else at most about once a
                    // second per object.
                    let changed = written != (phase, msg.clone());
                    if changed || last_write.elapsed() >= Duration::from_secs(1) {
                        last_write = Instant::now();
                        self.write(status, Desired::falsy(condition::READY, reason, msg.clone()), Desired::truthy(condition::PROGRESSING, reason, msg.clone())).await;
                        written = (phase, msg);
                    }
                }
            }
        };
        metrics.downloads_in_flight.dec();
        let outcome = result.map_err(Stop::Error)?;
        metrics
            .downloaded_bytes
            .inc_by(outcome.bytes.saturating_sub(counted));
        let finished = download::Finished {
            path: outcome.path.clone(),
            bytes: outcome.bytes,
            checksum_verified: outcome.checksum_verified,
        };
        let note = outcome.note().or_else(|| {
            state
                .restarted
                .map(|r| format!("Downloaded from the beginning again because {r}."))
        });
        // The file is in place; record that until it sticks (the record next to the file
        // lets a later reconcile finish the job should this task not get there).
        let mut wait = Duration::from_secs(1);
        while let Err(e) =
            complete(&self.api, obj, ctx, status, target, &finished, note.clone()).await
        {
            if ctx
                .downloads
                .stopping
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                // The next agent finds the record and finishes the job.
                return Ok(());
            }
            tracing::warn!(error = %e, ?wait, "failed to record the completed download; retrying");
            // A pause does not stop this: the file is complete either way.
            tokio::select! {
                () = self.abandon.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(30));
        }
        clear_finished(target).await;
        Ok(())
    }
}

/// Records a finished download: refreshes the pool so libvirt lists the volume, writes the
/// Completed status and publishes the Event.
async fn complete(
    api: &Api<IsoDownload>,
    obj: &IsoDownload,
    ctx: &Context,
    status: &IsoDownloadStatus,
    target: &Target,
    finished: &download::Finished,
    note: Option<String>,
) -> Result<(), ReconcileError> {
    let pool = obj.spec.pool.clone();
    let _ = ctx
        .libvirt
        .call("refresh the pool", move |c| {
            c.lookup_storage_pool_by_name(&pool)?.refresh(0)
        })
        .await;
    let status = IsoDownloadStatus {
        phase: Some(DownloadPhase::Completed),
        downloaded_bytes: Some(finished.bytes),
        total_bytes: Some(finished.bytes),
        progress: Some("100%".into()),
        bytes_per_second: None,
        checksum_verified: Some(finished.checksum_verified),
        completion_time: Some(Time(Timestamp::now())),
        volume: Some(DownloadedVolume {
            pool: obj.spec.pool.clone(),
            name: target.name.clone(),
            path: finished.path.display().to_string(),
        }),
        ..status.clone()
    };
    let mut done = format!(
        "{} bytes are in pool {} as volume {}.",
        finished.bytes, obj.spec.pool, target.name
    );
    if let Some(note) = note {
        done = format!("{done} {note}");
    }
    write(
        api,
        obj,
        &status,
        Desired::truthy(condition::READY, reason::COMPLETED, done.clone()),
        Desired::falsy(
            condition::PROGRESSING,
            reason::COMPLETED,
            "The download is done.",
        ),
    )
    .await?;
    status::publish(&ctx.recorder, obj, EventType::Normal, "Completed", done).await;
    Ok(())
}

/// Removes the record of the finished download once the status says Completed.
async fn clear_finished(target: &Target) {
    if let Err(e) = download::clear_finished(&target.dir, &target.name).await {
        tracing::warn!(error = %e, "failed to remove the record of the finished download");
    }
}

async fn paused(
    api: &Api<IsoDownload>,
    obj: &IsoDownload,
    ctx: &Context,
    target: &Target,
    mut status: IsoDownloadStatus,
) {
    let kept = download::partial_len(&target.dir, &target.name)
        .await
        .unwrap_or(0);
    status.phase = Some(DownloadPhase::Paused);
    status.downloaded_bytes = Some(kept);
    status.bytes_per_second = None;
    let msg = format!(
        "Paused with {kept} bytes kept; set spec.paused to false to resume where it stopped."
    );
    let _ = write(
        api,
        obj,
        &status,
        Desired::falsy(condition::READY, reason::PAUSED, msg.clone()),
        Desired::falsy(condition::PROGRESSING, reason::PAUSED, msg.clone()),
    )
    .await;
    status::publish(&ctx.recorder, obj, EventType::Normal, "Paused", msg).await;
}
