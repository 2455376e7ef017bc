//! The config loader's first stage on arbitrary text: TOML into the raw config structs (the
//! binary crate's `src/config/raw.rs`, included here by path, with its error renderer
//! `src/config/error.rs`). The validation after it lives in the binary and needs the whole
//! gateway's types; this stage is where untrusted text meets a parser.
//! Invariants: never a panic; every span (of an error or of a value) lies inside the text on
//! character boundaries, and the error shown to the operator points at the right line.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/config/raw.rs"]
mod raw;

#[allow(dead_code)]
#[path = "../../src/config/error.rs"]
mod error;

use std::ops::Range;
use std::path::Path;

use libfuzzer_sys::fuzz_target;

/// What the operator sees for an error at `span`, checked against the text.
fn check_span(src: &str, span: Range<usize>) {
    assert!(span.start <= span.end && span.end <= src.len(), "span {span:?} outside {} bytes", src.len());
    assert!(src.is_char_boundary(span.start) && src.is_char_boundary(span.end), "span {span:?} splits a character");
    let e = error::ConfigError::at(Path::new("f.toml"), src, Some(span.clone()), "msg", None);
    assert_eq!(e.line, src[..span.start].matches('\n').count() + 1);
    assert!(e.column >= 1);
    assert!(src.lines().any(|l| l == e.snippet) || e.snippet.is_empty() || src.contains(&e.snippet));
    let shown = e.to_string();
    assert!(shown.contains(&format!("f.toml:{}:{}", e.line, e.column)), "{shown}");
}

fuzz_target!(|src: &str| {
    match toml::from_str::<raw::RawConfig>(src) {
        Err(e) => {
            if let Some(span) = e.span() {
                check_span(src, span);
            }
        }
        Ok(c) => {
            let s = &c.server;
            for v in [&s.http, &s.https, &s.admin, &s.hsts, &s.header_timeout, &s.grace_period, &s.pid_file]
                .into_iter()
                .flatten()
            {
                check_span(src, v.span());
            }
            for v in &s.trusted_proxies {
                check_span(src, v.span());
            }
            if let Some(x) = &c.sessions {
                for v in [&x.cache_ttl, &x.negative_cache_ttl, &x.lookup_timeout, &x.outage_grace].into_iter().flatten()
                {
                    check_span(src, v.span());
                }
            }
            for site in &c.sites {
                check_span(src, site.span());
            }
        }
    }
});
