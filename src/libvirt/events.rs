//! libvirt event callbacks, through the raw `virt-sys` bindings: the one module with `unsafe`.
//!
//! The `virt` crate wraps the event loop but not the callbacks. This module registers, per
//! connection, callbacks for domain lifecycle and device events, storage pool and network
//! lifecycle events, and connection close, and forwards each as an [`Event`] into a broadcast
//! channel. Every callback only copies strings out of libvirt-owned memory and sends; nothing
//! here blocks or calls back into libvirt beyond the name/UUID getters.
//!
//! Review notes:
//! - each registration owns a `Box<Sink>` whose pointer libvirt holds as `opaque`; libvirt calls
//!   the `free_sink` callback exactly once when the registration goes away, which drops it;
//! - the callback casts follow libvirt's own `VIR_DOMAIN_EVENT_CALLBACK` macro: the event ID
//!   decides the real signature, and we register each function under the ID that matches it;
//! - pointers handed to callbacks are valid for the duration of the callback only.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

use tokio::sync::broadcast;
use virt::connect::Connect;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt::sys;

/// Something that happened in libvirt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A domain event.
    Domain {
        /// Domain name.
        name: String,
        /// What happened.
        kind: DomainEvent,
    },
    /// A storage pool was defined, undefined, started, stopped or refreshed.
    StoragePool {
        /// Pool name.
        name: String,
    },
    /// A network was defined, undefined, started or stopped.
    Network {
        /// Network name.
        name: String,
    },
    /// The connection to libvirtd closed (daemon stopped, keepalive timeout, error).
    Closed,
    /// A new connection to libvirtd is up; whatever was cached may be stale.
    Connected,
}

/// A domain event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DomainEvent {
    /// Lifecycle change (`VIR_DOMAIN_EVENT_*`), with libvirt's detail code.
    Lifecycle(Lifecycle),
    /// A device with this alias was hot-plugged.
    DeviceAdded(String),
    /// The guest released the device with this alias.
    DeviceRemoved(String),
    /// The guest refused to release the device with this alias.
    DeviceRemovalFailed(String),
    /// A tunable changed (disk I/O limits, CPU or memory tuning), by anyone.
    Tunable,
}

/// Domain lifecycle event types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// Defined: a new definition (or a transient domain made persistent), renamed, or from a
    /// snapshot.
    Defined,
    /// A persistent definition replaced by a new one: name, UUID, state and persistence stay.
    Updated,
    /// Undefined.
    Undefined,
    /// Started.
    Started,
    /// Paused.
    Suspended,
    /// Unpaused.
    Resumed,
    /// Stopped (shut off).
    Stopped,
    /// Guest-initiated shutdown in progress or finished.
    Shutdown,
    /// Power-management suspend.
    PmSuspended,
    /// Crashed.
    Crashed,
    /// An event type newer than this code.
    Other,
}

impl Lifecycle {
    fn from_raw(event: c_int, detail: c_int) -> Self {
        match u32::try_from(event).unwrap_or(u32::MAX) {
            sys::VIR_DOMAIN_EVENT_DEFINED
                if u32::try_from(detail).ok() == Some(sys::VIR_DOMAIN_EVENT_DEFINED_UPDATED) =>
            {
                Self::Updated
            }
            sys::VIR_DOMAIN_EVENT_DEFINED => Self::Defined,
            sys::VIR_DOMAIN_EVENT_UNDEFINED => Self::Undefined,
            sys::VIR_DOMAIN_EVENT_STARTED => Self::Started,
            sys::VIR_DOMAIN_EVENT_SUSPENDED => Self::Suspended,
            sys::VIR_DOMAIN_EVENT_RESUMED => Self::Resumed,
            sys::VIR_DOMAIN_EVENT_STOPPED => Self::Stopped,
            sys::VIR_DOMAIN_EVENT_SHUTDOWN => Self::Shutdown,
            sys::VIR_DOMAIN_EVENT_PMSUSPENDED => Self::PmSuspended,
            sys::VIR_DOMAIN_EVENT_CRASHED => Self::Crashed,
            _ => Self::Other,
        }
    }
}

