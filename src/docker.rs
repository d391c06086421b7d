//! The Docker engine, behind a narrow trait: what containers and networks exist, and a
//! stream of what changes.
//!
//! - [`Engine`]: the trait the daemon holds as `Arc<dyn Engine>`. Its values are plain
//!   data ([`ContainerInfo`], [`NetworkInfo`], [`EngineEvent`]); no bollard type leaks
//!   out, so the rest of vipd and its tests never depend on the client library.
//! - [`DockerEngine`]: the real engine over the Docker API (bollard), with a timeout on
//!   every call.
//! - [`fake`]: an in-memory engine for unit tests, with containers, networks and events
//!   that a test sets and pushes.
//!
//! Only IPv4 is modelled: vipd's VIPs and backends are IPv4, so IPv6 subnets and
//! addresses are left out.
//!
//! How a consumer is meant to use it: subscribe with [`Engine::events`] first, then take
//! the full picture with [`Engine::containers`] and [`Engine::networks`], then apply
//! events (re-inspecting the container an event names). [`DockerEngine::events`] asks
//! the engine for every event from the moment `events()` was called, so nothing that
//! happens between the subscription and the listing is lost; an event may arrive twice
//! or describe a state the listing already showed, so applying one must be idempotent.
//! When the stream ends or yields an error, the engine went away: reconnect, resubscribe
//! and list again.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::models::{
    ContainerInspectResponse, EndpointSettings, EventMessage, EventMessageTypeEnum, HealthStatusEnum, Ipam,
    IpamConfig, Network, NetworkCreateRequest, NetworkInspect,
};
use bollard::query_parameters::{
    EventsOptions, InspectContainerOptions, InspectNetworkOptions, ListContainersOptions, ListNetworksOptions,
};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryStreamExt};
use serde::Serialize;

pub use crate::core::containers::{ContainerId, Health, NetworkId};

/// Where the Docker CLI and bollard look when `DOCKER_HOST` is not set.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// How long one API call may take before it fails with [`EngineError::Timeout`].
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How many container inspections [`DockerEngine::containers`] keeps in flight.
const INSPECT_CONCURRENCY: usize = 8;

/// A container as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerInfo {
    /// The full id (64 hex digits).
    pub id: ContainerId,
    /// The name, without Docker's leading `/`.
    pub name: String,
    /// The container's labels (image labels included, as Docker merges them).
    pub labels: BTreeMap<String, String>,
    /// Whether its process is running (paused containers count as running).
    pub running: bool,
    /// Its health, when it has a health check; `None` when it has none.
    pub health: Option<Health>,
    /// The pid of its init process on the host, while it runs.
    pub pid: Option<u32>,
    /// Its network namespace (Docker's `SandboxKey`: `EXECROOT/netns/<12 hex>`), while it
    /// runs with a network of its own; `None` for stopped containers and those that share
    /// another's namespace (`--network container:...`).
    pub sandbox_key: Option<PathBuf>,
    /// Its endpoints, one per network it is connected to, ordered by network name.
    pub networks: Vec<ContainerNetwork>,
}

/// One endpoint of a container: its place on one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerNetwork {
    /// The network's id.
    pub network_id: NetworkId,
    /// The network's name.
    pub name: String,
    /// The container's IPv4 address there (none on `host`/`none` networks, or while the
    /// container is stopped).
    pub ip: Option<Ipv4Addr>,
    /// The prefix length of that address (0 when there is no address).
    pub prefix_len: u8,
    /// The network's gateway as the container sees it.
    pub gateway: Option<Ipv4Addr>,
    /// The DNS aliases of the endpoint (Docker 20.10 adds the short container id).
    pub aliases: Vec<String>,
}

/// A network as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkInfo {
    /// The full id.
    pub id: NetworkId,
    /// The name.
    pub name: String,
    /// The driver: `bridge`, `overlay`, `host`, `null`, `macvlan`, ...
    pub driver: String,
    /// The IPv4 subnets of its IPAM configuration, as (network address, prefix length).
    pub subnets: Vec<(Ipv4Addr, u8)>,
    /// The IPv4 gateways of its IPAM configuration. Docker 20.10 records none for the
    /// default `bridge` network; its containers' endpoints carry the gateway.
    pub gateways: Vec<Ipv4Addr>,
}

/// A network as `docker network inspect` shows it: what vipd compares when it adopts
/// the cluster network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkDetail {
    pub id: NetworkId,
    pub name: String,
    pub driver: String,
    pub labels: BTreeMap<String, String>,
    /// The driver options (`com.docker.network.bridge.name`, ...).
    pub options: BTreeMap<String, String>,
    /// The IPv4 subnets of its IPAM configuration, as (network address, prefix length).
    pub subnets: Vec<(Ipv4Addr, u8)>,
    pub gateways: Vec<Ipv4Addr>,
    /// The IPAM's reserved (aux) addresses, by name.
    pub aux_addresses: BTreeMap<String, Ipv4Addr>,
    /// How many containers are attached.
    pub containers: usize,
}

/// A bridge network to create: one IPv4 subnet, its gateway, reserved addresses, driver
/// options and labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkCreate {
    pub name: String,
    pub subnet: (Ipv4Addr, u8),
    pub gateway: Ipv4Addr,
    pub aux_addresses: BTreeMap<String, Ipv4Addr>,
    pub options: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

/// Something that happened in the engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum EngineEvent {
    /// A container event.
    Container {
        /// The container.
        id: ContainerId,
        /// Docker's action (`create`, `start`, `die`, `kill`, `health_status: healthy`,
        /// `exec_create: CMD`, ...), parsed once here.
        action: EngineAction,
        /// The event's attributes: the container's labels, plus `name`, `image`, and
        /// per action `exitCode` (die), `signal` (kill), `oldName` (rename), ...
        attributes: BTreeMap<String, String>,
    },
    /// A network event.
    Network {
        /// The network.
        id: NetworkId,
        /// Docker's action: `create`, `connect`, `disconnect`, `destroy`, ...
        action: EngineAction,
        /// The container that was connected or disconnected.
        container: Option<ContainerId>,
    },
    /// Anything else (image, volume, daemon events, or one without an id).
    Other,
}

