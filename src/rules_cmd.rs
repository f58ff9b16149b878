//! `ferrite rules check|test`: the rule tooling. `check` compiles rule files against the
//! catalog of a data directory (when there is one) and prints diagnostics; `test` runs rule
//! files over recorded events in event time and compares the outputs with expected ones,
//! each case straight and with other batch sizes and shard counts, which must all agree.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use ferrite_engine::{StreamBatch, StreamCatalog, StreamName};
use ferrite_ingest::builder::BatchBuilder;
use ferrite_ingest::json::{DeviceSource, JsonDecoder};
use ferrite_rules::recorded::{self, RunShape};
use ferrite_rules::{Error, NoActions};

/// `ferrite rules ...`
#[derive(Debug, clap::Args)]
pub struct RulesArgs {
    #[command(subcommand)]
    command: RulesCommand,
}

#[derive(Debug, clap::Subcommand)]
enum RulesCommand {
    /// Compile rule files and print their errors (file:line:column, the line, a caret, a hint).
    Check(CheckArgs),
    /// Run rule files over recorded events and compare their outputs with expected ones.
    Test(TestArgs),
    /// Run rule files over archived history, as if it arrived live (backtesting).
    Replay(ReplayArgs),
    /// Say why a deployed rule did or did not fire for a device over a time range.
    Explain(ExplainArgs),
}

#[derive(Debug, clap::Args)]
struct ExplainArgs {
    /// The deployed rule.
    rule: String,
    /// The device.
    #[arg(long)]
    device: String,
    /// Start of the range (RFC 3339, inclusive).
    #[arg(long)]
    from: String,
    /// End of the range (RFC 3339, exclusive).
    #[arg(long)]
    to: String,
    /// Base URL of the server.
    #[arg(long, env = "FERRITE_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    #[command(flatten)]
    auth: crate::client::AuthArgs,
}

