//! Shared fixtures of Ferrite's benchmarks: TSBS-like telemetry as JSON and line protocol.
//!
//! The criterion benches live in `benches/benches/`; end-to-end scenarios against a running
//! server are the binaries in `benches/src/bin/`, run together by `benches/run.sh`.
//! Results are recorded in `BENCHMARKS.md`.

pub mod load;
pub mod server;
pub mod tsbs;

/// The median of `v` (the upper one of an even count; 0 for none): what the scenarios
/// report, so that one slow run on a shared machine does not move the figure.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The `p` quantile (0 to 1) of `sorted` (nearest rank; 0 for none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

use serde::{Deserialize, Serialize};

/// One reading of the TSBS "IoT" use case (a truck's diagnostics), as a typed struct: the
/// peer decoders parse into `Vec<Reading>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reading {
    /// Device id.
    pub device_id: String,
    /// Event time, epoch milliseconds.
    pub ts: i64,
    /// Degrees.
    pub latitude: f64,
    /// Degrees.
    pub longitude: f64,
    /// Metres.
    pub elevation: f64,
    /// km/h.
    pub velocity: f64,
    /// Degrees.
    pub heading: f64,
    /// Percent.
    pub grade: f64,
    /// l/100km.
    pub fuel_consumption: f64,
    /// Fleet name.
    pub fleet: String,
    /// Whether the engine runs.
    pub engine_on: bool,
}

/// `n` readings from `devices` devices, deterministic.
pub fn readings(n: usize, devices: usize) -> Vec<Reading> {
    (0..n)
        .map(|i| {
            let x = i as f64;
            Reading {
                device_id: format!("truck_{}", i % devices),
                ts: 1_764_000_000_000 + i as i64 * 10,
                latitude: 52.0 + (x * 0.001).sin(),
                longitude: 13.0 + (x * 0.001).cos(),
                elevation: 100.0 + (i % 500) as f64,
                velocity: (i % 120) as f64 + 0.5,
                heading: (i % 360) as f64,
                grade: (i % 30) as f64 / 10.0,
                fuel_consumption: 20.0 + (i % 7) as f64 * 1.25,
                fleet: ["North", "South", "East", "West"][i % 4].to_owned(),
                engine_on: i % 5 != 0,
            }
        })
        .collect()
}

/// The readings as a JSON array (the HTTP ingest body).
pub fn json_array(readings: &[Reading]) -> Vec<u8> {
    serde_json::to_vec(readings).unwrap_or_default()
}

/// The readings as InfluxDB line protocol, nanosecond precision.
pub fn line_protocol(readings: &[Reading]) -> String {
    let mut s = String::with_capacity(readings.len() * 200);
    for r in readings {
        use std::fmt::Write;
        let _ = writeln!(
            s,
            "readings,device_id={},fleet={} latitude={},longitude={},elevation={},velocity={},heading={},grade={},fuel_consumption={},engine_on={} {}",
            r.device_id,
            r.fleet,
            r.latitude,
            r.longitude,
            r.elevation,
            r.velocity,
            r.heading,
            r.grade,
            r.fuel_consumption,
            r.engine_on,
            r.ts * 1_000_000
        );
    }
    s
}
