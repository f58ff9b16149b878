//! Random secrets and identifiers, their hashes and constant-time checks: what plugins hand
//! out once (client secrets, provisioning secrets) and keep only the hash of.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};

/// `N` random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], String> {
    let mut out = [0u8; N];
    SystemRandom::new().fill(&mut out).map_err(|_| "the system random generator failed".to_owned())?;
    Ok(out)
}

/// A 256-bit random secret, URL-safe base64 (43 characters).
pub fn new_secret() -> Result<String, String> {
    Ok(URL_SAFE_NO_PAD.encode(random_bytes::<32>()?))
}

/// A 128-bit random identifier, URL-safe base64 (22 characters).
pub fn new_id() -> Result<String, String> {
    Ok(URL_SAFE_NO_PAD.encode(random_bytes::<16>()?))
}

/// The hex SHA-256 of a high-entropy secret or token (what a store keeps).
pub fn hash_secret(secret: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `secret` hashes to `expected_hash`, in time that does not depend on where they differ.
pub fn check_secret(secret: &str, expected_hash: &str) -> bool {
    let got = hash_secret(secret);
    got.len() == expected_hash.len()
        && got.bytes().zip(expected_hash.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_check_against_their_hash_only() -> Result<(), String> {
        let s = new_secret()?;
        assert_eq!(s.len(), 43);
        let h = hash_secret(&s);
        assert!(check_secret(&s, &h));
        assert!(!check_secret("wrong", &h));
        assert_ne!(new_secret()?, s);
        assert_eq!(new_id()?.len(), 22);
        Ok(())
    }
}
