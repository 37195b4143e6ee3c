use std::io::Write;

use super::*;

/// Deterministic data that compresses somewhat (runs of a byte between noise).
fn data(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|i| {
            if i % 4096 < 2048 {
                (i / 4096) as u8
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

fn compress(c: Compression, raw: &[u8]) -> Vec<u8> {
    match c {
        Compression::Xz => {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
            e.write_all(raw).unwrap();
            e.finish().unwrap()
        }
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(raw).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => {
            // With a content checksum, as the zstd tool writes by default.
            let mut e = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
            e.include_checksum(true).unwrap();
            e.write_all(raw).unwrap();
            e.finish().unwrap()
        }
    }
}

const ALL: [Compression; 3] = [Compression::Xz, Compression::Gzip, Compression::Zstd];

fn config(dir: &Path, max: Option<u64>) -> DecodeConfig {
    DecodeConfig {
        out: dir.join(".x.part.out"),
        url: "http://h/x".into(),
        max_bytes: max,
        min_free_bytes: None,
    }
}

/// Feeds `bytes` in `chunk`-sized pieces, then finishes.
fn decode(cfg: DecodeConfig, bytes: &[u8], chunk: usize) -> Result<Option<Decoded>, DownloadError> {
    let mut d = Decode::Pending(cfg, Vec::new());
    for piece in bytes.chunks(chunk) {
        d.feed(piece)?;
    }
    d.decide()?;
    d.active().map(|a| a.finish()).transpose()
}

#[test]
fn compression_by_magic_bytes_only() {
    let cases: &[(&[u8], Option<Compression>)] = &[
        (b"\xfd7zXZ\0\0\x04", Some(Compression::Xz)),
        (b"\x1f\x8b\x08\0", Some(Compression::Gzip)),
        (b"\x28\xb5\x2f\xfd\x04", Some(Compression::Zstd)),
        (b"QFI\xfb\0\0\0\x03", None),
        (b"\x1f\x8b\x07", None),
        (b"\xfd7zX", None),
        (b"", None),
        (&[0u8; 64], None),
    ];
    for (head, want) in cases {
        assert_eq!(Compression::detect(head), *want, "{head:?}");
    }
    assert_eq!(Compression::Gzip.to_string(), "gzip");
    assert_eq!(
        serde_json::to_string(&Compression::Zstd).unwrap(),
        "\"zstd\""
    );
}

#[test]
fn each_format_decodes_in_any_chunking() {
    let dir = tempfile::tempdir().unwrap();
    let raw = data(300_000);
    for c in ALL {
        let packed = compress(c, &raw);
        for chunk in [1, 5, 7, 4096, 1 << 20] {
            if chunk == 1 && packed.len() > 100_000 {
                continue;
            }
            let d = decode(config(dir.path(), None), &packed, chunk)
                .unwrap()
                .unwrap();
            assert_eq!(d.compression, c);
            assert_eq!(d.len, raw.len() as u64);
            assert_eq!(
                std::fs::read(&d.path).unwrap(),
                raw,
                "{c} in {chunk}-byte pieces"
            );
        }
    }
}

#[test]
fn concatenated_streams_decode_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (data(10_000), data(20_000));
    for c in ALL {
        let mut packed = compress(c, &a);
        packed.extend(compress(c, &b));
        let d = decode(config(dir.path(), None), &packed, 999)
            .unwrap()
            .unwrap();
        assert_eq!(
            std::fs::read(&d.path).unwrap(),
            [a.clone(), b.clone()].concat(),
            "{c}"
        );
    }
}

#[test]
fn plain_and_short_data_are_not_decoded() {
    let dir = tempfile::tempdir().unwrap();
    for bytes in [&data(10_000)[..], b"QFI\xfb", b"", b"\x1f"] {
        assert!(
            decode(config(dir.path(), None), bytes, 3)
                .unwrap()
                .is_none()
        );
    }
    assert!(!dir.path().join(".x.part.out").exists());
}

#[test]
fn truncated_and_corrupt_streams_are_corrupt_images() {
    let dir = tempfile::tempdir().unwrap();
    let raw = data(200_000);
    for c in ALL {
        let packed = compress(c, &raw);
        let cut = &packed[..packed.len() * 2 / 3];
        match decode(config(dir.path(), None), cut, 4096) {
            Err(DownloadError::CorruptImage {
                compression,
                detail,
                ..
            }) => {
                assert_eq!(compression, c.as_str());
                assert!(detail.contains("truncated"), "{c}: {detail}");
            }
            other => panic!("{c} truncated: {other:?}"),
        }
        let mut bad = packed.clone();
        for b in &mut bad[40..packed.len() / 2] {
            *b ^= 0x5a;
        }
        let e = decode(config(dir.path(), None), &bad, 4096).unwrap_err();
        assert_eq!(e.reason(), "CorruptImage", "{c}: {e}");
        assert!(is_fatal(&e));
    }
}

#[test]
fn a_bomb_stops_at_the_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    // 64 MiB of zeros compress to a few KiB.
    let zeros = vec![0u8; 64 << 20];
    for c in ALL {
        let packed = compress(c, &zeros);
        assert!(packed.len() < 1 << 20, "{c}: {}", packed.len());
        let e = decode(config(dir.path(), Some(1 << 20)), &packed, 4096).unwrap_err();
        assert!(
            matches!(e, DownloadError::TooLarge { limit, .. } if limit == 1 << 20),
            "{c}: {e}"
        );
        let written = std::fs::metadata(dir.path().join(".x.part.out"))
            .unwrap()
            .len();
        assert!(
            written <= 1 << 20,
            "{c}: wrote {written} bytes past the limit"
        );
    }
}

#[test]
fn resuming_rebuilds_the_decoder_from_the_kept_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = data(500_000);
    let token = CancellationToken::new();
    for c in ALL {
        let packed = compress(c, &raw);
        let partial = dir.path().join("partial");
        for offset in [1, 6, packed.len() / 3, packed.len() - 1] {
            std::fs::write(&partial, &packed[..offset]).unwrap();
            // A stale decoded file from before the crash is rewritten.
            std::fs::write(dir.path().join(".x.part.out"), b"stale").unwrap();
            let file = File::open(&partial).unwrap();
            let mut d = resume(
                config(dir.path(), None),
                &file,
                &partial,
                offset as u64,
                1000,
                &token,
            )
            .unwrap()
            .unwrap();
            for piece in packed[offset..].chunks(777) {
                d.feed(piece).unwrap();
            }
            d.decide().unwrap();
            let out = d.active().unwrap().finish().unwrap();
            assert_eq!(std::fs::read(&out.path).unwrap(), raw, "{c} from {offset}");
        }
    }
    // Plain data resumes as plain; a cancelled rebuild says so.
    let partial = dir.path().join("plain");
    std::fs::write(&partial, data(100)).unwrap();
    let file = File::open(&partial).unwrap();
    let d = resume(config(dir.path(), None), &file, &partial, 100, 1000, &token).unwrap();
    assert!(matches!(d, Some(Decode::Plain)));
    let packed = compress(Compression::Xz, &raw);
    std::fs::write(&partial, &packed).unwrap();
    let file = File::open(&partial).unwrap();
    let cancelled = CancellationToken::new();
    cancelled.cancel();
    let d = resume(
        config(dir.path(), None),
        &file,
        &partial,
        packed.len() as u64,
        1000,
        &cancelled,
    )
    .unwrap();
    assert!(d.is_none());
}