/// Why a call to the engine failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// No engine answers at the endpoint: no socket there, connection refused, or the
    /// connection broke. Retry later.
    #[error("Docker engine unavailable at {endpoint}: {reason} (is dockerd running? DOCKER_HOST selects another endpoint)")]
    Unavailable {
        /// The endpoint, as in `DOCKER_HOST`.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// The engine did not answer in time.
    #[error("Docker engine at {endpoint}: {operation} timed out after {after:?}")]
    Timeout {
        /// The endpoint.
        endpoint: String,
        /// The call, e.g. `inspect container 0123456789ab`.
        operation: String,
        /// The time allowed.
        after: Duration,
    },
    /// The engine answered with an error.
    #[error("Docker engine at {endpoint}: {operation} failed: {message}")]
    Api {
        /// The endpoint.
        endpoint: String,
        /// The call.
        operation: String,
        /// The HTTP status, when there was a response.
        status: Option<u16>,
        /// The engine's or the client's message.
        message: String,
    },
    /// The endpoint is not something this client can talk to.
    #[error("unsupported Docker endpoint {endpoint:?}: {reason}")]
    BadEndpoint {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
}

/// The Docker engine as vipd needs it. Object safe: the daemon holds an
/// `Arc<dyn Engine>`, tests a [`fake::FakeEngine`].
pub trait Engine: Send + Sync {
    /// Every container the engine knows, running or not.
    fn containers(&self) -> BoxFuture<'_, Result<Vec<ContainerInfo>, EngineError>>;

    /// One container, or `None` if the engine does not know it (any more).
    fn inspect<'a>(
        &'a self,
        id: &'a ContainerId,
    ) -> BoxFuture<'a, Result<Option<ContainerInfo>, EngineError>>;

    /// Every network.
    fn networks(&self) -> BoxFuture<'_, Result<Vec<NetworkInfo>, EngineError>>;

    /// Container and network events from now on. The stream ends, or yields an error,
    /// when the engine goes away.
    fn events(&self) -> BoxStream<'static, Result<EngineEvent, EngineError>>;

    /// One network by name or id, or `None` if there is none. (Engines that only watch
    /// answer that they cannot.)
    fn network<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<NetworkDetail>, EngineError>> {
        async move { Err(unsupported(&format!("inspect network {name}"))) }.boxed()
    }

    /// Create a bridge network; returns its id.
    fn create_network<'a>(
        &'a self,
        spec: &'a NetworkCreate,
    ) -> BoxFuture<'a, Result<NetworkId, EngineError>> {
        async move { Err(unsupported(&format!("create network {}", spec.name))) }.boxed()
    }

    /// Remove a network by name or id.
    fn remove_network<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        async move { Err(unsupported(&format!("remove network {name}"))) }.boxed()
    }
}

/// The answer of an engine without network management to a call for it.
fn unsupported(operation: &str) -> EngineError {
    EngineError::Api {
        endpoint: String::new(),
        operation: operation.to_owned(),
        status: None,
        message: "this engine does not manage networks".into(),
    }
}

/// The real engine, over the Docker API.
#[derive(Debug, Clone)]
pub struct DockerEngine {
    docker: bollard::Docker,
    endpoint: String,
    timeout: Duration,
}

