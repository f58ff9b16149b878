//! Device types: the commands a type accepts, each parameter's type and bounds, and the
//! most commands per minute one device of the type may receive; and the standard
//! management commands every managed device understands. Nothing unbounded reaches a
//! device: a command is checked against these before it is queued.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The default rate limit of a type that sets none.
pub const DEFAULT_MAX_PER_MINUTE: u32 = 60;
/// Longest string parameter when a type sets no `max_length`.
pub const DEFAULT_MAX_LENGTH: usize = 1024;
/// Largest `params` object, as JSON bytes.
pub const MAX_PARAMS_BYTES: usize = 16 * 1024;

/// A parameter's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// A JSON number.
    Number,
    /// A whole number.
    Integer,
    /// `true` or `false`.
    Boolean,
    /// A string.
    String,
    /// A JSON object (configuration).
    Object,
}

/// One parameter of a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// Its type.
    #[serde(rename = "type")]
    pub ty: ParamType,
    /// Whether it must be given.
    #[serde(default)]
    pub required: bool,
    /// Least value (numbers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Greatest value (numbers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The values allowed (strings).
    #[serde(default, rename = "enum", skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<String>>,
    /// Longest value (strings) or largest JSON (objects), bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
}

/// What the platform may ask of a device, by management level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An actuation command of the type (any level).
    Actuation,
    /// Remote management (semi and full).
    Management,
    /// Software and destructive management: firmware, wipe (full only).
    Software,
}

/// One command a type accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// Its parameters; any other parameter is refused.
    #[serde(default)]
    pub params: BTreeMap<String, ParamSpec>,
    /// What the device's management level must allow.
    #[serde(default = "actuation")]
    pub kind: Kind,
    /// How long the device has to answer when the caller sets no timeout, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

fn actuation() -> Kind {
    Kind::Actuation
}

/// A device type: its commands and rate limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceType {
    /// The commands it accepts, beside the standard management commands.
    #[serde(default)]
    pub commands: BTreeMap<String, CommandSpec>,
    /// Most commands per minute to one device of the type (every sender together).
    #[serde(default = "default_rate")]
    pub max_per_minute: u32,
}

fn default_rate() -> u32 {
    DEFAULT_MAX_PER_MINUTE
}

impl Default for DeviceType {
    fn default() -> Self {
        Self { commands: BTreeMap::new(), max_per_minute: DEFAULT_MAX_PER_MINUTE }
    }
}

fn param(ty: ParamType, required: bool) -> ParamSpec {
    ParamSpec { ty, required, min: None, max: None, one_of: None, max_length: None }
}

/// The standard management commands and what each takes (docs/actuation.md says what a
/// device does with each).
pub fn standard_commands() -> BTreeMap<String, CommandSpec> {
    let spec = |kind: Kind, params: Vec<(&str, ParamSpec)>| CommandSpec {
        params: params.into_iter().map(|(n, p)| (n.to_owned(), p)).collect(),
        kind,
        timeout_secs: None,
    };
    let mut feature = param(ParamType::String, true);
    feature.max_length = Some(128);
    let mut message = param(ParamType::String, false);
    message.max_length = Some(256);
    let mut delay = param(ParamType::Integer, false);
    (delay.min, delay.max) = (Some(0.0), Some(3600.0));
    let mut config = param(ParamType::Object, true);
    config.max_length = Some(MAX_PARAMS_BYTES);
    let mut deadline = param(ParamType::Integer, false);
    (deadline.min, deadline.max) = (Some(60.0), Some(30.0 * 86400.0));
    BTreeMap::from([
        ("lock".to_owned(), spec(Kind::Management, vec![("message", message.clone())])),
        ("unlock".to_owned(), spec(Kind::Management, vec![])),
        ("reboot".to_owned(), spec(Kind::Management, vec![("delay_secs", delay)])),
        ("set_config".to_owned(), spec(Kind::Management, vec![("config", config)])),
        ("enable_feature".to_owned(), spec(Kind::Management, vec![("feature", feature.clone())])),
        ("disable_feature".to_owned(), spec(Kind::Management, vec![("feature", feature)])),
        ("locate".to_owned(), spec(Kind::Management, vec![])),
        ("rotate_credentials".to_owned(), spec(Kind::Management, vec![("deadline_secs", deadline)])),
        ("wipe".to_owned(), spec(Kind::Software, vec![("message", message)])),
        ("install".to_owned(), {
            let mut text = param(ParamType::String, true);
            text.max_length = Some(512);
            let mut size = param(ParamType::Integer, true);
            (size.min, size.max) = (Some(0.0), Some(u32::MAX as f64 * 16.0));
            spec(
                Kind::Software,
                ["campaign", "artifact", "version", "url", "sha256", "signature"]
                    .into_iter()
                    .map(|n| (n, text.clone()))
                    .chain([("size", size)])
                    .collect(),
            )
        }),
    ])
}

