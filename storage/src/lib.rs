//! Ferrite's storage: the write-ahead log, the in-memory hot buffer and the Parquet archive
//! on `object_store`, with the file catalog that ties them together.
//!
//! ```text
//! shard thread ── ShardStore::commit ──▶ WAL (append + fsync) ──▶ hot buffer (queryable)
//!                                                                     │ every persist_interval
//!                                                                     │ or when over the size bound
//!                           persister thread: rotate WALs, then in rounds of about an eighth
//!                           of the soft bound: encode Parquet per stream and hour, put to the
//!                           object store, commit the file catalog, drop the persisted rows from
//!                           the hot buffer and delete the WAL segments
//! ```
//!
//! Invariants:
//! - A row is in exactly one of {hot buffer, catalogued Parquet files} as seen by any
//!   [`Storage::snapshot`] (both change under the stream's lock).
//! - A WAL segment is deleted only after the catalog that covers its rows is on disk, and
//!   the catalog names a local file only after the file and its directory are fsynced.
//! - The archive holds only catalogued files: a persist that fails removes what it had
//!   uploaded, and opening the data directory sweeps away what a crash left behind, so
//!   outside readers (DuckDB over `**/*.parquet`) never count a row twice.
//! - The hot buffer has a hard bound ([`HARD_LIMIT_FACTOR`] × `hot_max_bytes`): past it the
//!   node is marked overloaded in [`Health`] and the doors hold back new data until a
//!   persist's round frees memory.
//! - A persist's round ends at a WAL sequence number no hot batch straddles, so that the
//!   catalog's persisted cut never covers rows still only in memory.
//!
//! Depends on `ferrite-engine` only.

pub mod archive;
pub mod checkpoint;
pub mod error;
pub mod file_catalog;
mod last_values;
pub mod maintenance;
pub mod wal;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use ferrite_engine::{
    Checkpoint, Cutter, Health, Metrics, Recovery, Replayed, ShardStore, StreamBatch, StreamCatalog, StreamName,
    align_to_schema,
};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use parking_lot::{Condvar, Mutex, RwLock};

pub use archive::ArchivedFile;
use error::io;
pub use error::{Error, Result};
use file_catalog::FileCatalog;
pub use maintenance::{CompactionReport, MaintenanceConfig};
use wal::WalWriter;

/// Settings of storage.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// Root of the data directory.
    pub data_dir: PathBuf,
    /// How often the hot buffer is written to Parquet.
    pub persist_interval: Duration,
    /// Hot-buffer size that triggers a persist before the interval is up.
    pub hot_max_bytes: usize,
    /// Number of engine shards (one WAL per shard).
    pub shards: usize,
    /// Where the Parquet archive goes: `None` for `{data_dir}/archive`, a `file:///dir`
    /// URL, or `s3://bucket/prefix` (credentials, region and endpoint from the standard
    /// `AWS_*` environment variables).
    pub archive_url: Option<String>,
    /// Where storage reports failing persists and commits and the overload flag.
    pub health: Arc<Health>,
    /// Compaction, retention and retired files.
    pub maintenance: MaintenanceConfig,
    /// How long one object-store request is retried (with exponential back-off) before
    /// the operation fails; a failed persist is then tried again as a whole.
    pub archive_retry_timeout: Duration,
}

/// The hot buffer's hard bound, as a multiple of [`StorageConfig::hot_max_bytes`]: past
/// it, ingest is held back until a persist succeeds.
pub const HARD_LIMIT_FACTOR: usize = 2;

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("ferrite-data"),
            persist_interval: Duration::from_secs(60),
            hot_max_bytes: 512 * 1024 * 1024,
            shards: 1,
            archive_url: None,
            health: Arc::new(Health::new()),
            maintenance: MaintenanceConfig::default(),
            archive_retry_timeout: Duration::from_secs(30),
        }
    }
}

struct HotBatch {
    shard: u32,
    /// Lowest WAL sequence number of the rows in this batch (below `seq` once merged).
    min_seq: u64,
    /// Highest WAL sequence number of the rows in this batch.
    seq: u64,
    /// WAL epoch of the rows (see [`WalWriter::epoch`]); only batches of one epoch merge.
    epoch: u64,
    /// Oldest `time` of the rows (ns), so that a retention's horizon filters only batches
    /// that reach past it.
    min_time: i64,
    batch: RecordBatch,
}

impl HotBatch {
    fn new(shard: u32, seq: u64, epoch: u64, batch: RecordBatch) -> Self {
        let min_time = batch
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::TimestampNanosecondArray>()
            .and_then(arrow::compute::min)
            .unwrap_or(i64::MIN);
        Self { shard, min_seq: seq, seq, epoch, min_time, batch }
    }
}

/// Batches under this many rows are "small": many small ones in a row get merged.
const SMALL_BATCH_ROWS: usize = 1024;
/// How many small batches in a row trigger a merge (amortised O(rows)).
const MERGE_RUN: usize = 64;

impl StreamData {
    /// Appends a committed batch; merges the tail when it is a long run of small batches of
    /// the same shard and WAL epoch (MQTT sends events one by one). Returns the change in
    /// bytes held.
    fn push(&mut self, hb: HotBatch) -> std::result::Result<isize, arrow::error::ArrowError> {
        self.last.update(&hb.batch);
        let mut delta = hb.batch.get_array_memory_size() as isize;
        let (shard, epoch) = (hb.shard, hb.epoch);
        self.hot.push(hb);
        let run = self
            .hot
            .iter()
            .rev()
            .take_while(|h| h.shard == shard && h.epoch == epoch && h.batch.num_rows() < SMALL_BATCH_ROWS)
            .count();
        if run >= MERGE_RUN {
            let start = self.hot.len() - run;
            let tail: Vec<HotBatch> = self.hot.drain(start..).collect();
            let schemas: Vec<_> = tail.iter().map(|h| h.batch.schema()).collect();
            let schema = ferrite_engine::widest_schema(&schemas).unwrap_or_else(|| tail[0].batch.schema());
            let mut aligned = Vec::with_capacity(tail.len());
            for h in &tail {
                delta -= h.batch.get_array_memory_size() as isize;
                aligned.push(
                    align_to_schema(&h.batch, &schema)
                        .map_err(|e| arrow::error::ArrowError::ComputeError(e.to_string()))?,
                );
            }
            let batch = concat_batches(&schema, &aligned)?;
            delta += batch.get_array_memory_size() as isize;
            let seq = tail.iter().map(|h| h.seq).max().unwrap_or(0);
            let min_seq = tail.iter().map(|h| h.min_seq).min().unwrap_or(0);
            let min_time = tail.iter().map(|h| h.min_time).min().unwrap_or(i64::MIN);
            self.hot.push(HotBatch { shard, min_seq, seq, epoch, min_time, batch });
        }
        Ok(delta)
    }
}

#[derive(Default)]
struct StreamData {
    hot: Vec<HotBatch>,
    files: Vec<ArchivedFile>,
    /// The newest row of each device, of the rows in `hot` and `files`.
    last: last_values::LastValues,
}

/// What a query sees of a stream at one instant: rows in memory and files in the archive,
/// disjoint and together complete.
#[derive(Debug, Clone, Default)]
pub struct StreamSnapshot {
    /// Hot rows (schemas may be older, narrower versions of the stream's schema).
    pub hot: Vec<RecordBatch>,
    /// Archived files, paths relative to the archive root.
    pub files: Vec<ArchivedFile>,
}

/// How much of a stream is where.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Rows in the hot buffer.
    pub hot_rows: usize,
    /// Rows in archive files (including hours past a retention not yet dropped).
    pub archived_rows: u64,
    /// Archive files.
    pub files: usize,
    /// Bytes of archive files.
    pub archived_bytes: u64,
}

/// The storage service: implements [`ShardStore`] for the engine and serves snapshots to
/// the query layer.
pub struct Storage {
    config: StorageConfig,
    catalog: Arc<StreamCatalog>,
    metrics: Arc<Metrics>,
    wals: Vec<Mutex<WalWriter>>,
    streams: RwLock<HashMap<StreamName, Arc<RwLock<StreamData>>>>,
    file_catalog: Mutex<FileCatalog>,
    file_catalog_path: PathBuf,
    /// Snapshots of the last-value caches, one file per stream.
    last_values_dir: PathBuf,
    archive_root: String,
    store: Arc<dyn ObjectStore>,
    /// The archive's directory when it is local: files are written and fsynced by hand.
    local_root: Option<PathBuf>,
    hot_bytes: AtomicUsize,
    persist_lock: Mutex<()>,
    /// One rewrite of archive files (compaction, retention, purge) at a time; taken before
    /// `persist_lock`.
    rewrite_lock: Mutex<()>,
    /// Files moved to `_retired/`, and when.
    retired: Mutex<Vec<(String, Instant)>>,
    wake: (Mutex<bool>, Condvar),
    maintenance_stop: (Mutex<bool>, Condvar),
    runtime: tokio::runtime::Handle,
    /// Takes the consistent cuts persists use (the engine), once it is running.
    cutter: RwLock<Option<std::sync::Weak<dyn Cutter>>>,
    /// `catalog/checkpoint.bin`.
    checkpoint_path: PathBuf,
    /// What start-up found for the rules' recovery, until the server takes it.
    recovery: Mutex<Option<Recovery>>,
    /// Uploads no catalog names whose removal failed (the store refusing at the time):
    /// removed again before every persist, so that readers of the archive's files see no
    /// row twice once the store answers again, without waiting for a restart's sweep.
    orphans: Mutex<Vec<String>>,
    #[cfg(test)]
    test: TestHooks,
}

