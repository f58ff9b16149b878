//! Ferrite's Linux device agent on `ferrite-agent-core`: readings from sensors into a
//! store-and-forward spool on disk, out over MQTT (QoS 1, or 2 for exactly once across cut
//! connections) with HTTP as the fallback; OAuth2 tokens refreshed before they expire;
//! management commands and the twin; software updates into A/B slots with rollback; and a
//! gateway mode that forwards for child devices.

pub mod agent;
pub mod config;
pub mod gateway;
pub mod http;
pub mod ota;
pub mod sensor;
pub mod spool;
pub mod state;
