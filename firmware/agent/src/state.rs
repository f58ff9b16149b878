//! What the agent keeps on disk in its state directory, besides the spool:
//!
//! - `credentials.json` (mode 0600): the device id (a UUID made on first start when none is
//!   given), its client secret, and the current access token with its expiry;
//! - `settings.json`: configuration set by `set_config`, feature toggles, the lock.
//!
//! Every write goes to a temporary file that is fsynced and renamed over the old one, so a
//! power cut leaves the old or the new file, never half of one.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The device's identity and tokens.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Credentials {
    /// The device id (its MQTT client id and user name).
    pub device_id: String,
    /// Its client secret (OAuth2 client credentials).
    #[serde(default)]
    pub client_secret: String,
    /// The current access token.
    #[serde(default)]
    pub access_token: String,
    /// When it was received, epoch milliseconds.
    #[serde(default)]
    pub token_issued_ms: i64,
    /// When it expires, epoch milliseconds.
    #[serde(default)]
    pub token_expires_ms: i64,
}

/// What management commands changed, kept across restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    /// Configuration from `set_config` and the twin (merged).
    #[serde(default)]
    pub config: Map<String, Value>,
    /// Features switched on.
    #[serde(default)]
    pub features: BTreeSet<String>,
    /// Locked: telemetry and actuators stopped until `unlock`.
    #[serde(default)]
    pub locked: bool,
    /// The lock's message.
    #[serde(default)]
    pub lock_message: String,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.create(true).write(true).truncate(true);
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = private;
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent()
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

impl StateDir {
    /// The directory `root`, created (0700) when missing.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(Self { root: root.to_owned() })
    }

    /// A path inside it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The stored credentials, if any.
    pub fn credentials(&self) -> std::io::Result<Option<Credentials>> {
        match std::fs::read(self.path("credentials.json")) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stores the credentials (0600).
    pub fn save_credentials(&self, c: &Credentials) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(c).map_err(std::io::Error::other)?;
        write_atomic(&self.path("credentials.json"), &bytes, true)
    }

    /// The stored settings (defaults when none).
    pub fn settings(&self) -> Settings {
        std::fs::read(self.path("settings.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// Stores the settings.
    pub fn save_settings(&self, s: &Settings) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(s).map_err(std::io::Error::other)?;
        write_atomic(&self.path("settings.json"), &bytes, false)
    }

    /// Erases credentials, settings, the spool and downloads (the `wipe` command); the
    /// installed slots stay (they are the device's software, not its data).
    pub fn wipe(&self) -> std::io::Result<()> {
        for f in ["credentials.json", "credentials.tmp", "settings.json", "settings.tmp"] {
            match std::fs::remove_file(self.path(f)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        for d in ["spool", "downloads"] {
            match std::fs::remove_dir_all(self.path(d)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if let Ok(d) = std::fs::File::open(&self.root) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_private_and_wipe_erases_them() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = StateDir::open(dir.path())?;
        assert_eq!(s.credentials()?, None);
        let c = Credentials { device_id: "d1".into(), client_secret: "s".into(), ..Default::default() };
        s.save_credentials(&c)?;
        assert_eq!(s.credentials()?, Some(c));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(s.path("credentials.json"))?.permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let mut settings = Settings::default();
        settings.features.insert("x".into());
        s.save_settings(&settings)?;
        std::fs::create_dir_all(s.path("spool"))?;
        std::fs::write(s.path("spool/0.seg"), b"data")?;
        s.wipe()?;
        assert_eq!(s.credentials()?, None);
        assert_eq!(s.settings(), Settings::default());
        assert!(!s.path("spool").exists());
        Ok(())
    }
}
