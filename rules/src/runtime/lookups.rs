//! Tables joined by rules: files read at deploy, streams followed as they are committed.

use super::*;

impl RuleEngine {
    /// Sets where stream tables are loaded from when a rule first joins them (the server
    /// reads them through SQL); without it they fill from the rows that arrive.
    pub fn set_table_loader(&self, loader: Arc<dyn TableLoader>) {
        *self.loader.write() = Some(loader);
    }

    pub(super) fn lookup_key(rule: &str, j: &JoinPlan) -> (String, String) {
        match j.source {
            // A file is read per deployment of the rule that declares it.
            JoinSource::Static(_) => (format!("{rule}\u{1}{}", j.table), j.table_key.clone()),
            JoinSource::Stream => (j.stream.clone(), j.table_key.clone()),
        }
    }

    pub(super) fn prepare_lookup(&self, rule: &str, j: &JoinPlan) -> Result<()> {
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
                    for b in loader.load(&j.stream).map_err(Error::Input)? {
                        t.apply(&b)?;
                    }
                }
                tracing::info!(table = %j.stream, key = %j.table_key, rows = t.len(), "stream table loaded for joins");
                self.lookups.write().entry(key).or_insert_with(|| Arc::new(RwLock::new(t)));
            }
        }
        Ok(())
    }

    /// Feeds rows of stream tables to their lookups (every shard's rows, one shared table).
    pub(super) fn feed_lookups(&self, sb: &StreamBatch) {
        let lookups = self.lookups.read();
        for ((table, _), t) in lookups.iter() {
            if table == sb.stream.as_str()
                && let Err(e) = t.write().apply(&sb.batch)
            {
                tracing::warn!(table, error = %e, "cannot update a stream table");
            }
        }
    }

    pub(super) fn enrich(&self, rule: &LiveRule, j: &JoinPlan, batch: &RecordBatch) -> Result<RecordBatch> {
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
}
