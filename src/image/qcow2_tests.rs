use super::*;

/// A version 3 header of a 64 KiB-cluster image, padded to the full first cluster, with
/// `extensions` ((type, data)) after the fixed header and the end marker.
fn v3(incompatible: u64, extensions: &[(u32, &[u8])]) -> Vec<u8> {
    let mut h = sample(incompatible, None);
    let mut at = 112;
    for (kind, data) in extensions {
        h[at..at + 4].copy_from_slice(&kind.to_be_bytes());
        h[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
        h[at + 8..at + 8 + data.len()].copy_from_slice(data);
        at += 8 + data.len().div_ceil(8) * 8;
    }
    h
}

/// `h` with a backing file name `name` at offset 4096.
fn with_backing(mut h: Vec<u8>, name: &[u8]) -> Vec<u8> {
    h[8..16].copy_from_slice(&4096u64.to_be_bytes());
    h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    h[4096..4096 + name.len()].copy_from_slice(name);
    h
}

#[test]
fn parses_a_plain_v3_header() {
    let h = parse(&v3(0, &[])).unwrap().unwrap();
    assert_eq!(
        h,
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            ..Header::default()
        }
    );
    assert_eq!(judge(&v3(0, &[])), Verdict::Safe(h));
}

#[test]
fn no_magic_is_not_qcow2() {
    for bytes in [&b""[..], b"QFI", b"\x7fELF....", &[0u8; 512]] {
        assert_eq!(parse(bytes), Ok(None));
        assert_eq!(judge(bytes), Verdict::NotQcow2);
        assert!(!judge(bytes).is_qcow2());
        assert_eq!(judge(bytes).refusal(), None);
    }
}

#[test]
fn reads_the_data_file_and_backing_format_extensions() {
    let h = v3(
        INCOMPAT_DATA_FILE,
        &[(0xe279_2aca, b"raw"), (0x4441_5441, b"/dev/sda")],
    );
    let parsed = parse(&with_backing(h.clone(), b"base.img"))
        .unwrap()
        .unwrap();
    assert_eq!(parsed.data_file.as_deref(), Some(&b"/dev/sda"[..]));
    assert_eq!(parsed.backing_format.as_deref(), Some("raw"));
    assert_eq!(parsed.backing_file.as_deref(), Some(&b"base.img"[..]));
    assert_eq!(findings(&parsed), [Finding::DataFile, Finding::BackingFile]);
}

