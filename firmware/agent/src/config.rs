//! The agent's command line.

use std::path::PathBuf;
use std::time::Duration;

use ferrite_agent_core::command::Level;
use ferrite_agent_core::duration::parse as parse_duration;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it keeps credentials, settings, the spool and the slots.
    pub state_dir: PathBuf,
    /// The server's HTTP API (tokens, fallback, downloads).
    pub http: String,
    /// The MQTT listener, `host:port`.
    pub mqtt: String,
    /// The device id (first start; stored after). None: a UUID is made.
    pub device_id: Option<String>,
    /// The client secret (first start; stored after).
    pub client_secret: Option<String>,
    /// A provisioning secret: a device without credentials registers itself with it.
    pub provisioning_secret: Option<String>,
    /// The device type it registers itself with.
    pub device_type: Option<String>,
    /// Management level.
    pub level: Level,
    /// The stream telemetry goes to.
    pub stream: String,
    /// `--sensor` specs.
    pub sensors: Vec<String>,
    /// `--actuator NAME:COMMAND` specs.
    pub actuators: Vec<(String, String)>,
    /// Time between readings.
    pub interval: Duration,
    /// Most readings per message.
    pub batch: usize,
    /// The spool's bound, bytes.
    pub spool_bytes: u64,
    /// Back-fill messages per second.
    pub backfill_rate: u32,
    /// MQTT QoS of telemetry: 1 (at least once) or 2 (exactly once across cut connections).
    pub qos: u8,
    /// The OTA public key.
    pub ota_key: Option<[u8; 32]>,
    /// The health check after an install.
    pub health_check: Option<String>,
    /// The software version of a device with no slots yet.
    pub version: String,
    /// Where the device is.
    pub location: Option<(f64, f64)>,
    /// fsync every spool append (off only for tests and benchmarks).
    pub sync: bool,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Send back-fill over HTTP when MQTT has been down this long (None: never).
    pub http_fallback_after: Option<Duration>,
    /// Gateway mode: listen for child devices (NDJSON over TCP) here.
    pub gateway_listen: Option<String>,
    /// Stop after this many readings (benchmarks).
    pub readings: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("ferrite-agent-state"),
            http: "http://127.0.0.1:8080".into(),
            mqtt: "127.0.0.1:1883".into(),
            device_id: None,
            client_secret: None,
            provisioning_secret: None,
            device_type: None,
            level: Level::Full,
            stream: "telemetry".into(),
            sensors: Vec::new(),
            actuators: Vec::new(),
            interval: Duration::from_secs(1),
            batch: 50,
            spool_bytes: 16 * 1024 * 1024,
            backfill_rate: 20,
            qos: 1,
            ota_key: None,
            health_check: None,
            version: env!("CARGO_PKG_VERSION").into(),
            location: None,
            sync: true,
            keep_alive: Duration::from_secs(30),
            http_fallback_after: Some(Duration::from_secs(30)),
            gateway_listen: None,
            readings: None,
        }
    }
}

/// The usage text.
pub const USAGE: &str = "\
ferrite-agent: Ferrite's device agent (telemetry, commands, twin, software updates)

