//! The PostgreSQL wire protocol (`--pg-listen`, 5433 by default): psql, DBeaver, Grafana's
//! PostgreSQL data source, Metabase, psycopg and JDBC read the same tables as `POST
//! /api/v1/sql`, through DataFusion with `pg_catalog` emulated (datafusion-postgres).
//!
//! - **Authentication**: cleartext password (send it over TLS or a trusted network); the
//!   password is a bearer token (an access token, or `admin.token`), the user name is free.
//!   With `--auth off` any password is taken.
//! - **Tenant**: the token's own; the database name picks another tenant the token may
//!   query (`psql -d acme`); `postgres`, `ferrite`, an empty name or the user's name mean
//!   the token's own. The `audit` stream is hidden without `read_audit`, as over HTTP.
//! - **Read-only**: SELECT, EXPLAIN, SHOW, SET, BEGIN/COMMIT/ROLLBACK; anything else is
//!   refused with SQLSTATE 25006. `statement_timeout` starts at `sql_timeout`.
//! - **Cancel requests** (psql's Ctrl-C, `conn.cancel()`) stop the running statement.
//! - **TLS** with `tls_cert`/`tls_key`: then TLS is required (`sslmode=require` or
//!   stricter); a session that starts in clear text is refused before its password is sent
//!   (cancel requests, which carry no secret, stay allowed in clear, as libpq sends them).

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog;
use datafusion_postgres::pgwire;
use datafusion_postgres::{DfSessionService, QueryHook};
use ferrite_engine::auth::{AccessControl, Credentials, Principal, RequestContext, Transport};
use ferrite_query::{QueryService, Scope};
use futures::{Sink, SinkExt};
use parking_lot::Mutex;
use pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::cancel::DefaultCancelHandler;
use pgwire::api::portal::Portal;
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, Response};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionManager, PgWireConnectionState, PgWireServerHandlers, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tokio::net::TcpListener;

/// Client metadata key of the connection's tenant.
const TENANT_KEY: &str = "ferrite.tenant";
/// Client metadata key set when the connection may not read the `audit` stream.
const HIDE_AUDIT_KEY: &str = "ferrite.hide_audit";
/// Most tenants with a pgwire session kept at once (each holds its `pg_catalog`).
const MAX_SESSIONS: usize = 256;

/// The request codes a client may send before TLS: SSLRequest, GSSENCRequest (answered `N`,
/// after which libpq asks for TLS) and CancelRequest.
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;

/// With TLS required: peeks at the connection's first message; when it starts a session in
/// clear text, answers a FATAL error saying how to connect and returns `true` (closed).
async fn refuse_clear_text(socket: &tokio::net::TcpStream) -> std::io::Result<bool> {
    let mut head = [0u8; 8];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let n = tokio::time::timeout_at(deadline, socket.peek(&mut head))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if n >= head.len() {
            break;
        }
        // Fewer than 8 bytes arrived yet: wait for the rest of the header.
        socket.readable().await?;
    }
    let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if matches!(code, SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST) {
        return Ok(false);
    }
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "28000"),
        (b'M', "this server requires TLS: connect with sslmode=require (or verify-full with the server's CA)"),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut message = vec![b'E'];
    message.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    message.extend_from_slice(&body);
    // One small message on a fresh connection: it fits the socket buffer.
    socket.writable().await?;
    let _ = socket.try_write(&message);
    Ok(true)
}

fn user_error(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("ERROR".to_owned(), code.to_owned(), message)))
}

/// Serves the PostgreSQL wire protocol on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    query: Arc<QueryService>,
    access: Arc<dyn AccessControl>,
    tls: Option<Arc<crate::tls::TlsFiles>>,
) {
    let handlers = Arc::new(Handlers::new(query, access));
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "pgwire accept failed");
                continue;
            }
        };
        let handlers = handlers.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let acceptor = match &tls {
                None => None,
                Some(files) => match refuse_clear_text(&socket).await {
                    Ok(true) => return,
                    Ok(false) => Some(files.acceptor()),
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "pgwire connection ended before its first message");
                        return;
                    }
                },
            };
            if let Err(e) = pgwire::tokio::process_socket(socket, acceptor, handlers).await {
                tracing::debug!(%peer, error = %e, "pgwire connection ended with an error");
            }
        });
    }
}

/// The handlers of every connection.
struct Handlers {
    startup: Arc<TokenStartup>,
    sessions: Arc<TenantSessions>,
    cancel: Arc<Cancels>,
}

/// Cancel requests. pgwire's own handle stops a statement while it is planned; the rows of
/// a result are produced after that, as the client reads them, so each connection also has
/// a counter its result streams watch: a cancel request bumps it and the stream ends with
/// SQLSTATE 57014 (dropping the stream stops DataFusion's work).
struct Cancels {
    planning: DefaultCancelHandler,
    connections: Mutex<HashMap<ConnectionKey, tokio::sync::watch::Sender<u64>>>,
}