/// Registers libvirt's default event loop implementation and runs it on a dedicated thread.
/// Must be called before any connection is opened; later calls return the first call's result.
pub fn start_event_loop() -> Result<(), virt::error::Error> {
    static STARTED: OnceLock<Result<(), virt::error::Error>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            virt::event::event_register_default_impl()?;
            std::thread::Builder::new()
                .name("libvirt-events".into())
                .spawn(|| {
                    loop {
                        if let Err(err) = virt::event::event_run_default_impl() {
                            tracing::error!(error = %err, "libvirt event loop iteration failed");
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                    }
                })
                .map_err(|_| virt::error::Error::last_error())?;
            Ok(())
        })
        .clone()
}

/// What a callback sends into.
struct Sink {
    tx: broadcast::Sender<Event>,
}

impl Sink {
    fn send(&self, event: Event) {
        // No receiver is fine: nobody is listening yet.
        let _ = self.tx.send(event);
    }
}

/// The callbacks registered on one connection; deregistered on drop.
pub struct Registration {
    conn: Connect,
    domain_ids: Vec<c_int>,
    pool_ids: Vec<c_int>,
    network_ids: Vec<c_int>,
    close: bool,
}

impl Registration {
    /// Registers every callback on `conn`, forwarding events to `tx`, and enables keepalive so a
    /// hung or vanished daemon is noticed within seconds.
    pub fn register(
        conn: &Connect,
        tx: &broadcast::Sender<Event>,
    ) -> Result<Self, virt::error::Error> {
        let mut reg = Registration {
            conn: conn.clone(),
            domain_ids: Vec::new(),
            pool_ids: Vec::new(),
            network_ids: Vec::new(),
            close: false,
        };
        // SAFETY: the function pointers are cast to the generic callback type exactly as libvirt's
        // VIR_*_EVENT_CALLBACK macros do; each is registered under the event ID whose real
        // signature it has. `opaque` is a leaked Box<Sink> that `free_sink` reclaims.
        unsafe {
            let lifecycle: unsafe extern "C" fn(
                sys::virConnectPtr,
                sys::virDomainPtr,
                c_int,
                c_int,
                *mut c_void,
            ) = domain_lifecycle;
            reg.domain_ids.push(register_domain(
                conn,
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                std::mem::transmute::<
                    unsafe extern "C" fn(
                        sys::virConnectPtr,
                        sys::virDomainPtr,
                        c_int,
                        c_int,
                        *mut c_void,
                    ),
                    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
                >(lifecycle),
                tx,
            )?);
            reg.domain_ids.push(register_domain(
                conn,
                sys::VIR_DOMAIN_EVENT_ID_TUNABLE,
                std::mem::transmute::<
                    unsafe extern "C" fn(
                        sys::virConnectPtr,
                        sys::virDomainPtr,
                        sys::virTypedParameterPtr,
                        c_int,
                        *mut c_void,
                    ),
                    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
                >(domain_tunable),
                tx,
            )?);
            for (id, cb) in [
                (
                    sys::VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
                    device_added as DeviceCallback,
                ),
                (
                    sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                    device_removed as DeviceCallback,
                ),
                (
                    sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
                    device_removal_failed as DeviceCallback,
                ),
            ] {
                reg.domain_ids.push(register_domain(
                    conn,
                    id,
                    std::mem::transmute::<
                        DeviceCallback,
                        unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
                    >(cb),
                    tx,
                )?);
            }
            for id in [
                sys::VIR_STORAGE_POOL_EVENT_ID_LIFECYCLE,
                sys::VIR_STORAGE_POOL_EVENT_ID_REFRESH,
            ] {
                let cb = if id == sys::VIR_STORAGE_POOL_EVENT_ID_LIFECYCLE {
                    std::mem::transmute::<
                        unsafe extern "C" fn(
                            sys::virConnectPtr,
                            sys::virStoragePoolPtr,
                            c_int,
                            c_int,
                            *mut c_void,
                        ),
                        unsafe extern "C" fn(
                            sys::virConnectPtr,
                            sys::virStoragePoolPtr,
                            *mut c_void,
                        ),
                    >(pool_lifecycle)
                } else {
                    pool_refresh
                        as unsafe extern "C" fn(
                            sys::virConnectPtr,
                            sys::virStoragePoolPtr,
                            *mut c_void,
                        )
                };
                let ret = sys::virConnectStoragePoolEventRegisterAny(
                    conn.as_ptr(),
                    std::ptr::null_mut(),
                    id as c_int,
                    Some(cb),
                    new_sink(tx),
                    Some(free_sink),
                );
                reg.pool_ids.push(check(ret)?);
            }
            let ret = sys::virConnectNetworkEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                sys::VIR_NETWORK_EVENT_ID_LIFECYCLE as c_int,
                Some(std::mem::transmute::<
                    unsafe extern "C" fn(
                        sys::virConnectPtr,
                        sys::virNetworkPtr,
                        c_int,
                        c_int,
                        *mut c_void,
                    ),
                    unsafe extern "C" fn(sys::virConnectPtr, sys::virNetworkPtr, *mut c_void),
                >(network_lifecycle)),
                new_sink(tx),
                Some(free_sink),
            );
            reg.network_ids.push(check(ret)?);
            let ret = sys::virConnectRegisterCloseCallback(
                conn.as_ptr(),
                Some(connection_closed),
                new_sink(tx),
                Some(free_sink),
            );
            check(ret)?;
            reg.close = true;
            // Keepalive belongs to the remote protocol (libvirtd, virtqemud). A driver that runs
            // inside this process, such as libvirt's `test:///` (benches/scale_nodes.rs), has no
            // peer to lose and answers VIR_ERR_NO_SUPPORT: that connection is fine without it.
            if let Err(e) = check(sys::virConnectSetKeepAlive(conn.as_ptr(), 2, 3)) {
                if e.code() != Enum::Known(ErrorNumber::NoSupport) {
                    return Err(e);
                }
                tracing::debug!("libvirt driver runs in this process; no keepalive");
            }
        }
        Ok(reg)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // SAFETY: the IDs were returned by the matching register calls on this connection, which
        // `self.conn` keeps referenced. Failures (a dead connection) are ignored: libvirt frees
        // the callbacks when the connection object goes away.
        unsafe {
            let ptr = self.conn.as_ptr();
            for id in self.domain_ids.drain(..) {
                sys::virConnectDomainEventDeregisterAny(ptr, id);
            }
            for id in self.pool_ids.drain(..) {
                sys::virConnectStoragePoolEventDeregisterAny(ptr, id);
            }
            for id in self.network_ids.drain(..) {
                sys::virConnectNetworkEventDeregisterAny(ptr, id);
            }
            if self.close {
                sys::virConnectUnregisterCloseCallback(ptr, Some(connection_closed));
            }
        }
    }
}

