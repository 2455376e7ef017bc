//! `GET /ui` on the admin listener: one self-contained operator page (HTML and a script of its
//! own, no build step, nothing from elsewhere). The page itself holds no data; its script reads
//! the admin API with the token the operator gives it.

use http::{Method, Response, StatusCode};

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/ui.js");

/// Only our own script runs, the page talks only to this listener, and nothing from the page
/// (the token in `?token=` included) leaks through a Referer.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The page or its script; `None` for every other path.
pub fn serve(method: &Method, path: &str) -> Option<Response<Vec<u8>>> {
    let (body, content_type) = match path {
        "/ui" | "/ui/" => (INDEX, "text/html; charset=utf-8"),
        "/ui.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        _ => return None,
    };
    let builder = Response::builder()
        .header("Content-Security-Policy", CSP)
        .header("X-Content-Type-Options", "nosniff")
        .header("Referrer-Policy", "no-referrer")
        .header("Cache-Control", "no-store");
    let response = if method == Method::GET || method == Method::HEAD {
        let body = if method == Method::HEAD { Vec::new() } else { body.as_bytes().to_vec() };
        builder
            .status(StatusCode::OK)
            .header("Content-Type", content_type)
            .header("Content-Length", body.len())
            .body(body)
    } else {
        builder.status(StatusCode::METHOD_NOT_ALLOWED).header("Allow", "GET, HEAD").body(Vec::new())
    };
    Some(response.unwrap_or_default())
}
