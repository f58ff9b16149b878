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
