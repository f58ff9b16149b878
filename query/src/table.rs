//! A stream as a DataFusion table: the hot buffer (in memory) and the Parquet archive
//! (through `object_store`) as one table, from one consistent storage snapshot, so a row
//! is seen exactly once whether or not it was persisted while the query ran.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::{FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::Result as DfResult;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown, utils::conjunction};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::union::UnionExec;
use ferrite_engine::{StreamName, align_to_schema};
use ferrite_storage::{ArchivedFile, Storage};

/// URL under which the archive's object store is registered in the session.
pub const ARCHIVE_URL: &str = "ferrite://archive/";

/// One stream as a table.
#[derive(Debug)]
pub struct StreamTable {
    stream: StreamName,
    schema: SchemaRef,
    storage: Arc<Storage>,
}

impl StreamTable {
    /// The table of `stream` with its current schema, strings as `Utf8View`: the Parquet
    /// reader then points into each page's dictionary instead of copying every row's text,
    /// and GROUP BY on tags compares views (DataFusion's own default for Parquet tables).
    pub fn new(stream: StreamName, schema: SchemaRef, storage: Arc<Storage>) -> Self {
        Self { stream, schema: view_schema(&schema), storage }
    }
}

/// `schema` with `Utf8` columns as `Utf8View`.
pub fn view_schema(schema: &SchemaRef) -> SchemaRef {
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    if !schema.fields().iter().any(|f| f.data_type() == &DataType::Utf8) {
        return schema.clone();
    }
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Utf8 => f.as_ref().clone().with_data_type(DataType::Utf8View),
            _ => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// Bounds on `time` (ns, inclusive) and an exact `device_id`, taken from the filters to
/// skip archive files before opening them.
#[derive(Debug, Default, PartialEq)]
pub struct Pruning {
    /// Lowest possible `time`.
    pub min_time: Option<i64>,
    /// Highest possible `time`.
    pub max_time: Option<i64>,
    /// `device_id = '...'`.
    pub device: Option<String>,
}

fn timestamp_nanos(v: &ScalarValue) -> Option<i64> {
    match v {
        ScalarValue::TimestampNanosecond(Some(x), _) => Some(*x),
        ScalarValue::TimestampMicrosecond(Some(x), _) => x.checked_mul(1_000),
        ScalarValue::TimestampMillisecond(Some(x), _) => x.checked_mul(1_000_000),
        ScalarValue::TimestampSecond(Some(x), _) => x.checked_mul(1_000_000_000),
        _ => None,
    }
}

fn literal_of(e: &Expr) -> Option<&ScalarValue> {
    match e {
        Expr::Literal(v, _) => Some(v),
        Expr::Cast(c) => literal_of(&c.expr),
        Expr::TryCast(c) => literal_of(&c.expr),
        _ => None,
    }
}

fn column_of(e: &Expr) -> Option<&str> {
    match e {
        Expr::Column(c) => Some(c.name.as_str()),
        Expr::Cast(c) => column_of(&c.expr),
        _ => None,
    }
}

impl Pruning {
    /// Collects bounds from conjunctive filters; anything it does not understand is ignored
    /// (DataFusion still applies every filter to the rows).
    pub fn from_filters(filters: &[Expr]) -> Self {
        let mut p = Pruning::default();
        for f in filters {
            p.visit(f);
        }
        p
    }

    fn visit(&mut self, e: &Expr) {
        let Expr::BinaryExpr(BinaryExpr { left, op, right }) = e else { return };
        if *op == Operator::And {
            self.visit(left);
            self.visit(right);
            return;
        }
        let (col, lit, op) = match (column_of(left), literal_of(right), column_of(right), literal_of(left)) {
            (Some(c), Some(l), _, _) => (c, l, *op),
            (_, _, Some(c), Some(l)) => match op.swap() {
                Some(o) => (c, l, o),
                None => return,
            },
            _ => return,
        };
        match col {
            "time" => {
                let Some(t) = timestamp_nanos(lit) else { return };
                // Bounds are inclusive: `time > t` means `time >= t + 1` (integer nanoseconds).
                let lower = |p: &mut Self, t: i64| p.min_time = Some(p.min_time.map_or(t, |m| m.max(t)));
                let upper = |p: &mut Self, t: i64| p.max_time = Some(p.max_time.map_or(t, |m| m.min(t)));
                match op {
                    Operator::Gt => lower(self, t.saturating_add(1)),
                    Operator::GtEq => lower(self, t),
                    Operator::Lt => upper(self, t.saturating_sub(1)),
                    Operator::LtEq => upper(self, t),
                    Operator::Eq => {
                        lower(self, t);
                        upper(self, t);
                    }
                    _ => {}
                }
            }
            "device_id" if op == Operator::Eq => {
                if let ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)) | ScalarValue::LargeUtf8(Some(s)) =
                    lit
                {
                    self.device = Some(s.clone());
                }
            }
            _ => {}
        }
    }

    /// Whether `file` may hold matching rows.
    pub fn keeps(&self, file: &ArchivedFile) -> bool {
        if self.min_time.is_some_and(|t| file.max_time < t) || self.max_time.is_some_and(|t| file.min_time > t) {
            return false;
        }
        if let Some(d) = &self.device
            && (d.as_str() < file.min_device.as_str() || d.as_str() > file.max_device.as_str())
        {
            return false;
        }
        true
    }
}

