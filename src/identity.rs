//! Wiring of identity into `ferrite serve`: the identity plugin (or, with `--auth off`, the
//! allow-all decision point), and the plugin context every plugin gets.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use ferrite_actuation::ActuationPlugin;
use ferrite_device::DevicePlugin;
use ferrite_engine::auth::{AccessControl, AllowAll};
use ferrite_engine::plugin::{
    DeviceCredentials, DeviceData, DeviceQuery, EventWriter, NoCredentials, PluginContext, PluginFuture, PurgeReport,
    WriteFuture,
};
use ferrite_engine::system::TableSet;
use ferrite_engine::{Engine, Metrics, StreamCatalog, StreamName};
use ferrite_identity::{Identity, IdentityConfig, IdentityPlugin};
use ferrite_ingest::mqtt::Broker;
use ferrite_ingest::{Durability, Ingestor, Payload, Transport};
use ferrite_plugin::Plugin;

use crate::config::Config;

/// Writes the platform's own events (the audit trail, plugins' streams, `api_usage`)
/// through the ingest pipeline, as if ingested (counted as transport `internal`).
pub(crate) struct IngestWriter(pub(crate) Arc<Ingestor>);

impl EventWriter for IngestWriter {
    fn write(&self, tenant: &str, stream: &str, ndjson: Vec<u8>) -> WriteFuture {
        let ingestor = self.0.clone();
        let stream = StreamName::in_tenant(tenant, stream).map_err(|e| e.to_string());
        Box::pin(async move {
            let payload = Payload::Ndjson { stream: stream? };
            let report = ingestor
                .ingest(Transport::Internal, payload, bytes::Bytes::from(ndjson), Durability::Committed)
                .await
                .map_err(|e| e.to_string())?;
            match report.rejections.first() {
                Some(r) => Err(format!("{} events rejected: {}", report.rejected, r.message)),
                None => Ok(()),
            }
        })
    }
}

/// Erases a device's rows from storage (off the async runtime: it persists and rewrites
/// files).
struct ArchiveData(Arc<ferrite_storage::Storage>);

impl DeviceData for ArchiveData {
    fn purge_device<'a>(&'a self, tenant: &'a str, device: &'a str) -> PluginFuture<'a, Result<PurgeReport, String>> {
        let (storage, tenant, device) = (self.0.clone(), tenant.to_owned(), device.to_owned());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || storage.purge_device(&tenant, &device))
                .await
                .map_err(|e| format!("the purge task failed: {e}"))?
                .map_err(|e| e.to_string())
        })
    }
}

/// Answers plugins' device queries (bulk job targets) with SQL over the tenant's tables
/// (never the `audit` stream).
struct SqlDevices(Arc<ferrite_query::QueryService>);

impl DeviceQuery for SqlDevices {
    fn device_ids<'a>(&'a self, tenant: &'a str, sql: &'a str) -> PluginFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async move {
            let scope = ferrite_query::Scope::tenant(tenant).hiding(ferrite_engine::auth::AUDIT_STREAM);
            let result = self.0.sql_in(&scope, sql).await.map_err(|e| e.to_string())?;
            let mut seen = std::collections::HashSet::new();
            let mut ids = Vec::new();
            for batch in &result.batches {
                let column = batch
                    .column_by_name("device_id")
                    .ok_or("the query has no `device_id` column: select the devices' ids as device_id")?;
                let strings =
                    arrow::compute::cast(column, &arrow::datatypes::DataType::Utf8).map_err(|e| e.to_string())?;
                let strings =
                    strings.as_any().downcast_ref::<arrow::array::StringArray>().ok_or("`device_id` is not text")?;
                for id in strings.iter().flatten() {
                    if seen.insert(id.to_owned()) {
                        ids.push(id.to_owned());
                    }
                }
            }
            Ok(ids)
        })
    }
}

