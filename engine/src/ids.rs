//! Newtype identifiers used at crate boundaries.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Maximum length of a stream name, in bytes.
pub const MAX_STREAM_NAME: usize = 64;
/// Maximum length of a device id, in bytes.
pub const MAX_DEVICE_ID: usize = 128;

/// The tenant everything belongs to until others are made.
pub const DEFAULT_TENANT: &str = "default";

/// Name of a stream: `[A-Za-z_][A-Za-z0-9_]*`, at most 64 bytes; also its SQL table name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(Arc<str>);

impl StreamName {
    /// Validates and wraps a stream name.
    pub fn new(name: &str) -> Result<Self> {
        let reason = if name.is_empty() {
            Some("must not be empty")
        } else if name.len() > MAX_STREAM_NAME {
            Some("longer than 64 bytes")
        } else if !name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            Some("must start with a letter or `_`")
        } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            Some("only letters, digits and `_` are allowed")
        } else if name.eq_ignore_ascii_case("system") || name.eq_ignore_ascii_case("information_schema") {
            Some("reserved name")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidStreamName { name: name.to_owned(), reason }),
            None => Ok(Self(Arc::from(name))),
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamName({})", self.0)
    }
}

/// Identifier of a device: 1 to 128 bytes, no `/`, `+`, `#`, control characters or spaces
/// (it is a level of MQTT topics).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct DeviceId(Arc<str>);

impl DeviceId {
    /// Validates and wraps a device id.
    pub fn new(id: &str) -> Result<Self> {
        validate_device_id(id)?;
        Ok(Self(Arc::from(id)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks a device id without allocating.
pub fn validate_device_id(id: &str) -> Result<()> {
    let reason = if id.is_empty() {
        Some("must not be empty")
    } else if id.len() > MAX_DEVICE_ID {
        Some("longer than 128 bytes")
    } else if id.chars().any(|c| c == '/' || c == '+' || c == '#' || c.is_control() || c.is_whitespace()) {
        Some("must not contain `/`, `+`, `#`, spaces or control characters")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidDeviceId { id: id.to_owned(), reason }),
        None => Ok(()),
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifier of a tenant; `default` until multi-tenancy exists.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct TenantId(Arc<str>);

impl TenantId {
    /// The tenant every stream belongs to today.
    pub fn default_tenant() -> Self {
        Self(Arc::from("default"))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TenantId {
    fn default() -> Self {
        Self::default_tenant()
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names() {
        assert!(StreamName::new("telemetry").is_ok());
        assert!(StreamName::new("_x1").is_ok());
        assert!(StreamName::new("1abc").is_err());
        assert!(StreamName::new("a-b").is_err());
        assert!(StreamName::new("").is_err());
        assert!(StreamName::new("system").is_err());
        assert!(StreamName::new(&"a".repeat(65)).is_err());
    }

    #[test]
    fn device_ids() {
        assert!(DeviceId::new("dev-1.a:b").is_ok());
        assert!(DeviceId::new("a/b").is_err());
        assert!(DeviceId::new("a b").is_err());
        assert!(DeviceId::new("+").is_err());
        assert!(DeviceId::new("").is_err());
    }
}
