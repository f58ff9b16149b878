//! `ferrite-sim`'s command line. The flags of the contract (`--http`, `--mqtt`,
//! `--token-file`, `--devices`, `--rate`, `--duration`, `--profile`, `--summary-json`) keep
//! their names and defaults: scripts rely on them.

use std::time::Duration;

use ferrite_agent_core::duration::parse as duration;

/// Which kind of fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Environmental sensors: temperature, humidity, pressure, battery.
    Sensors,
    /// A vehicle fleet like TSBS's "iot" use case: position, speed, fuel, load, diagnostics.
    Trucks,
}

impl Profile {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Sensors => "sensors",
            Profile::Trucks => "trucks",
        }
    }
}

/// A share of the fleet offline for a while.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Partition {
    /// Share of devices, 0-1.
    pub share: f64,
    /// When it starts, after the run started.
    pub start: Duration,
    /// How long it lasts.
    pub length: Duration,
}

/// A burst of extra readings from every device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Burst {
    /// Readings per device per burst.
    pub readings: u32,
    /// Time between bursts.
    pub every: Duration,
}

/// How the simulator runs.
#[derive(Debug, Clone)]
pub struct Args {
    /// The server's HTTP API.
    pub http: String,
    /// The MQTT listener.
    pub mqtt: String,
    /// A file holding a bearer token that may register devices.
    pub token_file: String,
    /// How many devices.
    pub devices: usize,
    /// Readings per device per second.
    pub rate: f64,
    /// How long to send.
    pub duration: Duration,
    /// Which fleet.
    pub profile: Profile,
    /// The stream (default: by profile).
    pub stream: Option<String>,
    /// Device id prefix.
    pub prefix: Option<String>,
    /// Print the summary as one JSON object on stdout.
    pub summary_json: bool,
    /// Connections opened per second while the fleet comes up.
    pub connect_rate: u32,
    /// Readings each device buffers while offline.
    pub buffer: usize,
    /// Mean time between random disconnects of one device.
    pub disconnect_every: Option<Duration>,
    /// A partition.
    pub partition: Option<Partition>,
    /// Each device's clock is off by a random amount up to this, either way.
    pub clock_skew: Option<Duration>,
    /// Bursts.
    pub burst: Option<Burst>,
    /// Share of messages sent malformed.
    pub malformed: f64,
    /// How long to wait for acknowledgements after the last reading.
    pub drain: Duration,
    /// Live counters every this long on stderr (zero: none).
    pub progress: Duration,
    /// Register nothing: devices connect without a password (a server with `--auth off`,
    /// or another broker, as a load generator).
    pub no_provision: bool,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            http: "http://127.0.0.1:8080".into(),
            mqtt: "127.0.0.1:1883".into(),
            token_file: "ferrite-data/admin.token".into(),
            devices: 10_000,
            rate: 1.0,
            duration: Duration::from_secs(60),
            profile: Profile::Trucks,
            stream: None,
            prefix: None,
            summary_json: false,
            connect_rate: 1000,
            buffer: 1000,
            disconnect_every: None,
            partition: None,
            clock_skew: None,
            burst: None,
            malformed: 0.0,
            drain: Duration::from_secs(30),
            progress: Duration::from_secs(1),
            no_provision: false,
        }
    }
}

/// The usage text.
pub const USAGE: &str = "\
ferrite-sim: a fleet of virtual devices, each with its own MQTT connection, identity and offline buffer

USAGE: ferrite-sim [OPTIONS]

  --http URL               the server's HTTP API [http://127.0.0.1:8080]
  --mqtt HOST:PORT         the server's MQTT listener [127.0.0.1:1883]
  --token-file FILE        a bearer token that may register devices [ferrite-data/admin.token]
  --devices N              virtual devices [10000]
  --rate N/s               readings per device per second (N/s, N/m or N) [1/s]
  --duration DURATION      how long to send [60s]
  --profile trucks|sensors the fleet [trucks]
  --stream NAME            the stream [trucks for trucks, telemetry for sensors]
  --prefix P               device ids are P-00001... [truck or sensor]
  --summary-json           print the summary as one JSON object on stdout
  --connect-rate N         connections opened per second [1000]
  --buffer N               readings each device keeps while offline [1000]
  --drain DURATION         wait this long for acknowledgements at the end [30s]
  --progress DURATION      live counters on stderr this often; 0 for none [1s]
  --no-provision           register nothing; connect without passwords (--auth off, other brokers)
faults:
  --disconnect-every D     each device drops its connection at random, on average every D
  --partition S@START+LEN  a share of the fleet offline, e.g. 20%@10s+15s
  --clock-skew D           each device's clock off by up to D either way
  --burst N@EVERY          every EVERY, each device sends N extra readings at once, e.g. 20@10s
  --malformed S            a share of messages sent as malformed JSON, e.g. 1%
";

/// Parses `20%` or `0.2`.
fn share(s: &str) -> Result<f64, String> {
    let v = match s.trim().strip_suffix('%') {
        Some(p) => p.parse::<f64>().map(|p| p / 100.0),
        None => s.trim().parse::<f64>(),
    }
    .map_err(|_| format!("{s:?} is not a share (20% or 0.2)"))?;
    if (0.0..=1.0).contains(&v) { Ok(v) } else { Err(format!("{s:?} is not between 0 and 100%")) }
}

