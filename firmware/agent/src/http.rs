//! The agent's HTTP side: access tokens from `/oauth2/token` (client credentials), the
//! telemetry fallback (`POST /api/v1/streams/{stream}/events`), and artifact downloads with
//! resume (`Range`). Blocking (ureq): callers run it on a blocking thread.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// Why an HTTP call failed.
#[derive(Debug)]
pub enum HttpError {
    /// The server could not be reached, or the exchange broke off.
    Network(String),
    /// The server answered with an error status.
    Status(u16, String),
    /// The answer was not what the contract says.
    Protocol(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Network(e) => write!(f, "network: {e}"),
            HttpError::Status(s, body) => write!(f, "HTTP {s}: {body}"),
            HttpError::Protocol(e) => write!(f, "unexpected answer: {e}"),
        }
    }
}

impl std::error::Error for HttpError {}

/// An access token as `/oauth2/token` answers it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct TokenAnswer {
    /// The bearer token (a JWT).
    pub access_token: String,
    /// Seconds it lives.
    pub expires_in: u64,
}

/// A client of one server.
#[derive(Clone)]
pub struct Http {
    base: String,
    agent: ureq::Agent,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http").field("base", &self.base).finish()
    }
}

fn net(e: ureq::Error) -> HttpError {
    HttpError::Network(e.to_string())
}

impl Http {
    /// A client of `base` (`http://host:8080`).
    pub fn new(base: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_per_read(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        Self { base: base.trim_end_matches('/').to_owned(), agent }
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        }
    }

    /// A token for the device (`client_credentials` with its id and secret).
    pub fn token(&self, client_id: &str, secret: &str) -> Result<TokenAnswer, HttpError> {
        let mut resp = self
            .agent
            .post(&self.url("/oauth2/token"))
            .send_form([("grant_type", "client_credentials"), ("client_id", client_id), ("client_secret", secret)])
            .map_err(net)?;
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().map_err(net)?;
        if status != 200 {
            return Err(HttpError::Status(status, body));
        }
        serde_json::from_str(&body).map_err(|e| HttpError::Protocol(format!("{e}: {body}")))
    }

    /// Registers the device itself with a provisioning secret (`POST
    /// /api/v1/devices/register`); its client secret. The platform keeps it `pending`
    /// (tokens refused) until someone approves it.
    pub fn register(
        &self,
        provisioning_secret: &str,
        id: &str,
        device_type: Option<&str>,
    ) -> Result<String, HttpError> {
        let mut body = serde_json::json!({"provisioning_secret": provisioning_secret, "id": id});
        if let Some(t) = device_type {
            body["type"] = serde_json::Value::String(t.to_owned());
        }
        let mut resp = self
            .agent
            .post(&self.url("/api/v1/devices/register"))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .map_err(net)?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().map_err(net)?;
        if status != 201 {
            return Err(HttpError::Status(status, text));
        }
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| HttpError::Protocol(e.to_string()))?;
        v["credentials"]["client_secret"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| HttpError::Protocol(format!("no credentials in {text}")))
    }

    /// Sends a telemetry batch (a JSON array whose objects carry `device_id`).
    pub fn events(&self, token: &str, stream: &str, body: Vec<u8>) -> Result<(), HttpError> {
        let mut resp = self
            .agent
            .post(&self.url(&format!("/api/v1/streams/{stream}/events")))
            .header("Authorization", &format!("Bearer {token}"))
            .header("Content-Type", "application/json")
            .send(&body[..])
            .map_err(net)?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(HttpError::Status(status, resp.body_mut().read_to_string().unwrap_or_default()));
        }
        Ok(())
    }

    /// Downloads `path` into `file`, resuming after the bytes already there (a range
    /// request); the file's final length. `progress` is called with the bytes so far.
    pub fn download(&self, token: &str, path: &str, file: &Path, size: u64) -> Result<u64, HttpError> {
        let have = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        if have > size {
            std::fs::remove_file(file).map_err(|e| HttpError::Protocol(e.to_string()))?;
            return self.download(token, path, file, size);
        }
        if have == size {
            return Ok(have);
        }
        let mut req = self.agent.get(&self.url(path)).header("Authorization", &format!("Bearer {token}"));
        if have > 0 {
            req = req.header("Range", &format!("bytes={have}-"));
        }
        let mut resp = req.call().map_err(net)?;
        let status = resp.status().as_u16();
        let append = match status {
            206 => true,
            200 => false,
            _ => return Err(HttpError::Status(status, resp.body_mut().read_to_string().unwrap_or_default())),
        };
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(file)
            .map_err(|e| HttpError::Protocol(format!("{}: {e}", file.display())))?;
        let mut reader = resp.body_mut().with_config().limit(size + 1).reader();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = if append { have } else { 0 };
        loop {
            let n = reader.read(&mut buf).map_err(|e| HttpError::Network(e.to_string()))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(|e| HttpError::Protocol(e.to_string()))?;
            total += n as u64;
        }
        out.sync_all().map_err(|e| HttpError::Protocol(e.to_string()))?;
        Ok(total)
    }
}
