//! Random secrets (from `ferrite_plugin::secret`), user codes, and argon2id for passwords.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

use crate::error::{Error, Result};

pub use ferrite_plugin::secret::{check_secret, hash_secret};

/// `N` random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    ferrite_plugin::secret::random_bytes().map_err(Error::Key)
}

/// A 256-bit random secret, URL-safe base64 (43 characters).
pub fn new_secret() -> Result<String> {
    ferrite_plugin::secret::new_secret().map_err(Error::Key)
}

/// A 128-bit random identifier, URL-safe base64 (22 characters).
pub fn new_id() -> Result<String> {
    ferrite_plugin::secret::new_id().map_err(Error::Key)
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