/// Parses `1/s`, `30/m`, `0.5`.
fn rate(s: &str) -> Result<f64, String> {
    let (n, per) = s.split_once('/').unwrap_or((s, "s"));
    let n: f64 = n.trim().parse().map_err(|_| format!("--rate {s:?}: write N/s or N/m"))?;
    let per = match per.trim() {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("--rate {s:?}: per {other:?} is not s, m or h")),
    };
    let r = n / per;
    if r > 0.0 && r.is_finite() { Ok(r) } else { Err(format!("--rate {s:?} must be over zero")) }
}

impl Args {
    /// The stream telemetry goes to.
    pub fn stream(&self) -> String {
        self.stream.clone().unwrap_or_else(|| match self.profile {
            Profile::Trucks => "trucks".into(),
            Profile::Sensors => "telemetry".into(),
        })
    }

    /// The id prefix.
    pub fn prefix(&self) -> String {
        self.prefix.clone().unwrap_or_else(|| match self.profile {
            Profile::Trucks => "truck".into(),
            Profile::Sensors => "sensor".into(),
        })
    }

    /// Parses the command line (without the program name).
    pub fn parse(argv: &[String]) -> Result<Self, String> {
        let mut a = Args::default();
        let mut it = argv.iter();
        while let Some(flag) = it.next() {
            let mut value = || it.next().cloned().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--http" => a.http = value()?,
                "--mqtt" => a.mqtt = value()?,
                "--token-file" => a.token_file = value()?,
                "--devices" => {
                    a.devices = value()?.parse().map_err(|_| "--devices needs a number".to_owned())?;
                }
                "--rate" => a.rate = rate(&value()?)?,
                "--duration" => a.duration = duration(&value()?)?,
                "--profile" => {
                    a.profile = match value()?.as_str() {
                        "trucks" => Profile::Trucks,
                        "sensors" => Profile::Sensors,
                        other => return Err(format!("--profile {other}: use trucks or sensors")),
                    }
                }
                "--stream" => a.stream = Some(value()?),
                "--prefix" => a.prefix = Some(value()?),
                "--summary-json" => a.summary_json = true,
                "--no-provision" => a.no_provision = true,
                "--connect-rate" => {
                    a.connect_rate = value()?.parse().map_err(|_| "--connect-rate needs a number".to_owned())?;
                }
                "--buffer" => a.buffer = value()?.parse().map_err(|_| "--buffer needs a number".to_owned())?,
                "--drain" => a.drain = duration(&value()?)?,
                "--progress" => a.progress = duration(&value()?)?,
                "--disconnect-every" => a.disconnect_every = Some(duration(&value()?)?),
                "--partition" => {
                    let v = value()?;
                    let bad = || format!("--partition {v}: write SHARE@START+LENGTH, e.g. 20%@10s+15s");
                    let (s, rest) = v.split_once('@').ok_or_else(bad)?;
                    let (start, length) = rest.split_once('+').ok_or_else(bad)?;
                    a.partition =
                        Some(Partition { share: share(s)?, start: duration(start)?, length: duration(length)? });
                }
                "--clock-skew" => a.clock_skew = Some(duration(&value()?)?),
                "--burst" => {
                    let v = value()?;
                    let (n, every) =
                        v.split_once('@').ok_or_else(|| format!("--burst {v}: write N@EVERY, e.g. 20@10s"))?;
                    let readings = n.parse().map_err(|_| format!("--burst {v}: {n:?} is not a number"))?;
                    a.burst = Some(Burst { readings, every: duration(every)? });
                }
                "--malformed" => a.malformed = share(&value()?)?,
                other => return Err(format!("unknown option {other:?}\n\n{USAGE}")),
            }
        }
        if a.devices == 0 || a.devices > 1_000_000 {
            return Err("--devices must be between 1 and 1000000".into());
        }
        if a.connect_rate == 0 {
            return Err("--connect-rate must be at least 1".into());
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn the_contract_flags_and_their_defaults() -> Result<(), String> {
        let d = Args::parse(&[])?;
        assert_eq!(
            (d.http.as_str(), d.mqtt.as_str(), d.token_file.as_str(), d.devices, d.rate, d.duration, d.profile),
            (
                "http://127.0.0.1:8080",
                "127.0.0.1:1883",
                "ferrite-data/admin.token",
                10_000,
                1.0,
                Duration::from_secs(60),
                Profile::Trucks
            )
        );
        assert_eq!(d.stream(), "trucks");
        let a = Args::parse(&args(
            "--devices 50 --rate 30/m --duration 5s --profile sensors --summary-json --partition 20%@1s+2s --burst 5@1s --malformed 1%",
        ))?;
        assert_eq!((a.devices, a.rate, a.stream(), a.summary_json), (50, 0.5, "telemetry".to_owned(), true));
        assert_eq!(
            a.partition,
            Some(Partition { share: 0.2, start: Duration::from_secs(1), length: Duration::from_secs(2) })
        );
        assert_eq!(a.burst, Some(Burst { readings: 5, every: Duration::from_secs(1) }));
        assert!((a.malformed - 0.01).abs() < 1e-9);
        assert!(Args::parse(&args("--rate 0/s")).is_err());
        assert!(Args::parse(&args("--partition 20%")).is_err_and(|e| e.contains("SHARE@START+LENGTH")));
        assert!(Args::parse(&args("--profile boats")).is_err());
        Ok(())
    }
}
