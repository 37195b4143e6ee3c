//! `virDomainSetInterfaceParameters` through the raw `virt-sys` bindings: the `virt` crate does
//! not wrap it. The only `unsafe` here builds the typed parameters (plain `UINT` values, no
//! strings, so nothing to free) and passes them to libvirt for the duration of the call.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char};

use virt::domain::Domain;
use virt::sys;

use super::nic::{Bandwidth, Rate};

fn uint(name: &CStr, value: u32) -> sys::virTypedParameter {
    let mut field = [0 as c_char; 80];
    // The names are libvirt's constants, far shorter than the 80-byte field.
    for (dst, src) in field.iter_mut().zip(name.to_bytes()) {
        *dst = *src as c_char;
    }
    sys::virTypedParameter {
        field,
        type_: sys::VIR_TYPED_PARAM_UINT as i32,
        value: sys::_virTypedParameter__bindgen_ty_1 { ui: value },
    }
}

fn params(bw: &Bandwidth) -> Vec<sys::virTypedParameter> {
    // Every parameter, zero for none: libvirt removes a direction whose average is zero.
    let dir = |r: &Option<Rate>| r.unwrap_or_default();
    let (i, o) = (dir(&bw.inbound), dir(&bw.outbound));
    vec![
        uint(sys::VIR_DOMAIN_BANDWIDTH_IN_AVERAGE, i.average),
        uint(sys::VIR_DOMAIN_BANDWIDTH_IN_PEAK, i.peak.unwrap_or(0)),
        uint(sys::VIR_DOMAIN_BANDWIDTH_IN_BURST, i.burst.unwrap_or(0)),
        uint(sys::VIR_DOMAIN_BANDWIDTH_OUT_AVERAGE, o.average),
        uint(sys::VIR_DOMAIN_BANDWIDTH_OUT_PEAK, o.peak.unwrap_or(0)),
        uint(sys::VIR_DOMAIN_BANDWIDTH_OUT_BURST, o.burst.unwrap_or(0)),
    ]
}

/// Sets the live bandwidth of `dom`'s interface `device` (its MAC or host device name).
pub fn set_interface_bandwidth(
    dom: &Domain,
    device: &str,
    bw: &Bandwidth,
) -> Result<(), virt::error::Error> {
    let device = CString::new(device).map_err(|_| virt::error::Error::last_error())?;
    let mut p = params(bw);
    // SAFETY: `dom` is a live handle for the call; `device` and `p` outlive it; `p.len()` is 6.
    let rc = unsafe {
        sys::virDomainSetInterfaceParameters(
            dom.as_ptr(),
            device.as_ptr(),
            p.as_mut_ptr(),
            p.len() as i32,
            sys::VIR_DOMAIN_AFFECT_LIVE,
        )
    };
    if rc < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_parameter_is_sent_with_zero_for_none() {
        let bw = Bandwidth {
            inbound: Some(Rate {
                average: 100,
                peak: Some(200),
                burst: None,
            }),
            outbound: None,
        };
        let p = params(&bw);
        let read: Vec<(String, u32)> = p
            .iter()
            .map(|x| {
                // SAFETY: built by `uint` above: a NUL-terminated name and a `ui` value.
                let name = unsafe { CStr::from_ptr(x.field.as_ptr()) };
                (name.to_string_lossy().into_owned(), unsafe { x.value.ui })
            })
            .collect();
        assert_eq!(
            read,
            [
                ("inbound.average".to_string(), 100),
                ("inbound.peak".into(), 200),
                ("inbound.burst".into(), 0),
                ("outbound.average".into(), 0),
                ("outbound.peak".into(), 0),
                ("outbound.burst".into(), 0),
            ]
        );
        assert!(
            p.iter()
                .all(|x| x.type_ == sys::VIR_TYPED_PARAM_UINT as i32)
        );
    }
}
