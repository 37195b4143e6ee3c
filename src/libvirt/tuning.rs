//! Device tuning: disk I/O limits set live through libvirt's block I/O tuning call
//! (`virDomainSetBlockIoTune`), and a disk of the persistent definition rewritten in place for
//! the fields libvirt can only change at the next boot. Also the typed reads of those fields
//! from a `<disk>` element.
//!
//! The `virt` crate does not wrap `virDomainSetBlockIoTune`, so the real implementation calls
//! the raw `virt-sys` binding; that is this module's only `unsafe`.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::fmt::Write as _;
use std::future::Future;

use virt::sys;

use super::domain::escape_attr;
use super::facade::Affect;
use super::{Libvirt, LibvirtError};
use crate::api::IoTune;

/// The I/O limits as libvirt names them (`<iotune>` children and typed parameters), in the order
/// of [`iotune_values`].
pub const IOTUNE_FIELDS: [(&str, &str); 12] = [
    ("total_bytes_sec", "totalBytesSec"),
    ("read_bytes_sec", "readBytesSec"),
    ("write_bytes_sec", "writeBytesSec"),
    ("total_iops_sec", "totalIopsSec"),
    ("read_iops_sec", "readIopsSec"),
    ("write_iops_sec", "writeIopsSec"),
    ("total_bytes_sec_max", "totalBytesSecMax"),
    ("read_bytes_sec_max", "readBytesSecMax"),
    ("write_bytes_sec_max", "writeBytesSecMax"),
    ("total_iops_sec_max", "totalIopsSecMax"),
    ("read_iops_sec_max", "readIopsSecMax"),
    ("write_iops_sec_max", "writeIopsSecMax"),
];

const IOTUNE_PARAMS: [&CStr; 12] = [
    sys::VIR_DOMAIN_BLOCK_IOTUNE_TOTAL_BYTES_SEC,
    sys::VIR_DOMAIN_BLOCK_IOTUNE_READ_BYTES_SEC,
    sys::VIR_DOMAIN_BLOCK_IOTUNE_WRITE_BYTES_SEC,
    sys::VIR_DOMAIN_BLOCK_IOTUNE_TOTAL_IOPS_SEC,
    sys::VIR_DOMAIN_BLOCK_IOTUNE_READ_IOPS_SEC,
    sys::VIR_DOMAIN_BLOCK_IOTUNE_WRITE_IOPS_SEC,
    sys::VIR_DOMAIN_BLOCK_IOTUNE_TOTAL_BYTES_SEC_MAX,
    sys::VIR_DOMAIN_BLOCK_IOTUNE_READ_BYTES_SEC_MAX,
    sys::VIR_DOMAIN_BLOCK_IOTUNE_WRITE_BYTES_SEC_MAX,
    sys::VIR_DOMAIN_BLOCK_IOTUNE_TOTAL_IOPS_SEC_MAX,
    sys::VIR_DOMAIN_BLOCK_IOTUNE_READ_IOPS_SEC_MAX,
    sys::VIR_DOMAIN_BLOCK_IOTUNE_WRITE_IOPS_SEC_MAX,
];

/// The twelve limits of `t` in [`IOTUNE_FIELDS`] order; unset is `0` (unlimited).
pub fn iotune_values(t: Option<&IoTune>) -> [u64; 12] {
    let Some(t) = t else { return [0; 12] };
    [
        t.total_bytes_sec,
        t.read_bytes_sec,
        t.write_bytes_sec,
        t.total_iops_sec,
        t.read_iops_sec,
        t.write_iops_sec,
        t.total_bytes_sec_max,
        t.read_bytes_sec_max,
        t.write_bytes_sec_max,
        t.total_iops_sec_max,
        t.read_iops_sec_max,
        t.write_iops_sec_max,
    ]
    .map(|v| v.unwrap_or(0))
}

