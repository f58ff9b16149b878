//! The archive over months: compaction of an hour's small files into few large ones,
//! retention by event time, and erasing one device's rows. All three replace archive files
//! by others through one primitive, `Storage::swap_files`:
//!
//! 1. the new files are written durably under new names (no catalog names them yet: a crash
//!    here leaves orphans that the next start sweeps away);
//! 2. one file-catalog commit swaps inputs for outputs, under the persist lock, and the
//!    in-memory list follows under the stream's lock (a snapshot sees the old set or the
//!    new one, never both, never neither);
//! 3. the replaced files are *retired*: moved to `_retired/` beside the tenants, where a
//!    query that listed them before the swap still reads them (see [`RetiredFallback`]),
//!    and deleted after [`MaintenanceConfig::retired_grace`]. A crash before they moved
//!    leaves them uncatalogued: the next start sweeps them; `_retired/` is emptied on start.
//!
//! The WAL is not touched: these only rewrite rows already in Parquet.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, BooleanArray, RecordBatch, StringArray, TimestampNanosecondArray};
use arrow::buffer::BooleanBuffer;
use arrow::compute::{concat_batches, filter_record_batch};
use async_trait::async_trait;
use bytes::Bytes;
use ferrite_engine::auth::AUDIT_STREAM;
use ferrite_engine::plugin::PurgeReport;
use ferrite_engine::{StreamName, align_to_schema};
use futures::stream::BoxStream;
use object_store::path::Path as ObjectPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::archive::{self, ArchivedFile, HourChunk, NS_PER_HOUR};
use crate::error::{Error, Result};
use crate::{Storage, rand_u32};

/// Where replaced files wait for in-flight queries, relative to the archive root. Not a
/// tenant name (tenants start with a letter or digit), so the orphan sweep and readers of
/// `{tenant}/{stream}/**` never see it.
pub const RETIRED_DIR: &str = "_retired";

/// Settings of compaction, retention and retired files.
#[derive(Debug, Clone)]
pub struct MaintenanceConfig {
    /// Whether small files are merged.
    pub compaction: bool,
    /// How often the maintenance thread looks for work.
    pub interval: Duration,
    /// How long after an hour ends before its files are compacted (late data may still come;
    /// what comes later lands in a new small file and is merged on a later pass).
    pub compact_after: Duration,
    /// Files at least this large are left as they are.
    pub target_file_bytes: u64,
    /// Most input bytes one merge reads; bounds its memory (Arrow holds about 3 to 6 times
    /// the Parquet size).
    pub max_merge_bytes: u64,
    /// Share of one core compaction may use: after a merge that took `t`, it waits
    /// `t × (1 / duty − 1)` before the next.
    pub duty: f64,
    /// How long replaced files stay readable for queries that listed them; longer than the
    /// longest query.
    pub retired_grace: Duration,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self {
            compaction: true,
            interval: Duration::from_secs(60),
            compact_after: Duration::from_secs(600),
            target_file_bytes: 128 * 1024 * 1024,
            max_merge_bytes: 256 * 1024 * 1024,
            duty: 0.5,
            retired_grace: Duration::from_secs(600),
        }
    }
}

/// What one compaction pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactionReport {
    /// Files merged away.
    pub files_in: usize,
    /// Files written.
    pub files_out: usize,
    /// Rows rewritten.
    pub rows: u64,
    /// Bytes before and after.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
}

/// A step of a rewrite (compaction, retention's partial hours, a purge) at which a crash
/// test stops: the crate's tests by an injected error, a real server by the kill point
/// `rewrite.{step}` (see [`ferrite_engine::failpoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CrashPoint {
    /// The inputs were read, nothing written.
    AfterRead,
    /// The outputs are durable, the catalog does not name them.
    AfterWrite,
    /// The catalog names the outputs, the inputs are still in place.
    AfterCatalog,
    /// Half of the inputs were retired.
    MidRetire,
}

impl CrashPoint {
    /// The kill point's name.
    fn name(self) -> &'static str {
        match self {
            Self::AfterRead => "rewrite.after_read",
            Self::AfterWrite => "rewrite.after_write",
            Self::AfterCatalog => "rewrite.after_catalog",
            Self::MidRetire => "rewrite.mid_retire",
        }
    }
}

/// Files of an hour still being written merged at once: fewer wait for more to come.
const TIER_FILES: usize = 8;
/// Files within this factor of a tier's smallest are of the same tier.
const TIER_SPREAD: u64 = 4;

/// Groups of at least [`TIER_FILES`] files of similar size (each within [`TIER_SPREAD`] of
/// the group's smallest), each group under `max_bytes`: what an hour still being written
/// merges now. Persists make files of about one size; merging eight makes one of the next
/// tier, so an hour holds at most `TIER_FILES - 1` files per tier, and a row is rewritten
/// once per tier (the logarithm of the hour's files), not at every pass.
fn tiers(mut files: Vec<ArchivedFile>, max_bytes: u64) -> Vec<Vec<ArchivedFile>> {
    files.sort_by(|a, b| a.size.cmp(&b.size).then_with(|| a.path.cmp(&b.path)));
    let mut out = Vec::new();
    let mut group: Vec<ArchivedFile> = Vec::new();
    let mut bytes = 0;
    for f in files {
        let same_tier = group.first().is_none_or(|first| f.size <= first.size.max(1) * TIER_SPREAD);
        if !same_tier || (!group.is_empty() && bytes + f.size > max_bytes) {
            let done = std::mem::take(&mut group);
            if done.len() >= TIER_FILES {
                out.push(done);
            }
            bytes = 0;
        }
        bytes += f.size;
        group.push(f);
    }
    if group.len() >= TIER_FILES {
        out.push(group);
    }
    out
}

