//! Several gateways on one PostgreSQL (`[cluster]`): the shared change log they follow, and the
//! node table they heartbeat into.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `[cluster]`: this gateway's place among several sharing one PostgreSQL.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// This gateway's name, unique in the cluster (`markco_nodes.id`, the change log's `node`).
    pub node: String,
    /// The address other gateways use to reach the containers this node runs.
    pub advertise: IpAddr,
    /// How often this node writes its heartbeat and its last applied change.
    pub heartbeat: Duration,
    /// A node whose heartbeat is older than this is down.
    pub node_timeout: Duration,
    /// How often the change log is read even without a NOTIFY (a missed NOTIFY costs at most this).
    pub poll: Duration,
    /// Changes older than this are trimmed even if a node that is down has not applied them
    /// (that node rebuilds its state from the tables when it comes back).
    pub change_retention: Duration,
    /// The key file every gateway has, that encrypts the private keys of the fleet's certificates
    /// in the database.
    pub secret_file: Option<PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node: String::new(),
            advertise: IpAddr::from([127, 0, 0, 1]),
            heartbeat: Duration::from_secs(2),
            node_timeout: Duration::from_secs(10),
            poll: Duration::from_secs(1),
            change_retention: Duration::from_secs(86_400),
            secret_file: None,
        }
    }
}
