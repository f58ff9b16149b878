//! Pieces of the OpenAPI document that every HTTP crate shares: the error body all
//! endpoints answer with, and the names of the document's tags and security scheme.

use serde::Serialize;
use utoipa::ToSchema;

/// The name of the bearer-token security scheme in the document.
pub const BEARER: &str = "bearer";

/// The error body every Ferrite endpoint answers with.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

impl ErrorBody {
    /// An error with `code` and `message`.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self { error: ErrorDetail { code: code.to_owned(), message: message.into(), details: None } }
    }

    /// This error with per-item details.
    pub fn with_details(mut self, details: Option<serde_json::Value>) -> Self {
        self.error.details = details;
        self
    }
}

/// The code and message of an error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable code (`invalid_json`, `forbidden`, `not_found`, ...).
    pub code: String,
    /// What went wrong, where, and how to fix it.
    pub message: String,
    /// Per-item details where a request held many items (the rejected events of a batch).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
}
