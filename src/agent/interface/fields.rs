//! The rule for every field of `VMInterface.spec` (pure): what the spec wants, how it differs
//! from an `<interface>` libvirt has, and which outcome each difference gets: changed in the
//! running guest, written for the next boot, or refused.

use super::reason::{Reason, Refusal};
use crate::api::{self, InterfaceType, VMInterfaceSpec};
use crate::libvirt::nic::{Bandwidth, NicSettings, Rate};

/// What a changed field gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Changed in the running guest and the definition.
    Live,
    /// Written to the definition; the running guest has it after its next boot.
    NextBoot,
    /// Cannot change without replacing the interface: refused (`FieldImmutable`).
    Immutable,
}

/// The spec fields compared with libvirt, in the order messages list them.
pub const FIELDS: &[&str] = &[
    "type",
    "source",
    "model",
    "linkState",
    "mtu",
    "queues",
    "bootOrder",
    "bandwidth",
];

/// The outcome of a change of `field` on an interface of type `type_`.
pub fn outcome(field: &str, type_: InterfaceType) -> Outcome {
    match field {
        "type" => Outcome::Immutable,
        "linkState" | "bandwidth" => Outcome::Live,
        // QEMU reconnects the tap to another network or bridge in place; a macvtap is a new
        // host device.
        "source" if matches!(type_, InterfaceType::Network | InterfaceType::Bridge) => {
            Outcome::Live
        }
        _ => Outcome::NextBoot,
    }
}

/// The spec's fields that differ between `want` and `have`, in [`FIELDS`] order.
pub fn changed(want: &NicSettings, have: &NicSettings) -> Vec<&'static str> {
    FIELDS
        .iter()
        .copied()
        .filter(|f| match *f {
            "type" => want.type_ != have.type_,
            "source" => want.source != have.source,
            "model" => want.model != have.model,
            "linkState" => want.link_down != have.link_down,
            "mtu" => want.mtu != have.mtu,
            "queues" => want.queues != have.queues,
            // Unset leaves the order the definition has (one a conversion of `<os><boot dev>`
            // gave it keeps the NIC bootable).
            "bootOrder" => want.boot_order.is_some() && want.boot_order != have.boot_order,
            _ => want.bandwidth != have.bandwidth,
        })
        .collect()
}

/// `spec.bandwidth` in libvirt's terms.
pub fn to_libvirt(b: Option<&api::Bandwidth>) -> Bandwidth {
    let rate = |l: &api::BandwidthLimit| Rate {
        average: l.average,
        peak: l.peak,
        burst: l.burst,
    };
    Bandwidth {
        inbound: b.and_then(|b| b.inbound.as_ref()).map(rate),
        outbound: b.and_then(|b| b.outbound.as_ref()).map(rate),
    }
}

/// libvirt's bandwidth for `status.bandwidth`; `None` when unlimited.
pub fn to_api(b: &Bandwidth) -> Option<api::Bandwidth> {
    let limit = |r: &Rate| api::BandwidthLimit {
        average: r.average,
        peak: r.peak,
        burst: r.burst,
    };
    (b.inbound.is_some() || b.outbound.is_some()).then(|| api::Bandwidth {
        inbound: b.inbound.as_ref().map(limit),
        outbound: b.outbound.as_ref().map(limit),
    })
}

fn fix(message: String) -> Refusal {
    Refusal::fix(Reason::InvalidSpec, message)
}

/// Refuses tuning values libvirt or QEMU would refuse, before anything is written; the schema
/// already refuses zero and negative numbers.
pub fn validate(spec: &VMInterfaceSpec) -> Result<(), Refusal> {
    if let Some(q) = spec.queues
        && spec.model != "virtio"
    {
        return Err(fix(format!(
            "spec.queues ({q}) needs model virtio (multiqueue virtio-net); the model is {}. Set spec.model to virtio or remove spec.queues.",
            spec.model
        )));
    }
    let Some(bw) = &spec.bandwidth else {
        return Ok(());
    };
    if spec.type_ == InterfaceType::User {
        return Err(fix(
            "spec.bandwidth is not supported on a user-mode interface (libvirt shapes traffic on the host's tap device); remove spec.bandwidth or use another type.".into(),
        ));
    }
    for (dir, limit) in [("inbound", &bw.inbound), ("outbound", &bw.outbound)] {
        let Some(l) = limit else { continue };
        if let Some(peak) = l.peak
            && peak < l.average
        {
            return Err(fix(format!(
                "spec.bandwidth.{dir}.peak ({peak} KiB/s) is below spec.bandwidth.{dir}.average ({} KiB/s); raise the peak or lower the average.",
                l.average
            )));
        }
    }
    Ok(())
}

/// The refusal of a change of immutable `field`, naming what the interface is.
pub fn immutable(field: &str, have: &NicSettings) -> Refusal {
    Refusal::fix(
        Reason::FieldImmutable,
        format!(
            "spec.{field} is immutable: the interface is of type {}. Set spec.{field} back, or delete this object and create a new one. Nothing was changed.",
            have.type_
        ),
    )
}

/// The settings the spec asks for, given its resolved source and link state.
pub fn wanted(spec: &VMInterfaceSpec, source: Option<String>, link_down: bool) -> NicSettings {
    NicSettings {
        type_: super::plan::type_name(spec.type_).to_string(),
        source,
        model: Some(spec.model.clone()),
        link_down,
        mtu: spec.mtu,
        queues: spec.queues,
        boot_order: spec.boot_order,
        bandwidth: to_libvirt(spec.bandwidth.as_ref()),
    }
}

