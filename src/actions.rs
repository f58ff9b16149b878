//! Where rule actions go in a running server: MQTT publishes (and device commands) through
//! the embedded broker, webhooks through a bounded queue drained by one HTTP client thread.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError, bounded};
use ferrite_engine::Metrics;
use ferrite_ingest::mqtt::Broker;
use ferrite_rules::ActionSink;

/// Webhook calls queued before new ones are dropped (and counted): a slow endpoint must not
/// stall the shard threads that run the rules.
const WEBHOOK_QUEUE: usize = 1024;

pub struct ServerActions {
    broker: Arc<Broker>,
    webhooks: Sender<(String, Vec<u8>)>,
    metrics: Arc<Metrics>,
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
        Ok(Self { broker, webhooks: tx, metrics })
    }
}

impl ActionSink for ServerActions {
    fn publish(&self, topic: &str, payload: Vec<u8>) {
        if let Err(e) = self.broker.publish(topic, bytes::Bytes::from(payload)) {
            self.metrics.inc("ferrite_rule_publish_failures_total", &[("reason", "invalid_topic")], 1);
            tracing::warn!(topic, error = %e, "rule action: publish topic is not valid MQTT; message dropped");
        }
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
