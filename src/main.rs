//! `markco`: the edge gateway of the markco platform.

mod admin;
mod config;
mod logging;
mod reload;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

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
    /// Print the version.
    Version,
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
