//! The planner: turns a parsed rule into physical operators. Every SQL piece of a rule is
//! planned by DataFusion, so rules and SQL share one function library and one set of
//! type-coercion rules:
//!
//! - a stream rule is planned as `SELECT {select} FROM input WHERE {filter}`;
//! - a window rule as `SELECT {select} FROM input WHERE {filter}
//!   GROUP BY {keys}, window_start, window_end HAVING {having}`, whose aggregate calls
//!   become DataFusion accumulators kept per key and window;
//! - a pattern as `SELECT {select} FROM a CROSS JOIN b ...` over one table per step, and
//!   each step's condition as an expression over the step's stream (unqualified columns)
//!   and the earlier steps (`a.temperature`).
//!
//! The planned logical tree is then lowered by hand: the nodes above the aggregate (or the
//! scan, or the join) become [`PostOp`]s applied to the operator's output batches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::ExprSchemable;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, LogicalPlan, Operator};
use datafusion::physical_expr::aggregate::{AggregateFunctionExpr, LoweredAggregateBuilder};
use datafusion::physical_plan::PhysicalExpr;
use datafusion::prelude::SessionContext;
use ferrite_engine::{DEVICE_COLUMN, TIME_COLUMN, time_field_type};

use crate::ast::{self, ActionDef, Emit, RuleDef, Source, Span, Spanned, StepDef, WindowKind};
use crate::error::Diagnostic;
use crate::scalar::ScalarExpr;

/// Name of the window-start column a window rule may select.
pub const WINDOW_START: &str = "window_start";
/// Name of the window-end column a window rule may select.
pub const WINDOW_END: &str = "window_end";

/// Default bounded out-of-orderness of a stream (`max_delay`).
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(0);
/// Default partial matches and open windows a rule keeps per shard (`limit state`).
pub const DEFAULT_STATE_LIMIT: usize = 1_000_000;

/// Event-time settings of a rule's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeSettings {
    /// Bounded out-of-orderness, nanoseconds.
    pub max_delay: i64,
    /// Allowed lateness after the watermark, nanoseconds.
    pub lateness: i64,
    /// Use arrival time instead of event time.
    pub processing_time: bool,
}

/// A step applied to a batch after (or before) the stateful operator.
#[derive(Debug, Clone)]
pub enum PostOp {
    /// Keep the rows where the predicate is true.
    Filter(Arc<dyn PhysicalExpr>),
    /// Compute these columns.
    Project(Vec<Arc<dyn PhysicalExpr>>, SchemaRef),
}

/// One aggregate call of a window rule.
#[derive(Debug, Clone)]
pub struct AggregatePlan {
    /// The DataFusion aggregate (creates the accumulators).
    pub function: Arc<AggregateFunctionExpr>,
    /// Its arguments, over the input.
    pub args: Vec<Arc<dyn PhysicalExpr>>,
    /// `FILTER (WHERE ...)`, over the input.
    pub filter: Option<Arc<dyn PhysicalExpr>>,
}

/// The stateful part of a window rule.
#[derive(Debug, Clone)]
pub struct WindowPlan {
    /// The kind of window.
    pub kind: WindowKind,
    /// When it emits.
    pub emit: Emit,
    /// Key expressions over the input.
    pub keys: Vec<Arc<dyn PhysicalExpr>>,
    /// Aggregates.
    pub aggregates: Vec<AggregatePlan>,
    /// Schema of the operator's output: keys, window_start, window_end, aggregates.
    pub output: SchemaRef,
    /// Whether the keys include `device_id`: then each window lives on its device's shard
    /// and closes on its device's watermark. Otherwise the rule's state is shared by all
    /// shards and windows close on the stream's watermark.
    pub per_device: bool,
}

/// A step of a planned pattern.
#[derive(Debug, Clone)]
pub struct StepPlan {
    /// Its alias (absent steps: `None`).
    pub alias: Option<String>,
    /// Its stream.
    pub stream: String,
    /// Conjuncts over the step's own event only: evaluated on whole batches.
    pub local: Option<Arc<dyn PhysicalExpr>>,
    /// Conjuncts that read earlier steps: evaluated per candidate and partial match, over
    /// the event's columns followed by every earlier step's captured columns.
    pub cross: Option<Arc<dyn PhysicalExpr>>,
    /// Schema `cross` is evaluated against.
    pub cross_schema: SchemaRef,
    /// `cross` compiled for one-row evaluation, when it is simple enough (most are).
    pub cross_scalar: Option<Arc<ScalarExpr>>,
    /// For each column of `cross_schema` after the step's own: (earlier step, its column).
    pub captured_columns: Vec<(usize, usize)>,
    /// For each column of `cross_schema` after the step's own: its slot in the typed
    /// values a partial match keeps (`PatternPlan::refs`), if `cross_scalar` reads it.
    pub ref_slots: Vec<Option<usize>>,
    /// Columns of the step's stream (the width of its captured events).
    pub width: usize,
    /// Least and most events (`{min,max}`).
    pub min: u32,
    /// Most events (`None`: unbounded).
    pub max: Option<u32>,
    /// `not ... for D`: how long the absence must last (nanoseconds), if this is one.
    pub absent_for: Option<i64>,
    /// Its place in a logical group `(a and|or b)`.
    pub group: Option<ast::Group>,
}

/// The stateful part of a pattern rule.
#[derive(Debug, Clone)]
pub struct PatternPlan {
    /// Start a match at every first-step event.
    pub every: bool,
    /// `,` sequences: no other event of the key between steps.
    pub strict: bool,
    /// `within`, nanoseconds.
    pub within: Option<i64>,
    /// The steps.
    pub steps: Vec<StepPlan>,
    /// Schema of a match: every aliased step's columns in order, as the select sees them.
    pub match_schema: SchemaRef,
    /// Captured columns (step, column) that cross conditions read: a partial match keeps
    /// their values typed and inline, so testing it touches no other memory.
    pub refs: Vec<(usize, usize)>,
}

/// The stateful part of a join of two streams.
#[derive(Debug, Clone)]
pub struct StreamJoinPlan {
    /// The left side's stream.
    pub left_stream: String,
    /// The right side's stream.
    pub right_stream: String,
    /// The left side's `[filter]`, over its stream.
    pub left_filter: Option<Arc<dyn PhysicalExpr>>,
    /// The condition, compiled for one pair (when simple enough).
    pub cond_scalar: Option<Arc<ScalarExpr>>,
    /// The condition for DataFusion, over one row of the left then the right columns.
    pub cond: Option<Arc<dyn PhysicalExpr>>,
    /// Schema `cond` is evaluated against.
    pub cond_schema: SchemaRef,
    /// Columns of the left stream.
    pub left_width: usize,
    /// How far apart joined events may be, nanoseconds.
    pub within: i64,
    /// Schema of a pair as the select list sees it.
    pub match_schema: SchemaRef,
}

