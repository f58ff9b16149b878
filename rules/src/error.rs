//! Errors of the rules crate. A rule that does not parse or plan is reported as a
//! [`Diagnostic`]: a message, the span it is about, and a hint, rendered against the source
//! as `file:line:column`, the offending line and a caret.

use crate::ast::Span;

/// A problem found in a rule file, with where it is and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// What is wrong (lowercase, one sentence).
    pub message: String,
    /// Where in the file.
    pub span: Span,
    /// How to fix it, when we can tell.
    pub hint: Option<String>,
    /// A stable code for problems callers treat specially (`unknown-stream`).
    pub code: Option<&'static str>,
}

impl Diagnostic {
    /// A diagnostic at `span`.
    pub fn new(span: Span, message: impl Into<String>) -> Self {
        Self { message: message.into(), span, hint: None, code: None }
    }

    /// Sets the code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// 1-based line and column of the span's start in `source`.
    pub fn line_col(&self, source: &str) -> (usize, usize) {
        line_col(source, self.span.start)
    }

    /// Renders the diagnostic against the file it came from:
    ///
    /// ```text
    /// error: unknown window kind `tumbing`
    ///  --> rules/hot.rules:3:12
    ///   |
    /// 3 |     window tumbing 1m by device_id
    ///   |            ^^^^^^^
    ///   = hint: expected one of: tumbling, hopping, sliding, session, count
    /// ```
    pub fn render(&self, file: &str, source: &str) -> String {
        let (line, col) = self.line_col(source);
        let start = self.span.start.min(source.len());
        let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = source[start..].find('\n').map_or(source.len(), |i| start + i);
        let text = &source[line_start..line_end];
        let width = (self.span.end.min(line_end).saturating_sub(start)).max(1);
        let gutter = line.to_string().len();
        let pad = " ".repeat(gutter);
        let caret_pad: String =
            text[..start - line_start].chars().map(|c| if c == '\t' { '\t' } else { ' ' }).collect();
        let mut out = format!(
            "error: {}\n{pad}--> {file}:{line}:{col}\n{pad} |\n{line} | {text}\n{pad} | {caret_pad}{}\n",
            self.message,
            "^".repeat(width)
        );
        if let Some(h) = &self.hint {
            out.push_str(&format!("{pad} = hint: {h}\n"));
        }
        out
    }
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// 1-based line and column (in characters) of byte `offset` in `source`.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before, |i| &before[i + 1..]).chars().count() + 1;
    (line, col)
}

/// Errors raised by the rules crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The rule file does not parse or plan; each diagnostic points into the source.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Diagnostic>),
    /// No rule of that name is deployed.
    #[error("no rule named `{0}`")]
    NotFound(String),
    /// Reading or writing a rule file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// An input event or recorded file that cannot be used.
    #[error("{0}")]
    Input(String),
    /// DataFusion failed while evaluating a rule (a bug or a runtime error such as a
    /// division by zero).
    #[error("rule `{rule}`: {source}")]
    Eval {
        /// The rule.
        rule: String,
        /// The cause.
        source: datafusion::error::DataFusionError,
    },
    /// An error of the engine (catalog, bus).
    #[error(transparent)]
    Engine(#[from] ferrite_engine::Error),
    /// Arrow failed while building outputs.
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
    /// The rule panicked (a bug): it is disabled until it is deployed again.
    #[error("rule `{rule}` panicked and is disabled until it is deployed again: {message}")]
    Panicked {
        /// The rule.
        rule: String,
        /// The panic's message.
        message: String,
    },
}

impl Error {
    /// Who is at fault: decides the HTTP status.
    pub fn class(&self) -> ferrite_engine::ErrorClass {
        use ferrite_engine::ErrorClass;
        match self {
            Error::Invalid(_) | Error::NotFound(_) | Error::Input(_) => ErrorClass::User,
            Error::Io { .. } => ErrorClass::External,
            Error::Engine(e) => e.class(),
            Error::Eval { .. } | Error::Arrow(_) | Error::Panicked { .. } => ErrorClass::Internal,
        }
    }

    /// Renders every diagnostic against `source` (other errors: their message).
    pub fn render(&self, file: &str, source: &str) -> String {
        match self {
            Error::Invalid(ds) => ds.iter().map(|d| d.render(file, source)).collect::<Vec<_>>().join("\n"),
            other => format!("error: {other}\n"),
        }
    }
}

/// Result type of the rules crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_line_column_and_caret() {
        let src = "rule a {\n    window tumbing 1m\n}\n";
        let start = src.find("tumbing").unwrap_or(0);
        let d = Diagnostic::new(Span { start, end: start + 7 }, "unknown window kind `tumbing`")
            .with_hint("expected one of: tumbling, hopping");
        let out = d.render("x.rules", src);
        assert!(out.contains("--> x.rules:2:12"), "{out}");
        assert!(out.contains("2 |     window tumbing 1m"), "{out}");
        assert!(out.contains("  |            ^^^^^^^\n"), "{out}");
        assert!(out.contains("= hint: expected one of"), "{out}");
    }
}
