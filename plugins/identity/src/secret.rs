//! Random secrets, their hashes and constant-time checks; argon2id for passwords.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::{Error, Result};

/// `n` random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    SystemRandom::new().fill(&mut out).map_err(|_| Error::Key("the system random generator failed".into()))?;
    Ok(out)
}

/// A 256-bit random secret, URL-safe base64 (43 characters).
pub fn new_secret() -> Result<String> {
    Ok(URL_SAFE_NO_PAD.encode(random_bytes::<32>()?))
}

/// A 128-bit random identifier, URL-safe base64 (22 characters).
pub fn new_id() -> Result<String> {
    Ok(URL_SAFE_NO_PAD.encode(random_bytes::<16>()?))
}

/// A user code for the device authorization grant: 8 letters without vowels or look-alikes,
/// shown as `ABCD-EFGH`.
pub fn new_user_code() -> Result<String> {
    const ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
    let bytes = random_bytes::<8>()?;
    let mut code = String::with_capacity(9);
    for (i, b) in bytes.iter().enumerate() {
        if i == 4 {
            code.push('-');
        }
        code.push(ALPHABET[usize::from(*b) % ALPHABET.len()] as char);
    }
    Ok(code)
}

/// The hex SHA-256 of a high-entropy secret or token (what the store keeps).
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

/// The argon2id hash (PHC string) of a password.
pub fn hash_password(password: &str) -> Result<String> {
    let salt_bytes = random_bytes::<16>()?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| Error::Key(format!("password salt: {e}")))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Key(format!("hashing a password: {e}")))
}

/// Whether `password` matches the argon2id hash `phc`.
pub fn check_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| argon2::Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_check_against_their_hash_only() {
        let s = new_secret().expect("secret");
        assert_eq!(s.len(), 43);
        let h = hash_secret(&s);
        assert!(check_secret(&s, &h));
        assert!(!check_secret("wrong", &h));
        assert_ne!(new_secret().expect("secret"), s);
    }

    #[test]
    fn passwords_are_argon2id() {
        let h = hash_password("correct horse").expect("hash");
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(check_password("correct horse", &h));
        assert!(!check_password("wrong horse", &h));
        assert!(!check_password("correct horse", "not a hash"));
    }

    #[test]
    fn user_codes_are_readable() {
        let c = new_user_code().expect("code");
        assert_eq!(c.len(), 9);
        assert_eq!(&c[4..5], "-");
    }
}
