//! Plan tests of the namespace grants.

use super::tests::*;
use super::*;
use crate::agent::refusal::Retry;
use crate::tenancy::Grants;

fn granted(domains: &str, pools: &str) -> Grants {
    use crate::tenancy::{DOMAINS, Mode, POOLS};
    let annotations = std::collections::BTreeMap::from([
        (DOMAINS.to_string(), domains.to_string()),
        (POOLS.to_string(), pools.to_string()),
    ]);
    Grants::of(Mode::Namespaced, "ta", &annotations)
}

fn with_grants(obs: Observed, grants: Grants) -> Observed {
    Observed { grants, ..obs }
}

#[test]
fn grants_are_checked_before_anything_is_said() {
    let a = file_disk("/p/a.img", "vda");
    let vol = "<disk type='volume' device='disk'><source pool='q' volume='v.img'/><target dev='vdb'/></disk>";
    let iso = "<disk type='file' device='cdrom'><source file='/iso/d.iso'/><target dev='sda'/><readonly/></disk>";
    let ta = granted("web*", "p");
    let none = VMCloneStatus::default();
    // (case, spec, observed, what the message says); every one waits for a grant.
    let cases: Vec<(&str, VMCloneSpec, Observed, &str)> = vec![
        (
            "source not granted",
            spec(None, "default"),
            with_grants(node(&a), granted("team-a-*", "p")),
            "namespace ta may use domains team-a-*; web is not one of them.",
        ),
        (
            "source not granted and missing: the same answer",
            spec(None, "default"),
            with_grants(Observed::default(), granted("team-a-*", "p")),
            "namespace ta may use domains team-a-*; web is not one of them.",
        ),
        (
            "the chosen name is outside the grant",
            spec(None, "default"),
            with_grants(node(&a), granted("web", "p")),
            "The clone would be named web-clone1: namespace ta may use domains web; web-clone1 is not one of them.",
        ),
        (
            "spec.targetName outside the grant, existing or not",
            spec(Some("db1"), "default"),
            Observed {
                names: vec!["web".into(), "db1".into()],
                ..with_grants(node(&a), ta.clone())
            },
            "spec.targetName: namespace ta may use domains web*; db1 is not one of them.",
        ),
        (
            "a file disk of an ungranted pool",
            spec(None, "default"),
            with_grants(node(&a), granted("web*", "other")),
            "Disk vda of web (/p/a.img) lies in no storage pool granted to the namespace: namespace ta may use storage pools other; p is not one of them.",
        ),
        (
            "a file disk in an allowed directory outside every pool",
            spec(None, "default"),
            Observed {
                files: HashMap::from([("/p/a.img".into(), facts("/elsewhere", GIB))]),
                allowed: vec!["/elsewhere".into()],
                ..with_grants(node(&a), ta.clone())
            },
            "Disk vda of web (/p/a.img) lies in no storage pool granted to the namespace: namespace ta may use storage pools p; the directory of /p/a.img is not one of them.",
        ),
        (
            "a volume of an ungranted pool, before saying whether it resolves",
            spec(None, "default"),
            Observed {
                volumes: HashMap::from([(("q".into(), "v.img".into()), VolumeLookup::NoPool)]),
                ..with_grants(node(&format!("{a}{vol}")), ta.clone())
            },
            "Disk vdb of web is a volume of pool q: namespace ta may use storage pools p; q is not one of them.",
        ),
        (
            "the fallback pool is needed and not granted",
            spec(None, "f"),
            Observed {
                pools: vec![
                    pool("p", "logical", "/p", 10 * GIB),
                    pool("f", "dir", "/f", 10 * GIB),
                ],
                ..with_grants(node(&a), ta.clone())
            },
            "Pool p (logical) cannot take a file copy, and spec.storage.pool: namespace ta may use storage pools p; f is not one of them.",
        ),
    ];
    for (name, spec, obs, text) in cases {
        let r = refusal(decide(&spec, "u1", "n1", &none, &obs));
        assert_eq!(r.reason, CloneReason::NotGranted, "{name}: {}", r.message);
        assert_eq!(
            r.message.split(" A cluster admin").next(),
            Some(text),
            "{name}"
        );
        assert_eq!(
            r.retry,
            Retry::OnChange,
            "{name}: a grant or a spec change wakes it"
        );
        assert!(
            matches!(decide(&spec, "u1", "n1", &none, &obs), Decision::Wait(_)),
            "{name}: waits (Pending) for a grant rather than fail"
        );
    }

    // Inside the grant: planned as in open mode; shared media are referenced, not judged.
    let obs = with_grants(node(&format!("{a}{iso}")), ta.clone());
    let p = start(&spec(None, "default"), &obs);
    assert_eq!(p.target, "web-clone1");
    assert_eq!(p.disks[0].pool.as_deref(), Some("p"));
    assert_eq!(
        p,
        start(&spec(None, "default"), &node(&format!("{a}{iso}")))
    );
    // A full pool never sends copies to an ungranted fallback: no room, as without one.
    let full = Observed {
        pools: vec![
            pool("p", "dir", "/p", GIB / 2),
            pool("f", "dir", "/f", 10 * GIB),
        ],
        ..with_grants(node(&a), ta.clone())
    };
    assert_eq!(
        refusal(decide(&spec(None, "f"), "u1", "n1", &none, &full)).reason,
        CloneReason::InsufficientSpace
    );
    let mut open_full = full.clone();
    open_full.grants = Grants::open();
    assert_eq!(
        start(&spec(None, "f"), &open_full).disks[0].pool.as_deref(),
        Some("f")
    );
    // A pool sharing the directory with an ungranted one: the copy is the granted pool's.
    let shared_dir = Observed {
        pools: vec![
            pool("other", "dir", "/p", 10 * GIB),
            pool("p", "dir", "/p", 10 * GIB),
        ],
        pool_dirs: HashMap::from([("other".into(), "/p".into()), ("p".into(), "/p".into())]),
        ..with_grants(node(&a), ta.clone())
    };
    assert_eq!(
        start(&spec(None, "default"), &shared_dir).disks[0]
            .pool
            .as_deref(),
        Some("p")
    );
    // A task that started was judged then: a revoke does not strand it half-made.
    let copying = VMCloneStatus {
        phase: Some(ClonePhase::Copying),
        target_name: Some("web-clone1".into()),
        ..Default::default()
    };
    let revoked = with_grants(node(&a), granted("", ""));
    assert_eq!(
        decide(&spec(None, "default"), "u1", "n1", &copying, &revoked),
        Decision::Resume
    );
}
