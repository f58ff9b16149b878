//! Errors of the query crate.

use ferrite_engine::ErrorClass;

/// Errors raised while planning or running SQL.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The SQL does not parse.
    #[error("SQL syntax error: {0}")]
    Syntax(String),
    /// The query names a table that is not a stream.
    #[error("unknown table `{0}`; GET /api/v1/streams lists the streams")]
    UnknownTable(String),
    /// The query is valid SQL but cannot be planned (unknown column, type mismatch...).
    #[error("invalid query: {0}")]
    Plan(String),
    /// Running the query failed.
    #[error("query failed: {0}")]
    Execution(String),
    /// The statement is not a query: the SQL endpoint is read-only.
    #[error("only queries (SELECT, WITH, EXPLAIN, SHOW) are allowed here: {0}")]
    ReadOnly(String),
    /// The query ran past the configured time limit.
    #[error("query cancelled after {0:?} (the `sql_timeout` setting); narrow the time range or aggregate more")]
    Timeout(std::time::Duration),
    /// The query needs more memory than the configured pool, or returns more than the cap.
    #[error("{0}")]
    ResourcesExhausted(String),
    /// Encoding the result failed.
    #[error("cannot encode the result: {0}")]
    Encode(String),
    /// The tenant used its daily query quota; retry after the next 00:00 UTC.
    #[error("{0}")]
    QuotaExceeded(#[from] ferrite_engine::quota::QuotaExceeded),
}

impl Error {
    /// Classifies this error for status codes.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Syntax(_)
            | Error::UnknownTable(_)
            | Error::Plan(_)
            | Error::ReadOnly(_)
            | Error::Timeout(_)
            | Error::ResourcesExhausted(_)
            | Error::QuotaExceeded(_) => ErrorClass::User,
            Error::Execution(_) | Error::Encode(_) => ErrorClass::Internal,
        }
    }

    /// Machine-readable code for the API.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Syntax(_) => "sql_syntax",
            Error::UnknownTable(_) => "unknown_table",
            Error::Plan(_) => "invalid_query",
            Error::ReadOnly(_) => "read_only",
            Error::Timeout(_) => "query_timeout",
            Error::ResourcesExhausted(_) => "resources_exhausted",
            Error::Execution(_) => "query_failed",
            Error::Encode(_) => "encode_failed",
            Error::QuotaExceeded(_) => "quota_exceeded",
        }
    }

    /// Classifies a DataFusion error.
    pub fn from_datafusion(e: datafusion::error::DataFusionError) -> Self {
        use datafusion::error::DataFusionError as D;
        match e.find_root() {
            D::SQL(p, _) => Error::Syntax(p.to_string()),
            D::Plan(m)
                if m.starts_with("DDL not supported")
                    || m.starts_with("DML not supported")
                    || m.starts_with("Statement not supported") =>
            {
                Error::ReadOnly(m.clone())
            }
            D::ResourcesExhausted(m) => Error::ResourcesExhausted(format!(
                "the query needs more memory than the `sql_memory_limit` setting allows ({m}); \
                 narrow the time range, aggregate, or add LIMIT"
            )),
            D::Plan(m) => match table_not_found(m) {
                Some(t) => Error::UnknownTable(t),
                None => Error::Plan(m.clone()),
            },
            D::SchemaError(s, _) => Error::Plan(s.to_string()),
            D::NotImplemented(m) => Error::Plan(format!("not supported: {m}")),
            other => Error::Execution(other.to_string()),
        }
    }
}

fn table_not_found(m: &str) -> Option<String> {
    let rest = m.strip_prefix("table '")?;
    let name = rest.split('\'').next()?;
    m.contains("not found").then(|| name.rsplit('.').next().unwrap_or(name).to_owned())
}

/// Result type of the query crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
