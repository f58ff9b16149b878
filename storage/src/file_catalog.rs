//! The file catalog: which Parquet files make up each stream's archive, and up to which
//! WAL sequence number each shard's data is in them. Rewritten atomically on every
//! persist, so a crash leaves either the old or the new catalog, never a mix.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::archive::ArchivedFile;
use crate::error::{Error, Result, io};

/// The catalog's content.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCatalog {
    /// Format version.
    pub version: u32,
    /// Per shard: every WAL entry with `seq <=` this is in the archive.
    pub persisted_upto: BTreeMap<u32, u64>,
    /// Per stream: its archive files.
    pub streams: BTreeMap<String, Vec<ArchivedFile>>,
}

impl FileCatalog {
    /// Loads the catalog at `path`; empty if the file does not exist.
    pub fn load(path: &Path) -> Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::CorruptCatalog { path: path.display().to_string(), message: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self { version: 1, ..Self::default() }),
            Err(e) => Err(io("read file catalog", path)(e)),
        }
    }

    /// Writes the catalog atomically.
    pub fn store(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec(self)
            .map_err(|e| Error::CorruptCatalog { path: path.display().to_string(), message: e.to_string() })?;
        ferrite_engine::catalog::write_atomic(path, &bytes).map_err(io("write file catalog", path))
    }
}
