//! virtplane: libvirt virtual machine devices, clones and installation media, managed
//! declaratively from Kubernetes.

pub mod agent;
pub mod api;
pub mod backoff;
pub mod conditions;
pub mod controller;
pub mod copy;
pub mod crdgen;
pub mod download;
pub mod http;
pub mod image;
pub mod libvirt;
pub mod metrics;
pub mod shutdown;
pub mod tenancy;
