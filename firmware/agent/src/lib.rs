//! Ferrite's Linux device agent, on [`ferrite_agent_core`]. So far: the store-and-forward
//! spool on disk ([`spool`]), where readings wait while the device is offline.

pub mod spool;
