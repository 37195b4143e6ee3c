//! `VirtualMachineStorage`: attach and hot-plug disks and CD-ROMs, change or eject media in place,
//! detach with the guest's confirmation, and put back what was removed behind the agent's back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::context::{Context, ReconcileError};
use super::device::{self, HotPlug};
use super::{finalizer, status};
use crate::api::{
    AttachMode, Bus, DownloadPhase, IsoDownload, NODE_LABEL, StorageSource, StorageType,
    VirtualMachineStorage, VirtualMachineStorageStatus, condition,
};
use crate::conditions::Desired;
use crate::libvirt::domain::{self, DiskSpec, DomainView, DomainXml};
use crate::libvirt::facade::{Affect, DeviceChange, Domains, Storage};

/// Reasons of the `Ready` and `RestartRequired` conditions.
pub mod reason {
    /// The device is in place.
    pub const ATTACHED: &str = "Attached";
    /// The spec breaks a rule the API server could not enforce.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The domain is not defined on this node.
    pub const DOMAIN_NOT_FOUND: &str = "DomainNotFound";
    /// The path is outside the allowed directories.
    pub const PATH_NOT_ALLOWED: &str = "PathNotAllowed";
    /// The source file, pool or volume does not exist.
    pub const SOURCE_NOT_FOUND: &str = "SourceNotFound";
    /// Waiting for an IsoDownload to complete.
    pub const WAITING_FOR_DOWNLOAD: &str = "WaitingForDownload";
    /// Another device has the target.
    pub const TARGET_CONFLICT: &str = "TargetConflict";
    /// A disk's source cannot change.
    pub const SOURCE_IMMUTABLE: &str = "SourceImmutable";
    /// A disk's source was changed in libvirt, outside virtplane.
    pub const DRIFT_DETECTED: &str = "DriftDetected";
    /// The device is in the definition but could not be hot-plugged.
    pub const RESTART_REQUIRED: &str = "RestartRequired";
    /// libvirt refused the change.
    pub const ATTACH_FAILED: &str = "AttachFailed";
}

fn alias_of(obj: &VirtualMachineStorage) -> String {
    format!("ua-vps-{}", obj.uid().unwrap_or_default())
}

fn find_disk(d: &DomainXml, alias: &str) -> Option<String> {
    d.disk(alias).map(|x| x.xml.clone())
}

fn bus_name(bus: Bus) -> &'static str {
    match bus {
        Bus::Virtio => "virtio",
        Bus::Scsi => "scsi",
        Bus::Sata => "sata",
        Bus::Ide => "ide",
        Bus::Usb => "usb",
    }
}

fn target_prefix(bus: Bus) -> &'static str {
    match bus {
        Bus::Virtio => "vd",
        Bus::Ide => "hd",
        Bus::Scsi | Bus::Sata | Bus::Usb => "sd",
    }
}

type Outcome = status::Outcome<VirtualMachineStorageStatus>;

/// Reconciles one VirtualMachineStorage.
#[tracing::instrument(skip_all, fields(object = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())))]
pub(super) async fn reconcile(
    obj: Arc<VirtualMachineStorage>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    if obj.labels().get(NODE_LABEL) != Some(&ctx.node) {
        // The watch selects this node's objects; an object rebound elsewhere is not ours.
        return Ok(Action::await_change());
    }
    tracing::debug!("reconciling");
    let api: Api<VirtualMachineStorage> =
        Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let alias = alias_of(&obj);
    // The domain the device went to, even if spec.vm was edited since.
    let vm = obj
        .status
        .as_ref()
        .and_then(|s| s.vm.clone())
        .unwrap_or_else(|| obj.spec.vm.clone());
    let lock = ctx.locks.get(&vm);
    let _guard = lock.lock().await;

    finalizer::finalizer(&api, obj, |event| async {
        match event {
            finalizer::Event::Cleanup(obj) => Ok(finalizer::Step::Cleanup(
                cleanup(&api, &obj, &ctx, &vm, &alias).await?,
            )),
            finalizer::Event::Apply(obj) => {
                let prev = obj.status.clone().unwrap_or_default();
                let outcome = match apply(&obj, &ctx, &alias, &prev).await {
                    Ok(o) => o,
                    Err(ReconcileError::Libvirt(err)) if ctx.libvirt.is_connected() => {
                        Outcome::not_ready(
                            &prev,
                            reason::ATTACH_FAILED,
                            format!("{err}. The agent retries; check the domain and the spec."),
                            Action::requeue(Duration::from_secs(30)),
                        )
                    }
                    Err(e) => return Err(e),
                };
                Ok(finalizer::Step::Applied(
                    status::write_outcome(&api, &*obj, &ctx, &prev, outcome).await?,
                ))
            }
        }
    })
    .await
}

