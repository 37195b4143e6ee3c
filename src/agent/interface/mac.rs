//! MAC addresses: validation and allocation (pure, apart from the allocator's random seed).

use std::hash::{BuildHasher, Hasher};

/// Checks a MAC address is well-formed and unicast; returns it in lower case.
pub fn valid_mac(mac: &str) -> Result<String, String> {
    let parts: Vec<&str> = mac.split(':').collect();
    let bytes: Option<Vec<u8>> = parts
        .iter()
        .map(|p| u8::from_str_radix(p, 16).ok().filter(|_| p.len() == 2))
        .collect();
    match bytes {
        Some(b) if b.len() == 6 => {
            if b[0] & 1 == 1 {
                Err(format!(
                    "MAC {mac} is a multicast address; a NIC needs a unicast one (even first byte)."
                ))
            } else if b.iter().all(|x| *x == 0) {
                Err(format!("MAC {mac} is all zeros."))
            } else {
                Ok(mac.to_ascii_lowercase())
            }
        }
        _ => Err(format!("MAC {mac} is not six colon-separated hex pairs.")),
    }
}

/// A random MAC in QEMU's range `52:54:00:xx:xx:xx`, not in `used`.
pub fn allocate_mac(used: &[String]) -> String {
    let state = std::hash::RandomState::new();
    for attempt in 0u32.. {
        let mut h = state.build_hasher();
        h.write_u32(attempt);
        let v = h.finish();
        let mac = format!(
            "52:54:00:{:02x}:{:02x}:{:02x}",
            (v >> 16) & 0xff,
            (v >> 8) & 0xff,
            v & 0xff
        );
        if !used.contains(&mac) {
            return mac;
        }
    }
    unreachable!("an unbounded range always yields")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_must_be_unicast_and_well_formed() {
        assert_eq!(valid_mac("52:54:00:AB:cd:01").unwrap(), "52:54:00:ab:cd:01");
        assert!(
            valid_mac("01:00:5e:00:00:01")
                .unwrap_err()
                .contains("multicast")
        );
        assert!(
            valid_mac("00:00:00:00:00:00")
                .unwrap_err()
                .contains("zeros")
        );
        assert!(valid_mac("52:54:00:00:01").is_err());
        assert!(valid_mac("52:54:00:0:001:01").is_err());
        assert!(valid_mac("52:54:00:zz:00:01").is_err());
    }

    #[test]
    fn allocated_macs_are_in_the_qemu_range_and_unused() {
        let used: Vec<String> = (0..50).map(|_| allocate_mac(&[])).collect();
        let mac = allocate_mac(&used);
        assert!(mac.starts_with("52:54:00:"));
        assert!(!used.contains(&mac));
        assert!(valid_mac(&mac).is_ok());
    }
}
