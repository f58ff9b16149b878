//! Errors of the engine crate.

/// Who is at fault for an error: decides the HTTP status and whether a retry can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The caller sent something invalid; retrying the same input fails again (4xx).
    User,
    /// A resource outside Ferrite failed (disk, object store); a retry may succeed (5xx).
    External,
    /// A bug or broken invariant inside Ferrite (5xx).
    Internal,
}

/// Errors raised by the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tenant id that is not valid.
    #[error("invalid tenant id `{id}`: {reason}")]
    InvalidTenant {
        /// The rejected id.
        id: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A stream name that is not a valid identifier.
    #[error("invalid stream name `{name}`: {reason}")]
    InvalidStreamName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A device id that is empty, too long or holds forbidden characters.
    #[error("invalid device id `{id}`: {reason}")]
    InvalidDeviceId {
        /// The rejected id.
        id: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A field whose type conflicts with the column already in the stream.
    #[error("stream `{stream}`: field `{field}` is {expected}, got {found}")]
    TypeConflict {
        /// Stream name.
        stream: String,
        /// Field name.
        field: String,
        /// Type of the existing column.
        expected: FieldTypeName,
        /// Type of the value received.
        found: FieldTypeName,
    },
    /// A field name that cannot become a column.
    #[error("stream `{stream}`: invalid field name `{field}`: {reason}")]
    InvalidFieldName {
        /// Stream name.
        stream: String,
        /// Field name.
        field: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A stream has reached its column limit.
    #[error(
        "stream `{stream}`: too many fields (limit {limit}, the `max_fields_per_stream` setting); cannot add `{field}`"
    )]
    TooManyFields {
        /// Stream name.
        stream: String,
        /// Field that could not be added.
        field: String,
        /// The limit.
        limit: usize,
    },
    /// The catalog has reached its stream limit.
    #[error("cannot create stream `{stream}`: the server holds {limit} streams, its limit (the `max_streams` setting)")]
    TooManyStreams {
        /// Stream that could not be created.
        stream: String,
        /// The limit.
        limit: usize,
    },
    /// Reading or writing the catalog on disk failed.
    #[error("catalog file `{path}`: {source}")]
    CatalogIo {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The catalog on disk is not valid.
    #[error("catalog file `{path}` is corrupt: {message}")]
    CatalogCorrupt {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// An Arrow kernel failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// The engine is shutting down and accepts no more batches.
    #[error("engine is shutting down")]
    ShuttingDown,
    /// Committing a batch to storage failed.
    #[error("commit failed: {0}")]
    Commit(String),
    /// A stream setting is not acceptable.
    #[error("stream `{stream}`: {message}")]
    InvalidSetting {
        /// The stream.
        stream: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// Printable name of a field type, used in error messages.
pub type FieldTypeName = &'static str;

impl Error {
    /// Classifies this error for status codes and retries.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidStreamName { .. }
            | Error::InvalidTenant { .. }
            | Error::InvalidDeviceId { .. }
            | Error::TypeConflict { .. }
            | Error::InvalidFieldName { .. }
            | Error::TooManyFields { .. }
            | Error::TooManyStreams { .. }
            | Error::InvalidSetting { .. } => ErrorClass::User,
            Error::CatalogIo { .. } | Error::Commit(_) | Error::ShuttingDown => ErrorClass::External,
            Error::CatalogCorrupt { .. } | Error::Arrow(_) => ErrorClass::Internal,
        }
    }
}

/// Result type of the engine crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
