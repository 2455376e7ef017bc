//! Benchmark floors: proxies that do nothing but proxy, to tell what markco's own work costs per
//! request from what its foundations cost. `benches/proxy/run.sh` and `benches/tls/run.sh` run
//! them beside markco and nginx (targets `floor-*`); see benches/README.md, "Floors".
//!
//! - `tokio`: the least a tokio proxy can do. One thread per core, each with its own runtime and
//!   its own `SO_REUSEPORT` listener (as nginx's workers); each client connection keeps one
//!   upstream connection; the request head goes up as the client sent it and the answer comes
//!   back as the upstream sent it. No routing, no header rewriting, no logs, no metrics, no
//!   timeouts, GET only, answers with a `Content-Length` only. Not a product: a lower bound.
//! - `pingora`: Pingora's `HttpProxy` with a fixed peer and no phase of its own, so
//!   `proxy_1to1` and Pingora's connection pool.
//! - `own`: the same server, with every bodiless request sent by markco's own upstream loop
//!   (`markco_proxy::upstream::forward`), as markco's gateway does, but without its routing,
//!   identity, logs and metrics.
//! - `session`: the `own` floor without `HttpProxy`: a `ServerApp` that reads each request into
//!   Pingora's HTTP/1 proxy `Session` and hands it to the same code, as markco's edge loop does
//!   for requests without a body.
//! - `app`: Pingora's server and listener (what markco keeps of Pingora besides its HTTP
//!   sessions) running the `tokio` floor's connection loop as its `ServerApp`: what an own
//!   HTTP/1 path on Pingora's listener could cost at best.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use async_trait::async_trait;
use bytes::BytesMut;
use clap::{Parser, ValueEnum};
use pingora::apps::ServerApp;
use pingora::prelude::{HttpPeer, Server};
use pingora::protocols::Stream;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::ShutdownWatch;
use pingora::services::listening::Service;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

// The same allocator as markco's, so that the floors differ from it only in what they do.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Tokio,
    Pingora,
    Own,
    App,
    Session,
}

#[derive(Parser)]
#[command(about = "Benchmark floor proxies (see benches/README.md, \"Floors\")")]
struct Args {
    kind: Kind,
    /// Address to listen on (loopback in the benchmarks).
    #[arg(long)]
    listen: SocketAddr,
    /// The upstream every request goes to.
    #[arg(long)]
    upstream: SocketAddr,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Pingora kinds only: serve TLS (HTTP/2 by ALPN) with this certificate and key (PEM files).
    #[arg(long, num_args = 2, value_names = ["CERT", "KEY"])]
    tls: Option<Vec<String>>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.tls.is_some() && matches!(args.kind, Kind::Tokio | Kind::App | Kind::Session) {
        bail!("--tls is for the pingora and own floors");
    }
    match args.kind {
        Kind::Tokio => tokio_floor(args.listen, args.upstream, args.threads),
        Kind::Pingora | Kind::Own | Kind::App | Kind::Session => pingora_floor(&args),
    }
}

fn tokio_floor(listen: SocketAddr, upstream: SocketAddr, threads: usize) -> anyhow::Result<()> {
    for i in 0..threads.max(1) {
        std::thread::Builder::new().name(format!("floor-{i}")).spawn(move || {
            // A worker that cannot serve ends the process: a benchmark must not measure fewer
            // threads than it asked for.
            if let Err(e) = tokio_worker(listen, upstream) {
                eprintln!("floor worker {i}: {e:#}");
                std::process::exit(1);
            }
        })?;
    }
    // The benchmarks stop their servers with SIGINT (SIGKILL 5 s later).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT"),
            _ = term.recv() => Ok(()),
        }
    })
}

