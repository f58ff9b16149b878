//! The identity plugin's errors.

/// What can go wrong in the identity plugin.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store could not be opened, read or written.
    #[error("identity store: {0}")]
    Store(String),
    /// A policy file or document does not parse or does not validate against the schema.
    #[error("policy: {0}")]
    Policy(String),
    /// A key could not be made, read or used.
    #[error("signing key: {0}")]
    Key(String),
    /// A request names something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A request is malformed or conflicts with what exists.
    #[error("{0}")]
    Invalid(String),
    /// A file could not be written.
    #[error("{0}")]
    Io(String),
}

/// The identity plugin's result.
pub type Result<T> = std::result::Result<T, Error>;
