//! Disk images as the agent reads them: what a file's header says it is, read without opening
//! anything the header names.

pub mod qcow2;
