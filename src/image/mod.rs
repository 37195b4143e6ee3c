//! Disk images as the agent reads them: what a file's first bytes say it is, and what a qcow2
//! header names, read without opening anything the header names.

pub mod chain;
pub mod qcow2;
pub mod sniff;
