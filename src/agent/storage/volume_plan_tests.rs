use super::*;
use crate::agent::refusal::Reason;
use crate::api::ReclaimPolicy;
use crate::image::qcow2::sample;
use crate::libvirt::volume::VolumeSource;
use crate::tenancy::{DOMAINS, Mode, POOLS};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

fn create(capacity: &str) -> VolumeCreate {
    VolumeCreate {
        capacity: Quantity(capacity.into()),
        format: None,
        preallocation: None,
        backing_volume: None,
        reclaim_policy: ReclaimPolicy::Retain,
    }
}

fn reason<T: std::fmt::Debug>(r: Result<T, Refused>) -> &'static str {
    r.unwrap_err().reason.as_str()
}

#[test]
fn quantities_in_bytes() {
    for (q, want) in [
        ("10Gi", Some(10 << 30)),
        ("512Mi", Some(512 << 20)),
        ("1G", Some(1_000_000_000)),
        ("1.5Gi", Some(3 << 29)),
        ("1000", Some(1000)),
        ("1e9", Some(1_000_000_000)),
        ("0.5k", Some(500)),
        ("0.0001", Some(1)),
        ("0", None),
        ("", None),
        ("Gi", None),
        ("10GB", None),
        ("-1Gi", None),
        ("100Ei", None),
    ] {
        assert_eq!(quantity_bytes(q), want, "{q}");
    }
}

const OURS: Option<(&str, &str)> = Some(("p", "d"));

#[test]
fn decides_create_grow_keep_and_refusals() {
    let c = create("64Mi");
    // Missing: created, thin qcow2 by default.
    let Ok(VolumeStep::Create(v)) = decide(&c, "p", "d.qcow2", None, None, &[]) else {
        panic!()
    };
    assert_eq!(
        (v.capacity, v.format.as_str(), v.allocation, v.backing),
        (64 << 20, "qcow2", 0, None)
    );
    // Someone else's volume of that name: NameConflict, whatever its size.
    for have in [1, 64 << 20, 1 << 40] {
        assert_eq!(
            reason(decide(&c, "p", "d", Some(have), None, &[])),
            "NameConflict"
        );
    }
    // Ours: kept, grown, never shrunk.
    assert_eq!(
        decide(&c, "p", "d", Some(64 << 20), OURS, &[]),
        Ok(VolumeStep::Keep)
    );
    assert_eq!(
        decide(&c, "p", "d", Some(32 << 20), OURS, &[]),
        Ok(VolumeStep::Grow {
            from: 32 << 20,
            to: 64 << 20
        })
    );
    let shrink = decide(&c, "p", "d", Some(128 << 20), OURS, &[]).unwrap_err();
    assert_eq!(shrink.reason.as_str(), "InvalidSpec");
    assert!(
        shrink.message.contains("never shrunk"),
        "{}",
        shrink.message
    );
    // A size that is no sector multiple is rounded up, so it compares stably.
    let odd = decide(&create("1000"), "p", "d", None, None, &[]);
    assert!(matches!(odd, Ok(VolumeStep::Create(v)) if v.capacity == 1024));
    assert_eq!(
        decide(&create("1000"), "p", "d", Some(1024), OURS, &[]),
        Ok(VolumeStep::Keep)
    );
    assert_eq!(
        reason(decide(&create("lots"), "p", "d", None, None, &[])),
        "InvalidSpec"
    );
    // This object created another volume: it cannot move to a new one (which would be
    // created, and the first forgotten), whether the new name exists or not.
    for existing in [None, Some(64 << 20)] {
        let r = decide(&c, "p", "other", existing, OURS, &[]).unwrap_err();
        assert_eq!(r.reason.as_str(), "FieldImmutable", "{}", r.message);
    }
    // Ours but gone (removed outside virtplane): made again.
    assert!(matches!(
        decide(&c, "p", "d", None, OURS, &[]),
        Ok(VolumeStep::Create(_))
    ));
}

#[test]
fn preallocation_and_overlay_rules() {
    let full = VolumeCreate {
        format: Some(DiskFormat::Raw),
        preallocation: Some(Preallocation::Full),
        ..create("8Mi")
    };
    let Ok(VolumeStep::Create(v)) = decide(&full, "p", "d", None, None, &[]) else {
        panic!()
    };
    assert_eq!((v.allocation, v.prealloc_metadata), (8 << 20, false));
    let meta_raw = VolumeCreate {
        preallocation: Some(Preallocation::Metadata),
        ..full.clone()
    };
    assert_eq!(
        reason(decide(&meta_raw, "p", "d", None, None, &[])),
        "InvalidSpec"
    );
    let meta = VolumeCreate {
        format: None,
        ..meta_raw
    };
    let Ok(VolumeStep::Create(v)) = decide(&meta, "p", "d", None, None, &[]) else {
        panic!()
    };
    assert!(v.prealloc_metadata);

    let base = BackingVolume {
        pool: "g".into(),
        name: "base".into(),
    };
    let overlay = VolumeCreate {
        backing_volume: Some(base.clone()),
        ..create("1Gi")
    };
    let chain = [BackingLink {
        path: "/g/base".into(),
        format: "qcow2".into(),
    }];
    let Ok(VolumeStep::Create(v)) = decide(&overlay, "p", "o", None, None, &chain) else {
        panic!()
    };
    assert_eq!(v.backing.as_ref(), chain.first());
    for bad in [
        VolumeCreate {
            format: Some(DiskFormat::Raw),
            ..overlay.clone()
        },
        VolumeCreate {
            preallocation: Some(Preallocation::Full),
            ..overlay.clone()
        },
    ] {
        assert_eq!(
            reason(decide(&bad, "p", "o", None, None, &chain)),
            "InvalidSpec"
        );
    }
    assert_eq!(
        reason(decide(&overlay, "g", "base", None, None, &chain)),
        "InvalidSpec",
        "an overlay of itself"
    );
}

