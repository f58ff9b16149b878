//! Installing a software update into an A/B pair of slots.
//!
//! `slots/a/` and `slots/b/` each hold an `artifact` and its `version`; `slots/active` names
//! the slot in use. An install downloads the artifact with the device's token (resuming a
//! cut download with a range request), verifies its SHA-256 and its Ed25519 signature with
//! the OTA key the device was provisioned with (`ferrite_agent_core::ota`), writes it into
//! the inactive slot, switches `active` (atomically), and runs the health check. When the
//! check fails the device switches back to the old slot: rolled back, still on its version.
//! Each step is reported on `devices/{id}/ota/status`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrite_agent_core::ota::Verifier;
use serde_json::{Value, json};

use crate::http::Http;

/// An `install` command's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Install {
    /// The campaign it belongs to.
    pub campaign: String,
    /// The artifact's id.
    pub artifact: String,
    /// The version it installs.
    pub version: String,
    /// Where to download it (a path on the server's HTTP API).
    pub url: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256.
    pub sha256: [u8; 32],
    /// The Ed25519 signature over the SHA-256.
    pub signature: [u8; 64],
}

fn unhex<const N: usize>(field: &str, s: &str) -> Result<[u8; N], String> {
    let s = s.trim();
    let bad = || format!("`{field}` is not {N} bytes of hex");
    if s.len() != N * 2 {
        return Err(bad());
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Decodes a 32-byte key from hex (the `--ota-key` flag, `ota.pub`).
pub fn parse_key(s: &str) -> Result<[u8; 32], String> {
    unhex("ota key", s)
}

impl Install {
    /// Reads an `install` command's parameters.
    pub fn parse(params: &Value) -> Result<Self, String> {
        let text = |k: &str| {
            params.get(k).and_then(Value::as_str).map(str::to_owned).ok_or_else(|| format!("`{k}` is missing"))
        };
        let install = Self {
            campaign: text("campaign")?,
            artifact: text("artifact")?,
            version: text("version")?,
            url: text("url")?,
            size: params.get("size").and_then(Value::as_u64).ok_or("`size` is missing")?,
            sha256: unhex("sha256", &text("sha256")?)?,
            signature: unhex("signature", &text("signature")?)?,
        };
        if install.artifact.is_empty() || !install.artifact.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err("`artifact` must be an id of letters, digits and `-`".into());
        }
        Ok(install)
    }
}

/// The A/B slots.
#[derive(Debug, Clone)]
pub struct Slots {
    root: PathBuf,
}

fn other(name: &str) -> &'static str {
    if name == "a" { "b" } else { "a" }
}

impl Slots {
    /// The slots under `root`; a device without any starts on slot `a` at `version`.
    pub fn open(root: &Path, version: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(root.join("a"))?;
        std::fs::create_dir_all(root.join("b"))?;
        let s = Self { root: root.to_owned() };
        if !root.join("active").exists() {
            std::fs::write(root.join("a/version"), version)?;
            s.set_active("a")?;
        }
        Ok(s)
    }

    /// The slot in use (`a` or `b`).
    pub fn active(&self) -> String {
        let name = std::fs::read_to_string(self.root.join("active")).unwrap_or_default();
        if name.trim() == "b" { "b".into() } else { "a".into() }
    }

    /// The version in the slot in use.
    pub fn version(&self) -> String {
        std::fs::read_to_string(self.root.join(self.active()).join("version")).unwrap_or_default().trim().to_owned()
    }

    /// The directory of slot `name`.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn set_active(&self, name: &str) -> std::io::Result<()> {
        let tmp = self.root.join("active.tmp");
        std::fs::write(&tmp, name)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, self.root.join("active"))?;
        std::fs::File::open(&self.root)?.sync_all()
    }

    /// Writes `artifact` at `version` into the inactive slot; its name.
    fn write_inactive(&self, artifact: &Path, version: &str) -> std::io::Result<String> {
        let target = other(&self.active()).to_owned();
        let dir = self.dir(&target);
        let _ = std::fs::remove_file(dir.join("version"));
        std::fs::copy(artifact, dir.join("artifact"))?;
        std::fs::File::open(dir.join("artifact"))?.sync_all()?;
        std::fs::write(dir.join("version"), version)?;
        std::fs::File::open(dir.join("version"))?.sync_all()?;
        Ok(target)
    }
}

/// What an install needs besides its command.
#[derive(Debug, Clone)]
pub struct Installer {
    /// The server.
    pub http: Http,
    /// The OTA public key the device trusts (none: every install is refused).
    pub key: Option<[u8; 32]>,
    /// The slots.
    pub slots: Slots,
    /// Where downloads go.
    pub downloads: PathBuf,
    /// Run after the switch; exit status 0 means healthy (`FERRITE_SLOT_DIR` and
    /// `FERRITE_VERSION` in its environment). None: the installed file is hashed again.
    pub health_check: Option<String>,
}

/// How an install ended: the command's status and result.
pub type Outcome = (bool, Value);

