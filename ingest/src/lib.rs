//! Ferrite's ingest layer: the MQTT and CoAP listeners, the HTTP ingest routes and the
//! payload decoders (JSON, NDJSON, InfluxDB line protocol, Sparkplug B) that write straight
//! into Arrow columns.
//!
//! Data flows transport → [`pipeline::Ingestor`] (decoder threads) → the engine's
//! [`ferrite_engine::BatchSink`]. This crate depends on `ferrite-engine` only; it never
//! reaches into storage, query or rules.

pub mod broker;
pub mod builder;
pub mod coap;
pub mod error;
pub mod http;
pub mod json;
pub mod line_protocol;
pub mod mqtt;
pub mod mqtt5;
pub mod mqtt_ws;
pub mod pipeline;
pub mod sparkplug;
pub mod topic;

pub use error::{Error, Result};
pub use pipeline::{Durability, IngestConfig, IngestReport, Ingestor, LineOptions, Payload, Transport};