impl CompiledRule {
    /// Moves a rule compiled against `tenant`'s streams into that tenant: its name and every
    /// stream it reads or writes become keys of the tenant (`tenant/name`), so that it sees
    /// only the tenant's batches and writes only the tenant's streams.
    pub fn in_tenant(mut self, tenant: &str) -> Result<Self, ferrite_engine::Error> {
        if tenant == ferrite_engine::ids::DEFAULT_TENANT {
            return Ok(self);
        }
        let key = |s: &str| ferrite_engine::StreamName::in_tenant(tenant, s).map(|n| n.as_str().to_owned());
        ferrite_engine::validate_tenant(tenant)?;
        self.name = format!("{tenant}/{}", self.name);
        self.inputs = self.inputs.iter().map(|s| key(s)).collect::<Result<_, _>>()?;
        self.insert_into = self.insert_into.as_deref().map(key).transpose()?;
        if let Some(j) = &mut self.join
            && matches!(j.source, JoinSource::Stream)
        {
            j.stream = key(&j.table)?;
        }
        match &mut self.operator {
            OperatorPlan::Pattern(p) => {
                for step in &mut p.steps {
                    step.stream = key(&step.stream)?;
                }
            }
            OperatorPlan::Join(j) => {
                j.left_stream = key(&j.left_stream)?;
                j.right_stream = key(&j.right_stream)?;
            }
            OperatorPlan::Stateless | OperatorPlan::Window(_) => {}
        }
        Ok(self)
    }

    /// The tenant the rule runs in.
    pub fn tenant(&self) -> &str {
        self.name.split_once('/').map_or(ferrite_engine::ids::DEFAULT_TENANT, |(t, _)| t)
    }

    /// The rule's name inside its tenant.
    pub fn local_name(&self) -> &str {
        self.name.split_once('/').map_or(&self.name, |(_, n)| n)
    }
}

impl StreamJoinPlan {
    /// Whether the condition holds for a pair.
    pub fn holds(&self, left: &[ScalarValue], right: &[ScalarValue]) -> datafusion::error::Result<bool> {
        let w = self.left_width;
        if let Some(fast) = &self.cond_scalar {
            let get = |k: usize| {
                let v = if k < w { left.get(k) } else { right.get(k - w) };
                v.and_then(crate::scalar::from_scalar).unwrap_or(crate::scalar::Value::Null)
            };
            return Ok(fast.holds(&[], 0, &get));
        }
        let Some(cond) = &self.cond else { return Ok(true) };
        let columns =
            left.iter().chain(right).map(ScalarValue::to_array).collect::<datafusion::error::Result<Vec<_>>>()?;
        let one = arrow::array::RecordBatch::try_new(self.cond_schema.clone(), columns)?;
        let v = cond.evaluate(&one)?.into_array(1)?;
        let b = v.as_any().downcast_ref::<arrow::array::BooleanArray>();
        Ok(b.is_some_and(|b| arrow::array::Array::is_valid(b, 0) && b.value(0)))
    }
}

/// The operator a rule runs on its input.
#[derive(Debug, Clone)]
pub enum OperatorPlan {
    /// Filters and projections only.
    Stateless,
    /// Windows and aggregates.
    Window(WindowPlan),
    /// A pattern over one or more streams.
    Pattern(PatternPlan),
    /// A join of two streams within a time bound.
    Join(StreamJoinPlan),
}

/// An action with its templates checked against the output schema.
#[derive(Debug, Clone)]
pub enum ActionPlan {
    /// Append to the `alerts` stream (raised, and cleared when a keyed condition stops
    /// holding).
    Alert {
        /// Severity.
        severity: String,
        /// Message template.
        message: String,
    },
    /// Publish on an MQTT topic.
    Publish {
        /// Topic template.
        topic: String,
        /// JSON template (`None`: the row).
        template: Option<serde_json::Value>,
    },
    /// Send a command to a device.
    Command {
        /// Output column naming the device.
        device_column: String,
        /// Command name.
        name: String,
        /// Parameters template.
        params: Option<serde_json::Value>,
    },
    /// POST to a URL.
    Webhook {
        /// URL template.
        url: String,
        /// JSON template (`None`: the row).
        template: Option<serde_json::Value>,
    },
}

/// A rule ready to run.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    /// The rule's name.
    pub name: String,
    /// The rule's source text.
    pub text: String,
    /// The streams it reads, first the main one.
    pub inputs: Vec<String>,
    /// The schema each input was planned against (aligned by name at run time).
    pub input_schemas: Vec<SchemaRef>,
    /// The schema of the main input's rows as the operator sees them (with a join: the
    /// stream's columns, then the table's as `T.column`).
    pub row_schema: SchemaRef,
    /// `join T on T.key = column`.
    pub join: Option<JoinPlan>,
    /// Event-time settings of the main input.
    pub time: TimeSettings,
    /// Applied to input batches before the operator (the stream filter).
    pub pre: Vec<PostOp>,
    /// The stateful operator.
    pub operator: OperatorPlan,
    /// `having`, over the operator's output (before the projection).
    pub having: Option<Arc<dyn PhysicalExpr>>,
    /// Applied to the operator's output: the select list.
    pub post: Vec<PostOp>,
    /// What the rule emits.
    pub output: SchemaRef,
    /// Derived stream it inserts into.
    pub insert_into: Option<String>,
    /// Actions.
    pub actions: Vec<ActionPlan>,
    /// Output rate limiting.
    pub output_rate: Option<ast::OutputRate>,
    /// Most open windows or partial matches per shard.
    pub state_limit: usize,
    /// The file it was compiled from, to compile it again when an input's field widens
    /// (`None` until a rule engine compiled it).
    pub source: Option<Arc<RuleSource>>,
}

/// The text a rule was compiled from, and where.
#[derive(Debug, Clone)]
pub struct RuleSource {
    /// The tenant it was deployed in.
    pub tenant: String,
    /// The whole rule file (stream declarations and tables included).
    pub text: String,
    /// The directory its relative table paths start from.
    pub base: Option<std::path::PathBuf>,
}

/// Where a joined table's rows come from.
#[derive(Debug, Clone)]
pub enum JoinSource {
    /// A file read when the rule was compiled.
    Static(Arc<Vec<arrow::array::RecordBatch>>),
    /// A stream read as a table: the latest row per key.
    Stream,
}

/// A planned `join T on T.key = column`.
#[derive(Debug, Clone)]
pub struct JoinPlan {
    /// The table's name (a `table` declaration or a stream), as the rule writes it: its
    /// columns are `table.column`.
    pub table: String,
    /// The stream's key (`tenant/name` outside the default tenant) when the table is a
    /// stream; what its rows are matched and loaded by.
    pub stream: String,
    /// Its rows.
    pub source: JoinSource,
    /// Its columns.
    pub table_schema: SchemaRef,
    /// Its key column.
    pub table_key: String,
    /// The stream column matched against the key.
    pub input_key: String,
}

