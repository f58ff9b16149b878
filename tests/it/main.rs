//! End-to-end tests: each starts the real `ferrite` binary on ephemeral ports with a
//! temporary data directory and drives it with real clients (HTTP, rumqttc, mosquitto_pub,
//! the parquet crate, and DuckDB/pyarrow/polars when installed).

mod archive;
mod archive_lifecycle;
mod broker;
mod coap;
mod commands;
mod crash_loop;
mod devices;
mod durability;
mod faults;
mod flight;
mod harness;
mod http;
mod identity;
mod influx;
mod limits;
mod mqtt;
mod mqtt5;
mod object_store;
mod oidc;
mod openapi;
mod ota;
mod overload;
mod pgwire;
mod rules;
mod schemas;
mod sparkplug;
mod tenants;
mod tls;
mod usage;
