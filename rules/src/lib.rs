//! Ferrite's rule language: a parser, a planner that lowers rules onto DataFusion
//! expressions and accumulators, and the operators that run them on the engine's shards.
//!
//! ```text
//!  rule file ──syntax::parse──▶ ast::RuleFile ──plan::compile (DataFusion)──▶ CompiledRule
//!                                                                               │ deploy
//!  committed batch (shard k) ──▶ RuleEngine::process ──▶ align to the planned schema
//!        ──▶ per-device watermark (late rows ──▶ `<stream>_late`)
//!        ──▶ stream filter (one boolean kernel per batch)
//!        ──▶ operator: stateless │ window (accumulators per key and window) │ pattern (automaton per device)
//!        ──▶ having ──▶ select list ──▶ output rate ──▶ derived stream, `alerts`, MQTT, webhooks
//! ```
//!
//! State keyed by device lives on the shard that owns the device, and a rule keyed that way
//! takes no lock another shard could hold. Two things are shared across shards and locked:
//! windows keyed by something other than `device_id` (or by nothing), whose state is one
//! map for all shards, and lookup tables fed from a stream (`join` on a stream), updated by
//! whichever shard commits that stream's rows. A rule that panics is disabled (status
//! `failed`) and the shard goes on. This crate depends on `ferrite-engine` only (and
//! DataFusion).

pub mod ast;
mod codec;
pub mod error;
pub mod files;
pub mod http;
pub mod inspect;
pub mod join;
pub mod lookup;
pub mod output;
pub mod pattern;
pub mod plan;
pub mod recorded;
pub mod runtime;
pub mod sandbox;
pub mod scalar;
pub mod slots;
pub mod sql_syntax;
pub mod syntax;
pub mod window;

pub use error::{Diagnostic, Error, Result};
pub use files::{FileStatus, RuleFiles};
pub use output::{ActionSink, NoActions};
pub use plan::{CompiledRule, SchemaSource};
pub use runtime::{RuleEngine, RuleInfo, compile_text};
