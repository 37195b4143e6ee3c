//! Image files as the agent reads them: what their first bytes say they are.

pub mod sniff;