/// `a, b and c`.
pub fn list(fields: &[&str]) -> String {
    match fields {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_has_one_outcome_per_type() {
        use InterfaceType::*;
        type Case = (&'static str, [Outcome; 4]);
        let (l, n, i) = (Outcome::Live, Outcome::NextBoot, Outcome::Immutable);
        // Columns: network, bridge, direct, user.
        let table: Vec<Case> = vec![
            ("type", [i, i, i, i]),
            ("source", [l, l, n, n]),
            ("model", [n, n, n, n]),
            ("linkState", [l, l, l, l]),
            ("mtu", [n, n, n, n]),
            ("queues", [n, n, n, n]),
            ("bootOrder", [n, n, n, n]),
            ("bandwidth", [l, l, l, l]),
        ];
        assert_eq!(
            table.iter().map(|(f, _)| *f).collect::<Vec<_>>(),
            FIELDS,
            "every field is in the table"
        );
        for (field, want) in table {
            for (t, w) in [Network, Bridge, Direct, User].into_iter().zip(want) {
                assert_eq!(outcome(field, t), w, "{field} on {t:?}");
            }
        }
    }

    #[test]
    fn each_field_is_told_apart() {
        let base = NicSettings {
            type_: "network".into(),
            source: Some("default".into()),
            model: Some("virtio".into()),
            ..Default::default()
        };
        let edits: Vec<(&str, NicSettings)> = vec![
            (
                "type",
                NicSettings {
                    type_: "bridge".into(),
                    ..base.clone()
                },
            ),
            (
                "source",
                NicSettings {
                    source: Some("other".into()),
                    ..base.clone()
                },
            ),
            (
                "model",
                NicSettings {
                    model: Some("e1000e".into()),
                    ..base.clone()
                },
            ),
            (
                "linkState",
                NicSettings {
                    link_down: true,
                    ..base.clone()
                },
            ),
            (
                "mtu",
                NicSettings {
                    mtu: Some(1400),
                    ..base.clone()
                },
            ),
            (
                "queues",
                NicSettings {
                    queues: Some(2),
                    ..base.clone()
                },
            ),
            (
                "bootOrder",
                NicSettings {
                    boot_order: Some(1),
                    ..base.clone()
                },
            ),
            (
                "bandwidth",
                NicSettings {
                    bandwidth: Bandwidth {
                        inbound: Some(Rate {
                            average: 1,
                            ..Default::default()
                        }),
                        outbound: None,
                    },
                    ..base.clone()
                },
            ),
        ];
        for (field, edited) in edits {
            assert_eq!(changed(&edited, &base), [field]);
        }
        assert!(changed(&base, &base).is_empty());
    }

    #[test]
    fn bad_tuning_is_refused_with_the_field_named() {
        let spec = |v: serde_json::Value| -> VMInterfaceSpec {
            let mut base = serde_json::json!({"vm": "vm", "type": "network"});
            if let (Some(b), Some(e)) = (base.as_object_mut(), v.as_object()) {
                b.extend(e.clone());
            }
            serde_json::from_value(base).unwrap()
        };
        let cases = [
            (
                serde_json::json!({"model": "e1000e", "queues": 2}),
                Some("spec.queues"),
            ),
            (serde_json::json!({"queues": 2}), None),
            (
                serde_json::json!({"bandwidth": {"inbound": {"average": 100, "peak": 50}}}),
                Some("spec.bandwidth.inbound.peak"),
            ),
            (
                serde_json::json!({"bandwidth": {"outbound": {"average": 100, "peak": 99}}}),
                Some("spec.bandwidth.outbound.peak"),
            ),
            (
                serde_json::json!({"bandwidth": {"outbound": {"average": 100, "burst": 50}}}),
                None,
            ),
            (
                serde_json::json!({"type": "user", "bandwidth": {"inbound": {"average": 1}}}),
                Some("spec.bandwidth"),
            ),
            (
                serde_json::json!({"bandwidth": {"inbound": {"average": 100, "peak": 200, "burst": 10}}}),
                None,
            ),
        ];
        for (s, field) in cases {
            let got = validate(&spec(s.clone()));
            match field {
                None => assert!(got.is_ok(), "{s}: {got:?}"),
                Some(f) => {
                    let r = got.unwrap_err();
                    assert_eq!(r.reason, Reason::InvalidSpec, "{s}");
                    assert!(r.message.contains(f), "{s}: {}", r.message);
                }
            }
        }
    }

    #[test]
    fn bandwidth_converts_both_ways_and_none_is_unlimited() {
        let api_bw = api::Bandwidth {
            inbound: Some(api::BandwidthLimit {
                average: 10,
                peak: Some(20),
                burst: Some(5),
            }),
            outbound: None,
        };
        assert_eq!(to_api(&to_libvirt(Some(&api_bw))), Some(api_bw));
        assert_eq!(to_libvirt(None), Bandwidth::default());
        assert_eq!(to_api(&Bandwidth::default()), None);
        assert_eq!(list(&["a", "b", "c"]), "a, b and c");
        assert_eq!(list(&["a"]), "a");
    }
}
