//! Secrets at rest in the shared database: private keys and ACME account credentials are sealed
//! with XChaCha20-Poly1305 under a key derived from the `[cluster] secret_file` that every gateway
//! has. A value is `1 || nonce (24 random bytes) || ciphertext and tag`; the associated data names
//! the row it belongs to, so a sealed value moved to another row does not open.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
/// The shortest secret file accepted (after trimming surrounding whitespace).
pub const MIN_SECRET_LEN: usize = 32;

/// The fleet's sealing key.
#[derive(Clone)]
pub struct SecretKey {
    cipher: XChaCha20Poly1305,
    /// Where it came from, for messages.
    file: PathBuf,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey").field("file", &self.file).finish_non_exhaustive()
    }
}

impl SecretKey {
    /// Reads the key file. Leading and trailing whitespace (a final newline) does not count, so
    /// `openssl rand -base64 48 > secret` and the same text without the newline give one key.
    pub fn from_file(path: &Path) -> anyhow::Result<SecretKey> {
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "cannot read the cluster secret_file {}: every gateway of the cluster needs the same file \
                 (create one with `openssl rand -base64 48 > {}` and copy it to each gateway)",
                path.display(),
                path.display()
            )
        })?;
        let secret = bytes.trim_ascii();
        if secret.is_empty() {
            bail!("the cluster secret_file {} is empty: put at least {MIN_SECRET_LEN} random bytes in it (e.g. `openssl rand -base64 48`)", path.display());
        }
        if secret.len() < MIN_SECRET_LEN {
            bail!(
                "the cluster secret_file {} is too short ({} bytes): it needs at least {MIN_SECRET_LEN} (e.g. `openssl rand -base64 48`)",
                path.display(),
                secret.len()
            );
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(file = %path.display(), "the cluster secret_file is readable by other users; chmod 600 it");
                }
            }
        }
        Ok(SecretKey::from_secret(secret, path))
    }

    /// The key for a secret's bytes (tests, and [`SecretKey::from_file`]).
    pub fn from_secret(secret: &[u8], file: &Path) -> SecretKey {
        let mut h = Sha256::new();
        h.update(b"markco fleet secret v1\0");
        h.update(secret);
        let key = h.finalize();
        SecretKey { cipher: XChaCha20Poly1305::new(&key), file: file.to_path_buf() }
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Seals `plain`, bound to `context` (e.g. "certificate key <directory> <name>").
    pub fn seal(&self, plain: &[u8], context: &str) -> anyhow::Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| anyhow!("cannot get random bytes from the OS: {e}"))?;
        let sealed = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad: context.as_bytes() })
            .map_err(|_| anyhow!("sealing the {context} failed"))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens what [`SecretKey::seal`] made with the same `context`.
    pub fn open(&self, sealed: &[u8], context: &str) -> anyhow::Result<Vec<u8>> {
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != VERSION {
            bail!(
                "the stored {context} is not a value sealed by markco (format {})",
                sealed.first().copied().unwrap_or(0)
            );
        }
        let (nonce, body) = sealed[1..].split_at(NONCE_LEN);
        self.cipher.decrypt(XNonce::from_slice(nonce), Payload { msg: body, aad: context.as_bytes() }).map_err(|_| {
            anyhow!(
                "cannot decrypt the stored {context} with the key from {}: is it the same secret_file on every gateway?",
                self.file.display()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> SecretKey {
        SecretKey::from_secret(s.as_bytes(), Path::new("/test/secret"))
    }

    #[test]
    fn round_trip_random_nonce_and_binding() {
        let k = key("0123456789abcdef0123456789abcdef");
        let a = k.seal(b"-----BEGIN PRIVATE KEY-----", "key a").expect("seal");
        let b = k.seal(b"-----BEGIN PRIVATE KEY-----", "key a").expect("seal");
        assert_ne!(a, b, "a fresh nonce per value");
        assert!(!a.windows(5).any(|w| w == b"BEGIN"), "no plaintext in the sealed value");
        assert_eq!(k.open(&a, "key a").expect("open"), b"-----BEGIN PRIVATE KEY-----");
        // Another row's context, another key, a flipped bit: all refused.
        assert!(k.open(&a, "key b").is_err());
        let e = key("another secret of thirty-two bytes!!").open(&a, "key a").expect_err("wrong key");
        assert!(e.to_string().contains("/test/secret"), "{e}");
        let mut bad = a.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(k.open(&bad, "key a").is_err());
        assert!(k.open(b"short", "key a").is_err());
    }

    #[test]
    fn refuses_missing_empty_and_short_files() {
        let dir = std::env::temp_dir().join(format!("markco-sealed-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let missing = dir.join("missing");
        let e = SecretKey::from_file(&missing).expect_err("missing");
        assert!(e.to_string().contains(&missing.display().to_string()), "{e}");
        let empty = dir.join("empty");
        std::fs::write(&empty, "\n").expect("write");
        assert!(SecretKey::from_file(&empty).expect_err("empty").to_string().contains("is empty"));
        let short = dir.join("short");
        std::fs::write(&short, "tooshort\n").expect("write");
        assert!(SecretKey::from_file(&short).expect_err("short").to_string().contains("too short"));
        let good = dir.join("good");
        std::fs::write(&good, "0123456789abcdef0123456789abcdef\n").expect("write");
        let k = SecretKey::from_file(&good).expect("good");
        let sealed = k.seal(b"x", "c").expect("seal");
        // The trailing newline does not change the key.
        assert_eq!(key("0123456789abcdef0123456789abcdef").open(&sealed, "c").expect("same key"), b"x");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