/// Starts identity (unless `auth = "off"`) and every plugin; returns the decision point and
/// the started plugins (to merge their routes and stop them at shutdown).
/// The running engine's parts plugins are given.
pub struct Core<'a> {
    /// The stream catalog.
    pub catalog: &'a Arc<StreamCatalog>,
    /// The engine (stream subscriptions).
    pub engine: &'a Arc<Engine>,
    /// Ingest, for the events plugins write.
    pub ingestor: &'a Arc<Ingestor>,
    /// The MQTT broker (publish, disconnect, presence).
    pub broker: &'a Arc<Broker>,
    /// Tables plugins add to each tenant's SQL schema.
    pub tables: &'a Arc<TableSet>,
    /// SQL, for plugins that target devices by a query.
    pub query: &'a Arc<ferrite_query::QueryService>,
    /// Metrics.
    pub metrics: &'a Arc<Metrics>,
    /// Set to the actuation service's handle (rules' commands go through it).
    pub actuation: &'a mut Option<ActuationHandle>,
}

/// Where the actuation service will be once its plugin started.
pub type ActuationHandle = Arc<std::sync::OnceLock<Arc<ferrite_actuation::Actuation>>>;

pub async fn start(
    config: &Config,
    http_addr: SocketAddr,
    core: Core<'_>,
) -> anyhow::Result<(Arc<dyn AccessControl>, Vec<Box<dyn Plugin>>)> {
    let mut plugins: Vec<Box<dyn Plugin>> = Vec::new();
    let mut credentials: Arc<dyn DeviceCredentials> = Arc::new(NoCredentials);
    let access: Arc<dyn AccessControl> = match config.auth.as_str() {
        "off" => {
            tracing::warn!(
                "AUTHENTICATION IS OFF (--auth off): anyone who reaches the MQTT and HTTP ports may publish as any \
                 device, read every stream and change every rule. Use this only for tests and demos."
            );
            Arc::new(AllowAll)
        }
        "on" => {
            let mut ic = IdentityConfig::new(&config.data_dir);
            ic.store_url = config.identity_store_url.clone();
            ic.policies_dir = config.policies_dir.clone();
            ic.issuer = config.issuer.clone();
            ic.default_issuer = format!("http://localhost:{}", http_addr.port());
            ic.access_ttl = config.access_token_ttl;
            if !config.oidc_issuer.is_empty() {
                ferrite_engine::validate_tenant(&config.oidc_default_tenant)
                    .context("oidc_default_tenant is not a valid tenant id")?;
                let mut ext = ferrite_identity::external::ExternalConfig::new(&config.oidc_issuer);
                ext.jwks_url = config.oidc_jwks_url.clone();
                ext.audience = config.oidc_audience.clone();
                ext.tenant_claim = config.oidc_tenant_claim.clone();
                ext.roles_claim = config.oidc_roles_claim.clone();
                ext.default_tenant = config.oidc_default_tenant.clone();
                ic.external = Some(ext);
            }
            let identity = Identity::open(ic, core.metrics.clone()).await.context("cannot start identity")?;
            tracing::info!(
                admin_token = %identity.admin_token_path().display(),
                issuer = identity.issuer(),
                store = identity.store().backend(),
                "identity is on: the admin bearer token is in the file named here"
            );
            plugins.push(Box::new(IdentityPlugin::new(identity.clone())));
            credentials = identity.clone();
            identity
        }
        other => anyhow::bail!("auth = {other:?}: use \"on\" or \"off\""),
    };
    let context = PluginContext {
        data_dir: config.data_dir.join("plugins"),
        catalog: core.catalog.clone(),
        engine: Some(core.engine.clone()),
        events: Arc::new(IngestWriter(core.ingestor.clone())),
        publisher: core.broker.clone(),
        access: access.clone(),
        credentials,
        tables: core.tables.clone(),
        queries: Arc::new(SqlDevices(core.query.clone())),
        data: Arc::new(ArchiveData(core.query.storage().clone())),
        metrics: core.metrics.clone(),
    };
    let devices = DevicePlugin::new(&config.registry_store_url);
    // OTA artifacts live beside the archive (`_artifacts/` in its object store).
    let actuation = ActuationPlugin::new(&config.registry_store_url, devices.shared_registry())
        .with_artifacts(core.query.storage().object_store());
    *core.actuation = Some(actuation.handle());
    plugins.push(Box::new(devices));
    plugins.push(Box::new(actuation));
    for plugin in &plugins {
        plugin.start(&context).await.with_context(|| format!("cannot start the {} plugin", plugin.name()))?;
    }
    Ok((access, plugins))
}
