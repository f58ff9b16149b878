//! What the end-to-end tests share: the real server (`ferrite serve` of the main workspace,
//! on ephemeral ports), a TCP proxy the tests cut and restore, and the agent program.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// How long anything may take before a test fails.
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub fn fail<T>(msg: impl Into<String>) -> Result<T> {
    Err(msg.into().into())
}

/// The server binary: `FERRITE_BIN`, or the main workspace's debug build.
pub fn server_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("FERRITE_BIN") {
        return Ok(p.into());
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/ferrite");
    if p.exists() {
        return Ok(p);
    }
    fail(format!(
        "the server binary is not at {} : build it first (`cargo build -p ferrite` at the repository's root) \
         or set FERRITE_BIN",
        p.display()
    ))
}

/// A running server.
pub struct Server {
    child: Child,
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    pub token: String,
    pub data: PathBuf,
    agent: ureq::Agent,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub fn start(data: &Path, extra: &[&str]) -> Result<Self> {
        let mut child = Command::new(server_bin()?)
            .args(["serve", "--data-dir"])
            .arg(data)
            .args([
                "--mqtt-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--pg-listen",
                "127.0.0.1:0",
                "--flight-listen",
                "127.0.0.1:0",
                "--coap-listen",
                "off",
                "--log",
                "warn",
            ])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(std::result::Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = rx.recv_timeout(TIMEOUT)?;
        let rest = line.strip_prefix("ferrite listening: ").ok_or_else(|| format!("unexpected line {line:?}"))?;
        let (mut http, mut mqtt) = (None, None);
        for part in rest.split_whitespace() {
            if let Some(a) = part.strip_prefix("mqtt=") {
                mqtt = Some(a.parse()?);
            } else if let Some(a) = part.strip_prefix("http=") {
                http = Some(a.parse()?);
            }
        }
        let token = std::fs::read_to_string(data.join("admin.token"))?.trim().to_owned();
        let agent =
            ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(TIMEOUT)).build().new_agent();
        Ok(Self {
            child,
            http: http.ok_or("no http address")?,
            mqtt: mqtt.ok_or("no mqtt address")?,
            token,
            data: data.to_owned(),
            agent,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// A request with an optional JSON body; the status and the answer as JSON.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        let auth = format!("Bearer {}", self.token);
        let mut resp = match (method, body) {
            ("GET", _) => self.agent.get(&self.url(path)).header("Authorization", &auth).call()?,
            ("DELETE", _) => self.agent.delete(&self.url(path)).header("Authorization", &auth).call()?,
            (_, b) => {
                let text = b.map(Value::to_string).unwrap_or_default();
                let req = match method {
                    "PUT" => self.agent.put(&self.url(path)),
                    "PATCH" => self.agent.patch(&self.url(path)),
                    _ => self.agent.post(&self.url(path)),
                };
                req.header("Authorization", &auth).header("Content-Type", "application/json").send(text)?
            }
        };
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string()?;
        Ok((
            status,
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) },
        ))
    }

    /// POSTs raw bytes.
    pub fn post_bytes(&self, path: &str, body: &[u8]) -> Result<(u16, Value)> {
        let mut resp = self
            .agent
            .post(&self.url(path))
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("Content-Type", "application/octet-stream")
            .send(body)?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string()?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    pub fn sql(&self, q: &str) -> Result<Vec<Value>> {
        let (status, v) = self.call("POST", "/api/v1/sql", Some(&json!({"sql": q})))?;
        if status != 200 {
            return fail(format!("SQL {q:?}: {status} {v}"));
        }
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// A count, or zero while the stream does not exist yet.
    pub fn count_or_zero(&self, q: &str) -> i64 {
        self.count(q).unwrap_or(0)
    }

    pub fn count(&self, q: &str) -> Result<i64> {
        let rows = self.sql(q)?;
        Ok(rows
            .first()
            .and_then(|r| r.as_object())
            .and_then(|o| o.values().next())
            .and_then(Value::as_i64)
            .unwrap_or(0))
    }

    /// Registers a device; its client secret.
    pub fn device(&self, id: &str, extra: Value) -> Result<String> {
        let mut body = json!({"id": id, "type": "sensor"});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let (status, v) = self.call("POST", "/api/v1/devices", Some(&body))?;
        if status != 201 {
            return fail(format!("register {id}: {status} {v}"));
        }
        Ok(v["credentials"]["client_secret"].as_str().ok_or("no secret")?.to_owned())
    }

    /// Polls until `cond` holds (each turn is one round trip to the server).
    pub fn wait_for(&self, what: &str, mut cond: impl FnMut(&Self) -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if cond(self)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                return fail(format!("timed out waiting for {what}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A TCP proxy in front of the MQTT listener: [`Proxy::cut`] closes every connection and
/// refuses new ones until [`Proxy::restore`].
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (up2, conns2) = (up.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !up2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else { continue };
                let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) =
                    (client.try_clone(), server.try_clone(), client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                if let Ok(mut list) = conns2.lock() {
                    list.push(c3);
                    list.push(s3);
                }
                pipe(client, server);
                pipe(s2, c2);
            }
        });
        Ok(Self { addr, up, conns })
    }

    /// Cuts every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        if let Ok(mut list) = self.conns.lock() {
            for s in list.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// A running agent process.
pub struct Agent {
    pub child: Child,
    pub state: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    /// Starts `ferrite-agent` against `server` (MQTT at `mqtt`) with `args`.
    pub fn start(server: &Server, mqtt: SocketAddr, state: &Path, args: &[&str]) -> Result<Self> {
        // (this module is shared with the simulator's tests, which have no agent binary)
        let bin = option_env!("CARGO_BIN_EXE_ferrite-agent").ok_or("the agent binary is not built here")?;
        let child = Command::new(bin)
            .arg("--state-dir")
            .arg(state)
            .args(["--http", &format!("http://{}", server.http), "--mqtt", &mqtt.to_string(), "--no-sync"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Self { child, state: state.to_owned() })
    }

    /// The agent's `status.json`.
    pub fn status(&self) -> Value {
        std::fs::read(self.state.join("status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    /// Polls the status until `cond` holds.
    pub fn wait(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let s = self.status();
            if cond(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return fail(format!("timed out waiting for the agent: {what} (status {s})"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to end; its exit code.
    pub fn exit(&mut self) -> Result<i32> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                return fail("the agent did not stop");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it with SIGKILL (a power cut).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(seq, ts)` of every row of `device` in `stream`, by seq.
pub fn seqs(server: &Server, stream: &str, device: &str) -> Result<Vec<(i64, i64)>> {
    let rows = server.sql(&format!(
        "SELECT seq, CAST(time AS BIGINT) / 1000000 AS ts FROM {stream} WHERE device_id = '{device}' ORDER BY seq"
    ))?;
    Ok(rows.iter().map(|r| (r["seq"].as_i64().unwrap_or(-1), r["ts"].as_i64().unwrap_or(-1))).collect())
}
