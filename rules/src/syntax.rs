//! The rule-file parser: a hand-written recursive descent over the rule structure. SQL
//! expressions inside a rule (filters, select lists, keys, `having`) are cut out as source
//! text, balanced over brackets, quotes and `case ... end`, and handed to DataFusion's SQL
//! parser by the planner, which reports their errors at their position in the file.

use std::time::Duration;

use crate::ast::*;
use crate::error::Diagnostic;

/// Words that open a clause inside a rule body; a select list or `having` ends at the first
/// one found outside brackets, quotes and `case ... end`.
const CLAUSES: &[&str] = &["from", "join", "window", "select", "having", "insert", "then", "output", "limit"];

/// Parses a rule file. Returns every problem found, not only the first.
pub fn parse(source: &str) -> Result<RuleFile, Vec<Diagnostic>> {
    let mut p = Parser { src: source, pos: 0 };
    let mut file = RuleFile::default();
    let mut errors = Vec::new();
    loop {
        p.skip_trivia();
        if p.at_end() {
            break;
        }
        let start = p.pos;
        let word = p.word();
        let result = match word.as_deref() {
            Some("rule") => p.rule(start).map(|r| file.rules.push(r)),
            Some("stream") => p.stream_decl().map(|s| file.streams.push(s)),
            Some("table") => p.table_decl().map(|t| file.tables.push(t)),
            _ => Err(Diagnostic::new(p.span_from(start).max_len(p.src, 1), "expected `rule`, `stream` or `table`")
                .with_hint("a rule file holds `rule NAME { ... }` blocks, `stream NAME { ... }` settings and `table NAME from 'file'` declarations")),
        };
        if let Err(d) = result {
            errors.push(d);
            // Recover: skip to the next top-level declaration.
            p.skip_to_next_declaration();
        }
    }
    let mut seen = std::collections::HashSet::new();
    for r in &file.rules {
        if !seen.insert(r.name.value.as_str()) {
            errors.push(Diagnostic::new(r.name.span, format!("rule `{}` is defined twice", r.name.value)));
        }
    }
    if errors.is_empty() { Ok(file) } else { Err(errors) }
}

pub use ferrite_engine::clock::parse_duration;

struct Parser<'a> {
    src: &'a str,
    pos: usize,
}

type PResult<T> = Result<T, Diagnostic>;

impl Span {
    fn max_len(self, src: &str, n: usize) -> Span {
        if self.end > self.start { self } else { Span { start: self.start, end: (self.start + n).min(src.len()) } }
    }
}