/// The start of the event-time hour of `ns`.
fn hour_of(ns: i64) -> i64 {
    ns.div_euclid(NS_PER_HOUR) * NS_PER_HOUR
}

/// The oldest event time a stream with `retention` keeps at `now`: rows before it are
/// neither answered nor archived. Whole hours, like the archive's partitions.
pub fn horizon(now_ns: i64, retention: Duration) -> i64 {
    let keep = i64::try_from(retention.as_nanos()).unwrap_or(i64::MAX);
    hour_of(now_ns.saturating_sub(keep))
}

/// Drops the rows of `batch` older than `horizon` (the first column is `time`).
pub(crate) fn rows_from(
    batch: &RecordBatch,
    horizon: i64,
) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
    let Some(time) = batch.column(0).as_any().downcast_ref::<TimestampNanosecondArray>() else {
        return Ok(batch.clone());
    };
    let values = time.values();
    let keep = BooleanArray::new(BooleanBuffer::collect_bool(values.len(), |i| values[i] >= horizon), None);
    filter_record_batch(batch, &keep)
}

fn now_nanos() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

impl Storage {
    /// The oldest event time `stream` answers now, when it has a retention.
    pub(crate) fn horizon_of(&self, stream: &StreamName) -> Option<i64> {
        self.catalog.retention(stream).map(|r| horizon(now_nanos(), r))
    }

    /// Runs compaction, retention and the removal of retired files on the calling thread
    /// until [`Storage::stop_maintenance`].
    pub fn run_maintenance(&self) {
        loop {
            if self.maintenance_wait(self.config.maintenance.interval) {
                return;
            }
            self.retry_orphans();
            let now = now_nanos();
            if let Err(e) = self.apply_retention(now) {
                tracing::error!(error = %e, "retention failed; retrying on the next pass");
            }
            if self.config.maintenance.compaction {
                match self.compact(now, true) {
                    Ok(r) if r.files_in > 0 => tracing::info!(
                        files_in = r.files_in,
                        files_out = r.files_out,
                        rows = r.rows,
                        bytes_in = r.bytes_in,
                        bytes_out = r.bytes_out,
                        "compacted archive files"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "compaction failed; the files stay as they were"),
                }
            }
            self.delete_retired(self.config.maintenance.retired_grace);
        }
    }

    /// Waits `d` or until stopped; true when stopped.
    fn maintenance_wait(&self, d: Duration) -> bool {
        let (lock, cv) = &self.maintenance_stop;
        let deadline = Instant::now() + d;
        let mut stop = lock.lock();
        while !*stop && Instant::now() < deadline {
            cv.wait_until(&mut stop, deadline);
        }
        *stop
    }

    /// Ends [`Storage::run_maintenance`] (a merge in progress finishes first).
    pub fn stop_maintenance(&self) {
        let (lock, cv) = &self.maintenance_stop;
        *lock.lock() = true;
        cv.notify_all();
    }

    /// Merges the small files of every complete hour (ended `compact_after` before `now`),
    /// oldest hours first. With `throttle`, keeps to the configured duty cycle and stops
    /// early when maintenance is stopped.
    pub fn compact(&self, now_ns: i64, throttle: bool) -> Result<CompactionReport> {
        let cfg = self.config.maintenance.clone();
        let settled = now_ns.saturating_sub(i64::try_from(cfg.compact_after.as_nanos()).unwrap_or(i64::MAX));
        let mut work: Vec<(i64, StreamName, Vec<ArchivedFile>)> = Vec::new();
        for stream in self.streams() {
            let files = self.snapshot_files(&stream);
            let mut hours: BTreeMap<i64, Vec<ArchivedFile>> = BTreeMap::new();
            for f in files.into_iter().filter(|f| f.size < cfg.target_file_bytes) {
                hours.entry(hour_of(f.min_time)).or_default().push(f);
            }
            for (hour, mut small) in hours {
                if hour + NS_PER_HOUR > settled {
                    // An hour still being written (the current one): merged in tiers of
                    // similar size once enough files gather, so that it holds a bounded
                    // number of files without its largest being rewritten at every pass.
                    work.extend(tiers(small, cfg.max_merge_bytes).into_iter().map(|g| (hour, stream.clone(), g)));
                    continue;
                }
                if small.len() < 2 {
                    continue;
                }
                small.sort_by(|a, b| a.path.cmp(&b.path));
                // Greedy groups under the merge bound; a group of one is left alone.
                let mut group: Vec<ArchivedFile> = Vec::new();
                let mut bytes = 0;
                for f in small {
                    if !group.is_empty() && bytes + f.size > cfg.max_merge_bytes {
                        let done = std::mem::take(&mut group);
                        if done.len() > 1 {
                            work.push((hour, stream.clone(), done));
                        }
                        bytes = 0;
                    }
                    bytes += f.size;
                    group.push(f);
                }
                if group.len() > 1 {
                    work.push((hour, stream.clone(), group));
                }
            }
        }
        work.sort_by_key(|(hour, stream, _)| (*hour, stream.clone()));

        let mut report = CompactionReport::default();
        for (hour, stream, inputs) in work {
            if throttle && *self.maintenance_stop.0.lock() {
                break;
            }
            let started = Instant::now();
            let _one_rewrite = self.rewrite_lock.lock();
            let merged = self.merge(&stream, hour, &inputs)?;
            report.files_in += inputs.len();
            report.bytes_in += inputs.iter().map(|f| f.size).sum::<u64>();
            report.rows += merged.rows;
            report.bytes_out += merged.size;
            report.files_out += 1;
            self.replace(&stream, &inputs, vec![merged])?;
            drop(_one_rewrite);
            let took = started.elapsed();
            self.metrics.inc("ferrite_compacted_files_total", &[], inputs.len() as u64);
            self.metrics.histogram("ferrite_compaction_seconds", &[]).observe(took);
            if throttle && cfg.duty > 0.0 && cfg.duty < 1.0 {
                let rest = took.mul_f64(1.0 / cfg.duty - 1.0);
                if self.maintenance_wait(rest) {
                    break;
                }
            }
        }
        Ok(report)
    }