fn plan_join(
    c: &Ctx<'_>,
    file: &ast::RuleFile,
    j: &ast::JoinClause,
    stream: &SchemaRef,
    schemas: &dyn SchemaSource,
) -> Result<JoinPlan, Diagnostic> {
    let table = j.table.value.clone();
    let (table_schema, source) = match file.tables.iter().find(|t| t.name.value == table) {
        Some(decl) => {
            let path = std::path::Path::new(&decl.path.value);
            let path = match &file.base {
                Some(base) if path.is_relative() => base.join(path),
                _ => path.to_owned(),
            };
            if let Some(sandbox) = &file.sandbox {
                sandbox.check_table(&path).map_err(|e| Diagnostic::new(decl.path.span, e))?;
            }
            let (schema, batches) = crate::lookup::read_file(&path).map_err(|e| {
                Diagnostic::new(decl.path.span, format!("cannot read table `{table}`: {e}"))
                    .with_hint("a CSV file with a header row, or a .parquet file; a relative path starts from the rule file's directory")
            })?;
            (schema, JoinSource::Static(Arc::new(batches)))
        }
        None => match schemas.schema(&table) {
            Some(s) => (s, JoinSource::Stream),
            None => {
                return Err(Diagnostic::new(j.table.span, format!("unknown table `{table}`"))
                    .with_hint("declare it with `table NAME from 'file.csv'`, or name a stream (read as a table: its latest row per key)")
                    .with_code("unknown-stream"));
            }
        },
    };
    let enriched = crate::lookup::enriched_schema(stream, &table, &table_schema);
    let df =
        DFSchema::try_from(enriched.as_ref().clone()).map_err(|e| df_error(j.on.span, "invalid join", &e, None))?;
    let on = c
        .expr(&quote_step_refs(&j.on.value, &[table.as_str()]), &df)
        .map_err(|e| df_error(j.on.span, "invalid join condition", &e, Some(&enriched)))?;
    let prefix = format!("{table}.");
    let keys = match &on {
        Expr::BinaryExpr(BinaryExpr { left, op: Operator::Eq, right }) => match (left.as_ref(), right.as_ref()) {
            (Expr::Column(a), Expr::Column(b)) if a.name.starts_with(&prefix) != b.name.starts_with(&prefix) => {
                let (t, i) = if a.name.starts_with(&prefix) { (a, b) } else { (b, a) };
                Some((t.name[prefix.len()..].to_owned(), i.name.clone()))
            }
            _ => None,
        },
        _ => None,
    };
    let Some((table_key, input_key)) = keys else {
        return Err(Diagnostic::new(
            j.on.span,
            "a join condition is one equality between a table column and a stream column",
        )
        .with_hint(format!("e.g. `join {table} on {table}.device_id = device_id`")));
    };
    let stream = table.clone();
    Ok(JoinPlan { table, stream, source, table_schema, table_key, input_key })
}

/// Looks up the schema of a stream (the catalog, or streams learned from test input).
pub trait SchemaSource {
    /// The Arrow schema of `stream`, if it is known.
    fn schema(&self, stream: &str) -> Option<SchemaRef>;
}

impl<F: Fn(&str) -> Option<SchemaRef>> SchemaSource for F {
    fn schema(&self, stream: &str) -> Option<SchemaRef> {
        self(stream)
    }
}

