//! Static files under a root: correct MIME types with `nosniff`, validators with 304, HEAD, and no
//! way out of the root (decoded `..`, encoded slashes and symlinks leaving it are refused).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use tokio::io::AsyncReadExt;

use crate::path::decode_segment;
use crate::table::StaticAction;

const CHUNK: usize = 64 * 1024;

/// MIME type by extension. The list errs on the side of the types browsers enforce under
/// `nosniff` (scripts, styles) and the ones the platform serves.
pub fn mime_for(path: &Path) -> &'static str {
    let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" | "cjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "webmanifest" => "application/manifest+json",
        "txt" | "md" => "text/plain; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "wasm" => "application/wasm",
        "pdf" => "application/pdf",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        _ => "application/octet-stream",
    }
}

/// What serving a request came to, for logs and metrics.
pub struct Served {
    pub status: u16,
}

enum Lookup {
    File(PathBuf, std::fs::Metadata),
    NotFound,
    Forbidden,
}

/// Maps a normalised request path to a file under the root, refusing anything that leaves it.
fn lookup(action: &StaticAction, path: &str) -> Lookup {
    let rel = match &action.strip_prefix {
        Some(p) => path.strip_prefix(p.as_str()).unwrap_or(path),
        None => path,
    };
    let mut full = action.root.clone();
    for seg in rel.split('/').filter(|s| !s.is_empty()) {
        match decode_segment(seg) {
            Some(s) => full.push(s),
            // An encoded slash, NUL or dot segment: never a file name.
            None => return Lookup::Forbidden,
        }
    }
    let Ok(root) = action.root.canonicalize() else {
        return Lookup::NotFound;
    };
    let resolve = |p: &Path| -> Option<Lookup> {
        let real = p.canonicalize().ok()?;
        if !real.starts_with(&root) {
            // A symlink pointing outside the root.
            return Some(Lookup::Forbidden);
        }
        let meta = real.metadata().ok()?;
        Some(if meta.is_file() { Lookup::File(real, meta) } else { Lookup::NotFound })
    };
    match std::fs::metadata(&full) {
        Ok(m) if m.is_dir() => {
            for idx in &action.index {
                if let Some(found) = resolve(&full.join(idx)) {
                    return found;
                }
            }
            // Still refuse a directory symlink that leaves the root.
            match resolve(&full) {
                Some(Lookup::Forbidden) => Lookup::Forbidden,
                _ => Lookup::NotFound,
            }
        }
        Ok(_) => resolve(&full).unwrap_or(Lookup::NotFound),
        Err(_) => Lookup::NotFound,
    }
}

fn etag_of(meta: &std::fs::Metadata) -> (String, Option<SystemTime>) {
    let mtime = meta.modified().ok();
    let secs = mtime.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
    (format!("\"{:x}-{:x}\"", secs, meta.len()), mtime)
}

fn not_modified(session: &Session, etag: &str, mtime: Option<SystemTime>) -> bool {
    let headers = &session.req_header().headers;
    if let Some(inm) = headers.get(http::header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        return inm.split(',').any(|t| {
            let t = t.trim();
            t == "*" || t == etag || t.strip_prefix("W/") == Some(etag)
        });
    }
    if let (Some(ims), Some(mtime)) =
        (headers.get(http::header::IF_MODIFIED_SINCE).and_then(|v| v.to_str().ok()), mtime)
    {
        if let Ok(since) = httpdate::parse_http_date(ims) {
            // HTTP dates have one-second resolution.
            let mtime_secs = mtime.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let since_secs = since.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            return mtime_secs <= since_secs;
        }
    }
    false
}

/// Serves `path` from the action's root. Errors are downstream write failures only.
pub async fn serve(session: &mut Session, action: &StaticAction, path: &str, hsts: Option<&str>) -> Result<Served> {
    let method = session.req_header().method.clone();
    if method != http::Method::GET && method != http::Method::HEAD {
        let mut h = ResponseHeader::build(405, Some(3))?;
        h.insert_header("Allow", "GET, HEAD")?;
        h.insert_header("Content-Length", "0")?;
        session.write_response_header(Box::new(h), true).await?;
        return Ok(Served { status: 405 });
    }
    let (file, meta) = match lookup(action, path) {
        Lookup::File(f, m) => (f, m),
        Lookup::NotFound => {
            return crate::gateway::respond_text(session, 404, "not found\n").await.map(|_| Served { status: 404 })
        }
        Lookup::Forbidden => {
            return crate::gateway::respond_text(session, 403, "forbidden\n").await.map(|_| Served { status: 403 })
        }
    };
    let (etag, mtime) = etag_of(&meta);
    let mut h = ResponseHeader::build(200, Some(6))?;
    h.insert_header("Content-Type", mime_for(&file))?;
    h.insert_header("X-Content-Type-Options", "nosniff")?;
    h.insert_header("ETag", etag.as_str())?;
    if let Some(v) = hsts {
        h.insert_header("Strict-Transport-Security", v)?;
    }
    if let Some(t) = mtime {
        h.insert_header("Last-Modified", httpdate::fmt_http_date(t))?;
    }
    if not_modified(session, &etag, mtime) {
        h.set_status(304)?;
        session.write_response_header(Box::new(h), true).await?;
        return Ok(Served { status: 304 });
    }
    h.insert_header("Content-Length", meta.len().to_string())?;
    if method == http::Method::HEAD || meta.len() == 0 {
        session.write_response_header(Box::new(h), true).await?;
        return Ok(Served { status: 200 });
    }
    let mut f = match tokio::fs::File::open(&file).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "static file vanished or unreadable");
            crate::gateway::respond_text(session, 404, "not found\n").await?;
            return Ok(Served { status: 404 });
        }
    };
    session.write_response_header(Box::new(h), false).await?;
    let mut left = meta.len();
    let mut buf = vec![0u8; CHUNK.min(left as usize)];
    while left > 0 {
        let n = f.read(&mut buf).await.or_err(ErrorType::ReadError, "reading static file")?;
        if n == 0 {
            // Truncated while we read it: end here; the client sees a short body and retries.
            return Error::e_explain(ErrorType::ReadError, "static file shrank while being served");
        }
        left = left.saturating_sub(n as u64);
        session.write_response_body(Some(Bytes::copy_from_slice(&buf[..n])), left == 0).await?;
    }
    Ok(Served { status: 200 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_types() {
        for (f, t) in [
            ("a.js", "text/javascript; charset=utf-8"),
            ("a.mjs", "text/javascript; charset=utf-8"),
            ("a.css", "text/css; charset=utf-8"),
            ("a.html", "text/html; charset=utf-8"),
            ("a.json", "application/json"),
            ("a.svg", "image/svg+xml"),
            ("a.png", "image/png"),
            ("a.woff2", "font/woff2"),
            ("a.wasm", "application/wasm"),
            ("a.js.map", "application/json"),
            ("A.JS", "text/javascript; charset=utf-8"),
            ("noext", "application/octet-stream"),
        ] {
            assert_eq!(mime_for(Path::new(f)), t, "{f}");
        }
    }
}