impl DeviceType {
    /// Checks a definition before it is stored.
    pub fn validate(&self) -> Result<()> {
        if self.max_per_minute == 0 || self.max_per_minute > 60_000 {
            return Err(Error::Invalid("max_per_minute must be between 1 and 60000".into()));
        }
        let standard = standard_commands();
        for (name, c) in &self.commands {
            if standard.contains_key(name) {
                return Err(Error::Invalid(format!(
                    "`{name}` is a standard management command; types cannot redefine it"
                )));
            }
            if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(Error::Invalid(format!("command name {name:?}: letters, digits and `_`, at most 64")));
            }
            for (p, spec) in &c.params {
                if let (Some(lo), Some(hi)) = (spec.min, spec.max)
                    && lo > hi
                {
                    return Err(Error::Invalid(format!("`{name}.{p}`: min {lo} is over max {hi}")));
                }
                let numeric = matches!(spec.ty, ParamType::Number | ParamType::Integer);
                if !numeric && (spec.min.is_some() || spec.max.is_some()) {
                    return Err(Error::Invalid(format!("`{name}.{p}`: min and max apply to numbers only")));
                }
            }
        }
        Ok(())
    }

    /// The spec of command `name` on a device of this type: the type's own, or a standard one.
    pub fn command(&self, name: &str) -> Option<CommandSpec> {
        self.commands.get(name).cloned().or_else(|| standard_commands().remove(name))
    }
}

