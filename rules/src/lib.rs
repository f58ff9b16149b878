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
//! State lives on the shard that owns the device; nothing on the hot path takes a lock
//! another shard could hold. This crate depends on `ferrite-engine` only (and DataFusion).

pub mod ast;
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
pub mod scalar;
pub mod slots;
pub mod syntax;
pub mod window;

pub use error::{Diagnostic, Error, Result};
pub use files::{FileStatus, RuleFiles};
pub use output::{ActionSink, NoActions};
pub use plan::{CompiledRule, SchemaSource};
pub use runtime::{RuleEngine, RuleInfo, compile_text};
