//! The identity plugin's durable state (tenants, users, clients, keys, tokens, refresh-token
//! families, device codes, policies) in SQL: embedded SQLite by default, PostgreSQL when a
//! `postgres://` URL is configured. One code path for both, through sqlx's `Any` driver,
//! with portable SQL (TEXT and BIGINT only) and embedded migrations.

use std::path::Path;

use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};

use crate::error::{Error, Result};

/// The embedded migrations, applied in order at open.
const MIGRATIONS: &[ferrite_plugin::sql::MigrationSource] = &[
    (1, "identity", include_str!("../migrations/0001_identity.sql")),
    (2, "staged secrets", include_str!("../migrations/0002_staged_secrets.sql")),
];

/// The identity store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: &'static str,
}

/// A user of the embedded directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Unique name (the principal id).
    pub name: String,
    /// Its tenant.
    pub tenant: String,
    /// The argon2id hash of its password; none for a user that signs in by token only.
    pub password_hash: Option<String>,
    /// Its roles.
    pub roles: Vec<String>,
    /// A disabled user can neither sign in nor use its tokens.
    pub disabled: bool,
}

/// A client of the token endpoint: a device or a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRecord {
    /// The client id (a device's id).
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// `device` or `service`.
    pub kind: String,
    /// The SHA-256 of its secret (secrets are 256-bit random, so a fast hash is enough).
    pub secret_hash: String,
    /// Its roles.
    pub roles: Vec<String>,
    /// A device's type.
    pub device_type: Option<String>,
    /// A gateway's registered children.
    pub children: Vec<String>,
    /// A disabled client is refused at once.
    pub disabled: bool,
    /// During a credential rotation: the SHA-256 of the new secret, valid beside the old one.
    pub next_secret_hash: Option<String>,
}

/// A signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The key id (`kid`).
    pub kid: String,
    /// `EdDSA`.
    pub algorithm: String,
    /// The PKCS#8 document of the private key.
    pub private_pkcs8: Vec<u8>,
    /// The raw public key.
    pub public_key: Vec<u8>,
    /// When it was made.
    pub created_at: i64,
    /// When it stopped signing (rotation); it still verifies until `remove_after`.
    pub retired_at: Option<i64>,
    /// When it leaves the JWKS (the last token it signed has expired).
    pub remove_after: Option<i64>,
}

/// A long-lived API token (`ferrite token create`, the admin token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// The token's `jti`.
    pub jti: String,
    /// Its subject.
    pub subject: String,
    /// The subject's kind.
    pub kind: String,
    /// Its tenant.
    pub tenant: String,
    /// What it is for.
    pub description: String,
    /// Expiry, seconds since the epoch.
    pub expires_at: i64,
    /// Creation, seconds since the epoch.
    pub created_at: i64,
}

/// A refresh token (only its hash is stored) in a rotation family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshRecord {
    /// SHA-256 of the token.
    pub hash: String,
    /// Every token rotated from the same grant shares a family; a reuse revokes it all.
    pub family: String,
    /// The client it was issued to.
    pub client_id: String,
    /// The principal it stands for.
    pub subject: String,
    /// The principal's kind.
    pub kind: String,
    /// The principal's tenant.
    pub tenant: String,
    /// The granted scope.
    pub scope: String,
    /// Expiry, seconds since the epoch.
    pub expires_at: i64,
    /// Already exchanged for a new one.
    pub used: bool,
    /// Revoked (its family was).
    pub revoked: bool,
}

/// A pending device authorization (RFC 8628).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCodeRecord {
    /// SHA-256 of the device code.
    pub device_code_hash: String,
    /// The short code a person types.
    pub user_code: String,
    /// The client that asked.
    pub client_id: String,
    /// The scope it asked for.
    pub scope: String,
    /// Expiry, seconds since the epoch.
    pub expires_at: i64,
    /// `pending`, `approved`, `denied` or `used`.
    pub status: String,
    /// The user who approved it.
    pub approved_by: Option<String>,
    /// The last time the device polled.
    pub last_poll: i64,
}

fn roles_text(roles: &[String]) -> String {
    roles.join(",")
}

fn roles_list(text: &str) -> Vec<String> {
    text.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> Result<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| Error::Store(format!("a stored key is not base64: {e}")))
}

