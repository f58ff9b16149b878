//! Starting, stopping and talking to a real server process.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// How long any wait in these tests may take before it fails loudly.
pub const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Server {
    child: Option<Child>,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    /// The PostgreSQL wire listener (absent with `--pg-listen off`).
    pub pg: Option<SocketAddr>,
    /// The Arrow Flight SQL listener (absent with `--flight-listen off`).
    pub flight: Option<SocketAddr>,
    /// The MQTT over TLS listener (present with `--tls-cert`).
    pub mqtts: Option<SocketAddr>,
    /// The HTTPS listener (present with `--tls-cert`).
    pub https: Option<SocketAddr>,
    /// The CoAP listener (absent with `--coap-listen off`).
    pub coap: Option<SocketAddr>,
    /// The admin bearer token (also the MQTT password of user `admin`); empty with `--auth off`.
    pub token: String,
    agent: ureq::Agent,
}

impl Server {
    /// Starts `ferrite serve` on `data_dir` with ephemeral ports and the given extra flags.
    pub fn start(data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(data_dir, extra, &[])
    }

    /// Runs `ferrite serve` (as [`Server::start_with_env`] would) until it ends by itself,
    /// whether or not it got to print its addresses: a kill point that the server reaches
    /// while it starts (a compaction pass at start) stops it before that line.
    pub fn run_to_exit(data_dir: &Path, extra: &[&str], env: &[(&str, String)]) -> anyhow::Result<ExitStatus> {
        let mut child =
            Self::command(data_dir, extra, env).stdout(Stdio::null()).spawn().context("spawning ferrite")?;
        wait(&mut child)
    }

