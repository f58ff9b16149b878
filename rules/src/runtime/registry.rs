//! Deploying, replacing and removing rules, and what the API shows of them.

use super::state::*;
use super::*;

impl RuleEngine {
    /// Parses and compiles `text` against the default tenant's streams without deploying it.
    pub fn check(&self, text: &str) -> Result<Vec<CompiledRule>> {
        self.check_in(ferrite_engine::ids::DEFAULT_TENANT, text)
    }

    /// Parses and compiles `text` against `tenant`'s streams, as rules of that tenant,
    /// without deploying it.
    pub fn check_in(&self, tenant: &str, text: &str) -> Result<Vec<CompiledRule>> {
        let sandbox = self.sandbox.read().clone();
        let base = sandbox.as_ref().map(|s| s.table_dir.clone());
        self.compile_in(tenant, text, base.as_deref(), sandbox.as_ref())
    }

    fn compile_in(
        &self,
        tenant: &str,
        text: &str,
        base: Option<&std::path::Path>,
        sandbox: Option<&crate::sandbox::Sandbox>,
    ) -> Result<Vec<CompiledRule>> {
        let schemas = CatalogSchemas { catalog: &self.catalog, tenant };
        let compiled = compile_text_sandboxed(text, &schemas, base, sandbox)?;
        let source = Arc::new(crate::plan::RuleSource {
            tenant: tenant.to_owned(),
            text: text.to_owned(),
            base: base.map(std::path::Path::to_owned),
        });
        compiled
            .into_iter()
            .map(|mut r| {
                r.source = Some(source.clone());
                r.in_tenant(tenant).map_err(Error::from)
            })
            .collect()
    }

