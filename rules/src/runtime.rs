//! The rule runtime: deployed rules, and their state on each shard.
//!
//! [`RuleEngine`] is a [`BatchObserver`]: every committed batch reaches it on the thread of
//! the shard that owns the batch's devices, and each rule reading that stream runs there,
//! against state kept for that shard only (one uncontended mutex per shard, taken by the
//! shard's own thread and by inspection calls). Rule outputs come back to the shard as
//! derived batches, which it commits like ingested data.
//!
//! Deploying a rule compiles it against the catalog; a rule that does not compile is
//! refused and whatever ran before keeps running. Replacing a rule resets its state only.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray, TimestampNanosecondArray, new_null_array,
};
use arrow::compute::{and_not, cast, filter_record_batch};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use ferrite_engine::{
    BatchObserver, Clock, DEVICE_COLUMN, Metrics, StreamBatch, StreamCatalog, StreamName, TIME_COLUMN,
};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::join::JoinState;
use crate::lookup::LookupTable;
use crate::output::{ALERTS_STREAM, ActionSink, RowView, conform, fill_json, fill_text};
use crate::pattern::{PatternInput, PatternState};
use crate::plan::{ActionPlan, CompiledRule, JoinPlan, JoinSource, OperatorPlan, PostOp, SchemaSource};
use crate::window::{WindowInput, WindowState};

/// A lookup table shared by the shards (written by the shard that receives a row, read by all).
type SharedLookup = Arc<RwLock<LookupTable>>;

/// Loads a stream's rows (in time order) when a rule first joins it as a table.
pub trait TableLoader: Send + Sync {
    /// Every row of `stream`, oldest first.
    fn load(&self, stream: &str) -> std::result::Result<Vec<RecordBatch>, String>;
}

/// Counters of one deployed rule.
#[derive(Debug, Default)]
pub struct RuleStats {
    /// Events read.
    pub events_in: AtomicU64,
    /// Rows emitted.
    pub events_out: AtomicU64,
    /// Matches (patterns) or windows that passed `having`.
    pub matches: AtomicU64,
    /// Events sent to the late side stream.
    pub late: AtomicU64,
    /// Windows or partial matches dropped at the state limit.
    pub evicted: AtomicU64,
    /// Batches that failed.
    pub errors: AtomicU64,
    /// Total processing time, nanoseconds.
    pub busy_nanos: AtomicU64,
    /// Batches processed.
    pub batches: AtomicU64,
}

/// A rule as deployed.
#[derive(Debug)]
pub struct LiveRule {
    /// The compiled rule.
    pub plan: CompiledRule,
    /// Increases on every deployment; state of an older generation is discarded.
    pub generation: u64,
    /// The file it came from (`None`: the API).
    pub origin: Option<String>,
    /// Its counters.
    pub stats: RuleStats,
    /// The last runtime error, if any.
    pub last_error: Mutex<Option<String>>,
    /// A shadow runs beside the live rule of the same name on the same events; its outputs
    /// are compared with the live rule's, never committed or acted on.
    pub shadow: bool,
    /// The `rule` label of its metrics (shadows: `NAME (shadow)`).
    pub label: String,
    /// Set when the rule panicked: it runs no more until deployed again, and the shard
    /// that ran it goes on with the other rules.
    pub failed: AtomicBool,
}

impl LiveRule {
    /// The key of this rule's state in a shard's map.
    fn state_key(&self) -> String {
        if self.shadow { format!("{}\u{1}shadow", self.plan.name) } else { self.plan.name.clone() }
    }
}

/// Where a live rule and its shadow disagree, as a multiset of output rows: +1 for each row
/// the live rule emitted, -1 for each the shadow emitted.
#[derive(Debug, Default)]
struct ShadowDiff {
    live_rows: u64,
    shadow_rows: u64,
    balance: HashMap<String, i64>,
    /// Distinct differing rows not tracked because the bound was reached.
    untracked: u64,
}

/// Distinct differing rows a shadow comparison keeps.
const SHADOW_DIFF_LIMIT: usize = 10_000;

/// What `GET /api/v1/rules/{name}/shadow` shows.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowReport {
    /// The rule.
    pub name: String,
    /// The shadow version's text.
    pub shadow_text: String,
    /// Rows the live version emitted since the shadow was deployed.
    pub live_rows: u64,
    /// Rows the shadow emitted.
    pub shadow_rows: u64,
    /// Rows only the live version emitted (up to 100, with how many times).
    pub only_live: Vec<serde_json::Value>,
    /// Rows only the shadow emitted (up to 100).
    pub only_shadow: Vec<serde_json::Value>,
    /// Distinct differing rows in all.
    pub differing: usize,
    /// Differing rows not tracked (the comparison keeps 10,000).
    pub untracked: u64,
}

/// What `GET /api/v1/rules/{name}` shows.
#[derive(Debug, Clone, Serialize)]
pub struct RuleInfo {
    /// Name.
    pub name: String,
    /// `running`.
    pub status: &'static str,
    /// Streams read.
    pub inputs: Vec<String>,
    /// Derived stream written.
    pub insert_into: Option<String>,
    /// File it came from.
    pub origin: Option<String>,
    /// Source text.
    pub text: String,
    /// Counters.
    pub events_in: u64,
    /// Rows emitted.
    pub events_out: u64,
    /// Matches.
    pub matches: u64,
    /// Late events.
    pub late_events: u64,
    /// Evicted state.
    pub evicted: u64,
    /// Failed batches.
    pub errors: u64,
    /// Open windows or partial matches, over all shards.
    pub state_size: usize,
    /// Mean processing time per batch, microseconds.
    pub mean_batch_micros: f64,
    /// Last runtime error.
    pub last_error: Option<String>,
    /// Whether a shadow version runs beside it.
    pub has_shadow: bool,
    /// Event-time settings of its main input (`stream` declarations are not in `text`).
    pub time: TimeInfo,
}

/// Event-time settings, as the API shows them.
#[derive(Debug, Clone, Serialize)]
pub struct TimeInfo {
    /// `max_delay`, milliseconds.
    pub max_delay_ms: i64,
    /// `lateness`, milliseconds.
    pub lateness_ms: i64,
    /// `time processing`.
    pub processing_time: bool,
}

#[derive(Default)]
struct DeviceClock {
    /// Newest event time seen (nanoseconds).
    max_time: i64,
    /// Wall-clock time of the last event (nanoseconds).
    last_seen: i64,
    /// The batch (`RuleState::epoch`) that last moved `max_time`.
    epoch: u64,
}

enum OpState {
    Stateless,
    Window(Box<WindowState>),
    Pattern(PatternState),
    Join(JoinState),
}

struct RuleState {
    generation: u64,
    devices: hashbrown::HashMap<Arc<str>, DeviceClock, ahash::RandomState>,
    /// Batches seen (marks the devices a batch moved).
    epoch: u64,
    /// The stream's clock (newest event time of any device): windows not keyed by device
    /// close on it.
    stream: DeviceClock,
    op: OpState,
    raised: HashSet<String>,
    /// `output first every D`: per key, the period it last emitted in.
    rate: HashMap<String, i64>,
    /// `output last every D`: per key, the latest row of its current period.
    pending: HashMap<String, PendingRow>,
}

/// The outputs of one rule run, before they become derived batches and actions.
struct Outputs {
    batches: Vec<StreamBatch>,
}

/// All deployed rules and their per-shard state.
pub struct RuleEngine {
    catalog: Arc<StreamCatalog>,
    metrics: Arc<Metrics>,
    actions: Arc<dyn ActionSink>,
    clock: Arc<dyn Clock>,
    rules: RwLock<Arc<Vec<Arc<LiveRule>>>>,
    shadows: RwLock<Arc<Vec<Arc<LiveRule>>>>,
    diffs: Mutex<HashMap<String, ShadowDiff>>,
    /// Tables joined by rules, by (table, key column).
    lookups: RwLock<HashMap<(String, String), SharedLookup>>,
    loader: RwLock<Option<Arc<dyn TableLoader>>>,
    shards: Vec<Mutex<HashMap<String, RuleState>>>,
    /// State of rules whose windows are not keyed by device: shared by every shard (taken
    /// after a shard's own lock, never before).
    global: Mutex<HashMap<String, RuleState>>,
    generation: AtomicU64,
    /// What deployed rules may read and call; `None`: anything (local tools).
    sandbox: RwLock<Option<crate::sandbox::Sandbox>>,
}

