//! markco's control plane: identity (session cache), per-user workspaces and runtime moves, the
//! state in SQLite or PostgreSQL, health checks, and the control API.

pub mod api;
pub mod cluster;
pub mod db;
pub mod engine;
pub mod fleet_certs;
pub mod http_client;
pub mod plane;
pub mod runtime_health;
pub mod sessions;
pub mod state;
pub mod supervise;
pub mod switches;
pub mod workspaces;
