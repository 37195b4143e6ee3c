//! The plan of qcow2 overlays: shared base by default, merged with `spec.storage.flatten`, the
//! room a merge needs (the whole chain), and a chain that may not be read.

use super::tests::{GIB, facts, file_disk, node, pool, refusal, spec, start};
use super::*;

/// `web`'s disk /p/a.img is an overlay: itself 1 GiB allocated (half data), its chain
/// `chain_gib` GiB allocated (half data).
fn overlay_node(chain_gib: u64) -> Observed {
    let mut obs = node(&file_disk("/p/a.img", "vda"));
    obs.files.insert(
        "/p/a.img".into(),
        FileFacts {
            overlay: Some(Chain {
                links: 1,
                allocated: chain_gib * GIB,
                data: chain_gib * GIB / 2,
            }),
            ..facts("/p", GIB)
        },
    );
    obs
}

fn flat(fallback: &str) -> VMCloneSpec {
    let mut s = spec(None, fallback);
    s.storage.flatten = true;
    s
}

#[test]
fn overlays_share_their_base_unless_flattened() {
    // (case, spec, chain GiB, overlay, pool, bytes to copy)
    type Case = (
        &'static str,
        VMCloneSpec,
        u64,
        OverlayCopy,
        &'static str,
        u64,
    );
    let cases: Vec<Case> = vec![
        (
            "shared: the overlay's own size",
            spec(None, "default"),
            20,
            OverlayCopy::SharedBase,
            "p",
            GIB / 2,
        ),
        (
            "flattened: the chain's data",
            flat("default"),
            4,
            OverlayCopy::Flattened,
            "p",
            2 * GIB,
        ),
        (
            "flattened: the chain does not fit p, the fallback takes it",
            flat("big"),
            20,
            OverlayCopy::Flattened,
            "big",
            10 * GIB,
        ),
    ];
    for (case, spec, chain_gib, how, pool_name, total) in cases {
        let mut obs = overlay_node(chain_gib);
        obs.pools.push(pool("big", "dir", "/big", 100 * GIB));
        obs.pool_dirs.insert("big".into(), "/big".into());
        let p = start(&spec, &obs);
        let d = &p.disks[0];
        assert_eq!(d.overlay, Some(how), "{case}");
        assert_eq!(d.pool.as_deref(), Some(pool_name), "{case}");
        assert_eq!(d.total_bytes, Some(total), "{case}");
        assert_eq!(d.strategy, None, "{case}: not copied yet");
    }
}

#[test]
fn disks_that_are_no_overlays_are_copied_as_before() {
    let obs = node(&file_disk("/p/a.img", "vda"));
    let p = start(&flat("default"), &obs);
    assert_eq!(p.disks[0].overlay, None);
    assert_eq!(p.disks[0].total_bytes, Some(GIB / 2));
}

#[test]
fn a_merge_needs_room_for_the_whole_chain() {
    // The overlay alone fits p (10 GiB available); its 20 GiB chain does not, and no fallback.
    let obs = overlay_node(20);
    let shared = plan(&spec(None, "none"), "u", "n1", &config(&obs), &obs);
    assert!(shared.is_ok(), "{shared:?}");
    let r = refusal(decide(
        &flat("none"),
        "u",
        "n1",
        &VMCloneStatus::default(),
        &obs,
    ));
    assert_eq!(r.reason, CloneReason::InsufficientSpace);
    assert!(r.message.contains(&(20 * GIB).to_string()), "{}", r.message);
    assert!(r.message.contains("backing chain"), "{}", r.message);
}

#[test]
fn a_chain_that_may_not_be_read_refuses_a_flatten_with_nothing_made() {
    let mut obs = node(&file_disk("/p/a.img", "vda"));
    obs.files.insert(
        "/p/a.img".into(),
        FileFacts {
            unsafe_image: Some(
                "a qcow2 image whose backing chain (link 1) leaves the directories this namespace may use"
                    .into(),
            ),
            ..facts("/p", GIB)
        },
    );
    for (spec, says) in [
        (flat("default"), "spec.storage.flatten reads every image"),
        (spec(None, "default"), "whose whole backing chain lies"),
    ] {
        let d = decide(&spec, "u", "n1", &VMCloneStatus::default(), &obs);
        assert!(matches!(d, Decision::Refuse(_)), "{d:?}");
        let r = refusal(d);
        assert_eq!(r.reason, CloneReason::UnsafeImage);
        assert!(
            r.message.contains("leaves the directories"),
            "{}",
            r.message
        );
        assert!(r.message.contains(says), "{}", r.message);
    }
}

fn config(obs: &Observed) -> DomainXml {
    match &obs.source {
        Source::ShutOff(c) => c.clone(),
        _ => panic!("not shut off"),
    }
}