/// Plans every rule of a parsed file. Returns all the problems found.
pub fn compile(
    file: &ast::RuleFile,
    source: &str,
    schemas: &dyn SchemaSource,
) -> Result<Vec<CompiledRule>, Vec<Diagnostic>> {
    let mut out: Vec<CompiledRule> = Vec::new();
    let mut errors = Vec::new();
    // Streams the file's rules insert into are readable by the rules after them (and, as
    // rules are compiled in two rounds, before them), with the schema they will have.
    let mut derived: HashMap<String, SchemaRef> = HashMap::new();
    for round in 0..2 {
        out.clear();
        errors.clear();
        let mut next = derived.clone();
        {
            let overlay = |s: &str| derived.get(s).cloned().or_else(|| schemas.schema(s));
            for rule in &file.rules {
                match compile_rule(file, rule, source, &overlay) {
                    Ok(r) => {
                        if let Some(target) = &r.insert_into {
                            let existing = next.get(target).cloned().or_else(|| schemas.schema(target));
                            next.insert(target.clone(), crate::output::derived_schema(existing, &r.output));
                        }
                        out.push(r);
                    }
                    Err(d) => errors.push(d),
                }
            }
        }
        let grew = next.len() > derived.len();
        derived = next;
        if errors.is_empty() || !grew || round == 1 {
            break;
        }
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

fn time_settings(file: &ast::RuleFile, stream: &str) -> TimeSettings {
    let decl = file.streams.iter().find(|s| s.name.value == stream);
    let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    TimeSettings {
        max_delay: nanos(decl.and_then(|d| d.max_delay).unwrap_or(DEFAULT_MAX_DELAY)),
        lateness: nanos(decl.and_then(|d| d.lateness).unwrap_or(Duration::ZERO)),
        processing_time: decl.is_some_and(|d| d.processing_time),
    }
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

struct Ctx<'a> {
    ctx: SessionContext,
    rule: &'a RuleDef,
}

impl Ctx<'_> {
    fn register(&self, name: &str, schema: &SchemaRef) -> datafusion::error::Result<()> {
        let table = MemTable::try_new(schema.clone(), vec![vec![]])?;
        self.ctx.register_table(name, Arc::new(table))?;
        Ok(())
    }

    fn plan_sql(&self, sql: &str) -> datafusion::error::Result<LogicalPlan> {
        let state = self.ctx.state();
        let plan = futures::executor::block_on(state.create_logical_plan(sql))?;
        state.analyzer().execute_and_check(plan, state.config_options(), |_, _| {})
    }

    fn expr(&self, sql: &str, schema: &DFSchema) -> datafusion::error::Result<Expr> {
        self.ctx.parse_sql_expr(sql, schema)
    }

    fn physical(&self, expr: &Expr, schema: &DFSchema) -> datafusion::error::Result<Arc<dyn PhysicalExpr>> {
        self.ctx.state().create_physical_expr(expr.clone(), schema)
    }
}

fn df_error(span: Span, what: &str, e: &datafusion::error::DataFusionError, schema: Option<&Schema>) -> Diagnostic {
    let msg = e.strip_backtrace();
    let msg = msg.lines().next().unwrap_or_default().to_owned();
    let d = Diagnostic::new(span, format!("{what}: {msg}"));
    match schema {
        Some(s) if msg.contains("No field named") || msg.contains("not found") => {
            let cols: Vec<&str> = s.fields().iter().map(|f| f.name().as_str()).collect();
            d.with_hint(format!("the stream's columns are: {}", cols.join(", ")))
        }
        _ => d,
    }
}

fn stream_schema(schemas: &dyn SchemaSource, name: &Spanned<String>) -> Result<SchemaRef, Diagnostic> {
    if name.value == "alerts" || name.value.ends_with("_late") {
        // Built-in derived streams are readable even before anything was written to them.
        if let Some(s) = schemas.schema(&name.value) {
            return Ok(s);
        }
        if name.value == "alerts" {
            return Ok(crate::output::alerts_schema());
        }
    }
    schemas.schema(&name.value).ok_or_else(|| {
        Diagnostic::new(name.span, format!("unknown stream `{}`", name.value))
            .with_hint("a stream exists once an event was written to it; check the name, or send one event first")
            .with_code("unknown-stream")
    })
}

fn compile_rule(
    file: &ast::RuleFile,
    rule: &RuleDef,
    source: &str,
    schemas: &dyn SchemaSource,
) -> Result<CompiledRule, Diagnostic> {
    if let (Some(j), Source::Pattern(_)) = (&rule.join, &rule.from)
        && j.alias.is_none()
    {
        return Err(Diagnostic::new(j.table.span, "a pattern cannot join a table (yet)")
            .with_hint("join in a rule that reads the stream and inserts the enriched rows into a derived stream, then match the pattern on that"));
    }
    let c = Ctx { ctx: SessionContext::new(), rule };
    let text = source.get(rule.span.start..rule.span.end).unwrap_or_default().to_owned();
    let mut compiled = match (&rule.from, &rule.join) {
        (_, Some(j)) if j.alias.is_some() => compile_stream_join(&c, file, j, schemas)?,
        (Source::Stream(input), _) => compile_stream(&c, file, input, schemas)?,
        (Source::Pattern(p), _) => compile_pattern(&c, file, p, schemas)?,
    };
    compiled.text = text;
    compiled.insert_into = rule.insert_into.as_ref().map(|s| s.value.clone());
    if let Some(target) = &rule.insert_into {
        if let Err(e) = ferrite_engine::StreamName::new(&target.value) {
            return Err(Diagnostic::new(target.span, e.to_string()));
        }
        if compiled.inputs.contains(&target.value) {
            return Err(Diagnostic::new(
                target.span,
                format!("rule `{}` inserts into its own input `{}`", rule.name.value, target.value),
            )
            .with_hint("a rule reading its own output would loop; insert into another stream"));
        }
    }
    compiled.actions = rule.actions.iter().map(|a| plan_action(a, &compiled.output)).collect::<Result<_, _>>()?;
    if let Some(sandbox) = &file.sandbox {
        for a in &rule.actions {
            if let ActionDef::Webhook { url, .. } = a {
                sandbox.check_webhook(&url.value).map_err(|e| Diagnostic::new(url.span, e))?;
            }
        }
    }
    compiled.output_rate = rule.output_rate;
    compiled.state_limit = rule.state_limit.unwrap_or(DEFAULT_STATE_LIMIT);
    Ok(compiled)
}

fn check_placeholders(template: &Spanned<String>, schema: &Schema) -> Result<(), Diagnostic> {
    for name in crate::output::placeholders(&template.value) {
        if schema.field_with_name(name).is_err() && name != "rule" && name != "severity" {
            let cols: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(Diagnostic::new(template.span, format!("placeholder `{{{name}}}` names no output column"))
                .with_hint(format!("the rule's output columns are: {}", cols.join(", "))));
        }
    }
    Ok(())
}

fn json_template(t: &Option<Spanned<String>>, schema: &Schema) -> Result<Option<serde_json::Value>, Diagnostic> {
    let Some(t) = t else { return Ok(None) };
    check_placeholders(t, schema)?;
    serde_json::from_str(&t.value).map(Some).map_err(|e| Diagnostic::new(t.span, format!("invalid JSON template: {e}")))
}

fn plan_action(a: &ActionDef, schema: &Schema) -> Result<ActionPlan, Diagnostic> {
    Ok(match a {
        ActionDef::Alert { severity, message } => {
            check_placeholders(message, schema)?;
            ActionPlan::Alert { severity: severity.value.clone(), message: message.value.clone() }
        }
        ActionDef::Publish { topic, template } => {
            check_placeholders(topic, schema)?;
            ActionPlan::Publish { topic: topic.value.clone(), template: json_template(template, schema)? }
        }
        ActionDef::Command { device, name, params } => {
            // `a.device_id` in the action means the output column `device_id`.
            let column = device.value.rsplit('.').next().unwrap_or(&device.value).to_owned();
            if schema.field_with_name(&column).is_err() {
                return Err(Diagnostic::new(device.span, format!("`{}` is not an output column", device.value))
                    .with_hint("select the device id column, e.g. `select a.device_id, ...`"));
            }
            ActionPlan::Command {
                device_column: column,
                name: name.value.clone(),
                params: json_template(params, schema)?,
            }
        }
        ActionDef::Webhook { url, template } => {
            check_placeholders(url, schema)?;
            ActionPlan::Webhook { url: url.value.clone(), template: json_template(template, schema)? }
        }
    })
}

/// Lowers the chain of projections and filters from `plan` down to the first node that is
/// not one; returns the ops in execution order and that node.
fn lower_chain<'p>(c: &Ctx<'_>, plan: &'p LogicalPlan) -> datafusion::error::Result<(Vec<PostOp>, &'p LogicalPlan)> {
    let mut ops = Vec::new();
    let mut node = plan;
    loop {
        match node {
            LogicalPlan::Projection(p) => {
                let input = p.input.schema();
                let exprs =
                    p.expr.iter().map(|e| c.physical(e, input)).collect::<datafusion::error::Result<Vec<_>>>()?;
                ops.push(PostOp::Project(exprs, Arc::new(p.schema.as_arrow().clone())));
                node = &p.input;
            }
            LogicalPlan::Filter(f) => {
                ops.push(PostOp::Filter(c.physical(&f.predicate, f.input.schema())?));
                node = &f.input;
            }
            LogicalPlan::SubqueryAlias(s) => node = &s.input,
            _ => break,
        }
    }
    ops.reverse();
    Ok((ops, node))
}

