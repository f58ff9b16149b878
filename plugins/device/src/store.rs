//! The registry's durable state (devices, provisioning secrets) in SQL: embedded SQLite
//! under the plugin's directory by default, PostgreSQL when a URL is configured; the same
//! code for both (see `ferrite_plugin::sql`).

use std::path::Path;

use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};

use crate::error::{Error, Result};
use crate::model::{Device, Level, Location, Status};

/// The plugin's migrations (numbered from 1001: they may share a database with identity's).
const MIGRATIONS: &[ferrite_plugin::sql::MigrationSource] =
    &[(1001, "device registry", include_str!("../migrations/1001_devices.sql"))];

/// Columns of `devices`, in the order [`device_row`] reads them and [`bind`] binds them.
macro_rules! columns {
    () => {
        "id, tenant, name, device_type, owner, level, parent, attributes, tags, device_groups, firmware, latitude, \
         longitude, status, created_at, updated_at"
    };
}

/// A provisioning secret (only its hash is stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisioningSecret {
    /// SHA-256 of the secret.
    pub secret_hash: String,
    /// The tenant devices registering with it land in.
    pub tenant: String,
    /// The type they get.
    pub device_type: String,
    /// What it is for.
    pub description: String,
    /// Expiry, milliseconds since the epoch.
    pub expires_at: i64,
}

/// The registry store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: &'static str,
}

fn db(what: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |e| Error::Store(format!("{what}: {e}"))
}

fn json_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn device_row(r: &AnyRow) -> std::result::Result<Device, sqlx::Error> {
    let json = |i: usize| -> std::result::Result<serde_json::Value, sqlx::Error> {
        let text: String = r.try_get(i)?;
        serde_json::from_str(&text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
    };
    let strings = |v: serde_json::Value| -> Vec<String> {
        v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect()).unwrap_or_default()
    };
    let decode = |e: crate::error::Error| sqlx::Error::Decode(e.to_string().into());
    let lat: Option<f64> = r.try_get(11)?;
    let lon: Option<f64> = r.try_get(12)?;
    Ok(Device {
        id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        name: r.try_get(2)?,
        device_type: r.try_get(3)?,
        owner: r.try_get(4)?,
        level: Level::parse(&r.try_get::<String, _>(5)?).map_err(decode)?,
        parent: r.try_get(6)?,
        attributes: json(7)?.as_object().cloned().unwrap_or_default(),
        tags: strings(json(8)?),
        groups: strings(json(9)?),
        firmware: r.try_get(10)?,
        location: lat.zip(lon).map(|(lat, lon)| Location { lat, lon }),
        status: Status::parse(&r.try_get::<String, _>(13)?).map_err(decode)?,
        created_at: r.try_get(14)?,
        updated_at: r.try_get(15)?,
    })
}

impl Store {
    /// Opens the registry at `url` (`postgres://...`), or `registry.db` in `dir`.
    pub async fn open(url: &str, dir: &Path) -> Result<Self> {
        let s = ferrite_plugin::sql::open(url, dir, "registry.db", MIGRATIONS, "device registry", "registry_store_url")
            .await
            .map_err(Error::Store)?;
        Ok(Self { pool: s.pool, backend: s.backend })
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Adds devices in one transaction; `Err(Conflict)` naming the first id already taken
    /// (then none is added).
    pub async fn insert(&self, devices: &[Device]) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(db("adding devices"))?;
        for d in devices {
            let sql = concat!(
                "INSERT INTO devices (",
                columns!(),
                ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
                 ON CONFLICT (id) DO NOTHING"
            );
            let r = bind(sqlx::query(sql), d).execute(&mut *tx).await.map_err(db("adding a device"))?;
            if r.rows_affected() != 1 {
                return Err(Error::Conflict(format!("a device {:?} already exists", d.id)));
            }
        }
        tx.commit().await.map_err(db("adding devices"))
    }

