//! The cluster-wide controller.