#[derive(Debug, clap::Args)]
struct ReplayArgs {
    /// The rule file.
    file: PathBuf,
    /// Start of the history to replay (RFC 3339, inclusive).
    #[arg(long)]
    from: String,
    /// End of the history to replay (RFC 3339, exclusive).
    #[arg(long)]
    to: String,
    /// Base URL of the server whose streams (archive and hot buffer) are replayed.
    #[arg(long, env = "FERRITE_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Write the outputs back to the server, into streams named PREFIX + the output stream
    /// (e.g. `replay_alerts`), instead of printing them.
    #[arg(long)]
    write_prefix: Option<String>,
    #[command(flatten)]
    auth: crate::client::AuthArgs,
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// Rule files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Data directory whose catalog knows the streams (unknown streams are then errors).
    #[arg(long, env = "FERRITE_DATA_DIR", default_value = "./ferrite-data")]
    data_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
struct TestArgs {
    /// A rule file (with --input and --expect), or case directories holding `rule.rules`,
    /// `input.ndjson` and `expected.ndjson`.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Recorded events, one JSON object per line: `ts`, `device_id`, fields, and `stream`
    /// (default `telemetry`).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Expected outputs, one JSON object per line (`ferrite rules test --update` writes it).
    #[arg(long)]
    expect: Option<PathBuf>,
    /// Write the outputs as the expected file instead of comparing.
    #[arg(long)]
    update: bool,
}

pub fn run(args: RulesArgs) -> anyhow::Result<()> {
    match args.command {
        RulesCommand::Check(a) => check(a),
        RulesCommand::Test(a) => test(a),
        RulesCommand::Replay(a) => replay(a),
        RulesCommand::Explain(a) => explain(a),
    }
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let catalog_path = args.data_dir.join("catalog").join("streams.json");
    let catalog = if catalog_path.exists() {
        StreamCatalog::open(&catalog_path).with_context(|| format!("cannot read {}", catalog_path.display()))?
    } else {
        StreamCatalog::in_memory()
    };
    let known_streams = !catalog.list().is_empty();
    let schemas = |s: &str| catalog.get_by_name(s).map(|x| x.arrow.clone());
    let mut failed = 0;
    for file in &args.files {
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
        let name = file.display().to_string();
        match ferrite_rules::runtime::compile_text_in(&text, &schemas, file.parent()) {
            Ok(rules) => println!("{name}: ok ({} rules)", rules.len()),
            Err(Error::Invalid(ds)) => {
                // Streams the catalog does not know yet cannot be checked further: a warning.
                let (unknown, mut errors): (Vec<_>, Vec<_>) = ds
                    .into_iter()
                    .partition(|d| d.code == Some("unknown-stream") && !catalog_knows(&catalog, d, &text));
                // What planning could not reach for want of a schema: SQL syntax.
                if let Ok(parsed) = ferrite_rules::syntax::parse(&text) {
                    errors.extend(ferrite_rules::sql_syntax::check(&parsed, &text));
                }
                for d in &unknown {
                    eprint!("{}", d.render(&name, &text).replacen("error:", "warning:", 1));
                }
                if errors.is_empty() {
                    println!(
                        "{name}: syntax ok; {} rule(s) name streams {} (checked once they exist)",
                        unknown.len(),
                        if known_streams { "this catalog does not have" } else { "not created yet" }
                    );
                } else {
                    eprint!("{}", Error::Invalid(errors).render(&name, &text));
                    failed += 1;
                }
            }
            Err(e) => {
                eprint!("{}", e.render(&name, &text));
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} rule file(s) have errors");
    }
    Ok(())
}

/// An unknown-stream diagnostic is an error when the catalog knows streams at all: then a
/// misspelt name is far likelier than a stream nobody wrote yet... except for derived
/// streams of the same file, which `check` cannot know; keep it a warning when the file
/// inserts into that stream.
fn catalog_knows(catalog: &StreamCatalog, d: &ferrite_rules::Diagnostic, text: &str) -> bool {
    let name = text.get(d.span.start..d.span.end).unwrap_or_default();
    !catalog.list().is_empty() && !text.contains(&format!("insert into {name}"))
}

struct Case {
    name: String,
    rules: PathBuf,
    input: PathBuf,
    expect: PathBuf,
}

fn test(args: TestArgs) -> anyhow::Result<()> {
    let mut cases = Vec::new();
    for p in &args.paths {
        if p.is_dir() {
            let mut dirs = vec![p.clone()];
            if !p.join("rule.rules").exists() {
                dirs = std::fs::read_dir(p)?
                    .flatten()
                    .map(|e| e.path())
                    .filter(|d| d.join("rule.rules").exists())
                    .collect();
                dirs.sort();
            }
            for d in dirs {
                cases.push(Case {
                    name: d.display().to_string(),
                    rules: d.join("rule.rules"),
                    input: d.join("input.ndjson"),
                    expect: d.join("expected.ndjson"),
                });
            }
        } else {
            let (Some(input), Some(expect)) = (&args.input, &args.expect) else {
                bail!("{}: a rule file needs --input EVENTS.ndjson and --expect EXPECTED.ndjson", p.display());
            };
            cases.push(Case {
                name: p.display().to_string(),
                rules: p.clone(),
                input: input.clone(),
                expect: expect.clone(),
            });
        }
    }
    if cases.is_empty() {
        bail!("no test cases found (a case directory holds rule.rules, input.ndjson and expected.ndjson)");
    }
    let mut failed = Vec::new();
    for case in &cases {
        match run_case(case, args.update) {
            Ok(()) => println!("ok      {}", case.name),
            Err(e) => {
                println!("FAILED  {}\n{e:#}", case.name);
                failed.push(case.name.clone());
            }
        }
    }
    println!("{} passed, {} failed", cases.len() - failed.len(), failed.len());
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Decodes recorded events into batches in arrival order, one per event, learning the
/// schemas into `catalog` as the server would.
fn load_events(path: &Path, catalog: &Arc<StreamCatalog>) -> anyhow::Result<Vec<StreamBatch>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let mut event: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line).with_context(|| format!("{}: not a JSON object", at()))?;
        let stream = match event.remove("stream") {
            Some(serde_json::Value::String(s)) => s,
            None => "telemetry".to_owned(),
            Some(other) => bail!("{}: `stream` must be a string, got {other}", at()),
        };
        let stream = StreamName::new(&stream).with_context(at)?;
        let mut builder = BatchBuilder::new(catalog.clone(), &stream).with_context(at)?;
        let payload = serde_json::to_vec(&event)?;
        let rejected = JsonDecoder::new(&mut builder, DeviceSource::PerEvent, 0)
            .decode(&payload)
            .with_context(|| format!("{}: malformed event", at()))?;
        if let Some(r) = rejected.first() {
            bail!("{}: event rejected: {}", at(), r.message);
        }
        if let Some(b) = builder.finish() {
            out.push(b);
        }
    }
    Ok(out)
}

