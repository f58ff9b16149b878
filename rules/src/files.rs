//! Rule files on disk: every `*.rules` file of the rules directory is deployed, and
//! re-deployed when it changes; a deleted file's rules are removed. A file that does not
//! compile is refused with its diagnostics and its previous version keeps running. A file
//! that only names streams nobody has written yet waits, and is retried whenever the
//! catalog gains a stream or a column.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde::Serialize;

use crate::error::Error;
use crate::runtime::RuleEngine;

/// State of one rule file.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FileStatus {
    /// The file.
    pub path: String,
    /// `deployed`, `waiting` (for a stream to exist) or `failed`.
    pub status: &'static str,
    /// Rules it deployed.
    pub rules: Vec<String>,
    /// The diagnostics, rendered with line, column and caret.
    pub error: Option<String>,
}

struct Seen {
    modified: Option<SystemTime>,
    catalog: u64,
    status: FileStatus,
}

/// Watches a rules directory and keeps the engine's rules in step with it.
pub struct RuleFiles {
    dir: PathBuf,
    engine: Arc<RuleEngine>,
    seen: Mutex<BTreeMap<PathBuf, Seen>>,
    /// Rule texts posted to the API that name streams nobody has written yet, by key
    /// (tenant, `api:` and their rule names); retried like waiting files.
    waiting_api: Mutex<BTreeMap<String, Waiting>>,
}

/// A rule text from the API waiting for its streams.
struct Waiting {
    tenant: String,
    text: String,
    seen: Seen,
}

impl std::fmt::Debug for RuleFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleFiles").field("dir", &self.dir).finish()
    }
}

/// A cheap fingerprint of the catalog: changes when a stream or a column appears.
fn catalog_version(engine: &RuleEngine) -> u64 {
    engine.catalog().list().iter().map(|s| s.version + 1).sum()
}

impl RuleFiles {
    /// Watches `dir` (which may not exist yet) for `engine`.
    pub fn new(dir: &Path, engine: Arc<RuleEngine>) -> Self {
        Self { dir: dir.to_owned(), engine, seen: Mutex::new(BTreeMap::new()), waiting_api: Mutex::default() }
    }

    /// The state of every rule file seen (they hold the default tenant's rules), and of
    /// `tenant`'s rule texts from the API that wait.
    pub fn statuses(&self, tenant: &str) -> Vec<FileStatus> {
        let mut out: Vec<FileStatus> = Vec::new();
        if tenant == ferrite_engine::ids::DEFAULT_TENANT {
            out.extend(self.seen.lock().values().map(|s| s.status.clone()));
        }
        out.extend(self.waiting_api.lock().values().filter(|w| w.tenant == tenant).map(|w| w.seen.status.clone()));
        out
    }

    /// Keeps a rule text of `tenant` from the API whose streams do not exist yet; it is
    /// deployed as soon as they do (as a waiting file is). Returns its status.
    pub fn wait_for_streams(&self, tenant: &str, text: &str, rules: Vec<String>, error: String) -> FileStatus {
        let key = format!("{tenant}\u{1}api:{}", rules.join(","));
        let path = format!("api:{}", rules.join(","));
        let status = FileStatus { path, status: "waiting", rules, error: Some(error) };
        let seen = Seen { modified: None, catalog: catalog_version(&self.engine), status: status.clone() };
        self.waiting_api.lock().insert(key, Waiting { tenant: tenant.to_owned(), text: text.to_owned(), seen });
        status
    }

    /// Drops a waiting API rule text of `tenant` that holds rule `name`; whether there was one.
    pub fn forget_waiting(&self, tenant: &str, name: &str) -> bool {
        let mut w = self.waiting_api.lock();
        let before = w.len();
        w.retain(|_, w| w.tenant != tenant || !w.seen.status.rules.iter().any(|r| r == name));
        w.len() != before
    }

    fn retry_waiting_api(&self, catalog: u64) {
        let mut waiting = self.waiting_api.lock();
        let mut deployed = Vec::new();
        for (key, Waiting { tenant, text, seen }) in waiting.iter_mut() {
            if seen.status.status != "waiting" || seen.catalog == catalog {
                continue;
            }
            seen.catalog = catalog;
            match self.engine.deploy_in(tenant, text, None) {
                Ok(rules) => {
                    tracing::info!(rules = ?rules, "rules posted earlier found their streams and are deployed");
                    deployed.push(key.clone());
                }
                Err(Error::Invalid(ds)) if ds.iter().all(|d| d.code == Some("unknown-stream")) => {}
                Err(e) => {
                    let error = e.render("request", text);
                    tracing::error!("rules posted earlier are refused now that their streams exist:\n{error}");
                    seen.status.status = "failed";
                    seen.status.error = Some(error);
                }
            }
        }
        for key in deployed {
            waiting.remove(&key);
        }
    }

    /// Deploys new and changed files, retries waiting ones, removes deleted ones.
    pub fn scan(&self) {
        let mut files: Vec<(PathBuf, Option<SystemTime>)> = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let path = e.path();
                if path.extension().is_some_and(|x| x == "rules") {
                    files.push((path, e.metadata().ok().and_then(|m| m.modified().ok())));
                }
            }
        }
        let catalog = catalog_version(&self.engine);
        self.retry_waiting_api(catalog);
        let mut seen = self.seen.lock();
        let gone: Vec<PathBuf> = seen.keys().filter(|p| !files.iter().any(|(f, _)| f == *p)).cloned().collect();
        for path in gone {
            let removed = self.engine.remove_origin(&path.display().to_string());
            tracing::info!(file = %path.display(), rules = ?removed, "rule file deleted; its rules are removed");
            seen.remove(&path);
        }
        for (path, modified) in files {
            let retry = match seen.get(&path) {
                None => true,
                Some(s) => s.modified != modified || (s.status.status == "waiting" && s.catalog != catalog),
            };
            if !retry {
                continue;
            }
            let status = self.load(&path);
            seen.insert(path, Seen { modified, catalog, status });
        }
    }

    fn load(&self, path: &Path) -> FileStatus {
        let name = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                return FileStatus { path: name, status: "failed", rules: Vec::new(), error: Some(e.to_string()) };
            }
        };
        match self.engine.deploy(&text, Some(&name)) {
            Ok(rules) => FileStatus { path: name, status: "deployed", rules, error: None },
            Err(Error::Invalid(ds)) if ds.iter().all(|d| d.code == Some("unknown-stream")) => {
                let error = Error::Invalid(ds).render(&name, &text);
                tracing::info!(file = %name, "rule file waits for its streams:\n{error}");
                FileStatus { path: name, status: "waiting", rules: Vec::new(), error: Some(error) }
            }
            Err(e) => {
                let error = e.render(&name, &text);
                tracing::error!(file = %name, "rule file refused (the running version, if any, keeps running):\n{error}");
                FileStatus { path: name, status: "failed", rules: Vec::new(), error: Some(error) }
            }
        }
    }

    /// Scans every `interval` on a thread of its own until `stop` is set.
    pub fn spawn(
        self: Arc<Self>,
        interval: Duration,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("ferrite-rules-watch".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                self.scan();
                std::thread::park_timeout(interval);
            }
        })
    }
}