USAGE: ferrite-agent [OPTIONS]

  --state-dir DIR           credentials, settings, spool and slots [ferrite-agent-state]
  --http URL                the server's HTTP API [http://127.0.0.1:8080]
  --mqtt HOST:PORT          the server's MQTT listener [127.0.0.1:1883]
  --device-id ID            the device id (first start; a UUID when absent)
  --client-secret SECRET    its client secret (first start; or --client-secret-file F)
  --provisioning-secret S   without credentials, register itself with this (pending until approved)
  --type TYPE               the device type it registers itself with
  --level full|semi|none    management level [full]
  --stream NAME             the stream telemetry goes to [telemetry]
  --sensor KIND:FIELD[:ARG] sim:temperature[:BASE[:AMPL]] | file:FIELD:PATH | cmd:FIELD:COMMAND (repeat)
  --actuator NAME:COMMAND   a command the device runs for `NAME` (params in $FERRITE_PARAMS) (repeat)
  --interval DURATION       time between readings [1s]
  --batch N                 most readings per message [50]
  --spool-bytes N           the offline buffer's bound [16777216]
  --backfill-rate N         back-fill messages per second [20]
  --qos 1|2                 telemetry QoS: 2 is exactly once across cut connections [1]
  --ota-key HEX             the OTA public key (ferrite ota keygen's ota.pub); without it no install
  --health-check COMMAND    run after switching slots; exit 0 = healthy
  --version V               software version of a device without slots [the agent's]
  --location LAT,LON        where the device is (reported on connect and on `locate`)
  --http-fallback DURATION  back-fill over HTTP after MQTT is down this long; `off` [30s]
  --gateway-listen ADDR     gateway mode: child devices connect here (NDJSON over TCP)
  --readings N              stop after N readings
  --no-sync                 do not fsync the spool (tests, benchmarks)
";

impl Config {
    /// Parses the command line (without the program name).
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut c = Config::default();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut value = || it.next().cloned().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--state-dir" => c.state_dir = value()?.into(),
                "--http" => c.http = value()?,
                "--mqtt" => c.mqtt = value()?,
                "--device-id" => c.device_id = Some(value()?),
                "--client-secret" => c.client_secret = Some(value()?),
                "--client-secret-file" => {
                    let f = value()?;
                    let s = std::fs::read_to_string(&f).map_err(|e| format!("--client-secret-file {f}: {e}"))?;
                    c.client_secret = Some(s.trim().to_owned());
                }
                "--provisioning-secret" => c.provisioning_secret = Some(value()?),
                "--type" => c.device_type = Some(value()?),
                "--level" => {
                    c.level = match value()?.as_str() {
                        "full" => Level::Full,
                        "semi" => Level::Semi,
                        "none" => Level::None,
                        other => return Err(format!("--level {other}: use full, semi or none")),
                    }
                }
                "--stream" => c.stream = value()?,
                "--sensor" => c.sensors.push(value()?),
                "--actuator" => {
                    let v = value()?;
                    let (n, cmd) = v.split_once(':').ok_or_else(|| format!("--actuator {v}: write NAME:COMMAND"))?;
                    c.actuators.push((n.to_owned(), cmd.to_owned()));
                }
                "--interval" => c.interval = parse_duration(&value()?)?,
                "--batch" => c.batch = value()?.parse().map_err(|_| "--batch needs a number".to_owned())?,
                "--spool-bytes" => {
                    c.spool_bytes = value()?.parse().map_err(|_| "--spool-bytes needs a number".to_owned())?
                }
                "--backfill-rate" => {
                    c.backfill_rate = value()?.parse().map_err(|_| "--backfill-rate needs a number".to_owned())?
                }
                "--qos" => {
                    c.qos = match value()?.as_str() {
                        "1" => 1,
                        "2" => 2,
                        other => return Err(format!("--qos {other}: use 1 or 2")),
                    }
                }
                "--ota-key" => {
                    let v = value()?;
                    let text = if std::path::Path::new(&v).is_file() {
                        std::fs::read_to_string(&v).map_err(|e| format!("--ota-key {v}: {e}"))?
                    } else {
                        v
                    };
                    c.ota_key = Some(crate::ota::parse_key(&text)?);
                }
                "--health-check" => c.health_check = Some(value()?),
                "--version" => c.version = value()?,
                "--location" => {
                    let v = value()?;
                    let parsed =
                        v.split_once(',').and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
                    c.location = Some(parsed.ok_or_else(|| format!("--location {v}: write LAT,LON"))?);
                }
                "--http-fallback" => {
                    let v = value()?;
                    c.http_fallback_after = if v == "off" { None } else { Some(parse_duration(&v)?) };
                }
                "--gateway-listen" => c.gateway_listen = Some(value()?),
                "--readings" => {
                    c.readings = Some(value()?.parse().map_err(|_| "--readings needs a number".to_owned())?)
                }
                "--no-sync" => c.sync = false,
                "--keep-alive" => c.keep_alive = parse_duration(&value()?)?,
                other => return Err(format!("unknown option {other:?}\n\n{USAGE}")),
            }
        }
        if c.batch == 0 || c.batch > 10_000 {
            return Err("--batch must be between 1 and 10000".into());
        }
        if c.backfill_rate == 0 {
            return Err("--backfill-rate must be at least 1".into());
        }
        if c.interval.is_zero() {
            return Err("--interval must be over zero".into());
        }
        if c.sensors.is_empty() {
            c.sensors.push("sim:temperature".into());
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn flags_parse_with_defaults_and_clear_errors() -> Result<(), String> {
        let c = Config::parse(&args("--device-id d1 --interval 250ms --qos 2 --location 48.1,11.5"))?;
        assert_eq!(c.device_id.as_deref(), Some("d1"));
        assert_eq!(c.interval, Duration::from_millis(250));
        assert_eq!(c.qos, 2);
        assert_eq!(c.location, Some((48.1, 11.5)));
        assert_eq!(c.sensors, vec!["sim:temperature".to_owned()]);
        assert!(Config::parse(&args("--qos 3")).is_err_and(|e| e.contains("use 1 or 2")));
        assert!(Config::parse(&args("--bogus")).is_err_and(|e| e.contains("unknown option")));
        assert!(Config::parse(&args("--interval")).is_err_and(|e| e.contains("needs a value")));
        Ok(())
    }
}