/// Fault injection and an event log for the crate's own tests.
#[cfg(test)]
#[derive(Default)]
struct TestHooks {
    /// Persisting this stream fails (after the streams before it were uploaded).
    fail_stream: Mutex<Option<String>>,
    /// What the persister did, in order: `sync file …`, `sync dir …`, `catalog`.
    events: Mutex<Vec<String>>,
    /// The hot buffer's bytes after each round of a persist.
    hot_after_round: Mutex<Vec<usize>>,
    /// The round after this many more fails before it uploads (as a failing object store
    /// would), once.
    fail_round: Mutex<Option<usize>>,
    /// A rewrite stops here as a crash would (no cleanup).
    crash_at: Mutex<Option<maintenance::CrashPoint>>,
}

#[cfg(test)]
impl TestHooks {
    /// Counts a round down towards `fail_round`; true for the round that fails.
    fn round_fails(&self) -> bool {
        let mut left = self.fail_round.lock();
        match *left {
            Some(0) => {
                *left = None;
                true
            }
            Some(n) => {
                *left = Some(n - 1);
                false
            }
            None => false,
        }
    }
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").field("data_dir", &self.config.data_dir).finish()
    }
}

impl Storage {
    /// Opens the data directory: loads the file catalog, replays the WAL into the hot
    /// buffer (skipping what is already archived), and prepares the archive.
    ///
    /// `runtime` runs object-store calls for the persister thread.
    pub fn open(
        config: StorageConfig,
        catalog: Arc<StreamCatalog>,
        metrics: Arc<Metrics>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Arc<Self>> {
        let data = &config.data_dir;
        std::fs::create_dir_all(data).map_err(io("create data dir", data))?;
        let (store, archive_root, local_root) =
            open_archive(config.archive_url.as_deref(), data, config.archive_retry_timeout)?;
        let file_catalog_path = data.join("catalog").join("files.json");
        let files = FileCatalog::load(&file_catalog_path)?;

        let mut streams: HashMap<StreamName, Arc<RwLock<StreamData>>> = HashMap::new();
        for (name, list) in &files.streams {
            let s = StreamName::from_key(name)?;
            streams.entry(s).or_default().write().files = list.clone();
        }
        // Last values before the WAL replay adds what came after the last persist's cut.
        let last_values_dir = data.join("catalog").join("last_values");
        let mut cached: std::collections::HashSet<StreamName> = std::collections::HashSet::new();
        for entry in std::fs::read_dir(&last_values_dir).into_iter().flatten().flatten() {
            let Some(key) = entry.file_name().to_str().and_then(last_values::key_of) else { continue };
            let Ok(stream) = StreamName::from_key(&key) else { continue };
            match last_values::LastValues::load(&entry.path()) {
                Ok(lv) => {
                    streams.entry(stream.clone()).or_default().write().last = lv;
                    cached.insert(stream);
                }
                Err(e) => tracing::warn!(
                    file = %entry.path().display(), error = %e,
                    "cannot read a last-values snapshot; rebuilding that stream's from its files"
                ),
            }
        }

        // Replay every shard directory on disk, even of shards this run does not have.
        let wal_root = data.join("wal");
        let mut shard_ids: Vec<u32> = (0..config.shards.max(1) as u32).collect();
        if let Ok(dirs) = std::fs::read_dir(&wal_root) {
            for d in dirs.flatten() {
                if let Some(n) =
                    d.file_name().to_str().and_then(|n| n.strip_prefix("shard-")).and_then(|n| n.parse().ok())
                    && !shard_ids.contains(&n)
                {
                    shard_ids.push(n);
                }
            }
        }
        shard_ids.sort_unstable();
        // The rules' last checkpoint, if it still covers what the WAL holds: of this many
        // shards, and not older than any shard's persisted cut.
        let checkpoint_path = data.join("catalog").join("checkpoint.bin");
        let mut checkpoint = match checkpoint::load(&checkpoint_path) {
            Ok(Some(c)) => {
                let fits = c.cuts.len() == config.shards.max(1)
                    && c.cuts
                        .iter()
                        .enumerate()
                        .all(|(s, cut)| files.persisted_upto.get(&(s as u32)).is_none_or(|upto| *upto <= *cut));
                if !fits {
                    tracing::warn!(
                        file = %checkpoint_path.display(),
                        "the rules' checkpoint does not match this data directory (another shard count, or older \
                         than the archive); rules start with empty state"
                    );
                }
                fits.then_some(c)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the rules' checkpoint; rules start with empty state");
                metrics.inc("ferrite_checkpoint_failures_total", &[("step", "read")], 1);
                None
            }
        };
        let mut after_cut: Vec<Vec<Replayed>> =
            checkpoint.as_ref().map(|c| vec![Vec::new(); c.cuts.len()]).unwrap_or_default();
        // Unpersisted entries in the WAL of a shard the checkpoint does not have (a run with
        // more shards that crashed before its first checkpoint): the rules never saw them
        // in the checkpoint's order, so the checkpoint is not used.
        let mut stray = false;
        let mut wals = Vec::new();
        let mut hot_bytes: isize = 0;
        let mut replayed = 0usize;
        for shard in 0..=shard_ids.last().copied().unwrap_or(0) {
            let dir = wal_root.join(format!("shard-{shard}"));
            let upto = files.persisted_upto.get(&shard).copied().unwrap_or(0);
            let cut = checkpoint.as_ref().and_then(|c| c.cuts.get(shard as usize)).copied();
            let mut last = upto;
            for seg in wal::list_segments(&dir)? {
                let read = wal::read_segment(&seg.path)?;
                if read.torn_tail > 0 {
                    tracing::warn!(segment = %seg.path.display(), bytes = read.torn_tail, "wal: ignoring a torn write at the end of a segment (never acknowledged)");
                }
                if !read.corrupt.is_empty() {
                    let kept = wal::quarantine(&seg.path)?;
                    for (offset, len, what) in &read.corrupt {
                        tracing::error!(
                            segment = %seg.path.display(),
                            offset, bytes = len, reason = %what, copy = %kept.display(),
                            "wal: CORRUPTION inside a segment; the intact entries around it are replayed, \
                             the damaged bytes are lost; a copy of the segment is kept for inspection"
                        );
                    }
                    metrics.inc("ferrite_wal_corrupt_regions_total", &[], read.corrupt.len() as u64);
                }
                for entry in read.entries {
                    last = last.max(entry.seq);
                    if entry.seq <= upto {
                        continue;
                    }
                    replayed += entry.batch.num_rows();
                    if checkpoint.is_some() && cut.is_none() {
                        stray = true;
                    }
                    if let Some(list) = cut.filter(|c| entry.seq > *c).and_then(|_| after_cut.get_mut(shard as usize)) {
                        list.push(Replayed { derived: entry.derived, batch: entry.batch.clone() });
                    }
                    hot_bytes += streams.entry(entry.batch.stream.clone()).or_default().write().push(HotBatch::new(
                        shard,
                        entry.seq,
                        0,
                        entry.batch.batch,
                    ))?;
                }
            }
            wals.push(Mutex::new(WalWriter::open(&dir, last + 1)?));
        }
        if replayed > 0 {
            tracing::info!(rows = replayed, "replayed the write-ahead log into the hot buffer");
        }
        if stray && checkpoint.take().is_some() {
            tracing::warn!(
                "the WAL holds entries of shards the rules' checkpoint does not cover (the shard count \
                 changed); rules start with empty state"
            );
        }
        let hot_bytes = hot_bytes.max(0) as usize;
        config.health.set_overloaded(hot_bytes >= config.hot_max_bytes.saturating_mul(HARD_LIMIT_FACTOR));
        config.health.set_pressure(pressure(hot_bytes, config.hot_max_bytes));
        let storage = Arc::new(Self {
            config,
            catalog,
            metrics,
            wals,
            streams: RwLock::new(streams),
            file_catalog: Mutex::new(files),
            file_catalog_path,
            last_values_dir,
            archive_root,
            store,
            local_root,
            hot_bytes: AtomicUsize::new(hot_bytes),
            persist_lock: Mutex::new(()),
            rewrite_lock: Mutex::new(()),
            retired: Mutex::new(Vec::new()),
            wake: (Mutex::new(false), Condvar::new()),
            maintenance_stop: (Mutex::new(false), Condvar::new()),
            runtime,
            cutter: RwLock::new(None),
            checkpoint_path,
            recovery: Mutex::new(checkpoint.map(|checkpoint| Recovery { checkpoint, entries: after_cut })),
            orphans: Mutex::new(Vec::new()),
            #[cfg(test)]
            test: TestHooks::default(),
        });
        let (swept, _quarantined) = storage.check_archive()?;
        if swept > 0 {
            tracing::warn!(
                files = swept,
                "removed archive files that no catalog names (left by a failed or interrupted persist or rewrite)"
            );
        }
        storage.rebuild_last_values(&cached)?;
        let retired = storage.clear_retired()?;
        if retired > 0 {
            tracing::info!(
                files = retired,
                "removed files replaced by compaction, retention or purge before the last stop"
            );
        }
        Ok(storage)
    }

    /// The node's health, as storage reports it.
    pub fn health(&self) -> &Arc<Health> {
        &self.config.health
    }

    /// Compares the archive with the catalog, on start. Deletes every file under the
    /// tenants' archive prefixes that the catalog does not name (uploads of a persist or a
    /// rewrite that failed or was interrupted), and quarantines every file the catalog names
    /// that is gone or not the size it was written at (truncated, overwritten): see
    /// [`Storage::quarantine`]. Returns how many files were deleted and quarantined.
    fn check_archive(&self) -> Result<(usize, usize)> {
        let known: std::collections::HashSet<String> =
            self.file_catalog.lock().streams.values().flatten().map(|f| f.path.clone()).collect();
        let store = self.store.clone();
        // Only directories named like tenants are ours to sweep.
        let listed: Vec<(ObjectPath, u64)> = self.runtime.block_on(async move {
            use futures::TryStreamExt;
            let top = store.list_with_delimiter(None).await?;
            let mut files = Vec::new();
            for prefix in top.common_prefixes {
                if ferrite_engine::validate_tenant(prefix.as_ref()).is_err() {
                    continue;
                }
                files.extend(store.list(Some(&prefix)).map_ok(|m| (m.location, m.size)).try_collect::<Vec<_>>().await?);
            }
            Ok::<_, object_store::Error>(files)
        })?;
        let mut removed = 0;
        for (location, _) in &listed {
            if known.contains(location.as_ref()) {
                continue;
            }
            self.delete_archived(location.as_ref())?;
            removed += 1;
        }
        let sizes: HashMap<&str, u64> = listed.iter().map(|(l, size)| (l.as_ref(), *size)).collect();
        let damaged: Vec<(String, ArchivedFile, Option<u64>)> = self
            .file_catalog
            .lock()
            .streams
            .iter()
            .flat_map(|(stream, files)| files.iter().map(move |f| (stream, f)))
            .filter_map(|(stream, f)| match sizes.get(f.path.as_str()) {
                Some(size) if *size == f.size => None,
                found => Some((stream.clone(), f.clone(), found.copied())),
            })
            .collect();
        for (_, file, found) in &damaged {
            self.quarantine(file, *found)?;
        }
        for (stream, file, _) in &damaged {
            // Out of the catalog and the stream's file list, as a rewrite's inputs go.
            self.swap_files(&StreamName::from_key(stream)?, std::slice::from_ref(file), &[])?;
        }
        // Temporary files of a local write that never got renamed into place.
        if let Some(root) = &self.local_root {
            for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
                let name = entry.file_name();
                if name.to_str().is_some_and(|n| ferrite_engine::validate_tenant(n).is_ok()) {
                    removed += remove_temp_files(&entry.path())?;
                }
            }
        }
        Ok((removed, damaged.len()))
    }

