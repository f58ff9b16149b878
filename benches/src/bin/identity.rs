//! What identity costs, end to end: the same load against a release `ferrite serve` with
//! `--auth off` and with identity on, alternating in the same run, and the token endpoint.
//!
//! - `mqtt_qos1`: `publishers` clients × `messages` single-event QoS 1 messages, over at the
//!   last PUBACK (the same load as `ingest_mqtt`). With identity on, each publisher is a
//!   registered device `dev-{p}` that connects with its client secret and publishes on its
//!   own telemetry topic: a CONNECT check, then one policy decision per session and topic.
//! - `http_json`: `threads` clients POST arrays of 1,000 readings for `seconds` (the load of
//!   `ingest_http`). With identity on, with the bearer token of a service client holding
//!   `ingest`: an Ed25519 JWT check and a Cedar decision per request.
//! - `token_endpoint`: `threads` clients run the client-credentials grant for `seconds`
//!   (HTTP Basic, one Ed25519 signature and one audit record per token): requests per
//!   second; there is no peer on this machine to measure beside it.
//!
//! `cargo run --release -p ferrite-benches --bin identity -- [publishers] [messages] [threads] [seconds] [runs]`

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use ferrite_benches::load::{accepted, http_load, publish_all};
use ferrite_benches::median;
use ferrite_benches::server::Ferrite;
use ferrite_benches::{json_array, readings};
use rumqttc::QoS;

/// POSTs JSON with the admin token; the answer's JSON.
fn admin_post(server: &Ferrite, path: &str, body: serde_json::Value) -> Result<serde_json::Value, String> {
    server.admin_post(path, "application/json", body.to_string().as_bytes())
}

/// Registers a client; its id and secret.
fn add_client(server: &Ferrite, body: serde_json::Value) -> Result<(String, String), String> {
    let v = admin_post(server, "/api/v1/clients", body)?;
    let field = |k: &str| v[k].as_str().map(str::to_owned).ok_or_else(|| format!("no {k} in {v}"));
    Ok((field("client_id")?, field("client_secret")?))
}

/// A client-credentials access token.
fn access_token(server: &Ferrite, id: &str, secret: &str) -> Result<String, String> {
    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let mut resp = agent
        .post(&format!("http://{}/oauth2/token", server.http))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .send(format!("grant_type=client_credentials&client_id={id}&client_secret={secret}"))
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&resp.body_mut().read_to_string().map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    v["access_token"].as_str().map(str::to_owned).ok_or_else(|| format!("no token: {v}"))
}

fn start(auth: bool, tag: &str) -> Result<(Ferrite, std::path::PathBuf), String> {
    let dir = std::env::temp_dir().join(format!("ferrite-bench-identity-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let server = Ferrite::start(&dir, &["--auth", if auth { "on" } else { "off" }])?;
    Ok((server, dir))
}

async fn mqtt_qos1(auth: bool, publishers: usize, messages: usize) -> Result<f64, String> {
    let (server, dir) = start(auth, "mqtt")?;
    let credentials = if auth {
        (0..publishers)
            .map(|p| add_client(&server, serde_json::json!({"id": format!("dev-{p}"), "kind": "device"})))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    let started = Instant::now();
    publish_all(server.mqtt.port(), publishers, messages, QoS::AtLeastOnce, Arc::new(AtomicU64::new(0)), &credentials)
        .await?;
    let rate = (publishers * messages) as f64 / started.elapsed().as_secs_f64();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rate)
}

fn http_json(auth: bool, threads: usize, seconds: u64) -> Result<f64, String> {
    let (server, dir) = start(auth, "http")?;
    let bearer = if auth {
        let (id, secret) = add_client(&server, serde_json::json!({"roles": ["ingest"]}))?;
        Some(format!("Bearer {}", access_token(&server, &id, &secret)?))
    } else {
        None
    };
    let body = Arc::new(json_array(&readings(1000, 100)));
    let url = format!("http://{}/api/v1/streams/readings/events", server.http);
    let (events, secs) = http_load(&url, "application/json", body, threads, seconds, bearer, accepted);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(events as f64 / secs)
}

fn token_endpoint(threads: usize, seconds: u64) -> Result<f64, String> {
    let (server, dir) = start(true, "token")?;
    let (id, secret) = add_client(&server, serde_json::json!({"roles": ["viewer"]}))?;
    let url = format!("http://{}/oauth2/token", server.http);
    let form = Arc::new(format!("grant_type=client_credentials&client_id={id}&client_secret={secret}").into_bytes());
    // One "event" per token: the JSON answer carries no `accepted`, so count 200s.
    let issued = |status: u16, body: &str| (status == 200 && body.contains("access_token")).then_some(1);
    let (tokens, secs) = http_load(&url, "application/x-www-form-urlencoded", form, threads, seconds, None, issued);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(tokens as f64 / secs)
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut next = |default: usize| args.next().and_then(|a| a.parse().ok()).unwrap_or(default);
    let (publishers, messages, threads, seconds, runs) = (next(100), next(2000), next(4), next(10) as u64, next(3));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    let (mut mqtt_off, mut mqtt_on, mut http_off, mut http_on, mut tokens) = (vec![], vec![], vec![], vec![], vec![]);
    for run in 1..=runs {
        mqtt_off.push(rt.block_on(mqtt_qos1(false, publishers, messages))?);
        mqtt_on.push(rt.block_on(mqtt_qos1(true, publishers, messages))?);
        http_off.push(http_json(false, threads, seconds)?);
        http_on.push(http_json(true, threads, seconds)?);
        tokens.push(token_endpoint(threads, seconds)?);
        println!(
            "identity run={run} mqtt_qos1_off_msgs_per_s={:.0} mqtt_qos1_on_msgs_per_s={:.0} http_json_off_events_per_s={:.0} http_json_on_events_per_s={:.0} token_endpoint_per_s={:.0}",
            mqtt_off[run - 1],
            mqtt_on[run - 1],
            http_off[run - 1],
            http_on[run - 1],
            tokens[run - 1]
        );
    }
    let (mo, mi, ho, hi) = (median(mqtt_off), median(mqtt_on), median(http_off), median(http_on));
    println!(
        "identity_summary scenario=mqtt_qos1 publishers={publishers} messages={} off_median={mo:.0} on_median={mi:.0} on/off={:.3}",
        publishers * messages,
        mi / mo
    );
    println!(
        "identity_summary scenario=http_json threads={threads} off_median={ho:.0} on_median={hi:.0} on/off={:.3}",
        hi / ho
    );
    println!("identity_summary scenario=token_endpoint threads={threads} tokens_per_s_median={:.0}", median(tokens));
    Ok(())
}
