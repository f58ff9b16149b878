//! Ferrite's SQL layer: a DataFusion session in which every stream is a table over the hot
//! buffer and the Parquet archive, and the HTTP endpoints that serve it.
//!
//! ```text
//! SQL ─▶ DataFusion (parse, plan, optimise) ─▶ StreamTable::scan
//!                                                 ├─ hot batches  (MemorySourceConfig)
//!                                                 └─ Parquet files (ParquetSource: file pruning
//!                                                    on time/device ranges from the catalog,
//!                                                    row-group and page pruning by predicate)
//! ```
//!
//! The SQL door is read-only and bounded ([`QueryConfig`]): no DDL, DML or statements
//! (`CREATE EXTERNAL TABLE`, `COPY`, `SET`...), no object store but the archive's (so no
//! query can read a server file), a time limit, a memory pool, and a cap on result size.
//!
//! Depends on `ferrite-engine` (stream catalog) and `ferrite-storage` (snapshots, object
//! store); never on ingest or rules.

pub mod error;
pub mod functions;
pub mod http;
pub mod last;
pub mod system;
pub mod table;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{CatalogProvider, CatalogProviderList, MemoryCatalogProvider, SchemaProvider, TableProvider};
use datafusion::error::Result as DfResult;
use datafusion::execution::context::{SQLOptions, SessionContext};
use datafusion::execution::object_store::ObjectStoreRegistry;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::SessionConfig;
use ferrite_engine::auth::{AccessControl, Action, Principal, RequestContext, Resource};
use ferrite_engine::system::TableSet;
use ferrite_engine::{Metrics, StreamCatalog};
use ferrite_storage::Storage;
use futures::StreamExt;

pub use error::{Error, Result};
use table::{ARCHIVE_URL, StreamTable};

/// What one caller's queries see: the streams of one tenant, less the hidden ones.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    /// The tenant whose streams are the tables of `public` (and whose rows `system.*` shows).
    pub tenant: String,
    /// Streams of the tenant the caller may not see (the `audit` stream without
    /// `read_audit`): to the planner they do not exist.
    pub hidden: Vec<String>,
}

impl Scope {
    /// Every stream of `tenant`.
    pub fn tenant(tenant: &str) -> Self {
        Self { tenant: tenant.to_owned(), hidden: Vec::new() }
    }

    /// The same scope without stream `name`.
    pub fn hiding(mut self, name: &str) -> Self {
        self.hidden.push(name.to_owned());
        self
    }

    /// What `principal` sees querying `tenant`: its streams, less `audit` without
    /// `read_audit`; or why it may not query the tenant at all.
    pub fn of(
        access: &dyn AccessControl,
        principal: &Principal,
        tenant: &str,
        context: &RequestContext,
    ) -> std::result::Result<Self, String> {
        let resource = Resource::tenant(tenant);
        if !access.authorize(principal, Action::Query, &resource, context).allowed {
            return Err(format!("{principal} may not query tenant {tenant:?}"));
        }
        let scope = Self::tenant(tenant);
        if access.enabled() && !access.authorize(principal, Action::ReadAudit, &resource, context).allowed {
            return Ok(scope.hiding(ferrite_engine::auth::AUDIT_STREAM));
        }
        Ok(scope)
    }
}

impl Default for Scope {
    fn default() -> Self {
        Self::tenant(ferrite_engine::ids::DEFAULT_TENANT)
    }
}

/// Schema provider whose tables are one tenant's streams, so a stream is queryable the
/// moment its first event is accepted, and no other tenant's stream can be named.
#[derive(Debug)]
struct StreamSchemaProvider {
    catalog: Arc<StreamCatalog>,
    storage: Arc<Storage>,
    /// Tables plugins add beside the streams (`devices`); they take precedence over a
    /// stream of the same name.
    tables: Arc<TableSet>,
    tenant: Arc<str>,
    scope: Scope,
}

impl StreamSchemaProvider {
    fn visible(&self, name: &str) -> bool {
        !self.scope.hidden.iter().any(|h| h == name)
    }
}

