//! Where a volume of an `iscsi-direct` pool is, for a reader outside libvirt. libvirt reaches
//! such LUNs with libiscsi in user space: there is no device node to read, and the pool backend
//! implements neither volume download nor create-from-volume. A copy therefore opens the LUN
//! with QEMU's libiscsi driver (see [`crate::copy::lun`]), from the pool's portal, target and
//! initiator name.

/// An iSCSI LUN as libiscsi opens it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IscsiLun {
    /// `host:port` of the portal.
    pub portal: String,
    /// The target's IQN.
    pub target: String,
    /// The LUN number.
    pub lun: u32,
    /// The initiator IQN the pool logs in with.
    pub initiator: String,
}

/// Why a volume of an iscsi-direct pool cannot be located for a copy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IscsiDirectError {
    /// The pool XML does not parse.
    #[error("failed to parse the pool XML: {0}")]
    Xml(String),
    /// The pool is of another type.
    #[error("the pool is a {0} pool, not iscsi-direct")]
    NotIscsiDirect(String),
    /// Host, target or initiator are missing from the pool XML.
    #[error("the pool XML lacks {0}")]
    Missing(&'static str),
    /// The pool logs in with CHAP: its secret stays with libvirt.
    #[error(
        "the pool authenticates with CHAP, whose secret libvirt keeps; virtplane copies only LUNs of pools without authentication"
    )]
    Authenticated,
    /// The volume's path names no LUN.
    #[error("the volume path {0} names no LUN (expected …-lun-N)")]
    NoLun(String),
}

/// The LUN of the volume at `volume_path` (libvirt's `ip-HOST:PORT-iscsi-IQN-lun-N`) of the
/// iscsi-direct pool described by `pool_xml`.
pub fn lun_of(pool_xml: &str, volume_path: &str) -> Result<IscsiLun, IscsiDirectError> {
    let doc =
        roxmltree::Document::parse(pool_xml).map_err(|e| IscsiDirectError::Xml(e.to_string()))?;
    let root = doc.root_element();
    let kind = root.attribute("type").unwrap_or_default();
    if kind != "iscsi-direct" {
        return Err(IscsiDirectError::NotIscsiDirect(kind.to_string()));
    }
    let source = child(root, "source").ok_or(IscsiDirectError::Missing("<source>"))?;
    if child(source, "auth").is_some() {
        return Err(IscsiDirectError::Authenticated);
    }
    let host = child(source, "host").ok_or(IscsiDirectError::Missing("source/host"))?;
    let name = host
        .attribute("name")
        .ok_or(IscsiDirectError::Missing("source/host/@name"))?;
    let port = host.attribute("port").unwrap_or("3260");
    let target = child(source, "device")
        .and_then(|d| d.attribute("path"))
        .ok_or(IscsiDirectError::Missing("source/device/@path"))?;
    let initiator = child(source, "initiator")
        .and_then(|i| child(i, "iqn"))
        .and_then(|i| i.attribute("name"))
        .ok_or(IscsiDirectError::Missing("source/initiator/iqn/@name"))?;
    let lun = volume_path
        .rsplit_once("-lun-")
        .and_then(|(_, n)| n.parse().ok())
        .ok_or_else(|| IscsiDirectError::NoLun(volume_path.to_string()))?;
    // An IPv6 literal needs brackets in a portal.
    let portal = if name.contains(':') && !name.starts_with('[') {
        format!("[{name}]:{port}")
    } else {
        format!("{name}:{port}")
    };
    Ok(IscsiLun {
        portal,
        target: target.to_string(),
        lun,
        initiator: initiator.to_string(),
    })
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: &str = "<pool type='iscsi-direct'><name>p</name><source>\
        <host name='127.0.0.1' port='3261'/><device path='iqn.2026-11.io.virtplane:t'/>\
        <initiator><iqn name='iqn.2026-11.io.virtplane:agent'/></initiator></source></pool>";

    #[test]
    fn locates_a_lun_from_pool_xml_and_volume_path() {
        let lun = lun_of(
            POOL,
            "ip-127.0.0.1:3261-iscsi-iqn.2026-11.io.virtplane:t-lun-3",
        )
        .unwrap();
        assert_eq!(
            lun,
            IscsiLun {
                portal: "127.0.0.1:3261".into(),
                target: "iqn.2026-11.io.virtplane:t".into(),
                lun: 3,
                initiator: "iqn.2026-11.io.virtplane:agent".into(),
            }
        );
        let v6 = POOL.replace("127.0.0.1", "fd00::1");
        assert_eq!(lun_of(&v6, "x-lun-1").unwrap().portal, "[fd00::1]:3261");
    }

    #[test]
    fn refuses_what_it_cannot_open() {
        assert_eq!(
            lun_of(&POOL.replace("iscsi-direct", "dir"), "x-lun-1"),
            Err(IscsiDirectError::NotIscsiDirect("dir".into()))
        );
        let auth = POOL.replace(
            "<initiator>",
            "<auth type='chap' username='u'><secret usage='s'/></auth><initiator>",
        );
        assert_eq!(
            lun_of(&auth, "x-lun-1"),
            Err(IscsiDirectError::Authenticated)
        );
        assert!(matches!(
            lun_of(POOL, "ip-127.0.0.1:3261-iscsi-iqn"),
            Err(IscsiDirectError::NoLun(_))
        ));
        assert_eq!(
            lun_of(
                &POOL.replace(
                    "<initiator><iqn name='iqn.2026-11.io.virtplane:agent'/></initiator>",
                    ""
                ),
                "x-lun-1"
            ),
            Err(IscsiDirectError::Missing("source/initiator/iqn/@name"))
        );
    }
}
