use super::*;
use crate::agent::refusal::Retry;
use crate::api::Bus;
use crate::libvirt::domain::{DomainView, parse_domain};

const ALIAS: &str = "ua-vps-1";
const DISK: &str = "<disk type='file' device='disk'><source file='/pool/a.img'/><target dev='sda' bus='scsi'/><alias name='ua-vps-1'/></disk>";

fn plan(bus: Bus, want_live: bool) -> Plan {
    Plan {
        vm: "vm".into(),
        alias: ALIAS.into(),
        target: "sda".into(),
        bus,
        attach: if want_live {
            AttachMode::LiveAndPersistent
        } else {
            AttachMode::Persistent
        },
        xml: DISK.into(),
        live_xml: DISK.into(),
        source: Some("/pool/a.img".into()),
        want_live,
        want_config: true,
        steps: Vec::new(),
        restart: None,
        wanted: Default::default(),
        redefined: Vec::new(),
        iotune_drift: false,
    }
}

/// A view with the device live and/or in the definition.
fn view(active: bool, live: bool, config: bool) -> DomainView {
    let xml = |with: bool| {
        parse_domain(&format!(
            "<domain><devices>{}</devices></domain>",
            if with { DISK } else { "" }
        ))
        .unwrap()
    };
    DomainView {
        active,
        persistent: true,
        live: active.then(|| xml(live)),
        config: xml(config),
    }
}

fn done(view: DomainView, restart: Option<RestartCause>) -> Done {
    Done {
        plugged: false,
        defined: false,
        media_changed: false,
        redefined: false,
        iotune_set: None,
        boot_converted: None,
        restart,
        view,
    }
}

#[test]
fn ready_and_restart_required_table() {
    use StorageReason as R;
    let ten = Action::requeue(Duration::from_secs(600));
    let thirty = Action::requeue(Duration::from_secs(30));
    /// name, plan, the domain after apply, a restart cause, Ready, its reason, what the message
    /// says, whether RestartRequired is True, and when to look again.
    type Row = (
        &'static str,
        Plan,
        DomainView,
        Option<RestartCause>,
        bool,
        StorageReason,
        &'static str,
        bool,
        Action,
    );
    let cases: Vec<Row> = vec![
        (
            "live and persistent",
            plan(Bus::Scsi, true),
            view(true, true, true),
            None,
            true,
            R::Attached,
            "live and persistent",
            false,
            ten.clone(),
        ),
        (
            "shut off",
            plan(Bus::Scsi, false),
            view(false, false, true),
            None,
            true,
            R::Attached,
            "the domain is not running",
            false,
            ten.clone(),
        ),
        (
            "persistent only on a running guest",
            plan(Bus::Scsi, false),
            view(true, false, true),
            None,
            true,
            R::Attached,
            "attach: Persistent",
            false,
            ten.clone(),
        ),
        (
            "sata cannot hot-plug",
            plan(Bus::Sata, true),
            view(true, false, true),
            Some(RestartCause::BusCannotHotPlug(Bus::Sata)),
            false,
            R::RestartRequired,
            "A sata device cannot be hot-plugged",
            true,
            thirty.clone(),
        ),
        (
            "ide cannot hot-plug",
            plan(Bus::Ide, true),
            view(true, false, true),
            Some(RestartCause::BusCannotHotPlug(Bus::Ide)),
            false,
            R::RestartRequired,
            "Use bus scsi",
            true,
            thirty.clone(),
        ),
        (
            "no SCSI controller live",
            plan(Bus::Scsi, true),
            view(true, false, true),
            Some(RestartCause::ScsiControllerHotPlugFailed("boom".into())),
            false,
            R::RestartRequired,
            "had no SCSI controller and hot-plugging one failed (boom)",
            true,
            thirty.clone(),
        ),
        (
            "hot-plug limit",
            plan(Bus::Virtio, true),
            view(true, false, true),
            Some(RestartCause::HotPlugLimit("no slot".into())),
            false,
            R::RestartRequired,
            "failed (no slot)",
            true,
            thirty.clone(),
        ),
        (
            "not there yet",
            plan(Bus::Scsi, true),
            view(true, false, false),
            None,
            false,
            R::AttachFailed,
            "not attached to vm yet",
            false,
            thirty.clone(),
        ),
        (
            "missing from the definition",
            plan(Bus::Scsi, true),
            view(true, true, false),
            None,
            false,
            R::AttachFailed,
            "the agent retries",
            false,
            thirty.clone(),
        ),
    ];
    for (name, plan, view, restart, ready, reason, message, restart_required, action) in cases {
        let o = report(
            &Status::default(),
            &plan,
            Applied::Done(Box::new(done(view, restart))),
        );
        assert_eq!(o.ready.status, ready, "{name}");
        assert_eq!(o.ready.reason, reason.as_str(), "{name}");
        let said = o.restart.clone().unwrap_or(o.ready.message.clone());
        assert!(said.contains(message), "{name}: {said}");
        assert_eq!(o.restart.is_some(), restart_required, "{name}");
        if restart_required {
            assert_eq!(o.ready.message, o.restart.clone().unwrap(), "{name}");
        }
        assert_eq!(o.action, action, "{name}");
    }
}