fn run_case(case: &Case, update: bool) -> anyhow::Result<()> {
    let rules =
        std::fs::read_to_string(&case.rules).with_context(|| format!("cannot read {}", case.rules.display()))?;
    let rules_name = case.rules.display().to_string();
    // The shapes every case runs in: one event at a time on one shard (the reference),
    // then larger batches over several shards.
    let shapes = [
        RunShape { shards: 1, batch_rows: 1, restart_every: 0 },
        RunShape { shards: 2, batch_rows: 1024, restart_every: 0 },
        RunShape { shards: 3, batch_rows: 7, restart_every: 0 },
        // The rules' state through a checkpoint and a restart before every event.
        RunShape { shards: 2, batch_rows: 1, restart_every: 1 },
    ];
    let mut results = Vec::new();
    for shape in shapes {
        let catalog = Arc::new(StreamCatalog::in_memory());
        let events = load_events(&case.input, &catalog)?;
        let out = recorded::run(&rules, &catalog, &events, shape, Arc::new(NoActions), case.rules.parent())
            .map_err(|e| anyhow::anyhow!("{}", e.render(&rules_name, &rules)))?;
        results.push((shape, recorded::to_rows(&out)));
    }
    let (_, reference) = &results[0];
    for (shape, rows) in &results[1..] {
        if rows != reference {
            bail!(
                "outputs differ between one event per batch on one shard and {} events per batch on {} shards{}:\n{}",
                shape.batch_rows,
                shape.shards,
                if shape.restart_every > 0 {
                    format!(", restarted from a checkpoint every {} batches", shape.restart_every)
                } else {
                    String::new()
                },
                diff(reference, rows)
            );
        }
    }
    let text: String = reference.iter().map(|r| format!("{r}\n")).collect();
    if update {
        std::fs::write(&case.expect, text).with_context(|| format!("cannot write {}", case.expect.display()))?;
        return Ok(());
    }
    let expected_text = std::fs::read_to_string(&case.expect)
        .with_context(|| format!("cannot read {} (write it with --update)", case.expect.display()))?;
    let expected: Vec<serde_json::Value> = expected_text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(n, l)| serde_json::from_str(l).with_context(|| format!("{}:{}", case.expect.display(), n + 1)))
        .collect::<anyhow::Result<_>>()?;
    if &expected != reference {
        bail!("outputs differ from {}:\n{}", case.expect.display(), diff(&expected, reference));
    }
    Ok(())
}

/// A JSON value printed with its object keys sorted, so that diffs line up whatever order
/// the rows were built in.
fn sorted_keys(v: &serde_json::Value) -> String {
    fn sort(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let mut keys: Vec<_> = m.keys().collect();
                keys.sort();
                serde_json::Value::Object(keys.into_iter().map(|k| (k.clone(), sort(&m[k]))).collect())
            }
            serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    sort(v).to_string()
}

fn diff(expected: &[serde_json::Value], got: &[serde_json::Value]) -> String {
    let mut out = String::new();
    for e in expected.iter().filter(|e| !got.contains(e)) {
        out.push_str(&format!("  - {}\n", sorted_keys(e)));
    }
    for g in got.iter().filter(|g| !expected.contains(g)) {
        out.push_str(&format!("  + {}\n", sorted_keys(g)));
    }
    if out.is_empty() {
        out.push_str("  (same rows, different order or multiplicity)\n");
    }
    out
}

