//! Volumes the agent creates and grows: a blank volume or a qcow2 overlay of a golden image
//! (libvirt's `virStorageVolCreateXML`), its capacity, and growing it (`virStorageVolResize`,
//! or `virDomainBlockResize` while a running guest has it). Also the `<backingStore>` chain a
//! domain disk on an overlay carries, so libvirt never probes formats.

use std::fmt::Write;
use std::future::Future;

use virt::storage_vol::StorageVol;
use virt::sys;

use super::domain::escape_attr;
use super::{Libvirt, LibvirtError};

/// A volume to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewVolume {
    /// Its name in the pool.
    pub name: String,
    /// Virtual size in bytes.
    pub capacity: u64,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Bytes allocated up front (`capacity` for full preallocation, else 0).
    pub allocation: u64,
    /// Preallocate qcow2 metadata.
    pub prealloc_metadata: bool,
    /// The backing store of an overlay: its path and format.
    pub backing: Option<BackingLink>,
}

/// One link of a backing chain: a file and its format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingLink {
    /// The file's real path.
    pub path: String,
    /// `qcow2` or `raw`.
    pub format: String,
}

/// The `<volume>` XML libvirt creates `v` from.
pub fn volume_xml(v: &NewVolume) -> String {
    let mut x = format!(
        "<volume><name>{}</name><capacity unit='bytes'>{}</capacity><allocation unit='bytes'>{}</allocation><target><format type='{}'/></target>",
        escape_attr(&v.name),
        v.capacity,
        v.allocation,
        escape_attr(&v.format)
    );
    if let Some(b) = &v.backing {
        let _ = write!(
            x,
            "<backingStore><path>{}</path><format type='{}'/></backingStore>",
            escape_attr(&b.path),
            escape_attr(&b.format)
        );
    }
    x.push_str("</volume>");
    x
}

/// `disk_xml` (a `<disk>` the agent built) with the backing chain `chain` (nearest first)
/// written as nested `<backingStore>` elements, ending in an empty one: libvirt then uses
/// exactly this chain instead of probing the images.
pub fn with_backing_chain(disk_xml: &str, chain: &[BackingLink]) -> String {
    if chain.is_empty() {
        return disk_xml.to_string();
    }
    let Some(body) = disk_xml.strip_suffix("</disk>") else {
        return disk_xml.to_string();
    };
    let mut x = body.to_string();
    for link in chain {
        let _ = write!(
            x,
            "<backingStore type='file'><format type='{}'/><source file='{}'/>",
            escape_attr(&link.format),
            escape_attr(&link.path)
        );
    }
    x.push_str("<backingStore/>");
    for _ in chain {
        x.push_str("</backingStore>");
    }
    x.push_str("</disk>");
    x
}

/// Creating and growing volumes.
pub trait Provision: Send + Sync {
    /// Creates `v` in pool `pool`. A volume of that name already there is an error whose kind
    /// is [`super::ErrorKind::Refused`] (libvirt never overwrites one).
    fn create_volume(
        &self,
        pool: &str,
        v: &NewVolume,
    ) -> impl Future<Output = Result<(), LibvirtError>> + Send;

    /// The virtual size of volume `name` of pool `pool`; `None` when it does not exist.
    fn volume_capacity(
        &self,
        pool: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<u64>, LibvirtError>> + Send;

    /// Grows volume `name` of pool `pool` to `bytes` (no guest has it open).
    fn resize_volume(
        &self,
        pool: &str,
        name: &str,
        bytes: u64,
    ) -> impl Future<Output = Result<(), LibvirtError>> + Send;

    /// Grows the disk `target` of the running domain `vm` to `bytes` (QEMU resizes the image
    /// and the guest sees the new size).
    fn block_resize(
        &self,
        vm: &str,
        target: &str,
        bytes: u64,
    ) -> impl Future<Output = Result<(), LibvirtError>> + Send;
}

impl Provision for Libvirt {
    async fn create_volume(&self, pool: &str, v: &NewVolume) -> Result<(), LibvirtError> {
        let (pool, xml, meta) = (pool.to_string(), volume_xml(v), v.prealloc_metadata);
        self.call("create a storage volume", move |c| {
            let p = c.lookup_storage_pool_by_name(&pool)?;
            let flags = if meta {
                sys::VIR_STORAGE_VOL_CREATE_PREALLOC_METADATA
            } else {
                0
            };
            StorageVol::create_xml(&p, &xml, flags).map(|_| ())
        })
        .await
    }

