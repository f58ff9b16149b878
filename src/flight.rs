//! Arrow Flight SQL (`--flight-listen`, 8815 by default): ADBC, the Flight SQL JDBC driver
//! and Arrow-native clients read the same tables as `POST /api/v1/sql`, as Arrow record
//! batches (no conversion to rows and back).
//!
//! - **Authentication**: `authorization: Bearer <token>` on every call (ADBC:
//!   `adbc.flight.sql.authorization_header`), or a handshake with Basic credentials whose
//!   password is the token (the answer carries it back as the bearer).
//! - **Tenant**: the token's own; the `x-ferrite-tenant` header picks another the token may
//!   query. The `audit` stream is hidden without `read_audit`.
//! - **Read-only** statements (`CommandStatementQuery`); the catalog commands (catalogs,
//!   schemas, tables with their Arrow schemas, table types, SQL info) that ADBC's
//!   `get_objects` and the JDBC driver's metadata calls use.
//! - **Prepared statements** (what JDBC sends for every query, and ADBC for parameters):
//!   `?` or `$1` placeholders, parameters bound by `DoPut` as a one-row record batch. The
//!   server keeps no state: a handle carries the statement and its bound values, and
//!   binding answers a new handle (Flight SQL's `DoPutPreparedStatementResult`).

use std::pin::Pin;
use std::sync::Arc;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::server::PeekableFlightDataStream;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult,
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
    CommandPreparedStatementQuery, CommandStatementQuery, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, Ticket};
use arrow_flight::{IpcMessage, SchemaAsIpc};
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::prelude::SessionContext;
use ferrite_engine::auth::{AccessControl, Credentials, RequestContext, Transport};
use ferrite_query::{QueryService, Scope, plan_read_only};
use futures::{Stream, TryStreamExt};
use prost::Message;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

/// The catalog every tenant's tables are in.
const CATALOG: &str = "ferrite";

/// Serves Flight SQL on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, query: Arc<QueryService>, access: Arc<dyn AccessControl>) {
    let service = FlightServiceServer::new(FerriteFlight { query, access, info: sql_info() })
        .max_decoding_message_size(64 * 1024 * 1024);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    if let Err(e) = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await {
        tracing::error!(error = %e, "the Flight SQL listener stopped");
    }
}

fn sql_info() -> SqlInfoData {
    let mut b = SqlInfoDataBuilder::new();
    b.append(SqlInfo::FlightSqlServerName, "Ferrite");
    b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    b.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
    b.append(SqlInfo::FlightSqlServerReadOnly, true);
    b.append(SqlInfo::FlightSqlServerSql, true);
    b.append(SqlInfo::FlightSqlServerSubstrait, false);
    b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
    b.append(SqlInfo::FlightSqlServerCancel, false);
    b.build().unwrap_or_else(|e| {
        tracing::error!(error = %e, "Flight SQL info could not be built");
        SqlInfoDataBuilder::new().build().unwrap_or_else(|_| unreachable!("an empty SqlInfoData builds"))
    })
}

/// The Flight SQL service.
struct FerriteFlight {
    query: Arc<QueryService>,
    access: Arc<dyn AccessControl>,
    info: SqlInfoData,
}

type FlightStream = Pin<Box<dyn Stream<Item = Result<arrow_flight::FlightData, Status>> + Send>>;

/// A prepared statement's handle: the statement, and the values bound to it (Arrow IPC).
struct Handle {
    sql: String,
    params: Vec<ScalarValue>,
}

/// Leads a handle: a version, so that a handle of another build is refused clearly.
const HANDLE_MAGIC: &[u8; 4] = b"FPS1";

impl Handle {
    fn encode(&self) -> Result<bytes::Bytes, Status> {
        let mut out = HANDLE_MAGIC.to_vec();
        out.extend_from_slice(&(self.sql.len() as u32).to_le_bytes());
        out.extend_from_slice(self.sql.as_bytes());
        if !self.params.is_empty() {
            let arrays = self
                .params
                .iter()
                .map(|v| v.to_array_of_size(1))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let fields: Vec<_> = arrays
                .iter()
                .enumerate()
                .map(|(i, a)| arrow::datatypes::Field::new(format!("${}", i + 1), a.data_type().clone(), true))
                .collect();
            let batch = arrow::array::RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), arrays)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut out, &batch.schema())
                .map_err(|e| Status::internal(e.to_string()))?;
            w.write(&batch).and_then(|_| w.finish()).map_err(|e| Status::internal(e.to_string()))?;
        }
        Ok(out.into())
    }

    fn decode(bytes: &[u8]) -> Result<Self, Status> {
        let bad =
            || Status::invalid_argument("not a prepared statement handle of this server (prepare the statement again)");
        let rest = bytes.strip_prefix(HANDLE_MAGIC).ok_or_else(bad)?;
        let len = rest.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes).ok_or_else(bad)? as usize;
        let sql = rest.get(4..4 + len).and_then(|b| std::str::from_utf8(b).ok()).ok_or_else(bad)?.to_owned();
        let ipc = &rest[4 + len..];
        let mut params = Vec::new();
        if !ipc.is_empty() {
            let reader = arrow::ipc::reader::StreamReader::try_new(ipc, None).map_err(|_| bad())?;
            for batch in reader {
                let batch = batch.map_err(|_| bad())?;
                params = first_row(&batch)?;
            }
        }
        Ok(Self { sql, params })
    }
}