async fn cleanup(
    api: &Api<VirtualMachineStorage>,
    obj: &VirtualMachineStorage,
    ctx: &Context,
    vm: &str,
    alias: &str,
) -> Result<finalizer::Cleanup, ReconcileError> {
    let prev = obj.status.clone().unwrap_or_default();
    let what = prev.target.clone().unwrap_or_else(|| alias.to_string());
    let was_attached = prev.live == Some(true) || prev.persistent == Some(true);
    let pending = VirtualMachineStorageStatus {
        persistent: Some(false),
        ..prev.clone()
    };
    device::finish_detach(
        api,
        obj,
        ctx,
        vm,
        alias,
        &what,
        was_attached,
        find_disk,
        &prev,
        pending,
    )
    .await
}

/// A source resolved to a path on the node.
struct Resolved {
    path: PathBuf,
    block: bool,
    format: String,
}

/// Why a source cannot be used.
struct Refusal(&'static str, String, Action);

fn refuse(reason: &'static str, message: String) -> Refusal {
    Refusal(reason, message, Action::await_change())
}

async fn resolve(
    obj: &VirtualMachineStorage,
    ctx: &Context,
) -> Result<Option<Resolved>, Result<Refusal, ReconcileError>> {
    let Some(source) = &obj.spec.source else {
        return Ok(None);
    };
    let spec_format = obj.spec.format.map(|f| match f {
        crate::api::DiskFormat::Raw => "raw".to_string(),
        crate::api::DiskFormat::Qcow2 => "qcow2".to_string(),
    });
    let path = match source {
        StorageSource {
            path: Some(p),
            volume: None,
            iso_download: None,
        } => PathBuf::from(p),
        StorageSource {
            path: None,
            volume: Some(v),
            iso_download: None,
        } => {
            let (pool, vol) = (v.pool.clone(), v.name.clone());
            let found = ctx
                .libvirt
                .call("look up the volume", move |c| {
                    let handle = match c.lookup_storage_pool_by_name(&pool) {
                        Ok(p) => p,
                        Err(_) => return Ok(Err(format!("Storage pool {pool} does not exist on this node."))),
                    };
                    match handle.lookup_storage_vol_by_name(&vol) {
                        Ok(v) => v.path().map(Ok),
                        Err(_) => Ok(Err(format!("Volume {vol} does not exist in pool {pool}; check the name with virsh vol-list."))),
                    }
                })
                .await
                .map_err(|e| Err(e.into()))?;
            match found {
                Ok(p) => PathBuf::from(p),
                Err(msg) => {
                    return Err(Ok(Refusal(
                        reason::SOURCE_NOT_FOUND,
                        msg,
                        Action::requeue(Duration::from_secs(60)),
                    )));
                }
            }
        }
        StorageSource {
            path: None,
            volume: None,
            iso_download: Some(name),
        } => {
            let isos: Api<IsoDownload> =
                Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
            let iso = isos.get_opt(name).await.map_err(|source| {
                Err(ReconcileError::Api {
                    action: "read",
                    object: format!("IsoDownload/{name}"),
                    source,
                })
            })?;
            let Some(iso) = iso else {
                return Err(Ok(Refusal(
                    reason::WAITING_FOR_DOWNLOAD,
                    format!(
                        "IsoDownload {name} does not exist in this namespace; create it, and the medium is inserted once it completes."
                    ),
                    Action::requeue(Duration::from_secs(60)),
                )));
            };
            let status = iso.status.unwrap_or_default();
            match (status.phase, status.volume) {
                (Some(DownloadPhase::Completed), Some(vol)) => {
                    if iso.metadata.labels.as_ref().and_then(|l| l.get(NODE_LABEL))
                        != Some(&ctx.node)
                    {
                        return Err(Ok(refuse(
                            reason::SOURCE_NOT_FOUND,
                            format!(
                                "IsoDownload {name} completed on another node; download it on node {} (spec.nodeName).",
                                ctx.node
                            ),
                        )));
                    }
                    PathBuf::from(vol.path)
                }
                (phase, _) => {
                    return Err(Ok(Refusal(
                        reason::WAITING_FOR_DOWNLOAD,
                        format!(
                            "Waiting for IsoDownload {name} to complete (phase {}); the medium is inserted as soon as it does.",
                            phase.map_or("unknown".to_string(), |p| format!("{p:?}"))
                        ),
                        Action::requeue(Duration::from_secs(30)),
                    )));
                }
            }
        }
        _ => {
            return Err(Ok(refuse(
                reason::INVALID_SPEC,
                "Set at most one of source.path, source.volume and source.isoDownload.".into(),
            )));
        }
    };
    let allowed = ctx.allowed_dirs().await.map_err(|e| Err(e.into()))?;
    check_path(&path, &allowed, spec_format)
        .map(Some)
        .map_err(Ok)
}

/// Resolves symlinks and `..`, checks the result lies in an allowed directory and exists, and
/// works out the format. A qcow2 image with a backing file is refused: its chain could reach files
/// outside the allowed directories.
fn check_path(
    path: &Path,
    allowed: &[PathBuf],
    format: Option<String>,
) -> Result<Resolved, Refusal> {
    if !path.is_absolute() {
        return Err(refuse(
            reason::INVALID_SPEC,
            format!("{} is not an absolute path.", path.display()),
        ));
    }
    let real = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(_) => {
            // Judge the parent so a missing file in a forbidden place is still "not allowed".
            let parent = path.parent().and_then(|p| std::fs::canonicalize(p).ok());
            if parent
                .as_ref()
                .is_some_and(|p| allowed.iter().any(|a| p.starts_with(a)))
            {
                return Err(Refusal(
                    reason::SOURCE_NOT_FOUND,
                    format!(
                        "{} does not exist on this node; create it or fix source.path.",
                        path.display()
                    ),
                    Action::requeue(Duration::from_secs(60)),
                ));
            }
            return Err(refuse(reason::PATH_NOT_ALLOWED, not_allowed(path, allowed)));
        }
    };
    if !allowed.iter().any(|a| real.starts_with(a)) {
        return Err(refuse(reason::PATH_NOT_ALLOWED, not_allowed(path, allowed)));
    }
    let meta = std::fs::metadata(&real).map_err(|e| {
        refuse(
            reason::SOURCE_NOT_FOUND,
            format!("Cannot read {}: {e}.", real.display()),
        )
    })?;
    let block = std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type());
    if !block && !meta.is_file() {
        return Err(refuse(
            reason::INVALID_SPEC,
            format!("{} is neither a file nor a block device.", real.display()),
        ));
    }
    let header = read_header(&real);
    let is_qcow2 = header.starts_with(b"QFI\xfb");
    if is_qcow2
        && header.len() >= 16
        && header[8..16].iter().any(|b| *b != 0)
        && format.as_deref() != Some("raw")
    {
        return Err(refuse(
            reason::PATH_NOT_ALLOWED,
            format!(
                "{} is a qcow2 image with a backing file; virtplane refuses backing chains, which could reach files outside the allowed directories. Flatten it with qemu-img convert.",
                real.display()
            ),
        ));
    }
    if format.as_deref() == Some("qcow2") && !is_qcow2 {
        // libvirt takes it into the definition; the domain would then not boot.
        return Err(refuse(
            reason::INVALID_SPEC,
            format!(
                "{} is not a qcow2 image, but spec.format says qcow2; fix spec.format or the image.",
                real.display()
            ),
        ));
    }
    let format = format.unwrap_or_else(|| {
        if is_qcow2 {
            "qcow2".into()
        } else {
            "raw".into()
        }
    });
    Ok(Resolved {
        path: real,
        block,
        format,
    })
}