/// Reads the rule file's input streams over [from, to) from the server (Arrow IPC, in time
/// order), runs the rules in event time as `rules test` does, and prints the outputs as
/// NDJSON or writes them back to the server.
fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    use std::io::Write;

    let text = std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let name = args.file.display().to_string();
    let file = ferrite_rules::syntax::parse(&text)
        .map_err(|ds| anyhow::anyhow!("{}", Error::Invalid(ds).render(&name, &text)))?;
    let inputs = input_streams(&file);
    let base = args.server.trim_end_matches('/').to_owned();
    let agent = agent();
    let catalog = Arc::new(StreamCatalog::in_memory());
    let auth = args.auth.auth()?;
    let events = fetch_history(&agent, &base, &auth, &inputs, &args.from, &args.to, None, &catalog)?;
    let total: usize = events.iter().map(StreamBatch::num_rows).sum();
    eprintln!("replaying {total} events of {} from {} to {}", inputs.join(", "), args.from, args.to);
    // The replay itself, in slices so that progress can be shown.
    let progress = |done: usize| {
        let pct = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
        let bar = "#".repeat((pct / 5.0) as usize);
        eprint!("\r[{bar:<20}] {pct:5.1}%  {done}/{total} events");
    };
    let out = recorded::run_with_progress(
        &text,
        &catalog,
        &events,
        RunShape { shards: 1, batch_rows: 8192, restart_every: 0 },
        Arc::new(NoActions),
        args.file.parent(),
        &progress,
    )
    .map_err(|e| anyhow::anyhow!("{}", e.render(&name, &text)))?;
    eprintln!();
    let rows = recorded::to_rows(&out);
    match &args.write_prefix {
        None => {
            let mut stdout = std::io::stdout().lock();
            for r in &rows {
                writeln!(stdout, "{r}")?;
            }
        }
        Some(prefix) => {
            let mut by_stream: std::collections::BTreeMap<String, Vec<serde_json::Value>> = Default::default();
            for r in rows {
                let mut o = r.as_object().cloned().unwrap_or_default();
                let stream = o.remove("stream").and_then(|s| s.as_str().map(str::to_owned)).unwrap_or_default();
                if let Some(t) = o.remove("time") {
                    o.insert("ts".into(), t);
                }
                by_stream.entry(format!("{prefix}{stream}")).or_default().push(serde_json::Value::Object(o));
            }
            for (stream, rows) in by_stream {
                for chunk in rows.chunks(10_000) {
                    let body = serde_json::Value::Array(chunk.to_vec()).to_string();
                    let mut resp = auth
                        .apply(agent.post(&format!("{base}/api/v1/streams/{stream}/events")))
                        .header("Content-Type", "application/json")
                        .send(body.as_bytes())?;
                    if !resp.status().is_success() {
                        bail!("writing `{stream}`: {}", resp.body_mut().read_to_string().unwrap_or_default());
                    }
                }
                eprintln!("wrote {} rows to `{stream}`", rows.len());
            }
        }
    }
    Ok(())
}

/// Streams the file's rules read that no rule of the file derives.
fn input_streams(file: &ferrite_rules::ast::RuleFile) -> Vec<String> {
    use ferrite_rules::ast::{Source, StepDef};
    let mut inputs: Vec<String> = Vec::new();
    for rule in &file.rules {
        let refs: Vec<&ferrite_rules::ast::StreamRef> = match &rule.from {
            Source::Stream(s) => vec![s],
            Source::Pattern(p) => p
                .steps
                .iter()
                .map(|s| match s {
                    StepDef::Event { input, .. } | StepDef::Absent { input, .. } => input,
                })
                .collect(),
        };
        let joined = rule.join.iter().filter(|j| !file.tables.iter().any(|t| t.name.value == j.table.value));
        for name in refs.iter().map(|r| &r.stream.value).chain(joined.map(|j| &j.table.value)) {
            let derived = file.rules.iter().any(|x| x.insert_into.as_ref().is_some_and(|t| &t.value == name));
            if !derived && !inputs.contains(name) {
                inputs.push(name.clone());
            }
        }
    }
    inputs
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(3600)))
        .build()
        .new_agent()
}

