//! MQTT over WebSocket: `GET /mqtt` on the HTTP (and HTTPS) port, subprotocol `mqtt`, for
//! browsers and for devices behind proxies that pass only HTTP(S).
//!
//! The WebSocket's binary messages carry the MQTT byte stream (a packet may span messages,
//! and a message may hold several packets, as the MQTT specification allows); the session
//! behind it is the same as on the TCP listener, with the same limits, policies and
//! acknowledgement rules. An upgrade that does not offer the `mqtt` subprotocol is refused
//! with 400 and a message naming it; a text message closes the session (MQTT is binary).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use ferrite_engine::api_doc::ErrorBody;
use ferrite_engine::auth::ClientCertificate;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::mqtt::{Door, MAX_PACKET_BYTES, MqttFront, TransportIdentity};

/// The WebSocket subprotocol MQTT clients ask for (MQTT 3.1.1 §6, MQTT 5 §6).
pub const SUBPROTOCOL: &str = "mqtt";

/// Bytes buffered between the WebSocket and the session in each direction.
const BRIDGE_BYTES: usize = 64 * 1024;

#[derive(Clone)]
struct WsState {
    front: Arc<MqttFront>,
    door: Door,
}

/// The `/mqtt` route; `tls` says whether the listener serving it is HTTPS. It needs no
/// bearer token: the session authenticates in its CONNECT, as on the TCP listener.
pub fn router(front: Arc<MqttFront>, tls: bool) -> OpenApiRouter {
    let door = if tls { Door::Wss } else { Door::Ws };
    OpenApiRouter::new().routes(routes!(upgrade)).with_state(WsState { front, door })
}

/// Opens an MQTT session over WebSocket (subprotocol `mqtt`); it authenticates in its CONNECT.
#[utoipa::path(
    get,
    path = "/mqtt",
    tag = "mqtt",
    security(()),
    params(("Sec-WebSocket-Protocol" = String, Header, description = "Must offer `mqtt`")),
    responses(
        (status = 101, description = "Switched to WebSocket; binary messages carry the MQTT byte stream"),
        (status = 400, description = "Not a WebSocket upgrade, or the `mqtt` subprotocol was not offered", body = ErrorBody),
    ),
)]
async fn upgrade(
    State(state): State<WsState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    certificate: Option<Extension<ClientCertificate>>,
    ws: WebSocketUpgrade,
) -> Response {
    let ws = ws.protocols([SUBPROTOCOL]).max_message_size(MAX_PACKET_BYTES + 16);
    if ws.selected_protocol().is_none() {
        let body = axum::Json(ErrorBody::new(
            "websocket_subprotocol",
            "MQTT over WebSocket needs the `mqtt` subprotocol: send `Sec-WebSocket-Protocol: mqtt` \
             (MQTT client libraries do when their transport is websockets)",
        ));
        return (StatusCode::BAD_REQUEST, body).into_response();
    }
    // On HTTPS with mutual TLS, the handshake's verified device is the session's identity.
    let subject = certificate.map(|Extension(ClientCertificate(s))| s.to_string());
    ws.on_upgrade(move |socket| bridge(socket, state, peer, subject))
}

/// Carries bytes between the WebSocket and an MQTT session until either side ends.
async fn bridge(socket: WebSocket, state: WsState, peer: SocketAddr, certificate_subject: Option<String>) {
    let (client, server) = tokio::io::duplex(BRIDGE_BYTES);
    let (session_rd, session_wr) = tokio::io::split(server);
    state.front.spawn_session(
        session_rd,
        session_wr,
        peer,
        TransportIdentity { door: state.door, certificate_subject },
    );
    let (mut from_session, mut to_session) = tokio::io::split(client);
    let (mut sink, mut stream) = socket.split();
    let inbound = async move {
        while let Some(message) = stream.next().await {
            match message {
                Ok(Message::Binary(bytes)) => {
                    if to_session.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Ok(Message::Text(_)) => {
                    tracing::warn!(%peer, "mqtt over websocket: a text message; MQTT is carried in binary messages, closing");
                    break;
                }
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
            }
        }
        // The session reads the end of its stream and closes.
        let _ = to_session.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from_session.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.close().await;
    };
    tokio::pin!(inbound, outbound);
    tokio::select! {
        () = &mut outbound => {}
        () = &mut inbound => outbound.await,
    }
}