    /// Compiles again the rules planned against a field that has since been widened from
    /// integer to float (see `StreamCatalog::widen_field`), before they see a float batch:
    /// otherwise aligning the batch to the old plan would truncate the values. Called by
    /// the shards when the catalog's widening count moves. The recompiled rules start with
    /// fresh state (their accumulators change type); the log says which.
    pub(super) fn replan_widened(&self) {
        let _one = self.replanning.lock();
        let seen = self.catalog.widenings();
        if self.widenings_seen.load(Ordering::SeqCst) == seen {
            return;
        }
        let stale = |r: &LiveRule| {
            r.plan.inputs.iter().zip(&r.plan.input_schemas).any(|(input, planned)| {
                let Some(now) = StreamName::from_key(input).ok().and_then(|s| self.catalog.get(&s)) else {
                    return false;
                };
                planned
                    .fields()
                    .iter()
                    .any(|f| now.arrow.field_with_name(f.name()).is_ok_and(|n| n.data_type() != f.data_type()))
            })
        };
        let sandbox = self.sandbox.read().clone();
        let mut guard = self.rules.write();
        let mut next: Vec<Arc<LiveRule>> = Vec::with_capacity(guard.len());
        for rule in guard.iter() {
            if !stale(rule) {
                next.push(rule.clone());
                continue;
            }
            let Some(src) = rule.plan.source.clone() else {
                next.push(rule.clone());
                continue;
            };
            let fresh = self
                .compile_in(&src.tenant, &src.text, src.base.as_deref(), sandbox.as_ref())
                .ok()
                .and_then(|all| all.into_iter().find(|r| r.name == rule.plan.name))
                .filter(|plan| match &plan.insert_into {
                    Some(target) => StreamName::from_key(target)
                        .map_err(Error::from)
                        .and_then(|t| crate::output::register_derived(&self.catalog, &t, &plan.output))
                        .is_ok(),
                    None => true,
                });
            match fresh {
                Some(plan) => {
                    let generation = self.generation.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        rule = %plan.name,
                        "an input field was widened from integer to float: the rule is compiled again and its \
                         windows and partial matches start afresh"
                    );
                    next.push(Arc::new(LiveRule {
                        label: rule.label.clone(),
                        plan,
                        generation,
                        origin: rule.origin.clone(),
                        stats: RuleStats::default(),
                        last_error: Mutex::new(None),
                        shadow: false,
                        failed: AtomicBool::new(false),
                    }));
                }
                None => {
                    tracing::error!(rule = %rule.plan.name, "an input field was widened and the rule no longer compiles; it is stopped");
                    rule.failed.store(true, Ordering::Relaxed);
                    *rule.last_error.lock() =
                        Some("an input field was widened from integer to float and the rule no longer compiles: deploy it again".to_owned());
                    next.push(rule.clone());
                }
            }
        }
        *guard = Arc::new(next);
        drop(guard);
        self.widenings_seen.store(seen, Ordering::SeqCst);
        self.free_stale_state();
    }

    /// Deploys every rule of `text` (replacing rules of the same names). When `origin` is a
    /// file, rules that file held before and no longer holds are removed. Returns the names
    /// deployed. Nothing changes if any rule fails to compile.
    pub fn deploy(&self, text: &str, origin: Option<&str>) -> Result<Vec<String>> {
        self.deploy_in(ferrite_engine::ids::DEFAULT_TENANT, text, origin)
    }

    /// [`RuleEngine::deploy`] for rules of `tenant`: they read and write only its streams,
    /// and their names are its keys (`tenant/name` outside the default tenant).
    pub fn deploy_in(&self, tenant: &str, text: &str, origin: Option<&str>) -> Result<Vec<String>> {
        // A file's relative table paths start from its directory; the API's from the
        // sandbox's table directory.
        let sandbox = self.sandbox.read().clone();
        let base = origin
            .map(std::path::Path::new)
            .and_then(std::path::Path::parent)
            .map(std::path::Path::to_owned)
            .or_else(|| sandbox.as_ref().map(|s| s.table_dir.clone()));
        let base = base.as_deref();
        // A stream the file declares fields of and that does not exist yet is created with
        // them first, so that the file's rules deploy now instead of waiting for its first
        // event (which they would not see).
        if let Ok(declarations) = self.stream_declarations(tenant, text) {
            for (stream, fields) in declarations {
                if self.catalog.get(&stream).is_none() {
                    self.catalog.declare(&stream, fields)?;
                }
            }
        }
        let compiled = self.compile_in(tenant, text, base, sandbox.as_ref())?;
        // Declared fields are checked against the streams before anything changes.
        let declarations = self.stream_declarations(tenant, text)?;
        for (stream, fields) in &declarations {
            self.catalog.check_declaration(stream, fields)?;
        }
        let names = self.install(compiled, origin)?;
        for (stream, fields) in declarations {
            self.catalog.declare(&stream, fields)?;
        }
        self.apply_stream_settings(tenant, text)?;
        Ok(names)
    }

    /// The file's `field` declarations, per stream that has any.
    fn stream_declarations(
        &self,
        tenant: &str,
        text: &str,
    ) -> Result<Vec<(StreamName, std::collections::BTreeMap<String, ferrite_engine::catalog::DeclaredField>)>> {
        let file = crate::syntax::parse(text).map_err(Error::Invalid)?;
        let mut out = Vec::new();
        for decl in &file.streams {
            if decl.fields.is_empty() {
                continue;
            }
            let stream = StreamName::in_tenant(tenant, &decl.name.value)?;
            let fields = decl
                .fields
                .iter()
                .map(|f| {
                    let d = ferrite_engine::catalog::DeclaredField { ty: f.ty, unit: f.unit.clone(), tag: f.tag };
                    (f.name.value.clone(), d)
                })
                .collect();
            out.push((stream, fields));
        }
        Ok(out)
    }

    /// Applies the file's `stream NAME { retention D device_tag T default_device 'D' }`
    /// declarations to the catalog (the text has compiled, so it parses). These are settings
    /// of the stream: they stay when the file goes, until set again here (or, for the
    /// retention, through the API).
    fn apply_stream_settings(&self, tenant: &str, text: &str) -> Result<()> {
        let file = crate::syntax::parse(text).map_err(Error::Invalid)?;
        for decl in &file.streams {
            let stream = StreamName::in_tenant(tenant, &decl.name.value)?;
            if let Some(retention) = decl.retention
                && self.catalog.retention(&stream) != Some(retention)
            {
                self.catalog.set_retention(&stream, Some(retention))?;
            }
            let tag = decl.device_tag.as_ref().map(|t| t.value.as_str());
            let device = decl.default_device.as_ref().map(|d| d.value.as_str());
            if tag.is_some() || device.is_some() {
                let (now_tag, now_device) = self.catalog.device_naming(&stream);
                if now_tag.as_deref() != tag || now_device.as_deref() != device {
                    self.catalog.set_device_naming(&stream, tag, device)?;
                }
            }
        }
        Ok(())
    }

    /// Deploys already compiled rules.
    pub fn install(&self, compiled: Vec<CompiledRule>, origin: Option<&str>) -> Result<Vec<String>> {
        for r in &compiled {
            if let Some(j) = &r.join {
                self.prepare_lookup(&r.name, j)?;
            }
        }
        for r in &compiled {
            if let Some(target) = &r.insert_into {
                crate::output::register_derived(&self.catalog, &StreamName::from_key(target)?, &r.output)?;
            }
        }
        let names: Vec<String> = compiled.iter().map(|r| r.name.clone()).collect();
        let mut guard = self.rules.write();
        let mut next: Vec<Arc<LiveRule>> = guard
            .iter()
            .filter(|r| !names.contains(&r.plan.name))
            .filter(|r| origin.is_none() || r.origin.as_deref() != origin)
            .cloned()
            .collect();
        for plan in compiled {
            // Re-deploying a file keeps the state of its rules that did not change.
            // A rule that failed starts afresh.
            let unchanged = guard.iter().find(|r| {
                !r.failed.load(Ordering::Relaxed)
                    && r.plan.name == plan.name
                    && r.origin.as_deref() == origin
                    && r.plan.text == plan.text
                    && r.plan.input_schemas == plan.input_schemas
                    && r.plan.time == plan.time
            });
            if let Some(r) = unchanged {
                next.push(r.clone());
                continue;
            }
            // A rule of the same name from another file is replaced too: names are global.
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            tracing::info!(rule = %plan.name, generation, origin = origin.unwrap_or("api"), "rule deployed");
            next.push(Arc::new(LiveRule {
                label: plan.name.clone(),
                plan,
                generation,
                origin: origin.map(str::to_owned),
                stats: RuleStats::default(),
                last_error: Mutex::new(None),
                shadow: false,
                failed: AtomicBool::new(false),
            }));
        }
        *guard = Arc::new(next);
        drop(guard);
        self.free_stale_state();
        Ok(names)
    }

    /// Frees the state of rules and shadows that are gone or were replaced (a new
    /// generation starts fresh).
    pub(super) fn free_stale_state(&self) {
        let live: Vec<(String, u64)> =
            self.rules().iter().chain(self.shadows.read().iter()).map(|r| (r.state_key(), r.generation)).collect();
        for shard in self.shards.iter().chain(std::iter::once(&self.global)) {
            shard.lock().retain(|key, st| live.iter().any(|(k, g)| k == key && *g == st.generation));
        }
    }

    /// Removes rule `name`.
    pub fn remove(&self, name: &str) -> Result<()> {
        let mut guard = self.rules.write();
        if !guard.iter().any(|r| r.plan.name == name) {
            return Err(Error::NotFound(name.to_owned()));
        }
        *guard = Arc::new(guard.iter().filter(|r| r.plan.name != name).cloned().collect());
        for shard in self.shards.iter().chain(std::iter::once(&self.global)) {
            shard.lock().remove(name);
        }
        let _ = self.remove_shadow(name);
        tracing::info!(rule = name, "rule removed");
        Ok(())
    }

    /// Removes every rule that came from `origin` (a deleted file).
    pub fn remove_origin(&self, origin: &str) -> Vec<String> {
        let gone: Vec<String> = self
            .rules
            .read()
            .iter()
            .filter(|r| r.origin.as_deref() == Some(origin))
            .map(|r| r.plan.name.clone())
            .collect();
        for name in &gone {
            let _ = self.remove(name);
        }
        gone
    }

    /// Status and counters of every rule.
    pub fn list(&self) -> Vec<RuleInfo> {
        self.rules().iter().map(|r| self.info_of(r)).collect()
    }

    /// Status and counters of rule `name`.
    pub fn info(&self, name: &str) -> Result<RuleInfo> {
        let rules = self.rules();
        let rule = rules.iter().find(|r| r.plan.name == name).ok_or_else(|| Error::NotFound(name.to_owned()))?;
        Ok(self.info_of(rule))
    }

    pub(super) fn info_of(&self, r: &LiveRule) -> RuleInfo {
        let state_size = self
            .shards
            .iter()
            .chain(std::iter::once(&self.global))
            .map(|s| s.lock().get(&r.plan.name).filter(|st| st.generation == r.generation).map_or(0, state_size))
            .sum();
        let s = &r.stats;
        let batches = s.batches.load(Ordering::Relaxed);
        RuleInfo {
            name: r.plan.name.clone(),
            status: if r.failed.load(Ordering::Relaxed) { "failed" } else { "running" },
            inputs: r.plan.inputs.clone(),
            insert_into: r.plan.insert_into.clone(),
            origin: r.origin.clone(),
            text: r.plan.text.clone(),
            events_in: s.events_in.load(Ordering::Relaxed),
            events_out: s.events_out.load(Ordering::Relaxed),
            matches: s.matches.load(Ordering::Relaxed),
            late_events: s.late.load(Ordering::Relaxed),
            evicted: s.evicted.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            state_size,
            mean_batch_micros: if batches == 0 {
                0.0
            } else {
                s.busy_nanos.load(Ordering::Relaxed) as f64 / batches as f64 / 1e3
            },
            last_error: r.last_error.lock().clone(),
            has_shadow: self.shadows.read().iter().any(|s| s.plan.name == r.plan.name),
            time: TimeInfo {
                max_delay_ms: r.plan.time.max_delay / 1_000_000,
                lateness_ms: r.plan.time.lateness / 1_000_000,
                processing_time: r.plan.time.processing_time,
            },
        }
    }
}
