//! The container engine: what the control plane needs from podman, behind a trait so the
//! workspace logic does not depend on one engine's API.

use std::collections::BTreeMap;

use async_trait::async_trait;
use futures_util::stream::BoxStream;

pub mod podman;

/// Every container and pod markco creates carries these labels; markco never touches one that
/// does not have `markco.managed=true`.
pub const LABEL_MANAGED: &str = "markco.managed";
pub const LABEL_USER: &str = "markco.user";
/// "editor" or "runtime".
pub const LABEL_ROLE: &str = "markco.role";
/// Which markco (state) the container belongs to: gateways with different databases sharing one
/// podman never adopt or remove each other's containers.
pub const LABEL_INSTANCE: &str = "markco.instance";
/// `[cluster]`: the node that runs the container.
pub const LABEL_NODE: &str = "markco.node";

/// A pod: one network namespace per user, shared by their editor and runtime, publishing only
/// the editor's (and, for the gateway, the runtime's) port on 127.0.0.1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The host address the ports are published on.
    pub host_ip: std::net::IpAddr,
    /// (host port, container port)
    pub publish: Vec<(u16, u16)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    pub pod: String,
    pub image: String,
    /// Empty: the image's default command.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// Bind mounts (host path, container path).
    pub mounts: Vec<(String, String)>,
    pub memory_bytes: Option<u64>,
    /// CPUs, e.g. 0.5.
    pub cpus: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub pod: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// "running", "exited", "created", ...
    pub state: String,
}

/// A container lifecycle event (only for markco's containers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    pub name: String,
    /// "died", "start", "stop", "remove", ...
    pub status: String,
    pub labels: BTreeMap<String, String>,
}

#[async_trait]
pub trait ContainerEngine: Send + Sync {
    /// Is the engine reachable? (Its version, for logs.)
    async fn ping(&self) -> anyhow::Result<String>;
    /// Creates a pod (error if it exists).
    async fn create_pod(&self, spec: &PodSpec) -> anyhow::Result<()>;
    /// Creates a container in its pod (not started).
    async fn create_container(&self, spec: &ContainerSpec) -> anyhow::Result<String>;
    /// Starts a pod and its containers.
    async fn start_pod(&self, name: &str) -> anyhow::Result<()>;
    async fn stop_pod(&self, name: &str, timeout_secs: u32) -> anyhow::Result<()>;
    /// Removes a pod and its containers (forcefully). Refuses a pod without markco's label.
    async fn remove_pod(&self, name: &str) -> anyhow::Result<()>;
    async fn restart_container(&self, name: &str) -> anyhow::Result<()>;
    /// Starts one (created) container of a running pod. Refuses one without markco's label.
    async fn start_container(&self, name: &str) -> anyhow::Result<()>;
    /// Removes one container (forcefully); a missing one is fine. Refuses one without markco's label.
    async fn remove_container(&self, name: &str) -> anyhow::Result<()>;
    /// markco's containers (label `markco.managed=true`), running or not.
    async fn list_managed(&self) -> anyhow::Result<Vec<ContainerInfo>>;
    /// Lifecycle events of markco's containers, as they happen.
    async fn events(&self) -> anyhow::Result<BoxStream<'static, anyhow::Result<ContainerEvent>>>;
}