#[test]
fn findings_table() {
    type Row = (&'static str, Vec<u8>, Vec<Finding>);
    let rows: Vec<Row> = vec![
        ("plain", v3(0, &[]), vec![]),
        ("dirty is understood", v3(INCOMPAT_DIRTY, &[]), vec![]),
        (
            "zstd and subclusters are understood",
            v3(INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2, &[]),
            vec![],
        ),
        (
            "data file bit",
            v3(INCOMPAT_DATA_FILE, &[]),
            vec![Finding::DataFile],
        ),
        (
            "data file name without the bit",
            v3(0, &[(0x4441_5441, b"/etc/shadow")]),
            vec![Finding::DataFile],
        ),
        (
            "unknown bit 5",
            v3(1 << 5, &[]),
            vec![Finding::UnknownFeatures(1 << 5)],
        ),
        (
            "unknown high bits",
            v3((1 << 63) | (1 << 40) | INCOMPAT_DIRTY, &[]),
            vec![Finding::UnknownFeatures((1 << 63) | (1 << 40))],
        ),
        ("corrupt", v3(INCOMPAT_CORRUPT, &[]), vec![Finding::Corrupt]),
        (
            "backing file",
            with_backing(v3(0, &[]), b"/var/lib/libvirt/images/other.qcow2"),
            vec![Finding::BackingFile],
        ),
        (
            "an unknown extension is skipped",
            v3(0, &[(0x1234_5678, b"whatever"), (0x6803_f857, &[0; 48])]),
            vec![],
        ),
    ];
    for (name, bytes, want) in rows {
        let h = parse(&bytes).unwrap().unwrap();
        assert_eq!(findings(&h), want, "{name}");
    }
}

#[test]
fn encrypted_and_v2_headers() {
    let mut h = v3(0, &[]);
    h[32..36].copy_from_slice(&2u32.to_be_bytes());
    assert_eq!(judge(&h), Verdict::Unsafe(vec![Finding::Encrypted]));
    // Version 2: no feature bits; extensions start at 72.
    let mut v2 = vec![0u8; 4096];
    v2[..4].copy_from_slice(MAGIC);
    v2[4..8].copy_from_slice(&2u32.to_be_bytes());
    v2[20..24].copy_from_slice(&12u32.to_be_bytes());
    let h = parse(&v2).unwrap().unwrap();
    assert_eq!((h.version, h.incompatible), (2, 0));
    assert_eq!(judge(&v2), Verdict::Safe(h));
}

#[test]
fn malformed_headers_are_refused_not_parsed() {
    let mut bad_version = v3(0, &[]);
    bad_version[4..8].copy_from_slice(&4u32.to_be_bytes());
    let mut bad_cluster = v3(0, &[]);
    bad_cluster[20..24].copy_from_slice(&30u32.to_be_bytes());
    let mut bad_len = v3(0, &[]);
    bad_len[100..104].copy_from_slice(&50u32.to_be_bytes());
    let mut long_name = v3(0, &[]);
    long_name[8..16].copy_from_slice(&4096u64.to_be_bytes());
    long_name[16..20].copy_from_slice(&5000u32.to_be_bytes());
    let mut name_past_cluster = v3(0, &[]);
    name_past_cluster[8..16].copy_from_slice(&(1u64 << 20).to_be_bytes());
    name_past_cluster[16..20].copy_from_slice(&8u32.to_be_bytes());
    let mut ext_too_long = v3(0, &[]);
    ext_too_long[112..116].copy_from_slice(&0x4441_5441u32.to_be_bytes());
    ext_too_long[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
    let mut no_end = v3(0, &[]);
    for at in (112..no_end.len()).step_by(8) {
        no_end[at..at + 4].copy_from_slice(&0x1111_1111u32.to_be_bytes());
    }
    type Row = (&'static str, Vec<u8>, Qcow2Error);
    let rows: Vec<Row> = vec![
        ("short", MAGIC.to_vec(), Qcow2Error::Truncated(4)),
        (
            "v3 too short",
            v3(0, &[])[..80].to_vec(),
            Qcow2Error::Truncated(80),
        ),
        ("version", bad_version, Qcow2Error::Version(4)),
        ("cluster bits", bad_cluster, Qcow2Error::ClusterBits(30)),
        ("header length", bad_len, Qcow2Error::HeaderLength(50)),
        ("long backing name", long_name, Qcow2Error::BackingName),
        (
            "name past the cluster",
            name_past_cluster,
            Qcow2Error::BackingName,
        ),
        ("extension too long", ext_too_long, Qcow2Error::Extensions),
        (
            "extensions cut off by the read",
            v3(0, &[])[..116].to_vec(),
            Qcow2Error::Extensions,
        ),
    ];
    // Extensions that fill the cluster exactly without an end marker: QEMU stops at the end.
    assert!(parse(&no_end).unwrap().is_some());
    for (name, bytes, want) in rows {
        assert_eq!(parse(&bytes), Err(want.clone()), "{name}");
        let verdict = judge(&bytes);
        assert!(verdict.is_qcow2(), "{name}");
        assert!(
            verdict
                .refusal()
                .unwrap()
                .starts_with("a malformed qcow2 image"),
            "{name}"
        );
    }
}

#[test]
fn extensions_stop_at_the_backing_name() {
    // No end marker, but the backing name follows the fixed header at once: QEMU stops there.
    let mut h = v3(0, &[]);
    h[8..16].copy_from_slice(&112u64.to_be_bytes());
    h[16..20].copy_from_slice(&4u32.to_be_bytes());
    h[112..116].copy_from_slice(b"base");
    let parsed = parse(&h).unwrap().unwrap();
    assert_eq!(parsed.backing_file.as_deref(), Some(&b"base"[..]));
}

#[test]
fn refusal_messages_name_what_was_found_and_never_the_names() {
    let h = with_backing(
        v3(INCOMPAT_DATA_FILE | (1 << 9), &[(0x4441_5441, b"/dev/sdb")]),
        b"/srv/tenant-b/secret.qcow2",
    );
    let message = judge(&h).refusal().unwrap();
    assert!(message.contains("an external data file"), "{message}");
    assert!(message.contains("a backing file"), "{message}");
    assert!(message.contains("feature bit(s) 9 "), "{message}");
    assert!(!message.contains("/dev/sdb"), "{message}");
    assert!(!message.contains("tenant-b"), "{message}");
}

#[test]
fn reads_the_first_cluster_only_for_qcow2() {
    let mut image = v3(0, &[]);
    image.extend_from_slice(&[7u8; 1 << 16]);
    let read = read_from(&image[..]).unwrap();
    assert_eq!(read.len(), 1 << 16);
    assert_eq!(judge(&read), judge(&v3(0, &[])));
    let raw = vec![1u8; 1 << 20];
    assert_eq!(read_from(&raw[..]).unwrap().len(), 112);
    assert_eq!(read_from(&b"QFI"[..]).unwrap(), b"QFI");
}
