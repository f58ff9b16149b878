//! Integration tests of the rule engine: rules compiled against a catalog and run over
//! Arrow batches, as on a shard, without a server.

mod harness;
mod isolation;
mod patterns;
mod planning;
mod properties;
mod robustness;
mod windows;
