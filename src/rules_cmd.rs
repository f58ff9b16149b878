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
        match ferrite_rules::compile_text(&text, &schemas) {
            Ok(rules) => println!("{name}: ok ({} rules)", rules.len()),
            Err(Error::Invalid(ds)) => {
                // Streams the catalog does not know yet cannot be checked further: a warning.
                let (unknown, errors): (Vec<_>, Vec<_>) = ds
                    .into_iter()
                    .partition(|d| d.code == Some("unknown-stream") && !catalog_knows(&catalog, d, &text));
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
        RunShape { shards: 1, batch_rows: 1 },
        RunShape { shards: 2, batch_rows: 1024 },
        RunShape { shards: 3, batch_rows: 7 },
    ];
    let mut results = Vec::new();
    for shape in shapes {
        let catalog = Arc::new(StreamCatalog::in_memory());
        let events = load_events(&case.input, &catalog)?;
        let out = recorded::run(&rules, &catalog, &events, shape, Arc::new(NoActions))
            .map_err(|e| anyhow::anyhow!("{}", e.render(&rules_name, &rules)))?;
        results.push((shape, recorded::to_rows(&out)));
    }
    let (_, reference) = &results[0];
    for (shape, rows) in &results[1..] {
        if rows != reference {
            bail!(
                "outputs differ between one event per batch on one shard and {} events per batch on {} shards:\n{}",
                shape.batch_rows,
                shape.shards,
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

fn diff(expected: &[serde_json::Value], got: &[serde_json::Value]) -> String {
    let mut out = String::new();
    for e in expected.iter().filter(|e| !got.contains(e)) {
        out.push_str(&format!("  - {e}\n"));
    }
    for g in got.iter().filter(|g| !expected.contains(g)) {
        out.push_str(&format!("  + {g}\n"));
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
    let mut inputs: Vec<String> = Vec::new();
    for rule in &file.rules {
        let refs: Vec<&ferrite_rules::ast::StreamRef> = match &rule.from {
            ferrite_rules::ast::Source::Stream(s) => vec![s],
            ferrite_rules::ast::Source::Pattern(p) => p
                .steps
                .iter()
                .map(|s| match s {
                    ferrite_rules::ast::StepDef::Event { input, .. }
                    | ferrite_rules::ast::StepDef::Absent { input, .. } => input,
                })
                .collect(),
        };
        for r in refs {
            let derived = file.rules.iter().any(|x| x.insert_into.as_ref().is_some_and(|t| t.value == r.stream.value));
            if !derived && !inputs.contains(&r.stream.value) {
                inputs.push(r.stream.value.clone());
            }
        }
    }
    for (what, t) in [("--from", &args.from), ("--to", &args.to)] {
        if ferrite_ingest::json::parse_rfc3339(t).is_none() {
            bail!("{what} `{t}` is not an RFC 3339 time (e.g. 2026-11-01T00:00:00Z)");
        }
    }
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(3600)))
        .build()
        .new_agent();
    let base = args.server.trim_end_matches('/').to_owned();
    let catalog = Arc::new(StreamCatalog::in_memory());
    let mut events: Vec<StreamBatch> = Vec::new();
    for stream in &inputs {
        let sql =
            format!("SELECT * FROM \"{stream}\" WHERE time >= '{}' AND time < '{}' ORDER BY time", args.from, args.to);
        let mut resp = agent
            .post(&format!("{base}/api/v1/sql"))
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
        for batch in arrow::ipc::reader::StreamReader::try_new(bytes.as_slice(), None)? {
            let batch = batch?;
            for f in batch.schema().fields().iter().skip(2) {
                let ty = match f.data_type() {
                    arrow::datatypes::DataType::Float64 => ferrite_engine::FieldType::Float,
                    arrow::datatypes::DataType::Int64 => ferrite_engine::FieldType::Int,
                    arrow::datatypes::DataType::Boolean => ferrite_engine::FieldType::Bool,
                    arrow::datatypes::DataType::Timestamp(..) => ferrite_engine::FieldType::Timestamp,
                    _ => ferrite_engine::FieldType::String,
                };
                catalog.resolve_field(&name, f.name(), ty)?;
            }
            catalog.ensure_stream(&name)?;
            events.push(StreamBatch::new(name.clone(), batch));
        }
    }
    let events = merge_by_time(events)?;
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
        RunShape { shards: 1, batch_rows: 8192 },
        Arc::new(NoActions),
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
                    let mut resp = agent
                        .post(&format!("{base}/api/v1/streams/{stream}/events"))
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
