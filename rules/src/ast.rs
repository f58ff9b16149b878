//! The syntax tree of a rule file, as written: names and SQL expressions are kept as source
//! text with their positions, so that the planner can report errors where they are.

use std::time::Duration;

/// A byte range in the rule file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

/// A piece of source text with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spanned<T> {
    /// The value.
    pub value: T,
    /// Where it was written.
    pub span: Span,
}

/// A parsed rule file.
#[derive(Debug, Clone, Default)]
pub struct RuleFile {
    /// Stream settings (`stream NAME { ... }`).
    pub streams: Vec<StreamDecl>,
    /// Static tables (`table NAME from 'file.csv'`).
    pub tables: Vec<TableDecl>,
    /// Rules, in file order.
    pub rules: Vec<RuleDef>,
    /// The directory relative `table` paths start from (the rule file's; `None`: the
    /// working directory).
    pub base: Option<std::path::PathBuf>,
    /// What the file's rules may reach (files, hosts); `None`: anything (local tools).
    pub sandbox: Option<crate::sandbox::Sandbox>,
}

/// Event-time settings of one input stream.
#[derive(Debug, Clone)]
pub struct StreamDecl {
    /// The stream.
    pub name: Spanned<String>,
    /// Bounded out-of-orderness: how far behind a device's newest event time its
    /// watermark stays.
    pub max_delay: Option<Duration>,
    /// How long after its watermark passed a window still accepts events.
    pub lateness: Option<Duration>,
    /// `time processing`: use the arrival time instead of the event time.
    pub processing_time: bool,
    /// `retention 90d`: how long the stream's rows are kept (by event time).
    pub retention: Option<Duration>,
    /// `field NAME TYPE [unit 'U'] [tag]`: the stream's declared fields.
    pub fields: Vec<FieldDecl>,
    /// `device_tag NAME`: the one line-protocol tag that names the device.
    pub device_tag: Option<Spanned<String>>,
    /// `default_device 'ID'`: the device of a line-protocol line without a device tag.
    pub default_device: Option<Spanned<String>>,
}

/// A declared field of a stream.
#[derive(Debug, Clone)]
pub struct FieldDecl {
    /// Its name.
    pub name: Spanned<String>,
    /// Its type.
    pub ty: ferrite_engine::FieldType,
    /// Its unit.
    pub unit: Option<String>,
    /// Whether it is a tag.
    pub tag: bool,
}

/// A static table for enrichment joins.
#[derive(Debug, Clone)]
pub struct TableDecl {
    /// Table name.
    pub name: Spanned<String>,
    /// CSV or Parquet file, relative to the rule file.
    pub path: Spanned<String>,
}

/// One rule.
#[derive(Debug, Clone)]
pub struct RuleDef {
    /// Its name, unique in a deployment.
    pub name: Spanned<String>,
    /// The whole `rule ... { ... }` text.
    pub span: Span,
    /// What it reads.
    pub from: Source,
    /// Enrichment join with a table.
    pub join: Option<JoinClause>,
    /// Window and key.
    pub window: Option<WindowSpec>,
    /// `select` list (SQL), or `None` for `select *`.
    pub select: Option<Spanned<String>>,
    /// `having` (SQL boolean over the select list's names).
    pub having: Option<Spanned<String>>,
    /// `insert into STREAM`.
    pub insert_into: Option<Spanned<String>>,
    /// `then ...` actions.
    pub actions: Vec<ActionDef>,
    /// `output first|last every D`.
    pub output_rate: Option<OutputRate>,
    /// `limit state N`: most partial matches or open windows kept per shard.
    pub state_limit: Option<usize>,
}

/// What a rule reads.
#[derive(Debug, Clone)]
pub enum Source {
    /// One stream, optionally filtered.
    Stream(StreamRef),
    /// A pattern of steps over streams.
    Pattern(PatternDef),
}

/// `stream[filter] as alias`.
#[derive(Debug, Clone)]
pub struct StreamRef {
    /// Stream name.
    pub stream: Spanned<String>,
    /// Filter in brackets (SQL boolean).
    pub filter: Option<Spanned<String>>,
}

/// A pattern: steps joined by `->` (followed by) or `,` (strictly next).
#[derive(Debug, Clone)]
pub struct PatternDef {
    /// `every`: start a new match at every first-step event, not only when none is open.
    pub every: bool,
    /// The steps, in order.
    pub steps: Vec<StepDef>,
    /// `true` for `,` (strict sequence: no other event of the key in between).
    pub strict: bool,
    /// `within D`: the whole match must span at most D.
    pub within: Option<Duration>,
    /// Where the pattern was written.
    pub span: Span,
}

