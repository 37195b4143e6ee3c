//! The intents of a clone task: who made a domain, define a clone from its source, start it,
//! undefine only a clone the task made, and the copies' volumes.
//!
//! Which task made a domain is read from the metadata virtplane writes into every clone (see
//! [`super::clone_xml`]); a domain without it is never touched.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;

use virt::connect::Connect;
use virt::sys;

use super::{Libvirt, LibvirtError, clone_xml, domain, volume};

/// A domain as a clone task sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloneDomain {
    /// UID of the VMClone task that made it, from its metadata; `None` when no task did.
    pub task: Option<String>,
    /// Its UUID.
    pub uuid: String,
}

/// What defining a clone came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Defined {
    /// Defined now (or defined before by this very task, after an agent restart); its UUID.
    Clone(String),
    /// A domain of that name exists and this task did not make it.
    NameConflict,
}

/// The copies of a task, by the source path: the copy's path and the pool it went to.
pub type Copies = HashMap<String, (String, Option<String>)>;

/// Clone tasks' intents.
pub trait Clones: Send + Sync {
    /// Domain `name` as a clone task sees it; `None` when no such domain exists.
    fn clone_domain(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<CloneDomain>, LibvirtError>> + Send;

    /// The source's persistent XML with its secrets (what a clone's definition starts from).
    fn source_xml(&self, source: &str)
    -> impl Future<Output = Result<String, LibvirtError>> + Send;

    /// Defines `xml` as domain `name` for task `task`: returns the clone this task defined
    /// before if there is one, and refuses a name another domain holds.
    fn define_clone(
        &self,
        name: &str,
        task: &str,
        xml: &str,
    ) -> impl Future<Output = Result<Defined, LibvirtError>> + Send;

    /// Starts domain `name`.
    fn start_domain(&self, name: &str) -> impl Future<Output = Result<(), LibvirtError>> + Send;

    /// Undefines domain `name` (with its UEFI variables and managed save), destroying it first
    /// if it runs, only when task `task` made it. Returns whether it was undefined; a domain
    /// already gone, or made by someone else, is left alone.
    fn undefine_owned_clone(
        &self,
        name: &str,
        task: &str,
    ) -> impl Future<Output = Result<bool, LibvirtError>> + Send;

    /// Re-reads the volumes of every active pool (after files were copied or removed).
    fn refresh_active_pools(&self) -> impl Future<Output = Result<(), LibvirtError>> + Send;

    /// The `(pool, volume)` of the copy of volume `volume` of pool `pool`, from `copies`: the
    /// copy's file name in the pool it went to, which libvirt must list after a refresh. `None`
    /// when the volume has no copy.
    fn copy_volume(
        &self,
        pool: &str,
        volume: &str,
        copies: &Copies,
    ) -> impl Future<Output = Result<Option<(String, String)>, LibvirtError>> + Send;
}

fn lookup(c: &Connect, name: &str) -> Result<Option<virt::domain::Domain>, virt::error::Error> {
    match c.lookup_domain_by_name(name) {
        Ok(d) => Ok(Some(d)),
        Err(e) if domain::is_no_domain(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

fn task_of(dom: &virt::domain::Domain) -> Result<Option<String>, virt::error::Error> {
    Ok(clone_xml::clone_task_of(
        &dom.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)?,
    ))
}

impl Clones for Libvirt {
    async fn clone_domain(&self, name: &str) -> Result<Option<CloneDomain>, LibvirtError> {
        let name = name.to_string();
        self.call("read the domain", move |c| {
            let Some(dom) = lookup(c, &name)? else {
                return Ok(None);
            };
            Ok(Some(CloneDomain {
                task: task_of(&dom)?,
                uuid: dom.uuid_string()?,
            }))
        })
        .await
    }

    async fn source_xml(&self, source: &str) -> Result<String, LibvirtError> {
        let source = source.to_string();
        self.call("read the source's definition", move |c| {
            c.lookup_domain_by_name(&source)?
                .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
        })
        .await
    }

    async fn define_clone(
        &self,
        name: &str,
        task: &str,
        xml: &str,
    ) -> Result<Defined, LibvirtError> {
        let (name, task, xml) = (name.to_string(), task.to_string(), xml.to_string());
        self.call("define the clone", move |c| {
            // After an agent restart the clone may already be defined by this very task.
            if let Some(dom) = lookup(c, &name)? {
                if task_of(&dom)?.as_deref() == Some(task.as_str()) {
                    return Ok(Defined::Clone(dom.uuid_string()?));
                }
                return Ok(Defined::NameConflict);
            }
            Ok(Defined::Clone(c.define_domain_xml(&xml)?.uuid_string()?))
        })
        .await
    }

    async fn start_domain(&self, name: &str) -> Result<(), LibvirtError> {
        let name = name.to_string();
        self.call("start the clone", move |c| {
            c.lookup_domain_by_name(&name)?.create().map(|_| ())
        })
        .await
    }

    async fn undefine_owned_clone(&self, name: &str, task: &str) -> Result<bool, LibvirtError> {
        let (name, task) = (name.to_string(), task.to_string());
        self.call("remove the unfinished clone", move |c| {
            let Some(dom) = lookup(c, &name)? else {
                return Ok(false);
            };
            if task.is_empty() || task_of(&dom)?.as_deref() != Some(task.as_str()) {
                return Ok(false); // Not made by this task: never touched.
            }
            if dom.is_active()?
                && let Err(e) = dom.destroy()
                && dom.is_active().unwrap_or(true)
            {
                return Err(e);
            }
            match dom.undefine_flags(
                sys::VIR_DOMAIN_UNDEFINE_NVRAM | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE,
            ) {
                Err(e) if !domain::is_no_domain(&e) => Err(e),
                _ => Ok(true),
            }
        })
        .await
    }

    async fn refresh_active_pools(&self) -> Result<(), LibvirtError> {
        self.call("refresh storage pools", |c| {
            for p in c.list_all_storage_pools(sys::VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)? {
                let _ = p.refresh(0);
            }
            Ok(())
        })
        .await
    }

    async fn copy_volume(
        &self,
        pool: &str,
        vol: &str,
        copies: &Copies,
    ) -> Result<Option<(String, String)>, LibvirtError> {
        let (pool, vol, copies) = (pool.to_string(), vol.to_string(), copies.clone());
        self.call("look up the copy of a volume", move |c| {
            copy_volume(c, &pool, &vol, &copies)
        })
        .await
    }
}

/// See [`Clones::copy_volume`].
fn copy_volume(
    c: &Connect,
    pool: &str,
    vol: &str,
    copies: &Copies,
) -> Result<Option<(String, String)>, virt::error::Error> {
    let Ok(found) = volume::resolve_volume(c, pool, vol) else {
        return Ok(None);
    };
    let Some((copy, Some(dest_pool))) = copies.get(&found.path) else {
        return Ok(None);
    };
    let Some(name) = Path::new(copy)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
    else {
        return Ok(None);
    };
    let p = c.lookup_storage_pool_by_name(dest_pool)?;
    p.refresh(0)?;
    let v = p.lookup_storage_vol_by_name(&name)?;
    if std::fs::canonicalize(v.path()?).ok() != std::fs::canonicalize(copy).ok() {
        // Another file of that name: the copy is not the volume the pool knows.
        return Ok(None);
    }
    Ok(Some((dest_pool.clone(), name)))
}
