//! `ferrite sql "<query>"`: sends the query to a running server and prints the result.

use std::time::Duration;

use anyhow::{Context, bail};
use arrow::ipc::reader::StreamReader;

/// Flags of `ferrite sql`.
#[derive(Debug, clap::Args)]
pub struct SqlArgs {
    /// The SQL statement.
    query: String,
    /// Base URL of the server's HTTP API.
    #[arg(long, env = "FERRITE_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Output format: table, json or csv.
    #[arg(long, default_value = "table")]
    format: String,
    #[command(flatten)]
    auth: crate::client::AuthArgs,
}

pub fn run(args: SqlArgs) -> anyhow::Result<()> {
    let accept = match args.format.as_str() {
        "table" => "application/vnd.apache.arrow.stream",
        "json" => "application/json",
        "csv" => "text/csv",
        other => bail!("unknown format `{other}`; use table, json or csv"),
    };
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .new_agent();
    let url = format!("{}/api/v1/sql", args.server.trim_end_matches('/'));
    let body = serde_json::json!({ "sql": args.query }).to_string();
    let mut resp = args
        .auth
        .auth()?
        .apply(agent.post(&url))
        .header("Content-Type", "application/json")
        .header("Accept", accept)
        .send(body.as_bytes())
        .with_context(|| {
            format!("cannot reach the Ferrite server at {} (is `ferrite serve` running? set --server)", args.server)
        })?;
    let status = resp.status();
    let bytes = resp.body_mut().with_config().limit(u64::MAX).read_to_vec().context("reading the response")?;
    if !status.is_success() {
        let msg = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        bail!("{msg}");
    }
    if args.format == "table" {
        let reader = StreamReader::try_new(bytes.as_slice(), None).context("decoding the Arrow result")?;
        let batches = reader.collect::<Result<Vec<_>, _>>()?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        println!("{}", arrow::util::pretty::pretty_format_batches(&batches)?);
        println!("{rows} row{}", if rows == 1 { "" } else { "s" });
    } else {
        use std::io::Write;
        std::io::stdout().write_all(&bytes)?;
        println!();
    }
    Ok(())
}
