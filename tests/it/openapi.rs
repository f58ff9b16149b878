//! The developer portal against the real server: `/api/openapi.json` is an OpenAPI 3.1
//! document of every route, every documented operation is served, every method a path does
//! not document is refused with 405, and `/api/docs` is a page built from the document.
//! (The server itself refuses to start in a debug build when a route it serves is missing
//! from the document; see src/openapi.rs.)

use std::collections::BTreeSet;

use serde_json::Value;

use crate::harness::Server;

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// Sends `method` to `path` with the admin's token and a small JSON body where one fits.
fn send(s: &Server, method: &str, path: &str) -> anyhow::Result<(u16, Value)> {
    let url = s.url(path);
    let auth = s.bearer();
    let a = s.agent();
    let mut resp = match method {
        "GET" => a.get(&url).header("Authorization", &auth).call()?,
        "DELETE" => a.delete(&url).header("Authorization", &auth).call()?,
        "POST" => a.post(&url).header("Authorization", &auth).header("Content-Type", "application/json").send("{}")?,
        "PUT" => a.put(&url).header("Authorization", &auth).header("Content-Type", "application/json").send("{}")?,
        "PATCH" => {
            a.patch(&url).header("Authorization", &auth).header("Content-Type", "application/json").send("{}")?
        }
        other => anyhow::bail!("method {other}"),
    };
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

/// Every `$ref` in `v`.
fn refs(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("$ref", Value::String(r)) => {
                        out.insert(r.clone());
                    }
                    _ => refs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[test]
fn the_document_describes_every_route_and_each_is_served() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;

    // Public: no token.
    let mut resp = s.agent().get(&s.url("/api/openapi.json")).call()?;
    anyhow::ensure!(resp.status() == 200, "openapi.json: {}", resp.status());
    let doc: Value = serde_json::from_str(&resp.body_mut().read_to_string()?)?;
    anyhow::ensure!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1")), "version {}", doc["openapi"]);
    anyhow::ensure!(doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer", "no bearer scheme");

    let paths = doc["paths"].as_object().ok_or_else(|| anyhow::anyhow!("no paths"))?;
    let mut operations = Vec::new();
    for (path, item) in paths {
        for m in METHODS {
            let Some(op) = item.get(m.to_ascii_lowercase()) else { continue };
            operations.push((m, path.clone()));
            // Each operation says what it is for, where it belongs and what it answers.
            let what = op["summary"].as_str().or(op["description"].as_str()).unwrap_or("");
            anyhow::ensure!(!what.is_empty(), "{m} {path} has no summary");
            anyhow::ensure!(op["tags"].as_array().is_some_and(|t| !t.is_empty()), "{m} {path} has no tag");
            anyhow::ensure!(op["responses"].as_object().is_some_and(|r| !r.is_empty()), "{m} {path} has no responses");
            // Each path parameter is declared.
            let declared: BTreeSet<&str> = op["parameters"]
                .as_array()
                .map(|ps| ps.iter().filter(|p| p["in"] == "path").filter_map(|p| p["name"].as_str()).collect())
                .unwrap_or_default();
            for segment in path.split('/').filter_map(|x| x.strip_prefix('{')?.strip_suffix('}')) {
                anyhow::ensure!(declared.contains(segment), "{m} {path}: path parameter {segment} is not declared");
            }
        }
    }
    // The whole API: ingest, SQL, rules, identity, devices, commands, firmware, operations.
    anyhow::ensure!(operations.len() >= 70, "only {} operations documented", operations.len());
    for must in [
        "/api/v1/streams/{stream}/events",
        "/api/v1/sql",
        "/api/v1/rules",
        "/oauth2/token",
        "/api/v1/devices",
        "/api/v1/devices/{id}/commands",
        "/api/v1/ota/campaigns",
        "/healthz",
        "/metrics",
        "/mqtt",
        "/api/openapi.json",
        "/api/docs",
    ] {
        anyhow::ensure!(paths.contains_key(must), "{must} is not documented");
    }

    // Every reference resolves, and the schemas come from the handlers' types.
    let mut all = BTreeSet::new();
    refs(&doc, &mut all);
    let schemas = doc["components"]["schemas"].as_object().ok_or_else(|| anyhow::anyhow!("no schemas"))?;
    for r in &all {
        let name = r.strip_prefix("#/components/schemas/").ok_or_else(|| anyhow::anyhow!("odd ref {r}"))?;
        anyhow::ensure!(schemas.contains_key(name), "{r} does not resolve");
    }
    let device_input = &schemas["DeviceInput"]["properties"];
    anyhow::ensure!(device_input.get("type").is_some() && device_input.get("location").is_some(), "{device_input}");
    anyhow::ensure!(schemas["DeviceStatus"]["enum"] != schemas["CommandStatus"]["enum"], "two Status types merged");
    let public = &paths["/oauth2/token"]["post"]["security"];
    anyhow::ensure!(public == &serde_json::json!([{}]), "the token endpoint should need no token: {public}");

    // Every documented operation is served: never the router's 404 nor a 405.
    for (m, path) in &operations {
        let concrete =
            path.split('/').map(|x| if x.starts_with('{') { "openapi-probe" } else { x }).collect::<Vec<_>>().join("/");
        let (status, body) = send(&s, m, &concrete)?;
        anyhow::ensure!(status != 405, "{m} {path} is documented but answers 405");
        anyhow::ensure!(body["error"]["code"] != "no_route", "{m} {path} is documented but not routed: {body}");
    }
    // Every method a path does not document is refused.
    for path in paths.keys() {
        let concrete =
            path.split('/').map(|x| if x.starts_with('{') { "openapi-probe" } else { x }).collect::<Vec<_>>().join("/");
        for m in METHODS {
            if paths[path].get(m.to_ascii_lowercase()).is_some() {
                continue;
            }
            let (status, _) = send(&s, m, &concrete)?;
            anyhow::ensure!(status == 405, "{m} {path} is not documented but answers {status}");
        }
    }

    // A path nobody serves: a clear 404 that points at the document.
    let (status, body) = send(&s, "GET", "/api/v1/nothing-here")?;
    anyhow::ensure!(status == 404 && body["error"]["code"] == "no_route", "{status} {body}");
    let message = body["error"]["message"].as_str().unwrap_or("");
    anyhow::ensure!(message.contains("/api/v1/nothing-here") && message.contains("/api/openapi.json"), "{message}");

    // The page, with no token and no external asset.
    let mut resp = s.agent().get(&s.url("/api/docs")).call()?;
    anyhow::ensure!(resp.status() == 200, "docs: {}", resp.status());
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let page = resp.body_mut().read_to_string()?;
    anyhow::ensure!(ct.starts_with("text/html"), "{ct}");
    anyhow::ensure!(page.contains("/api/openapi.json"), "the page does not load the document");
    anyhow::ensure!(!page.contains("https://") && !page.contains("<script src"), "the page loads an external asset");
    Ok(())
}
