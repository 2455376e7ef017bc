//! markco-testupstream: the upstream used by markco's integration tests and
//! benchmarks. HTTP/1.1 + h2c echo server with SSE, slow, large, drip,
//! status, upload and websocket-echo endpoints.
//!
//! Usage: `markco-testupstream [--listen ADDR] [--name NAME]`
//! (env: `PORT` → listen on `0.0.0.0:$PORT` when `--listen` is absent;
//! `MARKCO_TU_NAME` → name when `--name` is absent; `MARKCO_TU_EVENTS_GREETING=1` → a websocket
//! on a path ending in `/events` first gets `{"event":"connected",...}`, like the editor's).

mod bodies;
mod routes;
mod util;
mod ws;

use std::convert::Infallible;
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;

/// Shared state of every connection.
pub struct State {
    pub name: String,
    /// Bodies received on `POST /api/runtime/update-port`, in order.
    pub updates: Mutex<Vec<serde_json::Value>>,
    /// Greet websockets on `.../events` as mrmd-server's editor does (off by default, so echo
    /// tests get their echo first).
    pub events_greeting: bool,
}

/// Writes one line to stderr, ignoring errors (stderr may be closed).
pub fn log(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "markco-testupstream: {args}");
}

const USAGE: &str = "usage: markco-testupstream [--listen ADDR] [--name NAME]\n\
    env: PORT (listen on 0.0.0.0:$PORT when --listen is absent), MARKCO_TU_NAME";

struct Config {
    listen: String,
    name: String,
}

fn parse_args() -> Result<Config, String> {
    let mut listen = None;
    let mut name = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let slot = match flag.as_str() {
            "--listen" => &mut listen,
            "--name" => &mut name,
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {arg:?}")),
        };
        let value = match inline {
            Some(v) => v,
            None => args.next().ok_or_else(|| format!("{flag} needs a value"))?,
        };
        *slot = Some(value);
    }
    let listen = match listen {
        Some(l) => l,
        None => match std::env::var("PORT") {
            Ok(p) => {
                let port: u16 = p.trim().parse().map_err(|_| format!("invalid PORT {p:?}"))?;
                format!("0.0.0.0:{port}")
            }
            Err(_) => "127.0.0.1:0".to_owned(),
        },
    };
    let name = name.or_else(|| std::env::var("MARKCO_TU_NAME").ok()).unwrap_or_else(|| "upstream".to_owned());
    Ok(Config { listen, name })
}

fn main() -> ExitCode {
    let config = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            let mut err = std::io::stderr().lock();
            if !e.is_empty() {
                let _ = writeln!(err, "markco-testupstream: {e}");
            }
            let _ = writeln!(err, "{USAGE}");
            return if e.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            log(format_args!("cannot start runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(config));
    // Don't wait for open connections (or idle blocking threads) on exit.
    runtime.shutdown_background();
    code
}

async fn run(config: Config) -> ExitCode {
    let listener = match TcpListener::bind(&config.listen).await {
        Ok(l) => l,
        Err(e) => {
            log(format_args!("cannot listen on {}: {e}", config.listen));
            return ExitCode::FAILURE;
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            log(format_args!("cannot read local address: {e}"));
            return ExitCode::FAILURE;
        }
    };
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}");
        let _ = out.flush();
    }
    let events_greeting = std::env::var("MARKCO_TU_EVENTS_GREETING").is_ok_and(|v| v == "1");
    let state = Arc::new(State { name: config.name, updates: Mutex::new(Vec::new()), events_greeting });
    tokio::select! {
        () = accept_loop(listener, state) => ExitCode::FAILURE,
        () = shutdown_signal() => ExitCode::SUCCESS,
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let builder = Arc::new(Builder::new(TokioExecutor::new()));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // E.g. EMFILE: back off a little instead of spinning.
                log(format_args!("accept: {e}"));
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(routes::handle(req, state, peer).await) }
            });
            // Errors here are client-side resets and the like: not ours to report.
            let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await;
        });
    }
}

/// Resolves on Ctrl-C or SIGTERM (PID 1 in a container ignores SIGTERM
/// unless it is handled).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