/// The values of a parameter batch's one row.
fn first_row(batch: &arrow::array::RecordBatch) -> Result<Vec<ScalarValue>, Status> {
    if batch.num_rows() != 1 {
        return Err(Status::invalid_argument(format!(
            "bind one row of parameters to a query (got {}); run the statement once per row",
            batch.num_rows()
        )));
    }
    batch
        .columns()
        .iter()
        .map(|c| ScalarValue::try_from_array(c, 0))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Status::invalid_argument(format!("a parameter cannot be read: {e}")))
}

/// `?` placeholders (JDBC's and ADBC's) numbered as DataFusion's `$1`, `$2`...; quoted
/// text, quoted identifiers and comments are left alone.
fn number_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == c {
                        break;
                    }
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == '\n' {
                        break;
                    }
                }
            }
            '?' => {
                n += 1;
                out.push_str(&format!("${n}"));
            }
            _ => out.push(c),
        }
    }
    out
}

fn df_status(e: datafusion::error::DataFusionError) -> Status {
    let text = e.to_string();
    if text.contains("not found") || text.contains("Error during planning") || text.contains("not supported") {
        Status::invalid_argument(text)
    } else {
        Status::internal(text)
    }
}

impl FerriteFlight {
    /// The token of a request: `Bearer <token>`, or the password of `Basic` credentials.
    fn token<T>(request: &Request<T>) -> Result<String, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("send `authorization: Bearer <access token>`"))?
            .to_str()
            .map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
        if let Some(t) = header.strip_prefix("Bearer ") {
            return Ok(t.trim().to_owned());
        }
        if let Some(b) = header.strip_prefix("Basic ") {
            let decoded = base64_decode(b.trim()).ok_or_else(|| Status::unauthenticated("bad Basic credentials"))?;
            let text = String::from_utf8(decoded).map_err(|_| Status::unauthenticated("bad Basic credentials"))?;
            let (_, password) = text.split_once(':').ok_or_else(|| Status::unauthenticated("bad Basic credentials"))?;
            return Ok(password.to_owned());
        }
        Err(Status::unauthenticated("use `authorization: Bearer <access token>`"))
    }

    /// Who asks and what they may see.
    fn scope<T>(&self, request: &Request<T>) -> Result<Scope, Status> {
        let token = Self::token(request)?;
        let context = RequestContext::new(Transport::Flight, request.remote_addr().map(|a| a.ip()));
        let principal = self
            .access
            .authenticate(&Credentials::Bearer(&token), &context)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let tenant = match request.metadata().get("x-ferrite-tenant").and_then(|v| v.to_str().ok()) {
            Some(t) if !t.is_empty() => t.to_owned(),
            _ => principal.tenant.to_string(),
        };
        Scope::of(self.access.as_ref(), &principal, &tenant, &context).map_err(Status::permission_denied)
    }

    /// The statement of `handle` (a prepared one, or a plain statement with no values),
    /// planned read-only with its bound values, its strings as plain `Utf8`.
    async fn prepared(&self, scope: &Scope, handle: &Handle) -> Result<datafusion::dataframe::DataFrame, Status> {
        let df = plan_read_only(&self.session(scope)?, &handle.sql).await.map_err(df_status)?;
        let wanted = df.logical_plan().get_parameter_types().map_err(df_status)?.len();
        if wanted == 0 {
            return Ok(df);
        }
        if handle.params.len() != wanted {
            return Err(Status::invalid_argument(format!(
                "the statement has {wanted} parameter(s), {} are bound",
                handle.params.len()
            )));
        }
        df.with_param_values(ParamValues::List(handle.params.iter().cloned().map(Into::into).collect()))
            .map_err(df_status)
    }

    /// The rows of `df`, streamed as Flight data while they are produced.
    async fn results(df: datafusion::dataframe::DataFrame) -> Result<Response<FlightStream>, Status> {
        let schema = Arc::new(df.schema().as_arrow().clone());
        let batches = df
            .execute_stream()
            .await
            .map_err(df_status)?
            .map_err(|e| FlightError::from(arrow::error::ArrowError::ExternalError(Box::new(e))));
        let stream = FlightDataEncoderBuilder::new().with_schema(schema).build(batches).map_err(Status::from);
        Ok(Response::new(Box::pin(stream)))
    }

    /// Charges a statement run to the tenant's daily query quota (`RESOURCE_EXHAUSTED` past it).
    fn charge(&self, scope: &Scope) -> Result<(), Status> {
        self.query.take_query(&scope.tenant).map_err(|e| Status::resource_exhausted(e.to_string()))
    }

    fn session(&self, scope: &Scope) -> Result<SessionContext, Status> {
        self.query.new_session(scope).map_err(|e| Status::internal(e.to_string()))
    }

    /// A FlightInfo whose one endpoint's ticket is `command` (answered by the matching
    /// `do_get_*`).
    fn info_for(
        command: arrow_flight::sql::Any,
        schema: &arrow::datatypes::Schema,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = Ticket::new(command.encode_to_vec());
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(e.to_string()))?
            .with_endpoint(FlightEndpoint::new().with_ticket(ticket))
            .with_descriptor(descriptor);
        Ok(Response::new(info))
    }

    fn batches<E: Into<FlightError> + Send + 'static>(
        schema: arrow::datatypes::SchemaRef,
        batch: Result<arrow::array::RecordBatch, E>,
    ) -> Response<FlightStream> {
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(futures::stream::once(async move { batch.map_err(Into::into) }))
            .map_err(Status::from);
        Response::new(Box::pin(stream))
    }

    /// Every (schema, table, Arrow schema) of the scope.
    async fn tables(&self, scope: &Scope) -> Result<Vec<(String, String, arrow::datatypes::SchemaRef)>, Status> {
        let ctx = self.session(scope)?;
        let Some(catalog) = ctx.catalog(CATALOG) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for schema_name in catalog.schema_names() {
            let Some(schema) = catalog.schema(&schema_name) else { continue };
            for table in schema.table_names() {
                if let Ok(Some(t)) = schema.table(&table).await {
                    out.push((schema_name.clone(), table, t.schema()));
                }
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        Ok(out)
    }
}

/// The one column of `CommandGetTableTypes`' answer.
fn table_types_schema() -> arrow::datatypes::Schema {
    arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new(
        "table_type",
        arrow::datatypes::DataType::Utf8,
        false,
    )])
}

