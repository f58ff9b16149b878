//! The SQL store every plugin keeps its state in: embedded SQLite in the plugin's directory
//! by default, PostgreSQL when a `postgres://` URL is configured; one code path for both
//! through sqlx's `Any` driver, with embedded migrations. Plugins may share one PostgreSQL
//! database: each numbers its migrations in its own range and ignores the others'.

use std::borrow::Cow;
use std::path::Path;

use sqlx::AnyPool;
use sqlx::SqlSafeStr;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};

/// An embedded migration: version (unique across plugins: identity 1-999, devices
/// 1001-1999, ...), name, SQL.
pub type MigrationSource = (i64, &'static str, &'static str);

/// An opened store: its pool and `sqlite` or `postgres`.
#[derive(Debug, Clone)]
pub struct SqlStore {
    /// The connection pool.
    pub pool: AnyPool,
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
}

/// Opens the store at `url` (`postgres://...`), or the SQLite file `file` in `dir` (created
/// mode 0600) when `url` is empty, and applies `migrations`. `what` names the store in
/// errors (`identity store`, `device registry`) and `setting` the URL's setting.
pub async fn open(
    url: &str,
    dir: &Path,
    file: &str,
    migrations: &[MigrationSource],
    what: &str,
    setting: &str,
) -> Result<SqlStore, String> {
    sqlx::any::install_default_drivers();
    let (url, backend) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        (url.to_owned(), "postgres")
    } else if url.is_empty() {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join(file);
        create_private(&path)?;
        (format!("sqlite://{}?mode=rwc", path.display()), "sqlite")
    } else {
        return Err(format!(
            "unsupported {what} URL {url:?} (the `{setting}` setting): use postgres://user:password@host/db, or \
             leave it empty for the embedded SQLite store"
        ));
    };
    // SQLite serialises writers: one connection avoids `database is locked` under load.
    let max = if backend == "sqlite" { 1 } else { 8 };
    let sqlite = backend == "sqlite";
    let pool = AnyPoolOptions::new()
        .max_connections(max)
        // SQLite: a write-ahead log, so a commit is one fsync of the log rather than of the
        // database and its journal; still durable at every commit (synchronous = FULL).
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if sqlite {
                    sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA synchronous = FULL").execute(&mut *conn).await?;
                }
                Ok(())
            })
        })
        .connect(&url)
        .await
        .map_err(|e| format!("cannot open the {what} ({backend}): {e}"))?;
    let migrations = migrations
        .iter()
        .map(|(v, name, sql)| {
            Migration::new(*v, Cow::Borrowed(*name), MigrationType::Simple, sql.into_sql_str(), false)
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    // Another plugin's migrations in the same database are not ours to judge.
    migrator.set_ignore_missing(true);
    migrator.run(&pool).await.map_err(|e| format!("cannot migrate the {what}: {e}"))?;
    Ok(SqlStore { pool, backend })
}

/// Creates `path` (if missing) readable by its owner only: stores hold secrets' hashes and
/// signing keys.
fn create_private(path: &Path) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    }
    Ok(())
}