    /// Reads `inputs` (files of one stream and hour), sorts their rows by device and time
    /// under the stream's current schema, and writes them as one file.
    fn merge(&self, stream: &StreamName, hour: i64, inputs: &[ArchivedFile]) -> Result<ArchivedFile> {
        let mut batches = Vec::new();
        for f in inputs {
            batches.extend(self.read_archived(&f.path)?);
        }
        let schema = match self.catalog.get(stream) {
            Some(s) => s.arrow.clone(),
            None => {
                let schemas: Vec<_> = batches.iter().map(|b| b.schema()).collect();
                ferrite_engine::widest_schema(&schemas)
                    .ok_or_else(|| Error::Arrow(arrow::error::ArrowError::SchemaError("no rows to merge".into())))?
            }
        };
        let aligned =
            batches.iter().map(|b| align_to_schema(b, &schema)).collect::<ferrite_engine::Result<Vec<_>>>()?;
        drop(batches);
        let all = concat_batches(&schema, &aligned)?;
        drop(aligned);
        self.crash_point(CrashPoint::AfterRead)?;
        let mut chunks = archive::split_by_hour(&all)?;
        if chunks.len() != 1 || chunks[0].hour_start != hour {
            return Err(Error::Arrow(arrow::error::ArrowError::ComputeError(format!(
                "files of hour {hour} of `{stream}` hold rows of {} hours; left as they are",
                chunks.len()
            ))));
        }
        let chunk = chunks.remove(0);
        self.write_chunk(stream, &chunk)
    }

    /// Encodes `chunk` and writes it durably under a new name in its hour's directory.
    pub(crate) fn write_chunk(&self, stream: &StreamName, chunk: &HourChunk) -> Result<ArchivedFile> {
        let (bytes, mut file) = archive::encode(chunk)?;
        let unique = format!("{:019}-{:08x}.parquet", now_nanos(), rand_u32());
        file.path =
            format!("{}/{}/{}/{}", stream.tenant(), stream.local(), archive::partition_dir(chunk.hour_start), unique);
        self.put_archived(&file.path, bytes)?;
        Ok(file)
    }

    /// The bytes of an archive file, as record batches.
    pub(crate) fn read_archived(&self, path: &str) -> Result<Vec<RecordBatch>> {
        let location = ObjectPath::from(path);
        let bytes: Bytes = self.runtime.block_on(async { self.store.get(&location).await?.bytes().await })?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?.with_batch_size(64 * 1024).build()?;
        Ok(reader.collect::<std::result::Result<Vec<_>, _>>()?)
    }

    /// Swaps `inputs` of `stream` for `outputs` (durable already) and retires the inputs;
    /// removes the outputs again when the swap does not happen.
    fn replace(&self, stream: &StreamName, inputs: &[ArchivedFile], outputs: Vec<ArchivedFile>) -> Result<()> {
        self.crash_point(CrashPoint::AfterWrite)?;
        if let Err(e) = self.swap_files(stream, inputs, &outputs) {
            self.discard(&outputs);
            return Err(e);
        }
        self.crash_point(CrashPoint::AfterCatalog)?;
        for (i, f) in inputs.iter().enumerate() {
            if i == inputs.len() / 2 {
                self.crash_point(CrashPoint::MidRetire)?;
            }
            self.retire(&f.path);
        }
        Ok(())
    }

    /// One catalog commit replacing `inputs` by `outputs`, then the in-memory list, both
    /// under the persist lock (a persist adds files between the two otherwise).
    pub(crate) fn swap_files(
        &self,
        stream: &StreamName,
        inputs: &[ArchivedFile],
        outputs: &[ArchivedFile],
    ) -> Result<()> {
        let _no_persist = self.persist_lock.lock();
        let key = stream.to_string();
        let gone: HashSet<&str> = inputs.iter().map(|f| f.path.as_str()).collect();
        {
            let mut fc = self.file_catalog.lock();
            let mut next = fc.clone();
            let list = next.streams.entry(key.clone()).or_default();
            let present = list.iter().filter(|f| gone.contains(f.path.as_str())).count();
            if present != gone.len() {
                return Err(Error::Conflict(format!(
                    "{} of {} files of `{stream}` to replace are no longer catalogued",
                    gone.len() - present,
                    gone.len()
                )));
            }
            list.retain(|f| !gone.contains(f.path.as_str()));
            list.extend(outputs.iter().cloned());
            if list.is_empty() {
                next.streams.remove(&key);
            }
            next.store(&self.file_catalog_path)?;
            *fc = next;
        }
        let data = self.stream_data(stream);
        let mut d = data.write();
        d.files.retain(|f| !gone.contains(f.path.as_str()));
        d.files.extend(outputs.iter().cloned());
        Ok(())
    }

