//! Errors of the ingest crate.

use ferrite_engine::ErrorClass;

/// Errors raised while receiving and decoding telemetry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The payload is not valid JSON; nothing of it was kept.
    #[error("malformed JSON at line {line}, column {column}: {message}")]
    MalformedJson {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What the parser expected.
        message: String,
    },
    /// The payload is larger than the configured limit.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Size received.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// The payload is not UTF-8 text.
    #[error("payload is not valid UTF-8 at byte {0}")]
    NotUtf8(usize),
    /// A query parameter or header is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// The engine refused the batch or failed to commit it.
    #[error(transparent)]
    Engine(#[from] ferrite_engine::Error),
    /// The WAL commit failed after the batch was accepted.
    #[error("commit failed: {0}")]
    Commit(String),
    /// The server is shutting down.
    #[error("server is shutting down")]
    ShuttingDown,
}

impl Error {
    /// Classifies this error for status codes and retries.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::MalformedJson { .. } | Error::PayloadTooLarge { .. } | Error::NotUtf8(_) | Error::BadRequest(_) => {
                ErrorClass::User
            }
            Error::Engine(e) => e.class(),
            Error::Commit(_) | Error::ShuttingDown => ErrorClass::External,
        }
    }

    /// A short machine-readable code for the API.
    pub fn code(&self) -> &'static str {
        match self {
            Error::MalformedJson { .. } => "malformed_json",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::NotUtf8(_) => "not_utf8",
            Error::BadRequest(_) => "bad_request",
            Error::Engine(ferrite_engine::Error::InvalidStreamName { .. }) => "invalid_stream_name",
            Error::Engine(ferrite_engine::Error::ShuttingDown) | Error::ShuttingDown => "shutting_down",
            Error::Engine(_) => "engine_error",
            Error::Commit(_) => "commit_failed",
        }
    }
}

/// Result type of the ingest crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