#[test]
fn output_limits() {
    let max = OutLimits {
        max_bytes: Some(100),
    };
    assert!(max.check(100).is_ok());
    assert!(matches!(max.check(101), Err(OutLimit::TooLarge(100))));
    assert!(OutLimits { max_bytes: None }.check(u64::MAX).is_ok());
}

#[test]
fn a_full_pool_stops_decoding_at_the_writers_floor() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DecodeConfig {
        min_free_bytes: Some(u64::MAX / 2),
        ..config(dir.path(), None)
    };
    let packed = compress(Compression::Gzip, &data(10_000));
    let e = decode(cfg, &packed, 4096).unwrap_err();
    // The same error as the data as served reaching the floor, and kept like it.
    assert!(
        matches!(&e, DownloadError::BelowFloor { path, floor, .. }
            if *floor == u64::MAX / 2 && path.ends_with(".x.part.out")),
        "{e}"
    );
    assert_eq!(e.reason(), "InsufficientSpace");
    assert!(!is_fatal(&e), "the floor keeps the data");
}

#[test]
fn dropping_a_decoder_mid_stream_returns() {
    let dir = tempfile::tempdir().unwrap();
    let raw = data(2_000_000);
    for c in ALL {
        let packed = compress(c, &raw);
        let cfg = config(dir.path(), None);
        let (tx, rx) = std::sync::mpsc::channel();
        let half = packed[..packed.len() / 2].to_vec();
        std::thread::spawn(move || {
            let mut d = Decode::Pending(cfg, Vec::new());
            d.feed(&half).unwrap();
            drop(d.active());
            tx.send(()).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{c}: dropping a decoder mid-stream hangs"));
    }
}
