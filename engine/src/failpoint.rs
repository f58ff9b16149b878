//! Kill points for crash tests: a named step of a write path where the process can be made
//! to die at once, as a power cut or the OOM killer would stop it. `FERRITE_KILL_AT` lists
//! the armed points (comma-separated, e.g. `rewrite.after_write`); unset, a kill point is
//! one load of a value read once per process. Not for production use: the variable exists
//! so that the crash tests and `docs/operations.md`'s crash drills can stop a real server at
//! an exact step.

use std::sync::OnceLock;

/// The environment variable that arms kill points.
pub const KILL_AT_ENV: &str = "FERRITE_KILL_AT";

static ARMED: OnceLock<Vec<String>> = OnceLock::new();

fn armed() -> &'static [String] {
    ARMED.get_or_init(|| {
        std::env::var(KILL_AT_ENV)
            .map(|v| v.split(',').map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()).collect())
            .unwrap_or_default()
    })
}

/// Kills the process with SIGKILL (no destructor, no flush) when `point` is armed.
pub fn kill_point(point: &str) {
    let armed = armed();
    if armed.is_empty() || !armed.iter().any(|p| p == point) {
        return;
    }
    tracing::error!(point, "{KILL_AT_ENV}: killing the process here");
    eprintln!("{KILL_AT_ENV}: killed at {point}");
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
    // Only when `kill` could not be run: die without unwinding all the same.
    std::process::abort();
}
