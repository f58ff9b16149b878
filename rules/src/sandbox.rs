//! What a deployed rule may reach outside the engine: table files only under one
//! directory, webhooks only to listed hosts. The server sets a [`Sandbox`] on its
//! [`crate::RuleEngine`]; local tools (`ferrite rules check|test|replay`) run without one,
//! on the user's own files. Checked at deploy time, with errors that name the setting.

use std::path::{Path, PathBuf};

/// Limits on the files and hosts rules may use.
#[derive(Debug, Clone, Default)]
pub struct Sandbox {
    /// `table NAME from 'file'` must name a file under this directory.
    pub table_dir: PathBuf,
    /// `then webhook` may call these hosts (`host` or `host:port`); empty: none.
    pub webhook_hosts: Vec<String>,
}

impl Sandbox {
    /// Checks a table file (already made absolute against the rule file's directory).
    pub fn check_table(&self, path: &Path) -> Result<(), String> {
        let root = self.table_dir.canonicalize().map_err(|e| {
            format!(
                "the table directory `{}` is not readable: {e} (the `rules_table_dir` setting)",
                self.table_dir.display()
            )
        })?;
        let file = path.canonicalize().map_err(|e| format!("cannot open `{}`: {e}", path.display()))?;
        if file.starts_with(&root) {
            Ok(())
        } else {
            Err(format!(
                "table file `{}` is outside `{}`, the only directory rules may read (the `rules_table_dir` setting)",
                path.display(),
                root.display()
            ))
        }
    }

    /// Checks a webhook URL (before placeholders are filled).
    pub fn check_webhook(&self, url: &str) -> Result<(), String> {
        let (host, port) = host_of(url)?;
        if host.contains(['{', '}']) {
            return Err(format!("webhook `{url}`: the host must be written out, not filled from a placeholder"));
        }
        let allowed = self.webhook_hosts.iter().any(|h| {
            let h = h.trim().to_ascii_lowercase();
            h == host || port.as_ref().is_some_and(|p| h == format!("{host}:{p}"))
        });
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "webhook host `{host}` is not allowed; add it to the `webhook_allow_hosts` setting (now: [{}])",
                self.webhook_hosts.join(", ")
            ))
        }
    }
}

/// The lowercased host and the port of an `http://` or `https://` URL.
fn host_of(url: &str) -> Result<(String, Option<String>), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("webhook `{url}`: only http:// and https:// URLs are allowed"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| format!("webhook `{url}`: bad IPv6 address"))?;
        (format!("[{h}]"), after.strip_prefix(':').map(str::to_owned))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p.to_owned())),
            None => (authority.to_owned(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("webhook `{url}` has no host"));
    }
    Ok((host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_hosts_are_checked_against_the_list() {
        let s = Sandbox {
            table_dir: PathBuf::from("."),
            webhook_hosts: vec!["hooks.example.com".into(), "127.0.0.1:9000".into()],
        };
        assert!(s.check_webhook("https://hooks.example.com/alert?x=1").is_ok());
        assert!(s.check_webhook("http://HOOKS.example.com:8443/a").is_ok(), "a bare host allows any port");
        assert!(s.check_webhook("http://127.0.0.1:9000/a").is_ok());
        assert!(s.check_webhook("http://127.0.0.1:9001/a").is_err(), "host:port allows that port only");
        assert!(s.check_webhook("http://user@evil.example.com/").is_err_and(|e| e.contains("webhook_allow_hosts")));
        assert!(s.check_webhook("http://{device_id}.example.com/").is_err());
        assert!(s.check_webhook("file:///etc/passwd").is_err());
        assert!(Sandbox::default().check_webhook("https://hooks.example.com/").is_err(), "empty list: none");
    }

    #[test]
    fn table_files_must_be_under_the_directory() -> std::io::Result<()> {
        let root = tempfile::tempdir()?;
        let other = tempfile::tempdir()?;
        std::fs::write(root.path().join("t.csv"), "a\n1\n")?;
        std::fs::write(other.path().join("t.csv"), "a\n1\n")?;
        let s = Sandbox { table_dir: root.path().to_owned(), webhook_hosts: Vec::new() };
        assert!(s.check_table(&root.path().join("t.csv")).is_ok());
        assert!(s.check_table(&other.path().join("t.csv")).is_err_and(|e| e.contains("rules_table_dir")));
        assert!(s.check_table(&root.path().join("../").join(other.path().join("t.csv"))).is_err());
        Ok(())
    }
}