    /// `ferrite serve` on `data_dir` with ephemeral ports, `extra` flags and `env`.
    fn command(data_dir: &Path, extra: &[&str], env: &[(&str, String)]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ferrite"));
        command
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
                // FERRITE_TEST_LOG=debug (or any filter) shows more of the servers' logs.
                &std::env::var("FERRITE_TEST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            ])
            .args(extra)
            .env_remove("RUST_LOG")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stderr(Stdio::inherit());
        command
    }

    /// Like [`Server::start`], with extra environment variables.
    pub fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, String)]) -> anyhow::Result<Self> {
        let mut child =
            Self::command(data_dir, extra, env).stdout(Stdio::piped()).spawn().context("spawning ferrite")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = rx.recv_timeout(TIMEOUT).context("server did not print its addresses")?;
        let rest =
            line.strip_prefix("ferrite listening: ").with_context(|| format!("unexpected first line {line:?}"))?;
        let mut mqtt = None;
        let mut http = None;
        let mut pg = None;
        let mut flight = None;
        let mut mqtts = None;
        let mut https = None;
        let mut coap = None;
        for part in rest.split_whitespace() {
            if let Some(a) = part.strip_prefix("mqtt=") {
                mqtt = Some(a.parse()?);
            } else if let Some(a) = part.strip_prefix("http=") {
                http = Some(a.parse()?);
            } else if let Some(a) = part.strip_prefix("pg=") {
                pg = Some(a.parse()?);
            } else if let Some(a) = part.strip_prefix("flight=") {
                flight = Some(a.parse()?);
            } else if let Some(a) = part.strip_prefix("mqtts=") {
                mqtts = Some(a.parse()?);
            } else if let Some(a) = part.strip_prefix("https=") {
                https = Some(a.parse()?);
            } else if let Some(a) = part.strip_prefix("coap=") {
                coap = Some(a.parse()?);
            }
        }
        let agent =
            ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(TIMEOUT)).build().new_agent();
        // Identity writes the admin token before the listeners start.
        let token = std::fs::read_to_string(data_dir.join("admin.token")).unwrap_or_default().trim().to_owned();
        Ok(Self {
            child: Some(child),
            mqtt: mqtt.context("no mqtt address")?,
            http: http.context("no http address")?,
            pg,
            flight,
            mqtts,
            https,
            coap,
            token,
            agent,
        })
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// The `Authorization` header of the admin.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// An HTTP agent that does not treat error statuses as errors.
    pub fn agent(&self) -> &ureq::Agent {
        &self.agent
    }

    /// Creates tenant `tenant` and a service client of it with `roles`; an access token of
    /// that client.
    pub fn tenant_token(&self, tenant: &str, roles: &[&str]) -> anyhow::Result<String> {
        let (status, v) = self.post_json("/api/v1/tenants", &serde_json::json!({"id": tenant}))?;
        anyhow::ensure!(status == 201, "tenant {tenant}: {v}");
        let (status, v) = self.post_json("/api/v1/clients", &serde_json::json!({"tenant": tenant, "roles": roles}))?;
        anyhow::ensure!(status == 201, "client of {tenant}: {v}");
        let (id, secret) =
            (v["client_id"].as_str().unwrap_or_default(), v["client_secret"].as_str().unwrap_or_default());
        let mut resp = self.agent.post(&self.url("/oauth2/token")).send_form([
            ("grant_type", "client_credentials"),
            ("client_id", id),
            ("client_secret", secret),
        ])?;
        let token: Value = serde_json::from_str(&resp.body_mut().read_to_string()?)?;
        Ok(token["access_token"].as_str().context("no access token")?.to_owned())
    }

    /// POSTs `body` with `content_type`; returns the status and the body parsed as JSON
    /// (`Value::Null` when empty).
    pub fn post(&self, path: &str, content_type: &str, body: &[u8]) -> anyhow::Result<(u16, Value)> {
        let mut resp = self
            .agent
            .post(&self.url(path))
            .header("Content-Type", content_type)
            .header("Authorization", self.bearer())
            .send(body)?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string()?;
        let json =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).with_context(|| text.clone())? };
        Ok((status, json))
    }

    /// POSTs JSON; returns the status, the `Retry-After` header and the body as text.
    pub fn post_json_raw(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Option<String>, String)> {
        let mut resp = self
            .agent
            .post(&self.url(path))
            .header("Content-Type", "application/json")
            .header("Authorization", self.bearer())
            .send(body.to_string())?;
        let retry = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
        Ok((resp.status().as_u16(), retry, resp.body_mut().read_to_string()?))
    }

    pub fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        self.post(path, "application/json", body.to_string().as_bytes())
    }

    /// A request with a JSON body (`POST`, `PUT` or `PATCH`) and `auth` (default: the
    /// admin's token); the status and the answer as JSON (or as a string when it is not).
    pub fn send_json(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: &Value,
    ) -> anyhow::Result<(u16, Value)> {
        let auth = auth.map(str::to_owned).unwrap_or_else(|| self.bearer());
        let url = self.url(path);
        let req = match method {
            "PUT" => self.agent.put(&url),
            "PATCH" => self.agent.patch(&url),
            _ => self.agent.post(&url),
        };
        let mut resp =
            req.header("Authorization", &auth).header("Content-Type", "application/json").send(body.to_string())?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string()?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    /// PUTs JSON with the admin token; the status and the answer as JSON.
    pub fn put_json(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        self.send_json("PUT", path, None, body)
    }

    pub fn delete(&self, path: &str) -> anyhow::Result<u16> {
        Ok(self.agent.delete(&self.url(path)).header("Authorization", self.bearer()).call()?.status().as_u16())
    }

    /// `DELETE path` and its answer's status and JSON body (`null` when empty).
    pub fn delete_json(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let mut resp = self.agent.delete(&self.url(path)).header("Authorization", self.bearer()).call()?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string()?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let mut resp = self.agent.get(&self.url(path)).header("Authorization", self.bearer()).call()?;
        Ok((resp.status().as_u16(), resp.body_mut().read_to_string()?))
    }

    /// Runs SQL and returns the rows as JSON objects; fails on a non-200 answer.
    pub fn sql(&self, query: &str) -> anyhow::Result<Vec<Value>> {
        let (status, body) = self.post_json("/api/v1/sql", &serde_json::json!({ "sql": query }))?;
        if status != 200 {
            bail!("sql {query:?} answered {status}: {body}");
        }
        Ok(body.as_array().cloned().unwrap_or_default())
    }

    /// The single number a one-row, one-column query returns.
    pub fn sql_count(&self, query: &str) -> anyhow::Result<i64> {
        let rows = self.sql(query)?;
        let v = rows.first().and_then(|r| r.as_object()).and_then(|o| o.values().next()).cloned();
        v.and_then(|v| v.as_i64()).with_context(|| format!("{query:?} returned {rows:?}"))
    }

    /// Hot and archived row counts of a stream, from `GET /api/v1/streams`.
    pub fn rows(&self, stream: &str) -> anyhow::Result<(u64, u64)> {
        let (_, body) = self.get("/api/v1/streams")?;
        let v: Value = serde_json::from_str(&body)?;
        for s in v["streams"].as_array().into_iter().flatten() {
            if s["name"] == stream {
                return Ok((s["rows"]["hot"].as_u64().unwrap_or(0), s["rows"]["archived"].as_u64().unwrap_or(0)));
            }
        }
        Ok((0, 0))
    }

    /// Value of a metric line (exact name with labels) in `/metrics`.
    pub fn metric(&self, series: &str) -> anyhow::Result<u64> {
        let (_, text) = self.get("/metrics")?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0))
    }

    /// Polls `cond` until it holds; fails after [`TIMEOUT`].
    pub fn wait_for(&self, what: &str, mut cond: impl FnMut(&Self) -> anyhow::Result<bool>) -> anyhow::Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if cond(self)? {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("timed out waiting for {what}")
    }

    /// Sends the server a signal (`HUP`, `USR1`...).
    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        signal(self.child.as_ref().context("stopped")?, sig)
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        signal(&child, "TERM")?;
        wait(&mut child)
    }

    /// Waits for the server to end by itself (a kill point, a fatal error).
    pub fn exited(mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        wait(&mut child)
    }

    /// SIGKILL: no chance to persist or flush anything.
    pub fn kill(mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("already stopped")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }
}