type DeviceCallback =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *const c_char, *mut c_void);

fn check(ret: c_int) -> Result<c_int, virt::error::Error> {
    if ret < 0 {
        Err(virt::error::Error::last_error())
    } else {
        Ok(ret)
    }
}

fn new_sink(tx: &broadcast::Sender<Event>) -> *mut c_void {
    Box::into_raw(Box::new(Sink { tx: tx.clone() })).cast()
}

unsafe fn register_domain(
    conn: &Connect,
    id: sys::virDomainEventID,
    cb: unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
    tx: &broadcast::Sender<Event>,
) -> Result<c_int, virt::error::Error> {
    // SAFETY: see `Registration::register`.
    let ret = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            id as c_int,
            Some(cb),
            new_sink(tx),
            Some(free_sink),
        )
    };
    check(ret)
}

unsafe extern "C" fn free_sink(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: `opaque` came from `new_sink` and libvirt frees it exactly once.
        drop(unsafe { Box::from_raw(opaque.cast::<Sink>()) });
    }
}

/// Copies a C string owned by libvirt; empty for NULL.
unsafe fn owned(ptr: *const c_char) -> String {
    if ptr.is_null() {
        String::new()
    } else {
        // SAFETY: libvirt passes NUL-terminated strings valid for the callback's duration.
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    }
}