/// The limits of `v` as an [`IoTune`]; `None` when every one is unlimited.
pub fn iotune_of(v: [u64; 12]) -> Option<IoTune> {
    let f = |i: usize| (v[i] != 0).then_some(v[i]);
    (v != [0; 12]).then(|| IoTune {
        total_bytes_sec: f(0),
        read_bytes_sec: f(1),
        write_bytes_sec: f(2),
        total_iops_sec: f(3),
        read_iops_sec: f(4),
        write_iops_sec: f(5),
        total_bytes_sec_max: f(6),
        read_bytes_sec_max: f(7),
        write_bytes_sec_max: f(8),
        total_iops_sec_max: f(9),
        read_iops_sec_max: f(10),
        write_iops_sec_max: f(11),
    })
}

/// The tunable fields of a `<disk>` element, as libvirt wrote them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskFields {
    /// `driver/@type`.
    pub format: Option<String>,
    /// `driver/@cache`.
    pub cache: Option<String>,
    /// `driver/@io`.
    pub io: Option<String>,
    /// `driver/@discard`.
    pub discard: Option<String>,
    /// `driver/@detect_zeroes`.
    pub detect_zeroes: Option<String>,
    /// `<serial>`.
    pub serial: Option<String>,
    /// `<shareable/>`.
    pub shareable: bool,
    /// `<readonly/>`.
    pub readonly: bool,
    /// `boot/@order`.
    pub boot_order: Option<u32>,
    /// `<iotune>` in [`IOTUNE_FIELDS`] order.
    pub iotune: [u64; 12],
}

/// Reads the tunable fields of one `<disk>` element; an unreadable element has none.
pub fn disk_fields(disk_xml: &str) -> DiskFields {
    let Ok(doc) = roxmltree::Document::parse(disk_xml) else {
        return DiskFields::default();
    };
    let disk = doc.root_element();
    let child = |tag: &str| disk.children().find(|c| c.has_tag_name(tag));
    let driver = |a: &str| {
        child("driver")
            .and_then(|d| d.attribute(a))
            .map(str::to_string)
    };
    let mut iotune = [0; 12];
    if let Some(t) = child("iotune") {
        for (i, (name, _)) in IOTUNE_FIELDS.iter().enumerate() {
            iotune[i] = t
                .children()
                .find(|c| c.has_tag_name(*name))
                .and_then(|c| c.text())
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
        }
    }
    DiskFields {
        format: driver("type"),
        cache: driver("cache").filter(|c| c != "default"),
        io: driver("io"),
        discard: driver("discard"),
        detect_zeroes: driver("detect_zeroes"),
        serial: child("serial")
            .and_then(|s| s.text())
            .map(|s| s.trim().to_string()),
        shareable: child("shareable").is_some(),
        readonly: child("readonly").is_some(),
        boot_order: child("boot")
            .and_then(|b| b.attribute("order"))
            .and_then(|o| o.parse().ok()),
        iotune,
    }
}

/// `disk_xml` (a `<disk>` the agent built, ending in `</disk>`) with `<serial>`, `<shareable/>`
/// and `<iotune>` added.
pub fn with_extras(
    disk_xml: &str,
    serial: Option<&str>,
    shareable: bool,
    iotune: &[u64; 12],
) -> String {
    let Some(body) = disk_xml.strip_suffix("</disk>") else {
        return disk_xml.to_string();
    };
    let mut x = body.to_string();
    if let Some(s) = serial {
        let _ = write!(x, "<serial>{}</serial>", escape_attr(s));
    }
    if shareable {
        x.push_str("<shareable/>");
    }
    if *iotune != [0; 12] {
        x.push_str("<iotune>");
        for ((name, _), v) in IOTUNE_FIELDS.iter().zip(iotune) {
            if *v != 0 {
                let _ = write!(x, "<{name}>{v}</{name}>");
            }
        }
        x.push_str("</iotune>");
    }
    x.push_str("</disk>");
    x
}

/// Why a definition could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    /// libvirt's XML could not be parsed.
    #[error("the domain's XML could not be parsed: {0}")]
    Xml(#[from] roxmltree::Error),
    /// The definition has no disk with the alias.
    #[error("the definition has no device {0}")]
    NoDevice(String),
}

