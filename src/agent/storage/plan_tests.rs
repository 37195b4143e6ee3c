use std::path::PathBuf;

use super::*;
use crate::agent::refusal::{Reason, Retry};
use crate::agent::storage::source::{FileKind, Found, IsoFacts, PathFacts, SourceFacts};
use crate::api::{DiskFormat, DownloadPhase, StorageSource};
use crate::libvirt::domain::{DomainView, parse_domain};
use crate::libvirt::facade::VolumeLookup;
use crate::tenancy::{DOMAINS, Grants, Mode, POOLS};

pub(super) const ALIAS: &str = "ua-vps-1";
pub(super) const ISO: &str = "/pool/a.iso";
pub(super) const IMG: &str = "/pool/a.img";

pub(super) fn spec(type_: StorageType, bus: Bus, path: Option<&str>) -> VirtualMachineStorageSpec {
    VirtualMachineStorageSpec {
        vm: "vm".into(),
        node_name: None,
        type_,
        bus,
        source: path.map(|p| StorageSource {
            path: Some(p.into()),
            ..Default::default()
        }),
        format: None,
        read_only: None,
        target: None,
        boot_order: None,
        attach: AttachMode::LiveAndPersistent,
        driver: None,
        iotune: None,
        serial: None,
        shareable: None,
    }
}

/// A domain with the devices of `devices` both live (when `active`) and in its definition.
pub(super) fn view(active: bool, devices: &str) -> DomainView {
    let xml = parse_domain(&format!("<domain><devices>{devices}</devices></domain>")).unwrap();
    DomainView {
        active,
        persistent: true,
        live: active.then(|| xml.clone()),
        config: xml,
    }
}

pub(super) fn file(path: &str) -> PathFacts {
    PathFacts {
        requested: path.into(),
        found: Found::Present {
            real: path.into(),
            kind: Ok(FileKind::File),
            header: Some(Vec::new()),
        },
    }
}

pub(super) fn observed(domain: Option<DomainView>, source: SourceFacts) -> Observed {
    Observed {
        node: "n1".into(),
        domain,
        source,
        pools: vec![("p".into(), PathBuf::from("/pool"))],
        ..Observed::default()
    }
}

