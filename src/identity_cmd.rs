//! `ferrite token|user|client|policy ...`: identity administration against a running server
//! (through its HTTP API, with the admin token by default), and `policy check`, which
//! decides offline from the policy files.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::client::AuthArgs;

/// Where the server is and how to authenticate to it.
#[derive(Debug, clap::Args)]
pub struct Remote {
    /// Base URL of the server's HTTP API.
    #[arg(long, env = "FERRITE_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    #[command(flatten)]
    auth: AuthArgs,
}

impl Remote {
    /// A JSON request; the JSON answer, or the server's error message.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let body = body.unwrap_or(Value::Null).to_string().into_bytes();
        self.send(method, path, "application/json", body)
    }

    /// A request with a body of `content_type`; the JSON answer, or the server's error.
    pub fn send(&self, method: &str, path: &str, content_type: &str, body: Vec<u8>) -> anyhow::Result<Value> {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .new_agent();
        let url = format!("{}{path}", self.server.trim_end_matches('/'));
        let auth = self.auth.auth()?;
        let reach = || format!("cannot reach the Ferrite server at {} (is it running? set --server)", self.server);
        let mut resp = match method {
            "GET" => auth.apply(agent.get(&url)).call().with_context(reach)?,
            "DELETE" => auth.apply(agent.delete(&url)).call().with_context(reach)?,
            "PATCH" => auth
                .apply(agent.patch(&url))
                .header("Content-Type", content_type)
                .send(body.as_slice())
                .with_context(reach)?,
            _ => auth
                .apply(agent.post(&url))
                .header("Content-Type", content_type)
                .send(body.as_slice())
                .with_context(reach)?,
        };
        let status = resp.status();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !status.is_success() {
            let msg = v["error"]["message"].as_str().map(str::to_owned).unwrap_or(text);
            bail!("{} {path}: {status}: {msg}", method);
        }
        Ok(v)
    }
}

