//! Starting a release `ferrite serve` for a scenario, on ephemeral ports.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running server, killed on drop.
pub struct Ferrite {
    child: Child,
    /// MQTT address.
    pub mqtt: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
    /// MQTT over TLS address (with `--tls-cert`).
    pub mqtts: Option<SocketAddr>,
    /// CoAP address.
    pub coap: Option<SocketAddr>,
    /// The admin bearer token, when identity is on.
    pub token: Option<String>,
}

impl Drop for Ferrite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The admin's requests to a server.
#[derive(Debug, Clone)]
pub struct Admin {
    /// The server's HTTP address.
    pub http: SocketAddr,
    /// The admin bearer token.
    pub token: Option<String>,
}

impl Admin {
    /// POSTs `body` (of `content_type`) with the admin token; the answer's JSON.
    pub fn post(&self, path: &str, content_type: &str, body: &[u8]) -> Result<serde_json::Value, String> {
        let token = self.token.as_deref().ok_or("identity is off: no admin token")?;
        let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
        let mut resp = agent
            .post(&format!("http://{}{path}", self.http))
            .header("Authorization", &format!("Bearer {token}"))
            .header("Content-Type", content_type)
            .send(body)
            .map_err(|e| e.to_string())?;
        let text = resp.body_mut().read_to_string().map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("{path}: {} {text}", resp.status()));
        }
        serde_json::from_str(&text).map_err(|e| e.to_string())
    }
}

/// Checks `cond` every 20 ms until it holds (a state the server reports, polled: there is
/// no event to wait on over HTTP); an error naming `what` after `limit`.
pub fn poll_until(
    what: &str,
    limit: std::time::Duration,
    mut cond: impl FnMut() -> Result<bool, String>,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + limit;
    while !cond()? {
        if std::time::Instant::now() > deadline {
            return Err(format!("timed out after {limit:?} waiting for {what}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

/// CPU time (user + system) process `pid` has used so far, in microseconds (from /proc;
/// Linux counts it in 100ths of a second).
pub fn cpu_us(pid: u32) -> Result<u64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    // Fields after the command's closing parenthesis; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or("no /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).ok_or("bad /proc stat");
    // 100 ticks a second on Linux.
    Ok((ticks(11)? + ticks(12)?) * 10_000)
}

/// Path of the `ferrite` binary next to the running benchmark binary (same profile).
pub fn ferrite_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent().map(|p| p.join("ferrite")).unwrap_or_default()
}

impl Ferrite {
    /// Starts the server on `data_dir` with `extra` flags.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Result<Self, String> {
        let bin = ferrite_binary();
        let mut child = Command::new(&bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--mqtt-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--pg-listen",
                "127.0.0.1:0",
                "--flight-listen",
                "127.0.0.1:0",
                "--mqtts-listen",
                "127.0.0.1:0",
                "--https-listen",
                "127.0.0.1:0",
                "--coap-listen",
                "127.0.0.1:0",
                "--log",
                "warn",
            ])
            // The load scenarios measure ingest and queries without identity unless a
            // scenario asks for it (`--auth on`).
            .args(if extra.contains(&"--auth") { &[][..] } else { &["--auth", "off"][..] })
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {} (cargo build --release --bin ferrite): {e}", bin.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map_err(|e| e.to_string())?;
        let rest = line.trim().strip_prefix("ferrite listening: ").ok_or_else(|| format!("unexpected {line:?}"))?;
        let mut mqtt = None;
        let mut http = None;
        let mut mqtts = None;
        let mut coap = None;
        for part in rest.split_whitespace() {
            if let Some(a) = part.strip_prefix("mqtts=") {
                mqtts = a.parse().ok();
            } else if let Some(a) = part.strip_prefix("mqtt=") {
                mqtt = a.parse().ok();
            } else if let Some(a) = part.strip_prefix("http=") {
                http = a.parse().ok();
            } else if let Some(a) = part.strip_prefix("coap=") {
                coap = a.parse().ok();
            }
        }
        // Identity writes the admin token before the listeners start.
        let token = std::fs::read_to_string(data_dir.join("admin.token")).ok().map(|t| t.trim().to_owned());
        Ok(Self {
            child,
            mqtt: mqtt.ok_or("no mqtt address")?,
            http: http.ok_or("no http address")?,
            mqtts,
            coap,
            token,
        })
    }

    /// The server's process id (to read its memory from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// POSTs `body` (of `content_type`) with the admin token; the answer's JSON.
    pub fn admin_post(&self, path: &str, content_type: &str, body: &[u8]) -> Result<serde_json::Value, String> {
        self.admin().post(path, content_type, body)
    }

    /// The admin's HTTP client, to move to another thread.
    pub fn admin(&self) -> Admin {
        Admin { http: self.http, token: self.token.clone() }
    }

    /// Value of one series in `/metrics` (0 when absent).
    pub fn metric(&self, series: &str) -> u64 {
        let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
        let mut request = agent.get(&format!("http://{}/metrics", self.http));
        if let Some(t) = &self.token {
            request = request.header("Authorization", &format!("Bearer {t}"));
        }
        let text = request.call().ok().and_then(|mut r| r.body_mut().read_to_string().ok()).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    }
}

/// A memory figure of process `pid` from `/proc/{pid}/status`, in KiB: `VmRSS` (resident
/// now) or `VmHWM` (the peak of resident memory).
pub fn memory_kib(pid: u32, field: &str) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|v| v.strip_prefix(':')))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))
}

/// A free TCP port on 127.0.0.1 (for a peer that cannot pick its own).
pub fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// mosquitto, the peer of the MQTT scenarios; killed on drop.
pub struct Mosquitto {
    child: Child,
}

impl Mosquitto {
    /// Starts mosquitto with the configuration `conf` (written to `dir`) and waits until
    /// every one of `ports` accepts connections.
    pub fn start(dir: &Path, conf: &str, ports: &[u16]) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let path = dir.join(format!("mosquitto-{}.conf", ports.first().copied().unwrap_or(0)));
        std::fs::write(&path, conf).map_err(|e| e.to_string())?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start mosquitto (apt-get install mosquitto): {e}"))?;
        let broker = Self { child };
        for &port in ports {
            poll_until("mosquitto to listen", std::time::Duration::from_secs(10), || {
                Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
            })?;
        }
        Ok(broker)
    }

    /// Its process id (to read its memory from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