fn tokio_worker(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        // Each worker its own listener in one SO_REUSEPORT group: the kernel spreads the
        // connections, and none crosses threads.
        let socket = if listen.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }?;
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(listen).with_context(|| format!("binding {listen}"))?;
        let listener = socket.listen(1024)?;
        loop {
            let client = match listener.accept().await {
                Ok((client, _)) => client,
                Err(e) => {
                    // Out of descriptors, say: the next accept may succeed.
                    eprintln!("floor: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let r = match client.set_nodelay(true) {
                    Ok(()) => tokio_conn(client, upstream).await,
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = r {
                    eprintln!("floor: {e:#}");
                }
            });
        }
    })
}

const MAX_HEAD: usize = 64 * 1024;
/// Answers are buffered whole before one write; the benchmarks' are 20 bytes.
const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// One client connection: each request head goes to this connection's own upstream connection,
/// each answer (a head and a `Content-Length` body) back to the client in one write.
async fn tokio_conn<S: AsyncRead + AsyncWrite + Unpin>(mut client: S, upstream: SocketAddr) -> anyhow::Result<()> {
    let mut up: Option<TcpStream> = None;
    let mut cbuf = BytesMut::with_capacity(4096);
    let mut ubuf = BytesMut::with_capacity(4096);
    loop {
        let head_len = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(n) = req.parse(&cbuf)? {
                // A HEAD's answer has no body, which this loop would wait for.
                if req.method != Some("GET") {
                    bail!("the tokio floor proxies GET only");
                }
                let body = req.headers.iter().any(|h| {
                    (h.name.eq_ignore_ascii_case("content-length") && h.value != b"0")
                        || h.name.eq_ignore_ascii_case("transfer-encoding")
                });
                if body {
                    bail!("the tokio floor proxies requests without a body only");
                }
                break n;
            }
            if cbuf.len() > MAX_HEAD {
                bail!("request head over {MAX_HEAD} bytes");
            }
            if client.read_buf(&mut cbuf).await? == 0 {
                return Ok(());
            }
        };
        let head = cbuf.split_to(head_len);
        let u = match &mut up {
            Some(u) => u,
            None => {
                let s = TcpStream::connect(upstream).await.with_context(|| format!("connecting {upstream}"))?;
                s.set_nodelay(true)?;
                up.insert(s)
            }
        };
        u.write_all(&head).await?;
        let total = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = resp.parse(&ubuf)? {
                let len = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
                    .context("the tokio floor needs answers with a Content-Length")?;
                let total = n.checked_add(len).context("answer length overflows")?;
                if total > MAX_ANSWER {
                    bail!("answer of {total} bytes, over the floor's {MAX_ANSWER}");
                }
                break total;
            }
            if ubuf.len() > MAX_HEAD {
                bail!("answer head over {MAX_HEAD} bytes");
            }
            if u.read_buf(&mut ubuf).await? == 0 {
                bail!("upstream closed before its answer");
            }
        };
        while ubuf.len() < total {
            if u.read_buf(&mut ubuf).await? == 0 {
                bail!("upstream closed inside its answer");
            }
        }
        client.write_all(&ubuf.split_to(total)).await?;
        // Pingora's stream buffers writes (a plain TcpStream's flush does nothing).
        client.flush().await?;
    }
}

struct Floor {
    upstream: SocketAddr,
    own: bool,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();
    fn new_ctx(&self) {}