#[async_trait]
impl SchemaProvider for StreamSchemaProvider {
    fn table_names(&self) -> Vec<String> {
        let mut names = self.tables.names();
        let streams = self.catalog.list_in(&self.scope.tenant);
        names.extend(streams.iter().map(|s| s.name.local().to_owned()).filter(|n| self.visible(n)));
        names.sort();
        names.dedup();
        names
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        if let Some(t) = self.tables.find(name) {
            return Ok(Some(system::tenant_table(t, &self.tenant)));
        }
        if !self.visible(name) {
            return Ok(None);
        }
        Ok(self.catalog.get_in(&self.scope.tenant, name).map(|s| {
            Arc::new(StreamTable::new(s.name.clone(), s.arrow.clone(), self.storage.clone())) as Arc<dyn TableProvider>
        }))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.tables.find(name).is_some()
            || (self.visible(name) && self.catalog.get_in(&self.scope.tenant, name).is_some())
    }
}

/// The result of a query: its schema and rows.
#[derive(Debug)]
pub struct QueryResult {
    /// Output schema (also for empty results).
    pub schema: SchemaRef,
    /// Output rows.
    pub batches: Vec<RecordBatch>,
}

/// Limits of the SQL door.
#[derive(Debug, Clone)]
pub struct QueryConfig {
    /// A query running longer is cancelled.
    pub timeout: std::time::Duration,
    /// Memory all running queries may hold for sorts, joins and aggregates.
    pub memory_limit: usize,
    /// Largest result (Arrow bytes in memory) a query may return.
    pub max_result_bytes: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            timeout: std::time::Duration::from_secs(30),
            memory_limit: 1024 * 1024 * 1024,
            max_result_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The only object store queries can reach: the archive's. `file://` and every other
/// scheme are refused, so no table can be made to read a file of the server.
#[derive(Debug, Default)]
struct ArchiveOnlyRegistry {
    archive: parking_lot::RwLock<Option<Arc<dyn object_store::ObjectStore>>>,
}

impl ObjectStoreRegistry for ArchiveOnlyRegistry {
    fn register_store(
        &self,
        url: &url::Url,
        store: Arc<dyn object_store::ObjectStore>,
    ) -> Option<Arc<dyn object_store::ObjectStore>> {
        if url.as_str().starts_with(ARCHIVE_URL) {
            return self.archive.write().replace(store);
        }
        tracing::warn!(%url, "refused to register an object store other than the archive's");
        None
    }

    fn get_store(&self, url: &url::Url) -> DfResult<Arc<dyn object_store::ObjectStore>> {
        match self.archive.read().as_ref() {
            Some(store) if url.as_str().starts_with(ARCHIVE_URL) => Ok(store.clone()),
            _ => datafusion::common::plan_err!("no object store for `{url}`: queries read the streams only"),
        }
    }
}

/// Runs SQL over the streams.
pub struct QueryService {
    ctx: SessionContext,
    config: QueryConfig,
    metrics: Arc<Metrics>,
    catalog: Arc<StreamCatalog>,
    storage: Arc<Storage>,
    system: Arc<TableSet>,
    tables: Arc<TableSet>,
    /// One session per scope seen, sharing the runtime and limits (their schema providers
    /// read the catalog when planning, so a cached session is never stale).
    sessions: parking_lot::Mutex<std::collections::HashMap<Scope, SessionContext>>,
    /// Tenants' daily query quotas, charged by the doors users query through.
    quotas: std::sync::OnceLock<Arc<ferrite_engine::quota::Quotas>>,
}

/// Sessions kept for reuse; past this many scopes the cache starts over.
const MAX_SESSIONS: usize = 256;

impl std::fmt::Debug for QueryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueryService")
    }
}

impl QueryService {
    /// A session over `storage`'s streams, with the default limits.
    pub fn new(catalog: Arc<StreamCatalog>, storage: Arc<Storage>, metrics: Arc<Metrics>) -> Result<Self> {
        Self::with_config(catalog, storage, metrics, QueryConfig::default())
    }

