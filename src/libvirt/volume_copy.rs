//! The two copy routes of a volume that is no file, by what its pool can do:
//!
//! * a pool that can create volumes (logical, disk, zfs, and the file pools) copies one with
//!   libvirt's create-from-volume call (`virStorageVolCreateXMLFrom`) into a new volume of the
//!   same pool: [`Libvirt::copy_volume_in_pool`];
//! * an `iscsi-direct` pool cannot (its backend has neither create-from-volume nor volume
//!   download, and its LUNs have no device node): [`Libvirt::iscsi_lun`] says where the LUN is,
//!   for [`crate::copy::lun`] to read it with libiscsi.

use super::iscsi_direct::{self, IscsiDirectError, IscsiLun};
use super::{Libvirt, LibvirtError};

/// A volume made by [`Libvirt::copy_volume_in_pool`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolCopy {
    /// Its name (a `disk` pool names partitions itself, whatever name was asked for).
    pub name: String,
    /// Its path on the node.
    pub path: String,
    /// Its size in bytes.
    pub capacity: u64,
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(tag))
}

/// The XML of a new volume `name` shaped like the volume described by `source_xml`: same
/// capacity, same target format.
pub fn copy_xml(source_xml: &str, name: &str) -> Result<String, roxmltree::Error> {
    let doc = roxmltree::Document::parse(source_xml)?;
    let root = doc.root_element();
    let capacity = child(root, "capacity")
        .and_then(|c| c.text())
        .map(str::trim)
        .unwrap_or("0");
    let unit = child(root, "capacity")
        .and_then(|c| c.attribute("unit"))
        .unwrap_or("bytes");
    let format = child(root, "target")
        .and_then(|t| child(t, "format"))
        .and_then(|f| f.attribute("type"));
    let esc = super::domain::escape_attr;
    let mut xml = format!(
        "<volume><name>{}</name><capacity unit='{}'>{}</capacity>",
        esc(name),
        esc(unit),
        esc(capacity)
    );
    if let Some(f) = format {
        xml.push_str(&format!("<target><format type='{}'/></target>", esc(f)));
    }
    xml.push_str("</volume>");
    Ok(xml)
}

impl Libvirt {
    /// Copies volume `volume` of pool `pool` into a new volume of the same pool, asked to be
    /// named `name`, with libvirt's create-from-volume call (libvirt copies, sparse where the
    /// pool allows). Blocks a libvirt worker for the length of the copy.
    pub async fn copy_volume_in_pool(
        &self,
        pool: &str,
        volume: &str,
        name: &str,
    ) -> Result<PoolCopy, LibvirtError> {
        let (p, v) = (pool.to_string(), volume.to_string());
        let source_xml = self
            .call("read the volume to copy", move |c| {
                c.lookup_storage_pool_by_name(&p)?
                    .lookup_storage_vol_by_name(&v)?
                    .xml_desc(0)
            })
            .await?;
        let xml = copy_xml(&source_xml, name).map_err(|source| LibvirtError::Xml {
            action: "read the volume to copy".into(),
            source,
        })?;
        let (pool, volume) = (pool.to_string(), volume.to_string());
        self.call("copy a volume within its pool", move |c| {
            let p = c.lookup_storage_pool_by_name(&pool)?;
            let src = p.lookup_storage_vol_by_name(&volume)?;
            let made = virt::storage_vol::StorageVol::create_xml_from(&p, &xml, &src, 0)?;
            Ok(PoolCopy {
                name: made.name()?,
                path: made.path()?,
                capacity: made.info()?.capacity,
            })
        })
        .await
    }

    /// Where volume `volume` of the iscsi-direct pool `pool` is, for a libiscsi reader; the
    /// inner error says why it cannot be read that way.
    pub async fn iscsi_lun(
        &self,
        pool: &str,
        volume: &str,
    ) -> Result<Result<IscsiLun, IscsiDirectError>, LibvirtError> {
        let (pool, volume) = (pool.to_string(), volume.to_string());
        self.call("locate an iSCSI LUN", move |c| {
            let p = c.lookup_storage_pool_by_name(&pool)?;
            let v = p.lookup_storage_vol_by_name(&volume)?;
            Ok(iscsi_direct::lun_of(&p.xml_desc(0)?, &v.path()?))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_has_the_sources_capacity_and_format() {
        let src = "<volume type='block'><name>loop0p1</name><key>k</key>\
            <capacity unit='bytes'>8388608</capacity><allocation unit='bytes'>8388608</allocation>\
            <target><path>/dev/loop0p1</path><format type='none'/></target></volume>";
        assert_eq!(
            copy_xml(src, "loop0p1-clone1").unwrap(),
            "<volume><name>loop0p1-clone1</name><capacity unit='bytes'>8388608</capacity>\
             <target><format type='none'/></target></volume>"
        );
    }
}