/// Reads `streams` over [from, to) (and of one device, if given) from the server as Arrow,
/// learning their schemas into `catalog`; returns the rows in time order.
#[allow(clippy::too_many_arguments)]
fn fetch_history(
    agent: &ureq::Agent,
    base: &str,
    auth: &crate::client::Auth,
    streams: &[String],
    from: &str,
    to: &str,
    device: Option<&str>,
    catalog: &StreamCatalog,
) -> anyhow::Result<Vec<StreamBatch>> {
    for (what, t) in [("--from", from), ("--to", to)] {
        if ferrite_ingest::json::parse_rfc3339(t).is_none() {
            bail!("{what} `{t}` is not an RFC 3339 time (e.g. 2026-11-01T00:00:00Z)");
        }
    }
    let device_filter = device.map(|d| format!(" AND device_id = '{}'", d.replace('\'', "''"))).unwrap_or_default();
    let mut events: Vec<StreamBatch> = Vec::new();
    for stream in streams {
        let sql =
            format!("SELECT * FROM \"{stream}\" WHERE time >= '{from}' AND time < '{to}'{device_filter} ORDER BY time");
        let mut resp = auth
            .apply(agent.post(&format!("{base}/api/v1/sql")))
            .header("Content-Type", "application/json")
            .header("Accept", "application/vnd.apache.arrow.stream")
            .send(serde_json::json!({ "sql": sql }).to_string().as_bytes())
            .with_context(|| format!("cannot reach the Ferrite server at {base} (set --server)"))?;
        let status = resp.status();
        let bytes = resp.body_mut().with_config().limit(u64::MAX).read_to_vec()?;
        if !status.is_success() {
            bail!("reading `{stream}`: {}", String::from_utf8_lossy(&bytes));
        }
        let name = StreamName::new(stream)?;
        catalog.ensure_stream(&name)?;
        for batch in arrow::ipc::reader::StreamReader::try_new(bytes.as_slice(), None)? {
            let batch = batch?;
            for f in batch.schema().fields().iter().skip(2) {
                let ty =
                    ferrite_rules::output::field_type_of(f.data_type()).unwrap_or(ferrite_engine::FieldType::String);
                catalog.resolve_field(&name, f.name(), ty)?;
            }
            events.push(StreamBatch::new(name.clone(), batch));
        }
    }
    merge_by_time(events)
}

/// Orders the rows of several streams by time into runs of one stream each (one stream:
/// as it is, already in time order).
fn merge_by_time(batches: Vec<StreamBatch>) -> anyhow::Result<Vec<StreamBatch>> {
    let streams: std::collections::BTreeSet<&str> = batches.iter().map(|b| b.stream.as_str()).collect();
    if streams.len() <= 1 {
        return Ok(batches);
    }
    let mut rows: Vec<(i64, usize, usize)> = Vec::new();
    for (bi, b) in batches.iter().enumerate() {
        let t = b.batch.column_by_name("time").context("no time column")?;
        let t = t
            .as_any()
            .downcast_ref::<arrow::array::TimestampNanosecondArray>()
            .context("time is not a nanosecond timestamp")?;
        rows.extend((0..t.len()).map(|i| (t.value(i), bi, i)));
    }
    rows.sort_by_key(|r| r.0);
    let mut out: Vec<StreamBatch> = Vec::new();
    let mut run: Vec<(usize, usize)> = Vec::new();
    let flush = |run: &mut Vec<(usize, usize)>, out: &mut Vec<StreamBatch>| -> anyhow::Result<()> {
        let Some(&(bi, _)) = run.first() else { return Ok(()) };
        let idx = arrow::array::UInt32Array::from_iter_values(run.iter().map(|r| r.1 as u32));
        // A run may span batches of its stream: take from each in turn.
        let mut parts = Vec::new();
        let mut start = 0;
        while start < run.len() {
            let b = run[start].0;
            let len = run[start..].iter().take_while(|r| r.0 == b).count();
            let part_idx = idx.slice(start, len);
            parts.push(arrow::compute::take_record_batch(&batches[b].batch, &part_idx)?);
            start += len;
        }
        let schema = parts[0].schema();
        out.push(StreamBatch::new(batches[bi].stream.clone(), arrow::compute::concat_batches(&schema, &parts)?));
        run.clear();
        Ok(())
    };
    for (_, bi, i) in rows {
        if run.first().is_some_and(|&(b0, _)| batches[b0].stream != batches[bi].stream) {
            flush(&mut run, &mut out)?;
        }
        run.push((bi, i));
    }
    flush(&mut run, &mut out)?;
    Ok(out)
}

