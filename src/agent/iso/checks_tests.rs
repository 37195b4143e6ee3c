use super::*;

pub(crate) fn pool(name: &str, type_: &str, active: bool) -> StoragePoolSummary {
    StoragePoolSummary {
        name: name.into(),
        type_: type_.into(),
        path: Some(format!("/pools/{name}")),
        capacity: 100,
        allocation: 10,
        available: 90,
        active,
    }
}

fn spec(url: &str, name: Option<&str>, pool: &str) -> IsoDownloadSpec {
    serde_json::from_value(serde_json::json!({"url": url, "pool": pool, "name": name})).unwrap()
}

#[test]
fn place_checks_url_name_and_pool_in_order() {
    let pools = [
        pool("p", "dir", true),
        pool("off", "dir", false),
        pool("lv", "logical", true),
    ];
    type Case<'a> = (
        &'a str,
        Option<&'a str>,
        &'a str,
        Result<&'a str, IsoReason>,
    );
    let cases: &[Case] = &[
        ("http://h/a.iso", None, "p", Ok("a.iso")),
        ("ftps://h/d/b.iso", Some("c.iso"), "p", Ok("c.iso")),
        (
            "http://h:99999/a.iso",
            None,
            "p",
            Err(IsoReason::InvalidUrl),
        ),
        ("file:///etc/passwd", None, "p", Err(IsoReason::InvalidUrl)),
        ("not a url", None, "p", Err(IsoReason::InvalidUrl)),
        ("http://h/", None, "p", Err(IsoReason::InvalidName)),
        (
            "http://h/a.iso",
            Some(".hidden"),
            "p",
            Err(IsoReason::InvalidName),
        ),
        (
            "http://h/a.iso",
            Some("a/b"),
            "p",
            Err(IsoReason::InvalidName),
        ),
        ("http://h/a.iso", None, "nope", Err(IsoReason::PoolNotFound)),
        ("http://h/a.iso", None, "off", Err(IsoReason::PoolNotFound)),
        ("http://h/a.iso", None, "lv", Err(IsoReason::PoolNotFound)),
        // The URL is checked before the pool.
        ("gopher://h/a.iso", None, "nope", Err(IsoReason::InvalidUrl)),
    ];
    for (url, name, p, want) in cases {
        let got = place(&spec(url, *name, p), &pools, "n1");
        match (got, want) {
            (Ok(pl), Ok(n)) => {
                assert_eq!(pl.name, *n, "{url}");
                assert_eq!(pl.dir, PathBuf::from("/pools/p"));
                assert_eq!(pl.available, 90);
            }
            (Err(r), Err(w)) => {
                assert_eq!(r.reason, *w, "{url} {name:?} {p}: {}", r.message);
                assert!(!r.message.is_empty());
            }
            (got, want) => panic!("{url} {name:?} {p}: {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn checksums_of_the_wrong_length_are_refused_up_front() {
    let with = |alg: &str, len: usize| {
        let mut s = spec("http://h/a.iso", None, "p");
        s.checksum =
            serde_json::from_value(serde_json::json!({"algorithm": alg, "value": "a".repeat(len)}))
                .unwrap();
        s
    };
    let pools = [pool("p", "dir", true)];
    for (alg, good) in [("sha256", 64), ("sha512", 128), ("sha1", 40), ("md5", 32)] {
        assert!(place(&with(alg, good), &pools, "n").is_ok(), "{alg}");
        for bad in [good - 1, good + 1, 32, 64, 128] {
            if bad == good {
                continue;
            }
            let e = place(&with(alg, bad), &pools, "n").unwrap_err();
            assert_eq!(e.reason, IsoReason::InvalidChecksum, "{alg} {bad}");
            assert!(
                e.message.contains(&format!("has {bad} hex digits")),
                "{}",
                e.message
            );
        }
    }
    // Before the pool: a bad checksum on a missing pool says what is wrong with it.
    let e = place(&with("sha256", 63), &[], "n").unwrap_err();
    assert_eq!(e.reason, IsoReason::InvalidChecksum);
}

#[test]
fn credentials_never_leave_the_url_for_status() {
    let table = [
        ("http://u:p@h/a.iso", "http://h/a.iso"),
        ("ftps://user@h:990/d/a.iso", "ftps://h:990/d/a.iso"),
        ("https://h/a.iso?x=1", "https://h/a.iso?x=1"),
        ("http://u:p@h:99999/a.iso", "http://h:99999/a.iso"),
        ("no url at all", "no url at all"),
    ];
    for (url, want) in table {
        assert_eq!(redact_url(url), want, "{url}");
    }
    let s = spec("http://u:secret@h:99999/a.iso", None, "p");
    let e = check_url(&s.url).unwrap_err();
    assert!(!e.message.contains("secret"), "{}", e.message);
    let t = target_of(&spec("https://u:secret@h/a.iso", None, "p"), "a.iso");
    assert_eq!(t.url, "https://h/a.iso");
    // The recorded (redacted) URL is the spec's own: no SpecChanged.
    assert_eq!(
        spec_change(&spec("https://u:secret@h/a.iso", None, "p"), Some(&t)),
        None
    );
}

#[test]
fn plain_text_credentials_need_consent() {
    let pools = [pool("p", "dir", true)];
    let with_auth = |url: &str, allow: bool| {
        let mut s = spec(url, None, "p");
        s.allow_plain_text_credentials = allow;
        s
    };
    let mut secret = with_auth("http://h/a.iso", false);
    secret.auth = serde_json::from_value(serde_json::json!({"secretRef": {"name": "s"}})).unwrap();
    let table: &[(IsoDownloadSpec, bool)] = &[
        (secret.clone(), false),
        (with_auth("http://u:p@h/a.iso", false), false),
        (with_auth("ftp://u:p@h/a.iso", false), false),
        (with_auth("http://u:p@h/a.iso", true), true),
        (with_auth("https://u:p@h/a.iso", false), true),
        (with_auth("ftps://u:p@h/a.iso", false), true),
        (with_auth("ftp://h/a.iso", false), true),
        (with_auth("http://h/a.iso", false), true),
    ];
    for (s, ok) in table {
        let got = place(s, &pools, "n");
        assert_eq!(got.is_ok(), *ok, "{} {:?}", s.url, got.err());
        if let Err(e) = got {
            assert_eq!(e.reason, IsoReason::CredentialsNotAllowed);
            assert!(!e.message.contains("u:p"), "{}", e.message);
        }
    }
}

#[test]
fn pool_messages_name_the_node() {
    let e = pool_dir(&[], "x", "n7").unwrap_err();
    assert!(e.message.contains("n7") && e.message.contains("does not exist"));
    let e = pool_dir(&[pool("x", "dir", false)], "x", "n7").unwrap_err();
    assert!(e.message.contains("virsh pool-start x"), "{}", e.message);
}

#[test]
fn space_counts_only_the_missing_bytes() {
    // (total, kept, available, others, floor, fits)
    type Row = (Option<u64>, u64, u64, u64, u64, bool);
    let table: &[Row] = &[
        (None, 0, 1, 0, 0, true),
        (None, 0, 10, 0, 10, false),
        (None, 0, 10, 5, 4, true),
        (Some(100), 0, 100, 0, 0, true),
        (Some(100), 0, 99, 0, 0, false),
        (Some(100), 60, 40, 0, 0, true),
        (Some(100), 60, 39, 0, 0, false),
        (Some(100), 200, 0, 0, 0, true),
        // Others' reservations and the floor count.
        (Some(100), 0, 200, 100, 0, true),
        (Some(100), 0, 200, 101, 0, false),
        (Some(100), 0, 200, 50, 50, true),
        (Some(100), 0, 200, 50, 51, false),
    ];
    for (total, kept, available, others, floor, ok) in table {
        let space = Space {
            total: *total,
            kept: *kept,
            available: *available,
            floor: *floor,
            pool: "p",
        };
        let r = space.check(*others);
        assert_eq!(
            r.is_ok(),
            *ok,
            "{total:?} {kept} {available} {others} {floor}"
        );
        if let Err(e) = r {
            assert_eq!(e.reason, IsoReason::InsufficientSpace);
            assert!(e.message.contains("pool p"), "{}", e.message);
        }
    }
}

#[test]
fn spec_changes_name_the_field() {
    let recorded = DownloadTarget {
        url: "http://h/a.iso".into(),
        pool: "p".into(),
        name: "a.iso".into(),
    };
    let table: &[(IsoDownloadSpec, Option<&str>)] = &[
        (spec("http://h/a.iso", None, "p"), None),
        (spec("http://h/a.iso", Some("a.iso"), "p"), None),
        (
            spec("http://h/b.iso", Some("a.iso"), "p"),
            Some("spec.url changed"),
        ),
        (spec("http://h/a.iso", None, "q"), Some("spec.pool changed")),
        (
            spec("http://h/a.iso", Some("b.iso"), "p"),
            Some("The volume name changed"),
        ),
    ];
    for (s, want) in table {
        let got = spec_change(s, Some(&recorded));
        assert_eq!(
            got.as_deref()
                .map(|g| g.split(" from ").next().unwrap_or_default()),
            *want,
            "{s:?}"
        );
    }
    assert_eq!(spec_change(&spec("http://h/b.iso", None, "q"), None), None);
}

#[test]
fn the_request_carries_owner_and_checksum() {
    let mut s = spec("http://h/a.iso", None, "p");
    s.checksum =
        serde_json::from_value(serde_json::json!({"algorithm": "sha256", "value": "ab"})).unwrap();
    let r = own_request(&s, Some("uid".into()), Path::new("/d"), "a.iso");
    assert_eq!(r.owner.as_deref(), Some("uid"));
    assert_eq!(r.dir, PathBuf::from("/d"));
    let c = r.checksum.unwrap();
    assert_eq!(
        (c.algorithm, c.hex.as_str()),
        (download::ChecksumAlgorithm::Sha256, "ab")
    );
}
