//! How the CLI's client commands (`ferrite sql`, `token`, `user`, `client`) authenticate to
//! a running server: `--token`, `FERRITE_TOKEN`, or the admin token the server wrote in
//! its data directory.

use std::path::PathBuf;

use anyhow::Context;

/// The credentials flags every client command shares.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// A bearer token (default: the contents of DATA_DIR/admin.token).
    #[arg(long, env = "FERRITE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The server's data directory, to read admin.token from.
    #[arg(long, env = "FERRITE_DATA_DIR", default_value = "./ferrite-data")]
    pub data_dir: PathBuf,
    /// Act in this tenant rather than the token's own (sent as the `Ferrite-Tenant` header;
    /// the server's policies decide whether the token may).
    #[arg(long, env = "FERRITE_TENANT")]
    pub tenant: Option<String>,
}

/// What a client command sends with every request: the bearer token and, when asked for,
/// the tenant to act in.
#[derive(Debug, Clone)]
pub struct Auth {
    authorization: String,
    tenant: Option<String>,
}

impl Auth {
    /// `request` with the credentials' headers.
    pub fn apply<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        let request = request.header("Authorization", &self.authorization);
        match &self.tenant {
            Some(t) => request.header("Ferrite-Tenant", t),
            None => request,
        }
    }
}

impl AuthArgs {
    /// The bearer token to send.
    pub fn token(&self) -> anyhow::Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.trim().to_owned());
        }
        let path = self.data_dir.join("admin.token");
        let token = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no token: pass --token (or FERRITE_TOKEN), or --data-dir of a server with identity on so that {} \
                 can be read",
                path.display()
            )
        })?;
        Ok(token.trim().to_owned())
    }

    /// The headers to send.
    pub fn auth(&self) -> anyhow::Result<Auth> {
        Ok(Auth { authorization: format!("Bearer {}", self.token()?), tenant: self.tenant.clone() })
    }
}
