//! Rule state and watermarks as rows, for `system.rule_state` and `system.watermarks`.

use super::state::*;
use super::*;

impl RuleEngine {
    /// Calls `f` with every live rule's state on every shard (shard `None`: shared state).
    pub(super) fn each_state(
        &self,
        mut f: impl FnMut(Option<usize>, &LiveRule, &RuleState) -> Result<()>,
    ) -> Result<()> {
        let rules = self.rules();
        let maps =
            self.shards.iter().enumerate().map(|(i, s)| (Some(i), s)).chain(std::iter::once((None, &self.global)));
        for (shard, map) in maps {
            let map = map.lock();
            for rule in rules.iter() {
                if let Some(st) = map.get(&rule.plan.name).filter(|s| s.generation == rule.generation) {
                    f(shard, rule, st)?;
                }
            }
        }
        Ok(())
    }

    /// Every open window and partial match of every rule (`system.rule_state`).
    pub fn state_rows(&self) -> Result<Vec<crate::inspect::StateRow>> {
        let mut out = Vec::new();
        self.each_state(|shard, rule, st| {
            {
                match &st.op {
                    OpState::Stateless => {}
                    OpState::Window(w) => {
                        for ow in w.open_windows().map_err(|e| eval(rule, e))? {
                            out.push(crate::inspect::StateRow {
                                rule: rule.plan.name.clone(),
                                shard,
                                kind: "window",
                                device_id: ow.device.to_string(),
                                detail: ow.key,
                                start: ow.start,
                                end: Some(ow.end),
                            });
                        }
                    }
                    OpState::Join(j) => {
                        for (device, side, t) in j.buffered() {
                            out.push(crate::inspect::StateRow {
                                rule: rule.plan.name.clone(),
                                shard,
                                kind: "join_buffer",
                                device_id: device.to_string(),
                                detail: side.to_owned(),
                                start: t,
                                end: None,
                            });
                        }
                    }
                    OpState::Pattern(p) => {
                        let steps = match &rule.plan.operator {
                            OperatorPlan::Pattern(pp) => pp.steps.len(),
                            _ => 0,
                        };
                        for (device, step, start) in p.partials() {
                            out.push(crate::inspect::StateRow {
                                rule: rule.plan.name.clone(),
                                shard,
                                kind: "partial_match",
                                device_id: device.to_string(),
                                detail: format!("at step {} of {steps}", step + 1),
                                start,
                                end: None,
                            });
                        }
                    }
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Every device's clock per stateful rule (`system.watermarks`).
    pub fn watermark_rows(&self) -> Vec<crate::inspect::WatermarkRow> {
        let mut out = Vec::new();
        let _ = self.each_state(|shard, rule, st| {
            if matches!(st.op, OpState::Stateless) {
                return Ok(());
            }
            for (device, c) in st.devices.iter().filter(|(_, c)| c.max_time != i64::MIN) {
                out.push(crate::inspect::WatermarkRow {
                    rule: rule.plan.name.clone(),
                    shard,
                    device_id: device.to_string(),
                    newest_event: c.max_time,
                    watermark: c.max_time.saturating_sub(rule.plan.time.max_delay),
                    last_seen: c.last_seen,
                });
            }
            Ok(())
        });
        out.sort_by(|a, b| (&a.rule, &a.device_id).cmp(&(&b.rule, &b.device_id)));
        out
    }
}
