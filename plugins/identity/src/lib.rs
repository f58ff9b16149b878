//! The identity plugin: an OAuth2 authorization server built in (client credentials,
//! refresh-token rotation with reuse detection, the device authorization grant, revocation,
//! introspection, discovery and JWKS), an embedded directory of users and clients, Cedar
//! policies as the decision point of every enforcement point, and an audit trail.
//!
//! [`service::Identity`] implements [`ferrite_engine::auth::AccessControl`]; ingest, query
//! and rules see only that trait.

pub mod error;
pub mod external;
pub mod http;
pub mod policy;
pub mod secret;
pub mod service;
pub mod store;
pub mod tokens;

use std::sync::Arc;
use std::time::Duration;

use ferrite_engine::plugin::PluginContext;
use ferrite_plugin::{BoxFuture, Plugin, PluginError, Routes};
use parking_lot::Mutex;
use tokio::task::JoinHandle;

pub use error::{Error, Result};
pub use service::{ADMIN, AUDIT_STREAM, Identity, IdentityConfig};

/// The identity service as a plugin: its routes, the audit writer and the policy watcher.
pub struct IdentityPlugin {
    identity: Arc<Identity>,
    /// Tells the audit writer to write what is queued and end.
    stop_audit: Arc<tokio::sync::Notify>,
    audit: Mutex<Option<JoinHandle<()>>>,
    watcher: Mutex<Option<JoinHandle<()>>>,
    /// Keeps the external provider's key set fresh.
    keys: Mutex<Option<JoinHandle<()>>>,
}

impl IdentityPlugin {
    /// The plugin around an opened identity service.
    pub fn new(identity: Arc<Identity>) -> Self {
        Self {
            identity,
            stop_audit: Arc::new(tokio::sync::Notify::new()),
            audit: Mutex::new(None),
            watcher: Mutex::new(None),
            keys: Mutex::new(None),
        }
    }
}

/// How often the policy directory is checked for changes.
const POLICY_POLL: Duration = Duration::from_millis(500);

impl Plugin for IdentityPlugin {
    fn name(&self) -> &'static str {
        "identity"
    }

    fn start<'a>(&'a self, context: &'a PluginContext) -> BoxFuture<'a, std::result::Result<(), PluginError>> {
        Box::pin(async move {
            let audit = {
                let identity = self.identity.clone();
                let (writer, stop) = (context.events.clone(), self.stop_audit.clone());
                tokio::spawn(async move { identity.run_audit(writer, stop).await })
            };
            let watcher = {
                let identity = self.identity.clone();
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(POLICY_POLL);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tick.tick().await;
                        let id = identity.clone();
                        match tokio::task::spawn_blocking(move || id.reload_policy_files()).await {
                            Ok(Err(e)) => {
                                tracing::error!(error = %e, "policy change refused; the previous policies stay in force")
                            }
                            Err(e) => tracing::error!(error = %e, "policy watcher task failed"),
                            Ok(Ok(_)) => {}
                        }
                    }
                })
            };
            *self.audit.lock() = Some(audit);
            *self.watcher.lock() = Some(watcher);
            if let Some(external) = self.identity.external() {
                *self.keys.lock() = Some(tokio::spawn(external.clone().run()));
            }
            Ok(())
        })
    }

    fn routes(&self) -> Routes {
        Routes {
            public: http::public_routes(self.identity.clone()),
            protected: http::protected_routes(self.identity.clone()),
        }
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(w) = self.watcher.lock().take() {
                w.abort();
            }
            if let Some(k) = self.keys.lock().take() {
                k.abort();
            }
            // The audit writer writes what is queued, then ends; a writer stuck on a
            // failing store is not waited for past the deadline.
            self.stop_audit.notify_one();
            let audit = self.audit.lock().take();
            if let Some(a) = audit
                && tokio::time::timeout(Duration::from_secs(5), a).await.is_err()
            {
                tracing::warn!("audit records still unwritten at shutdown");
            }
            self.identity.store().close().await;
        })
    }
}