/// Replays the rule over one device's history, then replays variants of it (the filter
/// alone, windows without `having`, each prefix of a pattern) to show where events stop.
fn explain(args: ExplainArgs) -> anyhow::Result<()> {
    use ferrite_rules::ast::{Source, Span, Spanned, StepDef};

    let agent = agent();
    let base = args.server.trim_end_matches('/').to_owned();
    let auth = args.auth.auth()?;
    let mut resp = auth
        .apply(agent.get(&format!("{base}/api/v1/rules/{}", args.rule)))
        .call()
        .with_context(|| format!("cannot reach the Ferrite server at {base} (set --server)"))?;
    let body = resp.body_mut().read_to_string()?;
    if !resp.status().is_success() {
        bail!("rule `{}`: {body}", args.rule);
    }
    let info: serde_json::Value = serde_json::from_str(&body)?;
    let rule_text = info["text"].as_str().unwrap_or_default();
    let parsed = ferrite_rules::syntax::parse(rule_text)
        .map_err(|ds| anyhow::anyhow!("{}", Error::Invalid(ds).render(&args.rule, rule_text)))?;
    let inputs = input_streams(&parsed);
    let main = inputs.first().cloned().unwrap_or_default();
    // The rule's event-time settings, which live in a `stream` declaration of its file.
    let text = format!(
        "stream {main} {{ max_delay {}ms lateness {}ms time {} }}\n{rule_text}",
        info["time"]["max_delay_ms"].as_i64().unwrap_or(0),
        info["time"]["lateness_ms"].as_i64().unwrap_or(0),
        if info["time"]["processing_time"].as_bool().unwrap_or(false) { "processing" } else { "event" }
    );
    let file = ferrite_rules::syntax::parse(&text)
        .map_err(|ds| anyhow::anyhow!("{}", Error::Invalid(ds).render(&args.rule, &text)))?;
    let rule = file.rules.first().context("no rule in the deployed text")?.clone();
    let catalog = Arc::new(StreamCatalog::in_memory());
    let events = fetch_history(&agent, &base, &auth, &inputs, &args.from, &args.to, Some(&args.device), &catalog)?;
    println!("rule `{}` for device `{}` from {} to {}", args.rule, args.device, args.from, args.to);
    for stream in &inputs {
        let n: usize = events.iter().filter(|b| b.stream.as_str() == stream).map(StreamBatch::num_rows).sum();
        println!("  {n} events of `{stream}`");
    }
    let run = |variant: ferrite_rules::ast::RuleDef| -> anyhow::Result<Vec<serde_json::Value>> {
        let rf = ferrite_rules::ast::RuleFile {
            streams: file.streams.clone(),
            tables: file.tables.clone(),
            rules: vec![variant],
            base: None,
            sandbox: None,
        };
        let schemas = |s: &str| catalog.get_by_name(s).map(|x| x.arrow.clone());
        let compiled = ferrite_rules::plan::compile(&rf, &text, &schemas)
            .map_err(|ds| anyhow::anyhow!("{}", Error::Invalid(ds).render(&args.rule, &text)))?;
        let out = recorded::run_compiled(
            compiled,
            &catalog,
            &events,
            RunShape { shards: 1, batch_rows: 1, restart_every: 0 },
            Arc::new(NoActions),
            &|_| {},
        )?;
        Ok(recorded::to_rows(&out))
    };
    let probe = |mut v: ferrite_rules::ast::RuleDef| {
        v.insert_into = Some(Spanned { value: "explain_out".to_owned(), span: Span::default() });
        v.actions.clear();
        v.output_rate = None;
        v
    };
    let count = |rows: &[serde_json::Value], stream: &str| rows.iter().filter(|r| r["stream"] == stream).count();
    match &rule.from {
        Source::Stream(input) => {
            if let Some(f) = &input.filter {
                let mut v = probe(rule.clone());
                v.window = None;
                v.select = None;
                v.having = None;
                let rows = run(v)?;
                let total: usize =
                    events.iter().filter(|b| b.stream.as_str() == input.stream.value).map(StreamBatch::num_rows).sum();
                println!("  filter `{}`: {} of {total} events pass", f.value, count(&rows, "explain_out"));
            }
            if rule.window.is_some() {
                let mut all = probe(rule.clone());
                all.having = None;
                let windows: Vec<serde_json::Value> =
                    run(all)?.into_iter().filter(|r| r["stream"] == "explain_out").collect();
                let passing: Vec<serde_json::Value> = match &rule.having {
                    Some(_) => run(probe(rule.clone()))?.into_iter().filter(|r| r["stream"] == "explain_out").collect(),
                    None => windows.clone(),
                };
                let late = run(probe(rule.clone()))?
                    .iter()
                    .filter(|r| r["stream"].as_str().is_some_and(|s| s.ends_with("_late")))
                    .count();
                println!(
                    "  {} windows closed{}",
                    windows.len(),
                    if late > 0 { format!(", {late} events were late") } else { String::new() }
                );
                for w in &windows {
                    let mut shown = w.clone();
                    if let Some(o) = shown.as_object_mut() {
                        o.remove("stream");
                    }
                    let verdict = match &rule.having {
                        Some(h) if passing.contains(w) => format!("  (having `{}`: true)", h.value),
                        Some(h) => format!("  (having `{}`: false)", h.value),
                        None => String::new(),
                    };
                    println!("    {shown}{verdict}");
                }
            }
        }
        Source::Pattern(p) => {
            for k in 1..=p.steps.len() {
                let mut v = probe(rule.clone());
                v.select = None;
                v.having = None;
                let Source::Pattern(vp) = &mut v.from else { continue };
                vp.steps.truncate(k);
                if matches!(vp.steps.last(), Some(StepDef::Absent { duration: None, .. })) && vp.within.is_none() {
                    continue;
                }
                let what = match &p.steps[k - 1] {
                    StepDef::Event { alias, input, .. } => format!(
                        "{} = {}{}",
                        alias.value,
                        input.stream.value,
                        input.filter.as_ref().map(|f| format!("[{}]", f.value)).unwrap_or_default()
                    ),
                    StepDef::Absent { input, .. } => format!(
                        "not {}{}",
                        input.stream.value,
                        input.filter.as_ref().map(|f| format!("[{}]", f.value)).unwrap_or_default()
                    ),
                };
                let n = count(&run(v)?, "explain_out");
                println!("  steps 1..{k} (… {what}): {n} matches");
                if n == 0 {
                    println!(
                        "  the pattern stops at step {k}{}",
                        p.within.map(|w| format!(" (a match must complete within {w:?})")).unwrap_or_default()
                    );
                    break;
                }
            }
        }
    }
    let rows = run(rule.clone())?;
    let fired: Vec<&serde_json::Value> =
        rows.iter().filter(|r| !r["stream"].as_str().is_some_and(|s| s.ends_with("_late"))).collect();
    if fired.is_empty() {
        println!("  the rule did not fire");
    } else {
        println!("  the rule fired {} times:", fired.len());
        for r in fired.iter().take(20) {
            println!("    {r}");
        }
    }
    Ok(())
}
