//! The stream catalog: every stream's schema, learned on write and persisted under the data
//! directory so that it survives restarts.
//!
//! Invariants every other component may assume:
//! - a stream's columns are only ever added, never removed or renamed; the one change of
//!   type is widening an integer column to float ([`StreamCatalog::widen_field`]), so a
//!   reader of older data casts integers to floats, never the other way;
//! - every stream starts with `time` (UTC nanoseconds, non-null) and `device_id` (string,
//!   non-null), and every other column is nullable;
//! - the first writer of a field decides its type; later values of another type are
//!   rejected by the decoder with [`Error::TypeConflict`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::batch::{DEVICE_COLUMN, TIME_COLUMN, time_field_type};
use crate::error::{Error, Result};
use crate::ids::StreamName;

/// Streams the platform writes itself (the audit trail, API usage): they do not count
/// against `max_streams`, so that users keep every place the limit gives them.
pub const PLATFORM_STREAMS: &[&str] = &[crate::auth::AUDIT_STREAM, crate::usage::USAGE_STREAM];

/// Most columns a stream may have by default, so that a buggy device cannot create
/// unbounded schemas.
pub const MAX_FIELDS_PER_STREAM: usize = 1024;

/// Most streams a catalog holds by default.
pub const MAX_STREAMS: usize = 1000;

/// What clients can grow the catalog to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogLimits {
    /// Streams in all (derived streams included).
    pub max_streams: usize,
    /// Field columns per stream.
    pub max_fields_per_stream: usize,
}

impl Default for CatalogLimits {
    fn default() -> Self {
        Self { max_streams: MAX_STREAMS, max_fields_per_stream: MAX_FIELDS_PER_STREAM }
    }
}

/// Type of a field column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// 64-bit float (JSON numbers, line-protocol floats).
    Float,
    /// 64-bit signed integer (line-protocol `i` values).
    Int,
    /// 64-bit unsigned integer (line-protocol `u` values).
    UInt,
    /// Boolean.
    Bool,
    /// UTF-8 string (JSON strings, line-protocol strings and tags).
    String,
    /// UTC timestamp in nanoseconds (columns of derived streams, e.g. a window's end).
    Timestamp,
}

impl FieldType {
    /// The Arrow type of a column of this field type.
    pub fn data_type(self) -> DataType {
        match self {
            FieldType::Float => DataType::Float64,
            FieldType::Int => DataType::Int64,
            FieldType::UInt => DataType::UInt64,
            FieldType::Bool => DataType::Boolean,
            FieldType::String => DataType::Utf8,
            FieldType::Timestamp => crate::batch::time_field_type(),
        }
    }

    /// The name used in error messages and the API.
    pub fn name(self) -> &'static str {
        match self {
            FieldType::Float => "float",
            FieldType::Int => "integer",
            FieldType::UInt => "unsigned integer",
            FieldType::Bool => "boolean",
            FieldType::String => "string",
            FieldType::Timestamp => "timestamp",
        }
    }
}

/// One stream's schema: its field columns in order of first appearance.
#[derive(Debug, Clone)]
pub struct StreamSchema {
    /// The stream.
    pub name: StreamName,
    /// Field columns (excluding `time` and `device_id`), in column order.
    pub fields: Vec<(Arc<str>, FieldType)>,
    /// The Arrow schema: `time`, `device_id`, then the fields.
    pub arrow: SchemaRef,
    /// Incremented on every change; lets decoders cache a snapshot cheaply.
    pub version: u64,
}

impl StreamSchema {
    fn new(name: StreamName, fields: Vec<(Arc<str>, FieldType)>, version: u64) -> Self {
        let mut columns = Vec::with_capacity(fields.len() + 2);
        columns.push(Field::new(TIME_COLUMN, time_field_type(), false));
        columns.push(Field::new(DEVICE_COLUMN, DataType::Utf8, false));
        columns.extend(fields.iter().map(|(n, t)| Field::new(n.as_ref(), t.data_type(), true)));
        Self { name, fields, arrow: Arc::new(Schema::new(columns)), version }
    }

    /// Type of field `name`, if the stream has it.
    pub fn field_type(&self, name: &str) -> Option<FieldType> {
        self.fields.iter().find(|(n, _)| n.as_ref() == name).map(|(_, t)| *t)
    }

