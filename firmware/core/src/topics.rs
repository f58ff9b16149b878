//! The platform's MQTT topics (see the server's docs/api.md, "MQTT"):
//!
//! | topic | direction |
//! |---|---|
//! | `devices/{id}/telemetry`, `devices/{id}/telemetry/{stream}` | device → platform |
//! | `devices/{id}/commands` | platform → device: `{"id", "name", "params"}` |
//! | `devices/{id}/commands/result` | device → platform: `{"id", "status", "result"}` |
//! | `devices/{id}/shadow/desired` | platform → device: `{"version", "state"}` |
//! | `devices/{id}/shadow/reported` | device → platform |
//! | `devices/{id}/status` | device (its will): `online` / `offline` |

use alloc::format;
use alloc::string::String;

/// Longest device id the platform accepts, in bytes.
pub const MAX_DEVICE_ID: usize = 128;

/// Why a device id or a stream name cannot be used in a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    /// Empty.
    Empty,
    /// Longer than [`MAX_DEVICE_ID`] bytes.
    TooLong,
    /// Contains `/`, `+`, `#`, a space or a control character.
    BadCharacter,
}

impl core::fmt::Display for TopicError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            TopicError::Empty => "must not be empty",
            TopicError::TooLong => "longer than 128 bytes",
            TopicError::BadCharacter => "must not contain `/`, `+`, `#`, spaces or control characters",
        })
    }
}

/// Checks a device id (or a stream name) as the platform does.
pub fn validate_id(id: &str) -> Result<(), TopicError> {
    if id.is_empty() {
        Err(TopicError::Empty)
    } else if id.len() > MAX_DEVICE_ID {
        Err(TopicError::TooLong)
    } else if id.chars().any(|c| c == '/' || c == '+' || c == '#' || c.is_control() || c.is_whitespace()) {
        Err(TopicError::BadCharacter)
    } else {
        Ok(())
    }
}

/// `devices/{id}/telemetry`, or `devices/{id}/telemetry/{stream}` for another stream than
/// `telemetry`.
pub fn telemetry(device: &str, stream: Option<&str>) -> String {
    match stream {
        Some(s) if s != "telemetry" => format!("devices/{device}/telemetry/{s}"),
        _ => format!("devices/{device}/telemetry"),
    }
}

/// `devices/{id}/commands`: where a device receives its commands.
pub fn commands(device: &str) -> String {
    format!("devices/{device}/commands")
}

/// `devices/{id}/commands/result`: where a device answers them.
pub fn command_result(device: &str) -> String {
    format!("devices/{device}/commands/result")
}

/// `devices/{id}/shadow/desired`: the desired state, from the platform.
pub fn shadow_desired(device: &str) -> String {
    format!("devices/{device}/shadow/desired")
}

/// `devices/{id}/shadow/reported`: the device's reported state.
pub fn shadow_reported(device: &str) -> String {
    format!("devices/{device}/shadow/reported")
}

/// `devices/{id}/ota/status`: a software update's progress (`{"campaign", "state", "detail"?}`).
pub fn ota_status(device: &str) -> String {
    format!("devices/{device}/ota/status")
}

/// `devices/{id}/status`: `online`, and `offline` as the will.
pub fn status(device: &str) -> String {
    format!("devices/{device}/status")
}

/// What an inbound message is, and for which device (a gateway receives for its children).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// A command for `device`.
    Command(&'a str),
    /// Desired state for `device`.
    Desired(&'a str),
}

/// Classifies an inbound topic; `None` for anything a device does not act on.
pub fn parse_inbound(topic: &str) -> Option<Inbound<'_>> {
    let rest = topic.strip_prefix("devices/")?;
    let (device, what) = rest.split_once('/')?;
    if validate_id(device).is_err() {
        return None;
    }
    match what {
        "commands" => Some(Inbound::Command(device)),
        "shadow/desired" => Some(Inbound::Desired(device)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_the_contract() {
        assert_eq!(telemetry("d1", None), "devices/d1/telemetry");
        assert_eq!(telemetry("d1", Some("telemetry")), "devices/d1/telemetry");
        assert_eq!(telemetry("d1", Some("power")), "devices/d1/telemetry/power");
        assert_eq!(command_result("d1"), "devices/d1/commands/result");
        assert_eq!(parse_inbound("devices/d1/commands"), Some(Inbound::Command("d1")));
        assert_eq!(parse_inbound("devices/child-7/shadow/desired"), Some(Inbound::Desired("child-7")));
        assert_eq!(parse_inbound("devices/d1/commands/result"), None);
        assert_eq!(parse_inbound("devices/+/commands"), None);
        assert_eq!(parse_inbound("alerts/x"), None);
    }

    #[test]
    fn ids_are_checked_as_the_platform_checks_them() {
        assert_eq!(validate_id(""), Err(TopicError::Empty));
        assert_eq!(validate_id("a/b"), Err(TopicError::BadCharacter));
        assert_eq!(validate_id("a b"), Err(TopicError::BadCharacter));
        assert_eq!(validate_id(&"x".repeat(129)), Err(TopicError::TooLong));
        assert!(validate_id("truck_42-é").is_ok());
    }
}