fn compile_stream(
    c: &Ctx<'_>,
    file: &ast::RuleFile,
    input: &ast::StreamRef,
    schemas: &dyn SchemaSource,
) -> Result<CompiledRule, Diagnostic> {
    let rule = c.rule;
    let plain = stream_schema(schemas, &input.stream)?;
    // With `join T on ...`, the rule sees the stream's columns and the table's as `T.column`.
    let join = rule.join.as_ref().map(|j| plan_join(c, file, j, &plain, schemas)).transpose()?;
    let schema = match &join {
        Some(j) => crate::lookup::enriched_schema(&plain, &j.table, &j.table_schema),
        None => plain.clone(),
    };
    let q = |text: &str| match &join {
        Some(j) => quote_step_refs(text, &[j.table.as_str()]),
        None => text.to_owned(),
    };
    let df_schema = DFSchema::try_from_qualified_schema("input", &schema)
        .map_err(|e| df_error(input.stream.span, "cannot use the stream", &e, None))?;
    // Plan the filter alone first: its errors then point at it.
    if let Some(f) = &input.filter {
        let e = c.expr(&q(&f.value), &df_schema).map_err(|e| df_error(f.span, "invalid filter", &e, Some(&schema)))?;
        let ty = e.get_type(&df_schema).map_err(|e| df_error(f.span, "invalid filter", &e, Some(&schema)))?;
        if ty != DataType::Boolean && ty != DataType::Null {
            return Err(Diagnostic::new(f.span, format!("a filter must be a condition, this is {ty}"))
                .with_hint("write a comparison, e.g. `[temperature > 30]`"));
        }
    }
    let select = q(rule.select.as_ref().map_or("*", |s| s.value.as_str()));
    let select_span = rule.select.as_ref().map_or(rule.name.span, |s| s.span);
    let filter = input.filter.as_ref().map(|f| format!(" WHERE {}", q(&f.value))).unwrap_or_default();
    let time = time_settings(file, &input.stream.value);
    let Some(window) = &rule.window else {
        c.register("input", &schema).map_err(|e| df_error(input.stream.span, "cannot use the stream", &e, None))?;
        let base_sql = format!("SELECT {select} FROM input{filter}");
        let plan =
            c.plan_sql(&base_sql).map_err(|e| df_error(select_span, "invalid select list", &e, Some(&schema)))?;
        if contains_aggregate(&plan) {
            return Err(Diagnostic::new(select_span, "aggregates need a window")
                .with_hint("add `window tumbling 1m by device_id` (or another window) to aggregate"));
        }
        let (ops, base) = lower_chain(c, &plan).map_err(|e| df_error(select_span, "invalid select list", &e, None))?;
        expect_scan(base, select_span)?;
        let (pre, post) = split_pre(ops);
        let output = output_schema(&post, &schema);
        let having = match &rule.having {
            Some(h) => {
                let out_df = DFSchema::try_from(output.as_ref().clone())
                    .map_err(|e| df_error(h.span, "invalid having", &e, None))?;
                let e =
                    c.expr(&q(&h.value), &out_df).map_err(|e| df_error(h.span, "invalid having", &e, Some(&output)))?;
                Some(c.physical(&e, &out_df).map_err(|e| df_error(h.span, "invalid having", &e, Some(&output)))?)
            }
            None => None,
        };
        // Having over the projected output runs after the projection.
        let mut post = post;
        if let Some(h) = having {
            post.push(PostOp::Filter(h));
        }
        return Ok(CompiledRule {
            name: rule.name.value.clone(),
            text: String::new(),
            inputs: vec![input.stream.value.clone()],
            input_schemas: vec![plain],
            row_schema: schema,
            join,
            time,
            pre,
            operator: OperatorPlan::Stateless,
            having: None,
            post,
            output,
            insert_into: None,
            actions: Vec::new(),
            output_rate: None,
            state_limit: DEFAULT_STATE_LIMIT,
            source: None,
        });
    };

    // A window rule: the input table gets the window columns, filled in by the operator.
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(WINDOW_START, time_field_type(), false));
    fields.push(Field::new(WINDOW_END, time_field_type(), false));
    let with_window = Arc::new(Schema::new(fields));
    c.register("input", &with_window).map_err(|e| df_error(window.span, "cannot plan the window", &e, None))?;
    let wdf = DFSchema::try_from_qualified_schema("input", &with_window)
        .map_err(|e| df_error(window.span, "cannot plan the window", &e, None))?;
    for k in &window.by {
        c.expr(&q(&k.value), &wdf).map_err(|e| df_error(k.span, "invalid window key", &e, Some(&schema)))?;
    }
    let mut group: Vec<String> = window.by.iter().map(|k| q(&k.value)).collect();
    group.push(WINDOW_START.to_owned());
    group.push(WINDOW_END.to_owned());
    let having = rule.having.as_ref().map(|h| format!(" HAVING {}", q(&h.value))).unwrap_or_default();
    let sql = format!("SELECT {select} FROM input{filter} GROUP BY {}{having}", group.join(", "));
    let plan = c.plan_sql(&sql).map_err(|e| {
        let span = match &rule.having {
            Some(h) if e.to_string().to_lowercase().contains("having") => h.span,
            _ => select_span,
        };
        df_error(span, "invalid select list", &e, Some(&schema))
    })?;
    let (post_ops, node) = lower_chain(c, &plan).map_err(|e| df_error(select_span, "invalid select list", &e, None))?;
    let LogicalPlan::Aggregate(agg) = node else {
        return Err(Diagnostic::new(select_span, "a window rule's select list must aggregate").with_hint(
            "select aggregates such as avg(temperature) or count(*), or drop the window for a per-event rule",
        ));
    };
    let (pre, base) = lower_chain(c, &agg.input).map_err(|e| df_error(select_span, "invalid filter", &e, None))?;
    expect_scan(base, select_span)?;
    let in_df = agg.input.schema();
    let in_arrow = in_df.as_arrow();
    let keys = agg.group_expr[..agg.group_expr.len() - 2]
        .iter()
        .map(|e| c.physical(e, in_df))
        .collect::<datafusion::error::Result<Vec<_>>>()
        .map_err(|e| df_error(window.span, "invalid window key", &e, Some(&schema)))?;
    let props = c.ctx.state().execution_props().clone();
    let mut aggregates = Vec::new();
    for e in &agg.aggr_expr {
        let name = e.schema_name().to_string();
        let human = e.human_display().to_string();
        let planning = PhysicalPlanningContext::default();
        let lowered = LoweredAggregateBuilder::new(e, in_df, in_arrow, &props, &planning)
            .with_name(name)
            .with_human_display(human)
            .build()
            .map_err(|e| df_error(select_span, "invalid aggregate", &e, Some(&schema)))?;
        let (function, filter) = (lowered.aggregate, lowered.filter);
        if matches!(window.kind, WindowKind::Sliding { .. } | WindowKind::CountSliding { .. }) {
            let retracts = function.create_sliding_accumulator().map(|a| a.supports_retract_batch()).unwrap_or(false);
            if !retracts {
                return Err(Diagnostic::new(select_span, format!("`{}` cannot be used in a sliding window", function.name()))
                    .with_hint("a sliding window retracts the events that leave it; use a tumbling or hopping window for this aggregate"));
            }
        }
        let args = function.expressions();
        aggregates.push(AggregatePlan { function, args, filter });
    }
    // Having is the filter right above the aggregate, if any: split it off so that keys
    // that stop matching can clear their alerts.
    let (having, post) = match post_ops.split_first() {
        Some((PostOp::Filter(h), rest)) if rule.having.is_some() => (Some(h.clone()), rest.to_vec()),
        _ => (None, post_ops),
    };
    let agg_out = Arc::new(agg.schema.as_arrow().clone());
    let output = output_schema(&post, &agg_out);
    let emit = window.emit.unwrap_or(match window.kind {
        WindowKind::Sliding { .. } | WindowKind::CountSliding { .. } => Emit::OnUpdate,
        _ => Emit::OnClose,
    });
    if matches!(window.kind, WindowKind::Sliding { .. } | WindowKind::CountSliding { .. }) && emit == Emit::OnClose {
        return Err(Diagnostic::new(window.span, "a sliding window has no close: it emits on every update")
            .with_hint("drop `emit on close`, or use a tumbling or hopping window"));
    }
    let per_device = window.by.iter().any(|k| k.value.trim().eq_ignore_ascii_case(DEVICE_COLUMN));
    Ok(CompiledRule {
        name: rule.name.value.clone(),
        text: String::new(),
        inputs: vec![input.stream.value.clone()],
        input_schemas: vec![plain],
        row_schema: schema,
        join,
        time,
        pre,
        operator: OperatorPlan::Window(WindowPlan {
            kind: window.kind,
            emit,
            keys,
            aggregates,
            output: agg_out,
            per_device,
        }),
        having,
        post,
        output,
        insert_into: None,
        actions: Vec::new(),
        output_rate: None,
        state_limit: DEFAULT_STATE_LIMIT,
        source: None,
    })
}

