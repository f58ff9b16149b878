//! Tables of the `system` SQL schema, computed when queried: the rule engine's open windows
//! and partial matches (`system.rule_state`) and per-device watermarks (`system.watermarks`).
//! The query layer serves whatever implements [`SystemTable`]; the binary wires them, so
//! query and rules never depend on each other.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

/// A table of the `system` schema.
pub trait SystemTable: Send + Sync {
    /// Its name in the `system` schema.
    fn name(&self) -> &str;
    /// Its columns (fixed).
    fn schema(&self) -> SchemaRef;
    /// Its rows now that belong to `tenant` (a table never shows another tenant's rows).
    fn rows(&self, tenant: &str) -> Result<Vec<RecordBatch>, String>;
}
