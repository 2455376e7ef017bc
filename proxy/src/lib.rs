//! markco's data plane: the route table, path normalisation, the Pingora proxy, static files,
//! forwarded headers and request metrics.

pub mod app;
pub mod conn;
pub mod drain;
pub mod forwarded;
pub mod gateway;
pub mod h1;
pub mod identity;
pub mod metrics;
pub mod path;
pub mod pump;
pub mod ratelimit;
pub mod static_files;
pub mod table;
pub mod target;
pub mod tunnel;
pub mod upstream;
pub mod user_id;

pub use gateway::Gateway;
pub use metrics::Metrics;
pub use table::RouteTable;
