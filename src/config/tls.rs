//! The `[tls]` section and each site's `tls` setting.

use std::path::Path;
use std::time::Duration;

use markco_certs::acme::Challenge;
use markco_certs::manager::{RenewBefore, LETS_ENCRYPT};
use markco_certs::{AcmeConfig, SiteTls};
use toml::Spanned;

use super::raw::RawTls;
use super::{ConfigError, Ctx};

pub(super) fn acme_config(cx: &Ctx<'_>, raw: Option<&RawTls>, base_dir: &Path) -> Result<AcmeConfig, ConfigError> {
    let default = RawTls::default();
    let raw = raw.unwrap_or(&default);
    let mut c = AcmeConfig { storage: base_dir.join("data/certs"), ..AcmeConfig::default() };
    if let Some(e) = &raw.email {
        let v = e.get_ref().trim();
        if !v.contains('@') || v.contains(char::is_whitespace) {
            return cx.err(
                e.span(),
                format!("{v:?} is not an email address"),
                Some("the CA writes to it about expiring certificates, e.g. \"ops@markco.dev\"".into()),
            );
        }
        c.email = Some(v.to_string());
    }
    if let Some(d) = &raw.acme_directory {
        let v = d.get_ref().trim();
        if !v.starts_with("https://") {
            return cx.err(
                d.span(),
                "the ACME directory must be an https:// URL",
                Some(format!(
                    "Let's Encrypt: {LETS_ENCRYPT}; staging: https://acme-staging-v02.api.letsencrypt.org/directory"
                )),
            );
        }
        c.directory = v.to_string();
    }
    if let Some(r) = &raw.acme_ca_root {
        let p = base_dir.join(r.get_ref());
        if !p.is_file() {
            return cx.err(
                r.span(),
                format!("the ACME CA root {} does not exist", p.display()),
                Some(
                    "give the PEM file of the CA that signed the ACME directory's HTTPS certificate, or remove the key"
                        .into(),
                ),
            );
        }
        c.ca_root = Some(p);
    }
    if let Some(s) = &raw.storage {
        c.storage = base_dir.join(s.get_ref());
    }
    if let Some(list) = &raw.challenges {
        let mut out = Vec::new();
        for ch in list.get_ref() {
            out.push(match ch.get_ref().as_str() {
                "http-01" => Challenge::Http01,
                "tls-alpn-01" => Challenge::TlsAlpn01,
                other => {
                    return cx.err(
                        ch.span(),
                        format!("unknown challenge {other:?}"),
                        Some("use \"tls-alpn-01\" and/or \"http-01\" (DNS-01 is not supported)".into()),
                    )
                }
            });
        }
        if out.is_empty() {
            return cx.err(
                list.span(),
                "`challenges` is empty",
                Some("list at least one of \"tls-alpn-01\", \"http-01\"".into()),
            );
        }
        c.challenges = out;
    }
    if let Some(r) = &raw.renew_before {
        c.renew_before = renew_before(cx, r)?;
    }
    c.check_interval = cx.duration(&raw.renew_check_interval, "renew_check_interval", c.check_interval)?;
    c.retry_initial = cx.duration(&raw.retry_initial, "retry_initial", c.retry_initial)?;
    c.retry_max = cx.duration(&raw.retry_max, "retry_max", c.retry_max)?;
    c.order_timeout = cx.duration(&raw.order_timeout, "order_timeout", c.order_timeout)?;
    for (d, key) in [(c.check_interval, "renew_check_interval"), (c.retry_initial, "retry_initial")] {
        if d < Duration::from_millis(100) {
            return cx.err(0..0, format!("`{key}` under [tls] must be at least 100ms"), None);
        }
    }
    Ok(c)
}

fn renew_before(cx: &Ctx<'_>, r: &Spanned<String>) -> Result<RenewBefore, ConfigError> {
    let v = r.get_ref().trim();
    let help = Some("write a fraction of the certificate's lifetime like \"1/3\" or a time like \"30d\"".to_string());
    if let Some((a, b)) = v.split_once('/') {
        return match (a.trim().parse::<f64>(), b.trim().parse::<f64>()) {
            (Ok(a), Ok(b)) if b > 0.0 && a > 0.0 && a / b <= 1.0 => Ok(RenewBefore::Fraction(a / b)),
            _ => cx.err(r.span(), format!("{v:?} is not a fraction between 0 and 1"), help),
        };
    }
    match humantime::parse_duration(v) {
        Ok(d) => Ok(RenewBefore::Remaining(d)),
        Err(e) => cx.err(r.span(), format!("`renew_before` = {v:?}: {e}"), help),
    }
}

