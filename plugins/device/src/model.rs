//! A device as the registry keeps it, and the checks every way in (API, import, self
//! registration) applies to it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Most tags or groups one device may have.
pub const MAX_LABELS: usize = 64;
/// Largest attributes object, as JSON bytes.
pub const MAX_ATTRIBUTES_BYTES: usize = 16 * 1024;
/// Longest name, owner, type or firmware version.
pub const MAX_TEXT: usize = 256;
/// Ids that are routes of `/api/v1/devices/...`.
pub const RESERVED_IDS: [&str; 2] = ["import", "register"];

/// What the platform may ask of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Not managed: the platform sends it no management command.
    None,
    /// Semi-managed: configuration and diagnostics, but no software management.
    Semi,
    /// Fully managed: every management command, software updates included.
    #[default]
    Full,
}

impl Level {
    /// Its name in the API and the registry.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::None => "none",
            Level::Semi => "semi",
            Level::Full => "full",
        }
    }

    /// Parses a stored or submitted level.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Level::None),
            "semi" => Ok(Level::Semi),
            "full" => Ok(Level::Full),
            other => Err(Error::Invalid(format!("level {other:?}: use none, semi or full"))),
        }
    }
}

/// Where a device is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = DeviceStatus)]
pub enum Status {
    /// Registered by itself with a provisioning secret; refused until approved.
    Pending,
    /// In service.
    Active,
    /// Disabled: disconnected and refused until enabled again.
    Disabled,
}

impl Status {
    /// Its name in the API and the registry.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Active => "active",
            Status::Disabled => "disabled",
        }
    }

    /// Parses a stored status.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "pending" => Ok(Status::Pending),
            "active" => Ok(Status::Active),
            "disabled" => Ok(Status::Disabled),
            other => Err(Error::Invalid(format!("status {other:?}"))),
        }
    }
}

/// A device's position.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Location {
    /// Degrees north, -90 to 90.
    pub lat: f64,
    /// Degrees east, -180 to 180.
    pub lon: f64,
}

/// One registered device.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Device {
    /// Unique across tenants (it is a level of MQTT topics and a client id).
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// A human name.
    pub name: String,
    /// Its type (`thermostat`): what commands it takes comes with its type.
    #[serde(rename = "type")]
    pub device_type: String,
    /// Who owns it.
    pub owner: String,
    /// Management level.
    pub level: Level,
    /// The gateway it is attached behind, if any.
    pub parent: Option<String>,
    /// Free attributes (a flat or nested JSON object).
    #[schema(value_type = Object)]
    pub attributes: Map<String, Value>,
    /// Labels.
    pub tags: Vec<String>,
    /// Groups (targets of bulk operations).
    pub groups: Vec<String>,
    /// Firmware version it last reported or was registered with.
    pub firmware: String,
    /// Where it is.
    pub location: Option<Location>,
    /// Pending, active or disabled.
    pub status: Status,
    /// Registration, milliseconds since the epoch.
    pub created_at: i64,
    /// Last change, milliseconds since the epoch.
    pub updated_at: i64,
}

/// What a client submits to register or change a device (every field optional).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceInput {
    /// Id (a UUID is made when absent).
    pub id: Option<String>,
    /// Name (default: the id).
    pub name: Option<String>,
    /// Type.
    #[serde(rename = "type")]
    pub device_type: Option<String>,
    /// Owner.
    pub owner: Option<String>,
    /// Management level: `none`, `semi` or `full` (default).
    pub level: Option<String>,
    /// Gateway parent.
    pub parent: Option<String>,
    /// Attributes.
    #[schema(value_type = Option<Object>)]
    pub attributes: Option<Map<String, Value>>,
    /// Tags.
    pub tags: Option<Vec<String>>,
    /// Groups.
    pub groups: Option<Vec<String>>,
    /// Firmware version.
    pub firmware: Option<String>,
    /// Location.
    pub location: Option<Location>,
}

fn text(field: &str, v: &str) -> Result<String> {
    if v.len() > MAX_TEXT {
        return Err(Error::Invalid(format!("`{field}` is longer than {MAX_TEXT} bytes")));
    }
    if v.chars().any(char::is_control) {
        return Err(Error::Invalid(format!("`{field}` contains control characters")));
    }
    Ok(v.to_owned())
}

fn labels(field: &str, v: &[String]) -> Result<Vec<String>> {
    if v.len() > MAX_LABELS {
        return Err(Error::Invalid(format!("more than {MAX_LABELS} `{field}`")));
    }
    let mut out: Vec<String> = Vec::with_capacity(v.len());
    for l in v {
        let l = text(field, l.trim())?;
        if l.is_empty() || l.contains(',') {
            return Err(Error::Invalid(format!("`{field}` entries must be non-empty and contain no comma")));
        }
        if !out.contains(&l) {
            out.push(l);
        }
    }
    Ok(out)
}

