//! `ferrite ota keygen|sign`: the signing half of software updates. A release is signed
//! offline with a key that never leaves the release machine; devices hold only the public
//! key and accept an artifact whose SHA-256 matches and whose Ed25519 signature over that
//! digest verifies (`firmware/core`'s `ota` module does the device side).
//!
//! - `ferrite ota keygen --out DIR` writes `DIR/ota.key` (PKCS#8, mode 0600) and
//!   `DIR/ota.pub` (the 32-byte public key, hex).
//! - `ferrite ota sign FILE --key DIR/ota.key [--version V] [--device-type T]` writes
//!   `FILE.sig.json`: `{"sha256", "signature", "public_key", "size", "version"?, "device_type"?}`
//!   (hex), the manifest an upload will carry.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ring::signature::{Ed25519KeyPair, KeyPair};

/// `ferrite ota ...`
#[derive(Debug, clap::Args)]
pub struct OtaArgs {
    #[command(subcommand)]
    command: OtaCommand,
}

#[derive(Debug, clap::Subcommand)]
enum OtaCommand {
    /// Make a signing key pair: DIR/ota.key (private, 0600) and DIR/ota.pub (public, hex).
    Keygen {
        /// Directory to write the keys to (created if missing; existing keys are kept).
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign an artifact: writes FILE.sig.json with its SHA-256 and the Ed25519 signature
    /// over that digest.
    Sign {
        /// The artifact.
        file: PathBuf,
        /// The private key (from `ferrite ota keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The software version the artifact installs.
        #[arg(long)]
        version: Option<String>,
        /// The device type it is for.
        #[arg(long)]
        device_type: Option<String>,
    },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `ferrite ota`.
pub fn ota(args: OtaArgs) -> anyhow::Result<()> {
    match args.command {
        OtaCommand::Keygen { out } => keygen(&out),
        OtaCommand::Sign { file, key, version, device_type } => {
            let manifest = sign(&file, &key, version.as_deref(), device_type.as_deref())?;
            let path = PathBuf::from(format!("{}.sig.json", file.display()));
            std::fs::write(&path, serde_json::to_vec_pretty(&manifest)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("{}", path.display());
            Ok(())
        }
    }
}

fn keygen(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let key_path = out.join("ota.key");
    anyhow::ensure!(
        !key_path.exists(),
        "{} exists: a new key would orphan every device provisioned with the old one; move it away first",
        key_path.display()
    );
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| anyhow::anyhow!("cannot generate a key"))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| anyhow::anyhow!("generated key unreadable"))?;
    write_private(&key_path, pkcs8.as_ref())?;
    let pub_path = out.join("ota.pub");
    std::fs::write(&pub_path, format!("{}\n", hex(pair.public_key().as_ref())))
        .with_context(|| format!("cannot write {}", pub_path.display()))?;
    println!("{}\n{}", key_path.display(), pub_path.display());
    Ok(())
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot create {}", path.display()))
}

/// The signed manifest of `file`.
fn sign(
    file: &Path,
    key: &Path,
    version: Option<&str>,
    device_type: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    let pkcs8 = std::fs::read(key).with_context(|| format!("cannot read the key {}", key.display()))?;
    let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| {
        anyhow::anyhow!("{} is not an Ed25519 PKCS#8 key (make one with `ferrite ota keygen`)", key.display())
    })?;
    let mut f = std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        ctx.update(&buf[..n]);
    }
    let digest = ctx.finish();
    let signature = pair.sign(digest.as_ref());
    let mut manifest = serde_json::json!({
        "sha256": hex(digest.as_ref()),
        "signature": hex(signature.as_ref()),
        "public_key": hex(pair.public_key().as_ref()),
        "size": size,
    });
    if let Some(v) = version {
        manifest["version"] = v.into();
    }
    if let Some(t) = device_type {
        manifest["device_type"] = t.into();
    }
    Ok(manifest)
}
