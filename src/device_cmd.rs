//! `ferrite device add|import|list|show|disable|enable|approve|rotate|remove|purge`: the device
//! registry of a running server, through its HTTP API.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::{Value, json};

use crate::identity_cmd::{Remote, print};

/// `ferrite device ...`
#[derive(Debug, clap::Args)]
pub struct DeviceArgs {
    #[command(subcommand)]
    command: DeviceCommand,
}

#[derive(Debug, clap::Subcommand)]
enum DeviceCommand {
    /// Register a device; prints it with its credentials (the secret is shown once).
    Add {
        /// Its id (default: a UUID).
        #[arg(long)]
        id: Option<String>,
        /// A human name.
        #[arg(long)]
        name: Option<String>,
        /// Its type.
        #[arg(long = "type")]
        device_type: Option<String>,
        /// `none`, `semi` or `full` (default).
        #[arg(long)]
        level: Option<String>,
        /// The gateway it is behind.
        #[arg(long)]
        parent: Option<String>,
        /// Groups, comma-separated.
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Tags, comma-separated.
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        /// Firmware version.
        #[arg(long)]
        firmware: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Register many devices from a JSON array or a CSV file (by its extension); prints what
    /// was created, what was refused and why, and the new credentials.
    Import {
        /// `devices.json` or `devices.csv`.
        file: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
    /// List devices (filters: --type, --status, --group, --tag, --parent, --online).
    List {
        /// Only this type.
        #[arg(long = "type")]
        device_type: Option<String>,
        /// Only `pending`, `active` or `disabled` devices.
        #[arg(long)]
        status: Option<String>,
        /// Only members of this group.
        #[arg(long)]
        group: Option<String>,
        /// Only devices with this tag.
        #[arg(long)]
        tag: Option<String>,
        /// Only children of this gateway.
        #[arg(long)]
        parent: Option<String>,
        /// Only online (true) or offline (false) devices.
        #[arg(long)]
        online: Option<bool>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show one device.
    Show {
        /// Its id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Disable a device: its sessions end at once and it is refused until enabled.
    Disable {
        /// Its id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Enable a disabled device.
    Enable {
        /// Its id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Approve a device that registered itself (pending).
    Approve {
        /// Its id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Give a device a new secret (the old one stops working at once); printed once.
    Rotate {
        /// Its id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Decommission a device: its credentials are revoked; its data stays unless `--purge`.
    Remove {
        /// Its id.
        id: String,
        /// Also delete its rows from every stream of the tenant (the audit trail stays).
        #[arg(long)]
        purge: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Delete a device's rows from every stream of the tenant (a data-subject request); the
    /// device, registered or not, stays as it is.
    Purge {
        /// Its id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
}

/// Adds `key=value` to a query string when the value is set.
fn param(query: &mut Vec<String>, key: &str, value: Option<String>) {
    if let Some(v) = value {
        let encoded: String = v
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        query.push(format!("{key}={encoded}"));
    }
}

/// Runs `ferrite device ...`.
pub fn device(args: DeviceArgs) -> anyhow::Result<()> {
    match args.command {
        DeviceCommand::Add { id, name, device_type, level, parent, groups, tags, firmware, remote } => {
            let mut body = json!({"id": id, "name": name, "type": device_type, "level": level, "parent": parent,
                                  "firmware": firmware});
            if !groups.is_empty() {
                body["groups"] = json!(groups);
            }
            if !tags.is_empty() {
                body["tags"] = json!(tags);
            }
            if let Some(o) = body.as_object_mut() {
                o.retain(|_, v| !v.is_null());
            }
            print(&remote.call("POST", "/api/v1/devices", Some(body))?)
        }
        DeviceCommand::Import { file, remote } => {
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let csv = file.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"));
            let content_type = if csv { "text/csv" } else { "application/json" };
            let report = remote.send("POST", "/api/v1/devices/import", content_type, bytes)?;
            print(&report)?;
            let failed = report["failed"].as_array().map_or(0, Vec::len);
            eprintln!("{} created, {failed} refused", report["created"]);
            Ok(())
        }
        DeviceCommand::List { device_type, status, group, tag, parent, online, remote } => {
            let mut query = Vec::new();
            param(&mut query, "type", device_type);
            param(&mut query, "status", status);
            param(&mut query, "group", group);
            param(&mut query, "tag", tag);
            param(&mut query, "parent", parent);
            param(&mut query, "online", online.map(|o| o.to_string()));
            // Every page, following `next`.
            let mut all: Vec<Value> = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let mut q = query.clone();
                param(&mut q, "after", after.take());
                let page = remote.call("GET", &format!("/api/v1/devices?{}", q.join("&")), None)?;
                all.extend(page["devices"].as_array().cloned().unwrap_or_default());
                match page["next"].as_str() {
                    Some(n) => after = Some(n.to_owned()),
                    None => break,
                }
            }
            print(&Value::Array(all))
        }
        DeviceCommand::Show { id, remote } => print(&remote.call("GET", &format!("/api/v1/devices/{id}"), None)?),
        DeviceCommand::Disable { id, remote } => act(&remote, &id, "disable"),
        DeviceCommand::Enable { id, remote } => act(&remote, &id, "enable"),
        DeviceCommand::Approve { id, remote } => act(&remote, &id, "approve"),
        DeviceCommand::Rotate { id, remote } => act(&remote, &id, "rotate"),
        DeviceCommand::Remove { id, purge: false, remote } => {
            remote.call("DELETE", &format!("/api/v1/devices/{id}"), None)?;
            println!("removed {id}");
            Ok(())
        }
        DeviceCommand::Remove { id, purge: true, remote } => {
            print(&remote.call("DELETE", &format!("/api/v1/devices/{id}?purge=true"), None)?)
        }
        DeviceCommand::Purge { id, remote } => act(&remote, &id, "purge"),
    }
}

fn act(remote: &Remote, id: &str, action: &str) -> anyhow::Result<()> {
    print(&remote.call("POST", &format!("/api/v1/devices/{id}/{action}"), Some(json!({})))?)
}
