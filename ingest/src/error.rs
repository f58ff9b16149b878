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
    /// The payload's events span more event-time hours than one request may (each hour is
    /// a Parquet file on every persist).
    #[error(
        "the events span more than {limit} distinct event-time hours, the most one request may span \
         (the `max_hours_per_request` setting): split a backfill into smaller requests"
    )]
    TooManyHours {
        /// Distinct hours counted in the payload (counting stops past the limit).
        hours: usize,
        /// The limit.
        limit: usize,
    },
    /// The tenant used one of its daily quotas; retry after the next 00:00 UTC.
    #[error("{0}")]
    QuotaExceeded(#[from] ferrite_engine::quota::QuotaExceeded),
    /// The server is shutting down.
    #[error("server is shutting down")]
    ShuttingDown,
    /// The node holds back new data: its hot buffer is past the hard bound because
    /// persists fail or lag. Retry after the given number of seconds.
    #[error("the server is overloaded (persisting to the archive is failing or behind); retry in {retry_after}s")]
    Overloaded {
        /// Seconds a client should wait before retrying.
        retry_after: u64,
    },
    /// The node is at capacity: no payload in flight finished within the wait (more is
    /// offered than the decoders and shards keep up with). Retry after `retry_after` seconds.
    #[error(
        "the server is at capacity: no room for this payload within {waited_ms} ms (more data is arriving than \
         it can commit); retry in {retry_after}s, or send from fewer clients at once"
    )]
    Busy {
        /// How long the payload waited for room.
        waited_ms: u64,
        /// Seconds a client should wait before retrying.
        retry_after: u64,
    },
    /// The node is catching up: its hot buffer is past the soft bound while persists drain
    /// it, and this request was among the share turned away to slow intake before the hard
    /// bound stops every door ([`ferrite_engine::Health::shed`]).
    #[error(
        "the server is at capacity: it is writing a backlog to the archive (its memory is {percent}% of the way to \
         its bound) and turns some requests away meanwhile; retry in {retry_after}s"
    )]
    Shed {
        /// How far the hot buffer is from its soft bound (0) to its hard bound (100).
        percent: u32,
        /// Seconds a client should wait before retrying.
        retry_after: u64,
    },
}

impl Error {
    /// Classifies this error for status codes and retries.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::MalformedJson { .. }
            | Error::PayloadTooLarge { .. }
            | Error::NotUtf8(_)
            | Error::BadRequest(_)
            | Error::TooManyHours { .. } => ErrorClass::User,
            Error::Engine(e) => e.class(),
            // Not the payload's fault: over MQTT the acknowledgement is withheld, and the
            // client sends the messages again once the quota resets.
            Error::Commit(_)
            | Error::ShuttingDown
            | Error::Overloaded { .. }
            | Error::Busy { .. }
            | Error::Shed { .. }
            | Error::QuotaExceeded(_) => ErrorClass::External,
        }
    }

    /// Whether the events were not made durable for a reason other than the payload itself
    /// (the disk, an overload, a shutdown): the transport must not acknowledge them, and the
    /// client's retry may succeed. A bad payload is the client's fault and is acknowledged
    /// over MQTT, or it would be resent forever.
    pub fn is_not_durable(&self) -> bool {
        self.class() != ErrorClass::User
    }

    /// A short machine-readable code for the API.
    pub fn code(&self) -> &'static str {
        match self {
            Error::MalformedJson { .. } => "malformed_json",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::NotUtf8(_) => "not_utf8",
            Error::BadRequest(_) => "bad_request",
            Error::Engine(ferrite_engine::Error::InvalidStreamName { .. }) => "invalid_stream_name",
            Error::Engine(ferrite_engine::Error::TooManyStreams { .. }) => "too_many_streams",
            Error::TooManyHours { .. } => "too_many_hours",
            Error::Engine(ferrite_engine::Error::ShuttingDown) | Error::ShuttingDown => "shutting_down",
            Error::Engine(_) => "engine_error",
            Error::Commit(_) => "commit_failed",
            Error::Overloaded { .. } => "overloaded",
            // One code for the client: come back later; the metric tells the two apart.
            Error::Busy { .. } | Error::Shed { .. } => "busy",
            Error::QuotaExceeded(_) => "quota_exceeded",
        }
    }
}

/// Result type of the ingest crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