fn failed(state: &str, error: String) -> Outcome {
    (false, json!({"state": state, "error": error}))
}

impl Installer {
    /// Runs `install`, reporting each state through `report(state, detail)`; blocking.
    pub fn run(&self, install: &Install, token: &str, report: &dyn Fn(&str, Option<&str>)) -> Outcome {
        let Some(key) = self.key else {
            return failed("failed", "this device has no OTA key provisioned (--ota-key): it installs nothing".into());
        };
        if install.version == self.slots.version() {
            return (true, json!({"state": "succeeded", "version": install.version, "note": "already installed"}));
        }
        if let Err(e) = std::fs::create_dir_all(&self.downloads) {
            return failed("failed", format!("{}: {e}", self.downloads.display()));
        }
        let file = self.downloads.join(format!("{}.part", install.artifact));
        report("downloading", None);
        let mut attempt = 0;
        loop {
            match self.http.download(token, &install.url, &file, install.size) {
                Ok(n) if n == install.size => break,
                Ok(n) => {
                    let _ = std::fs::remove_file(&file);
                    return failed("failed", format!("downloaded {n} bytes, the artifact has {}", install.size));
                }
                Err(e) if attempt < 4 => {
                    attempt += 1;
                    report("downloading", Some(&format!("retrying after: {e}")));
                    std::thread::sleep(Duration::from_millis(250 << attempt));
                }
                Err(e) => return failed("failed", format!("download: {e}")),
            }
        }
        report("verifying", None);
        let verified = (|| -> Result<(), String> {
            let mut f = std::fs::File::open(&file).map_err(|e| e.to_string())?;
            let mut v = Verifier::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = f.read(&mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                v.update(&buf[..n]);
            }
            v.finish(&install.sha256, &install.signature, &key).map_err(|e| e.to_string())
        })();
        if let Err(e) = verified {
            let _ = std::fs::remove_file(&file);
            return failed("failed", format!("refused: {e}"));
        }
        report("installing", None);
        let previous = self.slots.active();
        let slot = match self.slots.write_inactive(&file, &install.version) {
            Ok(s) => s,
            Err(e) => return failed("failed", format!("writing the inactive slot: {e}")),
        };
        let _ = std::fs::remove_file(&file);
        if let Err(e) = self.slots.set_active(&slot) {
            return failed("failed", format!("switching to slot {slot}: {e}"));
        }
        match self.healthy(&slot, install) {
            Ok(()) => (true, json!({"state": "succeeded", "version": install.version, "slot": slot})),
            Err(why) => {
                let back = self.slots.set_active(&previous);
                report("rolled_back", Some(&why));
                let mut error = format!("health check failed on slot {slot}: {why}; back on slot {previous}");
                if let Err(e) = back {
                    error.push_str(&format!(" (switching back failed: {e})"));
                }
                (false, json!({"state": "rolled_back", "error": error, "version": self.slots.version()}))
            }
        }
    }

    fn healthy(&self, slot: &str, install: &Install) -> Result<(), String> {
        let dir = self.slots.dir(slot);
        match &self.health_check {
            Some(cmd) => {
                let status = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .env("FERRITE_SLOT_DIR", &dir)
                    .env("FERRITE_VERSION", &install.version)
                    .status()
                    .map_err(|e| format!("`{cmd}`: {e}"))?;
                if status.success() { Ok(()) } else { Err(format!("`{cmd}` exited with {status}")) }
            }
            None => {
                let bytes = std::fs::read(dir.join("artifact")).map_err(|e| e.to_string())?;
                if ferrite_agent_core::ota::sha256(&bytes) == install.sha256 {
                    Ok(())
                } else {
                    Err("the installed file does not hash to the artifact's SHA-256".into())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_params_parse_or_say_why() {
        let good = json!({"campaign": "c", "artifact": "a-1", "version": "2.0", "url": "/x", "size": 3,
            "sha256": "00".repeat(32), "signature": "11".repeat(64)});
        let i = Install::parse(&good);
        assert_eq!(i.as_ref().map(|i| i.size), Ok(3));
        let mut bad = good.clone();
        bad["sha256"] = json!("zz");
        assert!(Install::parse(&bad).is_err_and(|e| e.contains("sha256")));
        let mut bad = good;
        bad["artifact"] = json!("../etc");
        assert!(Install::parse(&bad).is_err());
    }

    #[test]
    fn slots_switch_and_keep_versions() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = Slots::open(dir.path(), "1.0")?;
        assert_eq!((s.active(), s.version()), ("a".into(), "1.0".into()));
        let f = dir.path().join("new");
        std::fs::write(&f, b"v2")?;
        let slot = s.write_inactive(&f, "2.0")?;
        assert_eq!(slot, "b");
        s.set_active(&slot)?;
        assert_eq!((s.active(), s.version()), ("b".into(), "2.0".into()));
        // Reopening keeps the active slot.
        let s = Slots::open(dir.path(), "1.0")?;
        assert_eq!(s.version(), "2.0");
        Ok(())
    }
}
