//! Errors of the storage crate.

use ferrite_engine::ErrorClass;

/// Errors raised by the WAL, the hot buffer and the archive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation on the data directory failed.
    #[error("{op} `{path}`: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing to or reading from the object store failed.
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// Encoding Parquet failed.
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// An Arrow kernel or IPC encoding failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// The file catalog on disk is not valid.
    #[error("file catalog `{path}` is corrupt: {message}")]
    CorruptCatalog {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The archive location is not supported.
    #[error("archive url `{0}` is not supported (use a directory, file:///dir or s3://bucket/prefix)")]
    UnsupportedArchive(String),
    /// Archive files changed under a rewrite (compaction, retention, purge); nothing was
    /// swapped, the next pass retries.
    #[error("archive rewrite abandoned: {0}")]
    Conflict(String),
    /// An engine error (catalog).
    #[error(transparent)]
    Engine(#[from] ferrite_engine::Error),
}

impl Error {
    /// Classifies this error for status codes and retries.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Io { .. } | Error::ObjectStore(_) | Error::Conflict(_) => ErrorClass::External,
            Error::UnsupportedArchive(_) => ErrorClass::User,
            Error::Engine(e) => e.class(),
            Error::Parquet(_) | Error::Arrow(_) | Error::CorruptCatalog { .. } => ErrorClass::Internal,
        }
    }
}

/// Builds an [`Error::Io`] for `op` on `path`.
pub(crate) fn io<'a>(op: &'static str, path: &'a std::path::Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io { op, path: path.display().to_string(), source }
}

/// Result type of the storage crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
