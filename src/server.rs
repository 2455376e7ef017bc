//! Wiring: the edge listener, the admin listener and the signal handler on one Pingora server.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use markco_certs::alpn::PreTlsHook;
use markco_certs::manager::HandshakeCounter;
use markco_certs::{CertManager, CertStore, SecretKey, TlsMetrics};
use markco_control::api::{LazyStarter, PublicApi};
use markco_control::fleet_certs::{self, FleetSetup};
use markco_control::plane::{self, ControlPlane};
use markco_proxy::app::EdgeApp;
use markco_proxy::conn::ConnLimits;
use markco_proxy::table::TablePublisher;
use markco_proxy::{Gateway, Metrics, RouteTable};
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::{L4BufferSettings, DEFAULT_L4_WRITE_BUFFER_SIZE};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::admin::AdminApp;
use crate::config::Config;
use crate::reload::Reloader;

/// SIGHUP re-reads the config.
struct HangupReload {
    reloader: Arc<Reloader>,
}

#[async_trait]
impl BackgroundService for HangupReload {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot listen for SIGHUP, reload only through the admin API: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    tracing::info!(target: "markco::reload", "SIGHUP: reloading the config");
                    let r = self.reloader.clone();
                    // The result is logged and counted by reload() itself.
                    let _ = tokio::task::spawn_blocking(move || r.reload()).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Obtains and renews certificates; its I/O (the ACME client, and with `[cluster]` the fleet's
/// shared certificates in PostgreSQL) lives on this service's runtime.
struct CertService {
    manager: Arc<CertManager>,
    fleet: std::sync::Mutex<Option<FleetSetup>>,
}

#[async_trait]
impl BackgroundService for CertService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let setup = self.fleet.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut loops = Vec::new();
        if let Some(setup) = setup {
            // No order before the fleet's lock is reachable.
            match fleet_certs::join(setup, self.manager.clone(), &mut shutdown).await {
                Some(handles) => loops = handles,
                None => return,
            }
        }
        self.manager.run(shutdown).await;
        for l in loops {
            l.abort();
        }
    }
}

/// The control plane's loop (database, session lookups, workspace changes, health checks).
struct ControlService {
    plane: Arc<ControlPlane>,
}

#[async_trait]
impl BackgroundService for ControlService {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.plane.clone().run(shutdown).await;
    }
}

/// Fails early, with the address in the message, when a port is taken (Pingora would panic).
fn check_bindable(what: &str, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    TcpListener::bind(addr)
        .map(drop)
        .with_context(|| format!("cannot listen on {addr} for the {what} listener (is another process using it? change `{what}` under [server])"))
}

/// A database URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

