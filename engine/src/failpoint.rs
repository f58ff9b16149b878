//! Kill points for crash tests: a named step of a write path where the process can be made
//! to die at once, as a power cut or the OOM killer would stop it. `FERRITE_KILL_AT` lists
//! the armed points (comma-separated, e.g. `rewrite.after_write`); `point@N` dies the N-th
//! time the point is reached (so that a test can have acknowledged writes before the
//! crash). Unset, a kill point is one load of a value read once per process. Not for
//! production use: the variable exists so that the crash tests and `docs/operations.md`'s
//! crash drills can stop a real server at an exact step.
//!
//! The points: `wal.mid_append` (half of a group commit written, a torn tail),
//! `wal.before_fsync` (a group written, not yet fsynced nor acknowledged),
//! `persist.mid_upload` (half of a Parquet file written under its temporary name),
//! `persist.after_checkpoint` (the files uploaded and the rules' checkpoint written, the
//! catalog not naming the files), `persist.before_catalog` (the files uploaded, the catalog
//! not naming them),
//! `persist.before_wal_removal` (the catalog committed, the WAL segments still there), and
//! compaction's `rewrite.after_read`, `rewrite.after_write`, `rewrite.after_catalog`,
//! `rewrite.mid_retire`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that arms kill points.
pub const KILL_AT_ENV: &str = "FERRITE_KILL_AT";

/// An armed point: its name, on which hit it fires, and how often it was reached.
struct Armed {
    point: String,
    at_hit: u64,
    hits: AtomicU64,
}

static ARMED: OnceLock<Vec<Armed>> = OnceLock::new();

fn armed() -> &'static [Armed] {
    ARMED.get_or_init(|| {
        std::env::var(KILL_AT_ENV)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (point, at_hit) = match p.split_once('@') {
                            Some((name, n)) => (name, n.parse().unwrap_or(1)),
                            None => (p, 1),
                        };
                        Armed { point: point.to_owned(), at_hit: at_hit.max(1), hits: AtomicU64::new(0) }
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Whether reaching `point` now kills the process: it is armed and this is the hit it
/// waits for. Counts the hit; a write path asks before a step it wants to cut in half.
pub fn fires(point: &str) -> bool {
    let armed = armed();
    if armed.is_empty() {
        return false;
    }
    armed.iter().filter(|a| a.point == point).any(|a| a.hits.fetch_add(1, Ordering::Relaxed) + 1 == a.at_hit)
}

/// Kills the process with SIGKILL (no destructor, no flush) when `point` fires.
pub fn kill_point(point: &str) {
    if fires(point) {
        kill(point);
    }
}

/// Kills the process with SIGKILL at `point` (after [`fires`] said so).
pub fn kill(point: &str) -> ! {
    tracing::error!(point, "{KILL_AT_ENV}: killing the process here");
    eprintln!("{KILL_AT_ENV}: killed at {point}");
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
    // Only when `kill` could not be run: die without unwinding all the same.
    std::process::abort();
}
