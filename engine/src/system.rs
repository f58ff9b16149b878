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

/// A set of tables by name, shared by every SQL session: the `system` schema's, and the
/// tables plugins add beside a tenant's streams (the device registry's `devices`).
#[derive(Default)]
pub struct TableSet {
    tables: parking_lot::RwLock<Vec<std::sync::Arc<dyn SystemTable>>>,
}

impl std::fmt::Debug for TableSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableSet").field("tables", &self.names()).finish()
    }
}

impl TableSet {
    /// Adds (or replaces) a table.
    pub fn add(&self, table: std::sync::Arc<dyn SystemTable>) {
        let mut t = self.tables.write();
        t.retain(|x| x.name() != table.name());
        t.push(table);
    }

    /// The table named `name`.
    pub fn find(&self, name: &str) -> Option<std::sync::Arc<dyn SystemTable>> {
        self.tables.read().iter().find(|t| t.name() == name).cloned()
    }

    /// Every table's name.
    pub fn names(&self) -> Vec<String> {
        self.tables.read().iter().map(|t| t.name().to_owned()).collect()
    }
}