    /// Moves a replaced file to `_retired/` (queries that listed it still read it there) and
    /// remembers when; on a local archive, removes the directories it leaves empty.
    fn retire(&self, path: &str) {
        let from = ObjectPath::from(path);
        let to = ObjectPath::from(format!("{RETIRED_DIR}/{path}"));
        match self.runtime.block_on(self.store.rename(&from, &to)) {
            Ok(()) => self.retired.lock().push((path.to_owned(), Instant::now())),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(file = path, error = %e, "cannot retire a replaced file; deleting it now");
                if let Err(e) = self.delete_archived(path) {
                    tracing::warn!(file = path, error = %e, "cannot delete a replaced file; the next start removes it");
                }
            }
        }
        if let Some(root) = &self.local_root {
            let file = root.join(path);
            for dir in file.ancestors().skip(1).take(3) {
                // date=…/hour=… and date=…: stops at the first that is not empty.
                if dir == root.as_path() || std::fs::remove_dir(dir).is_err() {
                    break;
                }
            }
        }
    }

    /// Deletes retired files older than `grace`; returns how many went.
    pub fn delete_retired(&self, grace: Duration) -> usize {
        let due: Vec<String> = {
            let mut retired = self.retired.lock();
            let (due, keep): (Vec<_>, Vec<_>) = retired.drain(..).partition(|(_, at)| at.elapsed() >= grace);
            *retired = keep;
            due.into_iter().map(|(p, _)| p).collect()
        };
        let mut n = 0;
        for path in due {
            match self.delete_archived(&format!("{RETIRED_DIR}/{path}")) {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(file = %path, error = %e, "cannot delete a retired file; the next start removes it")
                }
            }
        }
        if let Some(root) = &self.local_root {
            remove_empty_dirs(&root.join(RETIRED_DIR));
        }
        n
    }

    /// Empties `_retired/` (on start no query can be reading it).
    pub(crate) fn clear_retired(&self) -> Result<usize> {
        let store = self.store.clone();
        let listed: Vec<ObjectPath> = self.runtime.block_on(async move {
            use futures::TryStreamExt;
            store.list(Some(&ObjectPath::from(RETIRED_DIR))).map_ok(|m| m.location).try_collect::<Vec<_>>().await
        })?;
        for location in &listed {
            self.delete_archived(location.as_ref())?;
        }
        if let Some(root) = &self.local_root {
            remove_empty_dirs(&root.join(RETIRED_DIR));
        }
        Ok(listed.len())
    }

    /// Drops the archive files of every stream with a retention whose rows are all older
    /// than its horizon at `now`. Returns how many files went.
    pub fn apply_retention(&self, now_ns: i64) -> Result<usize> {
        let mut dropped = 0;
        for (stream, retention) in self.catalog.retentions() {
            let h = horizon(now_ns, retention);
            let old: Vec<ArchivedFile> = self.snapshot_files(&stream).into_iter().filter(|f| f.max_time < h).collect();
            if old.is_empty() {
                continue;
            }
            let _one_rewrite = self.rewrite_lock.lock();
            self.replace(&stream, &old, Vec::new())?;
            dropped += old.len();
            self.metrics.inc("ferrite_retention_dropped_files_total", &[("stream", stream.as_str())], old.len() as u64);
            tracing::info!(stream = %stream, files = old.len(), rows = old.iter().map(|f| f.rows).sum::<u64>(), "retention dropped archive files");
        }
        Ok(dropped)
    }

    /// Deletes every row of `device` in `tenant`'s streams (but `audit`) committed before the
    /// call: persists the hot buffer, then rewrites each archive file that holds the device
    /// without its rows, one catalog commit per stream. Blocking; not from the async runtime.
    pub fn purge_device(&self, tenant: &str, device: &str) -> Result<PurgeReport> {
        self.persist()?;
        let _one_rewrite = self.rewrite_lock.lock();
        let mut report = PurgeReport { device_id: device.to_owned(), ..PurgeReport::default() };
        for stream in self.streams().into_iter().filter(|s| s.tenant() == tenant && s.local() != AUDIT_STREAM) {
            let candidates: Vec<ArchivedFile> = self
                .snapshot_files(&stream)
                .into_iter()
                .filter(|f| f.min_device.as_str() <= device && device <= f.max_device.as_str())
                .collect();
            let (mut inputs, mut outputs) = (Vec::new(), Vec::new());
            let mut rows = 0;
            for f in candidates {
                let batches = self.read_archived(&f.path)?;
                let Some(first) = batches.first() else { continue };
                let all = concat_batches(&first.schema(), &batches)?;
                let Some(ids) = all.column(1).as_any().downcast_ref::<StringArray>() else { continue };
                let keep = BooleanArray::new(
                    BooleanBuffer::collect_bool(ids.len(), |i| ids.is_null(i) || ids.value(i) != device),
                    None,
                );
                let kept = filter_record_batch(&all, &keep)?;
                let removed = (all.num_rows() - kept.num_rows()) as u64;
                if removed == 0 {
                    continue;
                }
                rows += removed;
                if kept.num_rows() > 0 {
                    let chunk = HourChunk { hour_start: hour_of(f.min_time), batch: kept };
                    match self.write_chunk(&stream, &chunk) {
                        Ok(out) => outputs.push(out),
                        Err(e) => {
                            self.discard(&outputs);
                            return Err(e);
                        }
                    }
                }
                inputs.push(f);
            }
            if inputs.is_empty() {
                continue;
            }
            report.files_rewritten += inputs.len() as u64;
            self.replace(&stream, &inputs, outputs)?;
            report.rows_deleted += rows;
            report.streams.push(stream.local().to_owned());
        }
        self.forget_last_values(tenant, device)?;
        self.metrics.inc("ferrite_purged_rows_total", &[], report.rows_deleted);
        tracing::info!(
            tenant,
            device,
            rows = report.rows_deleted,
            files = report.files_rewritten,
            "purged a device's data"
        );
        Ok(report)
    }

    /// Removes files written for a rewrite that will not happen.
    fn discard(&self, outputs: &[ArchivedFile]) {
        self.remove_uncatalogued(outputs.iter().map(|f| f.path.as_str()));
    }

    /// The files of `stream` as the catalog lists them now.
    fn snapshot_files(&self, stream: &StreamName) -> Vec<ArchivedFile> {
        self.streams.read().get(stream).map(|d| d.read().files.clone()).unwrap_or_default()
    }

    fn crash_point(&self, at: CrashPoint) -> Result<()> {
        ferrite_engine::failpoint::kill_point(at.name());
        #[cfg(test)]
        if *self.test.crash_at.lock() == Some(at) {
            return Err(Error::Conflict(format!("injected crash at {at:?}")));
        }
        Ok(())
    }
}