fn contains_aggregate(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::Aggregate(_) => true,
        other => other.inputs().iter().any(|p| contains_aggregate(p)),
    }
}

fn expect_scan(node: &LogicalPlan, span: Span) -> Result<(), Diagnostic> {
    match node {
        LogicalPlan::TableScan(_) => Ok(()),
        other => Err(Diagnostic::new(span, format!("unsupported construct in a rule: {}", other.display())).with_hint(
            "a rule's select list holds expressions and aggregates; subqueries and joins are written with `join`",
        )),
    }
}

/// Splits the ops over the scan into the filter (before the operator) and the rest.
fn split_pre(ops: Vec<PostOp>) -> (Vec<PostOp>, Vec<PostOp>) {
    let n = ops.iter().take_while(|o| matches!(o, PostOp::Filter(_))).count();
    let mut pre = ops;
    let post = pre.split_off(n);
    (pre, post)
}

fn output_schema(post: &[PostOp], input: &SchemaRef) -> SchemaRef {
    post.iter()
        .rev()
        .find_map(|o| match o {
            PostOp::Project(_, s) => Some(s.clone()),
            PostOp::Filter(_) => None,
        })
        .unwrap_or_else(|| input.clone())
}

/// Recognises `device_id = X.device_id` (either way round): patterns are always per device,
/// so this conjunct only restates the partitioning.
fn is_key_equality(e: &Expr) -> bool {
    let Expr::BinaryExpr(BinaryExpr { left, op: Operator::Eq, right }) = e else { return false };
    let col = |e: &Expr| match e {
        Expr::Column(c) if c.name == DEVICE_COLUMN => Some(false),
        Expr::Column(c) if c.name.ends_with(".device_id") => Some(true),
        _ => None,
    };
    matches!((col(left), col(right)), (Some(a), Some(b)) if a != b)
}

/// Rewrites `a.x` (outside string literals), for each earlier step name `a`, into the
/// quoted identifier `"a.x"`, the name the step's evaluation schema gives that column.
fn quote_step_refs(sql: &str, aliases: &[&str]) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.char_indices().peekable();
    let mut prev_ident = false;
    while let Some((i, c)) = chars.next() {
        if c == '\'' || c == '"' {
            out.push(c);
            for (_, d) in chars.by_ref() {
                out.push(d);
                if d == c {
                    break;
                }
            }
            prev_ident = false;
            continue;
        }
        if !prev_ident && (c.is_ascii_alphabetic() || c == '_') {
            let rest = &sql[i..];
            let word_len = rest.find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_')).unwrap_or(rest.len());
            let word = &rest[..word_len];
            let after = &rest[word_len..];
            if aliases.contains(&word) && after.starts_with('.') {
                let col = &after[1..];
                let col_len = col.find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_')).unwrap_or(col.len());
                if col_len > 0 {
                    out.push_str(&format!("\"{word}.{}\"", &col[..col_len]));
                    let skip = word_len + 1 + col_len;
                    while chars.peek().is_some_and(|(j, _)| *j < i + skip) {
                        chars.next();
                    }
                    prev_ident = true;
                    continue;
                }
            }
            out.push_str(word);
            while chars.peek().is_some_and(|(j, _)| *j < i + word_len) {
                chars.next();
            }
            prev_ident = true;
            continue;
        }
        prev_ident = c.is_ascii_alphanumeric() || c == '_';
        out.push(c);
    }
    out
}

/// Collects the captured columns the steps' compiled conditions read, and gives each step
/// the slots of the ones it reads.
fn typed_refs(steps: &mut [StepPlan]) -> Vec<(usize, usize)> {
    let mut refs: Vec<(usize, usize)> = Vec::new();
    for step in steps.iter_mut() {
        let mut cols = Vec::new();
        if let Some(e) = &step.cross_scalar {
            e.columns(&mut cols);
        }
        step.ref_slots = vec![None; step.captured_columns.len()];
        for c in cols.into_iter().filter(|c| *c >= step.width) {
            let k = c - step.width;
            let Some(&at) = step.captured_columns.get(k) else { continue };
            let slot = match refs.iter().position(|r| *r == at) {
                Some(i) => i,
                None => {
                    refs.push(at);
                    refs.len() - 1
                }
            };
            step.ref_slots[k] = Some(slot);
        }
    }
    refs
}