    /// Takes a damaged archive file out of service without deleting it: moves it to
    /// `_quarantine/{its path}` (when it is there at all) with its catalog entry beside it
    /// (`.entry.json`: what it should have been), counts it and logs an error naming it. The
    /// caller drops it from the catalog: queries then serve every other file, and an
    /// operator can restore the file from a backup and its entry.
    fn quarantine(&self, file: &ArchivedFile, found: Option<u64>) -> Result<()> {
        let target = format!("{QUARANTINE_DIR}/{}", file.path);
        if found.is_some() {
            let (from, to) = (ObjectPath::from(file.path.as_str()), ObjectPath::from(target.as_str()));
            self.runtime.block_on(self.store.rename(&from, &to))?;
        }
        let entry = serde_json::to_vec_pretty(file)
            .map_err(|e| Error::CorruptCatalog { path: file.path.clone(), message: e.to_string() })?;
        self.put_archived(&format!("{target}.entry.json"), entry)?;
        let reason = if found.is_some() { "size" } else { "missing" };
        self.metrics.inc("ferrite_archive_quarantined_files_total", &[("reason", reason)], 1);
        tracing::error!(
            file = %file.path,
            expected_bytes = file.size,
            found_bytes = ?found,
            rows = file.rows,
            quarantine = %target,
            "ARCHIVE FILE DAMAGED: {} (the catalog recorded {} bytes); moved aside, its {} rows are no longer \
             served until it is restored",
            if found.is_some() { "not the size it was written at" } else { "missing" },
            file.size,
            file.rows
        );
        Ok(())
    }

