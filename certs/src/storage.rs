//! On-disk state: the ACME account and the certificates it obtained, per ACME directory, so a
//! restart orders nothing new and switching CA never serves the other CA's certificate.
//!
//! Layout: `<dir>/<ca>/account.json` (0600), `<dir>/<ca>/certs/<name>/{cert.pem,key.pem}`
//! (key 0600). Every write goes to a temporary file that is synced and renamed into place.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
}

/// A file-system-safe name for a directory URL or host.
pub fn slug(s: &str) -> String {
    let s = s.trim_start_matches("https://").trim_start_matches("http://");
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect()
}

impl Storage {
    /// Storage for one ACME directory under `dir`.
    pub fn new(dir: &Path, directory_url: &str) -> Storage {
        Storage { root: dir.join(slug(directory_url)) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn account_path(&self) -> PathBuf {
        self.root.join("account.json")
    }

    fn cert_dir(&self, name: &str) -> PathBuf {
        self.root.join("certs").join(slug(name))
    }

    pub fn load_cert(&self, name: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        let d = self.cert_dir(name);
        Some((fs::read(d.join("cert.pem")).ok()?, fs::read(d.join("key.pem")).ok()?))
    }

    /// Writes key then certificate, each atomically; a reader sees the old pair or the new one
    /// (the key first, so a crash in between leaves a pair the load-time check refuses, and the
    /// next start orders again rather than serving a mismatch).
    pub fn save_cert(&self, name: &str, cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<()> {
        let d = self.cert_dir(name);
        create_private_dir(&d)?;
        write_atomic(&d.join("key.pem"), key_pem, 0o600)?;
        write_atomic(&d.join("cert.pem"), cert_pem, 0o644)?;
        Ok(())
    }
}

pub fn create_private_dir(d: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    fs::set_permissions(d, fs::Permissions::from_mode(0o700)).with_context(|| format!("chmod 0700 {}", d.display()))
}

/// Temporary file in the same directory, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().context("a file path has a parent")?;
    let tmp =
        dir.join(format!(".{}.tmp{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("f"), std::process::id()));
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(data).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_with_modes_and_loads() {
        let dir = std::env::temp_dir().join(format!("markco-storage-test-{}", std::process::id()));
        let s = Storage::new(&dir, "https://127.0.0.1:14000/dir");
        s.save_cert("a.test", b"CERT", b"KEY").expect("save");
        let (c, k) = s.load_cert("a.test").expect("load");
        assert_eq!((c.as_slice(), k.as_slice()), (&b"CERT"[..], &b"KEY"[..]));
        let key_mode = fs::metadata(s.root().join("certs/a.test/key.pem")).expect("meta").permissions().mode();
        assert_eq!(key_mode & 0o777, 0o600);
        assert!(s.root().ends_with("127.0.0.1_14000_dir"));
        let _ = fs::remove_dir_all(&dir);
    }
}