fn compile_stream_join(
    c: &Ctx<'_>,
    file: &ast::RuleFile,
    j: &ast::JoinClause,
    schemas: &dyn SchemaSource,
) -> Result<CompiledRule, Diagnostic> {
    let rule = c.rule;
    let (left_alias, left) = match &rule.from {
        Source::Stream(s) => (s.stream.clone(), s.clone()),
        Source::Pattern(p) => match p.steps.as_slice() {
            [StepDef::Event { alias, input, min: 1, max: Some(1), group: None }] if !p.every && p.within.is_none() => {
                (alias.clone(), input.clone())
            }
            _ => {
                return Err(Diagnostic::new(p.span, "a join reads one stream on each side")
                    .with_hint("write `from a = s1 join b = s2 on CONDITION within D`"));
            }
        },
    };
    let right_alias = j.alias.clone().unwrap_or_else(|| j.table.clone());
    if right_alias.value == left_alias.value {
        return Err(Diagnostic::new(right_alias.span, "both sides of the join have the same name")
            .with_hint("name them: `from a = telemetry join b = telemetry on ...`"));
    }
    if rule.window.is_some() {
        return Err(Diagnostic::new(j.table.span, "a join of two streams cannot also have a window")
            .with_hint("insert the joined rows into a derived stream and window that"));
    }
    let sl = stream_schema(schemas, &left.stream)?;
    let sr = stream_schema(schemas, &j.table)?;
    let left_filter = match &left.filter {
        Some(f) => {
            let df =
                DFSchema::try_from(sl.as_ref().clone()).map_err(|e| df_error(f.span, "invalid filter", &e, None))?;
            let e = c.expr(&f.value, &df).map_err(|e| df_error(f.span, "invalid filter", &e, Some(&sl)))?;
            Some(c.physical(&e, &df).map_err(|e| df_error(f.span, "invalid filter", &e, Some(&sl)))?)
        }
        None => None,
    };
    let mut fields: Vec<Field> = Vec::new();
    for (alias, s) in [(&left_alias.value, &sl), (&right_alias.value, &sr)] {
        fields.extend(
            s.fields()
                .iter()
                .map(|f| f.as_ref().clone().with_name(format!("{alias}.{}", f.name())).with_nullable(true)),
        );
    }
    let cond_schema = Arc::new(Schema::new(fields));
    let df =
        DFSchema::try_from(cond_schema.as_ref().clone()).map_err(|e| df_error(j.on.span, "invalid join", &e, None))?;
    let on_sql = quote_step_refs(&j.on.value, &[left_alias.value.as_str(), right_alias.value.as_str()]);
    let on = c.expr(&on_sql, &df).map_err(|e| df_error(j.on.span, "invalid join condition", &e, Some(&cond_schema)))?;
    // Joins pair events of one device: `a.device_id = b.device_id` only restates that.
    let same_device = |e: &Expr| {
        matches!(e, Expr::BinaryExpr(BinaryExpr { left, op: Operator::Eq, right })
            if matches!((left.as_ref(), right.as_ref()), (Expr::Column(a), Expr::Column(b))
                if a.name.ends_with(".device_id") && b.name.ends_with(".device_id") && a.name != b.name))
    };
    let rest: Vec<Expr> = split_conjunction(&on).into_iter().filter(|e| !same_device(e)).cloned().collect();
    let cond_expr = rest.into_iter().reduce(|a, b| a.and(b));
    let names: Vec<String> = cond_schema.fields().iter().map(|f| f.name().clone()).collect();
    let cond_scalar = cond_expr.as_ref().and_then(|e| ScalarExpr::compile(e, &names)).map(Arc::new);
    let cond = cond_expr
        .map(|e| c.physical(&e, &df))
        .transpose()
        .map_err(|e| df_error(j.on.span, "invalid join condition", &e, Some(&cond_schema)))?;
    // The select list over `a CROSS JOIN b`.
    c.register(&left_alias.value, &sl).map_err(|e| df_error(left_alias.span, "cannot plan the join", &e, None))?;
    c.register(&right_alias.value, &sr).map_err(|e| df_error(right_alias.span, "cannot plan the join", &e, None))?;
    let select_span = rule.select.as_ref().map_or(rule.name.span, |s| s.span);
    let default_select = format!("{}.*, {}.*", left_alias.value, right_alias.value);
    let select = rule.select.as_ref().map_or(default_select.as_str(), |s| s.value.as_str());
    let sql = format!("SELECT {select} FROM {} CROSS JOIN {}", left_alias.value, right_alias.value);
    let plan = c.plan_sql(&sql).map_err(|e| df_error(select_span, "invalid select list", &e, None))?;
    let (mut post, base) = lower_chain(c, &plan).map_err(|e| df_error(select_span, "invalid select list", &e, None))?;
    if !matches!(base, LogicalPlan::Join(_)) || contains_aggregate(&plan) {
        return Err(Diagnostic::new(select_span, "a join's select list holds expressions over its two sides")
            .with_hint("e.g. `select a.device_id, a.temperature, b.humidity`"));
    }
    let match_schema = Arc::new(base.schema().as_arrow().clone());
    let output = output_schema(&post, &match_schema);
    if let Some(h) = &rule.having {
        let out_df =
            DFSchema::try_from(output.as_ref().clone()).map_err(|e| df_error(h.span, "invalid having", &e, None))?;
        let e = c.expr(&h.value, &out_df).map_err(|e| df_error(h.span, "invalid having", &e, Some(&output)))?;
        post.push(PostOp::Filter(c.physical(&e, &out_df).map_err(|e| df_error(h.span, "invalid having", &e, None))?));
    }
    let mut inputs = vec![left.stream.value.clone()];
    let mut input_schemas = vec![sl.clone()];
    if j.table.value != left.stream.value {
        inputs.push(j.table.value.clone());
        input_schemas.push(sr.clone());
    }
    Ok(CompiledRule {
        name: rule.name.value.clone(),
        text: String::new(),
        time: time_settings(file, &inputs[0]),
        row_schema: sl.clone(),
        join: None,
        inputs,
        input_schemas,
        pre: Vec::new(),
        operator: OperatorPlan::Join(StreamJoinPlan {
            left_stream: left.stream.value.clone(),
            right_stream: j.table.value.clone(),
            left_filter,
            cond_scalar,
            cond,
            cond_schema,
            left_width: sl.fields().len(),
            within: j.within.map_or(0, nanos),
            match_schema,
        }),
        having: None,
        post,
        output,
        insert_into: None,
        actions: Vec::new(),
        output_rate: None,
        state_limit: DEFAULT_STATE_LIMIT,
        source: None,
    })
}