    /// Removes files no catalog names (a failed persist's or rewrite's uploads); those the
    /// store refuses to remove now are kept for [`Storage::retry_orphans`].
    pub(crate) fn remove_uncatalogued<'a>(&self, paths: impl Iterator<Item = &'a str>) {
        for path in paths {
            if let Err(e) = self.delete_archived(path) {
                tracing::warn!(file = %path, error = %e, "cannot remove an uncatalogued upload; retrying before the next persist");
                let mut orphans = self.orphans.lock();
                if !orphans.iter().any(|o| o == path) {
                    orphans.push(path.to_owned());
                }
            }
        }
        self.metrics.gauge("ferrite_archive_orphans", &[]).set(self.orphans.lock().len() as i64);
    }

    /// Tries again to remove the uploads [`Storage::remove_uncatalogued`] could not.
    fn retry_orphans(&self) {
        let pending = std::mem::take(&mut *self.orphans.lock());
        if pending.is_empty() {
            return;
        }
        let before = pending.len();
        self.remove_uncatalogued(pending.iter().map(String::as_str));
        let left = self.orphans.lock().len();
        if left < before {
            tracing::info!(removed = before - left, left, "removed uncatalogued uploads left by failed persists");
        }
    }

    fn delete_archived(&self, path: &str) -> Result<()> {
        let location = ObjectPath::from(path);
        match self.runtime.block_on(self.store.delete(&location)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The object store holding the archive, as queries read it: files replaced after a
    /// query listed them are still found (see [`maintenance::RetiredFallback`]).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        Arc::new(maintenance::RetiredFallback::new(self.store.clone()))
    }

    /// Where the archive is: a local directory or the URL it was configured with.
    pub fn archive_location(&self) -> &str {
        &self.archive_root
    }

    /// The stream catalog.
    pub fn catalog(&self) -> &Arc<StreamCatalog> {
        &self.catalog
    }

    /// Bytes of Arrow data in the hot buffer.
    pub fn hot_bytes(&self) -> usize {
        self.hot_bytes.load(Ordering::Relaxed)
    }

    /// A consistent view of `stream`: hot rows and archive files, disjoint. With a
    /// retention, nothing older than its horizon (whole hours) is in it.
    pub fn snapshot(&self, stream: &StreamName) -> StreamSnapshot {
        let Some(data) = self.streams.read().get(stream).cloned() else { return StreamSnapshot::default() };
        let horizon = self.horizon_of(stream);
        let d = data.read();
        let Some(h) = horizon else {
            return StreamSnapshot { hot: d.hot.iter().map(|h| h.batch.clone()).collect(), files: d.files.clone() };
        };
        let mut hot = Vec::with_capacity(d.hot.len());
        for b in &d.hot {
            if b.min_time >= h {
                hot.push(b.batch.clone());
            } else {
                match maintenance::rows_from(&b.batch, h) {
                    Ok(kept) if kept.num_rows() > 0 => hot.push(kept),
                    Ok(_) => {}
                    // Cannot happen for a valid batch; answering too much beats losing rows.
                    Err(_) => hot.push(b.batch.clone()),
                }
            }
        }
        StreamSnapshot { hot, files: d.files.iter().filter(|f| f.max_time >= h).cloned().collect() }
    }

    fn stream_data(&self, stream: &StreamName) -> Arc<RwLock<StreamData>> {
        if let Some(d) = self.streams.read().get(stream) {
            return d.clone();
        }
        self.streams.write().entry(stream.clone()).or_default().clone()
    }

    /// Writes every hot row committed so far to Parquet and commits the file catalog.
    /// Runs on the caller's thread (the persister thread, or shutdown); must not be called
    /// from inside the async runtime.
    ///
    /// A large hot buffer is persisted in rounds of about an eighth of `hot_max_bytes`, each
    /// committed to the catalog and freed from memory before the next is encoded: the
    /// memory comes back as the persist goes, not only at its end, so that a node at its
    /// hard bound takes writes again within a round instead of a whole persist.
    pub fn persist(&self) -> Result<usize> {
        let _one_at_a_time = self.persist_lock.lock();
        // Leftovers of failed persists first: files of rows that are about to be uploaded
        // again must not stay beside the new ones.
        self.retry_orphans();
        // 1. Cut every WAL: entries up to `cut` are exactly those in the closed segments,
        //    and all of them are in the hot buffer (commit holds the WAL lock until then).
        //    With the engine running, the cut is a checkpoint: taken on the shard threads
        //    with the rules' state at that point.
        let (cuts, mut checkpoint) = self.cut();
        let mut streams: Vec<(StreamName, Arc<RwLock<StreamData>>)> =
            self.streams.read().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        streams.sort_by(|a, b| a.0.cmp(&b.0));
        // The last values now cover every row up to the cuts: on disk before the catalog
        // moves past them, so that a restart's WAL replay finds what the snapshot lacks.
        for (name, data) in &streams {
            if let Err(e) = self.store_last_values(name, data) {
                self.persist_failed(&[], &e);
                return Err(e);
            }
        }
        let rounds = plan_rounds(&streams, &cuts, self.round_bytes());
        let (mut rows, mut files) = (0, 0);
        for upto in &rounds {
            #[cfg(test)]
            if self.test.round_fails() {
                let e = Error::Io {
                    op: "put parquet",
                    path: "a round".to_owned(),
                    source: std::io::Error::other("injected: object store unreachable"),
                };
                self.persist_failed(&[], &e);
                return Err(e);
            }
            // The checkpoint goes with the first round: the catalog's persisted cut must
            // never pass it.
            let (r, f) = self.persist_round(&streams, upto, checkpoint.take())?;
            rows += r;
            files += f;
            #[cfg(test)]
            self.test.hot_after_round.lock().push(self.hot_bytes());
        }
        if rows > 0 {
            tracing::info!(rows, files, rounds = rounds.len(), "persisted hot buffer to parquet");
        }
        Ok(rows)
    }

    /// How much of the hot buffer one round of a persist encodes: an eighth of the soft
    /// bound, at least 1 MiB.
    fn round_bytes(&self) -> usize {
        (self.config.hot_max_bytes / 8).max(1 << 20)
    }

    /// One round of a persist: the hot rows of each shard up to `upto` (a point no hot
    /// batch straddles, see [`plan_rounds`]) encoded, uploaded, committed to the catalog
    /// (after `checkpoint`, when given) and swapped out of the hot buffer; then the WAL
    /// segments they were in are removed. Returns the rows and files written.
    fn persist_round(
        &self,
        streams: &[(StreamName, Arc<RwLock<StreamData>>)],
        upto: &[u64],
        checkpoint: Option<Checkpoint>,
    ) -> Result<(usize, usize)> {
        let in_round = |h: &HotBatch| upto.get(h.shard as usize).is_some_and(|c| h.seq <= *c);
        // 2. Encode and upload, stream by stream; nothing is visible yet.
        let mut new_files: Vec<(StreamName, Vec<ArchivedFile>)> = Vec::new();
        let mut rows_total = 0;
        for (name, data) in streams {
            let batches: Vec<RecordBatch> =
                data.read().hot.iter().filter(|h| in_round(h)).map(|h| h.batch.clone()).collect();
            if batches.is_empty() {
                continue;
            }
            let started = Instant::now();
            let files = match self.persist_stream(name, &batches) {
                Ok(files) => files,
                Err(e) => {
                    self.persist_failed(&new_files, &e);
                    return Err(e);
                }
            };
            rows_total += files.iter().map(|f| f.rows as usize).sum::<usize>();
            self.metrics.histogram("ferrite_persist_seconds", &[]).observe(started.elapsed());
            new_files.push((name.clone(), files));
        }

        // 3. The checkpoint, then the catalog (whose persisted cut must never pass the
        //    checkpoint's), then swap hot rows for files under each stream's lock.
        if let Some(c) = &checkpoint {
            if let Err(e) = self.store_checkpoint(c) {
                // The catalog moving past the old checkpoint makes it stale: rules would
                // start empty after a crash, nothing else is lost.
                tracing::error!(error = %e, "cannot write the rules' checkpoint; persisting without it");
                self.metrics.inc("ferrite_checkpoint_failures_total", &[("step", "write")], 1);
            } else if !new_files.is_empty() {
                ferrite_engine::failpoint::kill_point("persist.after_checkpoint");
            }
        }
        if !new_files.is_empty() {
            ferrite_engine::failpoint::kill_point("persist.before_catalog");
        }
        {
            let mut fc = self.file_catalog.lock();
            let mut next = fc.clone();
            for (shard, cut) in upto.iter().enumerate() {
                let e = next.persisted_upto.entry(shard as u32).or_insert(0);
                *e = (*e).max(*cut);
            }
            for (name, files) in &new_files {
                next.streams.entry(name.to_string()).or_default().extend(files.iter().cloned());
            }
            if let Err(e) = next.store(&self.file_catalog_path) {
                drop(fc);
                self.persist_failed(&new_files, &e);
                return Err(e);
            }
            #[cfg(test)]
            self.test.events.lock().push("catalog".to_owned());
            *fc = next;
        }
        let mut freed = 0;
        for (name, data) in streams {
            let mut d = data.write();
            if let Some((_, files)) = new_files.iter().find(|(n, _)| n == name) {
                d.files.extend(files.iter().cloned());
            }
            d.hot.retain(|h| {
                let keep = !in_round(h);
                if !keep {
                    freed += h.batch.get_array_memory_size();
                }
                keep
            });
        }
        self.hot_bytes.fetch_sub(freed.min(self.hot_bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
        let left = self.hot_bytes();
        self.config.health.recover("persist");
        self.config.health.set_pressure(pressure(left, self.config.hot_max_bytes));
        if left < self.hard_limit() {
            self.config.health.set_overloaded(false);
        }

        // 4. The WAL segments before the round's end are now redundant.
        if !new_files.is_empty() {
            ferrite_engine::failpoint::kill_point("persist.before_wal_removal");
        }
        for (w, cut) in self.wals.iter().zip(upto) {
            if let Err(e) = w.lock().remove_persisted(*cut) {
                tracing::warn!(error = %e, "cannot remove persisted WAL segments; they will be skipped on replay");
            }
        }
        Ok((rows_total, new_files.iter().map(|(_, f)| f.len()).sum()))
    }

    /// Cuts every WAL for a persist: through the engine when it runs (a checkpoint), else
    /// here. WALs of shards the engine does not have (left by a run with more shards) are
    /// cut here in both cases.
    fn cut(&self) -> (Vec<u64>, Option<Checkpoint>) {
        let cutter = self.cutter.read().as_ref().and_then(std::sync::Weak::upgrade);
        if let Some(cutter) = cutter {
            let started = Instant::now();
            let cut = cutter.cut();
            // How long the shards were held (waiting for each other, then encoding state).
            self.metrics.histogram("ferrite_checkpoint_seconds", &[]).observe(started.elapsed());
            match cut {
                Ok(c) if c.cuts.len() <= self.wals.len() => {
                    let mut cuts = c.cuts.clone();
                    cuts.extend(self.wals[c.cuts.len()..].iter().map(|w| w.lock().rotate()));
                    return (cuts, Some(c));
                }
                Ok(c) => tracing::error!(
                    shards = c.cuts.len(),
                    wals = self.wals.len(),
                    "the engine's cut has more shards than storage; persisting without a checkpoint"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take a checkpoint; persisting without one");
                    self.metrics.inc("ferrite_checkpoint_failures_total", &[("step", "cut")], 1);
                }
            }
        }
        (self.wals.iter().map(|w| w.lock().rotate()).collect(), None)
    }

    /// Makes persists take their cut through `cutter` (the engine): each persist then
    /// writes a checkpoint of the rules' state. Held weakly.
    pub fn set_cutter(&self, cutter: std::sync::Weak<dyn Cutter>) {
        *self.cutter.write() = Some(cutter);
    }

    /// Takes a checkpoint without persisting (at start, so that a crash before the first
    /// persist finds one): the WALs are cut and the rules' state written with the cut.
    pub fn checkpoint(&self) -> Result<()> {
        let _one_at_a_time = self.persist_lock.lock();
        match self.cut() {
            (_, Some(c)) => self.store_checkpoint(&c),
            (_, None) => Ok(()),
        }
    }

    fn store_checkpoint(&self, c: &Checkpoint) -> Result<()> {
        checkpoint::store(&self.checkpoint_path, c)?;
        self.metrics.inc("ferrite_checkpoints_total", &[], 1);
        Ok(())
    }

    /// What start-up found for the rules' recovery (the last checkpoint and the WAL entries
    /// after its cut), once; `None` without a usable checkpoint.
    pub fn take_recovery(&self) -> Option<Recovery> {
        self.recovery.lock().take()
    }

    /// Undoes a failed persist: removes the files it uploaded (no catalog names them) and
    /// reports the failure. The rows stay in the hot buffer and the WAL for the next try.
    fn persist_failed(&self, uploaded: &[(StreamName, Vec<ArchivedFile>)], error: &Error) {
        self.remove_uncatalogued(uploaded.iter().flat_map(|(_, f)| f).map(|f| f.path.as_str()));
        self.metrics.inc("ferrite_persist_failures_total", &[], 1);
        self.config.health.degrade("persist", format!("persisting the hot buffer fails: {error}"));
    }

    fn hard_limit(&self) -> usize {
        self.config.hot_max_bytes.saturating_mul(HARD_LIMIT_FACTOR)
    }

    fn persist_stream(&self, name: &StreamName, batches: &[RecordBatch]) -> Result<Vec<ArchivedFile>> {
        #[cfg(test)]
        if self.test.fail_stream.lock().as_deref() == Some(name.as_str()) {
            return Err(Error::Io {
                op: "put parquet",
                path: name.to_string(),
                source: std::io::Error::other("injected: object store unreachable"),
            });
        }
        let schema = match self.catalog.get(name) {
            Some(s) => s.arrow.clone(),
            None => {
                let schemas: Vec<_> = batches.iter().map(|b| b.schema()).collect();
                ferrite_engine::widest_schema(&schemas).unwrap_or_else(|| batches[0].schema())
            }
        };
        let aligned =
            batches.iter().map(|b| align_to_schema(b, &schema)).collect::<ferrite_engine::Result<Vec<_>>>()?;
        let all = concat_batches(&schema, &aligned)?;
        let mut out = Vec::new();
        for chunk in archive::split_by_hour(&all)? {
            let file = match self.write_chunk(name, &chunk) {
                Ok(file) => file,
                Err(e) => {
                    // This persist fails: the hours already uploaded must not stay.
                    self.remove_uncatalogued(out.iter().map(|f: &ArchivedFile| f.path.as_str()));
                    return Err(e);
                }
            };
            self.metrics.inc("ferrite_persisted_rows_total", &[("stream", name.as_str())], file.rows);
            self.metrics.inc("ferrite_persisted_bytes_total", &[("stream", name.as_str())], file.size);
            out.push(file);
        }
        Ok(out)
    }

    /// Puts `bytes` at `path` in the archive durably. Readers only learn of the file from
    /// the catalog, committed after this returns. An S3 PUT is atomic and durable when it
    /// answers; a local file is written under a temporary name, fsynced, renamed into place,
    /// and its directory fsynced.
    fn put_archived(&self, path: &str, bytes: Vec<u8>) -> Result<()> {
        match &self.local_root {
            Some(root) => self.write_local(root, path, &bytes),
            None => {
                let location = ObjectPath::from(path);
                if let Err(e) = self.runtime.block_on(self.store.put(&location, bytes.into())) {
                    // A PUT whose answer was lost (a timeout, a 5xx after the write) may
                    // have landed: no catalog will name it.
                    self.remove_uncatalogued(std::iter::once(path));
                    return Err(e.into());
                }
                Ok(())
            }
        }
    }

    /// Writes `bytes` to `root/rel` durably: temporary file, fsync, rename, then fsync of
    /// the file's directory and of each directory this call created, up to the first that
    /// already existed (whose new entry must be durable too).
    fn write_local(&self, root: &Path, rel: &str, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        let path = root.join(rel);
        let dir = path.parent().unwrap_or(root).to_owned();
        // The deepest directory that exists before this write: syncing stops there.
        let existing = dir.ancestors().find(|d| d.is_dir()).unwrap_or(root).to_owned();
        std::fs::create_dir_all(&dir).map_err(io("create archive dir", &dir))?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file.parquet");
        let tmp = dir.join(format!(".{name}.tmp"));
        let written = std::fs::File::create(&tmp).and_then(|mut f| {
            if ferrite_engine::failpoint::fires("persist.mid_upload") {
                let _ = f.write_all(&bytes[..bytes.len() / 2]).and_then(|()| f.sync_all());
                ferrite_engine::failpoint::kill("persist.mid_upload");
            }
            f.write_all(bytes)?;
            f.sync_all()
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("write parquet", &tmp)(e));
        }
        #[cfg(test)]
        self.test.events.lock().push(format!("sync file {rel}"));
        std::fs::rename(&tmp, &path).map_err(io("rename parquet", &path))?;
        for current in dir.ancestors() {
            std::fs::File::open(current).and_then(|f| f.sync_all()).map_err(io("sync archive dir", current))?;
            #[cfg(test)]
            self.test
                .events
                .lock()
                .push(format!("sync dir {}", current.strip_prefix(root).unwrap_or(current).display()));
            if current == existing || current == root {
                break;
            }
        }
        Ok(())
    }

    /// Runs the persist loop on the calling thread until [`Storage::stop_persister`]:
    /// persists every `persist_interval`, or sooner when the hot buffer passes its bound.
    pub fn run_persister(&self) {
        let (lock, cv) = &self.wake;
        loop {
            let deadline = Instant::now() + self.config.persist_interval;
            let mut stop = lock.lock();
            while !*stop && Instant::now() < deadline && self.hot_bytes() < self.config.hot_max_bytes {
                let wait = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(500));
                cv.wait_for(&mut stop, wait);
            }
            if *stop {
                return;
            }
            drop(stop);
            if let Err(e) = self.persist() {
                tracing::error!(error = %e, "persist failed; the rows stay in the hot buffer and the WAL, retrying next time");
                // Past the soft bound a failing persist would be retried in a tight loop:
                // wait a little (or until stopped) before the next try.
                let mut stop = lock.lock();
                if !*stop {
                    cv.wait_for(&mut stop, Duration::from_secs(1).min(self.config.persist_interval));
                }
            }
        }
    }

    /// Ends [`Storage::run_persister`].
    pub fn stop_persister(&self) {
        let (lock, cv) = &self.wake;
        *lock.lock() = true;
        cv.notify_all();
    }

    /// Every stream that has data, hot or archived.
    pub fn streams(&self) -> Vec<StreamName> {
        let mut v: Vec<StreamName> = self.streams.read().keys().cloned().collect();
        v.sort();
        v
    }

    /// Rows and files per stream, for the API.
    pub fn stats(&self) -> BTreeMap<String, StreamStats> {
        self.streams
            .read()
            .iter()
            .map(|(k, v)| {
                let d = v.read();
                let stats = StreamStats {
                    hot_rows: d.hot.iter().map(|h| h.batch.num_rows()).sum(),
                    archived_rows: d.files.iter().map(|f| f.rows).sum(),
                    files: d.files.len(),
                    archived_bytes: d.files.iter().map(|f| f.size).sum(),
                };
                (k.to_string(), stats)
            })
            .collect()
    }
}

/// How far `hot` bytes are from the soft bound `soft` (0) to the hard bound (1,000), in
/// thousandths: the share of requests the doors shed ([`Health::shed`]).
fn pressure(hot: usize, soft: usize) -> u32 {
    let span = soft.saturating_mul(HARD_LIMIT_FACTOR).saturating_sub(soft).max(1);
    (hot.saturating_sub(soft) as u128 * 1000 / span as u128).min(1000) as u32
}

/// Splits a persist up to `cuts` (one per shard) into rounds of about `round_bytes` of
/// hot data: the per-shard sequence numbers each round persists up to, ascending, the last
/// being `cuts`. A round ends only where no hot batch straddles it (a merged batch holds
/// the rows of several WAL entries, and recovery skips every entry up to the catalog's
/// persisted cut: a batch cut in two would lose its older rows in a crash).
fn plan_rounds(streams: &[(StreamName, Arc<RwLock<StreamData>>)], cuts: &[u64], round_bytes: usize) -> Vec<Vec<u64>> {
    // Per shard: (lowest seq, highest seq, bytes) of every hot batch up to its cut.
    let mut spans: Vec<Vec<(u64, u64, usize)>> = vec![Vec::new(); cuts.len()];
    for (_, data) in streams {
        for h in &data.read().hot {
            let shard = h.shard as usize;
            if cuts.get(shard).is_some_and(|c| h.seq <= *c) {
                spans[shard].push((h.min_seq, h.seq, h.batch.get_array_memory_size()));
            }
        }
    }
    let total: usize = spans.iter().flatten().map(|s| s.2).sum();
    let rounds = total.div_ceil(round_bytes.max(1)).max(1);
    if rounds == 1 {
        return vec![cuts.to_vec()];
    }
    // Per shard, the points a round may end at (no batch straddles them), with the bytes
    // of the batches at or below each, and the shard's total.
    let ends: Vec<(Vec<(u64, usize)>, usize)> = spans
        .into_iter()
        .map(|mut s| {
            s.sort_unstable();
            let mut out = Vec::new();
            let (mut end, mut bytes) = (0u64, 0usize);
            for (i, (lo, hi, b)) in s.into_iter().enumerate() {
                if i > 0 && lo > end {
                    out.push((end, bytes));
                }
                end = end.max(hi);
                bytes += b;
            }
            (out, bytes)
        })
        .collect();
    let mut plan: Vec<Vec<u64>> = (1..rounds)
        .map(|r| {
            ends.iter()
                .map(|(points, shard_total)| {
                    let share = shard_total * r / rounds;
                    // The last point within this round's share (0: none of the shard yet).
                    points.iter().take_while(|(_, b)| *b <= share).last().map_or(0, |(seq, _)| *seq)
                })
                .collect()
        })
        .collect();
    plan.push(cuts.to_vec());
    // Keep the rounds that move some shard forward (a shard's first point may lie past
    // several rounds' shares).
    let mut done = vec![0; cuts.len()];
    plan.retain(|upto| {
        let moves = upto.iter().zip(&done).any(|(u, d)| u > d);
        if moves {
            done.clone_from(upto);
        }
        moves
    });
    plan
}

/// Opens the archive's object store: local by default, `file://` or `s3://` by URL.
type OpenedArchive = (Arc<dyn ObjectStore>, String, Option<PathBuf>);

fn open_archive(url: Option<&str>, data_dir: &Path, retry_timeout: Duration) -> Result<OpenedArchive> {
    let local = |dir: PathBuf| -> Result<OpenedArchive> {
        std::fs::create_dir_all(&dir).map_err(io("create archive dir", &dir))?;
        let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(&dir)?);
        Ok((store, dir.display().to_string(), Some(dir)))
    };
    match url.map(str::trim).filter(|u| !u.is_empty()) {
        None => local(data_dir.join("archive")),
        Some(u) if u.starts_with("file://") => local(PathBuf::from(&u["file://".len()..])),
        Some(u) if u.starts_with("s3://") => {
            let rest = &u["s3://".len()..];
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::UnsupportedArchive(format!("{u} (no bucket)")));
            }
            // A request failing with a 5xx, a timeout or a broken connection is retried with
            // exponential back-off for up to `retry_timeout`; past it the persist (or
            // rewrite) fails, leaves the rows where they were, and is tried again whole.
            let retry = object_store::RetryConfig { retry_timeout, ..Default::default() };
            let s3 =
                object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(retry).build()?;
            let prefix = prefix.trim_matches('/');
            let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
            };
            Ok((store, u.to_owned(), None))
        }
        Some(u) if !u.contains("://") => local(PathBuf::from(u)),
        Some(u) => Err(Error::UnsupportedArchive(u.to_owned())),
    }
}