fn present(path: &str, header: Option<Vec<u8>>) -> PathFacts {
    PathFacts {
        requested: path.into(),
        found: Found::Present {
            real: path.into(),
            kind: Ok(FileKind::File),
            header,
        },
    }
}

fn facts(links: Vec<PathFacts>) -> BackingFacts {
    BackingFacts {
        volume: BackingVolume {
            pool: "g".into(),
            name: "base".into(),
        },
        lookup: VolumeLookup::Found(VolumeSource {
            path: "/g/base".into(),
            pool_type: "dir".into(),
            is_file: true,
        }),
        links,
        dirs: vec!["/g".into(), "/p".into()],
    }
}

/// A qcow2 header backed by `name` whose format is declared `format`.
fn backed(name: &str, format: Option<&str>) -> Vec<u8> {
    let mut h = sample(0, Some(name.as_bytes()));
    if let Some(f) = format {
        // A backing-format header extension right after the 112-byte header.
        let at = 112;
        h[at..at + 4].copy_from_slice(&0xe279_2acau32.to_be_bytes());
        h[at + 4..at + 8].copy_from_slice(&(f.len() as u32).to_be_bytes());
        h[at + 8..at + 8 + f.len()].copy_from_slice(f.as_bytes());
    }
    h
}

#[test]
fn backing_chain_judged_link_by_link() {
    let open = Grants::open();
    let dirs = facts(vec![]).dirs;
    // A standalone qcow2 golden image, and a raw one.
    let one = facts(vec![present("/g/base", Some(sample(0, None)))]);
    assert_eq!(
        judge_chain(&one, &open, &dirs).unwrap(),
        [BackingLink {
            path: "/g/base".into(),
            format: "qcow2".into()
        }]
    );
    let raw = facts(vec![present("/g/base", Some(b"plain".to_vec()))]);
    assert_eq!(judge_chain(&raw, &open, &dirs).unwrap()[0].format, "raw");
    // A two-link chain inside the granted pools.
    let two = facts(vec![
        present("/g/base", Some(backed("/p/older", Some("raw")))),
        present("/p/older", Some(b"plain".to_vec())),
    ]);
    let chain = judge_chain(&two, &open, &dirs).unwrap();
    assert_eq!(
        chain.iter().map(|l| l.format.as_str()).collect::<Vec<_>>(),
        ["qcow2", "raw"]
    );
    // Refused: a link outside the granted pools (never named), a data file, an undeclared
    // backing format, a declared format that does not match, a missing file.
    let outside = facts(vec![
        present("/g/base", Some(backed("/etc/secret", Some("raw")))),
        PathFacts {
            requested: "/etc/secret".into(),
            found: Found::Present {
                real: "/etc/secret".into(),
                kind: Ok(FileKind::File),
                header: None,
            },
        },
    ]);
    let r = judge_chain(&outside, &open, &dirs).unwrap_err();
    assert_eq!(r.reason.as_str(), "UnsafeImage");
    assert!(
        r.message.contains("outside the pools granted"),
        "{}",
        r.message
    );
    assert!(!r.message.contains("/etc/secret"), "{}", r.message);
    let data_file = facts(vec![present(
        "/g/base",
        Some(sample(crate::image::qcow2::INCOMPAT_DATA_FILE, None)),
    )]);
    assert_eq!(reason(judge_chain(&data_file, &open, &dirs)), "UnsafeImage");
    let probed = facts(vec![
        present("/g/base", Some(backed("/p/older", None))),
        present("/p/older", Some(b"plain".to_vec())),
    ]);
    assert_eq!(reason(judge_chain(&probed, &open, &dirs)), "UnsafeImage");
    let mismatch = facts(vec![
        present("/g/base", Some(backed("/p/older", Some("raw")))),
        present("/p/older", Some(sample(0, None))),
    ]);
    assert_eq!(reason(judge_chain(&mismatch, &open, &dirs)), "UnsafeImage");
    let missing = facts(vec![present(
        "/g/base",
        Some(backed("/p/gone", Some("raw"))),
    )]);
    assert_eq!(reason(judge_chain(&missing, &open, &dirs)), "UnsafeImage");
    // The golden image itself missing: wait for it.
    let absent = BackingFacts {
        lookup: VolumeLookup::NoVolume,
        ..facts(vec![])
    };
    assert_eq!(reason(judge_chain(&absent, &open, &dirs)), "SourceNotFound");
}

