//! Per-rule state on a shard: creating it, finding it, sizing it (a leaf the other
//! runtime modules share).

use super::*;

/// Whether the rule's state is shared by all shards (windows not keyed by device).
pub(super) fn is_global(rule: &LiveRule) -> bool {
    matches!(&rule.plan.operator, OperatorPlan::Window(w) if !w.per_device)
}

/// The rule's state in `map`, created (or recreated for a new generation) when needed.
pub(super) fn state_in<'a>(map: &'a mut HashMap<String, RuleState>, rule: &LiveRule) -> Result<&'a mut RuleState> {
    let key = rule.state_key();
    let fresh = map.get(&key).is_none_or(|s| s.generation != rule.generation);
    if fresh {
        map.insert(key.clone(), new_state(rule)?);
    }
    map.get_mut(&key).ok_or_else(|| Error::Input("rule state vanished".into()))
}

/// The device a window's derived row is written for: its device for per-device windows;
/// for windows across devices, the rule's name (no single device produced it).
pub(super) fn emitted_devices(rule: &LiveRule, emitted: &[crate::window::Emitted]) -> Vec<Arc<str>> {
    if is_global(rule) {
        let name: Arc<str> = Arc::from(rule.plan.name.as_str());
        emitted.iter().map(|_| name.clone()).collect()
    } else {
        emitted.iter().map(|e| e.device.clone()).collect()
    }
}

pub(super) fn new_state(rule: &LiveRule) -> Result<RuleState> {
    let op = match &rule.plan.operator {
        OperatorPlan::Stateless => OpState::Stateless,
        OperatorPlan::Window(w) => {
            let schema = &rule.plan.row_schema;
            let key_types = w
                .keys
                .iter()
                .map(|k| k.data_type(schema))
                .collect::<datafusion::error::Result<Vec<_>>>()
                .map_err(|e| eval(rule, e))?;
            OpState::Window(Box::new(WindowState::new(w.clone(), key_types, schema)?))
        }
        OperatorPlan::Pattern(p) => OpState::Pattern(PatternState::new(p.clone(), rule.plan.state_limit)),
        OperatorPlan::Join(j) => OpState::Join(JoinState::new(j.clone())),
    };
    Ok(RuleState {
        generation: rule.generation,
        devices: hashbrown::HashMap::default(),
        epoch: 0,
        stream: DeviceClock { max_time: i64::MIN, last_seen: 0, epoch: 0 },
        op,
        raised: HashSet::new(),
        rate: HashMap::new(),
        pending: HashMap::new(),
    })
}

pub(super) fn state_size(s: &RuleState) -> usize {
    match &s.op {
        OpState::Stateless => 0,
        OpState::Window(w) => w.size(),
        OpState::Pattern(p) => p.size(),
        OpState::Join(j) => j.size(),
    }
}

pub(super) fn eval(rule: &LiveRule, source: datafusion::error::DataFusionError) -> Error {
    Error::Eval { rule: rule.plan.name.clone(), source }
}
