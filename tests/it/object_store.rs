//! A slow and failing object store: the S3 archive behind a fault-injecting HTTP proxy
//! between the server and moto. The proxy reads each request and, by its current mode,
//! forwards it, forwards it late, answers 500 without forwarding it, or forwards a write and
//! answers 500 anyway (the write landed, the answer was lost). Through all of it: every
//! acknowledged event is kept exactly once, persists are retried, the hot buffer's bound
//! pushes back on clients, and once the store answers again the archive holds every row
//! once and no file that the catalog does not name.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{S3Server, Server, events, start_s3};

const PASS: u8 = 0;
const SLOW: u8 = 1;
const FAIL: u8 = 2;
/// PUTs and POSTs are forwarded (they land) and answered 500; the rest answered 500.
const LOST: u8 = 3;
const SLOW_BY: Duration = Duration::from_millis(300);

/// The proxy; its threads live as long as the test process (the listener is leaked on
/// purpose: a test ends before it matters).
struct FaultProxy {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    /// Requests handled in each mode.
    seen: Arc<[AtomicU64; 4]>,
    /// Writes that landed in mode `LOST`.
    landed: Arc<AtomicU64>,
}

impl FaultProxy {
    fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let proxy = Self {
            addr,
            mode: Arc::default(),
            seen: Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]),
            landed: Arc::default(),
        };
        let (mode, seen, landed) = (proxy.mode.clone(), proxy.seen.clone(), proxy.landed.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (mode, seen, landed) = (mode.clone(), seen.clone(), landed.clone());
                std::thread::spawn(move || {
                    // A connection ends with an error when either side closes it.
                    let _ = serve(client, upstream, &mode, &seen, &landed);
                });
            }
        });
        Ok(proxy)
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn seen(&self, mode: u8) -> u64 {
        self.seen[mode as usize].load(Ordering::SeqCst)
    }
}

/// One HTTP/1.1 message as read off the wire (head and body, framing kept).
struct Message {
    raw: Vec<u8>,
    /// The request's method, or the response's status.
    first: String,
    /// The sender closes the connection after it (HTTP/1.0, `Connection: close`).
    close: bool,
}

/// Reads one message; `None` at a clean end of the connection. `head_request`: this is the
/// answer to a HEAD (no body whatever the headers say).
fn read_message(r: &mut impl BufRead, head_request: bool, response: bool) -> std::io::Result<Option<Message>> {
    let mut raw = Vec::new();
    let mut first_line = String::new();
    let (mut length, mut chunked, mut close, mut keep_alive) = (None, false, false, false);
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            return if raw.is_empty() { Ok(None) } else { Err(std::io::ErrorKind::UnexpectedEof.into()) };
        }
        raw.extend_from_slice(&line);
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        if first_line.is_empty() {
            first_line = text;
            continue;
        }
        if text.is_empty() {
            break;
        }
        let lower = text.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        } else if lower.starts_with("connection:") {
            close |= lower.contains("close");
            keep_alive |= lower.contains("keep-alive");
        }
    }
    close |= first_line.starts_with("HTTP/1.0") && !keep_alive;
    let mut parts = first_line.split_whitespace();
    let first = if response {
        parts.nth(1).unwrap_or_default().to_owned()
    } else {
        parts.next().unwrap_or_default().to_owned()
    };
    let no_body = response && (head_request || first == "204" || first == "304");
    if no_body {
    } else if chunked {
        loop {
            let mut size_line = Vec::new();
            r.read_until(b'\n', &mut size_line)?;
            raw.extend_from_slice(&size_line);
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&size_line).trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| std::io::Error::other("bad chunk size"))?;
            let mut data = vec![0; size + 2];
            r.read_exact(&mut data)?;
            raw.extend_from_slice(&data);
            if size == 0 {
                break;
            }
        }
    } else if let Some(n) = length {
        let mut body = vec![0; n];
        r.read_exact(&mut body)?;
        raw.extend_from_slice(&body);
    } else if response {
        r.read_to_end(&mut raw)?;
    }
    Ok(Some(Message { raw, first, close }))
}