#[test]
fn a_restart_is_said_even_once_the_device_is_in_place() {
    // The hot-plug was put off, but the device is there (say, after a reboot raced the apply).
    let o = report(
        &Status::default(),
        &plan(Bus::Scsi, true),
        Applied::Done(Box::new(done(
            view(true, true, true),
            Some(RestartCause::HotPlugLimit("x".into())),
        ))),
    );
    assert!(o.ready.status);
    assert!(o.restart.is_some());
}

#[test]
fn status_fields_say_what_libvirt_has() {
    let prev = Status {
        node_name: Some("n1".into()),
        ..Default::default()
    };
    let o = report(
        &prev,
        &plan(Bus::Scsi, true),
        Applied::Done(Box::new(done(view(true, true, false), None))),
    );
    let s = o.status;
    assert_eq!(s.vm.as_deref(), Some("vm"));
    assert_eq!(s.target.as_deref(), Some("sda"));
    assert_eq!(s.bus, Some(Bus::Scsi));
    assert_eq!(s.alias.as_deref(), Some(ALIAS));
    assert_eq!(s.current_source.as_deref(), Some("/pool/a.img"));
    assert_eq!((s.live, s.persistent), (Some(true), Some(false)));
    assert_eq!(s.node_name.as_deref(), Some("n1"), "the rest is kept");
    // A shut-off domain: the source is the definition's.
    let o = report(
        &prev,
        &plan(Bus::Scsi, true),
        Applied::Done(Box::new(done(view(false, false, true), None))),
    );
    assert_eq!(o.status.current_source.as_deref(), Some("/pool/a.img"));
    assert_eq!(o.status.live, Some(false));
}

#[test]
fn failures_are_attach_failed_with_their_retry() {
    let prev = Status {
        target: Some("sdq".into()),
        ..Default::default()
    };
    let later = Action::requeue(Duration::from_secs(300));
    for (failure, message, action) in [
        (
            Failure::ScsiController("e1".into()),
            "Adding a virtio-scsi controller to vm failed: e1.",
            later.clone(),
        ),
        (
            Failure::HotPlugRefused("e2".into()),
            "The running vm refused the device: e2.",
            later.clone(),
        ),
        (
            Failure::Definition("libvirt refused the device: e3.".into()),
            "libvirt refused the device: e3.",
            Action::await_change(),
        ),
    ] {
        let o = report(&prev, &plan(Bus::Scsi, true), Applied::Failed(failure));
        assert!(!o.ready.status);
        assert_eq!(o.ready.reason, "AttachFailed");
        assert!(o.ready.message.starts_with(message), "{}", o.ready.message);
        assert_eq!(o.action, action);
        assert_eq!(o.status, prev, "the status stays as it was");
        assert!(o.events.is_empty() && o.restart.is_none());
    }
}