unsafe fn sink<'a>(opaque: *mut c_void) -> &'a Sink {
    // SAFETY: `opaque` is the live Box<Sink> registered with this callback.
    unsafe { &*opaque.cast::<Sink>() }
}

unsafe fn send_domain(dom: sys::virDomainPtr, opaque: *mut c_void, kind: DomainEvent) {
    // SAFETY: `dom` is valid during the callback; the name is owned by it.
    let name = unsafe { owned(sys::virDomainGetName(dom)) };
    unsafe { sink(opaque) }.send(Event::Domain { name, kind });
}

unsafe extern "C" fn domain_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: called by libvirt with the registration's arguments.
    unsafe {
        send_domain(
            dom,
            opaque,
            DomainEvent::Lifecycle(Lifecycle::from_raw(event, detail)),
        )
    }
}

unsafe extern "C" fn domain_tunable(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _params: sys::virTypedParameterPtr,
    _nparams: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: called by libvirt with the registration's arguments; the parameters are libvirt's
    // and not kept.
    unsafe { send_domain(dom, opaque, DomainEvent::Tunable) }
}

unsafe extern "C" fn device_added(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    alias: *const c_char,
    opaque: *mut c_void,
) {
    // SAFETY: called by libvirt with the registration's arguments.
    unsafe { send_domain(dom, opaque, DomainEvent::DeviceAdded(owned(alias))) }
}

unsafe extern "C" fn device_removed(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    alias: *const c_char,
    opaque: *mut c_void,
) {
    // SAFETY: called by libvirt with the registration's arguments.
    unsafe { send_domain(dom, opaque, DomainEvent::DeviceRemoved(owned(alias))) }
}

unsafe extern "C" fn device_removal_failed(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    alias: *const c_char,
    opaque: *mut c_void,
) {
    // SAFETY: called by libvirt with the registration's arguments.
    unsafe { send_domain(dom, opaque, DomainEvent::DeviceRemovalFailed(owned(alias))) }
}

unsafe extern "C" fn pool_lifecycle(
    _conn: sys::virConnectPtr,
    pool: sys::virStoragePoolPtr,
    _event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: `pool` is valid during the callback; the name is owned by it.
    unsafe {
        let name = owned(sys::virStoragePoolGetName(pool));
        sink(opaque).send(Event::StoragePool { name });
    }
}

unsafe extern "C" fn pool_refresh(
    _conn: sys::virConnectPtr,
    pool: sys::virStoragePoolPtr,
    opaque: *mut c_void,
) {
    // SAFETY: as for `pool_lifecycle`.
    unsafe {
        let name = owned(sys::virStoragePoolGetName(pool));
        sink(opaque).send(Event::StoragePool { name });
    }
}

unsafe extern "C" fn network_lifecycle(
    _conn: sys::virConnectPtr,
    net: sys::virNetworkPtr,
    _event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: `net` is valid during the callback; the name is owned by it.
    unsafe {
        let name = owned(sys::virNetworkGetName(net));
        sink(opaque).send(Event::Network { name });
    }
}

unsafe extern "C" fn connection_closed(
    _conn: sys::virConnectPtr,
    _reason: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: called by libvirt with the registration's arguments.
    unsafe { sink(opaque) }.send(Event::Closed);
}