    /// Position of field `name` among the fields (column index minus 2).
    pub fn field_index(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|(n, _)| n.as_ref() == name)
    }
}

#[derive(Serialize, Deserialize)]
struct CatalogFile {
    version: u32,
    streams: BTreeMap<String, Vec<CatalogField>>,
    /// Settings per stream key; absent in catalogs written before settings existed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    settings: BTreeMap<String, StreamSettings>,
}

/// A stream's settings other than its schema, set by a rule file's `stream` declaration or
/// through the API; a stream may have settings before it has data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSettings {
    /// How long rows are kept, by event time, in seconds; `None` keeps them for ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_secs: Option<u64>,
    /// Fields the stream declares (`field NAME TYPE` in its declaration): their type is
    /// fixed (a value of another type is refused, an integer field is never widened), and
    /// they carry a unit and a tag flag.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, DeclaredField>,
    /// The one line-protocol tag that names the device (`device_tag NAME` in its
    /// declaration), instead of `device_id`, `host` and the configured tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_tag: Option<String>,
    /// The device of a line-protocol line without a device tag (`default_device 'ID'`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_device: Option<String>,
}

/// A schema's fields, in order.
type Fields = Vec<(Arc<str>, FieldType)>;

/// A declared field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclaredField {
    /// Its type.
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// Its unit (`celsius`, `kWh`), for readers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Whether it is a tag: a string that names what a reading is about (a site, a line),
    /// grouped and filtered on rather than measured.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tag: bool,
}

/// The shortest retention: the archive is partitioned by hour, and a retention drops whole
/// hours.
pub const MIN_RETENTION: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Serialize, Deserialize)]
struct CatalogField {
    name: String,
    #[serde(rename = "type")]
    ty: FieldType,
}

/// All streams and their schemas; cheap to read concurrently, written only when a stream
/// or a field appears for the first time.
pub struct StreamCatalog {
    path: Option<PathBuf>,
    streams: RwLock<BTreeMap<StreamName, Arc<StreamSchema>>>,
    /// Lock order: `streams` before `settings`.
    settings: RwLock<BTreeMap<StreamName, StreamSettings>>,
    /// Fields widened so far (see [`StreamCatalog::widenings`]).
    widened: std::sync::atomic::AtomicU64,
    limits: RwLock<CatalogLimits>,
}

impl std::fmt::Debug for StreamCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamCatalog").field("path", &self.path).finish()
    }
}

impl StreamCatalog {
    /// A catalog kept only in memory (tests, tools).
    pub fn in_memory() -> Self {
        Self {
            path: None,
            streams: RwLock::new(BTreeMap::new()),
            settings: RwLock::default(),
            widened: std::sync::atomic::AtomicU64::new(0),
            limits: RwLock::default(),
        }
    }