#[async_trait]
impl TableProvider for StreamTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let snapshot = self.storage.snapshot(&self.stream);
        let pruning = Pruning::from_filters(filters);
        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        let projected = match projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => self.schema.clone(),
        };

        // Hot rows: their projected columns aligned to the current schema (strings become
        // views: only the columns the query reads are cast), spread over the partitions.
        if !snapshot.hot.is_empty() {
            let aligned = snapshot
                .hot
                .iter()
                .map(|b| align_to_schema(b, &projected))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
            let parts = state.config().target_partitions().max(1).min(aligned.len());
            let mut partitions = vec![Vec::new(); parts];
            for (i, b) in aligned.into_iter().enumerate() {
                partitions[i % parts].push(b);
            }
            let source = MemorySourceConfig::try_new(&partitions, projected.clone(), None)?.with_limit(limit);
            inputs.push(DataSourceExec::from_data_source(source));
        }

        // Archive: only the catalogued files whose time and device ranges can match.
        let files: Vec<&ArchivedFile> = snapshot.files.iter().filter(|f| pruning.keeps(f)).collect();
        if !files.is_empty() {
            // The session's Parquet options (strings read as views, among others). Filter
            // pushdown into decoding stays off: on the TSBS queries it cost more on the
            // unselective filters (`velocity > 1`: 1.9x slower) than it saved on the others.
            let mut source = ParquetSource::new(self.schema.clone())
                .with_table_parquet_options(state.table_options().parquet.clone());
            if let Some(predicate) = conjunction(filters.iter().cloned()) {
                let df_schema = DFSchema::try_from(self.schema.as_ref().clone())?;
                let physical = state.create_physical_expr(predicate, &df_schema)?;
                source = source.with_predicate(physical);
            }
            let url = ObjectStoreUrl::parse(ARCHIVE_URL)?;
            let parts = state.config().target_partitions().max(1);
            let mut groups: Vec<Vec<PartitionedFile>> = vec![Vec::new(); parts.min(files.len())];
            let n = groups.len();
            for (i, f) in files.iter().enumerate() {
                groups[i % n].push(PartitionedFile::new(f.path.clone(), f.size));
            }
            let config = FileScanConfigBuilder::new(url, Arc::new(source))
                .with_file_groups(groups.into_iter().map(Into::into).collect())
                .with_projection_indices(projection.cloned())?
                .with_limit(limit)
                .build();
            inputs.push(ParquetFormat::default().create_physical_plan(state, config).await?);
        }

        match inputs.len() {
            0 => Ok(Arc::new(EmptyExec::new(projected))),
            _ => UnionExec::try_new(inputs),
        }
    }
}