    /// Rewrites a device (every column but id and created_at).
    pub async fn update(&self, d: &Device) -> Result<()> {
        let sql = "UPDATE devices SET tenant = $2, name = $3, device_type = $4, owner = $5, level = $6, parent = $7, \
                   attributes = $8, tags = $9, device_groups = $10, firmware = $11, latitude = $12, longitude = $13, \
                   status = $14, updated_at = $16 WHERE id = $1 AND created_at = $15";
        let r = bind(sqlx::query(sql), d).execute(&self.pool).await.map_err(db("updating a device"))?;
        if r.rows_affected() != 1 {
            return Err(Error::NotFound(format!("no device {:?}", d.id)));
        }
        Ok(())
    }

    /// Removes a device; whether there was one.
    pub async fn remove(&self, id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM devices WHERE id = $1")
            .bind(id.to_owned())
            .execute(&self.pool)
            .await
            .map_err(db("removing a device"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Every device.
    pub async fn devices(&self) -> Result<Vec<Device>> {
        let rows = sqlx::query(concat!("SELECT ", columns!(), " FROM devices ORDER BY id"))
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing devices"))?;
        rows.iter().map(device_row).collect::<std::result::Result<_, _>>().map_err(db("reading devices"))
    }

    /// Records when devices were last seen.
    pub async fn set_last_seen(&self, seen: &[(String, i64)]) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(db("recording last seen"))?;
        for (id, at) in seen {
            sqlx::query("UPDATE devices SET last_seen = $1 WHERE id = $2")
                .bind(*at)
                .bind(id.clone())
                .execute(&mut *tx)
                .await
                .map_err(db("recording last seen"))?;
        }
        tx.commit().await.map_err(db("recording last seen"))
    }

    /// When each device was last seen, as recorded.
    pub async fn last_seen(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT id, last_seen FROM devices WHERE last_seen IS NOT NULL")
            .fetch_all(&self.pool)
            .await
            .map_err(db("reading last seen"))?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(db("reading last seen"))
    }

    /// Adds a provisioning secret.
    pub async fn add_provisioning_secret(&self, p: &ProvisioningSecret, now: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO provisioning_secrets (secret_hash, tenant, device_type, description, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(p.secret_hash.clone())
        .bind(p.tenant.clone())
        .bind(p.device_type.clone())
        .bind(p.description.clone())
        .bind(now)
        .bind(p.expires_at)
        .execute(&self.pool)
        .await
        .map_err(db("adding a provisioning secret"))?;
        Ok(())
    }

    /// The provisioning secret whose hash is `hash`, if it exists.
    pub async fn provisioning_secret(&self, hash: &str) -> Result<Option<ProvisioningSecret>> {
        let row = sqlx::query(
            "SELECT secret_hash, tenant, device_type, description, expires_at FROM provisioning_secrets \
             WHERE secret_hash = $1",
        )
        .bind(hash.to_owned())
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading a provisioning secret"))?;
        row.map(|r| {
            Ok(ProvisioningSecret {
                secret_hash: r.try_get(0)?,
                tenant: r.try_get(1)?,
                device_type: r.try_get(2)?,
                description: r.try_get(3)?,
                expires_at: r.try_get(4)?,
            })
        })
        .transpose()
        .map_err(db("reading a provisioning secret"))
    }
}

/// Binds a device's columns as `$1`..`$16` in [`COLUMNS`] order.
fn bind<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    d: &Device,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    q.bind(d.id.clone())
        .bind(d.tenant.clone())
        .bind(d.name.clone())
        .bind(d.device_type.clone())
        .bind(d.owner.clone())
        .bind(d.level.as_str().to_owned())
        .bind(d.parent.clone())
        .bind(json_text(&d.attributes))
        .bind(json_text(&d.tags))
        .bind(json_text(&d.groups))
        .bind(d.firmware.clone())
        .bind(d.location.map(|l| l.lat))
        .bind(d.location.map(|l| l.lon))
        .bind(d.status.as_str().to_owned())
        .bind(d.created_at)
        .bind(d.updated_at)
}