/// A connection's process id and secret key, as a cancel request names it.
type ConnectionKey = (i32, Vec<u8>);

/// Removes a connection's entry from [`Cancels`] when the connection ends.
struct CancelGuard {
    key: ConnectionKey,
    cancels: Arc<Cancels>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.cancels.connections.lock().remove(&self.key);
    }
}

#[async_trait]
impl pgwire::api::cancel::CancelHandler for Cancels {
    async fn on_cancel_request(&self, request: pgwire::messages::cancel::CancelRequest) {
        let key = (request.pid, request.secret_key.to_bytes().to_vec());
        if let Some(tx) = self.connections.lock().get(&key) {
            tx.send_modify(|n| *n += 1);
        }
        self.planning.on_cancel_request(request).await;
    }
}

impl Handlers {
    fn new(query: Arc<QueryService>, access: Arc<dyn AccessControl>) -> Self {
        let connections = Arc::new(ConnectionManager::new());
        let cancel = Arc::new(Cancels {
            planning: DefaultCancelHandler::new(connections.clone()),
            connections: Mutex::new(HashMap::new()),
        });
        Self {
            startup: Arc::new(TokenStartup {
                access,
                timeout_ms: query.timeout().as_millis(),
                parameters: DefaultServerParameterProvider::default(),
                connections,
                cancels: cancel.clone(),
            }),
            sessions: Arc::new(TenantSessions::new(query)),
            cancel,
        }
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.sessions.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.sessions.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }

    fn cancel_handler(&self) -> Arc<impl pgwire::api::cancel::CancelHandler> {
        self.cancel.clone()
    }
}

/// Cleartext-password startup where the password is a bearer token.
struct TokenStartup {
    access: Arc<dyn AccessControl>,
    timeout_ms: u128,
    parameters: DefaultServerParameterProvider,
    connections: Arc<ConnectionManager>,
    cancels: Arc<Cancels>,
}

impl TokenStartup {
    /// The tenant `principal` reads through `database`, and whether the audit stream is
    /// hidden from it; or why it may not.
    fn scope_of(
        &self,
        principal: &Principal,
        database: Option<&str>,
        user: Option<&str>,
        context: &RequestContext,
    ) -> Result<(String, bool), String> {
        let own = principal.tenant.to_string();
        let tenant = match database {
            None | Some("" | "postgres" | "ferrite") => own,
            Some(d) if Some(d) == user => own,
            Some(d) => d.to_owned(),
        };
        let scope = Scope::of(self.access.as_ref(), principal, &tenant, context)?;
        Ok((scope.tenant, !scope.hidden.is_empty()))
    }
}

#[async_trait]
impl StartupHandler for TokenStartup {
    async fn on_startup<C>(&self, client: &mut C, message: PgWireFrontendMessage) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client.send(PgWireBackendMessage::Authentication(Authentication::CleartextPassword)).await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(pwd) => {
                let pwd = pwd.into_password()?;
                let context = RequestContext::new(Transport::Postgres, Some(client.socket_addr().ip()));
                let user = client.metadata().get("user").cloned();
                let database = client.metadata().get("database").cloned();
                let principal = match self.access.authenticate(&Credentials::Bearer(&pwd.password), &context) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(user = ?user, peer = %client.socket_addr(), error = %e, "pgwire login refused");
                        return Err(user_error(
                            "28P01",
                            format!(
                                "password authentication failed for user {:?}: the password must be a Ferrite \
                                 access token (admin.token, or one from POST /oauth2/token): {e}",
                                user.unwrap_or_default()
                            ),
                        ));
                    }
                };
                let (tenant, hide_audit) = self
                    .scope_of(&principal, database.as_deref(), user.as_deref(), &context)
                    .map_err(|m| user_error("42501", m))?;
                let metadata = client.metadata_mut();
                metadata.insert(TENANT_KEY.to_owned(), tenant);
                if hide_audit {
                    metadata.insert(HIDE_AUDIT_KEY.to_owned(), "1".to_owned());
                }
                metadata.insert("statement_timeout_ms".to_owned(), self.timeout_ms.to_string());
                let (pid, secret) = pgwire::api::PidSecretKeyGenerator::generate(
                    &pgwire::api::RandomPidSecretKeyGenerator::default(),
                    client,
                );
                client.set_pid_and_secret_key(pid, secret);
                // Registered for cancel requests (as pgwire's own handlers do).
                let (pid, secret) = client.pid_and_secret_key();
                let key = (pid, secret.to_bytes().to_vec());
                let (handle, guard) = self.connections.register(pid, secret);
                client.session_extensions().insert(handle);
                client.session_extensions().insert(guard);
                let (tx, rx) = tokio::sync::watch::channel(0u64);
                self.cancels.connections.lock().insert(key.clone(), tx);
                client.session_extensions().insert(rx);
                client.session_extensions().insert(CancelGuard { key, cancels: self.cancels.clone() });
                finish_authentication(client, &self.parameters).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Refuses every statement that is not a read (the archive is written by ingest only).
