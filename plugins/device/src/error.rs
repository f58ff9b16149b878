//! The device plugin's errors.

/// What went wrong, and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is wrong (a field out of range, a malformed id): 400.
    #[error("{0}")]
    Invalid(String),
    /// No such device (in the caller's tenant): 404.
    #[error("{0}")]
    NotFound(String),
    /// The id is taken: 409.
    #[error("{0}")]
    Conflict(String),
    /// The registry's store failed: 500.
    #[error("device registry: {0}")]
    Store(String),
    /// The identity service refused or failed to issue, rotate or revoke credentials.
    #[error("credentials: {0}")]
    Credentials(String),
    /// Erasing a device's data failed (nothing of the failed stream was changed): 500.
    #[error("purging the device's data: {0}")]
    Purge(String),
}

/// The plugin's results.
pub type Result<T> = std::result::Result<T, Error>;
