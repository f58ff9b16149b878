//! Device types and commands in SQL (SQLite by default, PostgreSQL when configured): a
//! command is durable from the moment it is accepted, so a restart keeps what waits for an
//! offline device.

use std::path::Path;

use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};

use crate::command::{Command, Status};
use crate::error::{Error, Result};
use crate::types::DeviceType;

const MIGRATIONS: &[ferrite_plugin::sql::MigrationSource] = &[
    (2001, "actuation", include_str!("../migrations/2001_actuation.sql")),
    (2002, "twins", include_str!("../migrations/2002_twins.sql")),
    (2003, "ota", include_str!("../migrations/2003_ota.sql")),
];

/// The actuation store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: &'static str,
}

fn db(what: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |e| Error::Store(format!("{what}: {e}"))
}

fn command_row(r: &AnyRow) -> std::result::Result<Command, sqlx::Error> {
    let decode = |e: String| sqlx::Error::Decode(e.into());
    let params: String = r.try_get(4)?;
    let result: Option<String> = r.try_get(6)?;
    Ok(Command {
        id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        device_id: r.try_get(2)?,
        name: r.try_get(3)?,
        params: serde_json::from_str(&params).map_err(|e| decode(e.to_string()))?,
        status: Status::parse(&r.try_get::<String, _>(5)?).map_err(decode)?,
        result: result.map(|t| serde_json::from_str(&t)).transpose().map_err(|e| decode(e.to_string()))?,
        sender: r.try_get(7)?,
        created_at: r.try_get(8)?,
        updated_at: r.try_get(9)?,
        expires_at: r.try_get(10)?,
        secret: None,
    })
}

const COMMAND_COLUMNS: &str =
    "id, tenant, device_id, name, params, status, result, sender, created_at, updated_at, expires_at";

impl Store {
    /// Opens the store at `url` (`postgres://...`), or `actuation.db` in `dir`.
    pub async fn open(url: &str, dir: &Path) -> Result<Self> {
        let s =
            ferrite_plugin::sql::open(url, dir, "actuation.db", MIGRATIONS, "actuation store", "registry_store_url")
                .await
                .map_err(Error::Store)?;
        Ok(Self { pool: s.pool, backend: s.backend })
    }