#[test]
fn refusals_keep_their_reason_and_retry() {
    let prev = Status::default();
    let o = refused(
        &prev,
        Refusal::wait(
            StorageReason::TargetConflict,
            "taken.",
            Duration::from_secs(60),
        ),
    );
    assert_eq!(
        (o.ready.reason, o.ready.status, o.action),
        (
            "TargetConflict",
            false,
            Action::requeue(Duration::from_secs(60))
        )
    );
    let o = refused(
        &prev,
        Refusal::fix(StorageReason::PathNotAllowed, "outside."),
    );
    assert_eq!(o.action, Retry::OnChange.action());
    assert_eq!(o.ready.message, "outside.");
}

#[test]
fn a_libvirt_failure_is_retried_soon() {
    let err = LibvirtError::Fake {
        action: "read the domain".into(),
        kind: crate::libvirt::ErrorKind::Busy,
    };
    let o = libvirt_failed(&Status::default(), &err);
    assert_eq!(o.ready.reason, "AttachFailed");
    assert!(o.ready.message.contains("The agent retries"));
    assert_eq!(o.action, Action::requeue(Duration::from_secs(30)));
}

#[test]
fn events_table() {
    let attached = Status {
        live: Some(true),
        persistent: Some(true),
        ..Default::default()
    };
    let fresh = Status::default();
    let ejecting = Plan {
        source: None,
        ..plan(Bus::Scsi, true)
    };
    let did = |plugged, defined, media_changed| Done {
        plugged,
        defined,
        media_changed,
        redefined: false,
        iotune_set: None,
        boot_converted: None,
        restart: None,
        view: DomainView::default(),
    };
    type Row<'a> = (&'a str, &'a Status, Plan, Done, Vec<(EventType, &'a str)>);
    let cases: Vec<Row> = vec![
        (
            "hot-plugged and defined",
            &fresh,
            plan(Bus::Scsi, true),
            did(true, true, false),
            vec![(EventType::Normal, "Attached")],
        ),
        (
            "defined for the next boot",
            &fresh,
            plan(Bus::Scsi, false),
            did(false, true, false),
            vec![(EventType::Normal, "Attached")],
        ),
        (
            "defined while the hot-plug waits",
            &fresh,
            plan(Bus::Sata, true),
            did(false, true, false),
            vec![],
        ),
        (
            "put back live",
            &attached,
            plan(Bus::Scsi, true),
            did(true, false, false),
            vec![(EventType::Warning, "DriftCorrected")],
        ),
        (
            "put back in the definition",
            &attached,
            plan(Bus::Scsi, false),
            did(false, true, false),
            vec![(EventType::Warning, "DriftCorrected")],
        ),
        (
            "put back in both",
            &attached,
            plan(Bus::Scsi, true),
            did(true, true, false),
            vec![
                (EventType::Warning, "DriftCorrected"),
                (EventType::Warning, "DriftCorrected"),
            ],
        ),
        (
            "medium inserted",
            &attached,
            plan(Bus::Scsi, true),
            did(false, false, true),
            vec![(EventType::Normal, "MediaChanged")],
        ),
        (
            "medium ejected",
            &attached,
            ejecting,
            did(false, false, true),
            vec![(EventType::Normal, "Ejected")],
        ),
        (
            "nothing to do",
            &attached,
            plan(Bus::Scsi, true),
            did(false, false, false),
            vec![],
        ),
    ];
    for (name, prev, plan, done, want) in cases {
        let got: Vec<(EventType, &str)> = events(prev, &plan, &done)
            .into_iter()
            .map(|(t, r, _)| (t, r))
            .collect();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn event_notes_name_the_target_and_the_domain() {
    let d = Done {
        plugged: true,
        media_changed: true,
        ..done(DomainView::default(), None)
    };
    let notes: Vec<String> = events(&Status::default(), &plan(Bus::Scsi, true), &d)
        .into_iter()
        .map(|(_, _, n)| n)
        .collect();
    assert_eq!(
        notes,
        [
            "Hot-plugged sda into vm.",
            "Inserted /pool/a.img into sda of vm."
        ]
    );
}