    /// As markco: the `own` floor drops Pingora's default (disabled) compression module, the
    /// `pingora` floor keeps it, as bare Pingora does.
    fn init_downstream_modules(&self, modules: &mut pingora::modules::http::HttpModules) {
        if !self.own {
            modules.add_module(pingora::modules::http::compression::ResponseCompressionBuilder::enable(0));
        }
    }

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> pingora::Result<bool> {
        if !self.own || !session.is_body_empty() {
            return Ok(false);
        }
        let mut req = session.req_header().clone();
        req.set_version(pingora::http::Version::HTTP_11);
        // HTTP/2 carries the host as :authority; an HTTP/1.1 upstream needs a Host line.
        if req.headers.get("host").is_none() {
            if let Some(authority) = req.uri.authority().map(|a| a.as_str().to_owned()) {
                req.insert_header("host", authority)?;
            }
        }
        let target = markco_proxy::upstream::Target {
            addr: self.upstream,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(60)),
        };
        // Pingora's serialiser, as markco's loop used before it wrote heads itself: the floors
        // stay comparable with their earlier figures.
        let wire = pingora::protocols::http::v1::client::http_req_header_to_wire(&req)
            .ok_or_else(|| pingora::Error::explain(pingora::ErrorType::InvalidHTTPHeader, "unwritable request"))?;
        markco_proxy::upstream::forward(session, &wire, &target, |_| Ok(())).await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

/// The `tokio` floor's loop on the streams Pingora's listener accepts (Pingora sets
/// `TCP_NODELAY` on them).
struct App {
    upstream: SocketAddr,
}

#[async_trait]
impl ServerApp for App {
    async fn process_new(self: &Arc<Self>, stream: Stream, _shutdown: &ShutdownWatch) -> Option<Stream> {
        if let Err(e) = tokio_conn(stream, self.upstream).await {
            eprintln!("floor: {e:#}");
        }
        None
    }
}

/// Pingora's HTTP/1 proxy `Session` driven by our own loop instead of `HttpProxy`: what
/// leaving `HttpProxy` (its phases, modules and session moves) but keeping Pingora's HTTP/1
/// session would save.
struct SessionApp {
    floor: Floor,
}

#[async_trait]
impl ServerApp for SessionApp {
    async fn process_new(self: &Arc<Self>, mut stream: Stream, _shutdown: &ShutdownWatch) -> Option<Stream> {
        loop {
            let mut session = Session::new_h1(stream);
            match session.downstream_session.read_request().await {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => {
                    eprintln!("floor: {e}");
                    return None;
                }
            }
            if let Err(e) = self.floor.request_filter(&mut session, &mut ()).await {
                eprintln!("floor: {e}");
                return None;
            }
            let (next, pipelined) = session.downstream_session.finish().await.ok().flatten()?.into_parts();
            if pipelined.is_some_and(|b| !b.is_empty()) {
                // Not needed for the benchmarks (wrk does not pipeline).
                eprintln!("floor: the session floor does not take pipelined requests");
                return None;
            }
            stream = next;
        }
    }
}

fn pingora_floor(args: &Args) -> anyhow::Result<()> {
    // As markco runs by default: one runtime per thread, no work stealing.
    let conf = ServerConf {
        threads: args.threads.max(1),
        work_stealing: false,
        // The benchmarks stop their servers with SIGINT and wait 5 s; nothing here needs a grace.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    if matches!(args.kind, Kind::Session) {
        let app = SessionApp { floor: Floor { upstream: args.upstream, own: true } };
        let mut service = Service::new("floor session".to_string(), app);
        service.add_tcp(&args.listen.to_string());
        server.add_service(service);
        server.run_forever()
    }
    if matches!(args.kind, Kind::App) {
        let mut service = Service::new("floor app".to_string(), App { upstream: args.upstream });
        service.add_tcp(&args.listen.to_string());
        server.add_service(service);
        server.run_forever()
    }
    let floor = Floor { upstream: args.upstream, own: matches!(args.kind, Kind::Own) };
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, floor);
    match &args.tls {
        Some(files) => {
            let [cert, key] = files.as_slice() else { bail!("--tls takes a certificate and a key") };
            let mut tls = pingora::listeners::tls::TlsSettings::intermediate(cert, key)
                .map_err(|e| anyhow::anyhow!("loading {cert} and {key}: {e}"))?;
            tls.enable_h2();
            service.add_tls_with_settings(&args.listen.to_string(), None, tls);
        }
        None => service.add_tcp(&args.listen.to_string()),
    }
    server.add_service(service);
    server.run_forever()
}