    /// A session over `storage`'s streams, with `limits`.
    pub fn with_config(
        catalog: Arc<StreamCatalog>,
        storage: Arc<Storage>,
        metrics: Arc<Metrics>,
        limits: QueryConfig,
    ) -> Result<Self> {
        let config =
            SessionConfig::new().with_information_schema(true).with_default_catalog_and_schema("ferrite", "public");
        let runtime = RuntimeEnvBuilder::new()
            .with_object_store_registry(Arc::new(ArchiveOnlyRegistry::default()))
            .with_memory_limit(limits.memory_limit, 1.0)
            .build_arc()
            .map_err(Error::from_datafusion)?;
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        ctx.register_udf(functions::UtcDateTrunc::udf());
        let url = url::Url::parse(ARCHIVE_URL).map_err(|e| Error::Execution(e.to_string()))?;
        ctx.register_object_store(&url, storage.object_store());
        Ok(Self {
            ctx,
            config: limits,
            metrics,
            catalog,
            storage,
            system: Arc::new(TableSet::default()),
            tables: Arc::new(TableSet::default()),
            sessions: parking_lot::Mutex::new(std::collections::HashMap::new()),
            quotas: std::sync::OnceLock::new(),
        })
    }

    /// Sets the tenants' daily query quotas (once).
    pub fn set_quotas(&self, quotas: Arc<ferrite_engine::quota::Quotas>) {
        let _ = self.quotas.set(quotas);
    }

    /// Charges one statement to `tenant`'s daily query quota, or refuses it past the quota
    /// (HTTP, the PostgreSQL wire and Flight SQL call this; the server's own queries do not).
    pub fn take_query(&self, tenant: &str) -> Result<()> {
        let Some(quotas) = self.quotas.get() else { return Ok(()) };
        quotas.take_query(tenant).map_err(|e| {
            self.metrics.inc("ferrite_quota_refused_total", &[("quota", e.quota.as_str())], 1);
            tracing::info!(tenant, "query refused: {e}");
            Error::QuotaExceeded(e)
        })
    }

    /// Adds a table to the `system` schema (`SELECT * FROM system.NAME`).
    pub fn add_system_table(&self, table: Arc<dyn ferrite_engine::SystemTable>) {
        self.system.add(table);
    }

    /// The tables plugins add beside each tenant's streams (`SELECT * FROM devices`).
    pub fn tenant_tables(&self) -> &Arc<TableSet> {
        &self.tables
    }

    /// The stream catalog.
    pub fn catalog(&self) -> &Arc<StreamCatalog> {
        &self.catalog
    }

    /// Storage, for stream statistics.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// Plans and runs one SQL statement over the default tenant's streams (local tools).
    pub async fn sql(&self, sql: &str) -> Result<QueryResult> {
        self.sql_in(&Scope::default(), sql).await
    }

    /// Runs one read-only statement in `scope`: the planner resolves table names through a
    /// schema holding only the scope's streams, so no spelling of the query reaches another
    /// tenant's stream or a hidden one.
    pub async fn sql_in(&self, scope: &Scope, sql: &str) -> Result<QueryResult> {
        let started = Instant::now();
        let result = match self.session(scope) {
            Ok(ctx) => self.run(ctx, sql).await,
            Err(e) => Err(e),
        };
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics.inc("ferrite_queries_total", &[("outcome", outcome)], 1);
        self.metrics.histogram("ferrite_query_seconds", &[]).observe(started.elapsed());
        result
    }

    /// The session of `scope`: its `public` schema is the scope's streams, its `system`
    /// schema the system tables' rows of the scope's tenant (same runtime and limits).
    fn session(&self, scope: &Scope) -> Result<SessionContext> {
        if let Some(ctx) = self.sessions.lock().get(scope) {
            return Ok(ctx.clone());
        }
        let ctx = self.new_session(scope)?;
        let mut sessions = self.sessions.lock();
        if sessions.len() >= MAX_SESSIONS {
            sessions.clear();
        }
        sessions.insert(scope.clone(), ctx.clone());
        Ok(ctx)
    }

