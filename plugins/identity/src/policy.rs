//! Cedar as the policy decision point: the schema shipped with Ferrite, the built-in policy
//! set, policy documents from files and the API (validated before they replace anything),
//! and the translation of an enforcement point's question into a Cedar request.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use ferrite_engine::auth::{Action, Decision, Principal, PrincipalKind, RequestContext, Resource};

use crate::error::{Error, Result};

/// The Cedar schema (`Ferrite` namespace) every policy is validated against.
pub const SCHEMA: &str = include_str!("../policies/schema.cedarschema");

/// The built-in, safe-by-default policies.
pub const DEFAULT_POLICIES: &str = include_str!("../policies/default.cedar");

/// A compiled, validated policy set and what it was made from.
#[derive(Debug, Clone)]
pub struct Policies {
    set: PolicySet,
    /// The source names (`default`, `file.cedar`, `api:name`) it holds.
    pub sources: Vec<String>,
}

/// The decision point: the schema and the authorizer.
pub struct Pdp {
    schema: Schema,
    authorizer: Authorizer,
}

impl std::fmt::Debug for Pdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pdp")
    }
}

/// The attributes a topic has in policies: the device it belongs to and its kind.
pub fn topic_parts(topic: &str) -> (&str, String) {
    let mut levels = topic.split('/');
    match levels.next() {
        Some("devices") => {}
        // Sparkplug B: `spBv1.0/{group}/{type}/{edge node}[/{device}]` is the edge node's
        // (`sparkplug/NDATA`, ...), a wildcard in the device level included.
        Some("spBv1.0") => {
            let rest: Vec<&str> = levels.collect();
            return match rest.as_slice() {
                [group, kind, edge, ..]
                    if rest.len() <= 4 && ![*group, *kind, *edge].iter().any(|l| matches!(*l, "+" | "#" | "")) =>
                {
                    (*edge, format!("sparkplug/{kind}"))
                }
                _ => ("", "other".into()),
            };
        }
        _ => return ("", "other".into()),
    }
    let Some(device) = levels.next() else { return ("", "other".into()) };
    let rest: Vec<&str> = levels.collect();
    if rest.is_empty() {
        return (device, "other".into());
    }
    if rest.iter().any(|l| *l == "+" || *l == "#") {
        return (device, "wildcard".into());
    }
    if rest[0] == "telemetry" && rest.len() <= 2 {
        return (device, "telemetry".into());
    }
    (device, rest.join("/"))
}