pub fn run(cfg: Config, path: Option<PathBuf>, upgrade: bool) -> anyhow::Result<()> {
    // Until our handler is installed, a SIGHUP must not kill the process.
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    if !upgrade {
        check_bindable("http", cfg.server.http)?;
        check_bindable("admin", cfg.server.admin)?;
        if let Some(https) = cfg.server.https {
            check_bindable("https", https)?;
        }
    }
    let metrics = Metrics::new();
    // The workspace map comes from the database before any listener accepts a request.
    let boot = plane::bootstrap(&cfg.plane.database_url, cfg.plane.workspaces.as_ref(), cfg.plane.cluster.as_ref())
        .with_context(|| format!("opening the database {}", redact_url(&cfg.plane.database_url)))?;
    tracing::info!(workspaces = boot.rows.len(), route_holds = boot.holds.len(), "state loaded from the database");
    let (publisher, table) = TablePublisher::new(RouteTable::new(1, cfg.build_routing(&metrics)));
    // The publisher goes to the state owner: from here on, only its commands change the table.
    let control = ControlPlane::new(publisher, cfg.plane.clone(), &metrics.registry);
    // Workspaces, and an operator's switch (it outlives a restart), applied before any listener
    // accepts a request.
    control.restore(&boot).context("the state stored in the database breaks an invariant")?;
    let admin_token = Arc::new(ArcSwap::from_pointee(cfg.server.admin_token.clone()));
    metrics.table_generation.set(1);

    let conf = ServerConf {
        threads: cfg.server.threads,
        work_stealing: cfg.server.work_stealing,
        grace_period_seconds: Some(cfg.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(cfg.server.shutdown_timeout.as_secs()),
        upgrade_sock: cfg.server.upgrade_sock.display().to_string(),
        pid_file: cfg.server.pid_file.display().to_string(),
        ..ServerConf::default()
    };
    let opt = Opt { upgrade, ..Opt::default() };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let store = Arc::new(CertStore::new(TlsMetrics::new(&metrics.registry)));
    let certs = Arc::new(CertManager::new(store.clone(), cfg.acme.clone()));
    // Stored and file certificates are served from the first handshake; orders run later.
    for problem in certs.apply(cfg.acme.clone(), cfg.tls_plan()) {
        tracing::error!("{problem}");
    }

    // [cluster]: one account, one order per name and the certificates themselves are shared
    // through the database, their secrets sealed with the key of `secret_file`.
    let mut fleet = None;
    let mut acme_lookup = None;
    if let Some(cluster) = &cfg.plane.cluster {
        match &cluster.secret_file {
            Some(file) => {
                let secret = SecretKey::from_file(file)?;
                let (lookup, rx) = fleet_certs::token_lookups();
                acme_lookup = Some(lookup);
                fleet = Some(FleetSetup {
                    database_url: cfg.plane.database_url.clone(),
                    secret,
                    node: cluster.node.clone(),
                    lookups: rx,
                    supervisor: control.supervisor.clone(),
                });
            }
            // The config check refuses ACME sites without it; a reload that adds some orders nothing.
            None => certs.require_fleet(),
        }
    }

    // Open websockets get a Close frame just before the grace period of a shutdown ends.
    let drain = Arc::new(markco_proxy::drain::Drain::new(cfg.server.grace_period));
    let mut gateway = Gateway::new(table.clone(), metrics.clone(), certs.tokens.clone())
        .with_drain(drain.clone())
        .with_identity(control.sessions.clone())
        .with_control(Arc::new(PublicApi { plane: control.clone(), admin_token: admin_token.clone() }));
    if let Some(lookup) = acme_lookup {
        gateway = gateway.with_acme_lookup(lookup);
    }
    if let Some(ws) = &cfg.plane.workspaces {
        let wait = ws.ready_timeout + std::time::Duration::from_secs(2);
        gateway = gateway.with_starter(Arc::new(LazyStarter { plane: control.clone(), wait }));
    }
    let conn_limits = ConnLimits::new(cfg.server.max_connections_per_ip, cfg.server.max_connections, &metrics.registry);
    let edge_app = EdgeApp::new(
        gateway,
        &server.configuration,
        cfg.server.header_timeout,
        conn_limits.clone(),
        metrics.header_timeouts.clone(),
    )
    .with_drain(drain);
    let mut edge = Service::new("markco edge".to_string(), edge_app);
    // No read buffer in front of the client socket: Pingora's HTTP/1 reader reads into its own
    // buffer anyway, and the default 64 KiB one is allocated (and touched) for every connection
    // for its whole life, idle websockets and slow clients included.
    let l4_buffer = L4BufferSettings::new(0, DEFAULT_L4_WRITE_BUFFER_SIZE);
    edge.endpoints().add_listener(ListenerConfig::tcp(cfg.server.http.to_string()).l4_buffer(l4_buffer));
    if let Some(https) = cfg.server.https {
        let mut tls =
            pingora::listeners::tls::TlsSettings::with_callbacks(Box::new(HandshakeCounter { store: store.clone() }))
                .context("setting up the HTTPS listener")?;
        tls.set_cert_resolver(store.clone());
        tls.enable_h2();
        edge.endpoints().add_listener(ListenerConfig::tcp(https.to_string()).tls(tls).l4_buffer(l4_buffer));
        edge.endpoints().set_pre_tls_callback(Arc::new(PreTlsHook {
            store: store.clone(),
            hello_timeout: cfg.server.header_timeout,
        }));
    }

    let summary = format!(
        "http {}, https {}, admin {}; {} sites, {} routes",
        cfg.server.http,
        cfg.server.https.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        cfg.server.admin,
        cfg.sites.len(),
        cfg.route_count()
    );
    let notifier = crate::systemd::Notifier {
        http: cfg.server.http,
        admin: cfg.server.admin,
        plane: control.clone(),
        summary,
        took_over: upgrade,
    };
    let self_upgrade = crate::upgrade::SelfUpgrade { upgrade_sock: cfg.server.upgrade_sock.clone() };
    let http_addr = cfg.server.http;
    let admin_addr = cfg.server.admin;
    let https_addr = cfg.server.https;
    let reloader = Arc::new(
        Reloader::new(path, metrics, certs.clone(), control.clone(), admin_token, cfg).with_conn_limits(conn_limits),
    );
    let mut admin =
        Service::new("markco admin".to_string(), AdminApp { reloader: reloader.clone(), plane: control.clone() });
    admin.add_tcp(&admin_addr.to_string());
    admin.threads = Some(1);

    server.add_service(edge);
    server.add_service(admin);
    server.add_service(background_service("reload on SIGHUP", HangupReload { reloader }));
    server.add_service(background_service(
        "certificates",
        CertService { manager: certs, fleet: std::sync::Mutex::new(fleet) },
    ));
    server.add_service(background_service("control plane", ControlService { plane: control }));
    server.add_service(background_service("systemd notify", notifier));
    server.add_service(background_service("upgrade on SIGUSR2", self_upgrade));
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        http = %http_addr,
        https = %https_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        admin = %admin_addr,
        "markco starting"
    );
    server.run(RunArgs::default());
    tracing::info!("markco stopped");
    Ok(())
}
