//! Ferrite's fleet simulator: thousands of virtual devices in one process, each with its
//! own MQTT connection, identity (registered through the API) and offline buffer; two
//! profiles (room sensors, a TSBS-like truck fleet), faults on request, live counters and a
//! summary. It doubles as the load generator of the benchmarks.

pub mod args;
pub mod fleet;
pub mod profile;
