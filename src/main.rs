//! `markco`: the edge gateway of the markco platform.

mod admin;
mod config;
mod ctl;
mod import_caddy;
mod logging;
mod reload;
mod server;
mod systemd;
mod ui;
mod upgrade;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

// The proxy allocates small, short-lived buffers per request; mimalloc serves them with far less
// contention between worker threads than glibc's malloc (measured in benches/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "markco", version, about = "Edge gateway and control plane of the markco platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (with no --config: the embedded default on http://127.0.0.1:8080).
    Run {
        /// The TOML config file.
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// Log format: text for a terminal, json for journald and log shippers.
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
        /// Log filter, e.g. "info" or "debug,pingora_core=warn" (default: info, or RUST_LOG).
        #[arg(long)]
        log_level: Option<String>,
        /// Take the listening sockets over from a running markco (graceful upgrade); send the old
        /// process SIGQUIT once this one has started.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config file; on error print where and what is wrong, and exit non-zero.
    Check {
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
    /// Run the database migrations (they also run at every start).
    Migrate {
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
    },
    /// Manage users of the embedded identity store (for trying markco locally).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Translate Caddy's JSON config (e.g. `curl localhost:2019/config/`, or `caddy adapt`'s
    /// output) to a markco config on stdout; what could not be translated is listed on stderr
    /// and the exit code is 1 (2 when the file cannot be read at all).
    ImportCaddy {
        /// The Caddy JSON config file.
        file: PathBuf,
    },
    /// The running gateway at a glance: version, routes (and which are off), workspaces,
    /// certificates, health checks. Exit 1 when a health check fails or a certificate expires
    /// within 14 days, 3 when the admin API cannot be reached or refuses the token.
    Status {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// The live route table, with each route's switch.
    Routes {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Every user's workspace: state, editor and runtime addresses.
    Workspaces {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// The certificates served, with their expiry (exit 1 when one expires within 14 days).
    Certs {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Switch a route off (503 with Retry-After) or on again.
    Route {
        #[command(subcommand)]
        action: RouteAction,
    },
    /// Act on a user's workspace.
    Workspace {
        #[command(subcommand)]
        action: WorkspaceAction,
    },
    /// Print the version.
    Version,
}

/// Which gateway an operator command talks to.
#[derive(clap::Args)]
struct AdminTarget {
    /// The config the gateway runs with: its `[server] admin` address and `admin_token_file`.
    #[arg(long, short = 'c', default_value = "/etc/markco/markco.toml")]
    config: PathBuf,
    /// Print the admin API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum RouteAction {
    /// Turn the route off: its requests get 503 with Retry-After until it is enabled again.
    Disable {
        name: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Turn the route on again.
    Enable {
        name: String,
        #[command(flatten)]
        target: AdminTarget,
    },
}

#[derive(Subcommand)]
enum WorkspaceAction {
    /// Stop the user's editor and runtime containers (the next visit starts them again).
    Stop {
        user: String,
        #[command(flatten)]
        target: AdminTarget,
    },
}

/// Runs an operator command against the gateway the config names.
fn ctl(target: AdminTarget, op: ctl::Op) -> ExitCode {
    match config::load(&target.config) {
        Ok(cfg) => ctl::run(&cfg, op, target.json),
        Err(e) => {
            eprint!("{e}");
            eprintln!(
                "help: operator commands read the admin address and token from the config markco runs with \
                 (--config); run them as a user who may read its admin_token_file (e.g. with sudo)"
            );
            ExitCode::from(2)
        }
    }
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user and print its id and a new session token.
    Add {
        email: String,
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// Print {"id": ..., "token": ...} as JSON.
        #[arg(long)]
        json: bool,
        /// How long the session is valid.
        #[arg(long, default_value = "30d")]
        session_ttl: String,
    },
}

/// The config given, or the embedded default; exits with the error otherwise.
fn load_or_default(path: &Option<PathBuf>) -> Result<config::Config, ExitCode> {
    let loaded = match path {
        Some(p) => config::load(p),
        None => config::Config::embedded(),
    };
    loaded.map_err(|e| {
        eprint!("{e}");
        ExitCode::from(2)
    })
}

fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn import_caddy_cmd(file: &std::path::Path) -> ExitCode {
    let src = match std::fs::read_to_string(file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    let mut im = match import_caddy::import(&src) {
        Ok(im) => im,
        Err(e) => {
            eprintln!("error: {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    // The output must pass `markco check`; validate it the same way before anyone deploys it.
    // Relative paths in it are taken from the working directory, where it is usually written.
    match config::parse(std::path::Path::new("markco.toml"), &im.toml) {
        Ok(c) => im.notes.extend(c.warnings),
        Err(e) => im.untranslated.push(format!("the generated config does not pass `markco check`:\n{e}")),
    }
    print!("{}", im.toml);
    eprintln!("import-caddy: {}: {} routes in {} sites written to stdout", file.display(), im.routes, im.sites);
    for n in &im.notes {
        eprintln!("note: {n}");
    }
    for u in &im.untranslated {
        eprintln!("NOT TRANSLATED: {u}");
    }
    if im.untranslated.is_empty() {
        eprintln!("import-caddy: everything translated; next: markco check --config FILE");
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "import-caddy: {} part(s) not translated (listed above and at the top of the output); edit the config by hand before switching over",
            im.untranslated.len()
        );
        ExitCode::from(1)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One crypto provider (ring) for Pingora's listener and the ACME client alike.
    markco_certs::install_crypto_provider();
    match cli.command {
        Command::Version => {
            println!("markco {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Migrate { config } => {
            let cfg = match load_or_default(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            block_on(async move {
                let db = markco_control::db::Db::connect(&cfg.plane.database_url).await?;
                db.migrate().await?;
                println!("{}: migrations applied ({})", server::redact_url(&cfg.plane.database_url), db.backend());
                db.close().await;
                Ok(())
            })
        }
        Command::User { command: UserCommand::Add { email, config, json, session_ttl } } => {
            let cfg = match load_or_default(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let ttl = match humantime::parse_duration(&session_ttl) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: --session-ttl {session_ttl:?}: {e}");
                    return ExitCode::from(2);
                }
            };
            block_on(async move {
                let db = markco_control::db::Db::connect(&cfg.plane.database_url).await?;
                db.migrate().await?;
                let id = db.create_user(&email).await?;
                let token = db.create_session(&id, ttl).await?;
                db.close().await;
                if json {
                    println!("{}", serde_json::json!({"id": id, "token": token}));
                } else {
                    println!("user   {id}\ntoken  {token}\n\ntry:   curl -H 'Authorization: Bearer {token}' http://{}/u/{id}/", cfg.server.http);
                }
                Ok(())
            })
        }
        Command::ImportCaddy { file } => import_caddy_cmd(&file),
        Command::Status { target } => ctl(target, ctl::Op::Status),
        Command::Routes { target } => ctl(target, ctl::Op::Routes),
        Command::Workspaces { target } => ctl(target, ctl::Op::Workspaces),
        Command::Certs { target } => ctl(target, ctl::Op::Certs),
        Command::Route { action: RouteAction::Disable { name, target } } => {
            ctl(target, ctl::Op::Route { name, disable: true })
        }
        Command::Route { action: RouteAction::Enable { name, target } } => {
            ctl(target, ctl::Op::Route { name, disable: false })
        }
        Command::Workspace { action: WorkspaceAction::Stop { user, target } } => {
            ctl(target, ctl::Op::WorkspaceStop { user })
        }
        Command::Check { config } => match config::load(&config) {
            Ok(c) => {
                for w in &c.warnings {
                    eprintln!("warning: {w}");
                }
                println!(
                    "{}: ok ({} sites, {} routes; http {}, admin {})",
                    config.display(),
                    c.sites.len(),
                    c.route_count(),
                    c.server.http,
                    c.server.admin
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config: path, log_format, log_level, upgrade } => {
            let loaded = match &path {
                Some(p) => config::load(p),
                None => config::Config::embedded(),
            };
            let cfg = match loaded {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::from(2);
                }
            };
            let format = match log_format {
                Some(LogFormatArg::Json) => config::LogFormat::Json,
                Some(LogFormatArg::Text) => config::LogFormat::Text,
                None => cfg.log.format.unwrap_or(config::LogFormat::Text),
            };
            let level = log_level.or_else(|| cfg.log.level.clone());
            if let Err(e) = logging::init(format, level.as_deref()) {
                eprintln!("error: cannot set up logging: {e:#}");
                return ExitCode::from(2);
            }
            for w in &cfg.warnings {
                tracing::warn!("{w}");
            }
            match server::run(cfg, path, upgrade) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