impl std::fmt::Debug for RuleEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleEngine").field("rules", &self.rules.read().len()).finish()
    }
}

/// Schemas come from the catalog.
struct CatalogSchemas<'a>(&'a StreamCatalog);

impl SchemaSource for CatalogSchemas<'_> {
    fn schema(&self, stream: &str) -> Option<SchemaRef> {
        self.0.get_by_name(stream).map(|s| s.arrow.clone())
    }
}

impl RuleEngine {
    /// A rule engine for `shards` shards, with no rules.
    pub fn new(
        shards: usize,
        catalog: Arc<StreamCatalog>,
        metrics: Arc<Metrics>,
        actions: Arc<dyn ActionSink>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            catalog,
            metrics,
            actions,
            clock,
            rules: RwLock::new(Arc::new(Vec::new())),
            shadows: RwLock::new(Arc::new(Vec::new())),
            diffs: Mutex::new(HashMap::new()),
            lookups: RwLock::new(HashMap::new()),
            loader: RwLock::new(None),
            shards: (0..shards.max(1)).map(|_| Mutex::new(HashMap::new())).collect(),
            global: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(1),
            sandbox: RwLock::new(None),
        }
    }

    /// Limits what rules deployed from now on may read and call (the server sets one).
    pub fn set_sandbox(&self, sandbox: crate::sandbox::Sandbox) {
        *self.sandbox.write() = Some(sandbox);
    }

    /// The catalog rules are compiled against.
    pub fn catalog(&self) -> &Arc<StreamCatalog> {
        &self.catalog
    }

    /// Parses and compiles `text` against the catalog without deploying it.
    pub fn check(&self, text: &str) -> Result<Vec<CompiledRule>> {
        let sandbox = self.sandbox.read().clone();
        let base = sandbox.as_ref().map(|s| s.table_dir.clone());
        compile_text_sandboxed(text, &CatalogSchemas(&self.catalog), base.as_deref(), sandbox.as_ref())
    }

    /// Deploys every rule of `text` (replacing rules of the same names). When `origin` is a
    /// file, rules that file held before and no longer holds are removed. Returns the names
    /// deployed. Nothing changes if any rule fails to compile.
    pub fn deploy(&self, text: &str, origin: Option<&str>) -> Result<Vec<String>> {
        // A file's relative table paths start from its directory; the API's from the
        // sandbox's table directory.
        let sandbox = self.sandbox.read().clone();
        let base = origin
            .map(std::path::Path::new)
            .and_then(std::path::Path::parent)
            .map(std::path::Path::to_owned)
            .or_else(|| sandbox.as_ref().map(|s| s.table_dir.clone()));
        let base = base.as_deref();
        let compiled = compile_text_sandboxed(text, &CatalogSchemas(&self.catalog), base, sandbox.as_ref())?;
        self.install(compiled, origin)
    }

    /// Deploys already compiled rules.
    pub fn install(&self, compiled: Vec<CompiledRule>, origin: Option<&str>) -> Result<Vec<String>> {
        for r in &compiled {
            if let Some(j) = &r.join {
                self.prepare_lookup(&r.name, j)?;
            }
        }
        for r in &compiled {
            if let Some(target) = &r.insert_into {
                crate::output::register_derived(&self.catalog, &StreamName::new(target)?, &r.output)?;
            }
        }
        let names: Vec<String> = compiled.iter().map(|r| r.name.clone()).collect();
        let mut guard = self.rules.write();
        let mut next: Vec<Arc<LiveRule>> = guard
            .iter()
            .filter(|r| !names.contains(&r.plan.name))
            .filter(|r| origin.is_none() || r.origin.as_deref() != origin)
            .cloned()
            .collect();
        for plan in compiled {
            // Re-deploying a file keeps the state of its rules that did not change.
            // A rule that failed starts afresh.
            let unchanged = guard.iter().find(|r| {
                !r.failed.load(Ordering::Relaxed)
                    && r.plan.name == plan.name
                    && r.origin.as_deref() == origin
                    && r.plan.text == plan.text
                    && r.plan.input_schemas == plan.input_schemas
                    && r.plan.time == plan.time
            });
            if let Some(r) = unchanged {
                next.push(r.clone());
                continue;
            }
            // A rule of the same name from another file is replaced too: names are global.
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            tracing::info!(rule = %plan.name, generation, origin = origin.unwrap_or("api"), "rule deployed");
            next.push(Arc::new(LiveRule {
                label: plan.name.clone(),
                plan,
                generation,
                origin: origin.map(str::to_owned),
                stats: RuleStats::default(),
                last_error: Mutex::new(None),
                shadow: false,
                failed: AtomicBool::new(false),
            }));
        }
        *guard = Arc::new(next);
        drop(guard);
        self.free_stale_state();
        Ok(names)
    }

    /// Sets where stream tables are loaded from when a rule first joins them (the server
    /// reads them through SQL); without it they fill from the rows that arrive.
    pub fn set_table_loader(&self, loader: Arc<dyn TableLoader>) {
        *self.loader.write() = Some(loader);
    }

    fn lookup_key(rule: &str, j: &JoinPlan) -> (String, String) {
        match j.source {
            // A file is read per deployment of the rule that declares it.
            JoinSource::Static(_) => (format!("{rule}\u{1}{}", j.table), j.table_key.clone()),
            JoinSource::Stream => (j.table.clone(), j.table_key.clone()),
        }
    }

    fn prepare_lookup(&self, rule: &str, j: &JoinPlan) -> Result<()> {
        let key = Self::lookup_key(rule, j);
        match &j.source {
            JoinSource::Static(batches) => {
                let mut t = LookupTable::new(j.table_schema.clone(), &j.table_key);
                for b in batches.iter() {
                    t.apply(b)?;
                }
                self.lookups.write().insert(key, Arc::new(RwLock::new(t)));
            }
            JoinSource::Stream => {
                if self.lookups.read().contains_key(&key) {
                    return Ok(());
                }
                let mut t = LookupTable::new(j.table_schema.clone(), &j.table_key);
                let loader = self.loader.read().clone();
                if let Some(loader) = loader {
                    for b in loader.load(&j.table).map_err(Error::Input)? {
                        t.apply(&b)?;
                    }
                }
                tracing::info!(table = %j.table, key = %j.table_key, rows = t.len(), "stream table loaded for joins");
                self.lookups.write().entry(key).or_insert_with(|| Arc::new(RwLock::new(t)));
            }
        }
        Ok(())
    }

    /// Feeds rows of stream tables to their lookups (every shard's rows, one shared table).
    fn feed_lookups(&self, sb: &StreamBatch) {
        let lookups = self.lookups.read();
        for ((table, _), t) in lookups.iter() {
            if table == sb.stream.as_str()
                && let Err(e) = t.write().apply(&sb.batch)
            {
                tracing::warn!(table, error = %e, "cannot update a stream table");
            }
        }
    }

    fn enrich(&self, rule: &LiveRule, j: &JoinPlan, batch: &RecordBatch) -> Result<RecordBatch> {
        let key = Self::lookup_key(&rule.plan.name, j);
        let table = self.lookups.read().get(&key).cloned();
        let keys = batch
            .column_by_name(&j.input_key)
            .cloned()
            .ok_or_else(|| Error::Input(format!("join key `{}` missing", j.input_key)))?;
        let mut fields: Vec<arrow::datatypes::Field> =
            batch.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
        let mut columns = batch.columns().to_vec();
        match table {
            Some(t) => {
                for (f, c) in t.read().enrich(&keys, &j.table)? {
                    fields.push(f);
                    columns.push(c);
                }
            }
            None => {
                for f in j.table_schema.fields() {
                    fields.push(arrow::datatypes::Field::new(
                        format!("{}.{}", j.table, f.name()),
                        f.data_type().clone(),
                        true,
                    ));
                    columns.push(new_null_array(f.data_type(), batch.num_rows()));
                }
            }
        }
        let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
        Ok(RecordBatch::try_new_with_options(Arc::new(arrow::datatypes::Schema::new(fields)), columns, &options)?)
    }

    /// Frees the state of rules and shadows that are gone or were replaced (a new
    /// generation starts fresh).
    fn free_stale_state(&self) {
        let live: Vec<(String, u64)> =
            self.rules().iter().chain(self.shadows.read().iter()).map(|r| (r.state_key(), r.generation)).collect();
        for shard in self.shards.iter().chain(std::iter::once(&self.global)) {
            shard.lock().retain(|key, st| live.iter().any(|(k, g)| k == key && *g == st.generation));
        }
    }

    /// Deploys every rule of `text` as the shadow of the live rule of the same name: it runs
    /// on the same events from now on, its outputs are compared with the live rule's
    /// (`shadow_report`) and neither committed nor acted on, until it is promoted or removed.
    pub fn deploy_shadow(&self, text: &str) -> Result<Vec<String>> {
        let compiled = self.check(text)?;
        let rules = self.rules();
        for r in &compiled {
            if !rules.iter().any(|l| l.plan.name == r.name) {
                return Err(Error::Input(format!(
                    "no live rule `{}` to shadow; deploy it first (a shadow is a new version of a running rule)",
                    r.name
                )));
            }
        }
        let names: Vec<String> = compiled.iter().map(|r| r.name.clone()).collect();
        let mut guard = self.shadows.write();
        let mut next: Vec<Arc<LiveRule>> = guard.iter().filter(|s| !names.contains(&s.plan.name)).cloned().collect();
        for plan in compiled {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            self.diffs.lock().insert(plan.name.clone(), ShadowDiff::default());
            tracing::info!(rule = %plan.name, generation, "shadow deployed");
            next.push(Arc::new(LiveRule {
                label: format!("{} (shadow)", plan.name),
                plan,
                generation,
                origin: None,
                stats: RuleStats::default(),
                last_error: Mutex::new(None),
                shadow: true,
                failed: AtomicBool::new(false),
            }));
        }
        *guard = Arc::new(next);
        drop(guard);
        self.free_stale_state();
        Ok(names)
    }

    /// Where the shadow of rule `name` and the live rule have disagreed so far.
    pub fn shadow_report(&self, name: &str) -> Result<ShadowReport> {
        let shadows = self.shadows.read().clone();
        let shadow =
            shadows.iter().find(|s| s.plan.name == name).ok_or_else(|| Error::NotFound(format!("{name} (shadow)")))?;
        let diffs = self.diffs.lock();
        let d = diffs.get(name).ok_or_else(|| Error::NotFound(format!("{name} (shadow)")))?;
        let mut differing: Vec<(&String, &i64)> = d.balance.iter().filter(|(_, n)| **n != 0).collect();
        differing.sort();
        let side = |positive: bool| -> Vec<serde_json::Value> {
            differing
                .iter()
                .filter(|(_, n)| (**n > 0) == positive)
                .take(100)
                .map(|(row, n)| {
                    let mut v: serde_json::Value = serde_json::from_str(row).unwrap_or(serde_json::Value::Null);
                    if let Some(o) = v.as_object_mut() {
                        o.insert("times".into(), serde_json::json!(n.abs()));
                    }
                    v
                })
                .collect()
        };
        Ok(ShadowReport {
            name: name.to_owned(),
            shadow_text: shadow.plan.text.clone(),
            live_rows: d.live_rows,
            shadow_rows: d.shadow_rows,
            only_live: side(true),
            only_shadow: side(false),
            differing: differing.len(),
            untracked: d.untracked,
        })
    }

    /// Makes the shadow of rule `name` the live version (its state starts afresh).
    pub fn promote(&self, name: &str) -> Result<()> {
        let shadow = {
            let mut guard = self.shadows.write();
            let s = guard
                .iter()
                .find(|s| s.plan.name == name)
                .cloned()
                .ok_or_else(|| Error::NotFound(format!("{name} (shadow)")))?;
            *guard = Arc::new(guard.iter().filter(|x| x.plan.name != name).cloned().collect());
            s
        };
        self.diffs.lock().remove(name);
        let origin = self.rules().iter().find(|r| r.plan.name == name).and_then(|r| r.origin.clone());
        let _ = self.install(vec![shadow.plan.clone()], None)?;
        if let Some(o) = origin {
            tracing::info!(rule = name, file = %o, "promoted a shadow over a rule from a file: the file wins again when it changes");
        }
        Ok(())
    }

    /// Removes the shadow of rule `name`.
    pub fn remove_shadow(&self, name: &str) -> Result<()> {
        let mut guard = self.shadows.write();
        if !guard.iter().any(|s| s.plan.name == name) {
            return Err(Error::NotFound(format!("{name} (shadow)")));
        }
        *guard = Arc::new(guard.iter().filter(|x| x.plan.name != name).cloned().collect());
        drop(guard);
        self.diffs.lock().remove(name);
        self.free_stale_state();
        Ok(())
    }

    /// Records outputs of a rule that has a shadow (or of the shadow) for the comparison.
    fn record_shadow_outputs(&self, rule: &LiveRule, outputs: &[StreamBatch]) {
        let relevant: Vec<StreamBatch> = outputs
            .iter()
            .filter(|b| {
                Some(b.stream.as_str()) == rule.plan.insert_into.as_deref() || b.stream.as_str() == ALERTS_STREAM
            })
            .cloned()
            .collect();
        let rows = crate::recorded::to_rows(&relevant);
        let mut diffs = self.diffs.lock();
        let Some(d) = diffs.get_mut(&rule.plan.name) else { return };
        let delta = if rule.shadow { -1 } else { 1 };
        if rule.shadow {
            d.shadow_rows += rows.len() as u64;
        } else {
            d.live_rows += rows.len() as u64;
        }
        for r in rows {
            let key = r.to_string();
            let tracked = d.balance.len() < SHADOW_DIFF_LIMIT;
            match d.balance.get_mut(&key) {
                Some(n) => {
                    *n += delta;
                    if *n == 0 {
                        d.balance.remove(&key);
                    }
                }
                None if tracked => {
                    d.balance.insert(key, delta);
                }
                None => d.untracked += 1,
            }
        }
    }

    /// Removes rule `name`.
    pub fn remove(&self, name: &str) -> Result<()> {
        let mut guard = self.rules.write();
        if !guard.iter().any(|r| r.plan.name == name) {
            return Err(Error::NotFound(name.to_owned()));
        }
        *guard = Arc::new(guard.iter().filter(|r| r.plan.name != name).cloned().collect());
        for shard in self.shards.iter().chain(std::iter::once(&self.global)) {
            shard.lock().remove(name);
        }
        let _ = self.remove_shadow(name);
        tracing::info!(rule = name, "rule removed");
        Ok(())
    }

    /// Removes every rule that came from `origin` (a deleted file).
    pub fn remove_origin(&self, origin: &str) -> Vec<String> {
        let gone: Vec<String> = self
            .rules
            .read()
            .iter()
            .filter(|r| r.origin.as_deref() == Some(origin))
            .map(|r| r.plan.name.clone())
            .collect();
        for name in &gone {
            let _ = self.remove(name);
        }
        gone
    }

    /// Deployed rules.
    pub fn rules(&self) -> Arc<Vec<Arc<LiveRule>>> {
        self.rules.read().clone()
    }

    /// Status and counters of every rule.
    pub fn list(&self) -> Vec<RuleInfo> {
        self.rules().iter().map(|r| self.info_of(r)).collect()
    }

    /// Status and counters of rule `name`.
    pub fn info(&self, name: &str) -> Result<RuleInfo> {
        let rules = self.rules();
        let rule = rules.iter().find(|r| r.plan.name == name).ok_or_else(|| Error::NotFound(name.to_owned()))?;
        Ok(self.info_of(rule))
    }

    fn info_of(&self, r: &LiveRule) -> RuleInfo {
        let state_size = self
            .shards
            .iter()
            .chain(std::iter::once(&self.global))
            .map(|s| s.lock().get(&r.plan.name).filter(|st| st.generation == r.generation).map_or(0, state_size))
            .sum();
        let s = &r.stats;
        let batches = s.batches.load(Ordering::Relaxed);
        RuleInfo {
            name: r.plan.name.clone(),
            status: if r.failed.load(Ordering::Relaxed) { "failed" } else { "running" },
            inputs: r.plan.inputs.clone(),
            insert_into: r.plan.insert_into.clone(),
            origin: r.origin.clone(),
            text: r.plan.text.clone(),
            events_in: s.events_in.load(Ordering::Relaxed),
            events_out: s.events_out.load(Ordering::Relaxed),
            matches: s.matches.load(Ordering::Relaxed),
            late_events: s.late.load(Ordering::Relaxed),
            evicted: s.evicted.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            state_size,
            mean_batch_micros: if batches == 0 {
                0.0
            } else {
                s.busy_nanos.load(Ordering::Relaxed) as f64 / batches as f64 / 1e3
            },
            last_error: r.last_error.lock().clone(),
            has_shadow: self.shadows.read().iter().any(|s| s.plan.name == r.plan.name),
            time: TimeInfo {
                max_delay_ms: r.plan.time.max_delay / 1_000_000,
                lateness_ms: r.plan.time.lateness / 1_000_000,
                processing_time: r.plan.time.processing_time,
            },
        }
    }

    /// Runs every rule over `batches` committed on `shard`; returns derived batches.
    pub fn process(&self, shard: usize, batches: &[StreamBatch]) -> Vec<StreamBatch> {
        let rules = self.rules();
        let shadows = self.shadows.read().clone();
        let Some(states) = self.shards.get(shard) else { return Vec::new() };
        let mut states = states.lock();
        let mut out = Vec::new();
        for sb in batches {
            self.feed_lookups(sb);
            let reads = |r: &&Arc<LiveRule>| {
                !r.failed.load(Ordering::Relaxed) && r.plan.inputs.iter().any(|i| i == sb.stream.as_str())
            };
            for rule in rules.iter().filter(reads).chain(shadows.iter().filter(reads)) {
                let compared = rule.shadow || shadows.iter().any(|s| s.plan.name == rule.plan.name);
                let started = Instant::now();
                let mut global;
                let map = if is_global(rule) {
                    global = self.global.lock();
                    &mut *global
                } else {
                    &mut *states
                };
                let state = match state_in(map, rule) {
                    Ok(s) => s,
                    Err(e) => {
                        self.record_error(rule, &e);
                        continue;
                    }
                };
                match self.guarded(rule, || self.run(rule, state, sb, shard)) {
                    Ok(o) => {
                        if compared {
                            self.record_shadow_outputs(rule, &o.batches);
                        }
                        if !rule.shadow {
                            out.extend(o.batches);
                        }
                    }
                    Err(e) => self.record_error(rule, &e),
                }
                let elapsed = started.elapsed();
                rule.stats.busy_nanos.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
                rule.stats.batches.fetch_add(1, Ordering::Relaxed);
                self.metrics.histogram("ferrite_rule_seconds", &[("rule", &rule.label)]).observe(elapsed);
                self.metrics
                    .gauge("ferrite_rule_state_size", &[("rule", &rule.label), ("shard", &shard.to_string())])
                    .set(state_size(state) as i64);
            }
        }
        out
    }

    /// Lets time pass on `shard`: devices silent for a while have their time extrapolated by
    /// the wall clock, which closes their windows and completes their absences.
    pub fn tick(&self, shard: usize) -> Vec<StreamBatch> {
        let now = self.clock.now_nanos();
        self.advance(shard, &|clock: &DeviceClock, delay: i64| {
            // A device's time moves with the wall clock once it is silent.
            let silent_for = now.saturating_sub(clock.last_seen);
            (silent_for > 0).then(|| clock.max_time.saturating_add(silent_for).saturating_sub(delay))
        })
    }

    /// End of input (tests, replay): closes every window and completes every absence.
    pub fn finish(&self, shard: usize) -> Vec<StreamBatch> {
        self.advance(shard, &|_, _| Some(i64::MAX))
    }

    fn advance(&self, shard: usize, time_of: &dyn Fn(&DeviceClock, i64) -> Option<i64>) -> Vec<StreamBatch> {
        let rules = self.rules();
        let shadows = self.shadows.read().clone();
        let Some(states) = self.shards.get(shard) else { return Vec::new() };
        let mut states = states.lock();
        let mut out = Vec::new();
        for rule in rules.iter().chain(shadows.iter()) {
            if rule.failed.load(Ordering::Relaxed) {
                continue;
            }
            let compared = rule.shadow || shadows.iter().any(|s| s.plan.name == rule.plan.name);
            // Shared state moves on shard 0's ticks only.
            let mut global;
            let map = if is_global(rule) {
                if shard != 0 {
                    continue;
                }
                global = self.global.lock();
                &mut *global
            } else {
                &mut *states
            };
            let Some(state) = map.get_mut(&rule.state_key()).filter(|s| s.generation == rule.generation) else {
                continue;
            };
            let delay = rule.plan.time.max_delay.saturating_add(rule.plan.time.lateness);
            let result = self.guarded(rule, || -> Result<Vec<StreamBatch>> {
                let emitted = match &mut state.op {
                    OpState::Stateless => return Ok(Vec::new()),
                    OpState::Window(w) => {
                        let mut emitted = Vec::new();
                        if is_global(rule) {
                            if let Some(t) = time_of(&state.stream, delay) {
                                emitted.extend(w.close_until(t).map_err(|e| eval(rule, e))?);
                            }
                        } else {
                            for d in w.devices() {
                                let Some(t) = state.devices.get(&d).and_then(|c| time_of(c, delay)) else { continue };
                                emitted.extend(w.close_device(&d, t).map_err(|e| eval(rule, e))?);
                            }
                        }
                        if emitted.is_empty() {
                            return Ok(Vec::new());
                        }
                        let times = WindowState::times(&emitted);
                        let devices = emitted_devices(rule, &emitted);
                        let batch = w.to_batch(&emitted).map_err(|e| eval(rule, e))?;
                        (batch, times, devices)
                    }
                    OpState::Join(_) => return Ok(Vec::new()),
                    OpState::Pattern(p) => {
                        let devices = &state.devices;
                        let matches = p.advance_all(&|d: &str| {
                            devices
                                .get(d)
                                .and_then(|c| time_of(c, rule.plan.time.max_delay))
                                .map(|t| if t == i64::MAX { t } else { t.saturating_add(1) })
                        });
                        if matches.is_empty() {
                            return Ok(Vec::new());
                        }
                        let times: Vec<i64> = matches.iter().map(|m| m.time).collect();
                        let devices: Vec<Arc<str>> = matches.iter().map(|m| m.device.clone()).collect();
                        let batch = p.to_batch(&matches).map_err(|e| eval(rule, e))?;
                        (batch, times, devices)
                    }
                };
                let (batch, times, devices) = emitted;
                self.emit(rule, state, batch, &times, &devices)
            });
            // `output last`: rows whose period has ended by their device's time go out.
            let result = result.and_then(|mut b| {
                self.guarded(rule, || {
                    let Some(rate) = rule.plan.output_rate.filter(|r| !r.first) else { return Ok(b) };
                    let global = is_global(rule);
                    let now_of: HashMap<String, i64> = state
                        .pending
                        .values()
                        .filter_map(|p| {
                            let clock = if global { Some(&state.stream) } else { state.devices.get(&p.device) };
                            clock.and_then(|c| time_of(c, 0)).map(|t| (p.device.to_string(), t))
                        })
                        .collect();
                    if let Some(r) = release_due(state, rate.every, &|d| now_of.get(d).copied())? {
                        let all = vec![true; r.batch.num_rows()];
                        b.extend(
                            self.deliver(rule, state, &r.batch, &r.times, &r.devices, &r.keys, &all, None, false)?,
                        );
                    }
                    Ok(b)
                })
            });
            match result {
                Ok(b) => {
                    if compared {
                        self.record_shadow_outputs(rule, &b);
                    }
                    if !rule.shadow {
                        out.extend(b);
                    }
                }
                Err(e) => self.record_error(rule, &e),
            }
        }
        out
    }

    /// Runs `f` for `rule`, turning a panic into an error that disables the rule, so that
    /// one rule's bug never takes down the shard thread (and every device on it).
    fn guarded<T>(&self, rule: &LiveRule, f: impl FnOnce() -> Result<T>) -> Result<T> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(r) => r,
            Err(payload) => {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".to_owned());
                rule.failed.store(true, Ordering::Relaxed);
                self.metrics.inc("ferrite_rule_panics_total", &[("rule", &rule.label)], 1);
                tracing::error!(rule = %rule.plan.name, %message, "rule panicked; disabled until deployed again");
                Err(Error::Panicked { rule: rule.plan.name.clone(), message })
            }
        }
    }

    fn record_error(&self, rule: &LiveRule, e: &Error) {
        rule.stats.errors.fetch_add(1, Ordering::Relaxed);
        self.metrics.inc("ferrite_rule_errors_total", &[("rule", &rule.label)], 1);
        tracing::warn!(rule = %rule.plan.name, error = %e, "rule failed on a batch");
        *rule.last_error.lock() = Some(e.to_string());
    }

    /// Runs one rule over one batch.
    fn run(&self, rule: &LiveRule, state: &mut RuleState, sb: &StreamBatch, _shard: usize) -> Result<Outputs> {
        let plan = &rule.plan;
        let input_idx = plan.inputs.iter().position(|i| i == sb.stream.as_str()).unwrap_or(0);
        let batch = align(&sb.batch, &plan.input_schemas[input_idx])?;
        let n = batch.num_rows();
        if n == 0 {
            return Ok(Outputs { batches: Vec::new() });
        }
        rule.stats.events_in.fetch_add(n as u64, Ordering::Relaxed);
        self.metrics.inc("ferrite_rule_events_in_total", &[("rule", &rule.label)], n as u64);
        let now = self.clock.now_nanos();
        let time = if plan.time.processing_time {
            TimestampNanosecondArray::from(vec![now; n]).with_timezone("UTC")
        } else {
            time_column(&batch)?
        };
        let device_col = batch
            .column_by_name(DEVICE_COLUMN)
            .and_then(|c| c.as_string_opt::<i32>())
            .ok_or_else(|| Error::Input(format!("stream `{}` has no device_id column", sb.stream)))?
            .clone();
        // Watermarks per device: late rows are those older than the device's newest event
        // minus `max_delay` and `lateness`, evaluated row by row in arrival order. Device ids
        // become shared strings, one allocation per device and rule, not per row. Stateless
        // rules need neither.
        // `output last` keeps rows per key over event time: it needs the clocks too.
        let stateful = !matches!(state.op, OpState::Stateless) || plan.output_rate.is_some_and(|r| !r.first);
        let mut late = vec![false; if stateful { n } else { 0 }];
        let mut any_late = false;
        let mut devices: Vec<Arc<str>> = Vec::with_capacity(if stateful { n } else { 0 });
        let mut touched: Vec<Arc<str>> = Vec::new();
        let global_rule = is_global(rule);
        if stateful {
            state.epoch += 1;
            let epoch = state.epoch;
            let delay = plan.time.max_delay.saturating_add(plan.time.lateness);
            for (i, late_i) in late.iter_mut().enumerate() {
                let d = device_col.value(i);
                let (key, c) = match state.devices.get_key_value_mut(d) {
                    Some((k, c)) => (k.clone(), c),
                    None => {
                        let k: Arc<str> = Arc::from(d);
                        let c = state.devices.entry(k.clone()).or_insert(DeviceClock {
                            max_time: i64::MIN,
                            last_seen: now,
                            epoch: 0,
                        });
                        (k, c)
                    }
                };
                c.last_seen = now;
                if global_rule && !time.is_null(i) {
                    // Windows across devices: lateness against the stream's clock.
                    let t = time.value(i);
                    if state.stream.max_time != i64::MIN && t < state.stream.max_time.saturating_sub(delay) {
                        *late_i = true;
                        any_late = true;
                    } else {
                        state.stream.max_time = state.stream.max_time.max(t);
                        c.max_time = c.max_time.max(t);
                    }
                    state.stream.last_seen = now;
                } else if !time.is_null(i) {
                    let t = time.value(i);
                    if c.max_time != i64::MIN && t < c.max_time.saturating_sub(delay) {
                        *late_i = true;
                        any_late = true;
                    } else if t > c.max_time {
                        c.max_time = t;
                        if c.epoch != epoch {
                            c.epoch = epoch;
                            touched.push(key.clone());
                        }
                    }
                }
                devices.push(key);
            }
        }
        let mut batches = Vec::new();
        if any_late && !rule.shadow {
            let mask = BooleanArray::from(late.clone());
            let late_rows = filter_record_batch(&batch, &mask)?;
            let count = late_rows.num_rows() as u64;
            rule.stats.late.fetch_add(count, Ordering::Relaxed);
            self.metrics.inc("ferrite_rule_late_events_total", &[("rule", &rule.label)], count);
            batches.push(self.late_batch(sb.stream.as_str(), &plan.name, &late_rows)?);
        }
        // A join adds the table's columns (after late events were set aside as they came).
        let batch = match &plan.join {
            Some(j) => self.enrich(rule, j, &batch)?,
            None => batch,
        };
        // The stream filter, then the operator.
        let mut keep: Option<BooleanArray> = None;
        for op in &plan.pre {
            if let PostOp::Filter(f) = op {
                let m = f.evaluate(&batch).map_err(|e| eval(rule, e))?.into_array(n).map_err(|e| eval(rule, e))?;
                let m = m.as_boolean().clone();
                keep = Some(match keep {
                    Some(k) => arrow::compute::and(&k, &m)?,
                    None => m,
                });
            }
        }
        let keep = match (keep, any_late) {
            (Some(k), true) => Some(and_not(&k, &BooleanArray::from(late.clone()))?),
            (None, true) => Some(arrow::compute::not(&BooleanArray::from(late.clone()))?),
            (k, false) => k,
        };
        let keep = keep.map(|k| prep(&k));
        let (batch, time, devices) = match &keep {
            Some(k) if k.true_count() < n => {
                let b = filter_record_batch(&batch, k)?;
                let t = arrow::compute::filter(&time, k)?
                    .as_primitive::<arrow::datatypes::TimestampNanosecondType>()
                    .clone();
                let d: Vec<Arc<str>> = if stateful {
                    devices.into_iter().zip(k.values().iter()).filter(|(_, k)| *k).map(|(d, _)| d).collect()
                } else {
                    Vec::new()
                };
                (b, t, d)
            }
            _ => (batch, time, devices),
        };
        let (op_batch, times, out_devices) = match &mut state.op {
            OpState::Stateless => {
                let times: Vec<i64> =
                    (0..time.len()).map(|i| if time.is_null(i) { now } else { time.value(i) }).collect();
                let col = batch.column_by_name(DEVICE_COLUMN).and_then(|c| c.as_string_opt::<i32>());
                let devices: Vec<Arc<str>> = match col {
                    Some(c) => (0..c.len()).map(|i| Arc::from(c.value(i))).collect(),
                    None => Vec::new(),
                };
                (batch, times, devices)
            }
            OpState::Window(w) => {
                let OperatorPlan::Window(wp) = &plan.operator else { return Err(Error::Input("plan mismatch".into())) };
                let rows = batch.num_rows();
                let keys = wp
                    .keys
                    .iter()
                    .map(|k| k.evaluate(&batch).and_then(|v| v.into_array(rows)))
                    .collect::<datafusion::error::Result<Vec<_>>>()
                    .map_err(|e| eval(rule, e))?;
                let args = wp
                    .aggregates
                    .iter()
                    .map(|a| {
                        a.args
                            .iter()
                            .map(|e| e.evaluate(&batch).and_then(|v| v.into_array(rows)))
                            .collect::<datafusion::error::Result<Vec<_>>>()
                    })
                    .collect::<datafusion::error::Result<Vec<_>>>()
                    .map_err(|e| eval(rule, e))?;
                let filters = wp
                    .aggregates
                    .iter()
                    .map(|a| {
                        a.filter
                            .as_ref()
                            .map(|f| f.evaluate(&batch).and_then(|v| v.into_array(rows)).map(|a| prep(a.as_boolean())))
                            .transpose()
                    })
                    .collect::<datafusion::error::Result<Vec<_>>>()
                    .map_err(|e| eval(rule, e))?;
                let input = WindowInput {
                    time: &time,
                    devices: &devices,
                    keys: &keys,
                    args: &args,
                    filters: &filters,
                    skip: None,
                };
                let mut emitted = w.update(&input).map_err(|e| eval(rule, e))?;
                let delay = plan.time.max_delay.saturating_add(plan.time.lateness);
                if global_rule {
                    if state.stream.max_time != i64::MIN {
                        let wm = state.stream.max_time.saturating_sub(delay);
                        emitted.extend(w.close_until(wm).map_err(|e| eval(rule, e))?);
                    }
                } else {
                    for d in &touched {
                        if let Some(c) = state.devices.get(d) {
                            emitted.extend(
                                w.close_device(d, c.max_time.saturating_sub(delay)).map_err(|e| eval(rule, e))?,
                            );
                        }
                    }
                }
                let over = w.size().saturating_sub(plan.state_limit);
                if over > 0 {
                    rule.stats.evicted.fetch_add(over as u64, Ordering::Relaxed);
                }
                let times = WindowState::times(&emitted);
                let devs = emitted_devices(rule, &emitted);
                (w.to_batch(&emitted).map_err(|e| eval(rule, e))?, times, devs)
            }
            OpState::Pattern(p) => {
                let input = PatternInput {
                    stream: sb.stream.as_str(),
                    batch: &batch,
                    time: &time,
                    devices: &devices,
                    skip: None,
                };
                let before = p.evicted;
                let matches = p.update(&input).map_err(|e| eval(rule, e))?;
                if p.evicted > before {
                    rule.stats.evicted.fetch_add(p.evicted - before, Ordering::Relaxed);
                    self.metrics.inc("ferrite_rule_evicted_total", &[("rule", &rule.label)], p.evicted - before);
                }
                let times: Vec<i64> = matches.iter().map(|m| m.time).collect();
                let devs: Vec<Arc<str>> = matches.iter().map(|m| m.device.clone()).collect();
                (p.to_batch(&matches).map_err(|e| eval(rule, e))?, times, devs)
            }
            OpState::Join(j) => {
                let delay = plan.time.max_delay.saturating_add(plan.time.lateness);
                let pairs = j.update(sb.stream.as_str(), &batch, &time, &devices, delay).map_err(|e| eval(rule, e))?;
                let times: Vec<i64> = pairs.iter().map(|p| p.time).collect();
                let devs: Vec<Arc<str>> = pairs.iter().map(|p| p.device.clone()).collect();
                (j.to_batch(&pairs).map_err(|e| eval(rule, e))?, times, devs)
            }
        };
        batches.extend(self.emit(rule, state, op_batch, &times, &out_devices)?);
        Ok(Outputs { batches })
    }

    /// Applies `having`, the select list and output limits to the operator's output, and
    /// turns the rows into derived batches, alerts and actions.
    fn emit(
        &self,
        rule: &LiveRule,
        state: &mut RuleState,
        op_batch: RecordBatch,
        times: &[i64],
        devices: &[Arc<str>],
    ) -> Result<Vec<StreamBatch>> {
        let plan = &rule.plan;
        if op_batch.num_rows() == 0 {
            return Ok(Vec::new());
        }
        let rows = op_batch.num_rows();
        // Keys of the rows, for alert state and rate limits only: the window key, or the
        // device.
        let needs_keys =
            plan.output_rate.is_some() || plan.actions.iter().any(|a| matches!(a, ActionPlan::Alert { .. }));
        let keys: Vec<String> = match &plan.operator {
            _ if !needs_keys => Vec::new(),
            OperatorPlan::Window(w) if w.keys.len() > 1 => (0..rows)
                .map(|i| {
                    let view = RowView::new(&op_batch, i, &[]);
                    (0..w.keys.len())
                        .map(|k| view.text(op_batch.schema().field(k).name()).unwrap_or_default())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .collect(),
            _ => devices.iter().map(|d| d.to_string()).collect(),
        };
        let passed: Vec<bool> = match &plan.having {
            Some(h) => {
                let m =
                    h.evaluate(&op_batch).map_err(|e| eval(rule, e))?.into_array(rows).map_err(|e| eval(rule, e))?;
                let m = m.as_boolean();
                (0..rows).map(|i| m.is_valid(i) && m.value(i)).collect()
            }
            None => vec![true; rows],
        };
        // The select list (and a having written over it): filters drop rows, so the row
        // positions are carried along to keep times, devices and keys in step.
        let mut out_batch = op_batch;
        let mut idx: Vec<usize> = (0..rows).collect();
        for op in &plan.post {
            match op {
                PostOp::Filter(f) => {
                    let n = out_batch.num_rows();
                    let m =
                        f.evaluate(&out_batch).map_err(|e| eval(rule, e))?.into_array(n).map_err(|e| eval(rule, e))?;
                    let m = prep(m.as_boolean());
                    out_batch = filter_record_batch(&out_batch, &m)?;
                    idx = idx.into_iter().zip(m.values().iter()).filter(|(_, k)| *k).map(|(i, _)| i).collect();
                }
                project => out_batch = apply(rule, project, &out_batch)?,
            }
        }
        let times: Vec<i64> = idx.iter().map(|&i| times[i]).collect();
        let devices: Vec<Arc<str>> = idx.iter().map(|&i| devices[i].clone()).collect();
        let keys: Vec<String> = if needs_keys { idx.iter().map(|&i| keys[i].clone()).collect() } else { keys };
        let passed: Vec<bool> = idx.iter().map(|&i| passed[i]).collect();
        // `output last every D`: the passing rows wait, one per key, until their period ends.
        let (held, released) = match plan.output_rate {
            Some(rate) if !rate.first => {
                let (held, released) = hold_last(state, &out_batch, &times, &devices, &keys, &passed, rate.every)?;
                (Some(held), released)
            }
            _ => (None, None),
        };
        let mut batches =
            self.deliver(rule, state, &out_batch, &times, &devices, &keys, &passed, held.as_deref(), true)?;
        if let Some(r) = released {
            let all = vec![true; r.batch.num_rows()];
            batches.extend(self.deliver(rule, state, &r.batch, &r.times, &r.devices, &r.keys, &all, None, false)?);
        }
        Ok(batches)
    }

    /// Turns final rows into derived batches, alerts and actions. `held` rows wait for
    /// `output last`; `apply_rate` applies `output first`.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &self,
        rule: &LiveRule,
        state: &mut RuleState,
        out_batch: &RecordBatch,
        times: &[i64],
        devices: &[Arc<str>],
        keys: &[String],
        passed: &[bool],
        held: Option<&[bool]>,
        apply_rate: bool,
    ) -> Result<Vec<StreamBatch>> {
        let plan = &rule.plan;
        let mut emitted_rows = Vec::new();
        let mut batches = Vec::new();
        let mut alert_rows: Vec<(usize, &'static str)> = Vec::new();
        let has_alert = plan.actions.iter().any(|a| matches!(a, ActionPlan::Alert { .. }));
        for i in 0..out_batch.num_rows() {
            if held.is_some_and(|h| h[i]) {
                continue;
            }
            if !passed[i] {
                if plan.having.is_some() && has_alert && state.raised.remove(&keys[i]) {
                    alert_rows.push((i, "cleared"));
                }
                continue;
            }
            if let Some(rate) = plan.output_rate.filter(|r| r.first && apply_rate) {
                let period = times[i].div_euclid(i64::try_from(rate.every.as_nanos()).unwrap_or(i64::MAX).max(1));
                if state.rate.get(&keys[i]) == Some(&period) {
                    continue;
                }
                state.rate.insert(keys[i].clone(), period);
            }
            emitted_rows.push(i);
            if has_alert {
                if plan.having.is_some() {
                    if state.raised.insert(keys[i].clone()) {
                        alert_rows.push((i, "raised"));
                    }
                } else {
                    alert_rows.push((i, "raised"));
                }
            }
        }
        let matched = emitted_rows.len() as u64;
        rule.stats.matches.fetch_add(matched, Ordering::Relaxed);
        self.metrics.inc("ferrite_rule_matches_total", &[("rule", &rule.label)], matched);
        if !emitted_rows.is_empty() {
            let idx = arrow::array::UInt32Array::from_iter_values(emitted_rows.iter().map(|i| *i as u32));
            let out = arrow::compute::take_record_batch(out_batch, &idx)?;
            rule.stats.events_out.fetch_add(out.num_rows() as u64, Ordering::Relaxed);
            self.metrics.inc("ferrite_rule_events_out_total", &[("rule", &rule.label)], out.num_rows() as u64);
            if let Some(target) = &plan.insert_into {
                let stream = StreamName::new(target)?;
                let t = TimestampNanosecondArray::from_iter_values(emitted_rows.iter().map(|i| times[*i]));
                let d = StringArray::from_iter_values(emitted_rows.iter().map(|i| devices[*i].as_ref()));
                batches.push(if rule.shadow {
                    raw_output(&stream, &out, t, d)?
                } else {
                    conform(&self.catalog, &stream, &out, &t, &d)?
                });
            }
            // A shadow acts on nothing.
            for (k, &i) in emitted_rows.iter().enumerate().filter(|_| !rule.shadow) {
                let extra = [("rule", plan.name.as_str())];
                let view = RowView::new(&out, k, &extra);
                for a in &plan.actions {
                    match a {
                        ActionPlan::Alert { .. } => {}
                        ActionPlan::Publish { topic, template } => {
                            let body = template.as_ref().map_or_else(|| view.to_json(), |t| fill_json(t, &view));
                            self.actions.publish(&fill_text(topic, &view), body.to_string().into_bytes());
                        }
                        ActionPlan::Command { device_column, name, params } => {
                            let Some(device) = view.text(device_column).filter(|d| !d.is_empty()) else { continue };
                            let params = params.as_ref().map_or(serde_json::json!({}), |t| fill_json(t, &view));
                            let id = format!("{}-{}-{}", plan.name, device, times[i]);
                            let body = serde_json::json!({"id": id, "name": name, "params": params, "rule": plan.name});
                            self.actions.publish(&format!("devices/{device}/commands"), body.to_string().into_bytes());
                        }
                        ActionPlan::Webhook { url, template } => {
                            let body = template.as_ref().map_or_else(|| view.to_json(), |t| fill_json(t, &view));
                            self.actions.webhook(&fill_text(url, &view), body.to_string().into_bytes());
                        }
                    }
                }
            }
        }
        if !alert_rows.is_empty() {
            batches.push(self.alerts(rule, out_batch, &alert_rows, times, devices, keys)?);
        }
        Ok(batches)
    }

    fn alerts(
        &self,
        rule: &LiveRule,
        out: &RecordBatch,
        rows: &[(usize, &'static str)],
        times: &[i64],
        devices: &[Arc<str>],
        keys: &[String],
    ) -> Result<StreamBatch> {
        let (severity, message) = rule
            .plan
            .actions
            .iter()
            .find_map(|a| match a {
                ActionPlan::Alert { severity, message } => Some((severity.as_str(), message.as_str())),
                _ => None,
            })
            .unwrap_or(("warning", ""));
        let extra = [("rule", rule.plan.name.as_str()), ("severity", severity)];
        let msgs: Vec<String> = rows.iter().map(|(i, _)| fill_text(message, &RowView::new(out, *i, &extra))).collect();
        let schema = crate::output::alerts_schema();
        let t = TimestampNanosecondArray::from_iter_values(rows.iter().map(|(i, _)| times[*i])).with_timezone("UTC");
        let columns: Vec<ArrayRef> = vec![
            Arc::new(t),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|(i, _)| devices[*i].as_ref()))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|_| rule.plan.name.as_str()))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|(i, _)| keys[*i].as_str()))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|_| severity))),
            Arc::new(StringArray::from_iter_values(msgs.iter())),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|(_, s)| *s))),
        ];
        let batch = RecordBatch::try_new(schema, columns)?;
        let stream = StreamName::new(ALERTS_STREAM)?;
        if rule.shadow {
            return Ok(StreamBatch::new(stream, batch));
        }
        let time = batch.column(0).as_primitive::<arrow::datatypes::TimestampNanosecondType>().clone();
        let device = batch.column(1).as_string::<i32>().clone();
        conform(&self.catalog, &stream, &batch, &time, &device)
    }

    fn late_batch(&self, stream: &str, rule: &str, rows: &RecordBatch) -> Result<StreamBatch> {
        let target = StreamName::new(&format!("{stream}_late"))?;
        let mut fields: Vec<arrow::datatypes::Field> =
            rows.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(arrow::datatypes::Field::new("late_for_rule", DataType::Utf8, true));
        let mut columns = rows.columns().to_vec();
        columns.push(Arc::new(StringArray::from_iter_values((0..rows.num_rows()).map(|_| rule))));
        let with_rule = RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns)?;
        let time = time_column(rows)?;
        let device = rows
            .column_by_name(DEVICE_COLUMN)
            .and_then(|c| c.as_string_opt::<i32>())
            .cloned()
            .unwrap_or_else(|| StringArray::from(Vec::<&str>::new()));
        conform(&self.catalog, &target, &with_rule, &time, &device)
    }

    /// Calls `f` with every live rule's state on every shard (shard `None`: shared state).
    fn each_state(&self, mut f: impl FnMut(Option<usize>, &LiveRule, &RuleState) -> Result<()>) -> Result<()> {
        let rules = self.rules();
        let maps =
            self.shards.iter().enumerate().map(|(i, s)| (Some(i), s)).chain(std::iter::once((None, &self.global)));
        for (shard, map) in maps {
            let map = map.lock();
            for rule in rules.iter() {
                if let Some(st) = map.get(&rule.plan.name).filter(|s| s.generation == rule.generation) {
                    f(shard, rule, st)?;
                }
            }
        }
        Ok(())
    }

    /// Every open window and partial match of every rule (`system.rule_state`).
    pub fn state_rows(&self) -> Result<Vec<crate::inspect::StateRow>> {
        let mut out = Vec::new();
        self.each_state(|shard, rule, st| {
            {
                match &st.op {
                    OpState::Stateless => {}
                    OpState::Window(w) => {
                        for ow in w.open_windows().map_err(|e| eval(rule, e))? {
                            out.push(crate::inspect::StateRow {
                                rule: rule.plan.name.clone(),
                                shard,
                                kind: "window",
                                device_id: ow.device.to_string(),
                                detail: ow.key,
                                start: ow.start,
                                end: Some(ow.end),
                            });
                        }
                    }
                    OpState::Join(j) => {
                        for (device, side, t) in j.buffered() {
                            out.push(crate::inspect::StateRow {
                                rule: rule.plan.name.clone(),
                                shard,
                                kind: "join_buffer",
                                device_id: device.to_string(),
                                detail: side.to_owned(),
                                start: t,
                                end: None,
                            });
                        }
                    }
                    OpState::Pattern(p) => {
                        let steps = match &rule.plan.operator {
                            OperatorPlan::Pattern(pp) => pp.steps.len(),
                            _ => 0,
                        };
                        for (device, step, start) in p.partials() {
                            out.push(crate::inspect::StateRow {
                                rule: rule.plan.name.clone(),
                                shard,
                                kind: "partial_match",
                                device_id: device.to_string(),
                                detail: format!("at step {} of {steps}", step + 1),
                                start,
                                end: None,
                            });
                        }
                    }
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Every device's clock per stateful rule (`system.watermarks`).
    pub fn watermark_rows(&self) -> Vec<crate::inspect::WatermarkRow> {
        let mut out = Vec::new();
        let _ = self.each_state(|shard, rule, st| {
            if matches!(st.op, OpState::Stateless) {
                return Ok(());
            }
            for (device, c) in st.devices.iter().filter(|(_, c)| c.max_time != i64::MIN) {
                out.push(crate::inspect::WatermarkRow {
                    rule: rule.plan.name.clone(),
                    shard,
                    device_id: device.to_string(),
                    newest_event: c.max_time,
                    watermark: c.max_time.saturating_sub(rule.plan.time.max_delay),
                    last_seen: c.last_seen,
                });
            }
            Ok(())
        });
        out.sort_by(|a, b| (&a.rule, &a.device_id).cmp(&(&b.rule, &b.device_id)));
        out
    }
}

impl BatchObserver for RuleEngine {
    fn observe(&self, shard: usize, batches: &[StreamBatch]) -> Vec<StreamBatch> {
        self.process(shard, batches)
    }

    fn tick(&self, shard: usize) -> Vec<StreamBatch> {
        RuleEngine::tick(self, shard)
    }
}

/// The row `output last` holds for a key.
struct PendingRow {
    period: i64,
    row: RecordBatch,
    time: i64,
    device: Arc<str>,
}

/// Rows released by `output last`, ready to deliver.
struct Released {
    batch: RecordBatch,
    times: Vec<i64>,
    devices: Vec<Arc<str>>,
    keys: Vec<String>,
}

/// `output last every D`: passing rows replace their key's pending row; a pending row of an
/// earlier period is released. Returns which rows are held and what is released.
fn hold_last(
    state: &mut RuleState,
    out: &RecordBatch,
    times: &[i64],
    devices: &[Arc<str>],
    keys: &[String],
    passed: &[bool],
    every: std::time::Duration,
) -> Result<(Vec<bool>, Option<Released>)> {
    let every = i64::try_from(every.as_nanos()).unwrap_or(i64::MAX).max(1);
    let mut released = Vec::new();
    for i in (0..out.num_rows()).filter(|&i| passed[i]) {
        let period = times[i].div_euclid(every);
        let row = PendingRow { period, row: out.slice(i, 1), time: times[i], device: devices[i].clone() };
        if let Some(old) = state.pending.insert(keys[i].clone(), row)
            && old.period < period
        {
            released.push((keys[i].clone(), old));
        }
    }
    Ok((passed.to_vec(), collect_released(released)?))
}

/// Pending `output last` rows whose period has ended by their device's time.
fn release_due(
    state: &mut RuleState,
    every: std::time::Duration,
    time_of: &dyn Fn(&str) -> Option<i64>,
) -> Result<Option<Released>> {
    let every = i64::try_from(every.as_nanos()).unwrap_or(i64::MAX).max(1);
    let due: Vec<String> = state
        .pending
        .iter()
        .filter(|(_, p)| time_of(&p.device).is_some_and(|t| t == i64::MAX || t >= (p.period + 1).saturating_mul(every)))
        .map(|(k, _)| k.clone())
        .collect();
    let rows = due.into_iter().filter_map(|k| state.pending.remove(&k).map(|p| (k, p))).collect();
    collect_released(rows)
}

fn collect_released(mut rows: Vec<(String, PendingRow)>) -> Result<Option<Released>> {
    if rows.is_empty() {
        return Ok(None);
    }
    rows.sort_by(|a, b| (a.1.time, &a.0).cmp(&(b.1.time, &b.0)));
    let schema = rows[0].1.row.schema();
    let parts: Vec<&RecordBatch> = rows.iter().map(|(_, p)| &p.row).collect();
    let batch = arrow::compute::concat_batches(&schema, parts)?;
    Ok(Some(Released {
        batch,
        times: rows.iter().map(|(_, p)| p.time).collect(),
        devices: rows.iter().map(|(_, p)| p.device.clone()).collect(),
        keys: rows.into_iter().map(|(k, _)| k).collect(),
    }))
}

/// A shadow's derived rows as they are (`time`, `device_id`, the output columns), without
/// touching the catalog.
fn raw_output(
    stream: &StreamName,
    out: &RecordBatch,
    time: TimestampNanosecondArray,
    device: StringArray,
) -> Result<StreamBatch> {
    let mut fields = vec![
        arrow::datatypes::Field::new(TIME_COLUMN, ferrite_engine::time_field_type(), false),
        arrow::datatypes::Field::new(DEVICE_COLUMN, DataType::Utf8, false),
    ];
    let mut columns: Vec<ArrayRef> = vec![Arc::new(time.with_timezone("UTC")), Arc::new(device)];
    for (f, c) in out.schema().fields().iter().zip(out.columns()) {
        if f.name() == TIME_COLUMN || f.name() == DEVICE_COLUMN {
            continue;
        }
        fields.push(f.as_ref().clone());
        columns.push(c.clone());
    }
    let batch = RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns)?;
    Ok(StreamBatch::new(stream.clone(), batch))
}

/// Whether the rule's state is shared by all shards (windows not keyed by device).
fn is_global(rule: &LiveRule) -> bool {
    matches!(&rule.plan.operator, OperatorPlan::Window(w) if !w.per_device)
}

/// The rule's state in `map`, created (or recreated for a new generation) when needed.
fn state_in<'a>(map: &'a mut HashMap<String, RuleState>, rule: &LiveRule) -> Result<&'a mut RuleState> {
    let key = rule.state_key();
    let fresh = map.get(&key).is_none_or(|s| s.generation != rule.generation);
    if fresh {
        map.insert(key.clone(), new_state(rule)?);
    }
    map.get_mut(&key).ok_or_else(|| Error::Input("rule state vanished".into()))
}

/// The device a window's derived row is written for: its device for per-device windows;
/// for windows across devices, the rule's name (no single device produced it).
fn emitted_devices(rule: &LiveRule, emitted: &[crate::window::Emitted]) -> Vec<Arc<str>> {
    if is_global(rule) {
        let name: Arc<str> = Arc::from(rule.plan.name.as_str());
        emitted.iter().map(|_| name.clone()).collect()
    } else {
        emitted.iter().map(|e| e.device.clone()).collect()
    }
}

/// Parses and compiles a rule file.
pub fn compile_text(text: &str, schemas: &dyn SchemaSource) -> Result<Vec<CompiledRule>> {
    compile_text_in(text, schemas, None)
}

/// Parses and compiles a rule file whose relative `table` paths start from `base`.
pub fn compile_text_in(
    text: &str,
    schemas: &dyn SchemaSource,
    base: Option<&std::path::Path>,
) -> Result<Vec<CompiledRule>> {
    compile_text_sandboxed(text, schemas, base, None)
}

/// Like [`compile_text_in`], refusing what `sandbox` does not allow.
pub fn compile_text_sandboxed(
    text: &str,
    schemas: &dyn SchemaSource,
    base: Option<&std::path::Path>,
    sandbox: Option<&crate::sandbox::Sandbox>,
) -> Result<Vec<CompiledRule>> {
    let mut file = crate::syntax::parse(text).map_err(Error::Invalid)?;
    file.base = base.map(std::path::Path::to_owned);
    file.sandbox = sandbox.cloned();
    crate::plan::compile(&file, text, schemas).map_err(Error::Invalid)
}

fn new_state(rule: &LiveRule) -> Result<RuleState> {
    let op = match &rule.plan.operator {
        OperatorPlan::Stateless => OpState::Stateless,
        OperatorPlan::Window(w) => {
            let schema = &rule.plan.row_schema;
            let key_types = w
                .keys
                .iter()
                .map(|k| k.data_type(schema))
                .collect::<datafusion::error::Result<Vec<_>>>()
                .map_err(|e| eval(rule, e))?;
            OpState::Window(Box::new(WindowState::new(w.clone(), key_types, schema)?))
        }
        OperatorPlan::Pattern(p) => OpState::Pattern(PatternState::new(p.clone(), rule.plan.state_limit)),
        OperatorPlan::Join(j) => OpState::Join(JoinState::new(j.clone())),
    };
    Ok(RuleState {
        generation: rule.generation,
        devices: hashbrown::HashMap::default(),
        epoch: 0,
        stream: DeviceClock { max_time: i64::MIN, last_seen: 0, epoch: 0 },
        op,
        raised: HashSet::new(),
        rate: HashMap::new(),
        pending: HashMap::new(),
    })
}

fn state_size(s: &RuleState) -> usize {
    match &s.op {
        OpState::Stateless => 0,
        OpState::Window(w) => w.size(),
        OpState::Pattern(p) => p.size(),
        OpState::Join(j) => j.size(),
    }
}

fn eval(rule: &LiveRule, source: datafusion::error::DataFusionError) -> Error {
    Error::Eval { rule: rule.plan.name.clone(), source }
}

/// A filter mask without nulls (null counts as false).
fn prep(b: &BooleanArray) -> BooleanArray {
    if b.null_count() == 0 {
        BooleanArray::new(b.values().clone(), None)
    } else {
        arrow::compute::prep_null_mask_filter(b)
    }
}

fn apply(rule: &LiveRule, op: &PostOp, batch: &RecordBatch) -> Result<RecordBatch> {
    let n = batch.num_rows();
    match op {
        PostOp::Filter(f) => {
            let m = f.evaluate(batch).map_err(|e| eval(rule, e))?.into_array(n).map_err(|e| eval(rule, e))?;
            Ok(filter_record_batch(batch, &prep(m.as_boolean()))?)
        }
        PostOp::Project(exprs, schema) => {
            let columns = exprs
                .iter()
                .zip(schema.fields())
                .map(|(e, f)| {
                    let a = e.evaluate(batch)?.into_array(n)?;
                    if a.data_type() != f.data_type() { Ok(cast(&a, f.data_type())?) } else { Ok(a) }
                })
                .collect::<datafusion::error::Result<Vec<_>>>()
                .map_err(|e| eval(rule, e))?;
            let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(n));
            Ok(RecordBatch::try_new_with_options(schema.clone(), columns, &options)?)
        }
    }
}

/// Returns `batch` with exactly the columns of `schema`, matched by name: columns the batch
/// lacks (older batches) become nulls, extra columns (newer fields) are dropped.
pub(crate) fn align(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    let n = batch.num_rows();
    let columns = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => cast(c, f.data_type()),
            None => Ok(new_null_array(f.data_type(), n)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(n));
    Ok(RecordBatch::try_new_with_options(schema.clone(), columns, &options)?)
}

fn time_column(batch: &RecordBatch) -> Result<TimestampNanosecondArray> {
    let col = batch.column_by_name(TIME_COLUMN).ok_or_else(|| Error::Input("batch without a time column".into()))?;
    let col = cast(col, &DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())))?;
    Ok(col.as_primitive::<arrow::datatypes::TimestampNanosecondType>().clone())
}