fn read_header(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(16);
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(16).read_to_end(&mut buf);
    }
    buf
}

fn not_allowed(path: &Path, allowed: &[PathBuf]) -> String {
    let dirs: Vec<String> = allowed.iter().map(|p| p.display().to_string()).collect();
    format!(
        "{} is outside the directories this agent may use ({}). Use a storage pool volume, or ask the node's administrator to add the directory with --allowed-path.",
        path.display(),
        if dirs.is_empty() {
            "none".to_string()
        } else {
            dirs.join(", ")
        }
    )
}

fn validate(obj: &VirtualMachineStorage, prev: &VirtualMachineStorageStatus) -> Result<(), String> {
    let spec = &obj.spec;
    if let Some(had) = &prev.vm
        && *had != spec.vm
    {
        return Err(format!(
            "spec.vm is immutable: the device is attached to {had}. Set spec.vm back, or delete this object (which detaches it from {had}) and create one for {}.",
            spec.vm
        ));
    }
    if spec.type_ == StorageType::Disk && spec.source.is_none() {
        return Err(
            "A disk needs a source (path, volume or isoDownload); only a cdrom may be empty."
                .into(),
        );
    }
    if spec.type_ == StorageType::Cdrom && spec.bus == Bus::Virtio {
        return Err(
            "A CD-ROM cannot sit on the virtio bus; use scsi (hot-pluggable) or sata.".into(),
        );
    }
    if let Some(t) = &spec.target
        && !t.starts_with(target_prefix(spec.bus))
    {
        return Err(format!(
            "Target {t} does not fit bus {}: its names start with {}.",
            bus_name(spec.bus),
            target_prefix(spec.bus)
        ));
    }
    if let (Some(t), Some(had)) = (&spec.target, &prev.target)
        && t != had
    {
        return Err(format!(
            "spec.target is immutable: the device is {had}. Delete and recreate the object to move it."
        ));
    }
    if let Some(had) = prev.bus
        && had != spec.bus
        && prev.alias.is_some()
    {
        return Err(format!(
            "spec.bus is immutable: the device is on {}. Delete and recreate the object to move it.",
            bus_name(had)
        ));
    }
    Ok(())
}