impl<'a> Parser<'a> {
    fn at_end(&self) -> bool {
        self.pos >= self.src.len()
    }

    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    fn peek_char(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn span_from(&self, start: usize) -> Span {
        Span { start, end: self.pos }
    }

    fn here(&self) -> Span {
        let len = self.peek_char().map_or(0, char::len_utf8);
        Span { start: self.pos, end: self.pos + len }
    }

    /// Skips white space and comments (`#` or `--` to the end of the line).
    fn skip_trivia(&mut self) {
        loop {
            let rest = self.rest();
            let trimmed = rest.trim_start();
            self.pos += rest.len() - trimmed.len();
            if trimmed.starts_with('#') || trimmed.starts_with("--") {
                self.pos += trimmed.find('\n').unwrap_or(trimmed.len());
            } else {
                return;
            }
        }
    }

    fn skip_to_next_declaration(&mut self) {
        // Skip the rest of the current block, if any, then resume at a line starting with a
        // declaration keyword.
        while !self.at_end() {
            let line_end = self.rest().find('\n').map_or(self.src.len(), |i| self.pos + i + 1);
            self.pos = line_end;
            let t = self.rest().trim_start();
            if ["rule ", "stream ", "table "].iter().any(|k| t.starts_with(k)) {
                return;
            }
        }
    }

    /// Reads an identifier-like word (letters, digits, `_`), without skipping trivia.
    fn word(&mut self) -> Option<String> {
        let rest = self.rest();
        let len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
        if len == 0 {
            return None;
        }
        self.pos += len;
        Some(rest[..len].to_ascii_lowercase())
    }

    fn peek_word(&self) -> Option<String> {
        let rest = self.rest();
        let len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
        (len > 0).then(|| rest[..len].to_ascii_lowercase())
    }

    fn eat_word(&mut self, w: &str) -> bool {
        self.skip_trivia();
        if self.peek_word().as_deref() == Some(w) {
            self.pos += w.len();
            true
        } else {
            false
        }
    }

    fn expect_word(&mut self, w: &str, hint: &str) -> PResult<()> {
        if self.eat_word(w) {
            return Ok(());
        }
        Err(self.unexpected(&format!("`{w}`")).with_hint(hint))
    }

    fn unexpected(&self, expected: &str) -> Diagnostic {
        let found = match self.peek_word() {
            Some(w) => format!("`{w}`"),
            None => match self.peek_char() {
                Some(c) => format!("`{c}`"),
                None => "the end of the file".to_owned(),
            },
        };
        let span = match self.peek_word() {
            Some(w) => Span { start: self.pos, end: self.pos + w.len() },
            None => self.here().max_len(self.src, 1),
        };
        Diagnostic::new(span, format!("expected {expected}, found {found}"))
    }

    fn eat_char(&mut self, c: char) -> bool {
        self.skip_trivia();
        if self.peek_char() == Some(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn expect_char(&mut self, c: char, hint: &str) -> PResult<()> {
        if self.eat_char(c) {
            return Ok(());
        }
        Err(self.unexpected(&format!("`{c}`")).with_hint(hint))
    }

    fn ident(&mut self, what: &str) -> PResult<Spanned<String>> {
        self.skip_trivia();
        let start = self.pos;
        let rest = self.rest();
        let ok_start = rest.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        let len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
        if !ok_start || len == 0 {
            return Err(self
                .unexpected(what)
                .with_hint("names start with a letter or `_` and hold letters, digits and `_`"));
        }
        self.pos += len;
        Ok(Spanned { value: rest[..len].to_owned(), span: self.span_from(start) })
    }

    fn string(&mut self, what: &str) -> PResult<Spanned<String>> {
        self.skip_trivia();
        let start = self.pos;
        if self.peek_char() != Some('\'') {
            return Err(self.unexpected(what).with_hint("strings are written in single quotes: 'like this'"));
        }
        self.pos += 1;
        let mut value = String::new();
        loop {
            let Some(c) = self.peek_char() else {
                return Err(Diagnostic::new(Span { start, end: start + 1 }, "unterminated string")
                    .with_hint("close it with `'`; write `''` for a quote inside"));
            };
            self.pos += c.len_utf8();
            if c == '\'' {
                if self.peek_char() == Some('\'') {
                    self.pos += 1;
                    value.push('\'');
                    continue;
                }
                break;
            }
            value.push(c);
        }
        Ok(Spanned { value, span: self.span_from(start) })
    }

    fn duration(&mut self) -> PResult<Spanned<Duration>> {
        self.skip_trivia();
        let start = self.pos;
        let rest = self.rest();
        let len = rest.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(rest.len());
        let text = &rest[..len];
        let span = Span { start, end: start + len };
        match parse_duration(text) {
            Some(d) if !d.is_zero() || text.starts_with('0') => {
                self.pos += len;
                Ok(Spanned { value: d, span })
            }
            _ => Err(Diagnostic::new(span.max_len(self.src, 1), format!("expected a duration, found `{text}`"))
                .with_hint("write a number and a unit: 500ms, 10s, 5m, 1h, 1h30m, 2d")),
        }
    }

    fn integer(&mut self, what: &str) -> PResult<u32> {
        self.skip_trivia();
        let rest = self.rest();
        let len = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let n = rest[..len].parse::<u32>().map_err(|_| self.unexpected(what))?;
        self.pos += len;
        Ok(n)
    }

    /// Cuts out SQL text up to (not including) the `close` bracket at depth 0.
    fn balanced(&mut self, close: char) -> PResult<Spanned<String>> {
        let start = self.pos;
        let end = self.scan_sql(|_, c, depth| depth == 0 && c == close)?;
        let Some(end) = end else {
            return Err(Diagnostic::new(Span { start, end: start + 1 }, format!("missing `{close}`"))
                .with_hint(format!("the expression that starts here is not closed by `{close}`")));
        };
        self.pos = end;
        let text = self.src[start..end].trim();
        let lead = self.src[start..end].len() - self.src[start..end].trim_start().len();
        Ok(Spanned { value: text.to_owned(), span: Span { start: start + lead, end: start + lead + text.len() } })
    }

    /// Cuts out SQL text up to the next clause keyword (or `}`) at depth 0.
    fn clause_text(&mut self, what: &str) -> PResult<Spanned<String>> {
        self.skip_trivia();
        let start = self.pos;
        let src = self.src;
        let end = self.scan_sql(|i, c, depth| {
            if depth != 0 {
                return false;
            }
            if c == '}' {
                return true;
            }
            let prev_ok = i == 0 || !src[..i].ends_with(|p: char| p.is_ascii_alphanumeric() || p == '_' || p == '.');
            prev_ok && CLAUSES.iter().any(|k| starts_with_word(&src[i..], k) && opens_clause(&src[i + k.len()..], k))
        })?;
        let end = end.unwrap_or(self.src.len());
        let text = self.src[start..end].trim_end();
        if text.is_empty() {
            return Err(self.unexpected(what));
        }
        self.pos = start + text.len();
        Ok(Spanned { value: text.to_owned(), span: Span { start, end: start + text.len() } })
    }

    /// Scans SQL text from the current position, tracking brackets, quotes and
    /// `case ... end`; returns the offset where `stop(offset, char, depth)` holds, or where a
    /// closer with no opener ends the text. An opener closed by the wrong bracket, or not at
    /// all, is reported where it opens.
    fn scan_sql(&self, mut stop: impl FnMut(usize, char, i32) -> bool) -> PResult<Option<usize>> {
        // Open brackets and `case`s: what closes each, and where it opened.
        let mut open: Vec<(&'static str, usize, usize)> = Vec::new();
        let unclosed = |(closer, at, len): (&'static str, usize, usize)| {
            let what = if closer == "end" { "case" } else { &self.src[at..at + len] };
            Diagnostic::new(Span { start: at, end: at + len }, format!("`{what}` is not closed"))
                .with_hint(format!("add `{closer}` where the expression that starts here ends"))
        };
        let mut iter = self.src[self.pos..].char_indices().peekable();
        let base = self.pos;
        while let Some((off, c)) = iter.next() {
            let i = base + off;
            if stop(i, c, open.len() as i32) {
                return Ok(Some(i));
            }
            match c {
                '(' => open.push((")", i, 1)),
                '[' => open.push(("]", i, 1)),
                '{' => open.push(("}", i, 1)),
                ')' | ']' | '}' => match open.pop() {
                    None => return Ok(Some(i)),
                    Some(o) if o.0.starts_with(c) => {}
                    Some(o) => return Err(unclosed(o)),
                },
                '\'' | '"' => {
                    let mut closed = false;
                    for (_, d) in iter.by_ref() {
                        if d == c {
                            closed = true;
                            break;
                        }
                    }
                    if !closed {
                        return Err(Diagnostic::new(Span { start: i, end: i + 1 }, "unterminated string")
                            .with_hint(format!("close it with `{c}`")));
                    }
                }
                '#' => {
                    // A comment inside a clause: skip to the end of the line.
                    for (_, d) in iter.by_ref() {
                        if d == '\n' {
                            break;
                        }
                    }
                }
                c if c.is_ascii_alphabetic() => {
                    let prev_ok = i == 0 || !self.src[..i].ends_with(|p: char| p.is_ascii_alphanumeric() || p == '_');
                    let rest = &self.src[i..];
                    if prev_ok && starts_with_word(rest, "case") {
                        open.push(("end", i, 4));
                    } else if prev_ok && starts_with_word(rest, "end") {
                        match open.pop() {
                            None => return Ok(Some(i)),
                            Some(o) if o.0 == "end" => {}
                            Some(o) => return Err(unclosed(o)),
                        }
                    }
                    // Skip the rest of the word so its letters are not rescanned.
                    while let Some((_, d)) = iter.peek() {
                        if d.is_ascii_alphanumeric() || *d == '_' {
                            iter.next();
                        } else {
                            break;
                        }
                    }
                }
                _ => {}
            }
        }
        match open.pop() {
            Some(o) => Err(unclosed(o)),
            None => Ok(None),
        }
    }

    /// `field NAME TYPE [unit 'U'] [tag]` (after `field`).
    fn field_decl(&mut self) -> PResult<crate::ast::FieldDecl> {
        use ferrite_engine::FieldType;
        let name = self.ident("a field name")?;
        if matches!(name.value.as_str(), "time" | "device_id" | "ts") {
            return Err(Diagnostic::new(name.span, "`time` and `device_id` are every stream's own columns")
                .with_hint("declare the other fields"));
        }
        self.skip_trivia();
        let start = self.pos;
        let ty = match self.word().as_deref() {
            Some("float" | "double") => FieldType::Float,
            Some("int" | "integer" | "bigint") => FieldType::Int,
            Some("uint") => FieldType::UInt,
            Some("bool" | "boolean") => FieldType::Bool,
            Some("string" | "text") => FieldType::String,
            Some("timestamp") => FieldType::Timestamp,
            _ => {
                self.pos = start;
                return Err(self
                    .unexpected("a field type")
                    .with_hint("types are float, int, uint, bool, string and timestamp"));
            }
        };
        let mut field = crate::ast::FieldDecl { name, ty, unit: None, tag: false };
        loop {
            self.skip_trivia();
            match self.peek_word().as_deref() {
                Some("unit") => {
                    self.word();
                    field.unit = Some(self.string("a unit in quotes ('celsius')")?.value);
                }
                Some("tag") => {
                    let at = self.pos;
                    self.word();
                    if ty != FieldType::String {
                        return Err(Diagnostic::new(self.span_from(at), "only a string field can be a tag")
                            .with_hint("declare it `string tag`"));
                    }
                    field.tag = true;
                }
                _ => return Ok(field),
            }
        }
    }

    fn stream_decl(&mut self) -> PResult<StreamDecl> {
        let name = self.ident("a stream name")?;
        let mut decl = StreamDecl {
            name,
            max_delay: None,
            lateness: None,
            processing_time: false,
            retention: None,
            fields: Vec::new(),
            device_tag: None,
            default_device: None,
        };
        self.expect_char('{', "write `stream NAME { max_delay 5s lateness 1m retention 90d }`")?;
        loop {
            self.skip_trivia();
            if self.eat_char('}') {
                return Ok(decl);
            }
            let start = self.pos;
            match self.word().as_deref() {
                Some("max_delay") => decl.max_delay = Some(self.duration()?.value),
                Some("lateness") => decl.lateness = Some(self.duration()?.value),
                Some("retention") => {
                    let d = self.duration()?;
                    if d.value < ferrite_engine::catalog::MIN_RETENTION {
                        return Err(Diagnostic::new(d.span, "a retention shorter than an hour")
                            .with_hint("the archive drops whole hours: write at least `retention 1h`"));
                    }
                    decl.retention = Some(d.value);
                }
                Some("time") => match self.word_after_trivia().as_deref() {
                    Some("event") => decl.processing_time = false,
                    Some("processing") => decl.processing_time = true,
                    _ => return Err(self.unexpected("`event` or `processing`")),
                },
                Some("device_tag") => {
                    self.skip_trivia();
                    let tag = if self.peek_char() == Some('\'') {
                        self.string("a tag name")?
                    } else {
                        self.ident("a tag name")?
                    };
                    decl.device_tag = Some(tag);
                }
                Some("default_device") => {
                    let id = self.string("a device id in quotes")?;
                    if let Err(e) = ferrite_engine::ids::validate_device_id(&id.value) {
                        return Err(Diagnostic::new(id.span, format!("not a device id: {e}"))
                            .with_hint("write `default_device 'unknown'`"));
                    }
                    decl.default_device = Some(id);
                }
                Some("field") => {
                    let field = self.field_decl()?;
                    if decl.fields.iter().any(|f| f.name.value == field.name.value) {
                        return Err(Diagnostic::new(field.name.span, "this field is declared twice")
                            .with_hint("declare each field once"));
                    }
                    decl.fields.push(field);
                }
                _ => {
                    self.pos = start;
                    return Err(self.unexpected("a stream setting").with_hint(
                        "settings are `max_delay DURATION`, `lateness DURATION`, `time event|processing`, \
                         `retention DURATION`, `field NAME TYPE [unit 'U'] [tag]`, `device_tag NAME`, \
                         `default_device 'ID'`",
                    ));
                }
            }
        }
    }

    fn word_after_trivia(&mut self) -> Option<String> {
        self.skip_trivia();
        self.word()
    }

    fn table_decl(&mut self) -> PResult<TableDecl> {
        let name = self.ident("a table name")?;
        self.expect_word("from", "write `table NAME from 'devices.csv'`")?;
        let path = self.string("a file name")?;
        Ok(TableDecl { name, path })
    }

    fn rule(&mut self, start: usize) -> PResult<RuleDef> {
        let name = self.ident("a rule name")?;
        self.expect_char('{', "a rule's body is written in braces: `rule NAME { from ... }`")?;
        let mut from = None;
        let mut rule = RuleDef {
            name: name.clone(),
            span: Span::default(),
            from: Source::Stream(StreamRef { stream: name.clone(), filter: None }),
            join: None,
            window: None,
            select: None,
            having: None,
            insert_into: None,
            actions: Vec::new(),
            output_rate: None,
            state_limit: None,
        };
        loop {
            self.skip_trivia();
            if self.eat_char('}') {
                break;
            }
            if self.at_end() {
                return Err(Diagnostic::new(name.span, format!("rule `{}` is not closed", name.value))
                    .with_hint("add `}` at the end of the rule"));
            }
            let kw_start = self.pos;
            let kw = self.word();
            let kw_span = self.span_from(kw_start);
            let dup = |what: &str| Diagnostic::new(kw_span, format!("`{what}` appears twice in rule `{}`", name.value));
            match kw.as_deref() {
                Some("from") => {
                    if from.is_some() {
                        return Err(dup("from"));
                    }
                    from = Some(self.source()?);
                }
                Some("join") => {
                    let first = self.ident("a table name, or `alias = stream`")?;
                    self.skip_trivia();
                    let (alias, table) = if self.rest().starts_with('=') && !self.rest().starts_with("==") {
                        self.pos += 1;
                        (Some(first), self.ident("a stream name")?)
                    } else {
                        (None, first)
                    };
                    self.expect_word(
                        "on",
                        "write `join TABLE on CONDITION` or `join b = STREAM on CONDITION within D`",
                    )?;
                    let mut on = self.clause_text("a join condition")?;
                    let mut within = None;
                    // `... within D` ends a stream join's condition.
                    if let Some(at) = on.value.to_ascii_lowercase().rfind(" within ") {
                        let d = on.value[at + 8..].trim();
                        match parse_duration(d) {
                            Some(d) => {
                                within = Some(d);
                                on.value.truncate(at);
                                on.value = on.value.trim_end().to_owned();
                                on.span.end = on.span.start + on.value.len();
                            }
                            None => {
                                return Err(Diagnostic::new(
                                    on.span,
                                    format!("expected a duration after `within`, found `{d}`"),
                                )
                                .with_hint("e.g. `within 1m`"));
                            }
                        }
                    }
                    if alias.is_some() && within.is_none() {
                        return Err(Diagnostic::new(table.span, "a join of two streams needs `within D`").with_hint(
                            "say how far apart in event time joined events may be: `... on a.x = b.x within 1m`",
                        ));
                    }
                    rule.join = Some(JoinClause { table, alias, on, within });
                }
                Some("window") => {
                    if rule.window.is_some() {
                        return Err(dup("window"));
                    }
                    rule.window = Some(self.window(kw_start)?);
                }
                Some("select") => {
                    if rule.select.is_some() {
                        return Err(dup("select"));
                    }
                    rule.select = Some(self.clause_text("a select list")?);
                }
                Some("having") => {
                    if rule.having.is_some() {
                        return Err(dup("having"));
                    }
                    rule.having = Some(self.clause_text("a condition")?);
                }
                Some("insert") => {
                    self.expect_word("into", "write `insert into STREAM`")?;
                    if rule.insert_into.is_some() {
                        return Err(dup("insert into"));
                    }
                    rule.insert_into = Some(self.ident("a stream name")?);
                }
                Some("then") => rule.actions.push(self.action()?),
                Some("output") => {
                    let first = match self.word_after_trivia().as_deref() {
                        Some("first") => true,
                        Some("last") => false,
                        _ => {
                            return Err(self
                                .unexpected("`first` or `last`")
                                .with_hint("write `output first every 1m`"));
                        }
                    };
                    self.expect_word("every", "write `output first every 1m`")?;
                    let every = self.duration()?.value;
                    rule.output_rate = Some(OutputRate { first, every });
                }
                Some("limit") => {
                    self.expect_word("state", "write `limit state 100000`")?;
                    rule.state_limit = Some(self.integer("a number")? as usize);
                }
                _ => {
                    return Err(Diagnostic::new(
                        kw_span.max_len(self.src, 1),
                        match &kw {
                            Some(w) => format!("unknown clause `{w}` in rule `{}`", name.value),
                            None => format!("expected a clause in rule `{}`", name.value),
                        },
                    )
                    .with_hint(
                        "clauses are: from, join, window, select, having, insert into, then, output, limit state",
                    ));
                }
            }
        }
        rule.span = self.span_from(start);
        match from {
            Some(f) => rule.from = f,
            None => {
                return Err(Diagnostic::new(name.span, format!("rule `{}` has no `from` clause", name.value))
                    .with_hint("say what it reads: `from telemetry[temperature > 30]`"));
            }
        }
        if rule.insert_into.is_none() && rule.actions.is_empty() {
            return Err(Diagnostic::new(name.span, format!("rule `{}` has no output", name.value))
                .with_hint("add `insert into STREAM` or a `then` action (alert, publish, command, webhook)"));
        }
        Ok(rule)
    }

    fn stream_ref(&mut self) -> PResult<StreamRef> {
        let stream = self.ident("a stream name")?;
        let filter = self.bracket_filter()?;
        Ok(StreamRef { stream, filter })
    }

    /// `[condition]` right after a stream name, if there is one.
    fn bracket_filter(&mut self) -> PResult<Option<Spanned<String>>> {
        if self.peek_char() != Some('[') {
            return Ok(None);
        }
        self.pos += 1;
        let f = self.balanced(']')?;
        self.pos += 1;
        Ok(Some(f))
    }

    fn source(&mut self) -> PResult<Source> {
        self.skip_trivia();
        let start = self.pos;
        let every = self.eat_word("every");
        // A pattern starts with `every`, `alias =` or has `->` / `,` after its first step.
        let mut first = self.steps()?;
        self.skip_trivia();
        let is_pattern = every
            || first.len() > 1
            || matches!(first[0], StepDef::Absent { .. })
            || self.rest().starts_with("->")
            || matches!(&first[0], StepDef::Event { alias, input, min, max, .. } if alias.value != input.stream.value || *min != 1 || *max != Some(1));
        if !is_pattern && let StepDef::Event { input, .. } = first.remove(0) {
            return Ok(Source::Stream(input));
        }
        let mut steps = first;
        let mut strict = None;
        loop {
            self.skip_trivia();
            let sep_strict = if self.rest().starts_with("->") {
                self.pos += 2;
                false
            } else if self.rest().starts_with(',') {
                self.pos += 1;
                true
            } else {
                break;
            };
            if let Some(s) = strict
                && s != sep_strict
            {
                return Err(Diagnostic::new(
                    Span { start: self.pos - 1, end: self.pos },
                    "a pattern mixes `->` and `,`",
                )
                .with_hint(
                    "use `->` (followed by, other events may come between) or `,` (strictly next event) throughout",
                ));
            }
            strict = Some(sep_strict);
            self.skip_trivia();
            steps.extend(self.steps()?);
        }
        let within = if self.eat_word("within") { Some(self.duration()?.value) } else { None };
        let span = self.span_from(start);
        if let Some(StepDef::Absent { .. }) = steps.first() {
            return Err(Diagnostic::new(span, "a pattern cannot start with `not`").with_hint(
                "start with the event that opens the wait: `every a = telemetry -> not telemetry[...] for 2m`",
            ));
        }
        for (i, s) in steps.iter().enumerate() {
            if let StepDef::Absent { duration: None, input } = s
                && (within.is_none() || i + 1 != steps.len())
            {
                return Err(Diagnostic::new(input.stream.span, "`not` needs a duration")
                    .with_hint("write `not STREAM[...] for 2m`, or end the pattern with `within 2m`"));
            }
        }
        Ok(Source::Pattern(PatternDef { every, steps, strict: strict.unwrap_or(false), within, span }))
    }

    /// One step, or a parenthesised group of two: `(a = X[...] and|or b = Y[...])`.
    fn steps(&mut self) -> PResult<Vec<StepDef>> {
        self.skip_trivia();
        if !self.eat_char('(') {
            return Ok(vec![self.step()?]);
        }
        let start = self.pos - 1;
        let mut first = self.step()?;
        let and = match self.word_after_trivia().as_deref() {
            Some("and") => true,
            Some("or") => false,
            _ => {
                return Err(self
                    .unexpected("`and` or `or`")
                    .with_hint("group two steps: `(a = x[...] and b = y[...])`"));
            }
        };
        let mut second = self.step()?;
        self.expect_char(')', "close the group with `)`")?;
        for (step, is_first) in [(&mut first, true), (&mut second, false)] {
            match step {
                StepDef::Event { group, min: 1, max: Some(1), .. } => *group = Some(Group { and, first: is_first }),
                _ => {
                    return Err(Diagnostic::new(
                        self.span_from(start),
                        "a group holds two named steps, each one event",
                    )
                    .with_hint("counts and `not` cannot be grouped: `(a = x[...] and b = y[...])`"));
                }
            }
        }
        Ok(vec![first, second])
    }

    fn step(&mut self) -> PResult<StepDef> {
        self.skip_trivia();
        if self.eat_word("not") {
            let input = self.stream_ref()?;
            let duration = if self.eat_word("for") { Some(self.duration()?.value) } else { None };
            return Ok(StepDef::Absent { input, duration });
        }
        let first = self.ident("a stream name or `alias = stream`")?;
        self.skip_trivia();
        let (alias, input) = if self.rest().starts_with('=') && !self.rest().starts_with("==") {
            self.pos += 1;
            self.skip_trivia();
            (first, self.stream_ref()?)
        } else {
            // No alias: the stream name itself; read its filter.
            self.pos = first.span.end;
            let filter = self.bracket_filter()?;
            (first.clone(), StreamRef { stream: first, filter })
        };
        let (mut min, mut max) = (1, Some(1));
        if self.peek_char() == Some('{') {
            let start = self.pos;
            self.pos += 1;
            min = self.integer("a count")?;
            max = Some(min);
            if self.eat_char(',') {
                self.skip_trivia();
                max = if self.peek_char() == Some('}') { None } else { Some(self.integer("a count")?) };
            }
            self.expect_char('}', "write counts as `{3}`, `{2,5}` or `{3,}`")?;
            if min == 0 || max.is_some_and(|m| m < min) {
                return Err(Diagnostic::new(self.span_from(start), "invalid count")
                    .with_hint("the minimum is at least 1 and not above the maximum"));
            }
        }
        Ok(StepDef::Event { alias, input, min, max, group: None })
    }

    fn window(&mut self, start: usize) -> PResult<WindowSpec> {
        self.skip_trivia();
        let kind_start = self.pos;
        let kind = match self.word().as_deref() {
            Some("tumbling") => {
                if self.eat_word("count") {
                    WindowKind::CountTumbling { n: self.positive("a number of events")? }
                } else {
                    WindowKind::Tumbling { size: self.positive_duration()? }
                }
            }
            Some("hopping") => {
                let size = self.positive_duration()?;
                self.expect_word("every", "write `window hopping 5m every 1m`")?;
                let slide_start = self.pos;
                let slide = self.positive_duration()?;
                if slide > size || size.as_nanos() % slide.as_nanos() != 0 {
                    return Err(Diagnostic::new(self.span_from(slide_start), "a hop must divide the window size")
                        .with_hint("e.g. `hopping 5m every 1m`; for gaps between windows use `tumbling`"));
                }
                WindowKind::Hopping { size, slide }
            }
            Some("sliding") => {
                if self.eat_word("count") {
                    WindowKind::CountSliding { n: self.positive("a number of events")? }
                } else {
                    WindowKind::Sliding { size: self.positive_duration()? }
                }
            }
            Some("session") => WindowKind::Session { gap: self.positive_duration()? },
            Some("count") => WindowKind::CountTumbling { n: self.positive("a number of events")? },
            other => {
                let span = self.span_from(kind_start).max_len(self.src, 1);
                return Err(Diagnostic::new(
                    span,
                    match other {
                        Some(w) => format!("unknown window kind `{w}`"),
                        None => "expected a window kind".to_owned(),
                    },
                )
                .with_hint("expected one of: tumbling, hopping, sliding, session, tumbling count, sliding count"));
            }
        };
        let mut by = Vec::new();
        if self.eat_word("by") {
            loop {
                self.skip_trivia();
                let kstart = self.pos;
                let end = self.scan_sql(|i, c, depth| {
                    depth == 0
                        && (c == ','
                            || c == '\n'
                            || c == '}'
                            || CLAUSES.iter().chain(&["emit"]).any(|k| starts_with_word(&self.src[i..], k)))
                })?;
                let end = end.unwrap_or(self.src.len());
                let text = self.src[kstart..end].trim_end();
                if text.is_empty() {
                    return Err(self.unexpected("a key expression"));
                }
                by.push(Spanned { value: text.to_owned(), span: Span { start: kstart, end: kstart + text.len() } });
                self.pos = kstart + text.len();
                if !self.eat_char(',') {
                    break;
                }
            }
        }
        let emit = if self.eat_word("emit") {
            self.expect_word("on", "write `emit on close` or `emit on update`")?;
            match self.word_after_trivia().as_deref() {
                Some("close") => Some(Emit::OnClose),
                Some("update") => Some(Emit::OnUpdate),
                _ => return Err(self.unexpected("`close` or `update`")),
            }
        } else {
            None
        };
        Ok(WindowSpec { kind, by, emit, span: self.span_from(start) })
    }

    fn positive_duration(&mut self) -> PResult<Duration> {
        let d = self.duration()?;
        if d.value.is_zero() {
            return Err(Diagnostic::new(d.span, "a window cannot be empty").with_hint("use a duration above zero"));
        }
        Ok(d.value)
    }

    fn positive(&mut self, what: &str) -> PResult<u32> {
        self.skip_trivia();
        let start = self.pos;
        let n = self.integer(what)?;
        if n == 0 {
            return Err(Diagnostic::new(self.span_from(start), "a window cannot be empty").with_hint("use at least 1"));
        }
        Ok(n)
    }

    fn action(&mut self) -> PResult<ActionDef> {
        self.skip_trivia();
        let start = self.pos;
        match self.word().as_deref() {
            Some("alert") => {
                let mut severity = Spanned { value: "warning".to_owned(), span: self.span_from(start) };
                let mut message = None;
                loop {
                    if self.eat_word("severity") {
                        severity = self.string("a severity in quotes")?;
                    } else if self.eat_word("message") {
                        message = Some(self.string("a message in quotes")?);
                    } else {
                        break;
                    }
                }
                let message = message.unwrap_or(Spanned { value: String::new(), span: self.span_from(start) });
                Ok(ActionDef::Alert { severity, message })
            }
            Some("publish") => {
                let topic = self.string("a topic in quotes")?;
                let template = self.json_template()?;
                Ok(ActionDef::Publish { topic, template })
            }
            Some("command") => {
                self.skip_trivia();
                let dstart = self.pos;
                let rest = self.rest();
                let len =
                    rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')).unwrap_or(rest.len());
                if len == 0 {
                    return Err(self.unexpected("the column naming the device (e.g. `device_id` or `a.device_id`)"));
                }
                self.pos += len;
                let device = Spanned { value: rest[..len].to_owned(), span: self.span_from(dstart) };
                let name = self.string("a command name in quotes")?;
                let params = self.json_template()?;
                Ok(ActionDef::Command { device, name, params })
            }
            Some("webhook") => {
                let url = self.string("a URL in quotes")?;
                let template = self.json_template()?;
                Ok(ActionDef::Webhook { url, template })
            }
            _ => {
                self.pos = start;
                Err(self.unexpected("an action").with_hint("actions are: alert, publish, command, webhook"))
            }
        }
    }

    fn json_template(&mut self) -> PResult<Option<Spanned<String>>> {
        self.skip_trivia();
        if self.peek_char() != Some('{') {
            return Ok(None);
        }
        let start = self.pos;
        self.pos += 1;
        let end = self.scan_sql(|_, c, depth| depth == 0 && c == '}')?;
        let Some(end) = end else {
            return Err(Diagnostic::new(Span { start, end: start + 1 }, "unclosed `{`"));
        };
        self.pos = end + 1;
        let text = &self.src[start..self.pos];
        if let Err(e) = serde_json::from_str::<serde_json::Value>(text) {
            return Err(Diagnostic::new(self.span_from(start), format!("invalid JSON template: {e}"))
                .with_hint("templates are JSON; put placeholders in strings: {\"temp\": \"{temperature}\"}"));
        }
        Ok(Some(Spanned { value: text.to_owned(), span: self.span_from(start) }))
    }
}

/// Words that are also common column names open a clause only with their next word:
/// `limit state`, `output first|last`, `insert into`.
fn opens_clause(after: &str, word: &str) -> bool {
    let next = after.trim_start();
    match word {
        "limit" => starts_with_word(next, "state"),
        "output" => starts_with_word(next, "first") || starts_with_word(next, "last"),
        "insert" => starts_with_word(next, "into"),
        _ => true,
    }
}

fn starts_with_word(s: &str, word: &str) -> bool {
    // `get`: the text may hold a multi-byte character where the word would end.
    s.get(..word.len()).is_some_and(|head| head.eq_ignore_ascii_case(word))
        && !s[word.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN_RULES: &str = include_str!("../tests/design.rules");

    #[test]
    fn a_multibyte_character_where_a_clause_word_would_end_is_not_a_panic() {
        // Found by tests/it/robustness.rs: `do\u{fffd}or` once sliced inside the character.
        assert!(!starts_with_word("do\u{fffd}or = 'open'", "into"));
        assert!(!starts_with_word("fi\u{e9}", "first"));
        assert!(starts_with_word("First x", "first"));
        let _ = parse("rule r { from telemetry insert i\u{e9}to x select * }");
    }

    #[test]
    fn the_three_design_rules_parse() -> Result<(), String> {
        let file = parse(DESIGN_RULES).map_err(|e| format!("{e:?}"))?;
        assert_eq!(file.rules.len(), 3);
        let hot = &file.rules[0];
        assert_eq!(hot.name.value, "hot_devices");
        assert!(
            matches!(&hot.from, Source::Stream(s) if s.filter.as_ref().map(|f| f.value.as_str()) == Some("temperature is not null"))
        );
        let w = hot.window.as_ref().ok_or("no window")?;
        assert_eq!(w.kind, WindowKind::Tumbling { size: Duration::from_secs(60) });
        assert_eq!(w.by[0].value, "device_id");
        assert_eq!(
            hot.select.as_ref().map(|s| s.value.as_str()),
            Some("device_id, avg(temperature) as avg_temp, count(*) as n")
        );
        assert_eq!(hot.having.as_ref().map(|s| s.value.as_str()), Some("avg_temp > 80"));
        let door = &file.rules[1];
        let Source::Pattern(p) = &door.from else { return Err("door: not a pattern".into()) };
        assert!(p.every && !p.strict);
        assert_eq!(p.steps.len(), 2);
        assert_eq!(p.within, Some(Duration::from_secs(600)));
        assert_eq!(door.actions.len(), 2);
        let silent = &file.rules[2];
        let Source::Pattern(p) = &silent.from else { return Err("silent: not a pattern".into()) };
        assert!(matches!(&p.steps[1], StepDef::Absent { duration: Some(d), .. } if *d == Duration::from_secs(120)));
        Ok(())
    }

    #[test]
    fn then_inside_case_does_not_end_a_select() -> Result<(), String> {
        let src = "rule r { from t select case when x > 1 then 'a' else 'b' end as c insert into o }";
        let file = parse(src).map_err(|e| format!("{e:?}"))?;
        assert_eq!(
            file.rules[0].select.as_ref().map(|s| s.value.as_str()),
            Some("case when x > 1 then 'a' else 'b' end as c")
        );
        Ok(())
    }

    #[test]
    fn errors_point_at_the_problem() {
        let src = "rule r {\n  from t\n  window tumbing 1m by device_id\n  insert into o\n}\n";
        let errs = parse(src).err().unwrap_or_default();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].message, "unknown window kind `tumbing`");
        assert_eq!(errs[0].line_col(src), (3, 10));
        assert!(errs[0].hint.as_deref().unwrap_or("").contains("tumbling"));
    }

    #[test]
    fn an_unclosed_parenthesis_is_reported_where_it_opens() {
        let src = "rule bad {\n    from telemetry\n    select avg(temperature as t\n    insert into x\n}\n";
        let errors = parse(src).err().unwrap_or_default();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].message, "`(` is not closed");
        assert_eq!(&src[errors[0].span.start..errors[0].span.end], "(");
        assert_eq!(errors[0].line_col(src), (3, 15));
        let src = "rule bad { from telemetry select case when x then 1 insert into y }";
        let errors = parse(src).err().unwrap_or_default();
        assert_eq!(errors.first().map(|e| e.message.as_str()), Some("`case` is not closed"));
    }

    #[test]
    fn every_error_in_a_file_is_reported() {
        let src = "rule a {\n  from t\n}\nrule b {\n  from t\n  window x\n  insert into o\n}\nrule c { from t[x > 1] insert into o }\n";
        let errs = parse(src).err().unwrap_or_default();
        let msgs: Vec<_> = errs.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(msgs, vec!["rule `a` has no output", "unknown window kind `x`"]);
    }

    #[test]
    fn column_names_like_clause_words_stay_in_the_select() -> Result<(), String> {
        let src = "rule r { from t select a as limit, b as output, c as insert insert into o limit state 10 }";
        let file = parse(src).map_err(|e| format!("{e:?}"))?;
        assert_eq!(
            file.rules[0].select.as_ref().map(|s| s.value.as_str()),
            Some("a as limit, b as output, c as insert")
        );
        assert_eq!(file.rules[0].state_limit, Some(10));
        Ok(())
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("5x"), None);
    }

    #[test]
    fn counts_and_strict_sequences() -> Result<(), String> {
        let src = "rule r { from every a = t[x > 1]{3,}, b = t[x < 0]{2,5} within 1m then alert }";
        let file = parse(src).map_err(|e| format!("{e:?}"))?;
        let Source::Pattern(p) = &file.rules[0].from else { return Err("not a pattern".into()) };
        assert!(p.strict);
        assert!(matches!(p.steps[0], StepDef::Event { min: 3, max: None, .. }));
        assert!(matches!(p.steps[1], StepDef::Event { min: 2, max: Some(5), .. }));
        Ok(())
    }
}
