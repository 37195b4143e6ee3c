//! Plan tests of the namespace grants.

use super::tests::*;
use super::*;
use crate::agent::refusal::Retry;
use crate::agent::storage::source::{Found, PathFacts, SourceFacts};
use crate::libvirt::domain::DomainView;
use std::path::PathBuf;

#[test]
fn inside_the_grant_everything_goes_ahead() {
    let obs = namespaced(
        observed(Some(view(false, "")), SourceFacts::Path(file(IMG))),
        "v*",
        "p",
    );
    let p = plan(
        &spec(StorageType::Disk, Bus::Sata, Some(IMG)),
        &Default::default(),
        ALIAS,
        &obs,
    )
    .unwrap();
    assert_eq!(p.steps, [Step::WriteDefinition]);
    // Open mode reaches every active pool and the --allowed-path directories.
    let mut open = observed(
        Some(view(false, "")),
        SourceFacts::Path(file("/extra/x.img")),
    );
    open.allowed_paths = vec![PathBuf::from("/extra")];
    assert!(open.grants.is_open());
    plan(
        &spec(StorageType::Disk, Bus::Sata, Some("/extra/x.img")),
        &Default::default(),
        ALIAS,
        &open,
    )
    .unwrap();
    // Namespaced: --allowed-path does not apply, only granted pools do.
    let mut ns = namespaced(open, "vm", "p");
    ns.allowed_paths = vec![PathBuf::from("/extra")];
    let r = refusal(
        &spec(StorageType::Disk, Bus::Sata, Some("/extra/x.img")),
        &Default::default(),
        &ns,
    );
    assert_eq!(r.reason, StorageReason::NotGranted);
}

#[test]
fn a_revoked_grant_keeps_the_attached_device_and_changes_nothing() {
    let attached = VirtualMachineStorageStatus {
        vm: Some("vm".into()),
        target: Some("sda".into()),
        bus: Some(Bus::Scsi),
        alias: Some(ALIAS.into()),
        current_source: Some(IMG.into()),
        live: Some(true),
        persistent: Some(true),
        ..Default::default()
    };
    let dev = format!("{SCSI}{}", disk_on("sda", Some(ALIAS), IMG, "disk"));
    // Granted: the device is in place, nothing to do.
    let obs = |domains: &str, pools: &str| {
        namespaced(
            observed(Some(view(true, &dev)), SourceFacts::Path(file(IMG))),
            domains,
            pools,
        )
    };
    let disk = spec(StorageType::Disk, Bus::Scsi, Some(IMG));
    let p = plan(&disk, &attached, ALIAS, &obs("vm", "p")).unwrap();
    assert!(p.steps.is_empty(), "{:?}", p.steps);
    // The domain or the pool revoked: refused, so no step runs (no detach); the object waits
    // for a grant change.
    for (domains, pools) in [("", "p"), ("vm", ""), ("", "")] {
        let r = refusal(&disk, &attached, &obs(domains, pools));
        assert_eq!(
            (r.reason, r.retry),
            (StorageReason::NotGranted, Retry::OnChange),
            "{domains:?} {pools:?}: {}",
            r.message
        );
    }
    // A CD medium in a revoked pool is not ejected either.
    let cd_dev = format!("{SCSI}{}", disk_on("sda", Some(ALIAS), ISO, "cdrom"));
    let cd = namespaced(
        observed(Some(view(true, &cd_dev)), SourceFacts::Path(file(ISO))),
        "vm",
        "",
    );
    let r = refusal(
        &spec(StorageType::Cdrom, Bus::Scsi, Some(ISO)),
        &attached,
        &cd,
    );
    assert_eq!(r.reason, StorageReason::NotGranted);
}

#[test]
fn refusals_tell_nothing_of_other_tenants() {
    let disk = spec(StorageType::Disk, Bus::Scsi, Some("/other/b.img"));
    let none = VirtualMachineStorageStatus::default();
    // Whether the other tenant's domain exists makes no difference.
    let msg = |domain: Option<DomainView>| {
        refusal(
            &disk,
            &none,
            &namespaced(observed(domain, SourceFacts::None), "team-a-*", "p"),
        )
        .message
    };
    let (exists, ghost) = (msg(Some(view(true, ""))), msg(None));
    assert_eq!(exists, ghost);
    assert!(
        exists.starts_with("namespace ta may use domains team-a-*; vm is not one of them."),
        "{exists}"
    );
    // Nor whether a file exists in another tenant's pool; the pool is not named.
    let present = namespaced(
        observed(
            Some(view(true, "")),
            SourceFacts::Path(file("/other/b.img")),
        ),
        "vm",
        "p",
    );
    let missing = namespaced(
        observed(
            Some(view(true, "")),
            SourceFacts::Path(PathFacts {
                requested: "/other/b.img".into(),
                found: Found::Missing {
                    parent: Some("/other".into()),
                },
            }),
        ),
        "vm",
        "p",
    );
    let (a, b) = (
        refusal(&disk, &none, &present),
        refusal(&disk, &none, &missing),
    );
    assert_eq!(
        (a.reason, &a.message),
        (StorageReason::NotGranted, &b.message)
    );
    assert!(
        a.message
            .starts_with("namespace ta may use storage pools p; /other/b.img is not inside"),
        "{}",
        a.message
    );
    assert!(
        !a.message.contains(" q"),
        "names the other pool: {}",
        a.message
    );
    // A target held by another object's device: its alias (with that object's UID) is not shown.
    let other = "ua-vps-0b7c3e5a-uid-of-someone-else";
    let taken = observed(
        Some(view(
            true,
            &disk_on("sda", Some(other), "/pool/b.img", "disk"),
        )),
        SourceFacts::Path(file(IMG)),
    );
    let mut s = spec(StorageType::Disk, Bus::Scsi, Some(IMG));
    s.target = Some("sda".into());
    let r = refusal(&s, &none, &taken);
    assert_eq!(r.reason, StorageReason::TargetConflict);
    assert!(!r.message.contains(other), "{}", r.message);
    assert!(
        r.message.contains("another virtplane object"),
        "{}",
        r.message
    );
}
