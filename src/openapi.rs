//! The developer portal: the OpenAPI 3.1 document of the whole HTTP API, generated from the
//! handlers' `#[utoipa::path]` annotations and types, served at `/api/openapi.json`, with a
//! readable page at `/api/docs`; and the check that the router and the document agree.
//!
//! Every route is registered through `utoipa_axum::routes!`, which takes its method and path
//! from the handler's annotation, so a documented route cannot be missing from the router.
//! The other direction (a route added with a plain `.route()`, or a router converted into an
//! `OpenApiRouter`) is what [`coverage`] finds: the server refuses to start in a debug build
//! when a served route is not documented, which fails every test, and logs an error in a
//! release build.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{InfoBuilder, OpenApi, SecurityRequirement, Tag};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Where the document is served.
pub const DOCUMENT_PATH: &str = "/api/openapi.json";

/// The document as served, set once the whole router is assembled.
#[derive(Clone, Default)]
pub struct Document(Arc<OnceLock<bytes::Bytes>>);

impl Document {
    /// Sets the document (once; later calls are ignored).
    pub fn set(&self, doc: &OpenApi) -> anyhow::Result<()> {
        let json = doc.to_pretty_json()?;
        let _ = self.0.set(bytes::Bytes::from(json));
        Ok(())
    }
}

/// The portal's own routes (public: the document holds no secret).
pub fn routes(doc: Document) -> OpenApiRouter {
    OpenApiRouter::new().routes(routes!(openapi_json)).routes(routes!(docs_page)).with_state(doc)
}

/// The OpenAPI 3.1 document of this server's HTTP API.
#[utoipa::path(get, path = "/api/openapi.json", tag = "portal", security(()),
    responses((status = 200, description = "The document", content_type = "application/json", body = Object)))]
async fn openapi_json(State(doc): State<Document>) -> Response {
    match doc.0.get() {
        Some(json) => ([(header::CONTENT_TYPE, "application/json")], json.clone()).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "the API document is being assembled; retry").into_response(),
    }
}

/// A readable page of the API, built in the browser from the document (no external assets).
#[utoipa::path(get, path = "/api/docs", tag = "portal", security(()),
    responses((status = 200, description = "The page", content_type = "text/html", body = String)))]
async fn docs_page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("openapi_page.html")).into_response()
}

/// Completes the document the routers gathered: title, version, the bearer scheme as the
/// default requirement (routes marked `security(())` need none), and the tags' descriptions.
pub fn finish(mut doc: OpenApi) -> OpenApi {
    doc.info = InfoBuilder::new()
        .title("Ferrite HTTP API")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "Ingest, SQL, rules, identity, devices, commands and firmware updates. Protected routes take \
             `Authorization: Bearer TOKEN` (a token from /oauth2/token, /api/v1/login or /api/v1/tokens); with \
             identity off (the default of `ferrite serve`) every route is open. Errors are \
             `{\"error\": {\"code\", \"message\"}}` with a fitting status.",
        ))
        .build();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        ferrite_engine::api_doc::BEARER,
        SecurityScheme::Http(Http::builder().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
    );
    doc.security = Some(vec![SecurityRequirement::new(ferrite_engine::api_doc::BEARER, Vec::<String>::new())]);
    let tags = [
        ("ingest", "Write events: JSON, NDJSON and InfluxDB line protocol"),
        ("query", "SQL over the hot buffer and the Parquet archive; streams and retention"),
        ("rules", "Deploy, inspect, shadow and promote rules"),
        ("identity", "OAuth2 tokens, tenants, clients, users, API tokens, signing keys and policies"),
        ("devices", "The device registry: register, list, change, disable, approve, rotate, decommission"),
        ("commands", "Commands to devices, device types, twins and bulk jobs"),
        ("ota", "Signed firmware artifacts and update campaigns"),
        ("mqtt", "MQTT over WebSocket"),
        ("operations", "Health and metrics"),
        ("portal", "This document and its page"),
    ];
    doc.tags = Some(
        tags.iter()
            .map(|(name, description)| {
                let mut t = Tag::new(*name);
                t.description = Some((*description).to_owned());
                t
            })
            .collect(),
    );
    doc
}

/// A route as `METHOD /path`.
type Operation = (String, String);

/// What the router serves and the document does not describe, and the reverse.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Served but not documented.
    pub undocumented: Vec<String>,
    /// Documented but not served.
    pub unserved: Vec<String>,
}

impl Coverage {
    /// Whether the router and the document agree.
    pub fn complete(&self) -> bool {
        self.undocumented.is_empty() && self.unserved.is_empty()
    }
}