/// S3's answer to a request it failed.
fn error_500() -> Vec<u8> {
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InternalError</Code><Message>injected by the test's \
                proxy</Message></Error>";
    format!(
        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    mode: &AtomicU8,
    seen: &[AtomicU64; 4],
    landed: &AtomicU64,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut writer = client;
    let mut up: Option<(TcpStream, BufReader<TcpStream>)> = None;
    while let Some(request) = read_message(&mut reader, false, false)? {
        let m = mode.load(Ordering::SeqCst);
        seen[m as usize].fetch_add(1, Ordering::SeqCst);
        let forward = match m {
            PASS | SLOW => true,
            LOST => matches!(request.first.as_str(), "PUT" | "POST"),
            _ => false,
        };
        if m == SLOW {
            std::thread::sleep(SLOW_BY);
        }
        let answer = if forward {
            if up.is_none() {
                let s = TcpStream::connect(upstream)?;
                up = Some((s.try_clone()?, BufReader::new(s)));
            }
            let (w, r) = up.as_mut().ok_or_else(|| std::io::Error::other("no upstream"))?;
            w.write_all(&request.raw)?;
            let response = read_message(r, request.first == "HEAD", true)?
                .ok_or_else(|| std::io::Error::other("upstream closed"))?;
            if response.close {
                up = None;
            }
            if m == LOST {
                landed.fetch_add(1, Ordering::SeqCst);
                error_500()
            } else {
                response.raw
            }
        } else {
            error_500()
        };
        writer.write_all(&answer)?;
    }
    Ok(())
}

/// Keys under `prefix` in `bucket`, listed straight from moto (not through the proxy).
fn keys(endpoint: &str, bucket: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let mut list = agent.get(&format!("{endpoint}/{bucket}?list-type=2&prefix={prefix}")).call()?;
    let xml = list.body_mut().read_to_string()?;
    Ok(xml.split("<Key>").skip(1).filter_map(|k| k.split("</Key>").next()).map(str::to_owned).collect())
}

/// Posts `n` fresh events (after the `acked` ones); a 200 adds them to `acked`.
fn post(s: &Server, acked: &mut usize, n: usize) -> anyhow::Result<(u16, Value)> {
    let (status, v) = s.post_json("/api/v1/streams/telemetry/events", &Value::Array(events(*acked, n, 20)))?;
    if status == 200 {
        *acked += n;
    }
    Ok((status, v))
}

/// Rows of `telemetry`: (hot, archived).
fn rows(s: &Server) -> anyhow::Result<(u64, u64)> {
    s.rows("telemetry")
}

#[test]
fn a_slow_and_failing_object_store_loses_nothing_and_leaves_no_stray_file() -> anyhow::Result<()> {
    let Some(s3) = start_s3()? else { return Ok(()) };
    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let created = agent.put(&format!("{}/ferrite-bucket", s3.endpoint)).send_empty()?;
    anyhow::ensure!(created.status().is_success(), "create bucket: {}", created.status());
    let upstream: SocketAddr = s3.endpoint.trim_start_matches("http://").parse()?;
    let proxy = FaultProxy::start(upstream)?;
    let env = S3Server::env(&format!("http://{}", proxy.addr));
    let dir = tempfile::tempdir()?;
    let s = Server::start_with_env(
        dir.path(),
        &[
            "--archive-url",
            "s3://ferrite-bucket/faults",
            "--persist-interval",
            "200ms",
            "--hot-buffer-max",
            "1MiB",
            "--archive-retry-timeout",
            "1s",
            "--ingest-max-wait",
            "200ms",
            "--api-usage",
            "false",
        ],
        &env,
    )?;
    let mut acked = 0usize;

    // Healthy, then slow: every request answered, every row archived.
    for _ in 0..4 {
        anyhow::ensure!(post(&s, &mut acked, 500)?.0 == 200, "a healthy store refused a write");
    }
    let healthy = acked as u64;
    s.wait_for("the first rows archived", |s| Ok(rows(s)? == (0, healthy)))?;
    proxy.set(SLOW);
    for _ in 0..4 {
        anyhow::ensure!(post(&s, &mut acked, 500)?.0 == 200, "a slow store made a write fail");
    }
    let slow = acked as u64;
    s.wait_for("the rows archived through a slow store", |s| Ok(rows(s)? == (0, slow)))?;
    anyhow::ensure!(proxy.seen(SLOW) > 0, "nothing went through the slow store");

    // Failing: persists fail and are retried, the rows stay in the hot buffer, and past its
    // hard bound writes are refused with 503 and Retry-After instead of growing memory
    // (between the bounds, a growing share of them is shed with 503 `busy`).
    proxy.set(FAIL);
    let mut refused = None;
    for _ in 0..2_000 {
        let (status, v) = post(&s, &mut acked, 1_000)?;
        if status == 503 && v["error"]["code"] == "busy" {
            continue;
        }
        if status == 503 {
            refused = Some(v);
            break;
        }
        anyhow::ensure!(status == 200, "a write answered {status}: {v}");
    }
    let refused = refused.ok_or_else(|| anyhow::anyhow!("the hot buffer grew past its bound without a 503"))?;
    anyhow::ensure!(refused["error"]["code"] == "overloaded", "{refused}");
    s.wait_for("a persist failure counted", |s| Ok(s.metric("ferrite_persist_failures_total")? >= 1))?;
    let (status, health) = s.get("/healthz")?;
    anyhow::ensure!(status == 503 && health.contains("persist"), "healthz while persists fail: {status} {health}");
    let (hot, archived) = rows(&s)?;
    anyhow::ensure!(hot + archived == acked as u64, "{acked} acknowledged, {hot} hot + {archived} archived");

    // Writes land but their answers are lost, and removals are refused: uploads that no
    // catalog names stay behind until the store answers again.
    proxy.set(LOST);
    let failures = s.metric("ferrite_persist_failures_total")?;
    s.wait_for("a lost write and a failed persist", |s| {
        Ok(proxy.landed.load(Ordering::SeqCst) > 0 && s.metric("ferrite_persist_failures_total")? > failures)
    })?;
    anyhow::ensure!(
        s.metric("ferrite_archive_orphans")? >= 1,
        "an upload that landed without an answer is not tracked for removal"
    );

    // Healthy again: the persists go through, the stray uploads are removed, writes resume.
    proxy.set(PASS);
    s.wait_for("the hot buffer persisted", |s| Ok(rows(s)? == (0, acked as u64)))?;
    s.wait_for("writes admitted again", |s| {
        let (status, _) = s.post_json("/api/v1/streams/telemetry/events", &Value::Array(events(10_000_000, 1, 1)))?;
        Ok(status == 200)
    })?;
    let total = acked as u64 + 1;
    s.wait_for("everything archived", |s| Ok(rows(s)? == (0, total)))?;
    s.wait_for("no stray upload left", |s| Ok(s.metric("ferrite_archive_orphans")? == 0))?;
    let (status, health) = s.get("/healthz")?;
    anyhow::ensure!(status == 200, "healthz after recovery: {status} {health}");

    let n = s.sql_count("select count(*) from telemetry")?;
    let distinct = s.sql_count("select count(distinct seq) from telemetry")?;
    anyhow::ensure!(
        n as u64 == total && distinct as u64 == total,
        "{total} acknowledged, {n} rows, {distinct} distinct"
    );
    // The bucket holds exactly the files the catalog names: none twice, none stray.
    let listed = keys(&s3.endpoint, "ferrite-bucket", "faults/")?;
    let (_, body) = s.get("/api/v1/streams")?;
    let streams: Value = serde_json::from_str(&body)?;
    let files: u64 =
        streams["streams"].as_array().into_iter().flatten().filter_map(|st| st["archive"]["files"].as_u64()).sum();
    anyhow::ensure!(
        listed.len() as u64 == files,
        "{} objects in the bucket, {files} files in the catalog: {listed:?}",
        listed.len()
    );
    Ok(())
}