impl DeviceInput {
    /// Applies the submitted fields to `device`, checking each.
    pub fn apply(&self, device: &mut Device) -> Result<()> {
        if let Some(v) = &self.name {
            device.name = text("name", v)?;
        }
        if let Some(v) = &self.device_type {
            device.device_type = text("type", v)?;
        }
        if let Some(v) = &self.owner {
            device.owner = text("owner", v)?;
        }
        if let Some(v) = &self.level {
            device.level = Level::parse(v)?;
        }
        if let Some(v) = &self.parent {
            device.parent = if v.is_empty() {
                None
            } else {
                ferrite_engine::ids::validate_device_id(v).map_err(|e| Error::Invalid(format!("`parent`: {e}")))?;
                if *v == device.id {
                    return Err(Error::Invalid("a device cannot be its own parent".into()));
                }
                Some(v.clone())
            };
        }
        if let Some(v) = &self.attributes {
            let size = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
            if size > MAX_ATTRIBUTES_BYTES {
                return Err(Error::Invalid(format!("`attributes` is {size} bytes, over {MAX_ATTRIBUTES_BYTES}")));
            }
            device.attributes = v.clone();
        }
        if let Some(v) = &self.tags {
            device.tags = labels("tags", v)?;
        }
        if let Some(v) = &self.groups {
            device.groups = labels("groups", v)?;
        }
        if let Some(v) = &self.firmware {
            device.firmware = text("firmware", v)?;
        }
        if let Some(l) = self.location {
            if !(-90.0..=90.0).contains(&l.lat) || !(-180.0..=180.0).contains(&l.lon) {
                return Err(Error::Invalid(format!(
                    "location ({}, {}) is not a latitude in [-90, 90] and a longitude in [-180, 180]",
                    l.lat, l.lon
                )));
            }
            device.location = Some(l);
        }
        Ok(())
    }

    /// A new device of `tenant` from these fields (an id is made when none is given).
    pub fn into_device(&self, tenant: &str, now: i64) -> Result<Device> {
        let id = match &self.id {
            Some(id) => {
                ferrite_engine::ids::validate_device_id(id).map_err(|e| Error::Invalid(format!("`id`: {e}")))?;
                if RESERVED_IDS.contains(&id.as_str()) {
                    return Err(Error::Invalid(format!("`id`: {id:?} is reserved (a route of the devices API)")));
                }
                id.clone()
            }
            None => uuid::Uuid::new_v4().to_string(),
        };
        let mut device = Device {
            name: id.clone(),
            id,
            tenant: tenant.to_owned(),
            device_type: String::new(),
            owner: String::new(),
            level: Level::default(),
            parent: None,
            attributes: Map::new(),
            tags: Vec::new(),
            groups: Vec::new(),
            firmware: String::new(),
            location: None,
            status: Status::Active,
            created_at: now,
            updated_at: now,
        };
        self.apply(&mut device)?;
        Ok(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_checked_and_ids_made() -> Result<()> {
        let d = DeviceInput::default().into_device("acme", 1)?;
        assert_eq!(uuid::Uuid::parse_str(&d.id).map(|u| u.get_version_num()).ok(), Some(4));
        assert_eq!((d.name.as_str(), d.level, d.status), (d.id.as_str(), Level::Full, Status::Active));
        let bad = |input: serde_json::Value, want: &str| {
            let input: DeviceInput = serde_json::from_value(input).unwrap_or_default();
            let e = input.into_device("acme", 1).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(want), "expected {want:?} in {e:?}");
        };
        bad(serde_json::json!({"id": "a/b"}), "`id`");
        bad(serde_json::json!({"id": "d1", "level": "total"}), "none, semi or full");
        bad(serde_json::json!({"id": "d1", "parent": "d1"}), "own parent");
        bad(serde_json::json!({"id": "d1", "location": {"lat": 91.0, "lon": 0.0}}), "latitude");
        bad(serde_json::json!({"id": "d1", "tags": ["a,b"]}), "comma");
        bad(serde_json::json!({"id": "d1", "name": "x".repeat(300)}), "longer");
        let d: DeviceInput = serde_json::from_value(serde_json::json!({"tags": ["a", "a", " b "]}))
            .map_err(|e| Error::Invalid(e.to_string()))?;
        assert_eq!(d.into_device("t", 0)?.tags, vec!["a", "b"]);
        Ok(())
    }
}
