//! The `virtplane.io/v1alpha1` API: one module per kind, types only.
//!
//! Validation the API server can enforce (enums, patterns, bounds, `maxProperties`) lives in the
//! schema; what it cannot (immutability, cross-object rules) is checked by the agent and reported
//! as a condition. CEL rules (`x-kubernetes-validations`) are not emitted: the Kubernetes 1.20 API
//! server that virtplane supports rejects them under server-side apply.
// clippy reads the repeated `printcolumn(type_ = ...)` of kube's derive as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

mod clone;
mod common;
mod hypervisor;
mod interface;
mod iso;
mod storage;

pub use clone::*;
pub use common::*;
pub use hypervisor::*;
pub use interface::*;
pub use iso::*;
pub use storage::*;

/// The API group of every virtplane kind.
pub const GROUP: &str = "virtplane.io";
/// The label that binds an object to the node whose agent reconciles it.
pub const NODE_LABEL: &str = "virtplane.io/node";
