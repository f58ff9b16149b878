//! The device side of Ferrite's protocol, without the standard library (`no_std` + `alloc`),
//! so that the same logic runs in the Linux agent, the fleet simulator and a microcontroller:
//!
//! - [`topics`]: the MQTT topics of the platform's contract, and which inbound topic is what;
//! - [`payload`]: telemetry batches, commands and their results, twin documents (JSON);
//! - [`command`]: what a device does with a command: admit it by management level and lock
//!   state, recognise a redelivered one by its id and answer it again without re-running it;
//! - [`record`]: the store-and-forward record format, whose torn or damaged records are
//!   detected and skipped without losing the records around them;
//! - [`spool`]: the bounded offline buffer's bookkeeping (segments, drop-oldest, back-fill
//!   cursor) over storage the caller owns;
//! - [`backoff`]: exponential reconnect back-off with full jitter;
//! - [`token`]: when to refresh an access token;
//! - [`duration`]: durations as written on a command line;
//! - [`ota`]: verifying a software artifact (SHA-256 and an Ed25519 signature over it).
//!
//! Nothing here does I/O or reads a clock: callers pass bytes and times in.

#![no_std]

extern crate alloc;

pub mod backoff;
pub mod command;
pub mod duration;
pub mod ota;
pub mod payload;
pub mod record;
pub mod spool;
pub mod token;
pub mod topics;
