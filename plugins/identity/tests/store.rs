//! The identity store on embedded SQLite, and on a real PostgreSQL when the test command
//! started one (`FERRITE_TEST_POSTGRES_URL`): the same code path, the same results.

use std::sync::Arc;

use ferrite_engine::Metrics;
use ferrite_engine::auth::{AccessControl, Credentials, RequestContext, Transport};
use ferrite_identity::store::{ClientRecord, RefreshRecord, Store};
use ferrite_identity::{Identity, IdentityConfig};

async fn exercise(store: &Store) -> anyhow::Result<()> {
    let now = 1_800_000_000;
    // Unique per run: a PostgreSQL database may outlive one test run.
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let (tenant, family, jti) = (format!("t-{run}"), format!("f-{run}"), format!("j-{run}"));
    assert!(store.add_tenant(&tenant, now).await?);
    assert!(!store.add_tenant(&tenant, now).await?, "a tenant is added once");
    let mut client = ClientRecord {
        id: format!("c-{}-{run}", store.backend()),
        tenant: tenant.clone(),
        kind: "device".into(),
        secret_hash: "h".into(),
        roles: vec!["a".into(), "b".into()],
        device_type: Some("thermostat".into()),
        children: vec!["x".into()],
        disabled: false,
        next_secret_hash: None,
    };
    assert!(store.add_client(&client, now).await?);
    assert!(store.clients().await?.contains(&client));
    // A staged secret (a rotation over the command channel) round-trips.
    client.next_secret_hash = Some("h2".into());
    assert!(store.update_client(&client).await?);
    assert!(store.clients().await?.contains(&client));
    let r = RefreshRecord {
        hash: format!("r-{}-{run}", store.backend()),
        family: family.clone(),
        client_id: client.id.clone(),
        subject: client.id.clone(),
        kind: "device".into(),
        tenant: tenant.clone(),
        scope: "offline_access".into(),
        expires_at: now + 60,
        used: false,
        revoked: false,
    };
    store.add_refresh(&r, now).await?;
    assert!(store.use_refresh(&r.hash).await?, "first use");
    assert!(!store.use_refresh(&r.hash).await?, "a second use is refused");
    assert_eq!(store.revoke_family(&family).await?, 1);
    assert!(store.refresh(&r.hash).await?.is_some_and(|x| x.revoked && x.used));
    assert!(store.revoke(&jti, now + 60).await?);
    assert!(store.revocations(now).await?.contains(&jti));
    assert!(store.remove_client(&client.id).await?);
    Ok(())
}

#[tokio::test]
async fn the_store_on_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open("", dir.path()).await?;
    exercise(&store).await?;
    // Private: the file holds signing keys.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dir.path().join("identity.db"))?.permissions().mode() & 0o777, 0o600);
    }
    Ok(())
}

#[tokio::test]
async fn the_store_on_postgresql() -> anyhow::Result<()> {
    let Ok(url) = std::env::var("FERRITE_TEST_POSTGRES_URL") else {
        eprintln!("skipping: FERRITE_TEST_POSTGRES_URL is not set (scripts/test.sh starts a PostgreSQL)");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    // Migrations run twice without harm (a second node starting on the same database).
    Store::open(&url, dir.path()).await?.close().await;
    let store = Store::open(&url, dir.path()).await?;
    exercise(&store).await?;
    // The whole service on PostgreSQL: first start makes the admin and its token.
    let mut config = IdentityConfig::new(dir.path());
    config.store_url = url;
    let identity = Identity::open(config, Arc::new(Metrics::new())).await?;
    let token = std::fs::read_to_string(dir.path().join("admin.token"))?;
    let ctx = RequestContext::new(Transport::Http, None);
    let admin = identity.authenticate(&Credentials::Bearer(token.trim()), &ctx).map_err(anyhow::Error::msg)?;
    assert!(admin.has_role("platform-admin"));
    Ok(())
}
