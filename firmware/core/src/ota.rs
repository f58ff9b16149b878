//! Verifying a software artifact before it is installed: its SHA-256 must be the one the
//! campaign announced, and the Ed25519 signature over that digest must check out against
//! the platform's OTA public key the device was provisioned with. A tampered artifact, a
//! wrong digest or a signature by another key is refused, and the device stays on its
//! version.

use sha2::{Digest, Sha256};

/// Why an artifact is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtaError {
    /// Its SHA-256 is not the announced one (damaged or tampered with).
    Digest,
    /// The signature is not valid for the digest under the key.
    Signature,
    /// The public key is not a valid Ed25519 key.
    Key,
}

impl core::fmt::Display for OtaError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            OtaError::Digest => "the artifact's SHA-256 is not the announced one",
            OtaError::Signature => "the artifact's signature does not verify with the OTA key",
            OtaError::Key => "the OTA public key is not a valid Ed25519 key",
        })
    }
}

/// Hashes an artifact as it arrives (downloads resume; nothing is held whole).
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    hash: Sha256,
}

impl Verifier {
    /// A verifier for a new download.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next bytes of the artifact.
    pub fn update(&mut self, chunk: &[u8]) {
        self.hash.update(chunk);
    }

    /// Checks the whole artifact against the announced digest and signature.
    pub fn finish(self, digest: &[u8; 32], signature: &[u8; 64], public_key: &[u8; 32]) -> Result<(), OtaError> {
        let got: [u8; 32] = self.hash.finalize().into();
        if &got != digest {
            return Err(OtaError::Digest);
        }
        verify_digest(digest, signature, public_key)
    }
}

/// Checks the Ed25519 `signature` over `digest`.
pub fn verify_digest(digest: &[u8; 32], signature: &[u8; 64], public_key: &[u8; 32]) -> Result<(), OtaError> {
    let key = ed25519_dalek::VerifyingKey::from_bytes(public_key).map_err(|_| OtaError::Key)?;
    let sig = ed25519_dalek::Signature::from_bytes(signature);
    key.verify_strict(digest, &sig).map_err(|_| OtaError::Signature)
}

/// The SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn signed(artifact: &[u8], seed: u8) -> ([u8; 32], [u8; 64], [u8; 32]) {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let digest = sha256(artifact);
        (digest, key.sign(&digest).to_bytes(), key.verifying_key().to_bytes())
    }

    #[test]
    fn a_signed_artifact_verifies_in_chunks() {
        let artifact = [7u8; 10_000];
        let (digest, sig, key) = signed(&artifact, 1);
        let mut v = Verifier::new();
        for chunk in artifact.chunks(999) {
            v.update(chunk);
        }
        assert_eq!(v.finish(&digest, &sig, &key), Ok(()));
    }

    fn unhex<const N: usize>(s: &str) -> [u8; N] {
        let mut out = [0u8; N];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap_or(0);
        }
        out
    }

    /// A manifest made by the server's `ferrite ota keygen` and `ferrite ota sign` (ring's
    /// Ed25519), verified here by ed25519-dalek: the two halves agree on the format.
    #[test]
    fn a_manifest_signed_by_the_server_cli_verifies() {
        let artifact = b"ferrite firmware 2.4.0 for thermostats\n";
        let digest: [u8; 32] = unhex("f12c35f1e31db8dcb8d9958d3df97cfdd489f522e23cde17337c7884559222b5");
        let signature: [u8; 64] = unhex(
            "05e40607ea8cd7ed1dc9a1582e60231800f90da258b911f8a3596aaad1f993621720eab56bcc04c69e6ab7275423f2bd28ad58b3d2d623c5bbf8a4af88b2d30d",
        );
        let key: [u8; 32] = unhex("6231b177d026347e72af29f6b134c01ed48c5bdde1b34d1b26f9a124f758d554");
        let mut v = Verifier::new();
        v.update(artifact);
        assert_eq!(v.finish(&digest, &signature, &key), Ok(()));
        let mut v = Verifier::new();
        v.update(b"ferrite firmware 2.4.1 for thermostats\n");
        assert_eq!(v.finish(&digest, &signature, &key), Err(OtaError::Digest));
    }

    #[test]
    fn tampering_a_wrong_key_or_a_bad_signature_is_refused() {
        let artifact = [7u8; 1000];
        let (digest, sig, key) = signed(&artifact, 1);
        let mut tampered = artifact;
        tampered[500] ^= 1;
        let mut v = Verifier::new();
        v.update(&tampered);
        assert_eq!(v.finish(&digest, &sig, &key), Err(OtaError::Digest));
        let (_, _, other_key) = signed(&artifact, 2);
        assert_eq!(verify_digest(&digest, &sig, &other_key), Err(OtaError::Signature));
        let mut bad = sig;
        bad[10] ^= 1;
        assert_eq!(verify_digest(&digest, &bad, &key), Err(OtaError::Signature));
    }
}