/// Prints a JSON answer.
pub fn print(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `ferrite token ...`
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Debug, clap::Subcommand)]
enum TokenCommand {
    /// Create a long-lived API token for a user or client (default: yourself); printed once.
    Create {
        /// The user or client the token acts as.
        #[arg(long)]
        subject: Option<String>,
        /// What the token is for.
        #[arg(long)]
        description: Option<String>,
        /// Lifetime (e.g. 90d, 12h).
        #[arg(long, default_value = "90d")]
        ttl: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// List the API tokens not yet expired or revoked.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Revoke an API token by its id (jti).
    Revoke {
        /// The token's id.
        jti: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Rotate the signing key (the old one keeps verifying until its tokens expire).
    RotateKey {
        #[command(flatten)]
        remote: Remote,
    },
}

/// Runs `ferrite token ...`.
pub fn token(args: TokenArgs) -> anyhow::Result<()> {
    match args.command {
        TokenCommand::Create { subject, description, ttl, remote } => {
            let v = remote.call(
                "POST",
                "/api/v1/tokens",
                Some(json!({"subject": subject, "description": description, "ttl": ttl})),
            )?;
            print(&v)
        }
        TokenCommand::List { remote } => print(&remote.call("GET", "/api/v1/tokens", None)?),
        TokenCommand::Revoke { jti, remote } => {
            remote.call("DELETE", &format!("/api/v1/tokens/{jti}"), None)?;
            println!("revoked {jti}");
            Ok(())
        }
        TokenCommand::RotateKey { remote } => print(&remote.call("POST", "/api/v1/keys/rotate", Some(json!({})))?),
    }
}

/// `ferrite user ...`
#[derive(Debug, clap::Args)]
pub struct UserArgs {
    #[command(subcommand)]
    command: UserCommand,
}

#[derive(Debug, clap::Subcommand)]
enum UserCommand {
    /// Add a user; the password is read from FERRITE_PASSWORD or stdin (never a flag: shells log flags).
    Add {
        /// The user's name.
        name: String,
        /// Its tenant (default: yours).
        #[arg(long)]
        tenant: Option<String>,
        /// Roles, comma-separated (admin, operator, viewer, auditor, monitor, ingest).
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List users.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Set a user's password (read from FERRITE_PASSWORD or stdin).
    Passwd {
        /// The user's name.
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
}

fn read_password() -> anyhow::Result<String> {
    if let Ok(p) = std::env::var("FERRITE_PASSWORD") {
        return Ok(p);
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("reading the password from stdin")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// Runs `ferrite user ...`.
pub fn user(args: UserArgs) -> anyhow::Result<()> {
    match args.command {
        UserCommand::Add { name, tenant, roles, remote } => {
            let password = read_password()?;
            print(&remote.call(
                "POST",
                "/api/v1/users",
                Some(json!({"name": name, "tenant": tenant, "roles": roles, "password": password})),
            )?)
        }
        UserCommand::List { remote } => print(&remote.call("GET", "/api/v1/users", None)?),
        UserCommand::Passwd { name, remote } => {
            let password = read_password()?;
            remote.call("POST", &format!("/api/v1/users/{name}/password"), Some(json!({"password": password})))?;
            println!("password of {name} changed");
            Ok(())
        }
    }
}

/// `ferrite client ...`
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    #[command(subcommand)]
    command: ClientCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ClientCommand {
    /// Add a client of the token endpoint; prints its secret once.
    Add {
        /// Its id (default: a random one).
        #[arg(long)]
        id: Option<String>,
        /// `service` or `device`.
        #[arg(long, default_value = "service")]
        kind: String,
        /// Its tenant (default: yours).
        #[arg(long)]
        tenant: Option<String>,
        /// Roles, comma-separated.
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// A gateway's children, comma-separated.
        #[arg(long, value_delimiter = ',')]
        children: Vec<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List clients.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove a client: its tokens stop working at once.
    Remove {
        /// The client id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
}

/// Runs `ferrite client ...`.
pub fn client(args: ClientArgs) -> anyhow::Result<()> {
    match args.command {
        ClientCommand::Add { id, kind, tenant, roles, children, remote } => print(&remote.call(
            "POST",
            "/api/v1/clients",
            Some(json!({"id": id, "kind": kind, "tenant": tenant, "roles": roles, "children": children})),
        )?),
        ClientCommand::List { remote } => print(&remote.call("GET", "/api/v1/clients", None)?),
        ClientCommand::Remove { id, remote } => {
            remote.call("DELETE", &format!("/api/v1/clients/{id}"), None)?;
            println!("removed {id}");
            Ok(())
        }
    }
}

/// `ferrite policy ...`
#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Debug, clap::Subcommand)]
enum PolicyCommand {
    /// Decide a request offline, from the built-in set and the policy files, and print the
    /// decision and the policies that made it. Exit status 0 for allow, 2 for deny.
    Check {
        /// `user::"alice"`, `device::"d1"` or `service::"svc"`.
        #[arg(long)]
        principal: String,
        /// publish, subscribe, ingest, query, manage_rules, manage_devices, actuate, manage_identity, read_audit, read_metrics.
        #[arg(long)]
        action: String,
        /// `topic::"devices/d1/telemetry"`, `stream::"telemetry"`, `rule::"r"`, `device::"d1"`, `tenant::"default"`.
        #[arg(long)]
        resource: String,
        /// The principal's tenant.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// The principal's roles, comma-separated.
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// A gateway's children, comma-separated.
        #[arg(long, value_delimiter = ',')]
        children: Vec<String>,
        /// The policy directory.
        #[arg(long, env = "FERRITE_POLICIES_DIR", default_value = "./policies")]
        policies_dir: PathBuf,
    },
}

/// Runs `ferrite policy ...`; `Ok(false)` for a deny.
pub fn policy(args: PolicyArgs) -> anyhow::Result<bool> {
    use ferrite_engine::auth::{Action, Principal, PrincipalKind, RequestContext, Transport};
    let PolicyCommand::Check { principal, action, resource, tenant, roles, children, policies_dir } = args.command;
    let (kind, id) = principal.split_once("::").context("--principal: expected kind::\"id\", like device::\"d1\"")?;
    let kind = PrincipalKind::parse(kind.trim())
        .with_context(|| format!("principal kind {kind:?}: use user, device or service"))?;
    let mut p = Principal::new(kind, id.trim().trim_matches('"'), &tenant).with_roles(roles);
    p.children = children.into();
    let action = Action::parse(&action).with_context(|| format!("unknown action {action:?}"))?;
    let resource = ferrite_identity::http::parse_resource(&resource, &tenant).map_err(anyhow::Error::msg)?;
    let pdp = ferrite_identity::policy::Pdp::new()?;
    let docs = ferrite_identity::service::read_policy_dir(&policies_dir)?;
    let policies = pdp.compile(&docs)?;
    let ctx = RequestContext::new(Transport::Local, None);
    let d =
        pdp.decide(&policies, &p, action, &resource, &ctx, &|_| tenant.clone(), ferrite_identity::service::now())?;
    println!("{}: {p} {} {resource}", if d.allowed { "ALLOW" } else { "DENY" }, action.as_str());
    if d.policies.is_empty() {
        println!("  no policy permits it (default deny)");
    }
    for id in &d.policies {
        println!("  decided by {id}");
    }
    Ok(d.allowed)
}
