//! A command to one device and its lifecycle: `queued` (accepted, durable) → `sent`
//! (published at QoS 1 to the device's session) → `delivered` (the device's PUBACK) →
//! `succeeded` or `failed` (its answer on `devices/{id}/commands/result`), or `expired`
//! when its timeout passes first.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Where a command is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = CommandStatus)]
pub enum Status {
    /// Accepted and stored; waiting for the device's session.
    Queued,
    /// Published to the device, not yet acknowledged.
    Sent,
    /// Acknowledged by the device (PUBACK).
    Delivered,
    /// The device reported success.
    Succeeded,
    /// The device reported failure.
    Failed,
    /// No answer before its timeout.
    Expired,
}

impl Status {
    /// Its name in the API, the store and the `commands` stream.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Sent => "sent",
            Status::Delivered => "delivered",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Expired => "expired",
        }
    }

    /// Parses a stored status.
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "queued" => Status::Queued,
            "sent" => Status::Sent,
            "delivered" => Status::Delivered,
            "succeeded" => Status::Succeeded,
            "failed" => Status::Failed,
            "expired" => Status::Expired,
            other => return Err(format!("unknown command status {other:?}")),
        })
    }

    /// Whether nothing more happens to the command.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Expired)
    }
}

/// One command.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Command {
    /// Its id (a UUID), which the device echoes in its result.
    pub id: String,
    /// The device's tenant.
    pub tenant: String,
    /// The device.
    pub device_id: String,
    /// The command's name.
    pub name: String,
    /// Its parameters (checked against the device's type).
    pub params: Map<String, Value>,
    /// Where it is.
    pub status: Status,
    /// The device's answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    /// Who sent it (`user::"alice"`, `service::"rules"` for a rule).
    pub sender: String,
    /// Accepted, milliseconds since the epoch.
    pub created_at: i64,
    /// Last change.
    pub updated_at: i64,
    /// When it expires unless answered.
    pub expires_at: i64,
    /// A credential rotation's new secret: sent to the device in `params.client_secret`,
    /// never stored nor shown.
    #[serde(skip)]
    pub secret: Option<String>,
}

impl Command {
    /// What the device receives on `devices/{id}/commands`.
    pub fn message(&self) -> Vec<u8> {
        let mut params = self.params.clone();
        if let Some(s) = &self.secret {
            params.insert("client_secret".into(), Value::String(s.clone()));
        }
        serde_json::json!({"id": self.id, "name": self.name, "params": params}).to_string().into_bytes()
    }
}