/// `domain_xml` with its device whose alias is `alias` (of `device_xml`'s element, `<disk>` or
/// `<interface>`) replaced by `device_xml`, keeping the old element's `<address>`, unless
/// `device_xml` has one, so the device stays where the guest knows it.
pub fn replace_device(
    domain_xml: &str,
    alias: &str,
    device_xml: &str,
) -> Result<String, RewriteError> {
    let device = roxmltree::Document::parse(device_xml)?;
    let tag = device.root_element().tag_name().name().to_string();
    let new_has_address = child(device.root_element(), "address").is_some();
    let doc = roxmltree::Document::parse(domain_xml)?;
    let old = doc
        .descendants()
        .filter(|n| n.has_tag_name(tag.as_str()))
        .find(|d| child(*d, "alias").and_then(|a| a.attribute("name")) == Some(alias))
        .ok_or_else(|| RewriteError::NoDevice(alias.to_string()))?;
    let address = child(old, "address").map(|a| &domain_xml[a.range()]);
    let close = format!("</{tag}>");
    let new = match (address, device_xml.strip_suffix(close.as_str())) {
        (Some(a), Some(body)) if !new_has_address => format!("{body}{a}{close}"),
        _ => device_xml.to_string(),
    };
    let range = old.range();
    Ok(format!(
        "{}{new}{}",
        &domain_xml[..range.start],
        &domain_xml[range.end..]
    ))
}

/// The child element `tag` of `n`.
fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(tag))
}

/// The `<boot order>` of a device element.
fn boot_order_of(device_xml: &str) -> Result<Option<u32>, RewriteError> {
    let doc = roxmltree::Document::parse(device_xml)?;
    Ok(doc
        .root_element()
        .children()
        .find(|c| c.has_tag_name("boot"))
        .and_then(|b| b.attribute("order"))
        .and_then(|o| o.parse().ok()))
}

/// `domain_xml` with the device whose alias is `alias` written as `device_xml` (a `<disk>` or an
/// `<interface>`): replaced (see [`replace_device`]) or, when the definition has none, added.
/// When `device_xml` carries a boot order and the definition lists its boot devices by type
/// (`<os><boot dev>`), the list is turned into per-device orders in the same rewrite (see
/// [`super::boot_order::convert`]); the second value says what was converted.
///
/// One rewrite, so one define: converting first and writing the device after would define a
/// domain without any boot element whenever no other device takes an order, and libvirt puts
/// `<boot dev='hd'/>` back into such a definition, so the device's order would be refused again.
pub fn write_device(
    domain_xml: &str,
    alias: &str,
    device_xml: &str,
) -> Result<(String, Option<String>), RewriteError> {
    let (xml, converted) = match boot_order_of(device_xml)? {
        Some(order) => match super::boot_order::convert(domain_xml, alias, order)? {
            Some(c) => (c.xml, Some(c.summary)),
            None => (domain_xml.to_string(), None),
        },
        None => (domain_xml.to_string(), None),
    };
    let written = match replace_device(&xml, alias, device_xml) {
        Err(RewriteError::NoDevice(_)) => add_device(&xml, device_xml)?,
        other => other?,
    };
    Ok((written, converted))
}

/// `domain_xml` with `device_xml` appended to its `<devices>`.
fn add_device(domain_xml: &str, device_xml: &str) -> Result<String, RewriteError> {
    let doc = roxmltree::Document::parse(domain_xml)?;
    let devices = doc
        .root_element()
        .children()
        .find(|c| c.has_tag_name("devices"))
        .ok_or_else(|| RewriteError::NoDevice("devices".into()))?;
    let range = devices.range();
    let text = &domain_xml[range.clone()];
    let inner = match text.strip_suffix("</devices>") {
        Some(body) => format!("{body}{device_xml}</devices>"),
        None => format!("<devices>{device_xml}</devices>"),
    };
    Ok(format!(
        "{}{inner}{}",
        &domain_xml[..range.start],
        &domain_xml[range.end..]
    ))
}

