//! The checkpoint file, `catalog/checkpoint.bin`: the engine's last consistent cut of the
//! shards and the rules' state at it (see `ferrite_engine::checkpoint`), written by the
//! persister before the catalog commit of the persist whose WAL cut it is.
//!
//! Layout (little endian): `magic u32 ("FCKP") | version u32 | crc32 u32 | body`, the crc
//! covering the body: `shards u64, cut u64 per shard, observers u64`, then per observer
//! `name, shared state, shards u64, state per shard`, each a `u64` length and its bytes.

use std::path::Path;

use ferrite_engine::{Checkpoint, ObserverState};

use crate::error::{Error, Result, io};

const MAGIC: u32 = 0x504B_4346; // "FCKP"
const VERSION: u32 = 1;

fn put(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    buf.extend_from_slice(bytes);
}

/// Encodes a checkpoint.
pub fn encode(c: &Checkpoint) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(c.cuts.len() as u64).to_le_bytes());
    for cut in &c.cuts {
        body.extend_from_slice(&cut.to_le_bytes());
    }
    body.extend_from_slice(&(c.states.len() as u64).to_le_bytes());
    for (name, state) in &c.states {
        put(&mut body, name.as_bytes());
        put(&mut body, &state.shared);
        body.extend_from_slice(&(state.shards.len() as u64).to_le_bytes());
        for s in &state.shards {
            put(&mut body, s);
        }
    }
    let mut out = Vec::with_capacity(body.len() + 12);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], &'static str> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.bytes.len()).ok_or("cut short")?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u64(&mut self) -> std::result::Result<u64, &'static str> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| "cut short")?))
    }

    fn bytes(&mut self) -> std::result::Result<&'a [u8], &'static str> {
        let n = usize::try_from(self.u64()?).map_err(|_| "a length too large")?;
        self.take(n)
    }
}

/// Decodes a checkpoint; `path` names the file in errors.
pub fn decode(bytes: &[u8], path: &Path) -> Result<Checkpoint> {
    let bad = |message: &str| Error::CorruptCatalog { path: path.display().to_string(), message: message.to_owned() };
    if bytes.len() < 12 || bytes[0..4] != MAGIC.to_le_bytes() {
        return Err(bad("not a checkpoint file"));
    }
    if bytes[4..8] != VERSION.to_le_bytes() {
        return Err(bad("a checkpoint of another version"));
    }
    let body = &bytes[12..];
    if bytes[8..12] != crc32fast::hash(body).to_le_bytes() {
        return Err(bad("checksum mismatch"));
    }
    let mut r = Reader { bytes: body, pos: 0 };
    let parse = |r: &mut Reader<'_>| -> std::result::Result<Checkpoint, &'static str> {
        let shards = usize::try_from(r.u64()?).map_err(|_| "too many shards")?;
        if shards > body.len() / 8 {
            return Err("too many shards");
        }
        let cuts = (0..shards).map(|_| r.u64()).collect::<std::result::Result<Vec<_>, _>>()?;
        let mut c = Checkpoint { cuts, ..Checkpoint::default() };
        for _ in 0..r.u64()? {
            let name = std::str::from_utf8(r.bytes()?).map_err(|_| "a name that is not UTF-8")?.to_owned();
            let shared = r.bytes()?.to_vec();
            let n = r.u64()?;
            if n as usize > body.len() {
                return Err("too many shard states");
            }
            let shards = (0..n).map(|_| r.bytes().map(<[u8]>::to_vec)).collect::<std::result::Result<Vec<_>, _>>()?;
            c.states.insert(name, ObserverState { shared, shards });
        }
        Ok(c)
    };
    parse(&mut r).map_err(bad)
}

/// Reads the checkpoint file; `None` when there is none.
pub fn load(path: &Path) -> Result<Option<Checkpoint>> {
    match std::fs::read(path) {
        Ok(bytes) => decode(&bytes, path).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read checkpoint", path)(e)),
    }
}

/// Writes the checkpoint file durably: temporary file, fsync, rename, directory fsync.
pub fn store(path: &Path, c: &Checkpoint) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("create catalog dir", dir))?;
    let tmp = path.with_extension("bin.tmp");
    std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(&encode(c))?;
            f.sync_all()
        })
        .map_err(io("write checkpoint", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename checkpoint", path))?;
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io("sync catalog dir", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() -> anyhow::Result<()> {
        let mut c = Checkpoint { cuts: vec![7, 0, 12], ..Checkpoint::default() };
        c.states
            .insert("rules".into(), ObserverState { shared: vec![1, 2], shards: vec![vec![], vec![3], vec![4, 5]] });
        let bytes = encode(&c);
        let path = Path::new("checkpoint.bin");
        assert_eq!(decode(&bytes, path)?, c);
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x40;
            assert!(decode(&damaged, path).is_err(), "a flipped byte at {i} was read");
        }
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut], path).is_err(), "a file cut at {cut} was read");
        }
        Ok(())
    }
}
