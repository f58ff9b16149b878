//! The Ferrite engine: the event model, the stream catalog and its schemas, the sharded bus
//! that carries Arrow batches from ingest to storage and rules, and the metrics registry.
//!
//! ```text
//!  ingest (decode) ──Vec<StreamBatch> + Ack──▶ BatchSink (Engine)
//!                                              │ split rows by hash(device_id) % shards
//!                        bounded crossbeam channel per shard (full ⇒ the sender blocks)
//!                                              ▼
//!                                 shard thread: drain a group of submissions,
//!                                 ShardStore::commit (WAL + hot buffer), then ack,
//!                                 then hand the batches to every BatchObserver
//! ```
//!
//! This crate depends on no other Ferrite crate: storage, ingest, query and rules meet here
//! through the traits [`BatchSink`], [`ShardStore`] and [`BatchObserver`].

pub mod ack;
pub mod api_doc;
pub mod auth;
pub mod batch;
pub mod catalog;
pub mod checkpoint;
pub mod clock;
pub mod error;
pub mod failpoint;
pub mod health;
pub mod ids;
pub mod limits;
pub mod metrics;
pub mod plugin;
pub mod quota;
pub mod shard;
pub mod system;
pub mod usage;

pub use ack::{Ack, AckPart};
pub use auth::{AccessControl, Action, AllowAll, Caller, Principal, RequestContext, Resource, Transport};
pub use batch::{DEVICE_COLUMN, StreamBatch, TIME_COLUMN, align_to_schema, time_field_type, widest_schema};
pub use catalog::{CatalogLimits, FieldType, StreamCatalog, StreamSchema};
pub use checkpoint::{Checkpoint, ObserverState, Recovery, RecoveryReport, Replayed};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, ErrorClass, Result};
pub use health::Health;
pub use ids::{DeviceId, StreamName, validate_tenant};
pub use metrics::{Gauge, Metrics};
pub use shard::{BatchObserver, BatchSink, Cutter, Engine, EngineConfig, ShardStore};
pub use system::SystemTable;
