//! The config file as written: TOML with spans kept, so every error can name a line and column.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub log: RawLog,
    pub tls: Option<RawTls>,
    pub database: Option<RawDatabase>,
    pub sessions: Option<RawSessions>,
    pub runtime_moves: Option<RawMoves>,
    pub workspaces: Option<Spanned<RawWorkspaces>>,
    pub cluster: Option<Spanned<RawCluster>>,
    #[serde(default, rename = "health_check")]
    pub health_checks: Vec<Spanned<RawHealthCheck>>,
    #[serde(default, rename = "site")]
    pub sites: Vec<Spanned<RawSite>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub email: Option<Spanned<String>>,
    pub acme_directory: Option<Spanned<String>>,
    pub acme_ca_root: Option<Spanned<String>>,
    pub storage: Option<Spanned<String>>,
    pub challenges: Option<Spanned<Vec<Spanned<String>>>>,
    pub renew_before: Option<Spanned<String>>,
    pub renew_check_interval: Option<Spanned<String>>,
    pub retry_initial: Option<Spanned<String>>,
    pub retry_max: Option<Spanned<String>>,
    pub order_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub http: Option<Spanned<String>>,
    pub https: Option<Spanned<String>>,
    pub redirect_to_https: Option<bool>,
    pub hsts: Option<Spanned<String>>,
    pub admin: Option<Spanned<String>>,
    pub admin_token_file: Option<Spanned<String>>,
    pub threads: Option<Spanned<i64>>,
    pub work_stealing: Option<bool>,
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    pub header_timeout: Option<Spanned<String>>,
    pub client_idle_timeout: Option<Spanned<String>>,
    pub upstream_connect_timeout: Option<Spanned<String>>,
    pub upstream_idle_timeout: Option<Spanned<String>>,
    pub websocket_idle_timeout: Option<Spanned<String>>,
    pub max_header_bytes: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_ip: Option<Spanned<i64>>,
    pub grace_period: Option<Spanned<String>>,
    pub shutdown_timeout: Option<Spanned<String>>,
    pub upgrade_sock: Option<Spanned<String>>,
    pub pid_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub access_log: Option<bool>,
    pub format: Option<Spanned<String>>,
    pub level: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSite {
    pub hosts: Spanned<Vec<Spanned<String>>>,
    /// "acme", "off", or { cert = "...", key = "..." }.
    pub tls: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub route: Vec<Spanned<RawRoute>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Option<Spanned<String>>,
    #[serde(rename = "match")]
    pub patterns: Spanned<Vec<Spanned<String>>>,
    pub proxy: Option<Spanned<String>>,
    #[serde(rename = "static")]
    pub static_root: Option<Spanned<String>>,
    pub redirect: Option<Spanned<String>>,
    pub respond: Option<Spanned<String>>,
    pub status: Option<Spanned<i64>>,
    pub content_type: Option<Spanned<String>>,
    pub strip_prefix: Option<Spanned<String>>,
    pub index: Option<Vec<String>>,
    pub workspace: Option<Spanned<bool>>,
    pub runtime: Option<Spanned<bool>>,
    pub user_service: Option<Spanned<String>>,
    pub control: Option<Spanned<bool>>,
    pub upgrades: Option<Spanned<Vec<Spanned<String>>>>,
    pub rate_limit: Option<Spanned<String>>,
    pub burst: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub url: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub node: Option<Spanned<String>>,
    pub advertise: Option<Spanned<String>>,
    pub heartbeat: Option<Spanned<String>>,
    pub node_timeout: Option<Spanned<String>>,
    pub poll: Option<Spanned<String>>,
    pub change_retention: Option<Spanned<String>>,
    pub secret_file: Option<Spanned<String>>,
    pub capacity: Option<Spanned<std::collections::BTreeMap<String, i64>>>,
    pub shared_data: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawSessions {
    pub cache_ttl: Option<Spanned<String>>,
    pub negative_cache_ttl: Option<Spanned<String>>,
    pub cache_capacity: Option<Spanned<i64>>,
    pub lookup_timeout: Option<Spanned<String>>,
    pub outage_grace: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMoves {
    pub max_moves: Option<Spanned<i64>>,
    pub window: Option<Spanned<String>>,
    pub probe_timeout: Option<Spanned<String>>,
    pub notify_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub name: Spanned<String>,
    pub url: Spanned<String>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub disable_route: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawWorkspaces {
    pub engine: Option<Spanned<String>>,
    pub data_dir: Option<Spanned<String>>,
    pub data_uid: Option<Spanned<i64>>,
    pub editor_image: Option<Spanned<String>>,
    pub runtime_image: Option<Spanned<String>>,
    pub editor_ports: Option<Spanned<String>>,
    pub runtime_ports: Option<Spanned<String>>,
    pub ready_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub editor_command: Option<Vec<String>>,
    pub runtime_command: Option<Vec<String>>,
    pub editor_env: Option<std::collections::BTreeMap<String, String>>,
    pub runtime_env: Option<std::collections::BTreeMap<String, String>>,
    pub editor_memory_mb: Option<Spanned<i64>>,
    pub runtime_memory_mb: Option<Spanned<i64>>,
    pub runtime_cpus: Option<Spanned<f64>>,
    pub health_interval: Option<Spanned<String>>,
    pub plans: Option<std::collections::BTreeMap<String, RawPlan>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPlan {
    pub editor_memory_mb: Option<Spanned<i64>>,
    pub runtime_memory_mb: Option<Spanned<i64>>,
    pub runtime_cpus: Option<Spanned<f64>>,
}