/// Tuning of a domain's devices.
pub trait Tuning: Send + Sync {
    /// Sets the twelve I/O limits of disk `target` of `vm` (`0` is unlimited), live and/or in
    /// the definition.
    fn set_block_iotune(
        &self,
        vm: &str,
        target: &str,
        values: [u64; 12],
        affect: Affect,
    ) -> impl Future<Output = Result<(), LibvirtError>> + Send;

    /// Writes `device_xml` (a `<disk>` or an `<interface>`) as the device with alias `alias`
    /// into the persistent definition of `vm` in one define (see [`write_device`]): replaced,
    /// its address kept, or added; a boot order in it turns an `<os><boot dev>` list into
    /// per-device orders in the same define. Says what was converted. The running guest is not
    /// changed.
    fn redefine_device(
        &self,
        vm: &str,
        alias: &str,
        device_xml: &str,
    ) -> impl Future<Output = Result<Option<String>, LibvirtError>> + Send;
}

const REDEFINE: &str = "write the device into the definition";

impl Tuning for Libvirt {
    async fn set_block_iotune(
        &self,
        vm: &str,
        target: &str,
        values: [u64; 12],
        affect: Affect,
    ) -> Result<(), LibvirtError> {
        let (vm, target) = (vm.to_string(), target.to_string());
        self.call("set the disk's I/O limits", move |c| {
            let dom = c.lookup_domain_by_name(&vm)?;
            set_block_iotune_raw(&dom, &target, &values, super::real::affect_flags(affect))
        })
        .await
    }

    async fn redefine_device(
        &self,
        vm: &str,
        alias: &str,
        device_xml: &str,
    ) -> Result<Option<String>, LibvirtError> {
        let current = self.definition(vm).await?;
        let (next, converted) = match write_device(&current, alias, device_xml) {
            Ok(written) => written,
            Err(RewriteError::Xml(source)) => {
                return Err(LibvirtError::Xml {
                    action: REDEFINE.into(),
                    source,
                });
            }
            // A definition without <devices>: nothing virtplane wrote; leave it.
            Err(RewriteError::NoDevice(_)) => return Ok(None),
        };
        self.call(REDEFINE, move |c| c.define_domain_xml(&next).map(|_| ()))
            .await?;
        Ok(converted)
    }
}

impl Libvirt {
    /// The persistent definition of `vm`, secure (nothing, such as a graphics password, is lost
    /// by defining it again).
    async fn definition(&self, vm: &str) -> Result<String, LibvirtError> {
        let name = vm.to_string();
        self.call(REDEFINE, move |c| {
            c.lookup_domain_by_name(&name)?
                .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
        })
        .await
    }
}

/// `virDomainSetBlockIoTune` with all twelve limits, so a limit dropped from the spec is cleared.
fn set_block_iotune_raw(
    dom: &virt::domain::Domain,
    disk: &str,
    values: &[u64; 12],
    flags: u32,
) -> Result<(), virt::error::Error> {
    let disk = CString::new(disk)?;
    let mut params: sys::virTypedParameterPtr = std::ptr::null_mut();
    let (mut n, mut max) = (0, 0);
    // SAFETY: `params`, `n` and `max` are the out-parameters libvirt's typed-parameter helpers
    // grow together; the names are NUL-terminated constants; `dom` is a live domain handle for
    // the whole call; `params` is freed once, with libvirt's own free function.
    let rc = unsafe {
        let mut rc = 0;
        for (name, value) in IOTUNE_PARAMS.iter().zip(values) {
            rc = sys::virTypedParamsAddULLong(&mut params, &mut n, &mut max, name.as_ptr(), *value);
            if rc < 0 {
                break;
            }
        }
        if rc >= 0 {
            rc = sys::virDomainSetBlockIoTune(dom.as_ptr(), disk.as_ptr(), params, n, flags);
        }
        sys::virTypedParamsFree(params, n);
        rc
    };
    if rc < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

#[cfg(test)]
#[path = "tuning_tests.rs"]
mod tests;
