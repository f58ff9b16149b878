//! `last_values('stream')`: the newest row of every device of a stream, from storage's
//! last-value cache (a copy of a few columns instead of a scan of the hot buffer and the
//! archive). The same rows as
//! `SELECT DISTINCT ON (device_id) * FROM stream ORDER BY device_id, time DESC`.

use std::sync::Arc;

use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{ScalarValue, plan_err};
use datafusion::datasource::MemTable;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::Expr;
use ferrite_engine::StreamName;
use ferrite_storage::Storage;

use crate::Scope;

/// The `last_values` table function of one scope (its tenant's streams, less the hidden).
#[derive(Debug)]
pub struct LastValuesFunction {
    storage: Arc<Storage>,
    scope: Scope,
}

impl LastValuesFunction {
    /// The function as `scope` sees it.
    pub fn new(storage: Arc<Storage>, scope: Scope) -> Self {
        Self { storage, scope }
    }
}

impl TableFunctionImpl for LastValuesFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> DfResult<Arc<dyn TableProvider>> {
        let name = match args.exprs() {
            [Expr::Literal(ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)), _)] => s.clone(),
            _ => {
                return plan_err!(
                    "last_values takes one argument, the stream's name as a string: last_values('telemetry')"
                );
            }
        };
        let unknown = || format!("unknown stream `{name}` in last_values; GET /api/v1/streams lists the streams");
        if self.scope.hidden.contains(&name) {
            return plan_err!("{}", unknown());
        }
        let Ok(stream) = StreamName::in_tenant(&self.scope.tenant, &name) else { return plan_err!("{}", unknown()) };
        let batch = match self.storage.last_values(&stream) {
            Ok(Some(b)) => b,
            Ok(None) => return plan_err!("{}", unknown()),
            Err(e) => return Err(datafusion::error::DataFusionError::External(Box::new(e))),
        };
        Ok(Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]])?))
    }
}