/// Compares the routes `router` serves with the operations of `doc`.
///
/// axum has no API that lists a router's routes; its `Debug` output names each route's
/// path and, in the `Allow` header it prepares for 405 answers, its methods. That output is
/// read here. `None` when it cannot be read (a different axum): the unit tests below fail
/// then, so that an upgrade is noticed.
pub fn coverage(router: &axum::Router, doc: &OpenApi) -> Option<Coverage> {
    let served = served(router)?;
    let documented: BTreeSet<Operation> = doc
        .paths
        .paths
        .iter()
        .flat_map(|(path, item)| {
            let methods = [
                ("GET", item.get.is_some()),
                ("PUT", item.put.is_some()),
                ("POST", item.post.is_some()),
                ("DELETE", item.delete.is_some()),
                ("OPTIONS", item.options.is_some()),
                ("PATCH", item.patch.is_some()),
                ("TRACE", item.trace.is_some()),
            ];
            methods.into_iter().filter(|(_, on)| *on).map(|(m, _)| (m.to_owned(), path.clone())).collect::<Vec<_>>()
        })
        .collect();
    let show = |(m, p): &Operation| format!("{m} {p}");
    Some(Coverage {
        undocumented: served.difference(&documented).map(show).collect(),
        unserved: documented.difference(&served).map(show).collect(),
    })
}

/// The (method, path) pairs `router` serves (HEAD, which axum adds to every GET, left out).
fn served(router: &axum::Router) -> Option<BTreeSet<Operation>> {
    let text = format!("{router:?}");
    // The main path router only: the fallback router's paths are not routes.
    let main = &text[text.find("path_router:")?..text.find("fallback_router:")?];
    let mut paths = std::collections::HashMap::new();
    let mut methods = std::collections::HashMap::new();
    let mut rest = main;
    while let Some(at) = rest.find("RouteId(") {
        rest = &rest[at + "RouteId(".len()..];
        let close = rest.find(')')?;
        let id: u32 = rest[..close].parse().ok()?;
        let after = rest[close + 1..].strip_prefix(": ")?;
        if let Some(quoted) = after.strip_prefix('"') {
            paths.insert(id, quoted[..quoted.find('"')?].to_owned());
        } else {
            // A method router: its `Allow` header, up to the next route.
            let end = after.find("RouteId(").unwrap_or(after.len());
            let body = &after[..end];
            let allow = body.find("allow_header: Bytes(b\"")?;
            let list = &body[allow + "allow_header: Bytes(b\"".len()..];
            let list = &list[..list.find('"')?];
            methods.insert(id, list.split(',').filter(|m| !m.is_empty() && *m != "HEAD").map(str::to_owned).collect());
        }
    }
    if paths.is_empty() {
        return None;
    }
    let mut out = BTreeSet::new();
    for (id, path) in paths {
        let ms: &Vec<String> = methods.get(&id)?;
        out.extend(ms.iter().map(|m| (m.clone(), path.clone())));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};

    /// A documented handler for the tests.
    #[utoipa::path(get, path = "/documented/{id}", params(("id" = String, Path)), responses((status = 200)))]
    async fn documented() -> &'static str {
        "ok"
    }

    /// Another, on a second method of the same path.
    #[utoipa::path(delete, path = "/documented/{id}", params(("id" = String, Path)), responses((status = 204)))]
    async fn removed() -> StatusCode {
        StatusCode::NO_CONTENT
    }

    fn split(r: OpenApiRouter) -> (axum::Router, OpenApi) {
        r.split_for_parts()
    }

    #[test]
    fn routes_registered_with_their_annotations_are_covered() {
        let (router, doc) = split(OpenApiRouter::new().routes(routes!(documented, removed)));
        let router = router.layer(axum::middleware::from_fn(crate::openapi::tests::pass)).fallback(|| async { "none" });
        assert_eq!(coverage(&router, &doc), Some(Coverage::default()));
    }

    #[test]
    fn a_plain_route_and_a_plain_method_are_found() {
        let (router, doc) = split(
            OpenApiRouter::new()
                .routes(routes!(documented))
                .route("/plain", post(|| async { "x" }))
                .merge(OpenApiRouter::from(axum::Router::new().route("/converted", get(|| async { "y" })))),
        );
        let c = coverage(&router, &doc).expect("the router's Debug output reads");
        assert_eq!(c.undocumented, vec!["GET /converted".to_owned(), "POST /plain".to_owned()]);
        assert!(c.unserved.is_empty());

        // A documented path whose router gained an undocumented method.
        let (router, doc) = split(OpenApiRouter::new().routes(routes!(documented)));
        let router = router.route("/documented/{id}", post(|| async { "z" }));
        let c = coverage(&router, &doc).expect("reads");
        assert_eq!(c.undocumented, vec!["POST /documented/{id}".to_owned()]);
    }

    #[test]
    fn a_documented_route_that_is_not_served_is_found() {
        let (_, doc) = split(OpenApiRouter::new().routes(routes!(documented, removed)));
        let (router, _) = split(OpenApiRouter::new().routes(routes!(documented)));
        let c = coverage(&router, &doc).expect("reads");
        assert_eq!(c.unserved, vec!["DELETE /documented/{id}".to_owned()]);
        assert!(c.undocumented.is_empty());
    }

    #[test]
    fn the_finished_document_is_openapi_3_1_with_the_bearer_scheme() -> anyhow::Result<()> {
        let (_, doc) = split(OpenApiRouter::new().routes(routes!(documented)));
        let v: serde_json::Value = serde_json::from_str(&finish(doc).to_json()?)?;
        assert!(v["openapi"].as_str().is_some_and(|s| s.starts_with("3.1")), "{}", v["openapi"]);
        assert_eq!(v["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
        assert_eq!(v["security"][0]["bearer"], serde_json::json!([]));
        Ok(())
    }

    async fn pass(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
        next.run(req).await
    }
}