fn compile_pattern(
    c: &Ctx<'_>,
    file: &ast::RuleFile,
    p: &ast::PatternDef,
    schemas: &dyn SchemaSource,
) -> Result<CompiledRule, Diagnostic> {
    let rule = c.rule;
    if rule.window.is_some() {
        return Err(Diagnostic::new(p.span, "a pattern cannot also have a window")
            .with_hint("use `within` to bound a pattern in time"));
    }
    let mut steps = Vec::new();
    let mut captured: Vec<(String, SchemaRef)> = Vec::new();
    let mut inputs: Vec<String> = Vec::new();
    let mut input_schemas = Vec::new();
    let mut aliases: HashMap<String, Span> = HashMap::new();
    let mut step_of_alias: HashMap<String, usize> = HashMap::new();
    for step in &p.steps {
        let (alias, input, min, max, absent_for, group) = match step {
            StepDef::Event { alias, input, min, max, group } => (Some(alias), input, *min, *max, None, *group),
            StepDef::Absent { input, duration } => (None, input, 1, Some(1), Some(duration.map_or(-1, nanos)), None),
        };
        let schema = stream_schema(schemas, &input.stream)?;
        if !inputs.contains(&input.stream.value) {
            inputs.push(input.stream.value.clone());
            input_schemas.push(schema.clone());
        }
        if let Some(a) = alias
            && aliases.insert(a.value.clone(), a.span).is_some()
        {
            return Err(Diagnostic::new(a.span, format!("step name `{}` is used twice", a.value))
                .with_hint("give each step its own name: `a = ...`, `b = ...`"));
        }
        // The step's own columns, then the earlier steps' columns named `alias.column`; the
        // condition's `a.x` references are rewritten to those names (`"a.x"`).
        let mut cross_fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        let mut captured_columns = Vec::new();
        for (a, s) in &captured {
            let step_index = step_of_alias.get(a).copied().unwrap_or(0);
            for (col, f) in s.fields().iter().enumerate() {
                cross_fields.push(f.as_ref().clone().with_name(format!("{a}.{}", f.name())));
                captured_columns.push((step_index, col));
            }
        }
        let df = DFSchema::try_from(Schema::new(cross_fields.clone()))
            .map_err(|e| df_error(input.stream.span, "cannot plan the step", &e, None))?;
        let (mut local, mut cross) = (Vec::new(), Vec::new());
        if let Some(f) = &input.filter {
            let known: Vec<&str> = captured.iter().map(|(a, _)| a.as_str()).collect();
            let sql = quote_step_refs(&f.value, &known);
            let e = c.expr(&sql, &df).map_err(|e| df_error(f.span, "invalid condition", &e, Some(&schema)))?;
            for conj in split_conjunction(&e) {
                if is_key_equality(conj) {
                    continue;
                }
                if conj.column_refs().iter().all(|col| !col.name.contains('.')) {
                    local.push(conj.clone());
                } else {
                    cross.push(conj.clone());
                }
            }
        }
        let and_all = |v: Vec<Expr>| v.into_iter().reduce(|a, b| a.and(b));
        let local_df = DFSchema::try_from(schema.as_ref().clone())
            .map_err(|e| df_error(input.stream.span, "cannot plan the step", &e, None))?;
        let span = input.filter.as_ref().map_or(input.stream.span, |f| f.span);
        let local = and_all(local)
            .map(|e| c.physical(&e, &local_df))
            .transpose()
            .map_err(|e| df_error(span, "invalid condition", &e, Some(&schema)))?;
        let cross = and_all(cross);
        let names: Vec<String> = cross_fields.iter().map(|f| f.name().clone()).collect();
        let cross_scalar = cross.as_ref().and_then(|e| ScalarExpr::compile(e, &names)).map(Arc::new);
        let cross = cross
            .map(|e| c.physical(&e, &df))
            .transpose()
            .map_err(|e| df_error(span, "invalid condition", &e, Some(&schema)))?;
        steps.push(StepPlan {
            alias: alias.map(|a| a.value.clone()),
            stream: input.stream.value.clone(),
            local,
            cross,
            cross_schema: Arc::new(Schema::new(cross_fields)),
            cross_scalar,
            captured_columns: captured_columns.clone(),
            ref_slots: Vec::new(),
            group,
            width: schema.fields().len(),
            min,
            max,
            absent_for,
        });
        if let Some(a) = alias {
            step_of_alias.insert(a.value.clone(), steps.len() - 1);
            captured.push((a.value.clone(), schema));
        }
    }
    // The select list over `a CROSS JOIN b ...`: one table per aliased step.
    // Every column of a match may be null (the unmatched side of an `or` group).
    for (a, s) in &captured {
        let nullable = Arc::new(Schema::new(
            s.fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect::<Vec<_>>(),
        ));
        c.register(a, &nullable).map_err(|e| df_error(p.span, "cannot plan the pattern", &e, None))?;
    }
    let from = captured.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>().join(" CROSS JOIN ");
    let select_span = rule.select.as_ref().map_or(rule.name.span, |s| s.span);
    let default_select = captured.iter().map(|(a, _)| format!("{a}.*")).collect::<Vec<_>>().join(", ");
    let select = rule.select.as_ref().map_or(default_select.as_str(), |s| s.value.as_str());
    let sql = format!("SELECT {select} FROM {from}");
    let plan = c.plan_sql(&sql).map_err(|e| df_error(select_span, "invalid select list", &e, None))?;
    let (post, base) = lower_chain(c, &plan).map_err(|e| df_error(select_span, "invalid select list", &e, None))?;
    if !matches!(base, LogicalPlan::Join(_) | LogicalPlan::TableScan(_)) || contains_aggregate(&plan) {
        return Err(Diagnostic::new(select_span, "a pattern's select list holds expressions over its steps")
            .with_hint("e.g. `select a.device_id, a.time as opened_at, b.temperature`"));
    }
    let match_schema = Arc::new(base.schema().as_arrow().clone());
    let mut post = post;
    let output = output_schema(&post, &match_schema);
    if let Some(h) = &rule.having {
        let out_df =
            DFSchema::try_from(output.as_ref().clone()).map_err(|e| df_error(h.span, "invalid having", &e, None))?;
        let e = c.expr(&h.value, &out_df).map_err(|e| df_error(h.span, "invalid having", &e, Some(&output)))?;
        post.push(PostOp::Filter(c.physical(&e, &out_df).map_err(|e| df_error(h.span, "invalid having", &e, None))?));
    }
    if !match_schema.fields().iter().any(|f| f.name() == TIME_COLUMN) {
        return Err(Diagnostic::new(p.span, "a pattern needs at least one named step")
            .with_hint("name the first step: `every a = telemetry[...]`"));
    }
    Ok(CompiledRule {
        name: rule.name.value.clone(),
        text: String::new(),
        time: time_settings(file, &inputs[0]),
        row_schema: input_schemas[0].clone(),
        join: None,
        inputs,
        input_schemas,
        pre: Vec::new(),
        operator: OperatorPlan::Pattern({
            let mut steps = steps;
            let refs = typed_refs(&mut steps);
            PatternPlan { every: p.every, strict: p.strict, within: p.within.map(nanos), steps, match_schema, refs }
        }),
        having: None,
        post,
        output,
        insert_into: None,
        actions: Vec::new(),
        output_rate: None,
        state_limit: DEFAULT_STATE_LIMIT,
        source: None,
    })
}

#[cfg(test)]
mod tests {
    use super::quote_step_refs;

    #[test]
    fn step_references_are_quoted_outside_strings() {
        assert_eq!(
            quote_step_refs("temperature > a.temperature + 5 and door = 'a.x' and ba.y = 1", &["a"]),
            "temperature > \"a.temperature\" + 5 and door = 'a.x' and ba.y = 1"
        );
    }
}
