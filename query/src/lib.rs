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
//! Depends on `ferrite-engine` (stream catalog) and `ferrite-storage` (snapshots, object
//! store); never on ingest or rules.

pub mod error;
pub mod http;
pub mod system;
pub mod table;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{CatalogProvider, MemoryCatalogProvider, SchemaProvider, TableProvider};
use datafusion::error::Result as DfResult;
use datafusion::execution::context::SessionContext;
use datafusion::prelude::SessionConfig;
use ferrite_engine::{Metrics, StreamCatalog};
use ferrite_storage::Storage;

pub use error::{Error, Result};
use table::{ARCHIVE_URL, StreamTable};

/// Schema provider whose tables are the catalog's streams, so a stream is queryable the
/// moment its first event is accepted.
#[derive(Debug)]
struct StreamSchemaProvider {
    catalog: Arc<StreamCatalog>,
    storage: Arc<Storage>,
}

#[async_trait]
impl SchemaProvider for StreamSchemaProvider {
    fn table_names(&self) -> Vec<String> {
        self.catalog.list().iter().map(|s| s.name.to_string()).collect()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        Ok(self.catalog.get_by_name(name).map(|s| {
            Arc::new(StreamTable::new(s.name.clone(), s.arrow.clone(), self.storage.clone())) as Arc<dyn TableProvider>
        }))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.catalog.get_by_name(name).is_some()
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

/// Runs SQL over the streams.
pub struct QueryService {
    ctx: SessionContext,
    metrics: Arc<Metrics>,
    catalog: Arc<StreamCatalog>,
    storage: Arc<Storage>,
    system: Arc<system::SystemSchemaProvider>,
}

impl std::fmt::Debug for QueryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueryService")
    }
}

impl QueryService {
    /// A session over `storage`'s streams.
    pub fn new(catalog: Arc<StreamCatalog>, storage: Arc<Storage>, metrics: Arc<Metrics>) -> Result<Self> {
        let config =
            SessionConfig::new().with_information_schema(true).with_default_catalog_and_schema("ferrite", "public");
        let ctx = SessionContext::new_with_config(config);
        let url = url::Url::parse(ARCHIVE_URL).map_err(|e| Error::Execution(e.to_string()))?;
        ctx.register_object_store(&url, storage.object_store());
        let ferrite = MemoryCatalogProvider::new();
        let provider = Arc::new(StreamSchemaProvider { catalog: catalog.clone(), storage: storage.clone() });
        ferrite.register_schema("public", provider).map_err(Error::from_datafusion)?;
        let system = Arc::new(system::SystemSchemaProvider::default());
        ferrite.register_schema("system", system.clone()).map_err(Error::from_datafusion)?;
        ctx.register_catalog("ferrite", Arc::new(ferrite));
        Ok(Self { ctx, metrics, catalog, storage, system })
    }

    /// Adds a table to the `system` schema (`SELECT * FROM system.NAME`).
    pub fn add_system_table(&self, table: Arc<dyn ferrite_engine::SystemTable>) {
        self.system.add(table);
    }

    /// The stream catalog.
    pub fn catalog(&self) -> &Arc<StreamCatalog> {
        &self.catalog
    }

    /// Storage, for stream statistics.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// Plans and runs one SQL statement.
    pub async fn sql(&self, sql: &str) -> Result<QueryResult> {
        let started = Instant::now();
        let result = self.run(sql).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics.inc("ferrite_queries_total", &[("outcome", outcome)], 1);
        self.metrics.histogram("ferrite_query_seconds", &[]).observe(started.elapsed());
        result
    }

    async fn run(&self, sql: &str) -> Result<QueryResult> {
        let df = self.ctx.sql(sql).await.map_err(Error::from_datafusion)?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await.map_err(Error::from_datafusion)?;
        Ok(QueryResult { schema, batches })
    }
}
