//! The actuation plugin's errors.

/// What went wrong, and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed (a bad type definition, a bad timeout): 400.
    #[error("{0}")]
    Invalid(String),
    /// A safety limit refused the command (unknown command, a parameter out of bounds or of
    /// the wrong type, the rate, the device's management level or status): 422, audited.
    #[error("{0}")]
    Limit(String),
    /// The sender may not actuate the device: 403, audited.
    #[error("{0}")]
    Denied(String),
    /// No such device, command or type in the caller's tenant: 404.
    #[error("{0}")]
    NotFound(String),
    /// A change based on an older version (the twin): 409, with the current version.
    #[error("{0}")]
    Stale(String),
    /// The plugin's store failed: 500.
    #[error("actuation store: {0}")]
    Store(String),
}

/// The plugin's results.
pub type Result<T> = std::result::Result<T, Error>;