/// What namespace `ta` is granted in namespaced mode.
pub(super) fn granted(domains: &str, pools: &str) -> Grants {
    let ann = [(DOMAINS, domains), (POOLS, pools)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Grants::of(Mode::Namespaced, "ta", &ann)
}

/// `obs` in namespaced mode, granted `domains` and `pools`; the node also has pool `q` at
/// `/other` (another tenant's).
pub(super) fn namespaced(mut obs: Observed, domains: &str, pools: &str) -> Observed {
    obs.grants = granted(domains, pools);
    obs.pools.push(("q".into(), PathBuf::from("/other")));
    obs
}

pub(super) fn disk_on(target: &str, alias: Option<&str>, source: &str, device: &str) -> String {
    let alias = alias.map_or(String::new(), |a| format!("<alias name='{a}'/>"));
    // libvirt marks every CD-ROM read-only.
    let ro = if device == "cdrom" { "<readonly/>" } else { "" };
    format!(
        "<disk type='file' device='{device}'><source file='{source}'/><target dev='{target}' bus='scsi'/>{ro}{alias}</disk>"
    )
}

pub(super) const SCSI: &str = "<controller type='scsi' model='virtio-scsi'/>";

pub(super) fn refusal(
    spec: &VirtualMachineStorageSpec,
    prev: &VirtualMachineStorageStatus,
    obs: &Observed,
) -> Refusal<StorageReason> {
    plan(spec, prev, ALIAS, obs).expect_err("a refusal")
}

#[test]
fn every_refusal_reason_has_its_case() {
    use StorageReason as R;
    let disk = spec(StorageType::Disk, Bus::Scsi, Some(IMG));
    let cd = spec(StorageType::Cdrom, Bus::Scsi, Some(ISO));
    let running = || Some(view(true, SCSI));
    let none = VirtualMachineStorageStatus::default();
    let attached = VirtualMachineStorageStatus {
        vm: Some("vm".into()),
        target: Some("sda".into()),
        bus: Some(Bus::Scsi),
        alias: Some(ALIAS.into()),
        current_source: Some(IMG.into()),
        ..Default::default()
    };
    let path = |p: &str| SourceFacts::Path(file(p));
    let iso = |phase, node: &str, f: Option<PathFacts>| SourceFacts::Iso {
        name: "dl".into(),
        iso: Some(IsoFacts {
            phase,
            node: Some(node.into()),
            pool: "p".into(),
            file: f,
        }),
    };
    let with = |f: &dyn Fn(&mut VirtualMachineStorageSpec)| {
        let mut s = disk.clone();
        f(&mut s);
        s
    };
    let sixty = Retry::After(Duration::from_secs(60));
    /// name, spec, previous status, what was observed, the reason and the retry.
    type Row = (
        &'static str,
        VirtualMachineStorageSpec,
        VirtualMachineStorageStatus,
        Observed,
        StorageReason,
        Retry,
    );
    let cases: Vec<Row> = vec![
        (
            "vm changed",
            with(&|s| s.vm = "other".into()),
            attached.clone(),
            observed(running(), path(IMG)),
            R::FieldImmutable,
            Retry::OnChange,
        ),
        (
            "disk without source",
            with(&|s| s.source = None),
            none.clone(),
            observed(running(), SourceFacts::None),
            R::InvalidSpec,
            Retry::OnChange,
        ),
        (
            "cdrom on virtio",
            spec(StorageType::Cdrom, Bus::Virtio, None),
            none.clone(),
            observed(running(), SourceFacts::None),
            R::InvalidSpec,
            Retry::OnChange,
        ),
        (
            "target off its bus",
            with(&|s| s.target = Some("vdb".into())),
            none.clone(),
            observed(running(), path(IMG)),
            R::InvalidSpec,
            Retry::OnChange,
        ),
        (
            "target changed",
            with(&|s| s.target = Some("sdc".into())),
            attached.clone(),
            observed(running(), path(IMG)),
            R::FieldImmutable,
            Retry::OnChange,
        ),
        (
            "bus changed",
            with(&|s| {
                s.bus = Bus::Sata;
            }),
            attached.clone(),
            observed(running(), path(IMG)),
            R::FieldImmutable,
            Retry::OnChange,
        ),
        (
            "two sources",
            disk.clone(),
            none.clone(),
            observed(running(), SourceFacts::Ambiguous),
            R::InvalidSpec,
            Retry::OnChange,
        ),
        (
            "type changed",
            disk.clone(),
            none.clone(),
            observed(
                Some(view(true, &disk_on("sda", Some(ALIAS), IMG, "cdrom"))),
                path(IMG),
            ),
            R::FieldImmutable,
            Retry::OnChange,
        ),
        (
            "no domain",
            disk.clone(),
            none.clone(),
            observed(None, SourceFacts::None),
            R::DomainNotFound,
            Retry::After(Duration::from_secs(300)),
        ),
        (
            "outside allowed",
            disk.clone(),
            none.clone(),
            observed(running(), path("/etc/shadow")),
            R::PathNotAllowed,
            Retry::OnChange,
        ),
        (
            "missing file",
            disk.clone(),
            none.clone(),
            observed(
                running(),
                SourceFacts::Path(PathFacts {
                    requested: "/pool/x".into(),
                    found: Found::Missing {
                        parent: Some("/pool".into()),
                    },
                }),
            ),
            R::SourceNotFound,
            sixty,
        ),
        (
            "no pool",
            disk.clone(),
            none.clone(),
            observed(
                running(),
                SourceFacts::Volume {
                    pool: "p".into(),
                    name: "v".into(),
                    lookup: VolumeLookup::NoPool,
                    file: None,
                },
            ),
            R::SourceNotFound,
            sixty,
        ),
        (
            "no volume",
            disk.clone(),
            none.clone(),
            observed(
                running(),
                SourceFacts::Volume {
                    pool: "p".into(),
                    name: "v".into(),
                    lookup: VolumeLookup::NoVolume,
                    file: None,
                },
            ),
            R::SourceNotFound,
            sixty,
        ),
        (
            "iso elsewhere",
            cd.clone(),
            none.clone(),
            observed(
                running(),
                iso(Some(DownloadPhase::Completed), "n2", Some(file(ISO))),
            ),
            R::SourceNotFound,
            Retry::OnChange,
        ),
        (
            "iso missing",
            cd.clone(),
            none.clone(),
            observed(
                running(),
                SourceFacts::Iso {
                    name: "dl".into(),
                    iso: None,
                },
            ),
            R::WaitingForDownload,
            sixty,
        ),
        (
            "iso downloading",
            cd.clone(),
            none.clone(),
            observed(running(), iso(Some(DownloadPhase::Downloading), "n1", None)),
            R::WaitingForDownload,
            Retry::After(Duration::from_secs(30)),
        ),
        (
            "domain not granted",
            disk.clone(),
            none.clone(),
            namespaced(observed(running(), path(IMG)), "other-*", "p"),
            R::NotGranted,
            Retry::OnChange,
        ),
        (
            "path in another tenant's pool",
            disk.clone(),
            none.clone(),
            namespaced(observed(running(), path("/other/b.img")), "vm", "p"),
            R::NotGranted,
            Retry::OnChange,
        ),
        (
            "volume of a pool not granted",
            disk.clone(),
            none.clone(),
            namespaced(
                observed(
                    running(),
                    SourceFacts::Volume {
                        pool: "q".into(),
                        name: "b.img".into(),
                        lookup: VolumeLookup::NoVolume,
                        file: None,
                    },
                ),
                "vm",
                "p",
            ),
            R::NotGranted,
            Retry::OnChange,
        ),
        (
            "download into a pool not granted",
            cd.clone(),
            none.clone(),
            namespaced(
                observed(running(), iso(Some(DownloadPhase::Downloading), "n1", None)),
                "vm",
                "q",
            ),
            R::NotGranted,
            Retry::OnChange,
        ),
        (
            "target taken",
            with(&|s| s.target = Some("sda".into())),
            none.clone(),
            observed(
                Some(view(true, &disk_on("sda", None, "/pool/b.img", "disk"))),
                path(IMG),
            ),
            R::TargetConflict,
            sixty,
        ),
        (
            "disk source changed in spec",
            disk.clone(),
            attached.clone(),
            observed(
                Some(view(true, &disk_on("sda", Some(ALIAS), IMG, "disk"))),
                path("/pool/new.img"),
            ),
            R::FieldImmutable,
            Retry::OnChange,
        ),
        (
            "a qcow2 image with an external data file",
            disk.clone(),
            none.clone(),
            observed(
                running(),
                SourceFacts::Path(PathFacts {
                    requested: IMG.into(),
                    found: Found::Present {
                        real: IMG.into(),
                        kind: Ok(FileKind::File),
                        header: Some(crate::image::qcow2::sample(1 << 2, None)),
                    },
                }),
            ),
            R::UnsafeImage,
            Retry::OnChange,
        ),
        (
            "disk source changed in libvirt",
            disk.clone(),
            attached.clone(),
            observed(
                Some(view(
                    true,
                    &disk_on("sda", Some(ALIAS), "/pool/other.img", "disk"),
                )),
                path(IMG),
            ),
            R::DriftDetected,
            Retry::OnChange,
        ),
    ];
    let mut seen = std::collections::HashSet::new();
    for (name, spec, prev, obs, reason, retry) in cases {
        let r = refusal(&spec, &prev, &obs);
        assert_eq!(
            (r.reason, r.retry),
            (reason, retry),
            "{name}: {}",
            r.message
        );
        assert!(
            r.message.ends_with('.'),
            "{name}: a sentence: {}",
            r.message
        );
        seen.insert(reason);
    }
    // Every reason but the ones only report gives (Attached, RestartRequired, AttachFailed) and
    // the ones of the volume step before the plan (volume_plan_tests, volume_tests).
    for r in StorageReason::ALL {
        let by_report = matches!(
            r,
            R::Attached
                | R::RestartRequired
                | R::AttachFailed
                | R::NameConflict
                | R::ProvisionFailed
        );
        assert_eq!(seen.contains(r), !by_report, "{}", r.as_str());
    }
}

#[test]
fn drift_message_names_both_sources() {
    let prev = VirtualMachineStorageStatus {
        current_source: Some(IMG.into()),
        target: Some("sda".into()),
        ..Default::default()
    };
    let obs = observed(
        Some(view(
            true,
            &disk_on("sda", Some(ALIAS), "/pool/other.img", "disk"),
        )),
        SourceFacts::Path(file(IMG)),
    );
    let r = refusal(&spec(StorageType::Disk, Bus::Scsi, Some(IMG)), &prev, &obs);
    assert!(
        r.message.contains(IMG) && r.message.contains("/pool/other.img"),
        "{}",
        r.message
    );
}

#[test]
fn new_scsi_disk_on_a_running_guest_without_controller() {
    let p = plan(
        &spec(StorageType::Disk, Bus::Scsi, Some(IMG)),
        &Default::default(),
        ALIAS,
        &observed(Some(view(true, "")), SourceFacts::Path(file(IMG))),
    )
    .unwrap();
    assert_eq!(
        p.steps,
        [
            Step::AddScsiController(Affect::Config),
            Step::HotPlugScsiController,
            Step::HotPlug,
            Step::WriteDefinition
        ]
    );
    assert_eq!((p.target.as_str(), p.restart.clone()), ("sda", None));
    assert!(p.want_live && p.want_config);
}

#[test]
fn a_controller_in_the_definition_only_is_hot_plugged() {
    let mut v = view(true, "");
    v.config = parse_domain(&format!("<domain><devices>{SCSI}</devices></domain>")).unwrap();
    let p = plan(
        &spec(StorageType::Disk, Bus::Scsi, Some(IMG)),
        &Default::default(),
        ALIAS,
        &observed(Some(v), SourceFacts::Path(file(IMG))),
    )
    .unwrap();
    // The definition has one: nothing added at all (as before the split).
    assert_eq!(p.steps, [Step::HotPlug, Step::WriteDefinition]);
}

#[test]
fn a_transient_domain_gets_its_controller_live() {
    let mut v = view(true, "");
    v.persistent = false;
    let p = plan(
        &spec(StorageType::Disk, Bus::Scsi, Some(IMG)),
        &Default::default(),
        ALIAS,
        &observed(Some(v), SourceFacts::Path(file(IMG))),
    )
    .unwrap();
    // Once: no second hot-plug of the same controller.
    assert_eq!(
        p.steps,
        [Step::AddScsiController(Affect::Live), Step::HotPlug]
    );
}

#[test]
fn sata_and_ide_cannot_hot_plug_and_need_a_restart() {
    for (bus, prefix) in [(Bus::Sata, "sda"), (Bus::Ide, "hda")] {
        let p = plan(
            &spec(StorageType::Disk, bus, Some(IMG)),
            &Default::default(),
            ALIAS,
            &observed(Some(view(true, "")), SourceFacts::Path(file(IMG))),
        )
        .unwrap();
        assert_eq!(p.steps, [Step::WriteDefinition], "{bus:?}");
        assert_eq!(p.restart, Some(RestartCause::BusCannotHotPlug(bus)));
        assert_eq!(p.target, prefix);
    }
}

#[test]
fn a_shut_off_domain_gets_the_definition_only() {
    let p = plan(
        &spec(StorageType::Disk, Bus::Sata, Some(IMG)),
        &Default::default(),
        ALIAS,
        &observed(Some(view(false, "")), SourceFacts::Path(file(IMG))),
    )
    .unwrap();
    assert_eq!(p.steps, [Step::WriteDefinition]);
    assert_eq!(p.restart, None, "nothing to hot-plug into");
    assert!(!p.want_live);
}

#[test]
fn attach_persistent_skips_the_running_guest() {
    let mut s = spec(StorageType::Disk, Bus::Virtio, Some(IMG));
    s.attach = AttachMode::Persistent;
    let p = plan(
        &s,
        &Default::default(),
        ALIAS,
        &observed(Some(view(true, "")), SourceFacts::Path(file(IMG))),
    )
    .unwrap();
    assert_eq!(p.steps, [Step::WriteDefinition]);
    assert_eq!(p.target, "vda");
}

#[test]
fn a_device_in_place_needs_nothing() {
    let dev = format!("{SCSI}{}", disk_on("sdb", Some(ALIAS), IMG, "disk"));
    let p = plan(
        &spec(StorageType::Disk, Bus::Scsi, Some(IMG)),
        &Default::default(),
        ALIAS,
        &observed(Some(view(true, &dev)), SourceFacts::Path(file(IMG))),
    )
    .unwrap();
    assert!(p.steps.is_empty(), "{:?}", p.steps);
    assert_eq!(p.target, "sdb", "the device's own target wins");
}

#[test]
fn a_device_removed_live_is_hot_plugged_again() {
    let mut v = view(
        true,
        &format!("{SCSI}{}", disk_on("sda", Some(ALIAS), IMG, "disk")),
    );
    v.live = Some(parse_domain(&format!("<domain><devices>{SCSI}</devices></domain>")).unwrap());
    let p = plan(
        &spec(StorageType::Disk, Bus::Scsi, Some(IMG)),
        &Default::default(),
        ALIAS,
        &observed(Some(v), SourceFacts::Path(file(IMG))),
    )
    .unwrap();
    assert_eq!(p.steps, [Step::HotPlug]);
}

#[test]
fn cd_media_changes_in_place_live_and_persistent() {
    let dev = format!("{SCSI}{}", disk_on("sda", Some(ALIAS), ISO, "cdrom"));
    let obs = |src| observed(Some(view(true, &dev)), src);
    let new = "/pool/b.iso";
    let p = plan(
        &spec(StorageType::Cdrom, Bus::Scsi, Some(new)),
        &Default::default(),
        ALIAS,
        &obs(SourceFacts::Path(file(new))),
    )
    .unwrap();
    assert_eq!(
        p.steps,
        [
            Step::UpdateMedia(Affect::Config),
            Step::UpdateMedia(Affect::Live)
        ]
    );
    assert_eq!(p.source.as_deref(), Some(new));
    // Ejecting: no source.
    let p = plan(
        &spec(StorageType::Cdrom, Bus::Scsi, None),
        &Default::default(),
        ALIAS,
        &obs(SourceFacts::None),
    )
    .unwrap();
    assert_eq!(p.steps.len(), 2);
    assert_eq!(p.source, None);
    assert!(!p.xml.contains("<source"), "{}", p.xml);
}

#[test]
fn the_lowest_free_target_is_chosen() {
    let dev = format!(
        "{SCSI}{}{}",
        disk_on("sda", None, "/pool/x", "disk"),
        disk_on("sdc", Some("ua-vps-2"), "/pool/y", "disk")
    );
    let p = plan(
        &spec(StorageType::Disk, Bus::Scsi, Some(IMG)),
        &Default::default(),
        ALIAS,
        &observed(Some(view(true, &dev)), SourceFacts::Path(file(IMG))),
    )
    .unwrap();
    assert_eq!(p.target, "sdb");
}

#[test]
fn the_disk_xml_carries_format_driver_and_flags() {
    let mut s = spec(StorageType::Disk, Bus::Virtio, Some(IMG));
    s.read_only = Some(true);
    s.boot_order = Some(2);
    s.format = Some(DiskFormat::Raw);
    s.driver = Some(crate::api::DriverTuning {
        cache: Some(crate::api::CacheMode::Writeback),
        io: Some(crate::api::IoMode::IoUring),
        discard: Some(crate::api::DiscardMode::Unmap),
        detect_zeroes: Some(crate::api::DetectZeroes::Unmap),
    });
    s.serial = Some("SN-1".into());
    s.shareable = Some(true);
    s.iotune = Some(crate::api::IoTune {
        read_bytes_sec: Some(1000),
        ..Default::default()
    });
    let p = plan(
        &s,
        &Default::default(),
        ALIAS,
        &observed(Some(view(false, "")), SourceFacts::Path(file(IMG))),
    )
    .unwrap();
    for part in [
        "type='raw'",
        "cache='writeback'",
        "io='io_uring'",
        "discard='unmap'",
        "detect_zeroes='unmap'",
        "<serial>SN-1</serial>",
        "<shareable/>",
        "<iotune><read_bytes_sec>1000</read_bytes_sec></iotune>",
        "<readonly/>",
        "<boot order='2'/>",
        "dev='vda' bus='virtio'",
        "<alias name='ua-vps-1'/>",
    ] {
        assert!(p.xml.contains(part), "{part} in {}", p.xml);
    }
    let parsed = parse_domain(&format!("<domain><devices>{}</devices></domain>", p.xml)).unwrap();
    assert_eq!(parsed.disks[0].source.as_deref(), Some(IMG));
}
