//! What a Ready VirtualMachineStorage's outcome depends on in its domain, so that a domain event
//! that leaves it unchanged does not wake the object ([`crate::agent::settled`]).
//!
//! Its outcome is judged on its own disk (in the definition and in the running guest) and on
//! whether the domain runs and is persistent; the other devices matter only while it has no disk
//! yet (a free target, the SCSI controller), and then it is not Ready.

use super::apply::Applied;
use super::{Outcome, alias_of};
use crate::agent::context::Context;
use crate::agent::settled;
use crate::agent::wiring::not_ready;
use crate::api::VirtualMachineStorage;
use crate::libvirt::domain::DomainView;

/// The key of `obj`'s settled record, when an event of its domain may spare it: it is Ready and
/// not being deleted.
pub fn settled_key(obj: &VirtualMachineStorage) -> Option<String> {
    let ready = !not_ready(obj.status.as_ref().map_or(&[][..], |s| &s.conditions));
    (ready && obj.metadata.deletion_timestamp.is_none()).then(|| alias_of(obj))
}

/// The fingerprint of `obj`'s part of `view`.
pub fn fingerprint(obj: &VirtualMachineStorage, view: &DomainView) -> u64 {
    part(view, &alias_of(obj))
}

/// The fingerprint of the disk `alias` in `view` and of the domain's state.
fn part(view: &DomainView, alias: &str) -> u64 {
    let config = view.config.disk(alias).filter(|_| view.persistent);
    let live = view.live.as_ref().and_then(|l| l.disk(alias));
    settled::fingerprint([
        Some(if view.active { "active" } else { "inactive" }),
        Some(if view.persistent {
            "persistent"
        } else {
            "transient"
        }),
        config.map(|d| d.xml.as_str()),
        live.map(|d| d.xml.as_str()),
    ])
}

/// The fingerprint of the domain as `applied` left it (read back after the steps, or as observed
/// when there were none); `None` when a step failed.
pub fn seen(applied: &Applied, alias: &str) -> Option<u64> {
    match applied {
        Applied::Done(done) => Some(part(&done.view, alias)),
        Applied::Failed(_) => None,
    }
}

/// Records a Ready outcome judged on a domain where `obj`'s part had `seen`, else forgets `obj`.
pub fn note(ctx: &Context, obj: &VirtualMachineStorage, seen: Option<u64>, outcome: &Outcome) {
    let alias = alias_of(obj);
    match seen {
        Some(fp) if outcome.ready.status && obj.metadata.deletion_timestamp.is_none() => {
            ctx.settled.record(&alias, obj.metadata.generation, fp);
        }
        _ => ctx.settled.forget(&alias),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::domain::parse_domain;

    fn view(active: bool, config: &str, live: &str) -> DomainView {
        let xml = |devices: &str| {
            parse_domain(&format!(
                "<domain type='kvm'><name>vm</name><devices>{devices}</devices></domain>"
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

    const A: &str = "<disk type='file' device='disk'><source file='/p/a.img'/><target dev='sda' bus='scsi'/><alias name='ua-vps-a'/></disk>";
    const A_EDITED: &str = "<disk type='file' device='disk'><source file='/p/x.img'/><target dev='sda' bus='scsi'/><alias name='ua-vps-a'/></disk>";
    const B: &str = "<disk type='file' device='disk'><source file='/p/b.img'/><target dev='sdb' bus='scsi'/><alias name='ua-vps-b'/></disk>";

    #[test]
    fn another_objects_device_leaves_the_part_unchanged() {
        assert_eq!(
            part(&view(false, A, ""), "ua-vps-a"),
            part(&view(false, &format!("{A}{B}"), ""), "ua-vps-a"),
        );
    }

    #[test]
    fn its_own_device_and_the_domains_state_change_the_part() {
        let before = part(&view(false, &format!("{A}{B}"), ""), "ua-vps-a");
        for (what, after) in [
            ("removed outside", view(false, B, "")),
            ("edited outside", view(false, &format!("{A_EDITED}{B}"), "")),
            (
                "started",
                view(true, &format!("{A}{B}"), &format!("{A}{B}")),
            ),
        ] {
            assert_ne!(before, part(&after, "ua-vps-a"), "{what}");
        }
        let mut transient = view(false, A, "");
        transient.persistent = false;
        assert_ne!(
            part(&view(false, A, ""), "ua-vps-a"),
            part(&transient, "ua-vps-a"),
            "undefined"
        );
        assert_ne!(
            part(&view(true, A, A), "ua-vps-a"),
            part(&view(true, A, ""), "ua-vps-a"),
            "unplugged from the guest"
        );
    }
}