/// Removes the empty directories under `dir` (and `dir` itself when it ends up empty).
fn remove_empty_dirs(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_empty_dirs(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The archive's object store as queries see it: a file that a compaction, a retention or a
/// purge retired after the query listed it is read from `_retired/`, where it stays for the
/// grace period. Everything else goes straight to the store.
#[derive(Debug)]
pub struct RetiredFallback {
    inner: Arc<dyn ObjectStore>,
}

impl RetiredFallback {
    /// Wraps the archive's store.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self { inner }
    }
}

impl std::fmt::Display for RetiredFallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RetiredFallback({})", self.inner)
    }
}

fn retired(location: &ObjectPath) -> ObjectPath {
    ObjectPath::from(format!("{RETIRED_DIR}/{location}"))
}

#[async_trait]
impl ObjectStore for RetiredFallback {
    async fn put_opts(
        &self,
        location: &ObjectPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjectPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &ObjectPath, options: GetOptions) -> object_store::Result<GetResult> {
        match self.inner.get_opts(location, options.clone()).await {
            Err(object_store::Error::NotFound { .. }) => self.inner.get_opts(&retired(location), options).await,
            other => other,
        }
    }

    async fn get_ranges(&self, location: &ObjectPath, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        match self.inner.get_ranges(location, ranges).await {
            Err(object_store::Error::NotFound { .. }) => self.inner.get_ranges(&retired(location), ranges).await,
            other => other,
        }
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjectPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjectPath>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&ObjectPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&ObjectPath>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &ObjectPath, to: &ObjectPath, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &ObjectPath,
        to: &ObjectPath,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::Float64Array;
    use ferrite_engine::{FieldType, StreamBatch};

    use super::*;
    use crate::StorageConfig;
    use crate::tests::{Env, commit, env, parquet_files, seen};

    const SEC: i64 = 1_000_000_000;

    /// Rows `(time ns, device, v)` of `stream`.
    fn rows(e: &Env, stream: &str, rows: &[(i64, &str, f64)]) -> anyhow::Result<StreamBatch> {
        let s = StreamName::new(stream)?;
        e.catalog.resolve_field(&s, "v", FieldType::Float)?;
        let schema = e.catalog.get(&s).map(|x| x.arrow.clone()).ok_or_else(|| anyhow::anyhow!("schema"))?;
        let b = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(
                    TimestampNanosecondArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>()).with_timezone("UTC"),
                ),
                Arc::new(StringArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
                Arc::new(Float64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())),
            ],
        )?;
        Ok(StreamBatch::new(s, b))
    }

    /// Three persists of one hour: three small files of 4 rows each over devices d0..d2.
    fn three_files(e: &Env, s: &Storage) -> anyhow::Result<Vec<(String, f64)>> {
        let mut all = Vec::new();
        for p in 0..3 {
            let r: Vec<(i64, &str, f64)> = (0..4)
                .map(|i| {
                    let n = p * 4 + i;
                    ((n as i64) * SEC, ["d0", "d1", "d2"][n % 3], n as f64)
                })
                .collect();
            all.extend(r.iter().map(|(_, d, v)| ((*d).to_owned(), *v)));
            commit(s, rows(e, "t", &r)?)?;
            s.persist()?;
        }
        all.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        Ok(all)
    }

    fn config(e: &Env) -> StorageConfig {
        StorageConfig {
            data_dir: e.dir.path().to_owned(),
            maintenance: MaintenanceConfig { compact_after: Duration::ZERO, ..MaintenanceConfig::default() },
            ..StorageConfig::default()
        }
    }

    /// The archive holds exactly the catalogued files (outside readers count each row once).
    fn archive_is_catalogue(e: &Env, s: &Storage, stream: &str) -> anyhow::Result<()> {
        let root = e.dir.path().join("archive");
        let mut on_disk: Vec<String> = parquet_files(&root.join("default").join(stream))
            .iter()
            .filter_map(|p| p.strip_prefix(&root).ok().map(|p| p.display().to_string()))
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = s.snapshot(&StreamName::new(stream)?).files.into_iter().map(|f| f.path).collect();
        listed.sort();
        assert_eq!(on_disk, listed);
        Ok(())
    }

    #[test]
    fn compaction_merges_an_hours_files_into_one_sorted_file() -> anyhow::Result<()> {
        let e = env()?;
        let s = e.open_with(config(&e))?;
        let expected = three_files(&e, &s)?;
        assert_eq!(s.snapshot(&StreamName::new("t")?).files.len(), 3);
        let report = s.compact(now_nanos(), false)?;
        assert_eq!((report.files_in, report.files_out, report.rows), (3, 1, 12));
        let files = s.snapshot(&StreamName::new("t")?).files;
        assert_eq!(files.len(), 1);
        assert_eq!((files[0].min_device.as_str(), files[0].max_device.as_str()), ("d0", "d2"));
        assert_eq!(seen(&s, "t")?, expected, "every row once");
        // Sorted by device, then time.
        let b = s.read_archived(&files[0].path)?;
        let d = b[0].column(1).as_any().downcast_ref::<StringArray>().ok_or_else(|| anyhow::anyhow!("d"))?;
        let t =
            b[0].column(0).as_any().downcast_ref::<TimestampNanosecondArray>().ok_or_else(|| anyhow::anyhow!("t"))?;
        for i in 1..b[0].num_rows() {
            assert!((d.value(i - 1), t.value(i - 1)) <= (d.value(i), t.value(i)));
        }
        archive_is_catalogue(&e, &s, "t")?;
        // A second pass has nothing to do; the replaced files go after the grace period.
        assert_eq!(s.compact(now_nanos(), false)?.files_in, 0);
        assert_eq!(s.delete_retired(Duration::ZERO), 3);
        assert!(parquet_files(&e.dir.path().join("archive").join(RETIRED_DIR)).is_empty());
        drop(s);
        let s = e.open_with(config(&e))?;
        assert_eq!(seen(&s, "t")?, expected, "the compacted catalog survives a restart");
        Ok(())
    }

    #[test]
    fn an_hour_still_being_written_is_merged_in_tiers_and_stays_bounded() -> anyhow::Result<()> {
        let e = env()?;
        let mut c = config(&e);
        c.maintenance.compact_after = Duration::from_secs(3600);
        let s = e.open_with(c)?;
        let mut all = Vec::new();
        let mut most = 0;
        for p in 0..40usize {
            let r: Vec<(i64, &str, f64)> =
                (0..4).map(|i| (((p * 4 + i) as i64) * SEC, "d0", (p * 4 + i) as f64)).collect();
            all.extend(r.iter().map(|(_, d, v)| ((*d).to_owned(), *v)));
            commit(&s, rows(&e, "t", &r)?)?;
            s.persist()?;
            // The hour [0, 1h) is not over: only the tiers merge.
            s.compact(30 * 60 * SEC, false)?;
            let files = s.snapshot(&StreamName::new("t")?).files.len();
            most = most.max(files);
        }
        all.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        assert_eq!(seen(&s, "t")?, all, "every row once");
        assert!(most < TIER_FILES * 2, "the hour held at most {most} files over 40 persists");
        archive_is_catalogue(&e, &s, "t")?;
        // Once the hour is over, the usual merge leaves one file.
        s.compact(2 * 3600 * SEC, false)?;
        assert_eq!(s.snapshot(&StreamName::new("t")?).files.len(), 1);
        assert_eq!(seen(&s, "t")?, all);
        Ok(())
    }

    #[test]
    fn tiers_group_files_of_similar_size_only() {
        let file = |size: u64, n: usize| ArchivedFile {
            path: format!("f{n:03}"),
            size,
            rows: 1,
            min_time: 0,
            max_time: 0,
            min_device: String::new(),
            max_device: String::new(),
        };
        // Seven persist-sized files and one big merged one: nothing yet.
        let mut files: Vec<ArchivedFile> = (0..7).map(|n| file(1000, n)).collect();
        files.push(file(64_000, 99));
        assert!(tiers(files.clone(), u64::MAX).is_empty());
        // The eighth small one makes a tier; the big file is not in it.
        files.push(file(1200, 7));
        let groups = tiers(files, u64::MAX);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].len(), 8);
        assert!(groups[0].iter().all(|f| f.size <= 1200));
        // The merge bound splits a tier.
        let groups = tiers((0..16).map(|n| file(1000, n)).collect(), 8000);
        assert_eq!(groups.iter().map(Vec::len).collect::<Vec<_>>(), vec![8, 8]);
    }

    #[test]
    fn recent_hours_and_large_files_are_left_alone() -> anyhow::Result<()> {
        let e = env()?;
        let mut c = config(&e);
        c.maintenance.compact_after = Duration::from_secs(3600);
        let s = e.open_with(c.clone())?;
        three_files(&e, &s)?;
        // The hour [0, 1h) is settled only once `compact_after` has passed after its end.
        assert_eq!(s.compact(2 * 3600 * SEC - 1, false)?.files_in, 0);
        assert_eq!(s.compact(2 * 3600 * SEC, false)?.files_in, 3);
        drop(s);
        let e = env()?;
        c = config(&e);
        c.maintenance.target_file_bytes = 1;
        let s = e.open_with(c)?;
        three_files(&e, &s)?;
        assert_eq!(s.compact(now_nanos(), false)?.files_in, 0, "no file is under the target size");
        Ok(())
    }

    #[test]
    fn a_crash_at_any_step_of_a_compaction_leaves_every_row_once() -> anyhow::Result<()> {
        for at in [CrashPoint::AfterRead, CrashPoint::AfterWrite, CrashPoint::AfterCatalog, CrashPoint::MidRetire] {
            let e = env()?;
            let expected;
            {
                let s = e.open_with(config(&e))?;
                expected = three_files(&e, &s)?;
                *s.test.crash_at.lock() = Some(at);
                assert!(s.compact(now_nanos(), false).is_err(), "{at:?}");
                // Killed here: nothing below runs in the crashed process.
            }
            let s = e.open_with(config(&e))?;
            assert_eq!(seen(&s, "t")?, expected, "after a crash at {at:?}");
            archive_is_catalogue(&e, &s, "t")?;
            assert!(parquet_files(&e.dir.path().join("archive").join(RETIRED_DIR)).is_empty());
            let files = s.snapshot(&StreamName::new("t")?).files.len();
            assert_eq!(
                files,
                if at == CrashPoint::AfterRead || at == CrashPoint::AfterWrite { 3 } else { 1 },
                "{at:?}"
            );
            // And the next pass finishes the job.
            s.compact(now_nanos(), false)?;
            assert_eq!(s.snapshot(&StreamName::new("t")?).files.len(), 1);
            assert_eq!(seen(&s, "t")?, expected);
        }
        Ok(())
    }

    #[test]
    fn a_reader_that_listed_files_before_a_compaction_still_reads_them() -> anyhow::Result<()> {
        let e = env()?;
        let s = e.open_with(config(&e))?;
        three_files(&e, &s)?;
        let before = s.snapshot(&StreamName::new("t")?).files;
        s.compact(now_nanos(), false)?;
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        let queries = s.object_store();
        for f in &before {
            let location = ObjectPath::from(f.path.as_str());
            assert!(matches!(rt.block_on(s.store.head(&location)), Err(object_store::Error::NotFound { .. })));
            let bytes = rt.block_on(async { queries.get(&location).await?.bytes().await })?;
            assert_eq!(bytes.len() as u64, f.size, "{} is read from {RETIRED_DIR}/", f.path);
            let ranges = rt.block_on(queries.get_ranges(&location, &[0..4, f.size - 4..f.size]))?;
            assert_eq!((&ranges[0][..], &ranges[1][..]), (&b"PAR1"[..], &b"PAR1"[..]));
        }
        s.delete_retired(Duration::ZERO);
        let gone = rt.block_on(queries.head(&ObjectPath::from(before[0].path.as_str())));
        assert!(matches!(gone, Err(object_store::Error::NotFound { .. })), "after the grace period: {gone:?}");
        Ok(())
    }

    #[test]
    fn retention_hides_then_drops_hours_past_the_horizon() -> anyhow::Result<()> {
        let e = env()?;
        let s = e.open_with(config(&e))?;
        let now = now_nanos();
        let old = now - 5 * 3600 * SEC;
        commit(&s, rows(&e, "t", &[(old, "d0", 1.0), (now, "d0", 2.0)])?)?;
        s.persist()?;
        commit(&s, rows(&e, "t", &[(old + SEC, "d1", 3.0), (now, "d1", 4.0)])?)?;
        let name = StreamName::new("t")?;
        assert_eq!(seen(&s, "t")?.len(), 4);
        e.catalog.set_retention(&name, Some(Duration::from_secs(2 * 3600)))?;
        // Not answered at once, before anything is dropped: the old file and the old hot row.
        assert_eq!(seen(&s, "t")?, vec![("d0".to_owned(), 2.0), ("d1".to_owned(), 4.0)]);
        assert!(e.catalog.set_retention(&name, Some(Duration::from_secs(60))).is_err(), "under an hour");
        assert_eq!(s.apply_retention(now)?, 1);
        s.persist()?;
        assert_eq!(s.apply_retention(now)?, 1, "the old hot row, once persisted");
        s.delete_retired(Duration::ZERO);
        assert_eq!(s.file_catalog.lock().streams.get("t").map(Vec::len), Some(2));
        archive_is_catalogue(&e, &s, "t")?;
        // Lifting the retention shows what is left, nothing that was dropped.
        e.catalog.set_retention(&name, None)?;
        assert_eq!(seen(&s, "t")?, vec![("d0".to_owned(), 2.0), ("d1".to_owned(), 4.0)]);
        Ok(())
    }

    #[test]
    fn purge_removes_one_device_from_every_stream_and_survives_a_restart() -> anyhow::Result<()> {
        let e = env()?;
        let expected_u;
        {
            let s = e.open_with(config(&e))?;
            let expected = three_files(&e, &s)?;
            commit(&s, rows(&e, "u", &[(SEC, "d1", 1.0), (SEC, "d2", 2.0)])?)?;
            commit(&s, rows(&e, "only_d1", &[(SEC, "d1", 1.0)])?)?;
            // Still hot, in the WAL only.
            commit(&s, rows(&e, "t", &[(20 * SEC, "d1", 100.0)])?)?;
            commit(&s, rows(&e, "audit", &[(SEC, "d1", 0.0)])?)?;
            let report = s.purge_device("default", "d1")?;
            assert_eq!(report.rows_deleted, 4 + 1 + 1 + 1);
            let mut streams = report.streams.clone();
            streams.sort();
            assert_eq!(streams, vec!["only_d1", "t", "u"]);
            let t: Vec<_> = expected.into_iter().filter(|(d, _)| d != "d1").collect();
            assert_eq!(seen(&s, "t")?, t);
            expected_u = vec![("d2".to_owned(), 2.0)];
            assert_eq!(seen(&s, "u")?, expected_u);
            assert!(seen(&s, "only_d1")?.is_empty());
            assert_eq!(seen(&s, "audit")?.len(), 1, "the audit trail is not purged");
            archive_is_catalogue(&e, &s, "t")?;
            assert_eq!(s.purge_device("default", "nobody")?.rows_deleted, 0);
            assert_eq!(s.purge_device("other", "d2")?.rows_deleted, 0, "another tenant's d2 is not this one");
        }
        let s = e.open_with(config(&e))?;
        assert!(seen(&s, "t")?.iter().all(|(d, _)| d != "d1"), "the WAL does not bring it back");
        assert_eq!(seen(&s, "u")?, expected_u);
        Ok(())
    }

    /// `(device, v)` of the last-value cache of `stream`, sorted.
    fn last(s: &Storage, stream: &str) -> anyhow::Result<Vec<(String, f64)>> {
        let b = s.last_values(&StreamName::new(stream)?)?.ok_or_else(|| anyhow::anyhow!("no stream"))?;
        let d = b.column(1).as_any().downcast_ref::<StringArray>().ok_or_else(|| anyhow::anyhow!("device_id"))?;
        let v = b.column(2).as_any().downcast_ref::<Float64Array>().ok_or_else(|| anyhow::anyhow!("v"))?;
        let mut out: Vec<(String, f64)> = (0..b.num_rows()).map(|i| (d.value(i).to_owned(), v.value(i))).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    #[test]
    fn the_last_values_survive_persists_restarts_a_lost_snapshot_and_purges() -> anyhow::Result<()> {
        let e = env()?;
        let expected = vec![("d0".to_owned(), 9.0), ("d1".to_owned(), 10.0), ("d2".to_owned(), 11.0)];
        {
            let s = e.open_with(config(&e))?;
            three_files(&e, &s)?;
            assert_eq!(last(&s, "t")?, expected, "the newest of 12 rows per device");
            // An older row changes nothing; a newer one, not yet persisted, does.
            commit(&s, rows(&e, "t", &[(0, "d0", -1.0), (100 * SEC, "d1", 42.0)])?)?;
        }
        let newer = vec![("d0".to_owned(), 9.0), ("d1".to_owned(), 42.0), ("d2".to_owned(), 11.0)];
        let s = e.open_with(config(&e))?;
        assert_eq!(last(&s, "t")?, newer, "snapshot plus the WAL's tail");
        drop(s);
        std::fs::remove_dir_all(e.dir.path().join("catalog").join("last_values"))?;
        let s = e.open_with(config(&e))?;
        assert_eq!(last(&s, "t")?, newer, "rebuilt from the files and the WAL");
        s.compact(now_nanos(), false)?;
        assert_eq!(last(&s, "t")?, newer, "compaction changes no row");
        s.purge_device("default", "d1")?;
        assert_eq!(last(&s, "t")?, vec![("d0".to_owned(), 9.0), ("d2".to_owned(), 11.0)]);
        drop(s);
        let s = e.open_with(config(&e))?;
        assert_eq!(last(&s, "t")?, vec![("d0".to_owned(), 9.0), ("d2".to_owned(), 11.0)], "the purge stays");
        // A retention hides devices whose newest row is past its horizon.
        e.catalog.set_retention(&StreamName::new("t")?, Some(Duration::from_secs(3600)))?;
        assert!(last(&s, "t")?.is_empty(), "every row is from 1970");
        commit(&s, rows(&e, "t", &[(now_nanos(), "d9", 1.0)])?)?;
        assert_eq!(last(&s, "t")?, vec![("d9".to_owned(), 1.0)]);
        assert!(s.last_values(&StreamName::new("nope")?)?.is_none());
        Ok(())
    }

    #[test]
    fn horizons_are_whole_hours() {
        let h = 3600 * SEC;
        assert_eq!(horizon(10 * h + 5, Duration::from_secs(3600)), 9 * h);
        assert_eq!(horizon(10 * h, Duration::from_secs(2 * 3600)), 8 * h);
    }
}