    /// A session of `scope` of its own (not the one `sql_in` shares), for a front end that
    /// adds to it (the PostgreSQL wire protocol adds `pg_catalog` and its functions). The
    /// same tables, runtime and limits; nothing registered on it reaches other sessions.
    pub fn new_session(&self, scope: &Scope) -> Result<SessionContext> {
        let ferrite = MemoryCatalogProvider::new();
        let provider = Arc::new(StreamSchemaProvider {
            catalog: self.catalog.clone(),
            storage: self.storage.clone(),
            tables: self.tables.clone(),
            tenant: scope.tenant.as_str().into(),
            scope: scope.clone(),
        });
        ferrite.register_schema("public", provider).map_err(Error::from_datafusion)?;
        let system = Arc::new(system::SystemSchemaProvider::new(self.system.clone(), &scope.tenant));
        ferrite.register_schema("system", system).map_err(Error::from_datafusion)?;
        let list = datafusion::catalog::MemoryCatalogProviderList::new();
        list.register_catalog("ferrite".to_owned(), Arc::new(ferrite));
        let state = datafusion::execution::SessionStateBuilder::new_from_existing(self.ctx.state())
            .with_catalog_list(Arc::new(list))
            .build();
        let ctx = SessionContext::new_with_state(state);
        ctx.register_udtf("last_values", Arc::new(last::LastValuesFunction::new(self.storage.clone(), scope.clone())));
        Ok(ctx)
    }

    /// The query timeout (`sql_timeout`).
    pub fn timeout(&self) -> std::time::Duration {
        self.config.timeout
    }

    async fn run(&self, ctx: SessionContext, sql: &str) -> Result<QueryResult> {
        let limit = self.config.timeout;
        // On a task of its own, so that the deadline holds even while an operator is busy,
        // and the work is aborted (not merely abandoned) when it passes.
        let task = tokio::spawn(run_query(ctx, sql.to_owned(), self.config.max_result_bytes));
        let abort = task.abort_handle();
        match tokio::time::timeout(limit, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(Error::Execution(format!("the query task failed: {e}"))),
            Err(_) => {
                abort.abort();
                self.metrics.inc("ferrite_query_timeouts_total", &[], 1);
                Err(Error::Timeout(limit))
            }
        }
    }
}

/// `df` with its `Utf8View` columns as `Utf8`: tables scan strings as views (faster), but
/// what clients receive keeps the plain string type they know (`string`, not `string_view`).
pub fn with_plain_strings(df: datafusion::dataframe::DataFrame) -> DfResult<datafusion::dataframe::DataFrame> {
    use datafusion::arrow::datatypes::DataType;
    use datafusion::common::Column;
    use datafusion::logical_expr::{Expr, cast};
    if !df.schema().fields().iter().any(|f| f.data_type() == &DataType::Utf8View) {
        return Ok(df);
    }
    let exprs: Vec<Expr> = df
        .schema()
        .iter()
        .map(|(qualifier, field)| {
            let column = Expr::Column(Column::from((qualifier, field)));
            match field.data_type() {
                DataType::Utf8View => cast(column, DataType::Utf8).alias_qualified(qualifier.cloned(), field.name()),
                _ => column,
            }
        })
        .collect();
    df.select(exprs)
}

/// What every SQL door allows: queries, no DDL, DML or statements.
pub fn read_only() -> SQLOptions {
    SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false)
}

/// `sql` planned read-only on `ctx`, its results with plain strings (the planning every
/// SQL door but the PostgreSQL wire shares; that one plans through datafusion-postgres).
pub async fn plan_read_only(ctx: &SessionContext, sql: &str) -> DfResult<datafusion::dataframe::DataFrame> {
    with_plain_strings(ctx.sql_with_options(sql, read_only()).await?)
}

/// Plans `sql` read-only and collects its result, up to `max_result_bytes`.
async fn run_query(ctx: SessionContext, sql: String, max_result_bytes: usize) -> Result<QueryResult> {
    let df = plan_read_only(&ctx, &sql).await.map_err(Error::from_datafusion)?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let mut stream = df.execute_stream().await.map_err(Error::from_datafusion)?;
    let mut batches = Vec::new();
    let mut bytes = 0usize;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(Error::from_datafusion)?;
        bytes += batch.get_array_memory_size();
        if bytes > max_result_bytes {
            return Err(Error::ResourcesExhausted(format!(
                "the result is larger than {max_result_bytes} bytes (the `sql_max_result` setting); add LIMIT, \
                 aggregate, or select fewer columns"
            )));
        }
        batches.push(batch);
    }
    Ok(QueryResult { schema, batches })
}
