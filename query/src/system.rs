//! The `system` schema: tables computed when queried from [`SystemTable`]s (rule state,
//! watermarks), registered by the binary.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use ferrite_engine::SystemTable;
use ferrite_engine::system::TableSet;

/// The `system` schema as one tenant sees it: every table, with that tenant's rows only.
pub struct SystemSchemaProvider {
    tables: Arc<TableSet>,
    tenant: Arc<str>,
}

impl SystemSchemaProvider {
    /// The tables of `tables`, showing `tenant`'s rows.
    pub fn new(tables: Arc<TableSet>, tenant: &str) -> Self {
        Self { tables, tenant: tenant.into() }
    }
}

impl std::fmt::Debug for SystemSchemaProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemSchemaProvider")
            .field("tenant", &self.tenant)
            .field("tables", &self.table_names())
            .finish()
    }
}

#[async_trait]
impl SchemaProvider for SystemSchemaProvider {
    fn table_names(&self) -> Vec<String> {
        self.tables.names()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        Ok(self.tables.find(name).map(|t| tenant_table(t, &self.tenant)))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.tables.find(name).is_some()
    }
}

/// `table` as `tenant` sees it.
pub fn tenant_table(table: Arc<dyn SystemTable>, tenant: &Arc<str>) -> Arc<dyn TableProvider> {
    Arc::new(SystemTableProvider(table, tenant.clone()))
}

struct SystemTableProvider(Arc<dyn SystemTable>, Arc<str>);

impl std::fmt::Debug for SystemTableProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "system.{}", self.0.name())
    }
}

#[async_trait]
impl TableProvider for SystemTableProvider {
    fn schema(&self) -> SchemaRef {
        self.0.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let rows = self.0.rows(&self.1).map_err(DataFusionError::Execution)?;
        let source = MemorySourceConfig::try_new(&[rows], self.0.schema(), projection.cloned())?.with_limit(limit);
        Ok(DataSourceExec::from_data_source(source))
    }
}