    async fn volume_capacity(&self, pool: &str, name: &str) -> Result<Option<u64>, LibvirtError> {
        let (pool, name) = (pool.to_string(), name.to_string());
        let result = self
            .call("read a storage volume's capacity", move |c| {
                let p = c.lookup_storage_pool_by_name(&pool)?;
                Ok(p.lookup_storage_vol_by_name(&name)?.info()?.capacity)
            })
            .await;
        match result {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn resize_volume(&self, pool: &str, name: &str, bytes: u64) -> Result<(), LibvirtError> {
        let (pool, name) = (pool.to_string(), name.to_string());
        self.call("resize a storage volume", move |c| {
            let p = c.lookup_storage_pool_by_name(&pool)?;
            p.lookup_storage_vol_by_name(&name)?.resize(bytes, 0)
        })
        .await
    }

    async fn block_resize(&self, vm: &str, target: &str, bytes: u64) -> Result<(), LibvirtError> {
        let (vm, target) = (vm.to_string(), target.to_string());
        self.call("resize a running guest's disk", move |c| {
            c.lookup_domain_by_name(&vm)?.block_resize(
                &target,
                bytes,
                sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES,
            )
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(path: &str) -> BackingLink {
        BackingLink {
            path: path.into(),
            format: "qcow2".into(),
        }
    }

    #[test]
    fn volume_xml_of_a_blank_volume_and_an_overlay() {
        let blank = NewVolume {
            name: "d<1>".into(),
            capacity: 1 << 30,
            format: "raw".into(),
            allocation: 1 << 30,
            prealloc_metadata: false,
            backing: None,
        };
        let x = volume_xml(&blank);
        let doc = roxmltree::Document::parse(&x).unwrap();
        let root = doc.root_element();
        let text = |tag: &str| {
            root.children()
                .find(|n| n.has_tag_name(tag))
                .and_then(|n| n.text())
                .unwrap()
                .to_string()
        };
        assert_eq!(text("name"), "d<1>");
        assert_eq!(text("capacity"), "1073741824");
        assert_eq!(text("allocation"), "1073741824");
        assert!(!x.contains("backingStore"));
        let overlay = NewVolume {
            backing: Some(link("/p/base.qcow2")),
            format: "qcow2".into(),
            allocation: 0,
            ..blank
        };
        let x = volume_xml(&overlay);
        let doc = roxmltree::Document::parse(&x).unwrap();
        let b = doc
            .descendants()
            .find(|n| n.has_tag_name("backingStore"))
            .unwrap();
        let path = b.children().find(|n| n.has_tag_name("path")).unwrap();
        assert_eq!(path.text(), Some("/p/base.qcow2"));
    }

    #[test]
    fn backing_chain_nests_and_ends_empty() {
        let disk = "<disk type='file' device='disk'><source file='/p/o.qcow2'/></disk>";
        assert_eq!(with_backing_chain(disk, &[]), disk);
        let x = with_backing_chain(disk, &[link("/p/mid.qcow2"), link("/p/base.qcow2")]);
        let doc = roxmltree::Document::parse(&x).unwrap();
        let sources: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("backingStore"))
            .map(|b| {
                b.children()
                    .find(|n| n.has_tag_name("source"))
                    .and_then(|s| s.attribute("file"))
            })
            .collect();
        assert_eq!(
            sources,
            [Some("/p/mid.qcow2"), Some("/p/base.qcow2"), None],
            "nearest first, ending in an empty backingStore"
        );
    }
}