struct ReadOnly;

fn check_read_only(statement: &datafusion::sql::sqlparser::ast::Statement) -> Option<PgWireError> {
    use datafusion::sql::sqlparser::ast::Statement as S;
    match statement {
        S::Query(_)
        | S::Explain { .. }
        | S::ExplainTable { .. }
        | S::ShowTables { .. }
        | S::ShowColumns { .. }
        | S::ShowVariable { .. }
        | S::ShowFunctions { .. }
        | S::ShowCreate { .. } => None,
        other => {
            let text = other.to_string();
            let head: String = text.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
            Some(user_error(
                "25006",
                format!(
                    "Ferrite's SQL is read-only: `{head} ...` is not allowed (devices and services write \
                     through ingest; streams are created by their first event)"
                ),
            ))
        }
    }
}

#[async_trait]
impl QueryHook for ReadOnly {
    async fn handle_simple_query(
        &self,
        statement: &datafusion::sql::sqlparser::ast::Statement,
        _: &datafusion::prelude::SessionContext,
        _: &mut dyn datafusion_postgres::hooks::HookClient,
    ) -> Option<PgWireResult<Response>> {
        check_read_only(statement).map(Err)
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &datafusion::sql::sqlparser::ast::Statement,
        _: &datafusion::prelude::SessionContext,
        _: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<datafusion::logical_expr::LogicalPlan>> {
        check_read_only(statement).map(Err)
    }

    async fn handle_extended_query(
        &self,
        statement: &datafusion::sql::sqlparser::ast::Statement,
        _: &datafusion::logical_expr::LogicalPlan,
        _: &datafusion::common::ParamValues,
        _: &datafusion::prelude::SessionContext,
        _: &mut dyn datafusion_postgres::hooks::HookClient,
    ) -> Option<PgWireResult<Response>> {
        check_read_only(statement).map(Err)
    }
}

/// The query handlers: one DataFusion session per tenant (and audit visibility), each with
/// `pg_catalog`.
struct TenantSessions {
    inner: Arc<Sessions>,
    parser: Arc<TenantParser>,
}

impl TenantSessions {
    fn new(query: Arc<QueryService>) -> Self {
        let stateless = Arc::new(DfSessionService::new(Arc::new(datafusion::prelude::SessionContext::new())));
        let inner = Arc::new(Sessions { query, sessions: Mutex::new(HashMap::new()), stateless });
        Self { parser: Arc::new(TenantParser { sessions: inner.clone() }), inner }
    }

    fn service<C: ClientInfo + ?Sized>(&self, client: &C) -> PgWireResult<Arc<DfSessionService>> {
        self.inner.service(client)
    }

    /// Charges a statement to the tenant's daily query quota ("configuration limit
    /// exceeded", 53400, past it).
    fn charge<C: ClientInfo + ?Sized>(&self, client: &C) -> PgWireResult<()> {
        let Some(tenant) = client.metadata().get(TENANT_KEY) else { return Ok(()) };
        self.inner.query.take_query(tenant).map_err(|e| user_error("53400", e.to_string()))
    }
}

/// The sessions by scope.
struct Sessions {
    query: Arc<QueryService>,
    sessions: Mutex<HashMap<Scope, Arc<DfSessionService>>>,
    /// Answers what does not depend on a session (parameter and result types of a parsed
    /// statement).
    stateless: Arc<DfSessionService>,
}

impl Sessions {
    fn service<C: ClientInfo + ?Sized>(&self, client: &C) -> PgWireResult<Arc<DfSessionService>> {
        let tenant = client
            .metadata()
            .get(TENANT_KEY)
            .cloned()
            .ok_or_else(|| user_error("28000", "the connection is not authenticated".into()))?;
        let mut scope = Scope::tenant(&tenant);
        if client.metadata().contains_key(HIDE_AUDIT_KEY) {
            scope = scope.hiding(ferrite_engine::auth::AUDIT_STREAM);
        }
        if let Some(s) = self.sessions.lock().get(&scope) {
            return Ok(s.clone());
        }
        let ctx = self.query.new_session(&scope).map_err(|e| user_error("XX000", e.to_string()))?;
        setup_pg_catalog(&ctx, "ferrite", EmptyContextProvider)
            .map_err(|e| user_error("XX000", format!("pg_catalog: {e}")))?;
        use datafusion_postgres::hooks::{cursor, set_show, transactions};
        // pgwire's own statements first (SET, SHOW, BEGIN...), then the read-only check.
        let hooks: Vec<Arc<dyn QueryHook>> = vec![
            Arc::new(cursor::CursorStatementHook),
            Arc::new(set_show::SetShowHook),
            Arc::new(transactions::TransactionStatementHook),
            Arc::new(ReadOnly),
        ];
        let service = Arc::new(DfSessionService::new_with_hooks(Arc::new(ctx), hooks));
        let mut sessions = self.sessions.lock();
        if sessions.len() >= MAX_SESSIONS {
            sessions.clear();
        }
        sessions.insert(scope, service.clone());
        Ok(service)
    }
}

#[async_trait]
impl SimpleQueryHandler for TenantSessions {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let service = self.service(client)?;
        self.charge(client)?;
        let cancel = cancel_watch(client);
        let responses = SimpleQueryHandler::do_query(service.as_ref(), client, query).await?;
        Ok(responses.into_iter().map(|r| cancellable(r, cancel.clone())).collect())
    }
}