#[test]
fn backing_pool_must_be_granted() {
    let ann = [(DOMAINS, "vm"), (POOLS, "p")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let grants = Grants::of(Mode::Namespaced, "ta", &ann);
    let one = facts(vec![present("/g/base", Some(sample(0, None)))]);
    assert_eq!(reason(judge_chain(&one, &grants, &[])), "NotGranted");
}

#[test]
fn overlay_must_point_at_the_judged_chain() {
    let chain = [BackingLink {
        path: "/g/base".into(),
        format: "qcow2".into(),
    }];
    assert!(backed_by_chain(
        &present("/p/o", Some(backed("/g/base", Some("qcow2")))),
        &chain
    ));
    // Relative names are read relative to the overlay's directory.
    assert!(backed_by_chain(
        &present("/g/o", Some(backed("base", Some("qcow2")))),
        &chain
    ));
    assert!(!backed_by_chain(
        &present("/p/o", Some(backed("/g/other", Some("qcow2")))),
        &chain
    ));
    assert!(!backed_by_chain(
        &present("/p/o", Some(sample(0, None))),
        &chain
    ));
    assert!(!backed_by_chain(
        &present("/p/o", Some(backed("/g/base", Some("qcow2")))),
        &[]
    ));
}

/// The whole plan of an overlay disk: its backing file is accepted only as the judged chain,
/// and the device carries that chain.
#[test]
fn plan_attaches_an_overlay_with_its_chain_and_refuses_other_backing_files() {
    use crate::api::{
        AttachMode, Bus, StorageSource, StorageType, VirtualMachineStorageStatus, VolumeRef,
    };
    use crate::libvirt::domain::{DomainView, parse_domain};
    let spec = VirtualMachineStorageSpec {
        vm: "vm".into(),
        node_name: None,
        type_: StorageType::Disk,
        bus: Bus::Virtio,
        source: Some(StorageSource {
            volume: Some(VolumeRef {
                pool: "p".into(),
                name: "o".into(),
                create: Some(VolumeCreate {
                    backing_volume: Some(BackingVolume {
                        pool: "g".into(),
                        name: "base".into(),
                    }),
                    ..create("1Gi")
                }),
            }),
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
    };
    let xml = parse_domain("<domain><devices></devices></domain>").unwrap();
    let observed = |overlay_header: Vec<u8>| Observed {
        node: "n1".into(),
        domain: Some(DomainView {
            active: true,
            persistent: true,
            live: Some(xml.clone()),
            config: xml.clone(),
        }),
        source: SourceFacts::Volume {
            pool: "p".into(),
            name: "o".into(),
            lookup: VolumeLookup::Found(VolumeSource {
                path: "/p/o".into(),
                pool_type: "dir".into(),
                is_file: true,
            }),
            file: Some(present("/p/o", Some(overlay_header))),
        },
        grants: Grants::open(),
        pools: vec![("p".into(), "/p".into()), ("g".into(), "/g".into())],
        backing: Some(facts(vec![present("/g/base", Some(sample(0, None)))])),
        ..Observed::default()
    };
    let prev = VirtualMachineStorageStatus::default();
    let plan = crate::agent::storage::plan::plan(
        &spec,
        &prev,
        "ua-vps-1",
        &observed(backed("/g/base", Some("qcow2"))),
    )
    .unwrap();
    for x in [&plan.xml, &plan.live_xml] {
        let doc = roxmltree::Document::parse(x).unwrap();
        let b = doc
            .descendants()
            .find(|n| n.has_tag_name("backingStore") && n.has_children())
            .unwrap();
        let src = b.children().find(|n| n.has_tag_name("source")).unwrap();
        assert_eq!(src.attribute("file"), Some("/g/base"), "{x}");
    }
    // An overlay of another image: the usual UnsafeImage refusal.
    let r = crate::agent::storage::plan::plan(
        &spec,
        &prev,
        "ua-vps-1",
        &observed(backed("/g/other", Some("qcow2"))),
    )
    .unwrap_err();
    assert_eq!(r.reason.as_str(), "UnsafeImage");
    // Without create.backingVolume, any backing file is still refused.
    let mut plain = spec.clone();
    if let Some(v) = plain
        .source
        .as_mut()
        .and_then(|s| s.volume.as_mut())
        .and_then(|v| v.create.as_mut())
    {
        v.backing_volume = None;
    }
    let obs = Observed {
        backing: None,
        ..observed(backed("/g/base", Some("qcow2")))
    };
    let r = crate::agent::storage::plan::plan(&plain, &prev, "ua-vps-1", &obs).unwrap_err();
    assert_eq!(r.reason.as_str(), "UnsafeImage");
}