fn signal(child: &Child, sig: &str) -> anyhow::Result<()> {
    let status = Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status()?;
    if !status.success() {
        bail!("kill -{sig} {} failed", child.id());
    }
    Ok(())
}

fn wait(child: &mut Child) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("server did not exit within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every `.parquet` file under `dir`.
pub fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// NDJSON of `n` events for `devices` devices, each with a unique `seq`.
pub fn events(start: usize, n: usize, devices: usize) -> Vec<Value> {
    (start..start + n)
        .map(|i| {
            serde_json::json!({
                "device_id": format!("dev-{}", i % devices),
                "ts": 1_764_000_000_000i64 + i as i64,
                "seq": i,
                "temperature": 20.0 + (i % 10) as f64,
            })
        })
        .collect()
}

/// A local S3-compatible server (moto) for the `s3://` archive tests; killed on drop.
pub struct S3Server {
    child: std::process::Child,
    /// `http://127.0.0.1:{port}`.
    pub endpoint: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    /// The `AWS_*` variables that point a server's `s3://` archive at `endpoint` (moto's, or
    /// a proxy in front of it).
    pub fn env(endpoint: &str) -> [(&'static str, String); 5] {
        [
            ("AWS_ACCESS_KEY_ID", "test".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ENDPOINT", endpoint.to_owned()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
        ]
    }
}

/// Starts moto on a free port; `None` (with a message) where it is not installed, outside CI.
pub fn start_s3() -> anyhow::Result<Option<S3Server>> {
    let probe = std::process::Command::new("python3").args(["-c", "import moto.server"]).output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        if std::env::var_os("CI").is_some() {
            anyhow::bail!("moto[server] must be installed in CI (.ci/run installs it)");
        }
        eprintln!("skipping: pip install 'moto[server]' to run the S3 archive test");
        return Ok(None);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = std::process::Command::new("python3")
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let server = S3Server { child, endpoint: format!("http://127.0.0.1:{port}") };
    let deadline = std::time::Instant::now() + crate::harness::TIMEOUT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "moto did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(Some(server))
}