    /// Opens (or creates) the catalog stored at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let mut streams = BTreeMap::new();
        let mut settings = BTreeMap::new();
        match std::fs::read(path) {
            Ok(bytes) => {
                let file: CatalogFile = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::CatalogCorrupt { path: path.display().to_string(), message: e.to_string() })?;
                for (name, fields) in file.streams {
                    let stream = StreamName::from_key(&name).map_err(|e| Error::CatalogCorrupt {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    })?;
                    let fields = fields.into_iter().map(|f| (Arc::from(f.name.as_str()), f.ty)).collect();
                    streams.insert(stream.clone(), Arc::new(StreamSchema::new(stream, fields, 1)));
                }
                for (name, set) in file.settings {
                    let stream = StreamName::from_key(&name).map_err(|e| Error::CatalogCorrupt {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    })?;
                    settings.insert(stream, set);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::CatalogIo { path: path.display().to_string(), source }),
        }
        Ok(Self {
            path: Some(path.to_owned()),
            streams: RwLock::new(streams),
            settings: RwLock::new(settings),
            widened: std::sync::atomic::AtomicU64::new(0),
            limits: RwLock::default(),
        })
    }

    /// Sets the bounds on streams and fields (existing ones over them stay). The platform's
    /// own streams ([`PLATFORM_STREAMS`]) are not counted against `max_streams`.
    pub fn set_limits(&self, limits: CatalogLimits) {
        *self.limits.write() = limits;
    }

    fn check_new_stream(&self, streams: &BTreeMap<StreamName, Arc<StreamSchema>>, stream: &StreamName) -> Result<()> {
        // The platform's own streams are never refused, and do not take users' places.
        if PLATFORM_STREAMS.contains(&stream.local()) {
            return Ok(());
        }
        let limit = self.limits.read().max_streams;
        let users = streams.keys().filter(|s| !PLATFORM_STREAMS.contains(&s.local())).count();
        if users >= limit {
            return Err(Error::TooManyStreams { stream: stream.to_string(), limit });
        }
        Ok(())
    }

    /// The schema of `stream`, if it exists.
    pub fn get(&self, stream: &StreamName) -> Option<Arc<StreamSchema>> {
        self.streams.read().get(stream).cloned()
    }

    /// The schema of the stream keyed `key` (`name`, or `tenant/name`), if it exists.
    pub fn get_by_name(&self, key: &str) -> Option<Arc<StreamSchema>> {
        let stream = StreamName::from_key(key).ok()?;
        self.get(&stream)
    }

    /// The schema of stream `name` of `tenant`, if it exists.
    pub fn get_in(&self, tenant: &str, name: &str) -> Option<Arc<StreamSchema>> {
        self.get(&StreamName::in_tenant(tenant, name).ok()?)
    }

    /// Every stream and its schema, ordered by key.
    pub fn list(&self) -> Vec<Arc<StreamSchema>> {
        self.streams.read().values().cloned().collect()
    }

    /// The streams of `tenant`, ordered by name.
    pub fn list_in(&self, tenant: &str) -> Vec<Arc<StreamSchema>> {
        self.streams.read().values().filter(|s| s.name.tenant() == tenant).cloned().collect()
    }

    /// Returns the stream's schema, creating the stream with no fields if it is new.
    pub fn ensure_stream(&self, stream: &StreamName) -> Result<Arc<StreamSchema>> {
        if let Some(s) = self.get(stream) {
            return Ok(s);
        }
        let mut streams = self.streams.write();
        if let Some(s) = streams.get(stream) {
            return Ok(s.clone());
        }
        self.check_new_stream(&streams, stream)?;
        let schema = Arc::new(StreamSchema::new(stream.clone(), Vec::new(), 1));
        streams.insert(stream.clone(), schema.clone());
        self.persist(&streams)?;
        Ok(schema)
    }

    /// Returns the type of `field` in `stream`, adding the field with type `proposed` if the
    /// stream does not have it yet. Returns the schema after the call and the field's type.
    pub fn resolve_field(
        &self,
        stream: &StreamName,
        field: &str,
        proposed: FieldType,
    ) -> Result<(Arc<StreamSchema>, FieldType)> {
        if let Some(s) = self.get(stream)
            && let Some(t) = s.field_type(field)
        {
            return Ok((s, t));
        }
        validate_field_name(stream, field)?;
        let mut streams = self.streams.write();
        let current = match streams.get(stream) {
            Some(s) => s.clone(),
            None => {
                self.check_new_stream(&streams, stream)?;
                Arc::new(StreamSchema::new(stream.clone(), Vec::new(), 0))
            }
        };
        if let Some(t) = current.field_type(field) {
            return Ok((current, t));
        }
        let limit = self.limits.read().max_fields_per_stream;
        if current.fields.len() >= limit {
            return Err(Error::TooManyFields { stream: stream.to_string(), field: field.to_owned(), limit });
        }
        let mut fields = current.fields.clone();
        fields.push((Arc::from(field), proposed));
        let next = Arc::new(StreamSchema::new(stream.clone(), fields, current.version + 1));
        streams.insert(stream.clone(), next.clone());
        self.persist(&streams)?;
        tracing::info!(stream = %stream, field, r#type = proposed.name(), "new field");
        Ok((next, proposed))
    }

    /// The settings of `stream` (defaults when none were set).
    pub fn settings(&self, stream: &StreamName) -> StreamSettings {
        self.settings.read().get(stream).cloned().unwrap_or_default()
    }

    /// How long `stream` keeps rows; `None` for ever.
    pub fn retention(&self, stream: &StreamName) -> Option<std::time::Duration> {
        self.settings.read().get(stream).and_then(|s| s.retention_secs).map(std::time::Duration::from_secs)
    }

    /// The line-protocol device tag and default device `stream` declares, if any.
    pub fn device_naming(&self, stream: &StreamName) -> (Option<Arc<str>>, Option<Arc<str>>) {
        match self.settings.read().get(stream) {
            Some(s) => (s.device_tag.as_deref().map(Arc::from), s.default_device.as_deref().map(Arc::from)),
            None => (None, None),
        }
    }

    /// Sets (or with `None` removes) the device tag and default device of `stream`, durably.
    /// A default device must be a valid device id.
    pub fn set_device_naming(
        &self,
        stream: &StreamName,
        device_tag: Option<&str>,
        default_device: Option<&str>,
    ) -> Result<()> {
        if let Some(t) = device_tag
            && (t.is_empty() || t.len() > 256 || t.chars().any(char::is_control))
        {
            return Err(Error::InvalidSetting {
                stream: stream.to_string(),
                message: format!("device_tag {t:?} is not a tag name"),
            });
        }
        if let Some(d) = default_device {
            crate::ids::validate_device_id(d).map_err(|e| Error::InvalidSetting {
                stream: stream.to_string(),
                message: format!("default_device {d:?}: {e}"),
            })?;
        }
        self.change_settings(stream, |s| {
            s.device_tag = device_tag.map(str::to_owned);
            s.default_device = default_device.map(str::to_owned);
        })?;
        tracing::info!(stream = %stream, device_tag, default_device, "stream device naming set");
        Ok(())
    }

    /// Changes the settings of `stream` and persists them; restores them when that fails.
    fn change_settings(&self, stream: &StreamName, change: impl FnOnce(&mut StreamSettings)) -> Result<()> {
        let streams = self.streams.write();
        let mut settings = self.settings.write();
        let before = settings.get(stream).cloned();
        let entry = settings.entry(stream.clone()).or_default();
        change(entry);
        if *entry == StreamSettings::default() {
            settings.remove(stream);
        }
        drop(settings);
        if let Err(e) = self.persist(&streams) {
            let mut settings = self.settings.write();
            match before {
                Some(b) => settings.insert(stream.clone(), b),
                None => settings.remove(stream),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Every stream with a retention, and that retention.
    pub fn retentions(&self) -> Vec<(StreamName, std::time::Duration)> {
        let settings = self.settings.read();
        settings
            .iter()
            .filter_map(|(k, s)| s.retention_secs.map(|r| (k.clone(), std::time::Duration::from_secs(r))))
            .collect()
    }

    /// Sets (or with `None` removes) the retention of `stream`, durably. A retention under
    /// [`MIN_RETENTION`] is refused.
    pub fn set_retention(&self, stream: &StreamName, retention: Option<std::time::Duration>) -> Result<()> {
        if let Some(r) = retention
            && r < MIN_RETENTION
        {
            return Err(Error::InvalidSetting {
                stream: stream.to_string(),
                message: format!(
                    "retention {} is shorter than the archive's hour partitions; use at least 1h",
                    crate::clock::format_duration(r)
                ),
            });
        }
        self.change_settings(stream, |s| s.retention_secs = retention.map(|r| r.as_secs()))?;
        tracing::info!(stream = %stream, retention = ?retention, "stream retention set");
        Ok(())
    }

    /// Declares fields of `stream` (creating it, and its fields, when missing): each takes
    /// its declared type, unit and tag flag. A field the stream already holds with another
    /// type is refused, saying which (its files were written with that type); an integer
    /// field declared `float` is widened, as a fraction would. The declarations replace the
    /// stream's earlier ones.
    pub fn declare(&self, stream: &StreamName, declared: BTreeMap<String, DeclaredField>) -> Result<Arc<StreamSchema>> {
        let mut streams = self.streams.write();
        let existed = streams.contains_key(stream);
        let current = match streams.get(stream) {
            Some(s) => s.clone(),
            None => {
                self.check_new_stream(&streams, stream)?;
                Arc::new(StreamSchema::new(stream.clone(), Vec::new(), 0))
            }
        };
        let (fields, grew) = self.plan_declaration(stream, &current, &declared)?;
        let changed = grew || !existed;
        let next = if changed {
            Arc::new(StreamSchema::new(stream.clone(), fields, current.version + 1))
        } else {
            current.clone()
        };
        let before = self.settings.read().get(stream).cloned();
        {
            let mut settings = self.settings.write();
            let entry = settings.entry(stream.clone()).or_default();
            entry.fields = declared;
            if *entry == StreamSettings::default() {
                settings.remove(stream);
            }
        }
        let widened = next.fields.iter().zip(current.fields.iter()).any(|(a, b)| a.1 != b.1);
        streams.insert(stream.clone(), next.clone());
        if let Err(e) = self.persist(&streams) {
            if existed {
                streams.insert(stream.clone(), current);
            } else {
                streams.remove(stream);
            }
            let mut settings = self.settings.write();
            match before {
                Some(b) => settings.insert(stream.clone(), b),
                None => settings.remove(stream),
            };
            return Err(e);
        }
        if widened {
            self.widened.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        tracing::info!(stream = %stream, fields = next.fields.len(), "stream fields declared");
        Ok(next)
    }

    /// Checks that `declared` fits `stream` as it is (the check [`StreamCatalog::declare`]
    /// makes), changing nothing: a rule file is checked whole before any of it applies.
    pub fn check_declaration(&self, stream: &StreamName, declared: &BTreeMap<String, DeclaredField>) -> Result<()> {
        let current = self.get(stream).unwrap_or_else(|| Arc::new(StreamSchema::new(stream.clone(), Vec::new(), 0)));
        self.plan_declaration(stream, &current, declared).map(|_| ())
    }

    /// The fields of `current` once `declared` applies, and whether they changed; or why
    /// the declaration does not fit.
    fn plan_declaration(
        &self,
        stream: &StreamName,
        current: &StreamSchema,
        declared: &BTreeMap<String, DeclaredField>,
    ) -> Result<(Fields, bool)> {
        let mut fields = current.fields.clone();
        let mut changed = false;
        for (name, d) in declared {
            validate_field_name(stream, name)?;
            if d.tag && d.ty != FieldType::String {
                return Err(Error::InvalidSetting {
                    stream: stream.to_string(),
                    message: format!("field `{name}` is a tag, so it must be a string (declared {})", d.ty.name()),
                });
            }
            match fields.iter_mut().find(|(n, _)| n.as_ref() == name.as_str()) {
                Some((_, t)) if *t == d.ty => {}
                Some((_, t)) if matches!(*t, FieldType::Int | FieldType::UInt) && d.ty == FieldType::Float => {
                    *t = FieldType::Float;
                    changed = true;
                }
                Some((_, t)) => {
                    return Err(Error::InvalidSetting {
                        stream: stream.to_string(),
                        message: format!(
                            "field `{name}` is declared {}, but the stream already holds it as {} (its files \
                             were written so): declare it {}, or give the new meaning a new field name",
                            d.ty.name(),
                            t.name(),
                            t.name()
                        ),
                    });
                }
                None => {
                    let limit = self.limits.read().max_fields_per_stream;
                    if fields.len() >= limit {
                        return Err(Error::TooManyFields { stream: stream.to_string(), field: name.clone(), limit });
                    }
                    fields.push((Arc::from(name.as_str()), d.ty));
                    changed = true;
                }
            }
        }
        Ok((fields, changed))
    }

    /// The declared field `field` of `stream`, if it is declared.
    pub fn declared(&self, stream: &StreamName, field: &str) -> Option<DeclaredField> {
        self.settings.read().get(stream).and_then(|s| s.fields.get(field).cloned())
    }

    /// Widens integer field `field` of `stream` to float (a JSON field first seen as an
    /// integer that later receives a fraction). Data written before stays as it is; readers
    /// cast it. Returns the schema after the call; a field already float is left alone, any
    /// other type is a [`Error::TypeConflict`].
    pub fn widen_field(&self, stream: &StreamName, field: &str) -> Result<Arc<StreamSchema>> {
        let mut streams = self.streams.write();
        let Some(current) = streams.get(stream).cloned() else {
            return Err(Error::InvalidSetting { stream: stream.to_string(), message: format!("no field `{field}`") });
        };
        match current.field_type(field) {
            Some(FieldType::Float) => return Ok(current),
            // A declared integer stays one: the value is refused, not the field changed.
            Some(t @ (FieldType::Int | FieldType::UInt)) if self.declared(stream, field).is_some() => {
                return Err(Error::TypeConflict {
                    stream: stream.to_string(),
                    field: field.to_owned(),
                    expected: t.name(),
                    found: FieldType::Float.name(),
                });
            }
            Some(FieldType::Int | FieldType::UInt) => {}
            Some(other) => {
                return Err(Error::TypeConflict {
                    stream: stream.to_string(),
                    field: field.to_owned(),
                    expected: other.name(),
                    found: FieldType::Float.name(),
                });
            }
            None => {
                return Err(Error::InvalidSetting {
                    stream: stream.to_string(),
                    message: format!("no field `{field}`"),
                });
            }
        }
        let fields = current
            .fields
            .iter()
            .map(|(n, t)| (n.clone(), if n.as_ref() == field { FieldType::Float } else { *t }))
            .collect();
        let next = Arc::new(StreamSchema::new(stream.clone(), fields, current.version + 1));
        streams.insert(stream.clone(), next.clone());
        if let Err(e) = self.persist(&streams) {
            streams.insert(stream.clone(), current);
            return Err(e);
        }
        self.widened.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(stream = %stream, field, "field widened from integer to float");
        Ok(next)
    }

    /// Bumped by every [`StreamCatalog::widen_field`]: whoever planned against a schema
    /// (rules) checks it to re-plan.
    pub fn widenings(&self) -> u64 {
        self.widened.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn persist(&self, streams: &BTreeMap<StreamName, Arc<StreamSchema>>) -> Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let settings = self.settings.read().iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let file = CatalogFile {
            settings,
            version: 1,
            streams: streams
                .iter()
                .map(|(name, s)| {
                    let fields = s.fields.iter().map(|(n, t)| CatalogField { name: n.to_string(), ty: *t }).collect();
                    (name.to_string(), fields)
                })
                .collect(),
        };
        let io = |source| Error::CatalogIo { path: path.display().to_string(), source };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| io(std::io::Error::other(e)))?;
        write_atomic(path, &bytes).map_err(io)
    }
}

/// Writes `bytes` to `path` so that readers see either the old or the new content, and the
/// new content survives a crash once this returns: temporary file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

fn validate_field_name(stream: &StreamName, field: &str) -> Result<()> {
    let reason = if field.is_empty() {
        Some("must not be empty")
    } else if field.len() > 128 {
        Some("longer than 128 bytes")
    } else if field == TIME_COLUMN || field == DEVICE_COLUMN {
        Some("reserved column name")
    } else if field.chars().any(|c| c.is_control()) {
        Some("control characters are not allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidFieldName { stream: stream.to_string(), field: field.to_owned(), reason }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_and_persists_fields() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Commit(e.to_string()))?;
        let path = dir.path().join("streams.json");
        let s = StreamName::new("telemetry")?;
        {
            let c = StreamCatalog::open(&path)?;
            let (_, t) = c.resolve_field(&s, "temperature", FieldType::Float)?;
            assert_eq!(t, FieldType::Float);
            // The first writer decides; a later proposal does not change the type.
            let (schema, t) = c.resolve_field(&s, "temperature", FieldType::String)?;
            assert_eq!(t, FieldType::Float);
            c.resolve_field(&s, "door", FieldType::String)?;
            assert_eq!(schema.arrow.fields().len(), 3);
        }
        let c = StreamCatalog::open(&path)?;
        let schema = c.get(&s).ok_or(Error::ShuttingDown)?;
        assert_eq!(schema.fields.len(), 2);
        assert_eq!(schema.field_type("door"), Some(FieldType::String));
        assert_eq!(schema.arrow.field(0).name(), "time");
        Ok(())
    }

    #[test]
    fn the_platforms_streams_take_no_place_under_max_streams() -> Result<()> {
        let c = StreamCatalog::in_memory();
        c.set_limits(CatalogLimits { max_streams: 1, max_fields_per_stream: 8 });
        c.ensure_stream(&StreamName::new("api_usage")?)?;
        c.ensure_stream(&StreamName::new("audit")?)?;
        c.ensure_stream(&StreamName::new("telemetry")?)?;
        let refused = c.ensure_stream(&StreamName::new("power")?);
        assert!(matches!(refused, Err(Error::TooManyStreams { limit: 1, .. })), "{refused:?}");
        Ok(())
    }

    #[test]
    fn rejects_reserved_field() {
        let c = StreamCatalog::in_memory();
        let s = StreamName::new("t").ok();
        let r = s.map(|s| c.resolve_field(&s, "time", FieldType::Float));
        assert!(matches!(r, Some(Err(Error::InvalidFieldName { .. }))));
    }
}