impl DockerEngine {
    /// Connect to the engine `DOCKER_HOST` names (`unix:///var/run/docker.sock` when it is
    /// not set), agree on an API version, and allow each call [`DEFAULT_CALL_TIMEOUT`].
    pub async fn connect() -> Result<Self, EngineError> {
        let endpoint = std::env::var("DOCKER_HOST")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_owned());
        Self::connect_to(&endpoint, DEFAULT_CALL_TIMEOUT).await
    }

    /// Connect to `endpoint` (`unix:///path`, a plain socket path, or `tcp://host:port`
    /// without TLS), agree on an API version, and allow each call `timeout`.
    pub async fn connect_to(endpoint: &str, timeout: Duration) -> Result<Self, EngineError> {
        let secs = timeout.as_secs().max(1);
        let docker = if let Some(path) = endpoint.strip_prefix("unix://").or_else(|| {
            // A bare path is a socket, as the Docker CLI also accepts.
            endpoint.starts_with('/').then_some(endpoint)
        }) {
            if !Path::new(path).exists() {
                return Err(EngineError::Unavailable {
                    endpoint: endpoint.to_owned(),
                    reason: format!("no socket at {path}"),
                });
            }
            bollard::Docker::connect_with_unix(path, secs, bollard::API_DEFAULT_VERSION)
        } else if endpoint.starts_with("tcp://") || endpoint.starts_with("http://") {
            bollard::Docker::connect_with_http(endpoint, secs, bollard::API_DEFAULT_VERSION)
        } else {
            return Err(EngineError::BadEndpoint {
                endpoint: endpoint.to_owned(),
                reason: "expected unix:///path/to/docker.sock or tcp://host:port".to_owned(),
            });
        }
        .map_err(|e| classify(endpoint, "connect", timeout, e))?;

        let docker = run_with_timeout(endpoint, "negotiate the API version", timeout, async {
            docker.negotiate_version().await
        })
        .await?;
        Ok(DockerEngine {
            docker,
            endpoint: endpoint.to_owned(),
            timeout,
        })
    }

    /// The endpoint this engine talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The API version agreed with the engine, e.g. `1.41` for Docker 20.10.
    pub fn api_version(&self) -> String {
        let v = self.docker.client_version();
        format!("{}.{}", v.major_version, v.minor_version)
    }

    async fn call<T>(
        &self,
        operation: impl Into<String>,
        fut: impl std::future::Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T, EngineError> {
        run_with_timeout(&self.endpoint, operation, self.timeout, fut).await
    }

    async fn inspect_one(&self, id: &str) -> Result<Option<ContainerInfo>, EngineError> {
        let short = &id[..id.len().min(12)];
        let res = self
            .call(
                format!("inspect container {short}"),
                self.docker.inspect_container(id, None::<InspectContainerOptions>),
            )
            .await;
        match res {
            Ok(inspect) => Ok(container_from_inspect(inspect)),
            Err(EngineError::Api {
                status: Some(404), ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Await `fut` for at most `timeout`, mapping bollard's errors.
async fn run_with_timeout<T>(
    endpoint: &str,
    operation: impl Into<String>,
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<T, EngineError> {
    let operation = operation.into();
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(classify(endpoint, &operation, timeout, e)),
        Err(_) => Err(EngineError::Timeout {
            endpoint: endpoint.to_owned(),
            operation,
            after: timeout,
        }),
    }
}

/// A bollard error as an [`EngineError`]: transport failures mean the engine is
/// unavailable, responses are API errors.
fn classify(endpoint: &str, operation: &str, timeout: Duration, e: bollard::errors::Error) -> EngineError {
    use bollard::errors::Error as B;
    let endpoint = endpoint.to_owned();
    match e {
        B::SocketNotFoundError(path) => EngineError::Unavailable {
            endpoint,
            reason: format!("no socket at {path}"),
        },
        // bollard's own limit (the call timeout, in whole seconds) ran out first.
        B::RequestTimeoutError => EngineError::Timeout {
            endpoint,
            operation: operation.to_owned(),
            after: timeout,
        },
        B::DockerResponseServerError { status_code, message } => EngineError::Api {
            endpoint,
            operation: operation.to_owned(),
            status: Some(status_code),
            message,
        },
        e @ (B::HyperLegacyError { .. } | B::HyperResponseError { .. } | B::IOError { .. }) => {
            EngineError::Unavailable {
                endpoint,
                reason: format!("{operation}: {}", chain(&e)),
            }
        }
        e => EngineError::Api {
            endpoint,
            operation: operation.to_owned(),
            status: None,
            message: chain(&e),
        },
    }
}

/// An error with its sources, `outer: inner: innermost` (hyper's own message is only
/// "client error (Connect)"; the cause, e.g. "Connection refused", is in the sources).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

impl Engine for DockerEngine {
    fn network<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<NetworkDetail>, EngineError>> {
        async move {
            let res = self
                .call(
                    format!("inspect network {name}"),
                    self.docker.inspect_network(name, None::<InspectNetworkOptions>),
                )
                .await;
            match res {
                Ok(n) => Ok(detail_from(n)),
                Err(EngineError::Api {
                    status: Some(404), ..
                }) => Ok(None),
                Err(e) => Err(e),
            }
        }
        .boxed()
    }

    fn create_network<'a>(
        &'a self,
        spec: &'a NetworkCreate,
    ) -> BoxFuture<'a, Result<NetworkId, EngineError>> {
        async move {
            let (addr, prefix) = spec.subnet;
            let ipam = Ipam {
                config: Some(vec![IpamConfig {
                    subnet: Some(format!("{addr}/{prefix}")),
                    gateway: Some(spec.gateway.to_string()),
                    auxiliary_addresses: Some(
                        spec.aux_addresses
                            .iter()
                            .map(|(k, v)| (k.clone(), v.to_string()))
                            .collect(),
                    ),
                    ..Default::default()
                }]),
                ..Default::default()
            };
            let request = NetworkCreateRequest {
                name: spec.name.clone(),
                driver: Some("bridge".into()),
                ipam: Some(ipam),
                options: Some(spec.options.clone().into_iter().collect()),
                labels: Some(spec.labels.clone().into_iter().collect()),
                ..Default::default()
            };
            let created = self
                .call(
                    format!("create network {}", spec.name),
                    self.docker.create_network(request),
                )
                .await?;
            Ok(NetworkId(created.id))
        }
        .boxed()
    }

    fn remove_network<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        async move {
            self.call(format!("remove network {name}"), self.docker.remove_network(name))
                .await
        }
        .boxed()
    }

    fn containers(&self) -> BoxFuture<'_, Result<Vec<ContainerInfo>, EngineError>> {
        async move {
            let options = ListContainersOptions {
                all: true,
                ..Default::default()
            };
            let summaries = self
                .call("list containers", self.docker.list_containers(Some(options)))
                .await?;
            let ids: Vec<String> = summaries.into_iter().filter_map(|s| s.id).collect();
            // The listing lacks the pid and the SandboxKey: inspect each. One removed in
            // between is simply not there any more.
            let found: Vec<Option<ContainerInfo>> = futures::stream::iter(ids)
                .map(|id| async move { self.inspect_one(&id).await })
                .buffered(INSPECT_CONCURRENCY)
                .try_collect()
                .await?;
            Ok(found.into_iter().flatten().collect())
        }
        .boxed()
    }

    fn inspect<'a>(
        &'a self,
        id: &'a ContainerId,
    ) -> BoxFuture<'a, Result<Option<ContainerInfo>, EngineError>> {
        async move { self.inspect_one(&id.0).await }.boxed()
    }

    fn networks(&self) -> BoxFuture<'_, Result<Vec<NetworkInfo>, EngineError>> {
        async move {
            let networks = self
                .call(
                    "list networks",
                    self.docker.list_networks(None::<ListNetworksOptions>),
                )
                .await?;
            let mut out: Vec<NetworkInfo> = networks.into_iter().filter_map(network_from).collect();
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        }
        .boxed()
    }

    fn events(&self) -> BoxStream<'static, Result<EngineEvent, EngineError>> {
        // `since` now: the engine replays what happened between this call and the moment
        // the request reaches it (the stream is lazy: it is sent on the first poll).
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| format!("{}.{:09}", d.as_secs(), d.subsec_nanos()))
            .unwrap_or_else(|_| "0".to_owned());
        let options = EventsOptions {
            since: Some(since),
            until: None,
            filters: Some(HashMap::from([(
                "type".to_owned(),
                vec!["container".to_owned(), "network".to_owned()],
            )])),
        };
        let endpoint = self.endpoint.clone();
        let timeout = self.timeout;
        // No timeout here: an idle engine sends nothing for as long as nothing happens.
        self.docker
            .events(Some(options))
            .map(move |item| match item {
                Ok(message) => Ok(event_from_message(message)),
                Err(e) => Err(classify(&endpoint, "events", timeout, e)),
            })
            .boxed()
    }
}

/// A container from an inspect response; `None` without an id.
fn container_from_inspect(c: ContainerInspectResponse) -> Option<ContainerInfo> {
    let id = ContainerId(c.id.filter(|s| !s.is_empty())?);
    let name = c.name.unwrap_or_default().trim_start_matches('/').to_owned();
    let labels = c
        .config
        .and_then(|cfg| cfg.labels)
        .map(|l| l.into_iter().collect())
        .unwrap_or_default();
    let state = c.state.unwrap_or_default();
    let running = state.running.unwrap_or(false);
    let health = state
        .health
        .and_then(|h| h.status)
        .and_then(|status| match status {
            HealthStatusEnum::STARTING => Some(Health::Starting),
            HealthStatusEnum::HEALTHY => Some(Health::Healthy),
            HealthStatusEnum::UNHEALTHY => Some(Health::Unhealthy),
            HealthStatusEnum::NONE | HealthStatusEnum::EMPTY => None,
        });
    let pid = state
        .pid
        .filter(|_| running)
        .and_then(|p| u32::try_from(p).ok())
        .filter(|&p| p > 0);
    let settings = c.network_settings.unwrap_or_default();
    let sandbox_key = settings.sandbox_key.filter(|k| !k.is_empty()).map(PathBuf::from);
    let mut networks: Vec<ContainerNetwork> = settings
        .networks
        .unwrap_or_default()
        .into_iter()
        .map(|(name, ep)| endpoint_from(name, ep))
        .collect();
    networks.sort_by(|a, b| a.name.cmp(&b.name));
    Some(ContainerInfo {
        id,
        name,
        labels,
        running,
        health,
        pid,
        sandbox_key,
        networks,
    })
}

