//! `ferrite ota keygen|sign`: the signing half of software updates.

use std::process::Command;

use ring::signature::{ED25519, UnparsedPublicKey};

fn ferrite(args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_ferrite")).args(args).output()?)
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()).collect()
}

#[test]
fn keygen_and_sign_make_a_manifest_a_device_can_verify() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("keys");
    let out = ferrite(&["ota", "keygen", "--out", keys.to_str().unwrap_or_default()])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(keys.join("ota.key"))?.permissions().mode() & 0o777, 0o600);
    }
    let again = ferrite(&["ota", "keygen", "--out", keys.to_str().unwrap_or_default()])?;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("would orphan every device"));

    let artifact = dir.path().join("firmware-2.4.bin");
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(&artifact, &bytes)?;
    let key = keys.join("ota.key");
    let args = ["ota", "sign", artifact.to_str().unwrap_or_default(), "--key", key.to_str().unwrap_or_default()];
    let out = ferrite(&[&args[..], &["--version", "2.4.0", "--device-type", "thermostat"]].concat())?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("firmware-2.4.bin.sig.json"))?)?;
    assert_eq!(manifest["size"], 200_000);
    assert_eq!((manifest["version"].as_str(), manifest["device_type"].as_str()), (Some("2.4.0"), Some("thermostat")));
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    assert_eq!(unhex(manifest["sha256"].as_str().unwrap_or_default()), digest.as_ref());
    let public = std::fs::read_to_string(keys.join("ota.pub"))?;
    assert_eq!(public.trim(), manifest["public_key"].as_str().unwrap_or_default());
    let key = UnparsedPublicKey::new(&ED25519, unhex(public.trim()));
    let signature = unhex(manifest["signature"].as_str().unwrap_or_default());
    assert!(key.verify(digest.as_ref(), &signature).is_ok(), "the signature is over the digest");
    let other = ring::digest::digest(&ring::digest::SHA256, b"another artifact");
    assert!(key.verify(other.as_ref(), &signature).is_err());

    // Not a key: a clear error, nothing written.
    let bad = ferrite(&[
        "ota",
        "sign",
        artifact.to_str().unwrap_or_default(),
        "--key",
        artifact.to_str().unwrap_or_default(),
    ])?;
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("is not an Ed25519 PKCS#8 key"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    Ok(())
}