/// Names a CA can issue for by HTTP-01/TLS-ALPN-01: public DNS names, no wildcards or IPs.
pub(super) fn publicly_issuable(host: &str) -> bool {
    const PRIVATE_SUFFIXES: [&str; 7] = [".localhost", ".local", ".test", ".example", ".invalid", ".internal", ".lan"];
    host != "localhost"
        && host != "*"
        && !host.starts_with("*.")
        && host.contains('.')
        && host.parse::<std::net::IpAddr>().is_err()
        && !PRIVATE_SUFFIXES.iter().any(|s| host.ends_with(s))
}

/// A site's `tls` setting. The default: ACME for public names when HTTPS is on, else off.
pub(super) fn site_tls(
    cx: &Ctx<'_>,
    raw: Option<&Spanned<toml::Value>>,
    hosts: &[String],
    https_on: bool,
    base_dir: &Path,
    hosts_span: std::ops::Range<usize>,
) -> Result<SiteTls, ConfigError> {
    let help = "write tls = \"acme\", tls = \"off\", or tls = { cert = \"/path/cert.pem\", key = \"/path/key.pem\" }"
        .to_string();
    let Some(v) = raw else {
        return Ok(if https_on && hosts.iter().all(|h| publicly_issuable(h)) { SiteTls::Acme } else { SiteTls::Off });
    };
    let tls = match v.get_ref() {
        toml::Value::String(s) if s == "off" => return Ok(SiteTls::Off),
        toml::Value::String(s) if s == "acme" => SiteTls::Acme,
        toml::Value::Table(t) => {
            let get = |k: &str| t.get(k).and_then(|x| x.as_str()).map(|p| base_dir.join(p));
            let (Some(cert), Some(key)) = (get("cert"), get("key")) else {
                return cx.err(v.span(), "a tls table needs both `cert` and `key`", Some(help));
            };
            if let Some(extra) = t.keys().find(|k| *k != "cert" && *k != "key") {
                return cx.err(v.span(), format!("unknown key `{extra}` in tls"), Some(help));
            }
            match markco_certs::pem::load_for_hosts(&cert, &key, hosts) {
                Ok(_) => SiteTls::Files { cert, key },
                Err(e) => {
                    return cx.err(
                        v.span(),
                        e,
                        Some(
                            "give a certificate that is valid now, covers every host of the site, and its own key"
                                .into(),
                        ),
                    )
                }
            }
        }
        _ => return cx.err(v.span(), "`tls` must be \"acme\", \"off\" or a { cert, key } table", Some(help)),
    };
    if !https_on {
        return cx.err(
            v.span(),
            "this site has TLS but there is no HTTPS listener",
            Some("add https = \"0.0.0.0:443\" under [server], or set tls = \"off\"".into()),
        );
    }
    if tls == SiteTls::Acme {
        if let Some(bad) =
            hosts.iter().find(|h| h.as_str() == "*" || h.starts_with("*.") || h.parse::<std::net::IpAddr>().is_ok())
        {
            return cx.err(
                hosts_span,
                format!("ACME cannot issue a certificate for {bad:?} by HTTP-01 or TLS-ALPN-01"),
                Some("give this site a certificate by path, or list only DNS names".into()),
            );
        }
    }
    Ok(tls)
}

/// `[cluster]` with ACME sites needs `secret_file`: the fleet's certificate keys and account are
/// stored in the shared database, sealed with the key every gateway reads from that file. A
/// `secret_file` that is given must be usable (present, at least 32 bytes).
pub(super) fn check_fleet_secret(
    cx: &Ctx<'_>,
    raw: &super::raw::RawConfig,
    plane: &markco_control::plane::PlaneConfig,
    sites: &[super::SiteSpec],
) -> Result<(), ConfigError> {
    let (Some(cluster), Some(raw_cluster)) = (&plane.cluster, &raw.cluster) else { return Ok(()) };
    if let (Some(file), Some(raw_file)) = (&cluster.secret_file, &raw_cluster.get_ref().secret_file) {
        // Read now, so `markco check` and a reload catch a missing or weak key file.
        return match markco_certs::SecretKey::from_file(file) {
            Ok(_) => Ok(()),
            Err(e) => cx.err(raw_file.span(), format!("{e:#}"), None),
        };
    }
    if !sites.iter().any(|s| s.tls == SiteTls::Acme) {
        return Ok(());
    }
    cx.err(
        raw_cluster.span(),
        "`[cluster]` with ACME sites needs `secret_file`: the fleet shares its certificates through the database, \
         with their keys encrypted by the key in that file",
        Some(
            "create it once (`openssl rand -base64 48 > /etc/markco/cluster.key`, chmod 600), copy the same file to \
             every gateway, and set secret_file = \"/etc/markco/cluster.key\""
                .into(),
        ),
    )
}