/// Where damaged archive files are moved (beside the tenants' prefixes; never swept).
pub const QUARANTINE_DIR: &str = "_quarantine";

/// Removes `.*.tmp` files (interrupted local writes) under `dir`; returns how many.
fn remove_temp_files(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io("list archive dir", dir)(e)),
    };
    for e in entries {
        let e = e.map_err(io("list archive dir", dir))?;
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if e.file_type().map_err(io("list archive dir", &path))?.is_dir() {
            removed += remove_temp_files(&path)?;
        } else if name.starts_with('.') && name.ends_with(".tmp") {
            std::fs::remove_file(&path).map_err(io("remove temporary file", &path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish() as u32
}

impl ShardStore for Storage {
    fn commit(&self, shard: usize, group: &[StreamBatch]) -> std::result::Result<(), String> {
        self.commit_to_wal(shard, group, false)
    }

    fn commit_derived(&self, shard: usize, group: &[StreamBatch]) -> std::result::Result<(), String> {
        self.commit_to_wal(shard, group, true)
    }

    fn rotate(&self, shard: usize) -> std::result::Result<u64, String> {
        let wal = self.wals.get(shard).ok_or_else(|| format!("no WAL for shard {shard}"))?;
        Ok(wal.lock().rotate())
    }
}

impl Storage {
    fn commit_to_wal(&self, shard: usize, group: &[StreamBatch], derived: bool) -> std::result::Result<(), String> {
        let Some(wal) = self.wals.get(shard) else {
            return Err(format!("no WAL for shard {shard}"));
        };
        let mut w = wal.lock();
        let seqs = match w.append(group, derived) {
            Ok(seqs) => seqs,
            Err(e) => {
                self.metrics.inc("ferrite_wal_failures_total", &[], 1);
                self.config.health.degrade("wal", format!("WAL appends fail: {e}"));
                return Err(e.to_string());
            }
        };
        self.config.health.recover("wal");
        self.metrics.inc("ferrite_wal_bytes_total", &[], w.last_append_bytes() as u64);
        let epoch = w.epoch();
        let mut added: isize = 0;
        for (sb, seq) in group.iter().zip(seqs) {
            let hb = HotBatch::new(shard as u32, seq, epoch, sb.batch.clone());
            added += self.stream_data(&sb.stream).write().push(hb).map_err(|e| e.to_string())?;
        }
        drop(w);
        let total = if added >= 0 {
            self.hot_bytes.fetch_add(added as usize, Ordering::Relaxed) + added as usize
        } else {
            self.hot_bytes.fetch_sub(added.unsigned_abs(), Ordering::Relaxed) - added.unsigned_abs()
        };
        if total >= self.config.hot_max_bytes {
            self.wake.1.notify_all();
            self.config.health.set_pressure(pressure(total, self.config.hot_max_bytes));
        }
        if total >= self.hard_limit() && !self.config.health.overloaded() {
            tracing::warn!(
                hot_bytes = total,
                limit = self.hard_limit(),
                "the hot buffer is past its hard bound (persists are not keeping up or failing); holding back ingest"
            );
            self.config.health.set_overloaded(true);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray, TimestampNanosecondArray};
    use ferrite_engine::FieldType;

    pub(crate) struct Env {
        _rt: tokio::runtime::Runtime,
        handle: tokio::runtime::Handle,
        pub(crate) dir: tempfile::TempDir,
        pub(crate) catalog: Arc<StreamCatalog>,
    }

    pub(crate) fn env() -> anyhow::Result<Env> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let handle = rt.handle().clone();
        let catalog = Arc::new(StreamCatalog::in_memory());
        catalog.resolve_field(&StreamName::new("t")?, "v", FieldType::Float)?;
        Ok(Env { _rt: rt, handle, dir: tempfile::tempdir()?, catalog })
    }

    impl Env {
        pub(crate) fn open(&self, shards: usize) -> anyhow::Result<Arc<Storage>> {
            let config = StorageConfig { data_dir: self.dir.path().to_owned(), shards, ..StorageConfig::default() };
            self.open_with(config)
        }

        pub(crate) fn open_with(&self, config: StorageConfig) -> anyhow::Result<Arc<Storage>> {
            Ok(Storage::open(config, self.catalog.clone(), Arc::new(Metrics::new()), self.handle.clone())?)
        }

        fn batch(&self, from: usize, n: usize) -> anyhow::Result<StreamBatch> {
            self.batch_of("t", from, n)
        }

        /// Rows `from..from + n` of `stream`: row `i` at second `i`, device `d{i % 3}`, `v = i`.
        pub(crate) fn batch_of(&self, stream: &str, from: usize, n: usize) -> anyhow::Result<StreamBatch> {
            self.batch_timed(stream, from, n, |i| i as i64 * 1_000_000_000)
        }

        /// Like [`Self::batch_of`], with every row's time within the first hour.
        fn batch_in_hour(&self, stream: &str, from: usize, n: usize) -> anyhow::Result<StreamBatch> {
            self.batch_timed(stream, from, n, |i| (i % 3600) as i64 * 1_000_000_000)
        }

        fn batch_timed(
            &self,
            stream: &str,
            from: usize,
            n: usize,
            time: impl Fn(usize) -> i64,
        ) -> anyhow::Result<StreamBatch> {
            let s = StreamName::new(stream)?;
            self.catalog.resolve_field(&s, "v", FieldType::Float)?;
            let schema = self.catalog.get(&s).map(|x| x.arrow.clone()).ok_or_else(|| anyhow::anyhow!("schema"))?;
            let t: Vec<i64> = (from..from + n).map(time).collect();
            let d: Vec<String> = (from..from + n).map(|i| format!("d{}", i % 3)).collect();
            let v: Vec<f64> = (from..from + n).map(|i| i as f64).collect();
            let b = RecordBatch::try_new(
                schema,
                vec![
                    Arc::new(TimestampNanosecondArray::from(t).with_timezone("UTC")),
                    Arc::new(StringArray::from(d)),
                    Arc::new(Float64Array::from(v)),
                ],
            )?;
            Ok(StreamBatch::new(s, b))
        }
    }

    fn values(storage: &Storage) -> anyhow::Result<(Vec<f64>, usize)> {
        values_of(storage, "t")
    }

    fn values_of(storage: &Storage, stream: &str) -> anyhow::Result<(Vec<f64>, usize)> {
        let snap = storage.snapshot(&StreamName::new(stream)?);
        let mut out = Vec::new();
        for b in &snap.hot {
            let v = b.column(2).as_any().downcast_ref::<Float64Array>().ok_or_else(|| anyhow::anyhow!("v"))?;
            out.extend(v.values().iter().copied());
        }
        out.sort_by(f64::total_cmp);
        Ok((out, snap.files.len()))
    }

    fn wal_segments(dir: &Path) -> usize {
        (0..4)
            .map(|s| wal::list_segments(&dir.join("wal").join(format!("shard-{s}"))).map(|v| v.len()).unwrap_or(0))
            .sum()
    }

    /// A cutter like the engine's, for one shard: cuts the WAL and hands over fixed state.
    struct TestCutter(std::sync::Weak<Storage>);

    impl Cutter for TestCutter {
        fn cut(&self) -> std::result::Result<Checkpoint, String> {
            let storage = self.0.upgrade().ok_or("gone")?;
            let cut = ShardStore::rotate(storage.as_ref(), 0)?;
            let mut states = BTreeMap::new();
            states.insert(
                "rules".to_owned(),
                ferrite_engine::ObserverState {
                    shared: b"shared".to_vec(),
                    shards: vec![format!("at {cut}").into_bytes()],
                },
            );
            Ok(Checkpoint { cuts: vec![cut], states })
        }
    }

    #[test]
    fn a_persist_writes_a_checkpoint_and_start_hands_recovery_what_followed_it() -> anyhow::Result<()> {
        let e = env()?;
        {
            let s = e.open(1)?;
            assert!(s.take_recovery().is_none(), "no checkpoint yet");
            let cutter: Arc<dyn Cutter> = Arc::new(TestCutter(Arc::downgrade(&s)));
            s.set_cutter(Arc::downgrade(&cutter));
            s.commit(0, &[e.batch(0, 3)?]).map_err(anyhow::Error::msg)?;
            s.commit_derived(0, &[e.batch_of("derived", 0, 1)?]).map_err(anyhow::Error::msg)?;
            s.persist()?;
            // After the checkpoint: an input and a derived entry, then a crash (no persist).
            s.commit(0, &[e.batch(3, 2)?]).map_err(anyhow::Error::msg)?;
            s.commit_derived(0, &[e.batch_of("derived", 1, 1)?]).map_err(anyhow::Error::msg)?;
        }
        let s = e.open(1)?;
        let r = s.take_recovery().ok_or_else(|| anyhow::anyhow!("no recovery"))?;
        assert_eq!(r.checkpoint.cuts, vec![2], "two entries before the cut");
        assert_eq!(r.checkpoint.states["rules"].shards, vec![b"at 2".to_vec()]);
        let after: Vec<(bool, &str, usize)> =
            r.entries[0].iter().map(|x| (x.derived, x.batch.stream.as_str(), x.batch.num_rows())).collect();
        assert_eq!(after, vec![(false, "t", 2), (true, "derived", 1)]);
        assert!(s.take_recovery().is_none(), "handed over once");
        // Both entries are in the hot buffer as well, like any replayed entry.
        assert_eq!(values(&s)?.0, vec![3.0, 4.0]);

        // Another shard count, or a persist without a checkpoint (its cut passes the
        // checkpoint's): the checkpoint no longer fits and is not used.
        drop(s);
        assert!(e.open(2)?.take_recovery().is_none(), "another shard count");
        assert!(e.open(1)?.take_recovery().is_some(), "the empty WAL of a second shard changes nothing");
        let s = e.open(1)?;
        s.persist()?;
        drop(s);
        assert!(e.open(1)?.take_recovery().is_none(), "older than the catalog's cut");
        Ok(())
    }

    #[test]
    fn commit_replay_persist_and_reopen() -> anyhow::Result<()> {
        let e = env()?;
        {
            let s = e.open(2)?;
            s.commit(0, &[e.batch(0, 5)?]).map_err(anyhow::Error::msg)?;
            s.commit(1, &[e.batch(5, 5)?]).map_err(anyhow::Error::msg)?;
            assert_eq!(values(&s)?.0.len(), 10);
        }
        // Reopened without a persist: everything comes back from the WAL.
        let s = e.open(2)?;
        assert_eq!(values(&s)?.0, (0..10).map(f64::from).collect::<Vec<_>>());
        assert_eq!(s.persist()?, 10);
        assert_eq!(values(&s)?, (vec![], 1), "hot rows moved to one file (one hour)");
        assert_eq!(wal_segments(e.dir.path()), 0);
        s.commit(0, &[e.batch(10, 2)?]).map_err(anyhow::Error::msg)?;
        drop(s);
        let s = e.open(2)?;
        assert_eq!(values(&s)?, (vec![10.0, 11.0], 1), "the catalog and the unpersisted tail both survive");
        Ok(())
    }

    #[test]
    fn torn_wal_tail_is_ignored() -> anyhow::Result<()> {
        let e = env()?;
        {
            let s = e.open(1)?;
            s.commit(0, &[e.batch(0, 3)?]).map_err(anyhow::Error::msg)?;
            s.commit(0, &[e.batch(3, 3)?]).map_err(anyhow::Error::msg)?;
        }
        let seg = wal::list_segments(&e.dir.path().join("wal").join("shard-0"))?;
        let path = &seg[0].path;
        let len = std::fs::metadata(path)?.len();
        // A crash in the middle of the second group's write.
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(len - 10)?;
        let s = e.open(1)?;
        assert_eq!(values(&s)?.0, vec![0.0, 1.0, 2.0]);
        Ok(())
    }

    #[test]
    fn crash_between_catalog_commit_and_wal_cleanup_does_not_duplicate() -> anyhow::Result<()> {
        let e = env()?;
        let wal_dir = e.dir.path().join("wal").join("shard-0");
        let saved;
        {
            let s = e.open(1)?;
            s.commit(0, &[e.batch(0, 4)?]).map_err(anyhow::Error::msg)?;
            let seg = wal::list_segments(&wal_dir)?;
            saved = (seg[0].path.clone(), std::fs::read(&seg[0].path)?);
            s.persist()?;
        }
        // Put the deleted segment back, as if the process died before removing it.
        std::fs::write(&saved.0, &saved.1)?;
        let s = e.open(1)?;
        assert_eq!(values(&s)?, (vec![], 1), "replay skips entries the catalog covers");
        s.commit(0, &[e.batch(4, 1)?]).map_err(anyhow::Error::msg)?;
        assert_eq!(values(&s)?.0, vec![4.0]);
        Ok(())
    }

    #[test]
    fn runs_of_small_batches_are_merged() -> anyhow::Result<()> {
        let e = env()?;
        let s = e.open(1)?;
        for i in 0..200 {
            s.commit(0, &[e.batch(i, 1)?]).map_err(anyhow::Error::msg)?;
        }
        let snap = s.snapshot(&StreamName::new("t")?);
        assert!(snap.hot.len() < 70, "200 one-row batches left {} batches", snap.hot.len());
        assert_eq!(values(&s)?.0, (0..200).map(f64::from).collect::<Vec<_>>());
        // A persist cut in the middle of a run never merges across it.
        s.persist()?;
        for i in 200..330 {
            s.commit(0, &[e.batch(i, 1)?]).map_err(anyhow::Error::msg)?;
        }
        drop(s);
        let s = e.open(1)?;
        assert_eq!(values(&s)?.0, (200..330).map(f64::from).collect::<Vec<_>>());
        Ok(())
    }

    pub(crate) fn commit(s: &Storage, b: StreamBatch) -> anyhow::Result<()> {
        s.commit(0, &[b]).map_err(anyhow::Error::msg)
    }

    fn shard0(e: &Env) -> PathBuf {
        e.dir.path().join("wal").join("shard-0")
    }

    #[test]
    fn a_failed_wal_write_leaves_nothing_before_later_entries() -> anyhow::Result<()> {
        let e = env()?;
        {
            let s = e.open(1)?;
            commit(&s, e.batch(0, 3)?)?;
            // Disk full after 20 bytes of the second group: it fails and is not acknowledged.
            s.wals[0].lock().faults.push(wal::Fault::PartialWrite(20));
            assert!(s.commit(0, &[e.batch(3, 3)?]).is_err());
            // Later groups land after the last good entry, not after the garbage.
            commit(&s, e.batch(6, 3)?)?;
        }
        let s = e.open(1)?;
        assert_eq!(values(&s)?.0, vec![0.0, 1.0, 2.0, 6.0, 7.0, 8.0], "every acknowledged entry replays");
        Ok(())
    }

    #[test]
    fn a_failed_fsync_unwrites_the_group() -> anyhow::Result<()> {
        let e = env()?;
        {
            let s = e.open(1)?;
            commit(&s, e.batch(0, 2)?)?;
            s.wals[0].lock().faults.push(wal::Fault::Sync);
            assert!(s.commit(0, &[e.batch(2, 2)?]).is_err(), "the group's acknowledgement fails");
            assert!(!s.health().is_ok(), "a failing WAL degrades the node");
            commit(&s, e.batch(4, 1)?)?;
            assert!(s.health().is_ok(), "and it recovers with the next good append");
        }
        let s = e.open(1)?;
        assert_eq!(values(&s)?.0, vec![0.0, 1.0, 4.0], "the unacknowledged group is not replayed");
        Ok(())
    }

    #[test]
    fn a_failed_truncation_is_retried_before_the_next_write() -> anyhow::Result<()> {
        let e = env()?;
        {
            let s = e.open(1)?;
            commit(&s, e.batch(0, 2)?)?;
            s.wals[0].lock().faults.extend([wal::Fault::PartialWrite(30), wal::Fault::Truncate(1)]);
            assert!(s.commit(0, &[e.batch(2, 2)?]).is_err());
            commit(&s, e.batch(4, 2)?)?;
        }
        let s = e.open(1)?;
        assert_eq!(values(&s)?.0, vec![0.0, 1.0, 4.0, 5.0]);
        Ok(())
    }

    #[test]
    fn corruption_inside_a_segment_is_quarantined_and_the_entries_after_it_replay() -> anyhow::Result<()> {
        let e = env()?;
        let sizes;
        {
            let s = e.open(1)?;
            let mut at = Vec::new();
            for i in 0..3 {
                commit(&s, e.batch(i * 2, 2)?)?;
                at.push(std::fs::metadata(&wal::list_segments(&shard0(&e))?[0].path)?.len());
            }
            sizes = at;
        }
        // Flip a byte inside the second entry's body (bit rot, a bad sector).
        let path = wal::list_segments(&shard0(&e))?[0].path.clone();
        let mut bytes = std::fs::read(&path)?;
        let middle = (sizes[0] + sizes[1]) as usize / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&path, &bytes)?;
        let s = e.open(1)?;
        assert_eq!(values(&s)?.0, vec![0.0, 1.0, 4.0, 5.0], "the entry after the damage is not dropped quietly");
        let quarantined = std::fs::read_dir(e.dir.path().join("wal").join("quarantine"))?.count();
        assert_eq!(quarantined, 1, "a copy of the damaged segment is kept");
        Ok(())
    }

    #[test]
    fn a_torn_first_entry_of_a_segment_is_never_appended_to() -> anyhow::Result<()> {
        let e = env()?;
        {
            let s = e.open(1)?;
            commit(&s, e.batch(0, 2)?)?;
            s.persist()?;
            // The first group of a new segment, torn by a crash mid-write.
            commit(&s, e.batch(2, 2)?)?;
        }
        let seg = wal::list_segments(&shard0(&e))?;
        assert_eq!(seg.len(), 1);
        let len = std::fs::metadata(&seg[0].path)?.len();
        std::fs::OpenOptions::new().write(true).open(&seg[0].path)?.set_len(len / 2)?;
        {
            let s = e.open(1)?;
            assert_eq!(values(&s)?.0, Vec::<f64>::new());
            commit(&s, e.batch(4, 2)?)?;
        }
        // The restart after that must still read what was acknowledged since.
        let s = e.open(1)?;
        assert_eq!(values(&s)?.0, vec![4.0, 5.0]);
        Ok(())
    }

    #[test]
    fn local_parquet_files_are_fsynced_before_the_catalog_names_them() -> anyhow::Result<()> {
        let e = env()?;
        let s = e.open(1)?;
        commit(&s, e.batch(0, 4)?)?;
        s.persist()?;
        let events = s.test.events.lock().clone();
        let file = events.iter().position(|x| x.starts_with("sync file default/t/date=1970-01-01/hour=00/"));
        let dir = events.iter().position(|x| x == "sync dir default/t/date=1970-01-01/hour=00");
        let root = events.iter().position(|x| x == "sync dir ");
        let catalog = events.iter().position(|x| x == "catalog");
        assert!(
            matches!((file, dir, root, catalog), (Some(f), Some(d), Some(r), Some(c)) if f < d && d < r && r < c),
            "file, then its directories up to the root, then the catalog: {events:?}"
        );
        Ok(())
    }

    pub(crate) fn parquet_files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    out.extend(parquet_files(&p));
                } else if p.extension().is_some_and(|x| x == "parquet") {
                    out.push(p);
                }
            }
        }
        out
    }

    #[test]
    fn a_failed_persist_leaves_no_uncatalogued_files() -> anyhow::Result<()> {
        let e = env()?;
        let archive = e.dir.path().join("archive");
        let s = e.open(1)?;
        commit(&s, e.batch_of("a", 0, 3)?)?;
        commit(&s, e.batch_of("z", 0, 2)?)?;
        *s.test.fail_stream.lock() = Some("z".to_owned());
        assert!(s.persist().is_err());
        assert_eq!(parquet_files(&archive), Vec::<PathBuf>::new(), "stream a's upload was removed");
        assert!(s.health().conditions().iter().any(|(c, _)| c == "persist"), "the failure shows in health");
        assert_eq!(values_of(&s, "a")?.0.len(), 3, "the rows stay hot");
        *s.test.fail_stream.lock() = None;
        assert_eq!(s.persist()?, 5);
        assert!(s.health().is_ok());
        assert_eq!(parquet_files(&archive).len(), 2, "one file per stream, each once");
        Ok(())
    }

    #[test]
    fn opening_sweeps_files_no_catalog_names() -> anyhow::Result<()> {
        let e = env()?;
        {
            let s = e.open(1)?;
            commit(&s, e.batch(0, 3)?)?;
            s.persist()?;
        }
        let part = e.dir.path().join("archive/default/t/date=1970-01-01/hour=00");
        // What a crash between an upload and the catalog commit leaves behind.
        std::fs::write(part.join("0000000000000000001-deadbeef.parquet"), b"PAR1")?;
        std::fs::write(part.join(".0000000000000000002-deadbeef.parquet.tmp"), b"PAR1")?;
        let s = e.open(1)?;
        assert_eq!(parquet_files(&e.dir.path().join("archive")).len(), 1);
        assert_eq!(std::fs::read_dir(&part)?.count(), 1);
        assert_eq!(values(&s)?.1, 1);
        Ok(())
    }

    #[test]
    fn past_the_hard_bound_the_node_is_overloaded_until_a_persist_frees_memory() -> anyhow::Result<()> {
        let e = env()?;
        let config = StorageConfig {
            data_dir: e.dir.path().to_owned(),
            hot_max_bytes: 4096,
            persist_interval: Duration::from_secs(3600),
            ..StorageConfig::default()
        };
        let s = e.open_with(config)?;
        let mut i = 0;
        while !s.health().overloaded() {
            commit(&s, e.batch(i, 50)?)?;
            i += 50;
            assert!(i < 100_000, "never overloaded");
        }
        assert!(s.hot_bytes() >= 4096 * HARD_LIMIT_FACTOR);
        s.persist()?;
        assert!(!s.health().overloaded(), "a successful persist lifts the overload");
        Ok(())
    }

    /// `(device, v)` pairs, sorted.
    type Rows = Vec<(String, f64)>;

    /// Every `(device, v)` of `stream` a query would see (hot and archived), sorted.
    pub(crate) fn seen(s: &Storage, stream: &str) -> anyhow::Result<Rows> {
        let snap = s.snapshot(&StreamName::new(stream)?);
        let mut batches = snap.hot.clone();
        for f in &snap.files {
            batches.extend(s.read_archived(&f.path)?);
        }
        let mut out = Vec::new();
        for b in batches {
            let d = b.column(1).as_any().downcast_ref::<StringArray>().ok_or_else(|| anyhow::anyhow!("device_id"))?;
            let v = b.column(2).as_any().downcast_ref::<Float64Array>().ok_or_else(|| anyhow::anyhow!("v"))?;
            out.extend((0..b.num_rows()).map(|i| (d.value(i).to_owned(), v.value(i))));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        Ok(out)
    }

    /// Fills two shards with runs of small `t` batches (merged into batches that span many
    /// WAL entries) between larger `u` batches, then `u` batches alone, about 20 MB in all;
    /// returns what SQL must see of `t` and `u`.
    fn fill_for_rounds(e: &Env, s: &Storage) -> anyhow::Result<(Rows, Rows)> {
        let (mut t, mut u) = (0, 1_000_000);
        for _run in 0..3 {
            for shard in 0..2 {
                for i in 0..80 {
                    if i < 70 {
                        s.commit(shard, &[e.batch_in_hour("t", t, 10)?]).map_err(anyhow::Error::msg)?;
                        t += 10;
                    }
                    s.commit(shard, &[e.batch_in_hour("u", u, 2_000)?]).map_err(anyhow::Error::msg)?;
                    u += 2_000;
                }
            }
        }
        let expected = |range: std::ops::Range<usize>| {
            let mut v: Rows = range.map(|i| (format!("d{}", i % 3), i as f64)).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
            v
        };
        Ok((expected(0..t), expected(1_000_000..u)))
    }

    /// A persist several times larger than a round frees the hot buffer round by round
    /// (memory comes back while it runs, not at its end), and no round cuts a merged batch
    /// in two: a persist that fails after two rounds, then a crash, loses and doubles
    /// nothing.
    #[test]
    fn a_large_persist_frees_the_hot_buffer_round_by_round() -> anyhow::Result<()> {
        // Rounds of 1 MiB (an eighth of 8 MiB; the hard bound, 16 MiB, is not reached).
        let config = |e: &Env| StorageConfig {
            data_dir: e.dir.path().to_owned(),
            shards: 2,
            hot_max_bytes: 8 << 20,
            ..StorageConfig::default()
        };
        let e = env()?;
        let s = e.open_with(config(&e))?;
        let (t, u) = fill_for_rounds(&e, &s)?;
        let before = s.hot_bytes();
        assert!(before > 4 << 20, "the test needs several rounds of data, has {before} bytes");
        let expected = pressure(before, 8 << 20);
        assert!(expected > 0);
        assert_eq!(s.health().pressure(), expected, "past the soft bound the doors shed requests");
        assert_eq!(s.persist()?, t.len() + u.len());
        assert_eq!(s.health().pressure(), 0, "and stop once a persist has drained the buffer");
        let after = s.test.hot_after_round.lock().clone();
        assert!(after.len() >= 6, "{before} bytes in rounds of 1 MiB, persisted in {} rounds", after.len());
        assert!(
            std::iter::once(before).chain(after.iter().copied()).collect::<Vec<_>>().windows(2).all(|w| w[1] < w[0]),
            "every round frees memory: {before} then {after:?}"
        );
        assert_eq!(after.last(), Some(&0));
        assert_eq!((seen(&s, "t")?, seen(&s, "u")?), (t.clone(), u.clone()));
        drop(s);
        let s = e.open_with(config(&e))?;
        assert_eq!(s.hot_bytes(), 0, "nothing replayed from the WAL after a whole persist");
        assert_eq!((seen(&s, "t")?, seen(&s, "u")?), (t, u));

        // Two rounds land, the third fails, then the process dies.
        let e = env()?;
        let s = e.open_with(config(&e))?;
        let (t, u) = fill_for_rounds(&e, &s)?;
        *s.test.fail_round.lock() = Some(2);
        assert!(s.persist().is_err());
        assert_eq!(s.test.hot_after_round.lock().len(), 2, "two rounds committed");
        assert_eq!((seen(&s, "t")?, seen(&s, "u")?), (t.clone(), u.clone()));
        drop(s);
        let s = e.open_with(config(&e))?;
        assert!(s.stats().values().map(|x| x.files).sum::<usize>() > 0, "the rounds that landed stay");
        assert_eq!((seen(&s, "t")?, seen(&s, "u")?), (t, u), "after the restart");
        Ok(())
    }
}
