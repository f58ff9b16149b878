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

/// Maximum length of a tenant id, in bytes.
pub const MAX_TENANT_ID: usize = 63;

/// Name of a stream inside its tenant: `[A-Za-z_][A-Za-z0-9_]*`, at most 64 bytes; also its
/// SQL table name in that tenant's schema.
///
/// Streams of the `default` tenant are keyed by their bare name (`telemetry`), those of any
/// other tenant by `tenant/name` (`acme/telemetry`): the key is what the catalog, the WAL,
/// the hot buffer and the rule engine compare, so two tenants' streams of the same name
/// never meet, and data written before tenants existed keeps its key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(Arc<str>);

impl StreamName {
    /// Validates and wraps a stream name of the `default` tenant.
    pub fn new(name: &str) -> Result<Self> {
        validate_stream_name(name)?;
        Ok(Self(Arc::from(name)))
    }

    /// Validates and wraps stream `name` of `tenant`.
    pub fn in_tenant(tenant: &str, name: &str) -> Result<Self> {
        if tenant == DEFAULT_TENANT {
            return Self::new(name);
        }
        validate_tenant(tenant)?;
        validate_stream_name(name)?;
        Ok(Self(Arc::from(format!("{tenant}/{name}"))))
    }

    /// Parses a key as [`StreamName::as_str`] gives it (`name` or `tenant/name`).
    pub fn from_key(key: &str) -> Result<Self> {
        match key.split_once('/') {
            Some((tenant, name)) => Self::in_tenant(tenant, name),
            None => Self::new(key),
        }
    }

    /// The key: `name` in the default tenant, `tenant/name` in any other.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The tenant the stream belongs to.
    pub fn tenant(&self) -> &str {
        self.0.split_once('/').map_or(DEFAULT_TENANT, |(t, _)| t)
    }

    /// The name inside its tenant (its SQL table name there).
    pub fn local(&self) -> &str {
        self.0.split_once('/').map_or(&self.0, |(_, n)| n)
    }
}

fn validate_stream_name(name: &str) -> Result<()> {
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
        None => Ok(()),
    }
}

/// Checks a tenant id: 1 to 63 bytes of `a-z`, `0-9`, `-` and `_`, starting with a letter or
/// digit (it is a directory of the archive and a prefix of object-store keys).
pub fn validate_tenant(id: &str) -> Result<()> {
    let reason = if id.is_empty() {
        Some("must not be empty")
    } else if id.len() > MAX_TENANT_ID {
        Some("longer than 63 bytes")
    } else if !id.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        Some("must start with a lowercase letter or a digit")
    } else if !id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') {
        Some("only lowercase letters, digits, `-` and `_` are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidTenant { id: id.to_owned(), reason }),
        None => Ok(()),
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
    fn streams_of_tenants() -> Result<()> {
        let plain = StreamName::in_tenant(DEFAULT_TENANT, "telemetry")?;
        assert_eq!(plain, StreamName::new("telemetry")?, "the default tenant keeps bare names");
        assert_eq!((plain.tenant(), plain.local()), (DEFAULT_TENANT, "telemetry"));
        let acme = StreamName::in_tenant("acme", "telemetry")?;
        assert_eq!(acme.as_str(), "acme/telemetry");
        assert_eq!((acme.tenant(), acme.local()), ("acme", "telemetry"));
        assert_ne!(acme, plain);
        assert_eq!(StreamName::from_key("acme/telemetry")?, acme);
        assert!(StreamName::from_key("acme/x/y").is_err());
        assert!(StreamName::from_key("../x").is_err());
        assert!(StreamName::in_tenant("Acme", "t").is_err(), "tenant ids are lowercase");
        assert!(StreamName::in_tenant("a.b", "t").is_err());
        assert!(StreamName::in_tenant("", "t").is_err());
        Ok(())
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
