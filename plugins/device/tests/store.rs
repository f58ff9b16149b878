//! The registry store on embedded SQLite, and on a real PostgreSQL when the test command
//! started one (`FERRITE_TEST_POSTGRES_URL`): the same code path, the same results.

use ferrite_device::model::{DeviceInput, Location, Status};
use ferrite_device::store::{ProvisioningSecret, Store};

async fn exercise(store: &Store) -> anyhow::Result<()> {
    // Unique per run: a PostgreSQL database may outlive one test run.
    let run = uuid::Uuid::new_v4().simple().to_string();
    let input: DeviceInput = serde_json::from_value(serde_json::json!({
        "id": format!("th-{run}"), "type": "thermostat", "owner": "ops", "level": "semi", "parent": "gw-1",
        "attributes": {"building": 7, "floor": "3"}, "tags": ["hvac"], "groups": ["building-7"],
        "firmware": "2.1.0", "location": {"lat": 52.5, "lon": 13.4}
    }))?;
    let mut d = input.into_device("acme", 1_800_000_000_000)?;
    let other = DeviceInput { id: Some(format!("x-{run}")), ..DeviceInput::default() }.into_device("acme", 1)?;
    store.insert(&[d.clone(), other.clone()]).await?;
    let all = store.devices().await?;
    assert!(all.contains(&d) && all.contains(&other), "every column round-trips");
    // A taken id refuses the whole batch.
    let fresh = DeviceInput { id: Some(format!("y-{run}")), ..DeviceInput::default() }.into_device("acme", 1)?;
    assert!(store.insert(&[fresh.clone(), d.clone()]).await.is_err());
    assert!(!store.devices().await?.contains(&fresh), "nothing of a refused batch is kept");

    d.status = Status::Disabled;
    d.firmware = "2.3.0".into();
    d.location = Some(Location { lat: -1.0, lon: 2.0 });
    d.parent = None;
    d.updated_at += 5;
    store.update(&d).await?;
    assert!(store.devices().await?.contains(&d));
    store.set_last_seen(&[(d.id.clone(), 42)]).await?;
    assert!(store.last_seen().await?.contains(&(d.id.clone(), 42)));
    assert!(store.remove(&other.id).await?);
    assert!(!store.remove(&other.id).await?);

    let p = ProvisioningSecret {
        secret_hash: format!("h-{run}"),
        tenant: "acme".into(),
        device_type: "sensor".into(),
        description: "line 3".into(),
        expires_at: 99,
    };
    store.add_provisioning_secret(&p, 1).await?;
    assert_eq!(store.provisioning_secret(&p.secret_hash).await?, Some(p));
    assert_eq!(store.provisioning_secret("nope").await?, None);
    Ok(())
}

#[tokio::test]
async fn the_registry_on_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open("", dir.path()).await?;
    assert_eq!(store.backend(), "sqlite");
    exercise(&store).await?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dir.path().join("registry.db"))?.permissions().mode() & 0o777, 0o600);
    }
    // Reopened: migrations are not applied twice.
    store.close().await;
    Store::open("", dir.path()).await?;
    Ok(())
}

#[tokio::test]
async fn the_registry_on_postgresql() -> anyhow::Result<()> {
    let Ok(url) = std::env::var("FERRITE_TEST_POSTGRES_URL") else {
        eprintln!(
            "skipped: FERRITE_TEST_POSTGRES_URL is not set (the test command sets it when it can start PostgreSQL)"
        );
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let store = Store::open(&url, dir.path()).await?;
    assert_eq!(store.backend(), "postgres");
    exercise(&store).await?;
    Ok(())
}
