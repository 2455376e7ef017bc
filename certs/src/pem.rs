//! Certificates and keys from PEM: parsing, the facts `GET /certs` shows, and the checks that
//! refuse an expired, not yet valid, mismatched or wrong-host certificate.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::store::{CertInfo, CertSource, LoadedCert};

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("no certificate found in the PEM data")]
    NoCertificate,
    #[error("no private key found in the PEM data")]
    NoKey,
    #[error("malformed PEM: {0}")]
    Pem(String),
    #[error("the certificate cannot be parsed: {0}")]
    X509(String),
    #[error("the private key is not usable: {0}")]
    Key(String),
    #[error("the private key does not belong to the certificate")]
    Mismatch,
}

pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Parses a chain (leaf first) and its key.
pub fn parse(cert_pem: &[u8], key_pem: &[u8], source: CertSource) -> Result<LoadedCert, PemError> {
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| PemError::Pem(e.to_string()))?;
    if chain.is_empty() {
        return Err(PemError::NoCertificate);
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| PemError::Pem(e.to_string()))?
        .ok_or(PemError::NoKey)?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider.key_provider.load_private_key(key).map_err(|e| PemError::Key(e.to_string()))?;
    let info = describe(&chain[0], source)?;
    let ck = CertifiedKey::new(chain, signing);
    match ck.keys_match() {
        Ok(()) => {}
        // The key type could not be compared (rare algorithms): accept, rustls will fail loudly.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => return Err(PemError::Mismatch),
    }
    Ok(LoadedCert { key: Arc::new(ck), info })
}

pub fn describe(leaf: &CertificateDer<'_>, source: CertSource) -> Result<CertInfo, PemError> {
    let (_, x) = X509Certificate::from_der(leaf.as_ref()).map_err(|e| PemError::X509(e.to_string()))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_ascii_lowercase()),
                GeneralName::IPAddress(b) if b.len() == 4 => {
                    names.push(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string())
                }
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        names,
        issuer: x.issuer().to_string(),
        serial: x.raw_serial_as_string().replace(':', "").to_ascii_uppercase(),
        not_before: x.validity().not_before.timestamp(),
        not_after: x.validity().not_after.timestamp(),
        source,
    })
}

/// Does a certificate name cover `host`? (`*.a.b` covers `x.a.b`, not `a.b` or `y.x.a.b`.)
pub fn covers(names: &[String], host: &str) -> bool {
    names.iter().any(|n| {
        n == host
            || n.strip_prefix("*.").is_some_and(|suffix| {
                host.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == suffix)
            })
    })
}

/// Loads a certificate given by path for `hosts`, refusing one that cannot serve them now.
pub fn load_for_hosts(cert: &Path, key: &Path, hosts: &[String]) -> Result<LoadedCert, String> {
    let cert_pem = std::fs::read(cert).map_err(|e| format!("cannot read the certificate {}: {e}", cert.display()))?;
    let key_pem = std::fs::read(key).map_err(|e| format!("cannot read the key {}: {e}", key.display()))?;
    let loaded = parse(&cert_pem, &key_pem, CertSource::File).map_err(|e| match e {
        PemError::Mismatch => {
            format!("the key {} does not belong to the certificate {}", key.display(), cert.display())
        }
        other => format!("{}: {other}", cert.display()),
    })?;
    let now = now_unix();
    if loaded.info.not_after <= now {
        return Err(format!(
            "the certificate {} expired at {} (unix {})",
            cert.display(),
            httpdate_of(loaded.info.not_after),
            loaded.info.not_after
        ));
    }
    if loaded.info.not_before > now {
        return Err(format!(
            "the certificate {} is not valid before {}",
            cert.display(),
            httpdate_of(loaded.info.not_before)
        ));
    }
    for h in hosts.iter().filter(|h| h.as_str() != "*") {
        let probe = h.strip_prefix("*.").map(|s| format!("x.{s}")).unwrap_or_else(|| h.clone());
        if !covers(&loaded.info.names, &probe) && !loaded.info.names.contains(h) {
            return Err(format!(
                "the certificate {} does not cover host {h:?} (it names {})",
                cert.display(),
                loaded.info.names.join(", ")
            ));
        }
    }
    Ok(loaded)
}

fn httpdate_of(unix: i64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64);
    humanish(t)
}

/// RFC 3339-ish UTC time without extra dependencies.
fn humanish(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = secs / 86400;
    let (y, m, d) = civil_from_days(days as i64);
    let rem = secs % 86400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
        let cert = params.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn parses_and_describes() {
        let (c, k) = self_signed(&["a.test", "b.test"]);
        let l = parse(c.as_bytes(), k.as_bytes(), CertSource::File).expect("valid pair");
        assert_eq!(l.info.names, vec!["a.test", "b.test"]);
        assert!(l.info.not_after > now_unix());
        assert!(!l.info.serial.is_empty());
    }

    #[test]
    fn refuses_a_foreign_key() {
        let (c, _) = self_signed(&["a.test"]);
        let (_, k2) = self_signed(&["a.test"]);
        assert!(matches!(parse(c.as_bytes(), k2.as_bytes(), CertSource::File), Err(PemError::Mismatch)));
        assert!(matches!(parse(b"", k2.as_bytes(), CertSource::File), Err(PemError::NoCertificate)));
    }

    #[test]
    fn wildcard_cover() {
        let names = vec!["*.a.test".to_string(), "b.test".to_string()];
        assert!(covers(&names, "x.a.test"));
        assert!(!covers(&names, "a.test"));
        assert!(!covers(&names, "y.x.a.test"));
        assert!(covers(&names, "b.test"));
    }

    #[test]
    fn dates() {
        assert_eq!(humanish(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(humanish(UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)), "2023-11-14T22:13:20Z");
    }
}
