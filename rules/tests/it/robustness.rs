//! The rule language's parser and planner fed arbitrary text and mutations of the example
//! rule files (`tests/cases/*/rule.rules`): each file deploys or is refused with
//! diagnostics, never a panic. Proptest stands in for a coverage-guided fuzzer.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::harness::{engine, telemetry_catalog};

/// Cases per property: `FERRITE_FUZZ_CASES` for a longer run (docs/operations.md).
fn cases(default: u32) -> u32 {
    std::env::var("FERRITE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn seeds() -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cases"))? {
        let path = entry?.path().join("rule.rules");
        if path.is_file() {
            out.push(std::fs::read_to_string(path)?);
        }
    }
    anyhow::ensure!(out.len() >= 10, "the example rule files");
    Ok(out)
}

/// Deploys `text` on a fresh engine: Ok or diagnostics, and a deployed file runs its parse.
fn deploys_or_refuses(text: &str) -> Result<(), TestCaseError> {
    let _ = ferrite_rules::syntax::parse(text);
    let catalog = telemetry_catalog().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let _ = engine(&catalog, 1, text);
    Ok(())
}

#[test]
fn mutated_rule_files_deploy_or_are_refused_never_panic() -> anyhow::Result<()> {
    let seeds = seeds()?;
    let n = seeds.len();
    // Edits: flip a byte, cut, insert a byte, or splice a token that matters to the grammar.
    const TOKENS: &[&str] = &[
        "rule",
        "from",
        "every",
        "->",
        "within",
        "window",
        "tumbling",
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
        "'",
        "\"",
        "select",
        "group by",
        "having",
        "insert into",
        "then",
        "not",
        "and",
        "or",
        "9999999999999999999999",
        "-1",
        "0s",
        "1ns",
        "..",
        ",",
        ".",
        "as",
        "*",
        "/",
        "%",
        "\u{0}",
        "é",
        "--",
        "/*",
        "\\",
    ];
    let strategy = (0..n, prop::collection::vec((0usize..4, any::<usize>(), any::<u8>(), 0..TOKENS.len()), 0..6));
    let mut runner = TestRunner::new(Config { cases: cases(1000), ..Config::default() });
    runner
        .run(&strategy, |(seed, edits)| {
            let mut b = seeds[seed].as_bytes().to_vec();
            for (kind, at, byte, token) in edits {
                let at = if b.is_empty() { 0 } else { at % b.len() };
                match kind {
                    0 if !b.is_empty() => b[at] ^= byte | 1,
                    1 => b.truncate(at),
                    2 => b.insert(at, byte),
                    _ => {
                        let tail = b.split_off(at);
                        b.extend_from_slice(TOKENS[token].as_bytes());
                        b.extend(tail);
                    }
                }
            }
            deploys_or_refuses(&String::from_utf8_lossy(&b))
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(300)))]

    #[test]
    fn arbitrary_text_deploys_or_is_refused(text in "\\PC{0,200}") {
        deploys_or_refuses(&text)?;
    }
}