type DfStatement = <DfSessionService as ExtendedQueryHandler>::Statement;

/// Parses with the session of the client's tenant.
struct TenantParser {
    sessions: Arc<Sessions>,
}

#[async_trait]
impl QueryParser for TenantParser {
    type Statement = DfStatement;

    async fn parse_sql<C>(&self, client: &C, sql: &str, types: &[Option<Type>]) -> PgWireResult<Option<Self::Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let service = self.sessions.service(client)?;
        service.query_parser().parse_sql(client, sql, types).await
    }

    fn get_parameter_types(&self, stmt: &Self::Statement) -> PgWireResult<Vec<Type>> {
        self.sessions.stateless.query_parser().get_parameter_types(stmt)
    }

    fn get_result_schema(
        &self,
        stmt: &Self::Statement,
        column_format: Option<&pgwire::api::portal::Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        self.sessions.stateless.query_parser().get_result_schema(stmt, column_format)
    }
}

#[async_trait]
impl ExtendedQueryHandler for TenantSessions {
    type Statement = DfStatement;
    type QueryParser = TenantParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let service = self.service(client)?;
        self.charge(client)?;
        let cancel = cancel_watch(client);
        let response = ExtendedQueryHandler::do_query(service.as_ref(), client, portal, max_rows).await?;
        Ok(cancellable(response, cancel))
    }
}

/// The connection's cancel counter, marked seen: a later cancel request changes it.
fn cancel_watch<C: ClientInfo + ?Sized>(client: &C) -> Option<tokio::sync::watch::Receiver<u64>> {
    let mut rx = (*client.session_extensions().get::<tokio::sync::watch::Receiver<u64>>()?).clone();
    rx.mark_unchanged();
    Some(rx)
}

/// A result whose rows stop with "canceling statement due to user request" (57014) when
/// the connection's cancel counter moves. The rows are produced on a task of their own
/// (DataFusion computes while it is polled), which a cancel aborts.
fn cancellable(response: Response, cancel: Option<tokio::sync::watch::Receiver<u64>>) -> Response {
    match (response, cancel) {
        (Response::Query(mut q), Some(mut rx)) => {
            let mut rows = std::mem::replace(&mut q.data_rows, Box::pin(futures::stream::empty()));
            let (tx, out) = tokio::sync::mpsc::channel(64);
            let producer = tokio::spawn(async move {
                use futures::StreamExt;
                while let Some(row) = rows.next().await {
                    if tx.send(row).await.is_err() {
                        return;
                    }
                }
            });
            let cancelled = Box::pin(async move {
                let _ = rx.changed().await;
            });
            q.data_rows = Box::pin(CancellableRows { rows: Some(out), producer, cancelled });
            Response::Query(q)
        }
        (other, _) => other,
    }
}

/// Rows from their producing task, ending with an error once `cancelled` resolves (the
/// task is aborted then, and with it the query's work; also when the rows are dropped).
struct CancellableRows {
    rows: Option<tokio::sync::mpsc::Receiver<PgWireResult<pgwire::messages::data::DataRow>>>,
    producer: tokio::task::JoinHandle<()>,
    cancelled: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl Drop for CancellableRows {
    fn drop(&mut self) {
        self.producer.abort();
    }
}

impl futures::Stream for CancellableRows {
    type Item = PgWireResult<pgwire::messages::data::DataRow>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(rows) = this.rows.as_mut() else { return std::task::Poll::Ready(None) };
        if this.cancelled.as_mut().poll(cx).is_ready() {
            this.rows = None;
            this.producer.abort();
            return std::task::Poll::Ready(Some(Err(user_error(
                "57014",
                "canceling statement due to user request".to_owned(),
            ))));
        }
        rows.poll_recv(cx)
    }
}