fn endpoint_from(name: String, ep: EndpointSettings) -> ContainerNetwork {
    let ip = parse_ipv4(ep.ip_address.as_deref());
    ContainerNetwork {
        network_id: NetworkId(ep.network_id.unwrap_or_default()),
        name,
        prefix_len: if ip.is_some() {
            ep.ip_prefix_len
                .and_then(|p| u8::try_from(p).ok())
                .filter(|&p| p <= 32)
                .unwrap_or(0)
        } else {
            0
        },
        ip,
        gateway: parse_ipv4(ep.gateway.as_deref()),
        aliases: ep.aliases.unwrap_or_default(),
    }
}

/// A network from a listing; `None` without an id.
fn network_from(n: Network) -> Option<NetworkInfo> {
    let id = NetworkId(n.id.filter(|s| !s.is_empty())?);
    let mut subnets = Vec::new();
    let mut gateways = Vec::new();
    for cfg in n.ipam.and_then(|i| i.config).unwrap_or_default() {
        if let Some(subnet) = cfg.subnet.as_deref().and_then(parse_ipv4_cidr) {
            subnets.push(subnet);
        }
        if let Some(gw) = parse_ipv4(cfg.gateway.as_deref()) {
            gateways.push(gw);
        }
    }
    Some(NetworkInfo {
        id,
        name: n.name.unwrap_or_default(),
        driver: n.driver.unwrap_or_default(),
        subnets,
        gateways,
    })
}

/// A network from an inspection; `None` without an id.
fn detail_from(n: NetworkInspect) -> Option<NetworkDetail> {
    let id = NetworkId(n.id.filter(|s| !s.is_empty())?);
    let mut detail = NetworkDetail {
        id,
        name: n.name.unwrap_or_default(),
        driver: n.driver.unwrap_or_default(),
        labels: n.labels.unwrap_or_default().into_iter().collect(),
        options: n.options.unwrap_or_default().into_iter().collect(),
        containers: n.containers.map_or(0, |c| c.len()),
        subnets: Vec::new(),
        gateways: Vec::new(),
        aux_addresses: BTreeMap::new(),
    };
    for cfg in n.ipam.and_then(|i| i.config).unwrap_or_default() {
        if let Some(subnet) = cfg.subnet.as_deref().and_then(parse_ipv4_cidr) {
            detail.subnets.push(subnet);
        }
        detail.gateways.extend(parse_ipv4(cfg.gateway.as_deref()));
        for (name, addr) in cfg.auxiliary_addresses.unwrap_or_default() {
            if let Some(addr) = parse_ipv4(Some(&addr)) {
                detail.aux_addresses.insert(name, addr);
            }
        }
    }
    Some(detail)
}

/// What an engine event says happened: Docker's action text, parsed once at this edge so
/// that nothing further in compares strings. Displays as Docker's text again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum EngineAction {
    Create,
    Start,
    Die,
    Kill,
    Stop,
    Destroy,
    /// A network's removal (older engines say `remove`, not `destroy`).
    Remove,
    Connect,
    Disconnect,
    /// `health_status: healthy`, `health_status: unhealthy`, ...: the text after the colon.
    HealthStatus(String),
    /// `exec_create: CMD`, `exec_start: CMD`, `exec_die`: a process run inside the
    /// container, which changes nothing vipd looks at. The whole text.
    Exec(String),
    /// Any other action (`pause`, `rename`, `update`, ...), as Docker wrote it.
    Other(String),
}

impl EngineAction {
    /// Docker's action text.
    pub fn parse(text: &str) -> Self {
        if let Some(status) = text.strip_prefix("health_status:") {
            return EngineAction::HealthStatus(status.trim().to_owned());
        }
        if text.starts_with("exec_") {
            return EngineAction::Exec(text.to_owned());
        }
        match text {
            "create" => EngineAction::Create,
            "start" => EngineAction::Start,
            "die" => EngineAction::Die,
            "kill" => EngineAction::Kill,
            "stop" => EngineAction::Stop,
            "destroy" => EngineAction::Destroy,
            "remove" => EngineAction::Remove,
            "connect" => EngineAction::Connect,
            "disconnect" => EngineAction::Disconnect,
            other => EngineAction::Other(other.to_owned()),
        }
    }
}

impl From<&str> for EngineAction {
    fn from(text: &str) -> Self {
        EngineAction::parse(text)
    }
}

impl fmt::Display for EngineAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineAction::Create => "create",
            EngineAction::Start => "start",
            EngineAction::Die => "die",
            EngineAction::Kill => "kill",
            EngineAction::Stop => "stop",
            EngineAction::Destroy => "destroy",
            EngineAction::Remove => "remove",
            EngineAction::Connect => "connect",
            EngineAction::Disconnect => "disconnect",
            EngineAction::HealthStatus(s) => return write!(f, "health_status: {s}"),
            EngineAction::Exec(s) | EngineAction::Other(s) => s,
        })
    }
}

/// An event; [`EngineEvent::Other`] for types vipd does not follow or without an id.
fn event_from_message(m: EventMessage) -> EngineEvent {
    let action = EngineAction::parse(&m.action.unwrap_or_default());
    let actor = m.actor.unwrap_or_default();
    let Some(id) = actor.id.filter(|s| !s.is_empty()) else {
        return EngineEvent::Other;
    };
    let mut attributes: BTreeMap<String, String> = actor.attributes.unwrap_or_default().into_iter().collect();
    match m.typ {
        Some(EventMessageTypeEnum::CONTAINER) => EngineEvent::Container {
            id: ContainerId(id),
            action,
            attributes,
        },
        Some(EventMessageTypeEnum::NETWORK) => EngineEvent::Network {
            id: NetworkId(id),
            action,
            container: attributes
                .remove("container")
                .filter(|c| !c.is_empty())
                .map(ContainerId),
        },
        _ => EngineEvent::Other,
    }
}

/// An IPv4 address; `None` for empty, IPv6 or malformed text.
fn parse_ipv4(s: Option<&str>) -> Option<Ipv4Addr> {
    s.filter(|s| !s.is_empty()).and_then(|s| s.parse().ok())
}

