//! Shadow deployments: a new version of a rule run beside the live one and compared.

use super::*;

impl RuleEngine {
    /// Deploys every rule of `text` as the shadow of the live rule of the same name: it runs
    /// on the same events from now on, its outputs are compared with the live rule's
    /// (`shadow_report`) and neither committed nor acted on, until it is promoted or removed.
    pub fn deploy_shadow(&self, text: &str) -> Result<Vec<String>> {
        self.deploy_shadow_in(ferrite_engine::ids::DEFAULT_TENANT, text)
    }

    /// [`RuleEngine::deploy_shadow`] for rules of `tenant` (names are the tenant's keys).
    pub fn deploy_shadow_in(&self, tenant: &str, text: &str) -> Result<Vec<String>> {
        let compiled = self.check_in(tenant, text)?;
        let rules = self.rules();
        for r in &compiled {
            if !rules.iter().any(|l| l.plan.name == r.name) {
                return Err(Error::Input(format!(
                    "no live rule `{}` to shadow; deploy it first (a shadow is a new version of a running rule)",
                    r.name
                )));
            }
        }
        let names: Vec<String> = compiled.iter().map(|r| r.name.clone()).collect();
        let mut guard = self.shadows.write();
        let mut next: Vec<Arc<LiveRule>> = guard.iter().filter(|s| !names.contains(&s.plan.name)).cloned().collect();
        for plan in compiled {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            self.diffs.lock().insert(plan.name.clone(), ShadowDiff::default());
            tracing::info!(rule = %plan.name, generation, "shadow deployed");
            next.push(Arc::new(LiveRule {
                label: format!("{} (shadow)", plan.name),
                plan,
                generation,
                origin: None,
                stats: RuleStats::default(),
                last_error: Mutex::new(None),
                shadow: true,
                failed: AtomicBool::new(false),
            }));
        }
        *guard = Arc::new(next);
        drop(guard);
        self.free_stale_state();
        Ok(names)
    }

    /// Where the shadow of rule `name` and the live rule have disagreed so far.
    pub fn shadow_report(&self, name: &str) -> Result<ShadowReport> {
        let shadows = self.shadows.read().clone();
        let shadow =
            shadows.iter().find(|s| s.plan.name == name).ok_or_else(|| Error::NotFound(format!("{name} (shadow)")))?;
        let diffs = self.diffs.lock();
        let d = diffs.get(name).ok_or_else(|| Error::NotFound(format!("{name} (shadow)")))?;
        let mut differing: Vec<(&String, &i64)> = d.balance.iter().filter(|(_, n)| **n != 0).collect();
        differing.sort();
        let side = |positive: bool| -> Vec<serde_json::Value> {
            differing
                .iter()
                .filter(|(_, n)| (**n > 0) == positive)
                .take(100)
                .map(|(row, n)| {
                    let mut v: serde_json::Value = serde_json::from_str(row).unwrap_or(serde_json::Value::Null);
                    if let Some(o) = v.as_object_mut() {
                        o.insert("times".into(), serde_json::json!(n.abs()));
                    }
                    v
                })
                .collect()
        };
        Ok(ShadowReport {
            name: name.to_owned(),
            shadow_text: shadow.plan.text.clone(),
            live_rows: d.live_rows,
            shadow_rows: d.shadow_rows,
            only_live: side(true),
            only_shadow: side(false),
            differing: differing.len(),
            untracked: d.untracked,
        })
    }

    /// Makes the shadow of rule `name` the live version (its state starts afresh).
    pub fn promote(&self, name: &str) -> Result<()> {
        let shadow = {
            let mut guard = self.shadows.write();
            let s = guard
                .iter()
                .find(|s| s.plan.name == name)
                .cloned()
                .ok_or_else(|| Error::NotFound(format!("{name} (shadow)")))?;
            *guard = Arc::new(guard.iter().filter(|x| x.plan.name != name).cloned().collect());
            s
        };
        self.diffs.lock().remove(name);
        let origin = self.rules().iter().find(|r| r.plan.name == name).and_then(|r| r.origin.clone());
        let _ = self.install(vec![shadow.plan.clone()], None)?;
        if let Some(o) = origin {
            tracing::info!(rule = name, file = %o, "promoted a shadow over a rule from a file: the file wins again when it changes");
        }
        Ok(())
    }

    /// Removes the shadow of rule `name`.
    pub fn remove_shadow(&self, name: &str) -> Result<()> {
        let mut guard = self.shadows.write();
        if !guard.iter().any(|s| s.plan.name == name) {
            return Err(Error::NotFound(format!("{name} (shadow)")));
        }
        *guard = Arc::new(guard.iter().filter(|x| x.plan.name != name).cloned().collect());
        drop(guard);
        self.diffs.lock().remove(name);
        self.free_stale_state();
        Ok(())
    }

    /// Records outputs of a rule that has a shadow (or of the shadow) for the comparison.
    pub(super) fn record_shadow_outputs(&self, rule: &LiveRule, outputs: &[StreamBatch]) {
        let relevant: Vec<StreamBatch> = outputs
            .iter()
            .filter(|b| {
                Some(b.stream.as_str()) == rule.plan.insert_into.as_deref()
                    || (b.stream.local() == ALERTS_STREAM && b.stream.tenant() == rule.plan.tenant())
            })
            .cloned()
            .collect();
        let rows = crate::recorded::to_rows(&relevant);
        let mut diffs = self.diffs.lock();
        let Some(d) = diffs.get_mut(&rule.plan.name) else { return };
        let delta = if rule.shadow { -1 } else { 1 };
        if rule.shadow {
            d.shadow_rows += rows.len() as u64;
        } else {
            d.live_rows += rows.len() as u64;
        }
        for r in rows {
            let key = r.to_string();
            let tracked = d.balance.len() < SHADOW_DIFF_LIMIT;
            match d.balance.get_mut(&key) {
                Some(n) => {
                    *n += delta;
                    if *n == 0 {
                        d.balance.remove(&key);
                    }
                }
                None if tracked => {
                    d.balance.insert(key, delta);
                }
                None => d.untracked += 1,
            }
        }
    }
}