/// Standard base64 (HTTP Basic credentials).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

#[tonic::async_trait]
impl FlightSqlService for FerriteFlight {
    type FlightService = FerriteFlight;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>, Status> {
        self.scope(&request)?;
        let token = Self::token(&request)?;
        let answer = HandshakeResponse { protocol_version: 0, payload: token.clone().into() };
        let mut response: Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>> =
            Response::new(Box::pin(futures::stream::iter([Ok(answer)])));
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::unauthenticated("the token is not a valid header value"))?;
        response.metadata_mut().insert("authorization", bearer);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let scope = self.scope(&request)?;
        let df = self.prepared(&scope, &Handle { sql: query.query.clone(), params: Vec::new() }).await?;
        let schema = df.schema().as_arrow().clone();
        let ticket = TicketStatementQuery { statement_handle: query.query.clone().into_bytes().into() };
        Self::info_for(ticket.as_any(), &schema, request.into_inner())
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let scope = self.scope(&request)?;
        let sql = String::from_utf8(ticket.statement_handle.to_vec())
            .map_err(|_| Status::invalid_argument("the ticket is not a statement of this server"))?;
        self.charge(&scope)?;
        let df = self.prepared(&scope, &Handle { sql, params: Vec::new() }).await?;
        Self::results(df).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let scope = self.scope(&request)?;
        let sql = number_placeholders(&query.query);
        let df = plan_read_only(&self.session(&scope)?, &sql).await.map_err(df_status)?;
        let types = df.logical_plan().get_parameter_types().map_err(df_status)?;
        let mut params: Vec<(String, Option<arrow::datatypes::DataType>)> = types.into_iter().collect();
        params.sort_by_key(|(name, _)| name.trim_start_matches('$').parse::<usize>().unwrap_or(usize::MAX));
        let parameter_fields: Vec<_> = params
            .into_iter()
            .map(|(name, t)| arrow::datatypes::Field::new(name, t.unwrap_or(arrow::datatypes::DataType::Null), true))
            .collect();
        let ipc = |schema: &arrow::datatypes::Schema| -> Result<bytes::Bytes, Status> {
            let IpcMessage(bytes) = SchemaAsIpc::new(schema, &arrow::ipc::writer::IpcWriteOptions::default())
                .try_into()
                .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
            Ok(bytes)
        };
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: Handle { sql, params: Vec::new() }.encode()?,
            dataset_schema: ipc(df.schema().as_arrow())?,
            parameter_schema: ipc(&arrow::datatypes::Schema::new(parameter_fields))?,
        })
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        self.scope(&request)?;
        let mut handle = Handle::decode(&query.prepared_statement_handle)?;
        let stream = request.into_inner().map_err(FlightError::from);
        let mut batches = arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(stream);
        let mut bound = false;
        while let Some(batch) = batches.try_next().await.map_err(|e| Status::invalid_argument(e.to_string()))? {
            if bound || batch.num_rows() > 1 {
                return Err(Status::invalid_argument(
                    "bind one row of parameters to a query; run the statement once per row",
                ));
            }
            if batch.num_rows() == 1 {
                handle.params = first_row(&batch)?;
                bound = true;
            }
        }
        Ok(DoPutPreparedStatementResult { prepared_statement_handle: Some(handle.encode()?) })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let scope = self.scope(&request)?;
        let handle = Handle::decode(&query.prepared_statement_handle)?;
        let df = self.prepared(&scope, &handle).await?;
        let schema = df.schema().as_arrow().clone();
        Self::info_for(query.as_any(), &schema, request.into_inner())
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let scope = self.scope(&request)?;
        let handle = Handle::decode(&query.prepared_statement_handle)?;
        self.charge(&scope)?;
        let df = self.prepared(&scope, &handle).await?;
        Self::results(df).await
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        // Nothing is held on the server; the handle is checked so that garbage is refused.
        self.scope(&request)?;
        Handle::decode(&query.prepared_statement_handle).map(|_| ())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.scope(&request)?;
        let schema = query.into_builder().schema();
        Self::info_for(query.as_any(), &schema, request.into_inner())
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.scope(&request)?;
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        Ok(Self::batches(builder.schema(), builder.build()))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.scope(&request)?;
        let schema = query.clone().into_builder().schema();
        Self::info_for(query.as_any(), &schema, request.into_inner())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.scope(&request)?;
        let mut builder = query.into_builder();
        for s in ["public", "system"] {
            builder.append(CATALOG, s);
        }
        Ok(Self::batches(builder.schema(), builder.build()))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.scope(&request)?;
        let schema = query.clone().into_builder().schema();
        Self::info_for(query.as_any(), &schema, request.into_inner())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let scope = self.scope(&request)?;
        let tables = self.tables(&scope).await?;
        let mut builder = query.into_builder();
        for (schema_name, table, schema) in tables {
            let kind = if schema_name == "system" { "SYSTEM TABLE" } else { "TABLE" };
            builder.append(CATALOG, &schema_name, &table, kind, &schema).map_err(Status::from)?;
        }
        Ok(Self::batches(builder.schema(), builder.build()))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.scope(&request)?;
        Self::info_for(query.as_any(), &table_types_schema(), request.into_inner())
    }

    async fn do_get_table_types(
        &self,
        _query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.scope(&request)?;
        let schema = Arc::new(table_types_schema());
        let column = Arc::new(arrow::array::StringArray::from(vec!["SYSTEM TABLE", "TABLE"])) as arrow::array::ArrayRef;
        let batch = arrow::array::RecordBatch::try_new(schema.clone(), vec![column]);
        Ok(Self::batches(schema, batch))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.scope(&request)?;
        let schema = query.clone().into_builder(&self.info).schema();
        Self::info_for(query.as_any(), &schema, request.into_inner())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.scope(&request)?;
        let builder = query.into_builder(&self.info);
        Ok(Self::batches(builder.schema(), builder.build()))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_marks_become_numbered_placeholders_outside_quotes_and_comments() {
        assert_eq!(
            number_placeholders("SELECT '?', \"a?\" FROM t WHERE x = ? AND y > ? -- why?\nAND z = ?"),
            "SELECT '?', \"a?\" FROM t WHERE x = $1 AND y > $2 -- why?\nAND z = $3"
        );
        assert_eq!(number_placeholders("SELECT $1"), "SELECT $1");
    }

    #[test]
    fn a_handle_carries_its_statement_and_bound_values() -> Result<(), Status> {
        let h = Handle {
            sql: "SELECT $1, $2".into(),
            params: vec![ScalarValue::from("dev-1"), ScalarValue::Int64(Some(3))],
        };
        let back = Handle::decode(&h.encode()?)?;
        assert_eq!((back.sql.as_str(), back.params.len()), ("SELECT $1, $2", 2));
        assert_eq!(back.params[1], ScalarValue::Int64(Some(3)));
        assert!(Handle::decode(b"junk").is_err());
        assert!(Handle::decode(b"FPS1\xff\xff\xff\xffx").is_err());
        Ok(())
    }

    #[test]
    fn basic_credentials_decode() {
        assert_eq!(super::base64_decode("dXNlcjpzZWNyZXQ="), Some(b"user:secret".to_vec()));
        assert_eq!(super::base64_decode("!!"), None);
    }
}