async fn apply(
    obj: &VirtualMachineStorage,
    ctx: &Context,
    alias: &str,
    prev: &VirtualMachineStorageStatus,
) -> Result<Outcome, ReconcileError> {
    let spec = &obj.spec;
    let vm = spec.vm.as_str();
    let retry_later = Action::requeue(Duration::from_secs(300));
    if let Err(msg) = validate(obj, prev) {
        return Ok(Outcome::not_ready(
            prev,
            reason::INVALID_SPEC,
            msg,
            Action::await_change(),
        ));
    }
    let Some(view) = ctx.libvirt.domain(vm).await? else {
        return Ok(Outcome::not_ready(
            prev,
            reason::DOMAIN_NOT_FOUND,
            format!(
                "Domain {vm} is not defined on node {}; the device is attached as soon as it is.",
                ctx.node
            ),
            retry_later,
        ));
    };
    let source = match resolve(obj, ctx).await {
        Ok(s) => s,
        Err(Ok(Refusal(reason, message, action))) => {
            return Ok(Outcome::not_ready(prev, reason, message, action));
        }
        Err(Err(e)) => return Err(e),
    };
    let config_dev = view.config.disk(alias).cloned();
    let live_dev = view.live.as_ref().and_then(|l| l.disk(alias)).cloned();
    let existing = config_dev.as_ref().or(live_dev.as_ref());
    let want_type = if spec.type_ == StorageType::Cdrom {
        "cdrom"
    } else {
        "disk"
    };
    if let Some(dev) = existing
        && dev.device != want_type
    {
        return Ok(Outcome::not_ready(
            prev,
            reason::INVALID_SPEC,
            format!(
                "spec.type is immutable: the device is a {}. Delete and recreate the object.",
                dev.device
            ),
            Action::await_change(),
        ));
    }

    // Target: the device's own, else the recorded one, else the requested one, else the lowest free.
    let target = existing
        .and_then(|d| d.target.clone())
        .or_else(|| prev.target.clone())
        .or_else(|| spec.target.clone())
        .unwrap_or_else(|| {
            let used = view.used_targets();
            domain::lowest_free_target(target_prefix(spec.bus), used.iter().map(String::as_str))
        });
    let holder = view
        .config
        .disks
        .iter()
        .chain(view.live.iter().flat_map(|l| l.disks.iter()))
        .find(|d| {
            d.target.as_deref() == Some(target.as_str()) && d.alias.as_deref() != Some(alias)
        });
    if let Some(other) = holder {
        let who = other
            .alias
            .clone()
            .unwrap_or_else(|| "a device virtplane does not manage".into());
        return Ok(Outcome::not_ready(
            prev,
            reason::TARGET_CONFLICT,
            format!(
                "Target {target} on {vm} is already used by {who}; choose another spec.target or leave it empty."
            ),
            Action::requeue(Duration::from_secs(60)),
        ));
    }
    let desired_path = source
        .as_ref()
        .map(|s| s.path.to_string_lossy().into_owned());
    if spec.type_ == StorageType::Disk
        && let Some(dev) = existing
        && dev.source != desired_path
    {
        let now = dev.source.as_deref().unwrap_or("empty");
        // The spec still names what virtplane attached: libvirt's side was changed by hand.
        // Swapping a disk under a running guest is not a repair virtplane makes on its own.
        if prev.current_source.is_some() && prev.current_source == desired_path {
            return Ok(Outcome::not_ready(
                prev,
                reason::DRIFT_DETECTED,
                format!(
                    "The source of {target} on {vm} was changed outside virtplane to {now}; a disk is not swapped under the guest. Put {} back (virsh), or delete this object to detach it.",
                    desired_path.as_deref().unwrap_or("the empty source")
                ),
                Action::await_change(),
            ));
        }
        return Ok(Outcome::not_ready(
            prev,
            reason::SOURCE_IMMUTABLE,
            format!(
                "The source of a disk cannot change (it is {now}); nothing was detached. Restore spec.source, or delete this object and create a new one."
            ),
            Action::await_change(),
        ));
    }

    let mut driver = Vec::new();
    if let Some(d) = &spec.driver {
        let lower = |v: String| v.trim_matches('"').to_string();
        if let Some(c) = d.cache {
            driver.push((
                "cache",
                lower(serde_json::to_string(&c).unwrap_or_default()),
            ));
        }
        if let Some(i) = d.io {
            driver.push(("io", lower(serde_json::to_string(&i).unwrap_or_default())));
        }
        if let Some(x) = d.discard {
            driver.push((
                "discard",
                lower(serde_json::to_string(&x).unwrap_or_default()),
            ));
        }
    }
    let disk = DiskSpec {
        device: want_type.into(),
        source: desired_path.clone(),
        block: source.as_ref().is_some_and(|s| s.block),
        format: source
            .as_ref()
            .map_or_else(|| "raw".into(), |s| s.format.clone()),
        target: target.clone(),
        bus: bus_name(spec.bus).into(),
        readonly: spec.type_ == StorageType::Cdrom || spec.read_only == Some(true),
        boot_order: spec.boot_order,
        alias: alias.to_string(),
        driver,
    };
    let xml = domain::disk_xml(&disk);
    let want_live = view.active && spec.attach == AttachMode::LiveAndPersistent;
    let want_config = view.persistent;
    let hotpluggable = !matches!(spec.bus, Bus::Sata | Bus::Ide);
    let mut events = Vec::new();
    let mut restart: Option<String> = None;

    // A scsi device needs a SCSI controller.
    if spec.bus == Bus::Scsi && existing.is_none() && !view.config.has_controller("scsi", None) {
        let ctrl = "<controller type='scsi' model='virtio-scsi'/>".to_string();
        // A transient domain has no definition: its controller goes to the running guest.
        let affect = if want_config {
            Affect::Config
        } else {
            Affect::Live
        };
        if let Err(e) = ctx
            .libvirt
            .change_device(vm, &ctrl, DeviceChange::Attach, affect)
            .await
        {
            return Ok(Outcome::not_ready(
                prev,
                reason::ATTACH_FAILED,
                format!("Adding a virtio-scsi controller to {vm} failed: {e}."),
                retry_later,
            ));
        }
        if want_live
            && !view
                .live
                .as_ref()
                .is_some_and(|l| l.has_controller("scsi", None))
            && let Err(e) = ctx
                .libvirt
                .change_device(vm, &ctrl, DeviceChange::Attach, Affect::Live)
                .await
        {
            restart = Some(format!(
                "{vm} had no SCSI controller and hot-plugging one failed ({e}); the controller and the device are in the definition and appear at the next boot."
            ));
        }
    }

    let drift = |was: Option<bool>| was == Some(true);
    // The running guest first: a device QEMU refuses (an image it cannot open, or one another
    // guest holds) is refused before anything is written, so nothing is left behind and no
    // domain event wakes the object into trying again at once.
    let mut plugged = false;
    if want_live && live_dev.is_none() && restart.is_none() {
        if !hotpluggable {
            restart = Some(format!(
                "A {} device cannot be hot-plugged: it was added to the definition of {vm} and appears at the next boot. Use bus scsi to hot-plug instead.",
                bus_name(spec.bus)
            ));
        } else {
            match device::attach_live(&ctx.libvirt, vm, &xml).await? {
                HotPlug::Refused(e) => {
                    return Ok(Outcome::not_ready(
                        prev,
                        reason::ATTACH_FAILED,
                        format!(
                            "The running {vm} refused the device: {e}. Nothing was changed; fix the source (is it a valid image of spec.format, not in use by another guest?) or the spec."
                        ),
                        retry_later,
                    ));
                }
                HotPlug::Limit(e) => {
                    restart = Some(format!(
                        "Hot-plugging into the running {vm} failed ({e}); the device is in the definition and appears at the next boot. A scsi bus hot-plugs without needing a free PCI slot."
                    ));
                }
                HotPlug::Plugged => {
                    plugged = true;
                    events.push(if drift(prev.live) {
                        (
                            EventType::Warning,
                            "DriftCorrected",
                            format!(
                                "{target} was removed from the running {vm} outside virtplane; it was put back."
                            ),
                        )
                    } else {
                        (
                            EventType::Normal,
                            "Attached",
                            format!("Hot-plugged {target} into {vm}."),
                        )
                    });
                }
            }
        }
    }
    if want_config && config_dev.is_none() {
        if let Err(message) = device::attach_config(&ctx.libvirt, vm, &xml, plugged, "device").await
        {
            return Ok(Outcome::not_ready(
                prev,
                reason::ATTACH_FAILED,
                message,
                Action::await_change(),
            ));
        }
        if drift(prev.persistent) {
            events.push((EventType::Warning, "DriftCorrected", format!("{target} was removed from the definition of {vm} outside virtplane; it was put back.")));
        }
    }
    if want_config && config_dev.is_none() && !want_live && !drift(prev.persistent) {
        events.push((
            EventType::Normal,
            "Attached",
            format!("Added {target} to the definition of {vm}; it appears at the next boot."),
        ));
    }

    // CD media: insert, swap or eject in place, live and persistent, forcing a locked tray.
    if spec.type_ == StorageType::Cdrom {
        let mut changed = false;
        if let Some(dev) = &config_dev
            && dev.source != desired_path
        {
            ctx.libvirt
                .change_device(vm, &xml, DeviceChange::Update, Affect::Config)
                .await?;
            changed = true;
        }
        if want_live
            && let Some(dev) = &live_dev
            && dev.source != desired_path
        {
            ctx.libvirt
                .change_device(vm, &xml, DeviceChange::Update, Affect::Live)
                .await?;
            changed = true;
        }
        if changed {
            events.push(match &desired_path {
                Some(p) => (
                    EventType::Normal,
                    "MediaChanged",
                    format!("Inserted {p} into {target} of {vm}."),
                ),
                None => (
                    EventType::Normal,
                    "Ejected",
                    format!("Ejected the medium of {target} of {vm}."),
                ),
            });
        }
    }

    // Report what libvirt now has, not what was asked for.
    let view = ctx
        .libvirt
        .domain(vm)
        .await?
        .unwrap_or_else(DomainView::default);
    let config_now = view.config.disk(alias).filter(|_| view.persistent);
    let live_now = view.live.as_ref().and_then(|l| l.disk(alias));
    let current = if view.active {
        live_now.or(config_now)
    } else {
        config_now
    };
    let status = VirtualMachineStorageStatus {
        vm: Some(vm.to_string()),
        target: Some(target.clone()),
        bus: Some(spec.bus),
        alias: Some(alias.to_string()),
        current_source: current.and_then(|d| d.source.clone()),
        live: Some(live_now.is_some()),
        persistent: Some(config_now.is_some()),
        ..prev.clone()
    };
    let placed = if view.active && spec.attach == AttachMode::LiveAndPersistent {
        live_now.is_some()
    } else {
        true
    } && (config_now.is_some() || !view.persistent);
    let ready = if placed {
        let where_ = match (live_now.is_some(), config_now.is_some()) {
            (true, true) => "live and persistent",
            (true, false) => "live",
            (false, _) if view.active => {
                "in the definition; it appears at the next boot (attach: Persistent)"
            }
            (false, _) => "in the definition; the domain is not running",
        };
        Desired::truthy(
            condition::READY,
            reason::ATTACHED,
            format!(
                "{target} ({}) is attached to {vm}, {where_}.",
                bus_name(spec.bus)
            ),
        )
    } else if let Some(msg) = &restart {
        Desired::falsy(condition::READY, reason::RESTART_REQUIRED, msg.clone())
    } else {
        Desired::falsy(
            condition::READY,
            reason::ATTACH_FAILED,
            format!("{target} is not attached to {vm} yet; the agent retries."),
        )
    };
    let action = if placed {
        Action::requeue(Duration::from_secs(600))
    } else {
        Action::requeue(Duration::from_secs(30))
    };
    Ok(Outcome {
        status,
        ready,
        restart,
        events,
        action,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_confined_to_allowed_directories() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = vec![std::fs::canonicalize(dir.path()).unwrap()];
        let img = dir.path().join("a.img");
        std::fs::write(&img, b"data").unwrap();
        assert!(check_path(&img, &allowed, None).is_ok());
        // `..` and symlinks are resolved before the check.
        let escape = dir.path().join("../../etc/shadow");
        let Err(Refusal(reason, ..)) = check_path(&escape, &allowed, None) else {
            panic!("escape allowed")
        };
        assert_eq!(reason, reason::PATH_NOT_ALLOWED);
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let Err(Refusal(reason, ..)) = check_path(&link, &allowed, None) else {
            panic!("symlink escape allowed")
        };
        assert_eq!(reason, reason::PATH_NOT_ALLOWED);
        let Err(Refusal(reason, ..)) = check_path(&dir.path().join("missing.img"), &allowed, None)
        else {
            panic!()
        };
        assert_eq!(reason, reason::SOURCE_NOT_FOUND);
    }

    #[test]
    fn qcow2_backing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = vec![std::fs::canonicalize(dir.path()).unwrap()];
        let img = dir.path().join("b.qcow2");
        let mut header = b"QFI\xfb\0\0\0\x03".to_vec();
        header.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x01, 0]); // backing_file_offset != 0
        std::fs::write(&img, &header).unwrap();
        let Err(Refusal(reason, ..)) = check_path(&img, &allowed, None) else {
            panic!("backing file allowed")
        };
        assert_eq!(reason, reason::PATH_NOT_ALLOWED);
        let plain = dir.path().join("c.qcow2");
        std::fs::write(
            &plain,
            [b"QFI\xfb\0\0\0\x03".as_slice(), &[0u8; 8]].concat(),
        )
        .unwrap();
        assert_eq!(
            check_path(&plain, &allowed, None).ok().unwrap().format,
            "qcow2"
        );
    }
}
