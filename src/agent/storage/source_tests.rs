use super::*;

fn present(real: &str, kind: FileKind, header: &[u8]) -> PathFacts {
    PathFacts {
        requested: real.into(),
        found: Found::Present {
            real: real.into(),
            kind: Ok(kind),
            header: Some(header.to_vec()),
        },
    }
}

fn allowed() -> Vec<PathBuf> {
    vec![PathBuf::from("/pool")]
}

fn open() -> Grants {
    Grants::open()
}

fn qcow2(backing: bool) -> Vec<u8> {
    crate::image::qcow2::sample(0, backing.then_some(&b"base.img"[..]))
}

#[test]
fn path_checks_table() {
    use StorageReason as R;
    let unreadable = PathFacts {
        requested: "/pool/x".into(),
        found: Found::Present {
            real: "/pool/x".into(),
            kind: Err("permission denied".into()),
            header: None,
        },
    };
    /// name, what is at the path, spec.format, and the format and blockness, or the reason.
    type Row = (
        &'static str,
        PathFacts,
        Option<DiskFormat>,
        Result<(&'static str, bool), StorageReason>,
    );
    let cases: Vec<Row> = vec![
        (
            "plain file",
            present("/pool/a.img", FileKind::File, b"data"),
            None,
            Ok(("raw", false)),
        ),
        (
            "qcow2 detected",
            present("/pool/a.q", FileKind::File, &qcow2(false)),
            None,
            Ok(("qcow2", false)),
        ),
        (
            "block device",
            present("/pool/dev", FileKind::Block, b""),
            None,
            Ok(("raw", true)),
        ),
        (
            "raw over a qcow2 header with backing",
            present("/pool/a.q", FileKind::File, &qcow2(true)),
            Some(DiskFormat::Raw),
            Err(R::UnsafeImage),
        ),
        (
            "raw declared, qcow2 found",
            present("/pool/a.q", FileKind::File, &qcow2(false)),
            Some(DiskFormat::Raw),
            Err(R::InvalidSpec),
        ),
        (
            "qcow2 declared and found",
            present("/pool/a.q", FileKind::File, &qcow2(false)),
            Some(DiskFormat::Qcow2),
            Ok(("qcow2", false)),
        ),
        (
            "backing chain",
            present("/pool/a.q", FileKind::File, &qcow2(true)),
            None,
            Err(R::UnsafeImage),
        ),
        (
            "external data file",
            present(
                "/pool/a.q",
                FileKind::File,
                &crate::image::qcow2::sample(1 << 2, None),
            ),
            Some(DiskFormat::Qcow2),
            Err(R::UnsafeImage),
        ),
        (
            "unknown incompatible feature on a block device",
            present(
                "/pool/dev",
                FileKind::Block,
                &crate::image::qcow2::sample(1 << 7, None),
            ),
            None,
            Err(R::UnsafeImage),
        ),
        (
            "qcow2 magic over a truncated header",
            present("/pool/a.q", FileKind::File, b"QFI\xfb\0\0\0\x03"),
            None,
            Err(R::UnsafeImage),
        ),
        (
            "qcow2 claimed, raw found",
            present("/pool/a.img", FileKind::File, b"data"),
            Some(DiskFormat::Qcow2),
            Err(R::InvalidSpec),
        ),
        (
            "outside",
            present("/etc/shadow", FileKind::File, b""),
            None,
            Err(R::PathNotAllowed),
        ),
        (
            "a directory",
            present("/pool/dir", FileKind::Other, b""),
            None,
            Err(R::InvalidSpec),
        ),
        ("unreadable", unreadable, None, Err(R::SourceNotFound)),
        (
            "relative",
            PathFacts {
                requested: "a.img".into(),
                found: Found::Relative,
            },
            None,
            Err(R::InvalidSpec),
        ),
        (
            "missing inside",
            PathFacts {
                requested: "/pool/m".into(),
                found: Found::Missing {
                    parent: Some("/pool".into()),
                },
            },
            None,
            Err(R::SourceNotFound),
        ),
        (
            "missing outside",
            PathFacts {
                requested: "/etc/m".into(),
                found: Found::Missing {
                    parent: Some("/etc".into()),
                },
            },
            None,
            Err(R::PathNotAllowed),
        ),
        (
            "missing parent",
            PathFacts {
                requested: "/nope/m".into(),
                found: Found::Missing { parent: None },
            },
            None,
            Err(R::PathNotAllowed),
        ),
    ];
    for (name, facts, format, want) in cases {
        let got = check_path(&facts, &allowed(), &open(), format)
            .map(|r| (r.format, r.block))
            .map_err(|r| r.reason);
        assert_eq!(
            got.as_ref().map(|(f, b)| (f.as_str(), *b)).map_err(|r| *r),
            want,
            "{name}"
        );
    }
}

#[test]
fn not_allowed_lists_no_directory_of_the_node() {
    let r = check_path(
        &present("/etc/shadow", FileKind::File, b""),
        &allowed(),
        &open(),
        None,
    )
    .unwrap_err();
    assert_eq!(r.reason, StorageReason::PathNotAllowed);
    assert!(
        r.message.starts_with("/etc/shadow is outside") && r.message.contains("--allowed-path"),
        "{}",
        r.message
    );
    assert!(
        !r.message.contains("/pool"),
        "a pool directory: {}",
        r.message
    );
}

#[test]
fn an_inactive_pool_reads_as_a_missing_volume() {
    let facts = SourceFacts::Volume {
        pool: "p".into(),
        name: "v".into(),
        lookup: VolumeLookup::PoolInactive,
        file: None,
    };
    let r = resolve(&facts, &allowed(), &open(), None, "n1").unwrap_err();
    assert_eq!(r.reason, StorageReason::SourceNotFound);
    assert!(r.message.contains("vol-list"), "{}", r.message);
}

#[test]
fn a_completed_download_on_this_node_is_used() {
    let facts = SourceFacts::Iso {
        name: "dl".into(),
        iso: Some(IsoFacts {
            phase: Some(DownloadPhase::Completed),
            node: Some("n1".into()),
            pool: "p".into(),
            file: Some(present("/pool/a.iso", FileKind::File, b"CD001")),
        }),
    };
    let r = resolve(&facts, &allowed(), &open(), None, "n1")
        .unwrap()
        .unwrap();
    assert_eq!(r.path, PathBuf::from("/pool/a.iso"));
    assert_eq!(
        resolve(&SourceFacts::None, &allowed(), &open(), None, "n1"),
        Ok(None)
    );
}

#[test]
fn a_volume_resolves_to_its_file() {
    let facts = SourceFacts::Volume {
        pool: "p".into(),
        name: "v".into(),
        lookup: VolumeLookup::Found(crate::libvirt::volume::VolumeSource {
            path: "/pool/v.img".into(),
            pool_type: "dir".into(),
            is_file: true,
        }),
        file: Some(present("/pool/v.img", FileKind::File, b"")),
    };
    let r = resolve(&facts, &allowed(), &open(), None, "n1")
        .unwrap()
        .unwrap();
    assert_eq!(
        (r.path, r.format.as_str()),
        (PathBuf::from("/pool/v.img"), "raw")
    );
}

#[test]
fn an_empty_source_says_it_is_empty() {
    let r = resolve(&SourceFacts::Empty, &allowed(), &open(), None, "n1").unwrap_err();
    assert_eq!(r.reason, StorageReason::InvalidSpec);
    assert!(
        r.message.starts_with("spec.source is empty"),
        "{}",
        r.message
    );
    let r = resolve(&SourceFacts::Ambiguous, &allowed(), &open(), None, "n1").unwrap_err();
    assert!(r.message.starts_with("Set at most one"), "{}", r.message);
}

#[test]
fn unsafe_image_messages_name_the_finding_and_the_fix() {
    let header = crate::image::qcow2::sample(1 << 2 | 1 << 12, None);
    let r = check_path(
        &present("/pool/a.q", FileKind::File, &header),
        &allowed(),
        &open(),
        None,
    )
    .unwrap_err();
    assert_eq!(r.reason, StorageReason::UnsafeImage);
    assert!(
        r.message
            .starts_with("/pool/a.q is a qcow2 image with an external data file")
            && r.message.contains("feature bit(s) 12 ")
            && r.message.contains("qemu-img convert"),
        "{}",
        r.message
    );
}
