//! Checks every SQL piece of a parsed rule file (filters, select lists, `having`, `on`,
//! window keys) with DataFusion's SQL parser alone, without any schema. Planning checks
//! types and columns once the streams exist; this finds syntax errors before that, so
//! `ferrite rules check` on a laptop or in CI (where no stream exists) still fails on
//! `from telemetry[temperature >]`, at the line and column of the mistake.

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::Token;

use crate::ast::{RuleFile, Source, Span, Spanned, StepDef, StreamRef};
use crate::error::Diagnostic;

/// What a piece of SQL must be.
#[derive(Clone, Copy)]
enum Piece {
    /// One expression (filters, `having`, `on`, keys).
    Expr,
    /// A select list.
    Projection,
}

/// Every SQL syntax error in `file`, one diagnostic per piece, pointing into `source`.
pub fn check(file: &RuleFile, source: &str) -> Vec<Diagnostic> {
    let mut pieces: Vec<(&Spanned<String>, Piece, &str)> = Vec::new();
    for rule in &file.rules {
        let mut refs: Vec<&StreamRef> = Vec::new();
        match &rule.from {
            Source::Stream(r) => refs.push(r),
            Source::Pattern(p) => {
                for step in &p.steps {
                    match step {
                        StepDef::Event { input, .. } | StepDef::Absent { input, .. } => refs.push(input),
                    }
                }
            }
        }
        for r in refs {
            if let Some(f) = &r.filter {
                pieces.push((f, Piece::Expr, "filter"));
            }
        }
        if let Some(j) = &rule.join {
            pieces.push((&j.on, Piece::Expr, "join condition"));
        }
        if let Some(w) = &rule.window {
            for k in &w.by {
                pieces.push((k, Piece::Expr, "window key"));
            }
        }
        if let Some(s) = &rule.select {
            pieces.push((s, Piece::Projection, "select list"));
        }
        if let Some(h) = &rule.having {
            pieces.push((h, Piece::Expr, "having condition"));
        }
    }
    pieces.into_iter().filter_map(|(text, piece, what)| check_piece(text, piece, what, source)).collect()
}

fn check_piece(text: &Spanned<String>, piece: Piece, what: &str, source: &str) -> Option<Diagnostic> {
    let dialect = GenericDialect {};
    let result = Parser::new(&dialect).try_with_sql(&text.value).and_then(|mut p| {
        match piece {
            Piece::Expr => p.parse_expr().map(|_| ())?,
            Piece::Projection => p.parse_projection().map(|_| ())?,
        }
        let next = p.peek_token();
        if next.token == Token::EOF {
            Ok(())
        } else {
            Err(ParserError::ParserError(format!(
                "Expected: end of the {what}, found: {} at Line: {}, Column: {}",
                next.token, next.span.start.line, next.span.start.column
            )))
        }
    });
    let err = result.err()?;
    let message = err.to_string();
    let at = location(&message).and_then(|(line, col)| offset_of(&text.value, line, col));
    // Point at the spot the parser names, or at the end of the piece (it ended too soon).
    let start = text_start(text, source) + at.unwrap_or(text.value.len());
    let span = Span { start, end: (start + 1).min(source.len().max(start)) };
    let clean =
        message.trim_start_matches("sql parser error: ").split(" at Line:").next().unwrap_or_default().to_owned();
    Some(
        Diagnostic::new(span, format!("invalid SQL in the {what}: {clean}"))
            .with_hint("the expression must be valid SQL (the same syntax as POST /api/v1/sql)"),
    )
}

/// Where the piece's text starts in `source` (its span may include leading blanks).
fn text_start(text: &Spanned<String>, source: &str) -> usize {
    let from = text.span.start.min(source.len());
    source.get(from..).and_then(|rest| rest.find(text.value.as_str())).map_or(from, |i| from + i)
}

/// `Line: L, Column: C` from a parser message.
fn location(message: &str) -> Option<(usize, usize)> {
    let rest = &message[message.rfind("Line: ")? + "Line: ".len()..];
    let (line, rest) = rest.split_once(", Column: ")?;
    let col: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((line.trim().parse().ok()?, col.parse().ok()?))
}

/// Byte offset of 1-based `line` and character `col` in `text`.
fn offset_of(text: &str, line: usize, col: usize) -> Option<usize> {
    let line_start: usize = text.split_inclusive('\n').take(line.checked_sub(1)?).map(str::len).sum();
    let line_text = text.get(line_start..)?;
    let within = line_text.char_indices().nth(col.checked_sub(1)?).map_or(line_text.len(), |(i, _)| i);
    Some(line_start + within)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(src: &str) -> Vec<(String, (usize, usize))> {
        let file = match crate::syntax::parse(src) {
            Ok(f) => f,
            Err(e) => return e.into_iter().map(|d| (d.message.clone(), d.line_col(src))).collect(),
        };
        check(&file, src).into_iter().map(|d| (d.message.clone(), d.line_col(src))).collect()
    }

    #[test]
    fn syntax_errors_are_found_without_a_schema() {
        let e = errors("rule bad {\n    from telemetry[temperature >]\n    insert into x\n}\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].0.starts_with("invalid SQL in the filter"), "{e:?}");
        assert_eq!(e[0].1.0, 2, "on the filter's line: {e:?}");
        let e =
            errors("rule bad {\n    from telemetry\n    select device_id, avg(temperature) as\n    insert into x\n}\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].0.contains("select list"), "{e:?}");
        let e = errors(
            "rule bad {\n    from telemetry\n    window tumbling 1m by device_id\n    select device_id, count(*) as n\n    having n >> > 2\n    insert into x\n}\n",
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].1, (5, 17), "at the `>` the parser could not take: {e:?}");
    }

    #[test]
    fn valid_rules_pass() {
        let src = "rule ok {\n    from every a = telemetry[door = 'open'] -> b = telemetry[device_id = a.device_id and temperature > a.temperature + 5] within 10m\n    select a.device_id, a.time as opened_at, b.temperature\n    insert into y\n}\n";
        assert_eq!(errors(src), Vec::new());
    }
}
