//! Where rule actions go in a running server: MQTT publishes (and device commands) through
//! the embedded broker, webhooks through a bounded queue drained by one HTTP client thread.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError, bounded};
use std::collections::HashMap;

use ferrite_engine::Metrics;
use ferrite_engine::auth::{AccessControl, Action, Principal, PrincipalKind, RequestContext, Resource, Transport};
use ferrite_ingest::mqtt::Broker;
use ferrite_rules::ActionSink;
use std::sync::Mutex;

/// Webhook calls queued before new ones are dropped (and counted): a slow endpoint must not
/// stall the shard threads that run the rules.
const WEBHOOK_QUEUE: usize = 1024;

/// Publish decisions kept for tenants' rules before the cache starts over.
const MAX_DECISIONS: usize = 4096;

pub struct ServerActions {
    broker: Arc<Broker>,
    webhooks: Sender<(String, Vec<u8>)>,
    metrics: Arc<Metrics>,
    /// Decides which topics the rules of a tenant other than `default` may publish on (set
    /// once identity has started); until then, and without it, such publishes are dropped.
    access: std::sync::OnceLock<Arc<dyn AccessControl>>,
    /// The actuation service (set once the plugins started): rules' commands go through it.
    actuation: std::sync::OnceLock<Arc<std::sync::OnceLock<Arc<ferrite_actuation::Actuation>>>>,
    /// Where rules' commands are checked and queued (shard threads do not wait for it).
    runtime: Option<tokio::runtime::Handle>,
    /// The decisions of tenants' rule publishes, per tenant and topic, asked once until
    /// policies change (the generation they were made in).
    decisions: Mutex<(u64, TopicDecisions)>,
}

/// Per tenant, per topic: whether its rules may publish there.
type TopicDecisions = HashMap<String, HashMap<String, bool>>;

/// The principal a tenant's rules act as when they publish: a service of the tenant with
/// the `rules` role (the default policies let it reach its own tenant's devices).
fn rules_principal(tenant: &str) -> Principal {
    Principal::new(PrincipalKind::Service, "rules", tenant).with_roles(["rules"])
}

impl ServerActions {
    pub fn start(broker: Arc<Broker>, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let (tx, rx) = bounded::<(String, Vec<u8>)>(WEBHOOK_QUEUE);
        let m = metrics.clone();
        std::thread::Builder::new().name("ferrite-webhooks".into()).spawn(move || {
            let agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(10)))
                .build()
                .new_agent();
            for (url, body) in rx {
                let outcome = match agent.post(&url).header("Content-Type", "application/json").send(body.as_slice()) {
                    Ok(r) if r.status().is_success() => "ok",
                    Ok(r) => {
                        tracing::warn!(url, status = %r.status(), "webhook answered with an error");
                        "http_error"
                    }
                    Err(e) => {
                        tracing::warn!(url, error = %e, "webhook failed");
                        "unreachable"
                    }
                };
                m.inc("ferrite_webhooks_total", &[("outcome", outcome)], 1);
            }
        })?;
        Ok(Self {
            broker,
            webhooks: tx,
            metrics,
            access: std::sync::OnceLock::new(),
            actuation: std::sync::OnceLock::new(),
            runtime: tokio::runtime::Handle::try_current().ok(),
            decisions: Mutex::new((0, HashMap::new())),
        })
    }

    /// Sets the actuation service rules' commands go through.
    pub fn set_actuation(&self, actuation: Arc<std::sync::OnceLock<Arc<ferrite_actuation::Actuation>>>) {
        let _ = self.actuation.set(actuation);
    }

    /// Sets the decision point for tenants' rule publishes.
    pub fn set_access(&self, access: Arc<dyn AccessControl>) {
        let _ = self.access.set(access);
    }

    /// Whether a rule of `tenant` may publish on `topic`: the default tenant's rules (the
    /// operator's) may publish anywhere; another tenant's only where its `rules` service
    /// principal is allowed to (its own devices' topics, by the default policies).
    fn may_publish(&self, tenant: &str, topic: &str) -> bool {
        if tenant == ferrite_engine::ids::DEFAULT_TENANT {
            return true;
        }
        let Some(access) = self.access.get() else { return false };
        let generation = access.generation();
        let mut decisions = self.decisions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if decisions.0 != generation || decisions.1.values().map(HashMap::len).sum::<usize>() >= MAX_DECISIONS {
            *decisions = (generation, HashMap::new());
        }
        if let Some(&allowed) = decisions.1.get(tenant).and_then(|t| t.get(topic)) {
            return allowed;
        }
        let context = RequestContext::new(Transport::Internal, None);
        let allowed =
            access.authorize(&rules_principal(tenant), Action::Publish, &Resource::topic(topic), &context).allowed;
        decisions.1.entry(tenant.to_owned()).or_default().insert(topic.to_owned(), allowed);
        allowed
    }
}

impl ActionSink for ServerActions {
    fn publish(&self, tenant: &str, topic: &str, payload: Vec<u8>) {
        if !self.may_publish(tenant, topic) {
            self.metrics.inc("ferrite_rule_publish_failures_total", &[("reason", "denied")], 1);
            tracing::warn!(
                tenant,
                topic,
                "rule action: the tenant's rules may not publish on this topic; message dropped"
            );
            return;
        }
        if let Err(e) =
            self.broker.publish(topic, bytes::Bytes::from(payload), ferrite_ingest::broker::QoS::AtLeastOnce, false)
        {
            self.metrics.inc("ferrite_rule_publish_failures_total", &[("reason", "invalid_topic")], 1);
            tracing::warn!(topic, error = %e, "rule action: publish topic is not valid MQTT; message dropped");
        }
    }

    fn command(&self, tenant: &str, rule: &str, device: &str, name: &str, params: serde_json::Value, _id: &str) {
        let Some(actuation) = self.actuation.get().and_then(|a| a.get()).cloned() else {
            self.metrics.inc("ferrite_rule_publish_failures_total", &[("reason", "no_actuation")], 1);
            tracing::warn!(rule, device, "rule action: commands need the actuation plugin; dropped");
            return;
        };
        let Some(runtime) = self.runtime.clone() else { return };
        let params = match params {
            serde_json::Value::Object(m) => m,
            other => {
                self.metrics.inc("ferrite_commands_refused_total", &[("reason", "invalid")], 1);
                tracing::warn!(rule, device, params = %other, "rule action: command params are not an object; dropped");
                return;
            }
        };
        let request = ferrite_actuation::CommandRequest { name: name.to_owned(), params, timeout: None };
        let sender = rules_principal(tenant);
        let (tenant, device, rule) = (tenant.to_owned(), device.to_owned(), rule.to_owned());
        // The shard thread must not wait: the command is checked and queued on the runtime.
        runtime.spawn(async move {
            let context = RequestContext::new(Transport::Internal, None);
            let label = format!("rule::{rule:?} (tenant {tenant})");
            if let Err(e) = actuation.submit(&sender, Some(&label), &context, &tenant, &device, request).await {
                tracing::warn!(rule, device, error = %e, "rule action: command refused");
            }
        });
    }

    fn webhook(&self, url: &str, body: Vec<u8>) {
        match self.webhooks.try_send((url.to_owned(), body)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics.inc("ferrite_webhooks_total", &[("outcome", "dropped")], 1);
                tracing::warn!(url, "webhook queue full; call dropped");
            }
        }
    }
}
