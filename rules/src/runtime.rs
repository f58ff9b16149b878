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
//!
//! This file holds the types and the engine's constructor; each job has a module:
//! `registry` (deploy, replace, remove, describe), `lookups` (joined tables), `shadows`
//! (shadow deployments), `execution` (a batch through the rules of its stream), `time`
//! (windows and absences closed by the clock), `emit` (outputs, alerts, late rows,
//! actions, output rates), `inspection` (state as rows for SQL). `state` and `ops` are
//! leaves they share; no module reaches back into another's internals.

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

mod checkpoint;
mod emit;
mod execution;
mod inspection;
mod lookups;
mod ops;
mod registry;
mod shadows;
mod state;
mod time;

use emit::PendingRow;

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
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
    #[schema(value_type = Vec<Object>)]
    pub only_live: Vec<serde_json::Value>,
    /// Rows only the shadow emitted (up to 100).
    #[schema(value_type = Vec<Object>)]
    pub only_shadow: Vec<serde_json::Value>,
    /// Distinct differing rows in all.
    pub differing: usize,
    /// Differing rows not tracked (the comparison keeps 10,000).
    pub untracked: u64,
}

/// What `GET /api/v1/rules/{name}` shows.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
    /// The catalog's widening count the rules are planned for.
    widenings_seen: AtomicU64,
    /// One re-planning at a time.
    replanning: Mutex<()>,
    /// Set while recovery replays entries the rules saw before a crash: their actions
    /// (publishes, commands, webhooks) are not sent again.
    replaying: AtomicBool,
}

impl std::fmt::Debug for RuleEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleEngine").field("rules", &self.rules.read().len()).finish()
    }
}

/// Schemas come from one tenant's streams in the catalog.
struct CatalogSchemas<'a> {
    catalog: &'a StreamCatalog,
    tenant: &'a str,
}

impl SchemaSource for CatalogSchemas<'_> {
    fn schema(&self, stream: &str) -> Option<SchemaRef> {
        self.catalog.get_in(self.tenant, stream).map(|s| s.arrow.clone())
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
        let catalog_widenings = catalog.widenings();
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
            widenings_seen: AtomicU64::new(catalog_widenings),
            replanning: Mutex::new(()),
            replaying: AtomicBool::new(false),
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

    /// Deployed rules.
    pub fn rules(&self) -> Arc<Vec<Arc<LiveRule>>> {
        self.rules.read().clone()
    }
}

impl BatchObserver for RuleEngine {
    fn observe(&self, shard: usize, batches: &[StreamBatch]) -> Vec<StreamBatch> {
        self.process(shard, batches)
    }

    fn tick(&self, shard: usize) -> Vec<StreamBatch> {
        RuleEngine::tick(self, shard)
    }

    fn checkpoint_name(&self) -> Option<&'static str> {
        Some("rules")
    }

    fn snapshot(&self, shard: Option<usize>) -> std::result::Result<Vec<u8>, String> {
        RuleEngine::snapshot(self, shard).map_err(|e| e.to_string())
    }

    fn restore(&self, shard: Option<usize>, state: &[u8]) -> std::result::Result<(), String> {
        let restored = RuleEngine::restore(self, shard, state).map_err(|e| e.to_string())?;
        if restored > 0 {
            tracing::info!(rules = restored, shard = ?shard, "rule state restored from the last checkpoint");
        }
        Ok(())
    }

    fn set_replaying(&self, on: bool) {
        self.replaying.store(on, Ordering::Relaxed);
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