/// Checks `params` against `spec`: every parameter declared, of its type, within its bounds,
/// the required ones present. The error names the parameter and the violated limit. An
/// integer parameter given as a whole float (`40.0`, as rules fill templates) is sent as
/// an integer.
pub fn check_params(command: &str, spec: &CommandSpec, params: &mut Map<String, Value>) -> Result<()> {
    let size = serde_json::to_vec(params).map(|b| b.len()).unwrap_or(usize::MAX);
    if size > MAX_PARAMS_BYTES {
        return Err(Error::Limit(format!("`{command}`: params are {size} bytes, over {MAX_PARAMS_BYTES}")));
    }
    for (name, value) in params.iter_mut() {
        let Some(p) = spec.params.get(name) else {
            let known: Vec<&str> = spec.params.keys().map(String::as_str).collect();
            return Err(Error::Limit(format!(
                "`{command}` has no parameter `{name}` (it takes: {})",
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            )));
        };
        let bad_type = |want: &str| Error::Limit(format!("`{command}.{name}` must be {want}, not {value}"));
        match p.ty {
            ParamType::Number | ParamType::Integer => {
                let v = value.as_f64().ok_or_else(|| bad_type("a number"))?;
                if p.ty == ParamType::Integer {
                    if v.fract() != 0.0 || !v.is_finite() || v.abs() > 9.0e15 {
                        return Err(bad_type("an integer"));
                    }
                    *value = Value::from(v as i64);
                }
                if let Some(lo) = p.min
                    && v < lo
                {
                    return Err(Error::Limit(format!("`{command}.{name}` = {v} is below its minimum {lo}")));
                }
                if let Some(hi) = p.max
                    && v > hi
                {
                    return Err(Error::Limit(format!("`{command}.{name}` = {v} is above its maximum {hi}")));
                }
            }
            ParamType::Boolean => {
                value.as_bool().ok_or_else(|| bad_type("true or false"))?;
            }
            ParamType::String => {
                let s = value.as_str().ok_or_else(|| bad_type("a string"))?;
                let max = p.max_length.unwrap_or(DEFAULT_MAX_LENGTH);
                if s.len() > max {
                    return Err(Error::Limit(format!("`{command}.{name}` is {} bytes, over its limit {max}", s.len())));
                }
                if let Some(allowed) = &p.one_of
                    && !allowed.iter().any(|a| a == s)
                {
                    return Err(Error::Limit(format!("`{command}.{name}` = {s:?} is not one of {allowed:?}")));
                }
            }
            ParamType::Object => {
                if !value.is_object() {
                    return Err(bad_type("an object"));
                }
                let max = p.max_length.unwrap_or(MAX_PARAMS_BYTES);
                let len = value.to_string().len();
                if len > max {
                    return Err(Error::Limit(format!("`{command}.{name}` is {len} bytes, over its limit {max}")));
                }
            }
        }
    }
    if let Some((name, _)) = spec.params.iter().find(|(n, p)| p.required && !params.contains_key(*n)) {
        return Err(Error::Limit(format!("`{command}` needs the parameter `{name}`")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thermostat() -> DeviceType {
        serde_json::from_value(serde_json::json!({
            "commands": {
                "set_temp": {"params": {"target": {"type": "number", "min": 5, "max": 30, "required": true},
                                        "mode": {"type": "string", "enum": ["eco", "comfort"]}}},
                "beep": {}
            },
            "max_per_minute": 10
        }))
        .unwrap_or_default()
    }

    #[test]
    fn params_are_checked_against_the_type() {
        let t = thermostat();
        assert!(t.validate().is_ok());
        let set = t.command("set_temp").unwrap_or_else(|| panic!("set_temp"));
        let check =
            |v: serde_json::Value| check_params("set_temp", &set, &mut v.as_object().cloned().unwrap_or_default());
        assert!(check(serde_json::json!({"target": 21.5, "mode": "eco"})).is_ok());
        let err = |v: serde_json::Value| check(v).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(serde_json::json!({"target": 31})).contains("above its maximum 30"));
        assert!(err(serde_json::json!({"target": 4})).contains("below its minimum 5"));
        assert!(err(serde_json::json!({"target": "hot"})).contains("must be a number"));
        assert!(err(serde_json::json!({"mode": "eco"})).contains("needs the parameter `target`"));
        assert!(err(serde_json::json!({"target": 20, "mode": "turbo"})).contains("not one of"));
        assert!(err(serde_json::json!({"target": 20, "speed": 1})).contains("no parameter `speed`"));
        // Standard commands come with every type; a type cannot redefine them.
        assert!(t.command("wipe").is_some_and(|c| c.kind == Kind::Software));
        assert!(t.command("fly").is_none());
        let mut bad = thermostat();
        bad.commands.insert(
            "reboot".into(),
            CommandSpec { params: BTreeMap::new(), kind: Kind::Actuation, timeout_secs: None },
        );
        assert!(bad.validate().is_err());
        let reboot = t.command("reboot").unwrap_or_else(|| panic!("reboot"));
        let mut p = serde_json::json!({"delay_secs": 1.5}).as_object().cloned().unwrap_or_default();
        assert!(check_params("reboot", &reboot, &mut p).is_err_and(|e| e.to_string().contains("integer")));
        let mut p = serde_json::json!({"delay_secs": 30.0}).as_object().cloned().unwrap_or_default();
        assert!(check_params("reboot", &reboot, &mut p).is_ok());
        assert_eq!(p["delay_secs"], serde_json::json!(30), "whole floats are sent as integers");
    }
}