    /// The connection pool (the OTA service's tables live in the same store).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Stores (or replaces) a device type of `tenant`.
    pub async fn put_type(&self, tenant: &str, name: &str, t: &DeviceType, now: i64) -> Result<()> {
        let text = serde_json::to_string(t).map_err(|e| Error::Invalid(e.to_string()))?;
        sqlx::query(
            "INSERT INTO device_types (tenant, name, definition, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant, name) DO UPDATE SET definition = excluded.definition, updated_at = excluded.updated_at",
        )
        .bind(tenant.to_owned())
        .bind(name.to_owned())
        .bind(text)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db("storing a device type"))?;
        Ok(())
    }

    /// Every device type: (tenant, name, definition).
    pub async fn types(&self) -> Result<Vec<(String, String, DeviceType)>> {
        let rows = sqlx::query("SELECT tenant, name, definition FROM device_types")
            .fetch_all(&self.pool)
            .await
            .map_err(db("reading device types"))?;
        rows.iter()
            .map(|r| {
                let text: String = r.try_get(2)?;
                let t = serde_json::from_str(&text).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                Ok((r.try_get(0)?, r.try_get(1)?, t))
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(db("reading device types"))
    }

    /// Adds accepted commands and records final outcomes, in one transaction (one fsync for
    /// all of them: the group commit of [`Writer`]).
    pub async fn write(&self, inserts: &[Command], finals: &[Command]) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(db("writing commands"))?;
        for c in inserts {
            Self::insert_in(&mut tx, c).await?;
        }
        for c in finals {
            Self::status_in(&mut tx, c).await?;
        }
        tx.commit().await.map_err(db("writing commands"))
    }

    async fn insert_in(tx: &mut sqlx::Transaction<'_, sqlx::Any>, c: &Command) -> Result<()> {
        sqlx::query(
            "INSERT INTO commands (id, tenant, device_id, name, params, status, result, sender, created_at, \
             updated_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(c.id.clone())
        .bind(c.tenant.clone())
        .bind(c.device_id.clone())
        .bind(c.name.clone())
        .bind(serde_json::Value::Object(c.params.clone()).to_string())
        .bind(c.status.as_str().to_owned())
        .bind(c.result.as_ref().map(serde_json::Value::to_string))
        .bind(c.sender.clone())
        .bind(c.created_at)
        .bind(c.updated_at)
        .bind(c.expires_at)
        .execute(&mut **tx)
        .await
        .map_err(db("storing a command"))?;
        Ok(())
    }

    async fn status_in(tx: &mut sqlx::Transaction<'_, sqlx::Any>, c: &Command) -> Result<()> {
        sqlx::query("UPDATE commands SET status = $1, result = $2, updated_at = $3 WHERE id = $4")
            .bind(c.status.as_str().to_owned())
            .bind(c.result.as_ref().map(serde_json::Value::to_string))
            .bind(c.updated_at)
            .bind(c.id.clone())
            .execute(&mut **tx)
            .await
            .map_err(db("updating a command"))?;
        Ok(())
    }

    /// Commands still open (queued, sent, delivered), oldest first.
    pub async fn open_commands(&self) -> Result<Vec<Command>> {
        let sql = format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE status IN ('queued', 'sent', 'delivered') ORDER BY created_at, id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool).await.map_err(db("reading commands"))?;
        rows.iter().map(command_row).collect::<std::result::Result<_, _>>().map_err(db("reading commands"))
    }

    /// When each command accepted since `since` was accepted, per device (the rate
    /// limit's window survives a restart).
    pub async fn accepted_since(&self, since: i64) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT device_id, created_at FROM commands WHERE created_at > $1 ORDER BY created_at")
            .bind(since)
            .fetch_all(&self.pool)
            .await
            .map_err(db("reading recent commands"))?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(db("reading recent commands"))
    }

    /// Stores device `id`'s twin.
    pub async fn put_twin(&self, id: &str, t: &crate::twin::Twin, now: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO twins (device_id, desired, version, reported, reported_version, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (device_id) DO UPDATE SET desired = excluded.desired, \
             version = excluded.version, reported = excluded.reported, reported_version = excluded.reported_version, \
             updated_at = excluded.updated_at",
        )
        .bind(id.to_owned())
        .bind(serde_json::Value::Object(t.desired.clone()).to_string())
        .bind(t.version)
        .bind(serde_json::Value::Object(t.reported.clone()).to_string())
        .bind(t.reported_version)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db("storing a twin"))?;
        Ok(())
    }

    /// Every twin, by device.
    pub async fn twins(&self) -> Result<Vec<(String, crate::twin::Twin)>> {
        let rows = sqlx::query("SELECT device_id, desired, version, reported, reported_version FROM twins")
            .fetch_all(&self.pool)
            .await
            .map_err(db("reading twins"))?;
        let object = |text: String| -> std::result::Result<serde_json::Map<String, serde_json::Value>, sqlx::Error> {
            serde_json::from_str(&text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
        };
        rows.iter()
            .map(|r| {
                let twin = crate::twin::Twin {
                    desired: object(r.try_get(1)?)?,
                    version: r.try_get(2)?,
                    reported: object(r.try_get(3)?)?,
                    reported_version: r.try_get(4)?,
                };
                Ok((r.try_get(0)?, twin))
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(db("reading twins"))
    }

    /// Command `id`.
    pub async fn command(&self, id: &str) -> Result<Option<Command>> {
        let sql = format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.to_owned())
            .fetch_optional(&self.pool)
            .await
            .map_err(db("reading a command"))?;
        row.map(|r| command_row(&r)).transpose().map_err(db("reading a command"))
    }
}

/// What the writer is asked to make durable.
enum Op {
    /// A new command; answered once it is committed.
    Insert(Command, tokio::sync::oneshot::Sender<Result<()>>),
    /// A final outcome (not waited for).
    Final(Command),
}

/// Group commit for commands: whatever is queued while a transaction commits goes into the
/// next one, so concurrent senders share fsyncs instead of waiting for one each.
#[derive(Debug, Clone)]
pub struct Writer {
    tx: tokio::sync::mpsc::UnboundedSender<Op>,
}

/// Most operations in one transaction.
const GROUP_MAX: usize = 1024;

impl Writer {
    /// Starts the writer task over `store`.
    pub fn start(store: Store) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Op>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut ops = vec![first];
                while ops.len() < GROUP_MAX
                    && let Ok(op) = rx.try_recv()
                {
                    ops.push(op);
                }
                let mut inserts = Vec::new();
                let mut finals = Vec::new();
                let mut waiting = Vec::new();
                for op in ops {
                    match op {
                        Op::Insert(c, done) => {
                            inserts.push(c);
                            waiting.push(done);
                        }
                        Op::Final(c) => finals.push(c),
                    }
                }
                let result = store.write(&inserts, &finals).await;
                if let Err(e) = &result {
                    tracing::error!(error = %e, "cannot store commands");
                }
                for done in waiting {
                    let _ = done.send(result.as_ref().map(|_| ()).map_err(|e| Error::Store(e.to_string())));
                }
            }
        });
        Self { tx }
    }

    /// Stores an accepted command; returns once it is durable.
    pub async fn insert(&self, c: Command) -> Result<()> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx.send(Op::Insert(c, done)).map_err(|_| Error::Store("the command writer stopped".into()))?;
        wait.await.map_err(|_| Error::Store("the command writer stopped".into()))?
    }

    /// Records a final outcome (written with the next group).
    pub fn finish(&self, c: Command) {
        if self.tx.send(Op::Final(c)).is_err() {
            tracing::error!("the command writer stopped; an outcome is not stored");
        }
    }
}