fn db(what: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |e| Error::Store(format!("{what}: {e}"))
}

impl Store {
    /// Opens the store at `url` (`postgres://...`), or the SQLite file `identity.db` in
    /// `dir` when `url` is empty, and applies the migrations.
    pub async fn open(url: &str, dir: &Path) -> Result<Self> {
        let store =
            ferrite_plugin::sql::open(url, dir, "identity.db", MIGRATIONS, "identity store", "identity_store_url")
                .await
                .map_err(Error::Store)?;
        let (pool, backend) = (store.pool, store.backend);
        Ok(Self { pool, backend })
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A setting, if set.
    pub async fn setting(&self, name: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM settings WHERE name = $1")
            .bind(name.to_owned())
            .fetch_optional(&self.pool)
            .await
            .map_err(db("reading a setting"))?;
        row.map(|r| r.try_get::<String, _>(0)).transpose().map_err(db("reading a setting"))
    }

    /// Sets a setting.
    pub async fn set_setting(&self, name: &str, value: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(name.to_owned())
        .bind(value.to_owned())
        .execute(&self.pool)
        .await
        .map_err(db("writing a setting"))?;
        Ok(())
    }

    /// Adds a tenant; `false` when it already exists.
    pub async fn add_tenant(&self, id: &str, now: i64) -> Result<bool> {
        let r = sqlx::query("INSERT INTO tenants (id, created_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING")
            .bind(id.to_owned())
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(db("adding a tenant"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Every tenant.
    pub async fn tenants(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT id FROM tenants ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing tenants"))?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<std::result::Result<_, _>>()
            .map_err(db("listing tenants"))
    }

    /// Adds a user; `false` when the name is taken.
    pub async fn add_user(&self, user: &UserRecord, now: i64) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO users (name, tenant, password_hash, roles, disabled, created_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(user.name.clone())
        .bind(user.tenant.clone())
        .bind(user.password_hash.clone())
        .bind(roles_text(&user.roles))
        .bind(i64::from(user.disabled))
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db("adding a user"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Sets a user's password hash; `false` when there is no such user.
    pub async fn set_password(&self, name: &str, hash: &str) -> Result<bool> {
        let r = sqlx::query("UPDATE users SET password_hash = $1 WHERE name = $2")
            .bind(hash.to_owned())
            .bind(name.to_owned())
            .execute(&self.pool)
            .await
            .map_err(db("changing a password"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Every user.
    pub async fn users(&self) -> Result<Vec<UserRecord>> {
        let rows = sqlx::query("SELECT name, tenant, password_hash, roles, disabled FROM users ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing users"))?;
        rows.iter().map(user_row).collect::<std::result::Result<_, _>>().map_err(db("listing users"))
    }

    /// Adds a client; `false` when the id is taken.
    pub async fn add_client(&self, c: &ClientRecord, now: i64) -> Result<bool> {
        Ok(self.add_clients(std::slice::from_ref(c), now).await?.first().copied().unwrap_or(false))
    }

    /// Adds clients in one transaction; per client, `false` when its id is taken.
    pub async fn add_clients(&self, clients: &[ClientRecord], now: i64) -> Result<Vec<bool>> {
        let mut tx = self.pool.begin().await.map_err(db("adding clients"))?;
        let mut added = Vec::with_capacity(clients.len());
        for c in clients {
            let r = sqlx::query(
                "INSERT INTO clients (id, tenant, kind, secret_hash, roles, device_type, children, disabled, \
                 created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
            )
            .bind(c.id.clone())
            .bind(c.tenant.clone())
            .bind(c.kind.clone())
            .bind(c.secret_hash.clone())
            .bind(roles_text(&c.roles))
            .bind(c.device_type.clone())
            .bind(roles_text(&c.children))
            .bind(i64::from(c.disabled))
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db("adding a client"))?;
            added.push(r.rows_affected() == 1);
        }
        tx.commit().await.map_err(db("adding clients"))?;
        Ok(added)
    }

    /// Rewrites a client's secret, type, children and disabled flag; `false` when there is
    /// no such client.
    pub async fn update_client(&self, c: &ClientRecord) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE clients SET secret_hash = $1, device_type = $2, children = $3, disabled = $4, \
             next_secret_hash = $5 WHERE id = $6",
        )
        .bind(c.secret_hash.clone())
        .bind(c.device_type.clone())
        .bind(roles_text(&c.children))
        .bind(i64::from(c.disabled))
        .bind(c.next_secret_hash.clone())
        .bind(c.id.clone())
        .execute(&self.pool)
        .await
        .map_err(db("updating a client"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Removes a client; `false` when there was none.
    pub async fn remove_client(&self, id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM clients WHERE id = $1")
            .bind(id.to_owned())
            .execute(&self.pool)
            .await
            .map_err(db("removing a client"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Every client.
    pub async fn clients(&self) -> Result<Vec<ClientRecord>> {
        let rows = sqlx::query(
            "SELECT id, tenant, kind, secret_hash, roles, device_type, children, disabled, next_secret_hash FROM clients \
             ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing clients"))?;
        rows.iter().map(client_row).collect::<std::result::Result<_, _>>().map_err(db("listing clients"))
    }

    /// Adds a signing key.
    pub async fn add_key(&self, k: &KeyRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO signing_keys (kid, algorithm, private_pkcs8, public_key, created_at, retired_at, remove_after) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(k.kid.clone())
        .bind(k.algorithm.clone())
        .bind(b64(&k.private_pkcs8))
        .bind(b64(&k.public_key))
        .bind(k.created_at)
        .bind(k.retired_at)
        .bind(k.remove_after)
        .execute(&self.pool)
        .await
        .map_err(db("adding a signing key"))?;
        Ok(())
    }

    /// Retires every key but `keep`: they verify until `remove_after`, then leave the JWKS.
    pub async fn retire_keys_except(&self, keep: &str, now: i64, remove_after: i64) -> Result<()> {
        sqlx::query(
            "UPDATE signing_keys SET retired_at = $1, remove_after = $2 WHERE kid <> $3 AND retired_at IS NULL",
        )
        .bind(now)
        .bind(remove_after)
        .bind(keep.to_owned())
        .execute(&self.pool)
        .await
        .map_err(db("retiring signing keys"))?;
        sqlx::query("DELETE FROM signing_keys WHERE remove_after IS NOT NULL AND remove_after < $1")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(db("removing expired signing keys"))?;
        Ok(())
    }

    /// Every signing key, newest first.
    pub async fn keys(&self) -> Result<Vec<KeyRecord>> {
        let rows = sqlx::query(
            "SELECT kid, algorithm, private_pkcs8, public_key, created_at, retired_at, remove_after FROM signing_keys \
             ORDER BY created_at DESC, kid DESC",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing signing keys"))?;
        rows.iter().map(key_row).collect()
    }

    /// Records an API token.
    pub async fn add_token(&self, t: &TokenRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens (jti, subject, kind, tenant, description, expires_at, created_at) VALUES ($1, $2, $3, $4, \
             $5, $6, $7)",
        )
        .bind(t.jti.clone())
        .bind(t.subject.clone())
        .bind(t.kind.clone())
        .bind(t.tenant.clone())
        .bind(t.description.clone())
        .bind(t.expires_at)
        .bind(t.created_at)
        .execute(&self.pool)
        .await
        .map_err(db("recording a token"))?;
        Ok(())
    }

    /// Every API token not yet expired.
    pub async fn tokens(&self, now: i64) -> Result<Vec<TokenRecord>> {
        let rows = sqlx::query(
            "SELECT jti, subject, kind, tenant, description, expires_at, created_at FROM tokens WHERE expires_at > $1 \
             AND jti NOT IN (SELECT jti FROM revocations) ORDER BY created_at, jti",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing tokens"))?;
        rows.iter().map(token_row).collect::<std::result::Result<_, _>>().map_err(db("listing tokens"))
    }

    /// Revokes the access token `jti` (valid until `expires_at`); `false` when it already was.
    pub async fn revoke(&self, jti: &str, expires_at: i64) -> Result<bool> {
        let r = sqlx::query("INSERT INTO revocations (jti, expires_at) VALUES ($1, $2) ON CONFLICT (jti) DO NOTHING")
            .bind(jti.to_owned())
            .bind(expires_at)
            .execute(&self.pool)
            .await
            .map_err(db("revoking a token"))?;
        Ok(r.rows_affected() == 1)
    }

    /// The revoked tokens that have not expired yet (expired ones are forgotten).
    pub async fn revocations(&self, now: i64) -> Result<Vec<String>> {
        sqlx::query("DELETE FROM revocations WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(db("forgetting expired revocations"))?;
        let rows = sqlx::query("SELECT jti FROM revocations")
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing revocations"))?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<std::result::Result<_, _>>()
            .map_err(db("listing revocations"))
    }

    /// Stores a refresh token's record.
    pub async fn add_refresh(&self, r: &RefreshRecord, now: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO refresh_tokens (hash, family, client_id, subject, kind, tenant, scope, expires_at, used, revoked, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, 0, $9)",
        )
        .bind(r.hash.clone())
        .bind(r.family.clone())
        .bind(r.client_id.clone())
        .bind(r.subject.clone())
        .bind(r.kind.clone())
        .bind(r.tenant.clone())
        .bind(r.scope.clone())
        .bind(r.expires_at)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db("storing a refresh token"))?;
        Ok(())
    }

    /// The refresh token with this hash.
    pub async fn refresh(&self, hash: &str) -> Result<Option<RefreshRecord>> {
        let row = sqlx::query(
            "SELECT hash, family, client_id, subject, kind, tenant, scope, expires_at, used, revoked FROM refresh_tokens \
             WHERE hash = $1",
        )
        .bind(hash.to_owned())
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading a refresh token"))?;
        row.map(|r| refresh_row(&r)).transpose().map_err(db("reading a refresh token"))
    }

    /// Marks a refresh token used; `false` when it already was (a concurrent reuse).
    pub async fn use_refresh(&self, hash: &str) -> Result<bool> {
        let r = sqlx::query("UPDATE refresh_tokens SET used = 1 WHERE hash = $1 AND used = 0 AND revoked = 0")
            .bind(hash.to_owned())
            .execute(&self.pool)
            .await
            .map_err(db("rotating a refresh token"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Revokes every refresh token of a family; returns how many.
    pub async fn revoke_family(&self, family: &str) -> Result<u64> {
        let r = sqlx::query("UPDATE refresh_tokens SET revoked = 1 WHERE family = $1 AND revoked = 0")
            .bind(family.to_owned())
            .execute(&self.pool)
            .await
            .map_err(db("revoking a refresh-token family"))?;
        Ok(r.rows_affected())
    }

    /// Stores a device authorization.
    pub async fn add_device_code(&self, d: &DeviceCodeRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO device_codes (device_code_hash, user_code, client_id, scope, expires_at, status, approved_by, \
             last_poll) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(d.device_code_hash.clone())
        .bind(d.user_code.clone())
        .bind(d.client_id.clone())
        .bind(d.scope.clone())
        .bind(d.expires_at)
        .bind(d.status.clone())
        .bind(d.approved_by.clone())
        .bind(d.last_poll)
        .execute(&self.pool)
        .await
        .map_err(db("storing a device code"))?;
        Ok(())
    }

    /// A device authorization by its device code's hash or its user code.
    pub async fn device_code(
        &self,
        device_code_hash: Option<&str>,
        user_code: Option<&str>,
    ) -> Result<Option<DeviceCodeRecord>> {
        if device_code_hash.is_none() && user_code.is_none() {
            return Ok(None);
        }
        // Neither can be empty when given: an absent one matches nothing.
        let row = sqlx::query(
            "SELECT device_code_hash, user_code, client_id, scope, expires_at, status, approved_by, last_poll FROM \
             device_codes WHERE device_code_hash = $1 OR user_code = $2",
        )
        .bind(device_code_hash.unwrap_or("").to_owned())
        .bind(user_code.unwrap_or("").to_owned())
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading a device code"))?;
        row.map(|r| device_code_row(&r)).transpose().map_err(db("reading a device code"))
    }

    /// Moves a device authorization from status `from` to `to`; `false` when it was not in
    /// `from` (someone else moved it first).
    pub async fn set_device_code_status(
        &self,
        hash: &str,
        from: &str,
        to: &str,
        approved_by: Option<&str>,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE device_codes SET status = $1, approved_by = COALESCE($2, approved_by) WHERE device_code_hash = $3 \
             AND status = $4",
        )
        .bind(to.to_owned())
        .bind(approved_by.map(str::to_owned))
        .bind(hash.to_owned())
        .bind(from.to_owned())
        .execute(&self.pool)
        .await
        .map_err(db("updating a device code"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Records a poll of a device authorization.
    pub async fn touch_device_code(&self, hash: &str, now: i64) -> Result<()> {
        sqlx::query("UPDATE device_codes SET last_poll = $1 WHERE device_code_hash = $2")
            .bind(now)
            .bind(hash.to_owned())
            .execute(&self.pool)
            .await
            .map_err(db("updating a device code"))?;
        Ok(())
    }

    /// Stores (or replaces) a policy document.
    pub async fn put_policy(&self, id: &str, text: &str, now: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO policies (id, text, updated_at) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET text = \
             excluded.text, updated_at = excluded.updated_at",
        )
        .bind(id.to_owned())
        .bind(text.to_owned())
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db("storing a policy"))?;
        Ok(())
    }

    /// Deletes a policy document; `false` when there was none.
    pub async fn delete_policy(&self, id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM policies WHERE id = $1")
            .bind(id.to_owned())
            .execute(&self.pool)
            .await
            .map_err(db("deleting a policy"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Every policy document stored through the API, by id.
    pub async fn policies(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT id, text FROM policies ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing policies"))?;
        rows.iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?)))
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(db("listing policies"))
    }
}

fn user_row(r: &AnyRow) -> std::result::Result<UserRecord, sqlx::Error> {
    Ok(UserRecord {
        name: r.try_get(0)?,
        tenant: r.try_get(1)?,
        password_hash: r.try_get(2)?,
        roles: roles_list(&r.try_get::<String, _>(3)?),
        disabled: r.try_get::<i64, _>(4)? != 0,
    })
}

fn client_row(r: &AnyRow) -> std::result::Result<ClientRecord, sqlx::Error> {
    Ok(ClientRecord {
        id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        kind: r.try_get(2)?,
        secret_hash: r.try_get(3)?,
        roles: roles_list(&r.try_get::<String, _>(4)?),
        device_type: r.try_get(5)?,
        children: roles_list(&r.try_get::<String, _>(6)?),
        disabled: r.try_get::<i64, _>(7)? != 0,
        next_secret_hash: r.try_get(8)?,
    })
}

fn key_row(r: &AnyRow) -> Result<KeyRecord> {
    let get = |e| Error::Store(format!("reading a signing key: {e}"));
    Ok(KeyRecord {
        kid: r.try_get(0).map_err(get)?,
        algorithm: r.try_get(1).map_err(get)?,
        private_pkcs8: unb64(&r.try_get::<String, _>(2).map_err(get)?)?,
        public_key: unb64(&r.try_get::<String, _>(3).map_err(get)?)?,
        created_at: r.try_get(4).map_err(get)?,
        retired_at: r.try_get(5).map_err(get)?,
        remove_after: r.try_get(6).map_err(get)?,
    })
}

fn token_row(r: &AnyRow) -> std::result::Result<TokenRecord, sqlx::Error> {
    Ok(TokenRecord {
        jti: r.try_get(0)?,
        subject: r.try_get(1)?,
        kind: r.try_get(2)?,
        tenant: r.try_get(3)?,
        description: r.try_get(4)?,
        expires_at: r.try_get(5)?,
        created_at: r.try_get(6)?,
    })
}

fn device_code_row(r: &AnyRow) -> std::result::Result<DeviceCodeRecord, sqlx::Error> {
    Ok(DeviceCodeRecord {
        device_code_hash: r.try_get(0)?,
        user_code: r.try_get(1)?,
        client_id: r.try_get(2)?,
        scope: r.try_get(3)?,
        expires_at: r.try_get(4)?,
        status: r.try_get(5)?,
        approved_by: r.try_get(6)?,
        last_poll: r.try_get(7)?,
    })
}

fn refresh_row(r: &AnyRow) -> std::result::Result<RefreshRecord, sqlx::Error> {
    Ok(RefreshRecord {
        hash: r.try_get(0)?,
        family: r.try_get(1)?,
        client_id: r.try_get(2)?,
        subject: r.try_get(3)?,
        kind: r.try_get(4)?,
        tenant: r.try_get(5)?,
        scope: r.try_get(6)?,
        expires_at: r.try_get(7)?,
        used: r.try_get::<i64, _>(8)? != 0,
        revoked: r.try_get::<i64, _>(9)? != 0,
    })
}