/// One step of a pattern.
#[derive(Debug, Clone)]
pub enum StepDef {
    /// `alias = stream[cond]{min,max}`.
    Event {
        /// The name later steps and the select list use.
        alias: Spanned<String>,
        /// The stream and condition.
        input: StreamRef,
        /// `{min,max}`: how many matching events (default exactly 1).
        min: u32,
        /// Upper bound (`None`: unbounded).
        max: Option<u32>,
        /// `(a = X and|or b = Y)`: this step and the next form a group, which holds when
        /// both (`and`, in either order) or either (`or`) of them matched.
        group: Option<Group>,
    },
    /// `not stream[cond] for D`: no such event for D after the previous step.
    Absent {
        /// The stream and condition.
        input: StreamRef,
        /// How long the absence must last (`None`: until the pattern's `within`).
        duration: Option<Duration>,
    },
}

/// A step's place in a logical group of two steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    /// `and` (both) or `or` (either).
    pub and: bool,
    /// The group's first step (the second follows it).
    pub first: bool,
}

/// `join NAME on EXPR`.
#[derive(Debug, Clone)]
pub struct JoinClause {
    /// Table name (declared by `table`), or the joined stream.
    pub table: Spanned<String>,
    /// `join b = stream ...`: a join of two streams, whose other side is `b`.
    pub alias: Option<Spanned<String>>,
    /// Join condition (SQL boolean).
    pub on: Spanned<String>,
    /// `within D`: how far apart in event time joined events may be (stream joins).
    pub within: Option<Duration>,
}

/// The kind of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// Fixed, non-overlapping time windows.
    Tumbling {
        /// Window length.
        size: Duration,
    },
    /// Overlapping time windows of `size` starting every `slide`.
    Hopping {
        /// Window length.
        size: Duration,
        /// Distance between window starts.
        slide: Duration,
    },
    /// The last `size` of event time before each event, updated per event.
    Sliding {
        /// Window length.
        size: Duration,
    },
    /// Events separated by less than `gap`.
    Session {
        /// Inactivity gap that closes a session.
        gap: Duration,
    },
    /// Every `n` events.
    CountTumbling {
        /// Events per window.
        n: u32,
    },
    /// The last `n` events, updated per event.
    CountSliding {
        /// Events per window.
        n: u32,
    },
}

/// When a window emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emit {
    /// Once, when the watermark passes its end.
    OnClose,
    /// After every event that changes it.
    OnUpdate,
}

/// `window KIND by KEYS emit ...`.
#[derive(Debug, Clone)]
pub struct WindowSpec {
    /// The kind.
    pub kind: WindowKind,
    /// Key expressions (SQL); empty: one global window.
    pub by: Vec<Spanned<String>>,
    /// Emission (default: on close for tumbling, hopping, session and count windows; on
    /// update for sliding windows).
    pub emit: Option<Emit>,
    /// Where it was written.
    pub span: Span,
}

/// `output first|last every D`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputRate {
    /// `true` for `first`: the first output of each key per period; `false`: the last.
    pub first: bool,
    /// The period.
    pub every: Duration,
}

/// A `then` action.
#[derive(Debug, Clone)]
pub enum ActionDef {
    /// `then alert severity 'S' message 'M'`.
    Alert {
        /// Severity (e.g. info, warning, critical).
        severity: Spanned<String>,
        /// Message template (`{column}` placeholders).
        message: Spanned<String>,
    },
    /// `then publish 'TOPIC' {json template}`.
    Publish {
        /// Topic template.
        topic: Spanned<String>,
        /// JSON template (`None`: the whole output row as JSON).
        template: Option<Spanned<String>>,
    },
    /// `then command DEVICE_EXPR 'NAME' {params}`.
    Command {
        /// Column of the output naming the target device.
        device: Spanned<String>,
        /// Command name.
        name: Spanned<String>,
        /// Parameters template.
        params: Option<Spanned<String>>,
    },
    /// `then webhook 'URL' {json template}`.
    Webhook {
        /// URL template.
        url: Spanned<String>,
        /// JSON template (`None`: the whole output row).
        template: Option<Spanned<String>>,
    },
}
