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

/// The name libvirt insists on for the next partition of a `disk` pool on `device`, whose
/// volumes are `existing`: the device's name, `p` when it ends in a digit, and one more than the
/// highest partition number (`loop0p3`, `sdb2`).
pub fn next_partition(device: &str, existing: &[String]) -> String {
    let base = device.rsplit('/').next().unwrap_or(device);
    let sep = if base.ends_with(|c: char| c.is_ascii_digit()) {
        "p"
    } else {
        ""
    };
    let prefix = format!("{base}{sep}");
    let last = existing
        .iter()
        .filter_map(|v| v.strip_prefix(&prefix)?.parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    format!("{prefix}{}", last + 1)
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

/// The source device of a `disk` pool; `None` for other pools.
fn disk_pool_device(pool_xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(pool_xml).ok()?;
    let root = doc.root_element();
    if root.attribute("type") != Some("disk") {
        return None;
    }
    child(child(root, "source")?, "device")?
        .attribute("path")
        .map(str::to_string)
}

impl Libvirt {
    /// Copies volume `volume` of pool `pool` into a new volume of the same pool, named `name`
    /// (in a `disk` pool: the next partition's name, which libvirt insists on), with libvirt's
    /// create-from-volume call (libvirt copies, sparse where the pool allows). Blocks a
    /// libvirt worker for the length of the copy.
    pub async fn copy_volume_in_pool(
        &self,
        pool: &str,
        volume: &str,
        name: &str,
    ) -> Result<PoolCopy, LibvirtError> {
        let (p, v) = (pool.to_string(), volume.to_string());
        let (source_xml, pool_xml, volumes) = self
            .call("read the volume to copy", move |c| {
                let p = c.lookup_storage_pool_by_name(&p)?;
                let xml = p.lookup_storage_vol_by_name(&v)?.xml_desc(0)?;
                Ok((xml, p.xml_desc(0)?, p.list_volumes()?))
            })
            .await?;
        // A disk pool names its partitions itself: ask for the next one's name.
        let name = disk_pool_device(&pool_xml)
            .map_or_else(|| name.to_string(), |d| next_partition(&d, &volumes));
        let xml = copy_xml(&source_xml, &name).map_err(|source| LibvirtError::Xml {
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
    fn names_the_next_partition() {
        let v = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(next_partition("/dev/loop0", &v(&["loop0p1"])), "loop0p2");
        assert_eq!(next_partition("/dev/loop0", &v(&[])), "loop0p1");
        assert_eq!(next_partition("/dev/sdb", &v(&["sdb1", "sdb3"])), "sdb4");
        assert_eq!(
            disk_pool_device(
                "<pool type='disk'><source><device path='/dev/loop3'/></source></pool>"
            ),
            Some("/dev/loop3".into())
        );
        assert_eq!(disk_pool_device("<pool type='dir'/>"), None);
    }

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