/// `a.b.c.d/len` as (address, prefix length); `None` for IPv6 or malformed text.
fn parse_ipv4_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, len) = s.split_once('/')?;
    let len: u8 = len.parse().ok().filter(|&l| l <= 32)?;
    Some((addr.parse().ok()?, len))
}

impl ContainerInfo {
    /// This container with one more label (a builder for tests and fakes).
    pub fn with_label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// This container with one more endpoint, keeping them ordered by network name.
    pub fn with_network(mut self, network: ContainerNetwork) -> Self {
        self.networks.push(network);
        self.networks.sort_by(|a, b| a.name.cmp(&b.name));
        self
    }
}

impl fmt::Display for EngineEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineEvent::Container { id, action, .. } => write!(f, "container {id} {action}"),
            EngineEvent::Network {
                id,
                action,
                container: Some(c),
            } => write!(f, "network {id} {action} container {c}"),
            EngineEvent::Network { id, action, .. } => write!(f, "network {id} {action}"),
            EngineEvent::Other => f.write_str("other"),
        }
    }
}

pub mod fake {
    //! An in-memory [`Engine`](super::Engine) for unit tests: the test sets the
    //! containers and networks it reports and pushes the events its streams yield.

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex, MutexGuard};

    use futures::channel::mpsc;
    use futures::future::BoxFuture;
    use futures::stream::BoxStream;
    use futures::{FutureExt, StreamExt};

    use super::{
        ContainerId, ContainerInfo, Engine, EngineError, EngineEvent, NetworkCreate, NetworkDetail,
        NetworkId, NetworkInfo,
    };

    #[derive(Default)]
    struct State {
        containers: BTreeMap<ContainerId, ContainerInfo>,
        networks: Vec<NetworkInfo>,
        /// Networks as inspected, by name: what `network`, `create_network` and
        /// `remove_network` work on.
        details: BTreeMap<String, NetworkDetail>,
        subscribers: Vec<mpsc::UnboundedSender<Result<EngineEvent, EngineError>>>,
        failure: Option<EngineError>,
        calls: usize,
    }

    /// A fake engine. Cheap to clone: clones share their state, so a test keeps one and
    /// hands another (as `Arc<dyn Engine>`) to the code under test.
    #[derive(Clone, Default)]
    pub struct FakeEngine {
        state: Arc<Mutex<State>>,
    }

    impl FakeEngine {
        /// An engine with no containers and no networks.
        pub fn new() -> Self {
            Self::default()
        }

        fn lock(&self) -> MutexGuard<'_, State> {
            // A test that panicked while holding the lock already failed; carry on.
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// Add a container, or replace the one with the same id.
        pub fn upsert_container(&self, container: ContainerInfo) {
            self.lock().containers.insert(container.id.clone(), container);
        }

        /// Remove a container; returns it if it was there.
        pub fn remove_container(&self, id: &ContainerId) -> Option<ContainerInfo> {
            self.lock().containers.remove(id)
        }

        /// Replace the list of networks.
        pub fn set_networks(&self, networks: Vec<NetworkInfo>) {
            self.lock().networks = networks;
        }

        /// Add a network as inspected, or replace the one with the same name.
        pub fn put_network(&self, detail: NetworkDetail) {
            self.lock().details.insert(detail.name.clone(), detail);
        }

        /// Send an event to every open event stream.
        pub fn push_event(&self, event: EngineEvent) {
            self.lock()
                .subscribers
                .retain(|tx| tx.unbounded_send(Ok(event.clone())).is_ok());
        }

        /// Make every call (and every new event stream) fail with `error` until
        /// [`FakeEngine::recover`]; open streams get the error and end, as when the real
        /// engine goes away.
        pub fn fail(&self, error: EngineError) {
            let mut state = self.lock();
            for tx in state.subscribers.drain(..) {
                let _ = tx.unbounded_send(Err(error.clone()));
            }
            state.failure = Some(error);
        }

        /// Answer calls again after [`FakeEngine::fail`].
        pub fn recover(&self) {
            self.lock().failure = None;
        }

        /// End every open event stream (without an error).
        pub fn close_event_streams(&self) {
            self.lock().subscribers.clear();
        }

        /// How many event streams are open (not yet dropped by their reader, as far as
        /// the last push could tell).
        pub fn subscribers(&self) -> usize {
            let mut state = self.lock();
            state.subscribers.retain(|tx| !tx.is_closed());
            state.subscribers.len()
        }

        /// How many calls of `containers`, `inspect` and `networks` were made.
        pub fn calls(&self) -> usize {
            self.lock().calls
        }

        fn answer<T>(&self, f: impl FnOnce(&State) -> T) -> Result<T, EngineError> {
            let mut state = self.lock();
            state.calls += 1;
            match &state.failure {
                Some(e) => Err(e.clone()),
                None => Ok(f(&state)),
            }
        }
    }

    impl Engine for FakeEngine {
        fn containers(&self) -> BoxFuture<'_, Result<Vec<ContainerInfo>, EngineError>> {
            let result = self.answer(|s| s.containers.values().cloned().collect());
            async move { result }.boxed()
        }

        fn inspect<'a>(
            &'a self,
            id: &'a ContainerId,
        ) -> BoxFuture<'a, Result<Option<ContainerInfo>, EngineError>> {
            let result = self.answer(|s| s.containers.get(id).cloned());
            async move { result }.boxed()
        }

        fn networks(&self) -> BoxFuture<'_, Result<Vec<NetworkInfo>, EngineError>> {
            let result = self.answer(|s| s.networks.clone());
            async move { result }.boxed()
        }

        fn events(&self) -> BoxStream<'static, Result<EngineEvent, EngineError>> {
            let mut state = self.lock();
            let (tx, rx) = mpsc::unbounded();
            if let Some(e) = &state.failure {
                let _ = tx.unbounded_send(Err(e.clone()));
            } else {
                state.subscribers.push(tx);
            }
            rx.boxed()
        }

        fn network<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<NetworkDetail>, EngineError>> {
            let result = self.answer(|s| {
                s.details
                    .values()
                    .find(|d| d.name == name || d.id.0 == name)
                    .cloned()
            });
            async move { result }.boxed()
        }

        fn create_network<'a>(
            &'a self,
            spec: &'a NetworkCreate,
        ) -> BoxFuture<'a, Result<NetworkId, EngineError>> {
            let result = self.answer(|_| ()).and_then(|()| {
                let mut state = self.lock();
                if state.details.contains_key(&spec.name) {
                    return Err(conflict(
                        &format!("create network {}", spec.name),
                        "network already exists",
                    ));
                }
                let id = NetworkId(format!("fake-network-{}", state.details.len() + 1));
                let detail = NetworkDetail {
                    id: id.clone(),
                    name: spec.name.clone(),
                    driver: "bridge".into(),
                    labels: spec.labels.clone(),
                    options: spec.options.clone(),
                    subnets: vec![spec.subnet],
                    gateways: vec![spec.gateway],
                    aux_addresses: spec.aux_addresses.clone(),
                    containers: 0,
                };
                state.details.insert(spec.name.clone(), detail);
                Ok(id)
            });
            async move { result }.boxed()
        }

        fn remove_network<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
            let result = self.answer(|_| ()).and_then(|()| {
                let mut state = self.lock();
                let Some(key) = state
                    .details
                    .values()
                    .find(|d| d.name == name || d.id.0 == name)
                    .map(|d| d.name.clone())
                else {
                    return Err(conflict(&format!("remove network {name}"), "no such network"));
                };
                if state.details[&key].containers > 0 {
                    return Err(conflict(
                        &format!("remove network {name}"),
                        "network has active endpoints",
                    ));
                }
                state.details.remove(&key);
                Ok(())
            });
            async move { result }.boxed()
        }
    }

    /// The error the real engine gives for a request it refuses.
    fn conflict(operation: &str, message: &str) -> EngineError {
        EngineError::Api {
            endpoint: "fake".into(),
            operation: operation.to_owned(),
            status: Some(409),
            message: message.to_owned(),
        }
    }

    /// A bridge network `name` with the id `id` and no IPAM: what a test node's cluster
    /// network looks like to the agent.
    pub fn bridge_network(id: &str, name: &str) -> NetworkInfo {
        NetworkInfo {
            id: NetworkId(id.to_owned()),
            name: name.to_owned(),
            driver: "bridge".into(),
            subnets: vec![],
            gateways: vec![],
        }
    }

    /// A container's attachment to the network `id` named `name` at `ip`/24.
    pub fn attached(id: &str, name: &str, ip: std::net::Ipv4Addr) -> super::ContainerNetwork {
        super::ContainerNetwork {
            network_id: NetworkId(id.to_owned()),
            name: name.to_owned(),
            ip: Some(ip),
            prefix_len: 24,
            gateway: None,
            aliases: vec![],
        }
    }

    /// A running container with a sandbox under `/run/docker/netns/`, no labels and no
    /// networks: a starting point for tests.
    pub fn running_container(id: &str, name: &str) -> ContainerInfo {
        ContainerInfo {
            id: ContainerId(id.to_owned()),
            name: name.to_owned(),
            labels: BTreeMap::new(),
            running: true,
            health: None,
            pid: Some(4242),
            sandbox_key: Some(format!("/run/docker/netns/{}", &id[..id.len().min(12)]).into()),
            networks: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bollard::models::{ContainerInspectResponse, EventMessage, Network};
    use futures::StreamExt;

    use super::fake::{running_container, FakeEngine};
    use super::*;

    /// `GET /containers/ID/json` from Docker 20.10 (API 1.41), trimmed to the fields
    /// read: a healthy container on two user networks, one with a non-default gateway.
    const INSPECT: &str = r#"{
      "Id": "727bc562852765f9bf7d609dfa7cdd3e2ed71cec789ea30beaf415745b3586e8",
      "Name": "/web1",
      "State": {"Status": "running", "Running": true, "Paused": false, "Restarting": false,
        "OOMKilled": false, "Dead": false, "Pid": 13986, "ExitCode": 0, "Error": "",
        "StartedAt": "2026-11-22T02:07:20.957888391Z", "FinishedAt": "0001-01-01T00:00:00Z",
        "Health": {"Status": "healthy", "FailingStreak": 0, "Log": [{"Start":
          "2026-11-22T02:07:21.958167112Z", "End": "2026-11-22T02:07:22.057085338Z",
          "ExitCode": 0, "Output": ""}]}},
      "Config": {"Hostname": "727bc5628527", "Labels": {"vipd.service": "web"}},
      "NetworkSettings": {
        "Bridge": "", "SandboxID": "145dfebe6dd1f6638dd2714887206807bc1826ee070cb523a5d27c3d2c7d7ec4",
        "HairpinMode": false, "LinkLocalIPv6Address": "", "LinkLocalIPv6PrefixLen": 0, "Ports": {},
        "SandboxKey": "/tmp/vdk/exec/netns/145dfebe6dd1", "SecondaryIPAddresses": null,
        "SecondaryIPv6Addresses": null, "EndpointID": "", "Gateway": "", "GlobalIPv6Address": "",
        "GlobalIPv6PrefixLen": 0, "IPAddress": "", "IPPrefixLen": 0, "IPv6Gateway": "", "MacAddress": "",
        "Networks": {
          "capnet2": {"IPAMConfig": {}, "Links": null, "Aliases": ["727bc5628527"],
            "NetworkID": "b57c9d1583596c131770e357651bcda4688bbfaf01277a24fb15350c0f865f6d",
            "EndpointID": "45cf2260caa87d6fd3a7463055cfb2d73f1073a0e8a6a473d2db4f7066ac4801",
            "Gateway": "10.210.1.1", "IPAddress": "10.210.1.2", "IPPrefixLen": 24, "IPv6Gateway": "",
            "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0, "MacAddress": "02:42:0a:d2:01:02",
            "DriverOpts": {}},
          "capnet": {"IPAMConfig": null, "Links": null, "Aliases": ["webalias", "727bc5628527"],
            "NetworkID": "fce91ed9e7396b574a64c83b330481fc817c9cc2bb97865175984be38f38adfd",
            "EndpointID": "cbfc9d229d5cc069926d1cde1a048ce0a66886d14af027becce60cabeb5f446d",
            "Gateway": "10.212.7.254", "IPAddress": "10.212.7.1", "IPPrefixLen": 24, "IPv6Gateway": "",
            "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0, "MacAddress": "02:42:0a:d4:07:01",
            "DriverOpts": null}
        }
      }
    }"#;

    /// The same container after `docker kill`: no pid, no sandbox, no addresses.
    const INSPECT_EXITED: &str = r#"{
      "Id": "758751730a40922e6a4c694e6aee9cc7d01958016de7728cd520dccb6dd4bea7",
      "Name": "/web1",
      "State": {"Status": "exited", "Running": false, "Pid": 0, "ExitCode": 137},
      "Config": {"Labels": {}},
      "NetworkSettings": {"SandboxKey": "", "Networks": {
        "capnet": {"IPAMConfig": null, "Links": null, "Aliases": ["webalias", "758751730a40"],
          "NetworkID": "fce91ed9e7396b574a64c83b330481fc817c9cc2bb97865175984be38f38adfd",
          "EndpointID": "", "Gateway": "", "IPAddress": "", "IPPrefixLen": 0}}}
    }"#;

    /// `GET /networks` from Docker 20.10, trimmed.
    const NETWORKS: &str = r#"[
      {"Name": "host", "Id": "ffc8bb8c10a23f6bd5075aabe8bab197ea3a64b91ba7fbaf01d7651c24667be9",
       "Driver": "host", "IPAM": {"Driver": "default", "Options": null, "Config": []}},
      {"Name": "bridge", "Id": "4a3974e33c2dd7e6c9124642d32f6cd96bd10e71d7d10759f4bfa59c04ab3c58",
       "Driver": "bridge", "IPAM": {"Driver": "default", "Options": null, "Config": [{"Subnet": "10.210.0.0/24"}]}},
      {"Name": "capnet", "Id": "fce91ed9e7396b574a64c83b330481fc817c9cc2bb97865175984be38f38adfd",
       "Driver": "bridge", "IPAM": {"Driver": "default", "Options": {}, "Config": [
         {"Subnet": "10.212.7.0/24", "Gateway": "10.212.7.254"}, {"Subnet": "fd00:7::/64", "Gateway": "fd00:7::1"}]}}
    ]"#;

    /// Lines of `GET /events` from Docker 20.10.
    const EVENTS: [&str; 5] = [
        r#"{"status":"start","id":"758751730a40922e6a4c694e6aee9cc7d01958016de7728cd520dccb6dd4bea7","from":"vipd-test/busybox","Type":"container","Action":"start","Actor":{"ID":"758751730a40922e6a4c694e6aee9cc7d01958016de7728cd520dccb6dd4bea7","Attributes":{"image":"vipd-test/busybox","name":"web1","vipd.port":"80","vipd.service":"web"}},"scope":"local","time":1795313237,"timeNano":1795313237107207153}"#,
        r#"{"status":"health_status: healthy","id":"758751730a40922e6a4c694e6aee9cc7d01958016de7728cd520dccb6dd4bea7","from":"vipd-test/busybox","Type":"container","Action":"health_status: healthy","Actor":{"ID":"758751730a40922e6a4c694e6aee9cc7d01958016de7728cd520dccb6dd4bea7","Attributes":{"image":"vipd-test/busybox","name":"web1","vipd.port":"80","vipd.service":"web"}},"scope":"local","time":1795313238,"timeNano":1795313238107207153}"#,
        r#"{"Type":"network","Action":"connect","Actor":{"ID":"b57c9d1583596c131770e357651bcda4688bbfaf01277a24fb15350c0f865f6d","Attributes":{"container":"758751730a40922e6a4c694e6aee9cc7d01958016de7728cd520dccb6dd4bea7","name":"capnet2","type":"bridge"}},"scope":"local","time":1795313239,"timeNano":1795313239267277756}"#,
        r#"{"Type":"network","Action":"create","Actor":{"ID":"fce91ed9e7396b574a64c83b330481fc817c9cc2bb97865175984be38f38adfd","Attributes":{"name":"capnet","type":"bridge"}},"scope":"local","time":1795313236,"timeNano":1795313236458466984}"#,
        r#"{"status":"tag","id":"sha256:e1f32c448ae11e7fb451f53dc32ea5a432cc54a28d004ee9dbb39184e3aab873","Type":"image","Action":"tag","Actor":{"ID":"sha256:e1f32c448ae11e7fb451f53dc32ea5a432cc54a28d004ee9dbb39184e3aab873","Attributes":{"name":"vipd-test/busybox:latest"}},"scope":"local","time":1795313236,"timeNano":1795313236292394942}"#,
    ];

    fn inspect(json: &str) -> ContainerInfo {
        let raw: ContainerInspectResponse = serde_json::from_str(json).expect("inspect JSON");
        container_from_inspect(raw).expect("has an id")
    }

    fn event(json: &str) -> EngineEvent {
        let raw: EventMessage = serde_json::from_str(json).expect("event JSON");
        event_from_message(raw)
    }

    #[test]
    fn inspect_of_a_running_container_has_pid_sandbox_health_and_endpoints() {
        let c = inspect(INSPECT);
        assert_eq!(
            c.id.0,
            "727bc562852765f9bf7d609dfa7cdd3e2ed71cec789ea30beaf415745b3586e8"
        );
        assert_eq!(c.name, "web1");
        assert_eq!(
            c.labels,
            BTreeMap::from([("vipd.service".to_owned(), "web".to_owned())])
        );
        assert!(c.running);
        assert_eq!(c.health, Some(Health::Healthy));
        assert_eq!(c.pid, Some(13986));
        assert_eq!(
            c.sandbox_key,
            Some(PathBuf::from("/tmp/vdk/exec/netns/145dfebe6dd1"))
        );
        let names: Vec<&str> = c.networks.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["capnet", "capnet2"], "ordered by name");
        assert_eq!(
            c.networks[0],
            ContainerNetwork {
                network_id: NetworkId(
                    "fce91ed9e7396b574a64c83b330481fc817c9cc2bb97865175984be38f38adfd".to_owned()
                ),
                name: "capnet".to_owned(),
                ip: Some(Ipv4Addr::new(10, 212, 7, 1)),
                prefix_len: 24,
                gateway: Some(Ipv4Addr::new(10, 212, 7, 254)),
                aliases: vec!["webalias".to_owned(), "727bc5628527".to_owned()],
            }
        );
    }

    #[test]
    fn inspect_of_a_stopped_container_has_no_pid_sandbox_or_address() {
        let c = inspect(INSPECT_EXITED);
        assert!(!c.running);
        assert_eq!(c.pid, None);
        assert_eq!(c.sandbox_key, None);
        assert_eq!(c.health, None);
        assert_eq!(c.networks.len(), 1);
        assert_eq!(c.networks[0].ip, None);
        assert_eq!(c.networks[0].prefix_len, 0);
        assert_eq!(c.networks[0].gateway, None);
    }

    #[test]
    fn health_states_map_and_none_means_no_check() {
        for (text, want) in [
            ("starting", Some(Health::Starting)),
            ("healthy", Some(Health::Healthy)),
            ("unhealthy", Some(Health::Unhealthy)),
            ("none", None),
        ] {
            let json = format!(
                r#"{{"Id":"abc","State":{{"Running":true,"Pid":1,"Health":{{"Status":"{text}"}}}}}}"#
            );
            assert_eq!(inspect(&json).health, want, "{text}");
        }
        let raw: ContainerInspectResponse = serde_json::from_str(r#"{"Name":"/x"}"#).unwrap();
        assert_eq!(container_from_inspect(raw), None, "no id, no container");
    }

    #[test]
    fn networks_keep_ipv4_subnets_and_gateways() {
        let raw: Vec<Network> = serde_json::from_str(NETWORKS).expect("networks JSON");
        let nets: Vec<NetworkInfo> = raw.into_iter().filter_map(network_from).collect();
        assert_eq!(nets.len(), 3);
        assert_eq!(nets[0].name, "host");
        assert_eq!(nets[0].driver, "host");
        assert!(nets[0].subnets.is_empty() && nets[0].gateways.is_empty());
        assert_eq!(nets[1].subnets, [(Ipv4Addr::new(10, 210, 0, 0), 24)]);
        assert!(
            nets[1].gateways.is_empty(),
            "20.10 records no gateway for the default bridge"
        );
        assert_eq!(
            nets[2].subnets,
            [(Ipv4Addr::new(10, 212, 7, 0), 24)],
            "IPv6 left out"
        );
        assert_eq!(nets[2].gateways, [Ipv4Addr::new(10, 212, 7, 254)]);
    }

    #[test]
    fn events_become_container_network_or_other() {
        let cid = ContainerId("758751730a40922e6a4c694e6aee9cc7d01958016de7728cd520dccb6dd4bea7".to_owned());
        match event(EVENTS[0]) {
            EngineEvent::Container {
                id,
                action,
                attributes,
            } => {
                assert_eq!(id, cid);
                assert_eq!(action, EngineAction::Start);
                assert_eq!(attributes["vipd.service"], "web");
                assert_eq!(attributes["name"], "web1");
            }
            other => panic!("not a container event: {other:?}"),
        }
        assert!(
            matches!(event(EVENTS[1]), EngineEvent::Container { action: EngineAction::HealthStatus(s), .. } if s == "healthy")
        );
        assert_eq!(
            event(EVENTS[2]),
            EngineEvent::Network {
                id: NetworkId("b57c9d1583596c131770e357651bcda4688bbfaf01277a24fb15350c0f865f6d".to_owned()),
                action: EngineAction::Connect,
                container: Some(cid),
            }
        );
        assert!(matches!(
            event(EVENTS[3]),
            EngineEvent::Network { container: None, .. }
        ));
        assert_eq!(event(EVENTS[4]), EngineEvent::Other);
        assert_eq!(
            event(r#"{"Type":"container","Action":"start"}"#),
            EngineEvent::Other
        );
    }

    #[test]
    fn actions_are_parsed_once_and_show_as_dockers_text_again() {
        for text in [
            "create",
            "start",
            "die",
            "kill",
            "stop",
            "destroy",
            "remove",
            "connect",
            "disconnect",
            "health_status: unhealthy",
            "exec_create: sh -c true",
            "exec_die",
            "rename",
        ] {
            assert_eq!(EngineAction::parse(text).to_string(), text);
        }
        assert_eq!(
            EngineAction::parse("health_status: healthy"),
            EngineAction::HealthStatus("healthy".into())
        );
        assert!(matches!(
            EngineAction::parse("exec_start: ls"),
            EngineAction::Exec(_)
        ));
        assert_eq!(EngineAction::parse("pause"), EngineAction::Other("pause".into()));
    }

    #[test]
    fn cidr_and_address_parsing_refuse_what_is_not_ipv4() {
        assert_eq!(
            parse_ipv4_cidr("10.0.0.0/8"),
            Some((Ipv4Addr::new(10, 0, 0, 0), 8))
        );
        assert_eq!(parse_ipv4_cidr("10.0.0.0/33"), None);
        assert_eq!(parse_ipv4_cidr("fd00::/64"), None);
        assert_eq!(parse_ipv4_cidr("10.0.0.0"), None);
        assert_eq!(parse_ipv4(Some("")), None);
        assert_eq!(parse_ipv4(Some("fd00::1")), None);
        assert_eq!(parse_ipv4(None), None);
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = EngineError::Unavailable {
            endpoint: "unix:///nowhere/docker.sock".to_owned(),
            reason: "no socket at /nowhere/docker.sock".to_owned(),
        };
        let text = e.to_string();
        assert!(text.contains("unix:///nowhere/docker.sock"), "{text}");
        assert!(text.contains("is dockerd running?"), "{text}");
    }

    #[tokio::test]
    async fn connect_to_a_missing_socket_is_unavailable() {
        let err = DockerEngine::connect_to("unix:///nonexistent-vipd/docker.sock", Duration::from_secs(2))
            .await
            .expect_err("no socket there");
        assert!(
            matches!(&err, EngineError::Unavailable { reason, .. } if reason.contains("/nonexistent-vipd/docker.sock")),
            "{err}"
        );
        let err = DockerEngine::connect_to("ssh://host", Duration::from_secs(2))
            .await
            .expect_err("ssh");
        assert!(matches!(err, EngineError::BadEndpoint { .. }), "{err}");
    }

    #[tokio::test]
    async fn fake_engine_answers_from_its_state_and_streams_pushed_events() {
        let fake = FakeEngine::new();
        let engine: Arc<dyn Engine> = Arc::new(fake.clone());
        let web = running_container("a".repeat(64).as_str(), "web").with_label("vipd.service", "web");
        fake.upsert_container(web.clone());
        assert_eq!(engine.containers().await.unwrap(), vec![web.clone()]);
        assert_eq!(engine.inspect(&web.id).await.unwrap(), Some(web.clone()));

        let mut events = engine.events();
        assert_eq!(fake.subscribers(), 1);
        let start = EngineEvent::Container {
            id: web.id.clone(),
            action: EngineAction::Start,
            attributes: BTreeMap::new(),
        };
        fake.push_event(start.clone());
        assert_eq!(events.next().await, Some(Ok(start)));

        fake.remove_container(&web.id);
        assert_eq!(engine.inspect(&web.id).await.unwrap(), None);

        let down = EngineError::Unavailable {
            endpoint: "fake".to_owned(),
            reason: "test".to_owned(),
        };
        fake.fail(down.clone());
        assert_eq!(events.next().await, Some(Err(down.clone())));
        assert_eq!(events.next().await, None, "a failed engine's stream ends");
        assert_eq!(engine.networks().await, Err(down));
        fake.recover();
        assert_eq!(engine.networks().await, Ok(vec![]));
        assert_eq!(fake.calls(), 5);

        let mut again = engine.events();
        fake.close_event_streams();
        assert_eq!(again.next().await, None);
    }
}