/// Every parse error of a document, on one line.
fn render_parse_errors(e: &cedar_policy::ParseErrors) -> String {
    e.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

fn type_name(name: &str) -> Result<EntityTypeName> {
    EntityTypeName::from_str(name).map_err(|e| Error::Policy(format!("entity type {name}: {e}")))
}

fn uid(type_: &str, id: &str) -> Result<EntityUid> {
    Ok(EntityUid::from_type_name_and_id(type_name(type_)?, EntityId::new(id)))
}

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

fn strings(items: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(items.iter().map(|s| string(s)))
}

impl Pdp {
    /// Parses the shipped schema.
    pub fn new() -> Result<Self> {
        let (schema, _warnings) = Schema::from_cedarschema_str(SCHEMA)
            .map_err(|e| Error::Policy(format!("the shipped schema does not parse: {e}")))?;
        Ok(Self { schema, authorizer: Authorizer::new() })
    }

    /// Compiles the built-in policies and `documents` (source name, text) into one set,
    /// each policy named `source:id` (its `@id` annotation, or its position), validated
    /// against the schema. Any error refuses the whole set, naming the source.
    pub fn compile(&self, documents: &[(String, String)]) -> Result<Policies> {
        let mut set = PolicySet::new();
        let mut sources = vec!["default".to_owned()];
        let mut add = |source: &str, text: &str| -> Result<()> {
            let parsed = PolicySet::from_str(text)
                .map_err(|e| Error::Policy(format!("{source}: {}", render_parse_errors(&e))))?;
            let mut policies: Vec<_> = parsed.policies().cloned().collect();
            policies.sort_by_key(|p| p.id().to_string());
            for (i, p) in policies.into_iter().enumerate() {
                let name = p.annotation("id").map(str::to_owned).unwrap_or_else(|| format!("policy{i}"));
                let id = PolicyId::new(format!("{source}:{name}"));
                set.add(p.new_id(id)).map_err(|e| Error::Policy(format!("{source}: {e}")))?;
            }
            Ok(())
        };
        add("default", DEFAULT_POLICIES)?;
        for (source, text) in documents {
            add(source, text)?;
            sources.push(source.clone());
        }
        let validation = Validator::new(self.schema.clone()).validate(&set, ValidationMode::Strict);
        if !validation.validation_passed() {
            let errors: Vec<String> = validation.validation_errors().map(|e| format!("{e} ({e:?})")).collect();
            return Err(Error::Policy(format!("does not validate against the Ferrite schema: {}", errors.join("; "))));
        }
        Ok(Policies { set, sources })
    }

    /// Decides. `topic_tenant` tells the tenant of a topic's device.
    #[allow(clippy::too_many_arguments)]
    pub fn decide(
        &self,
        policies: &Policies,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        context: &RequestContext,
        topic_tenant: &dyn Fn(&str) -> String,
        now: i64,
    ) -> Result<Decision> {
        let (p_entity, p_uid) = principal_entity(principal)?;
        let (r_entity, r_uid) = resource_entity(resource, topic_tenant)?;
        let mut entities = vec![p_entity];
        if r_uid != p_uid {
            entities.push(r_entity);
        }
        let entities =
            Entities::from_entities(entities, None).map_err(|e| Error::Policy(format!("building entities: {e}")))?;
        let mut pairs = vec![
            ("transport".to_owned(), string(context.transport.as_str())),
            ("tls".to_owned(), RestrictedExpression::new_bool(context.tls)),
            ("time".to_owned(), RestrictedExpression::new_long(now)),
        ];
        if let Some(ip) = context.source {
            pairs.push(("source".to_owned(), RestrictedExpression::new_ip(ip.to_string())));
        }
        let context = Context::from_pairs(pairs).map_err(|e| Error::Policy(format!("building the context: {e}")))?;
        let request = Request::new(p_uid, uid("Ferrite::Action", action.as_str())?, r_uid, context, None)
            .map_err(|e| Error::Policy(format!("building the request: {e}")))?;
        let response = self.authorizer.is_authorized(&request, &policies.set, &entities);
        let reasons: Vec<String> = response.diagnostics().reason().map(ToString::to_string).collect();
        let errors: Vec<String> = response.diagnostics().errors().map(ToString::to_string).collect();
        if !errors.is_empty() {
            tracing::warn!(?errors, "policy evaluation errors (those policies were skipped)");
        }
        Ok(Decision { allowed: response.decision() == CedarDecision::Allow, policies: reasons })
    }
}

fn principal_entity(p: &Principal) -> Result<(Entity, EntityUid)> {
    let type_ = match p.kind {
        PrincipalKind::User => "Ferrite::User",
        PrincipalKind::Service => "Ferrite::Client",
        PrincipalKind::Device => "Ferrite::Device",
    };
    let id = uid(type_, &p.id)?;
    let mut attrs: HashMap<String, RestrictedExpression> = HashMap::from([
        ("id".to_owned(), string(&p.id)),
        ("tenant".to_owned(), string(&p.tenant)),
        ("roles".to_owned(), strings(&p.roles)),
    ]);
    if p.kind == PrincipalKind::Device {
        attrs.insert("children".into(), strings(&p.children));
        attrs.insert("device_type".into(), string(p.device_type.as_deref().unwrap_or("")));
    }
    let entity =
        Entity::new(id.clone(), attrs, HashSet::new()).map_err(|e| Error::Policy(format!("principal: {e}")))?;
    Ok((entity, id))
}

fn resource_entity(r: &Resource, topic_tenant: &dyn Fn(&str) -> String) -> Result<(Entity, EntityUid)> {
    let (type_, id, attrs): (&str, &str, Vec<(&str, RestrictedExpression)>) = match r {
        Resource::Stream { tenant, name } => {
            ("Ferrite::Stream", name, vec![("name", string(name)), ("tenant", string(tenant))])
        }
        Resource::Topic(topic) => {
            let (device, kind) = topic_parts(topic);
            let tenant = topic_tenant(device);
            (
                "Ferrite::Topic",
                topic,
                vec![
                    ("name", string(topic)),
                    ("tenant", string(&tenant)),
                    ("device", string(device)),
                    ("kind", string(&kind)),
                ],
            )
        }
        Resource::Device { tenant, id } => (
            "Ferrite::Device",
            id,
            vec![
                ("id", string(id)),
                ("tenant", string(tenant)),
                ("roles", strings(&[])),
                ("children", strings(&[])),
                ("device_type", string("")),
            ],
        ),
        Resource::Rule { tenant, name } => {
            ("Ferrite::Rule", name, vec![("name", string(name)), ("tenant", string(tenant))])
        }
        Resource::Tenant(t) => ("Ferrite::Tenant", t, vec![("id", string(t)), ("tenant", string(t))]),
    };
    let uid = uid(type_, id)?;
    let attrs = attrs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    let entity =
        Entity::new(uid.clone(), attrs, HashSet::new()).map_err(|e| Error::Policy(format!("resource: {e}")))?;
    Ok((entity, uid))
}

#[cfg(test)]
mod tests {
    use ferrite_engine::auth::Transport;

    use super::*;

    fn ask(pdp: &Pdp, pol: &Policies, p: &Principal, a: Action, r: Resource) -> bool {
        let ctx = RequestContext::new(Transport::Mqtt, Some("127.0.0.1".parse().expect("ip")));
        pdp.decide(pol, p, a, &r, &ctx, &|_| "default".to_owned(), 0).expect("decide").allowed
    }

    #[test]
    fn topics_have_a_device_and_a_kind() {
        assert_eq!(topic_parts("devices/d1/telemetry"), ("d1", "telemetry".into()));
        assert_eq!(topic_parts("devices/d1/telemetry/power"), ("d1", "telemetry".into()));
        assert_eq!(topic_parts("devices/d1/commands/result"), ("d1", "commands/result".into()));
        assert_eq!(topic_parts("devices/+/commands"), ("+", "commands".into()));
        assert_eq!(topic_parts("devices/d1/#"), ("d1", "wildcard".into()));
        assert_eq!(topic_parts("#"), ("", "other".into()));
        assert_eq!(topic_parts("spBv1.0/plant-1/NDATA/edge1"), ("edge1", "sparkplug/NDATA".into()));
        assert_eq!(topic_parts("spBv1.0/plant-1/DDATA/edge1/pump1"), ("edge1", "sparkplug/DDATA".into()));
        assert_eq!(topic_parts("spBv1.0/plant-1/DCMD/edge1/+"), ("edge1", "sparkplug/DCMD".into()));
        assert_eq!(topic_parts("spBv1.0/+/NCMD/edge1"), ("", "other".into()));
        assert_eq!(topic_parts("spBv1.0/plant-1/NDATA/edge1/a/b"), ("", "other".into()));
    }

    #[test]
    fn the_default_set_is_safe() {
        let pdp = Pdp::new().expect("schema");
        let pol = pdp.compile(&[]).expect("default policies validate");
        let d1 = Principal::new(PrincipalKind::Device, "d1", "default");
        let topic = |t: &str| Resource::topic(t);
        assert!(ask(&pdp, &pol, &d1, Action::Publish, topic("devices/d1/telemetry")));
        assert!(ask(&pdp, &pol, &d1, Action::Publish, topic("devices/d1/telemetry/power")));
        assert!(ask(&pdp, &pol, &d1, Action::Publish, topic("devices/d1/ota/status")));
        assert!(ask(&pdp, &pol, &d1, Action::Ingest, Resource::stream("default", "telemetry")));
        assert!(!ask(&pdp, &pol, &d1, Action::Ingest, Resource::stream("other", "telemetry")));
        assert!(!ask(&pdp, &pol, &d1, Action::Ingest, Resource::tenant("default")), "no line protocol for devices");
        assert!(!ask(&pdp, &pol, &d1, Action::Publish, topic("devices/d2/ota/status")));
        assert!(!ask(&pdp, &pol, &d1, Action::Publish, topic("devices/d2/telemetry")));
        assert!(!ask(&pdp, &pol, &d1, Action::Publish, topic("devices/d1/commands")));
        assert!(ask(&pdp, &pol, &d1, Action::Subscribe, topic("devices/d1/commands")));
        assert!(ask(&pdp, &pol, &d1, Action::Subscribe, topic("devices/d1/shadow/desired")));
        assert!(!ask(&pdp, &pol, &d1, Action::Subscribe, topic("#")));
        assert!(!ask(&pdp, &pol, &d1, Action::Subscribe, topic("devices/+/commands")));
        assert!(!ask(&pdp, &pol, &d1, Action::Subscribe, topic("devices/d1/#")));
        assert!(!ask(&pdp, &pol, &d1, Action::Query, Resource::tenant("default")));
        // A gateway acts for its registered children.
        let mut gw = Principal::new(PrincipalKind::Device, "gw", "default");
        gw.children = vec!["c1".to_owned()].into();
        assert!(ask(&pdp, &pol, &gw, Action::Publish, topic("devices/c1/telemetry")));
        assert!(!ask(&pdp, &pol, &gw, Action::Publish, topic("devices/c2/telemetry")));
        // Users act only inside their tenant; only admins manage.
        let viewer = Principal::new(PrincipalKind::User, "ann", "a").with_roles(["viewer"]);
        assert!(ask(&pdp, &pol, &viewer, Action::Query, Resource::tenant("a")));
        assert!(!ask(&pdp, &pol, &viewer, Action::Query, Resource::tenant("b")));
        assert!(!ask(&pdp, &pol, &viewer, Action::ManageRules, Resource::rule("a", "r")));
        let admin_a = Principal::new(PrincipalKind::User, "boss", "a").with_roles(["admin"]);
        assert!(ask(&pdp, &pol, &admin_a, Action::ManageRules, Resource::rule("a", "r")));
        assert!(!ask(&pdp, &pol, &admin_a, Action::ManageRules, Resource::rule("b", "r")));
        assert!(!ask(&pdp, &pol, &admin_a, Action::ManageIdentity, Resource::tenant("b")));
        let root = Principal::new(PrincipalKind::User, "admin", "default").with_roles(["platform-admin", "admin"]);
        assert!(ask(&pdp, &pol, &root, Action::Subscribe, topic("#")));
        assert!(ask(&pdp, &pol, &root, Action::ManageIdentity, Resource::tenant("b")));
    }

    #[test]
    fn a_broken_or_invalid_document_is_refused_whole() {
        let pdp = Pdp::new().expect("schema");
        let err =
            pdp.compile(&[("bad.cedar".into(), "permit (principal, action, resource".into())]).expect_err("refused");
        assert!(err.to_string().contains("bad.cedar"), "{err}");
        // Parses, but names an attribute the schema does not have.
        let err = pdp
            .compile(&[(
                "typo.cedar".into(),
                "permit (principal, action, resource) when { principal.rolez.contains(\"x\") };".into(),
            )])
            .expect_err("refused");
        assert!(err.to_string().contains("validate"), "{err}");
        // A valid forbid overrides the default permits.
        let pol = pdp
            .compile(&[(
                "night.cedar".into(),
                "@id(\"no-d1\") forbid (principal == Ferrite::Device::\"d1\", action, resource);".into(),
            )])
            .expect("valid");
        let d1 = Principal::new(PrincipalKind::Device, "d1", "default");
        assert!(!ask(&pdp, &pol, &d1, Action::Publish, Resource::topic("devices/d1/telemetry")));
    }
}
