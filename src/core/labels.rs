//! Which containers are tasks of which service, from their labels.
//!
//! - `vipd.service=NAME` makes a container a task of service NAME.
//! - A docker compose container (`com.docker.compose.service` + `com.docker.compose.project`)
//!   is a task of its compose service with no label needed; `vipd.enable=false` opts out.
//! - `vipd.endpoint-mode=vip|dnsrr`, `vipd.scheduler=rr|wrr|...`, `vipd.weight=N` and
//!   `vipd.port.NAME=PORT/PROTO` (for SRV records) refine it.
//! - `vipd.publish=PUBLISHED:TARGET[/tcp|/udp][,...]` publishes ports on the host's
//!   routing mesh.
//!
//! A bad label is an error for that container only, naming the label and the reason.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::containers::{Container, ContainerId};
use super::model::{EndpointMode, PortKey, Protocol, Scheduler, ServiceName};
use super::spec::{DEFAULT_WEIGHT, MAX_WEIGHT};

pub const SERVICE: &str = "vipd.service";
pub const ENABLE: &str = "vipd.enable";
pub const ENDPOINT_MODE: &str = "vipd.endpoint-mode";
pub const SCHEDULER: &str = "vipd.scheduler";
pub const WEIGHT: &str = "vipd.weight";
pub const PORT_PREFIX: &str = "vipd.port.";
pub const PUBLISH: &str = "vipd.publish";
pub const COMPOSE_SERVICE: &str = "com.docker.compose.service";
pub const COMPOSE_PROJECT: &str = "com.docker.compose.project";

/// A port a service's tasks listen on, published as SRV `_<name>._<proto>.<svc>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct NamedPort {
    /// The port's name, without underscore: `http` for `_http._tcp.<svc>`.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

impl fmt::Display for NamedPort {
    /// As `--port` takes it: `http=80/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}/{}", self.name, self.port, self.protocol)
    }
}

impl NamedPort {
    pub fn new(name: &str, protocol: Protocol, port: u16) -> Self {
        NamedPort {
            name: name.to_owned(),
            protocol,
            port,
        }
    }
}

/// A port published on the host's routing mesh: connections to `published` on the host
/// go to `target` on the tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Publish {
    pub protocol: Protocol,
    pub published: u16,
    pub target: u16,
}

impl Publish {
    /// The host port it claims.
    pub fn key(&self) -> PortKey {
        PortKey::new(self.protocol, self.published)
    }
}

impl fmt::Display for Publish {
    /// As in the label: `8080:80/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.published, self.target, self.protocol)
    }
}

/// Parse a `vipd.publish` value: `PUBLISHED:TARGET[/tcp|/udp]`, comma separated; sorted,
/// each published port once per protocol.
pub fn parse_publish(value: &str) -> Result<Vec<Publish>, String> {
    let mut out: Vec<Publish> = Vec::new();
    for item in value.split(',').map(str::trim) {
        let (ports, proto) = item.split_once('/').unwrap_or((item, "tcp"));
        let protocol = match proto {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(format!("{item:?}: the protocol must be tcp or udp")),
        };
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0);
        let (published, target) = ports
            .split_once(':')
            .and_then(|(a, b)| Some((port(a)?, port(b)?)))
            .ok_or_else(|| {
                format!("{item:?}: expected PUBLISHED:TARGET[/tcp|/udp] with ports 1-65535, e.g. 8080:80")
            })?;
        if let Some(dup) = out
            .iter()
            .find(|p| p.protocol == protocol && p.published == published)
        {
            return Err(format!(
                "{item:?}: port {published}/{protocol} is already published as {dup}"
            ));
        }
        out.push(Publish {
            protocol,
            published,
            target,
        });
    }
    out.sort();
    Ok(out)
}

/// Parse an endpoint mode (`vipd.endpoint-mode`, `--endpoint-mode`): `vip` or `dnsrr`.
pub fn parse_endpoint_mode(value: &str) -> Result<EndpointMode, String> {
    match value {
        "vip" => Ok(EndpointMode::Vip),
        "dnsrr" => Ok(EndpointMode::Dnsrr),
        _ => Err("expected vip or dnsrr".into()),
    }
}

/// An endpoint mode as labels and flags spell it.
pub fn endpoint_mode_name(mode: EndpointMode) -> &'static str {
    match mode {
        EndpointMode::Vip => "vip",
        EndpointMode::Dnsrr => "dnsrr",
    }
}

/// Parse a scheduler (`vipd.scheduler`, `--scheduler`): one vipd knows.
pub fn parse_scheduler(value: &str) -> Result<Scheduler, String> {
    value
        .parse()
        .map_err(|e: super::model::UnknownScheduler| e.to_string())
}

/// Parse a named port: its name (of `vipd.port.NAME`, or before `=` in `--port`) and
/// its value `PORT[/tcp|/udp|/sctp]`. The name is kept in lower case.
pub fn parse_port(name: &str, value: &str) -> Result<NamedPort, String> {
    let valid_name =
        !name.is_empty() && name.len() <= 15 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !valid_name {
        return Err("a port name is 1-15 letters, digits or '-'".into());
    }
    let (port, proto) = value.split_once('/').unwrap_or((value, "tcp"));
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or("expected PORT[/tcp|/udp|/sctp] with PORT 1-65535")?;
    let protocol = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        _ => return Err("the protocol must be tcp, udp or sctp".into()),
    };
    Ok(NamedPort::new(&name.to_ascii_lowercase(), protocol, port))
}

/// What a task's labels say about its service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskLabels {
    pub service: ServiceName,
    /// The compose project, for compose services.
    pub project: Option<String>,
    pub mode: EndpointMode,
    pub scheduler: Scheduler,
    pub weight: u32,
    pub ports: Vec<NamedPort>,
    pub publish: Vec<Publish>,
}

/// A label vipd could not accept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("container {container} ({name}): label {label}={value:?}: {reason}")]
pub struct LabelError {
    pub container: ContainerId,
    pub name: String,
    pub label: String,
    pub value: String,
    pub reason: String,
}

/// The service a container is a task of, if any.
pub fn task_labels(c: &Container) -> Result<Option<TaskLabels>, LabelError> {
    let err = |label: &str, reason: String| LabelError {
        container: c.id.clone(),
        name: c.name.clone(),
        label: label.to_owned(),
        value: c.labels.get(label).cloned().unwrap_or_default(),
        reason,
    };
    match c.labels.get(ENABLE).map(String::as_str) {
        None | Some("true") => {}
        Some("false") => return Ok(None),
        Some(_) => return Err(err(ENABLE, "expected true or false".into())),
    }
    let (service, project) = match (c.labels.get(SERVICE), c.labels.get(COMPOSE_SERVICE)) {
        (Some(name), _) => (
            ServiceName::new(name).map_err(|e| err(SERVICE, e.to_string()))?,
            None,
        ),
        (None, Some(name)) => (
            ServiceName::new(name).map_err(|e| err(COMPOSE_SERVICE, e.to_string()))?,
            c.labels.get(COMPOSE_PROJECT).cloned(),
        ),
        (None, None) => return Ok(None),
    };
    let mode = match c.labels.get(ENDPOINT_MODE) {
        None => EndpointMode::Vip,
        Some(m) => parse_endpoint_mode(m).map_err(|reason| err(ENDPOINT_MODE, reason))?,
    };
    let scheduler = match c.labels.get(SCHEDULER) {
        None => Scheduler::default(),
        Some(s) => parse_scheduler(s).map_err(|reason| err(SCHEDULER, reason))?,
    };
    let weight = match c.labels.get(WEIGHT) {
        None => DEFAULT_WEIGHT,
        Some(w) => w
            .parse::<u32>()
            .ok()
            .filter(|w| *w <= MAX_WEIGHT)
            .ok_or_else(|| err(WEIGHT, format!("expected a whole number from 0 to {MAX_WEIGHT}")))?,
    };
    let mut ports = Vec::new();
    for (label, value) in c.labels.range(PORT_PREFIX.to_owned()..) {
        let Some(name) = label.strip_prefix(PORT_PREFIX) else {
            break;
        };
        ports.push(parse_port(name, value).map_err(|reason| err(label, reason))?);
    }
    let publish = match c.labels.get(PUBLISH) {
        None => Vec::new(),
        Some(v) => parse_publish(v).map_err(|reason| err(PUBLISH, reason))?,
    };
    Ok(Some(TaskLabels {
        service,
        project,
        mode,
        scheduler,
        weight,
        ports,
        publish,
    }))
}

/// A service as its tasks' labels define it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceDef {
    pub name: ServiceName,
    pub mode: EndpointMode,
    pub scheduler: Scheduler,
    pub ports: Vec<NamedPort>,
    /// Ports published on the routing mesh.
    pub publish: Vec<Publish>,
    /// Every container that is a task, running or not, with its weight.
    pub tasks: BTreeMap<ContainerId, u32>,
}

/// A service as `vipd service create` stored it: every setting has a value (a flag not
/// given takes the label's default), and each one wins over the labels of its tasks.
/// Stored as JSON of the settings' text, parsed exactly as the labels are, so a file or
/// key edited by hand is checked the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "DefinitionText", into = "DefinitionText")]
pub struct ServiceDefinition {
    pub name: ServiceName,
    pub mode: EndpointMode,
    pub scheduler: Scheduler,
    /// Sorted, each published port once per protocol.
    pub publish: Vec<Publish>,
    /// Sorted by name, each name once.
    pub ports: Vec<NamedPort>,
}

/// A [`ServiceDefinition`]'s JSON: its settings as the labels and flags write them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefinitionText {
    name: String,
    endpoint_mode: String,
    scheduler: String,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    ports: Vec<String>,
}

/// A setting of a definition vipd could not accept: the setting (as its flag names it),
/// the value, the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting} {value:?}: {reason}")]
pub struct BadSetting {
    pub setting: String,
    pub value: String,
    pub reason: String,
}

impl BadSetting {
    fn new(setting: &str, value: &str, reason: impl Into<String>) -> Self {
        BadSetting {
            setting: setting.to_owned(),
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}

impl ServiceDefinition {
    /// A definition with the labels' defaults: `vip`, `rr`, nothing published, no ports.
    pub fn new(name: ServiceName) -> Self {
        ServiceDefinition {
            name,
            mode: EndpointMode::Vip,
            scheduler: Scheduler::default(),
            publish: Vec::new(),
            ports: Vec::new(),
        }
    }

    pub fn set_endpoint_mode(&mut self, value: &str) -> Result<(), BadSetting> {
        self.mode = parse_endpoint_mode(value).map_err(|r| BadSetting::new("--endpoint-mode", value, r))?;
        Ok(())
    }

    pub fn set_scheduler(&mut self, value: &str) -> Result<(), BadSetting> {
        self.scheduler = parse_scheduler(value).map_err(|r| BadSetting::new("--scheduler", value, r))?;
        Ok(())
    }

    /// Replace the published ports with `values`, each `PUBLISHED:TARGET[/tcp|/udp]` or a
    /// comma-separated list of them, as `vipd.publish` takes.
    pub fn set_publish<S: AsRef<str>>(&mut self, values: &[S]) -> Result<(), BadSetting> {
        let joined = values.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(",");
        self.publish = if values.is_empty() {
            Vec::new()
        } else {
            parse_publish(&joined).map_err(|r| BadSetting::new("--publish", &joined, r))?
        };
        Ok(())
    }

    /// Replace the named ports with `values`, each `NAME=PORT[/tcp|/udp|/sctp]`.
    pub fn set_ports<S: AsRef<str>>(&mut self, values: &[S]) -> Result<(), BadSetting> {
        let mut ports: Vec<NamedPort> = Vec::new();
        for value in values.iter().map(AsRef::as_ref) {
            let bad = |r: &str| BadSetting::new("--port", value, r);
            let (name, port) = value
                .split_once('=')
                .ok_or_else(|| bad("expected NAME=PORT[/tcp|/udp|/sctp], e.g. http=80/tcp"))?;
            let port = parse_port(name, port).map_err(|r| bad(&r))?;
            if ports.iter().any(|p| p.name == port.name) {
                return Err(bad("the port name is given twice"));
            }
            ports.push(port);
        }
        ports.sort();
        self.ports = ports;
        Ok(())
    }

    /// The service it defines, with no task yet.
    fn service(&self) -> ServiceDef {
        ServiceDef {
            name: self.name.clone(),
            mode: self.mode,
            scheduler: self.scheduler.clone(),
            ports: self.ports.clone(),
            publish: self.publish.clone(),
            tasks: BTreeMap::new(),
        }
    }
}

fn joined<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl TryFrom<DefinitionText> for ServiceDefinition {
    type Error = BadSetting;

    fn try_from(t: DefinitionText) -> Result<Self, BadSetting> {
        let name = ServiceName::new(&t.name).map_err(|e| BadSetting::new("name", &t.name, e.to_string()))?;
        let mut def = ServiceDefinition::new(name);
        def.set_endpoint_mode(&t.endpoint_mode)?;
        def.set_scheduler(&t.scheduler)?;
        def.set_publish(&t.publish)?;
        def.set_ports(&t.ports)?;
        Ok(def)
    }
}

impl From<ServiceDefinition> for DefinitionText {
    fn from(d: ServiceDefinition) -> Self {
        DefinitionText {
            name: d.name.to_string(),
            endpoint_mode: endpoint_mode_name(d.mode).to_owned(),
            scheduler: d.scheduler.to_string(),
            publish: d.publish.iter().map(ToString::to_string).collect(),
            ports: d.ports.iter().map(ToString::to_string).collect(),
        }
    }
}

/// A setting where a task's label and the service's stored definition disagree: the
/// stored one is used.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Conflict {
    pub service: String,
    /// `endpoint-mode`, `scheduler`, `publish` or `ports` (as `vipd service` names them).
    pub setting: String,
    /// What the label says, as written in it (`ports`: every `vipd.port.*` label, as
    /// `NAME=PORT/PROTO`, comma separated).
    pub label_value: String,
    /// What the definition says, which is used.
    pub stored_value: String,
}

/// The settings where a task's labels (those it sets, not the defaults) disagree with
/// its service's definition.
fn conflicts(c: &Container, labels: &TaskLabels, def: &ServiceDefinition) -> Vec<Conflict> {
    let has_ports = c.labels.keys().any(|k| k.starts_with(PORT_PREFIX));
    let settings = [
        (
            c.labels.contains_key(ENDPOINT_MODE) && labels.mode != def.mode,
            "endpoint-mode",
            endpoint_mode_name(labels.mode).to_owned(),
            endpoint_mode_name(def.mode).to_owned(),
        ),
        (
            c.labels.contains_key(SCHEDULER) && labels.scheduler != def.scheduler,
            "scheduler",
            labels.scheduler.to_string(),
            def.scheduler.to_string(),
        ),
        (
            c.labels.contains_key(PUBLISH) && labels.publish != def.publish,
            "publish",
            joined(&labels.publish),
            joined(&def.publish),
        ),
        (
            has_ports && labels.ports != def.ports,
            "ports",
            joined(&labels.ports),
            joined(&def.ports),
        ),
    ];
    settings
        .into_iter()
        .filter(|(differs, ..)| *differs)
        .map(|(_, setting, label_value, stored_value)| Conflict {
            service: def.name.to_string(),
            setting: setting.to_owned(),
            label_value,
            stored_value,
        })
        .collect()
}

/// The services of a pass: from the containers' labels and the stored definitions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merged {
    pub defs: BTreeMap<ServiceName, ServiceDef>,
    pub label_errors: Vec<LabelError>,
    /// Labels the stored definitions overrule, each once.
    pub conflicts: Vec<Conflict>,
}

/// Services from containers: each service with its tasks, and every label problem.
///
/// Tasks of one service must agree on mode, scheduler and ports; the oldest-named task
/// (the smallest container id, so the choice is stable) decides, and a task that
/// disagrees is reported and left out.
pub fn services(containers: &[Container]) -> (BTreeMap<ServiceName, ServiceDef>, Vec<LabelError>) {
    let m = merge(containers, &BTreeMap::new());
    (m.defs, m.label_errors)
}

/// Services from containers and stored definitions. A service exists if it has a
/// definition or a task; containers bind to it by their labels as in [`services`]. A
/// defined service's settings are its definition's: every task with its labels is a
/// task of it, and each label that says otherwise is a [`Conflict`]. An undefined
/// service is what its tasks' labels say (see [`services`]).
pub fn merge(containers: &[Container], stored: &BTreeMap<ServiceName, ServiceDefinition>) -> Merged {
    let mut defs: BTreeMap<ServiceName, ServiceDef> = stored
        .iter()
        .map(|(name, d)| (name.clone(), d.service()))
        .collect();
    let mut errors = Vec::new();
    let mut found = Vec::new();
    let mut sorted: Vec<&Container> = containers.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    for c in sorted {
        let labels = match task_labels(c) {
            Ok(Some(l)) => l,
            Ok(None) => continue,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        if let Some(definition) = stored.get(&labels.service) {
            found.extend(conflicts(c, &labels, definition));
            if let Some(def) = defs.get_mut(&labels.service) {
                def.tasks.insert(c.id.clone(), labels.weight);
            }
            continue;
        }
        match defs.get_mut(&labels.service) {
            None => {
                defs.insert(
                    labels.service.clone(),
                    ServiceDef {
                        name: labels.service.clone(),
                        mode: labels.mode,
                        scheduler: labels.scheduler.clone(),
                        ports: labels.ports.clone(),
                        publish: labels.publish.clone(),
                        tasks: BTreeMap::from([(c.id.clone(), labels.weight)]),
                    },
                );
            }
            Some(def) => {
                let clash = if def.mode != labels.mode {
                    Some((
                        ENDPOINT_MODE,
                        format!("the service's other tasks use {:?}", def.mode),
                    ))
                } else if def.scheduler != labels.scheduler {
                    Some((
                        SCHEDULER,
                        format!("the service's other tasks use {}", def.scheduler),
                    ))
                } else if def.ports != labels.ports {
                    Some((
                        PORT_PREFIX,
                        "the service's other tasks name other ports".to_owned(),
                    ))
                } else if def.publish != labels.publish {
                    let theirs: Vec<String> = def.publish.iter().map(ToString::to_string).collect();
                    Some((
                        PUBLISH,
                        format!("the service's other tasks publish {:?}", theirs.join(",")),
                    ))
                } else {
                    None
                };
                match clash {
                    Some((label, reason)) => errors.push(LabelError {
                        container: c.id.clone(),
                        name: c.name.clone(),
                        label: label.to_owned(),
                        value: c.labels.get(label).cloned().unwrap_or_default(),
                        reason: format!("conflicts with service {}: {reason}", def.name),
                    }),
                    None => {
                        def.tasks.insert(c.id.clone(), labels.weight);
                    }
                }
            }
        }
    }
    found.sort();
    found.dedup();
    Merged {
        defs,
        label_errors: errors,
        conflicts: found,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(id: &str, labels: &[(&str, &str)]) -> Container {
        Container {
            name: format!("c{id}"),
            sandbox: None,
            ..crate::core::containers::fixture::container(&id.repeat(12), labels, &[])
        }
    }

    #[test]
    fn a_labelled_container_is_a_task_with_defaults() {
        let t = task_labels(&container("a", &[(SERVICE, "web")]))
            .unwrap()
            .unwrap();
        assert_eq!(t.service.as_str(), "web");
        assert_eq!((t.mode, t.weight), (EndpointMode::Vip, 1));
        assert_eq!(t.scheduler, Scheduler::RoundRobin);
        assert!(task_labels(&container("a", &[("other", "x")])).unwrap().is_none());
    }

    #[test]
    fn compose_containers_are_tasks_unless_opted_out() {
        let c = container("a", &[(COMPOSE_SERVICE, "web"), (COMPOSE_PROJECT, "shop")]);
        let t = task_labels(&c).unwrap().unwrap();
        assert_eq!((t.service.as_str(), t.project.as_deref()), ("web", Some("shop")));
        let off = container("a", &[(COMPOSE_SERVICE, "web"), (ENABLE, "false")]);
        assert!(task_labels(&off).unwrap().is_none());
        let named = container("a", &[(COMPOSE_SERVICE, "web"), (SERVICE, "api")]);
        assert_eq!(task_labels(&named).unwrap().unwrap().service.as_str(), "api");
    }

    #[test]
    fn every_label_is_parsed() {
        let c = container(
            "a",
            &[
                (SERVICE, "db"),
                (ENDPOINT_MODE, "dnsrr"),
                (SCHEDULER, "wlc"),
                (WEIGHT, "5"),
                ("vipd.port.http", "80/tcp"),
                ("vipd.port.dns", "53/udp"),
                ("vipd.port.pg", "5432"),
            ],
        );
        let t = task_labels(&c).unwrap().unwrap();
        assert_eq!(
            (t.mode, t.scheduler.name(), t.weight),
            (EndpointMode::Dnsrr, "wlc", 5)
        );
        let ports: Vec<String> = t
            .ports
            .iter()
            .map(|p| format!("{}={}/{}", p.name, p.port, p.protocol))
            .collect();
        assert_eq!(ports, ["dns=53/udp", "http=80/tcp", "pg=5432/tcp"]);
    }

    #[test]
    fn bad_labels_name_the_container_the_label_and_the_reason() {
        let cases = [
            (
                (SERVICE, "bad name"),
                "vipd.service=\"bad name\": invalid service name",
            ),
            (
                (ENDPOINT_MODE, "anycast"),
                "vipd.endpoint-mode=\"anycast\": expected vip or dnsrr",
            ),
            ((SCHEDULER, "fast"), "vipd.scheduler=\"fast\": unknown scheduler"),
            (
                (WEIGHT, "-1"),
                "vipd.weight=\"-1\": expected a whole number from 0 to 65535",
            ),
            (
                ("vipd.port.http", "80/quic"),
                "vipd.port.http=\"80/quic\": the protocol must be tcp, udp or sctp",
            ),
            (("vipd.port.http", "0"), "vipd.port.http=\"0\": expected PORT"),
            ((ENABLE, "yes"), "vipd.enable=\"yes\": expected true or false"),
            (
                (PUBLISH, "8080"),
                "vipd.publish=\"8080\": \"8080\": expected PUBLISHED:TARGET",
            ),
            (
                (PUBLISH, "8080:80/sctp"),
                "vipd.publish=\"8080:80/sctp\": \"8080:80/sctp\": the protocol must be tcp or udp",
            ),
            (
                (PUBLISH, "8080:80,8080:81"),
                "port 8080/tcp is already published as 8080:80/tcp",
            ),
            ((PUBLISH, "0:80"), "with ports 1-65535"),
        ];
        for ((k, v), want) in cases {
            let mut labels = vec![(k, v)];
            if k != SERVICE {
                labels.push((SERVICE, "web"));
            }
            let e = task_labels(&container("a", &labels)).unwrap_err().to_string();
            assert!(e.starts_with("container aaaaaaaaaaaa (ca): "), "{e}");
            assert!(e.contains(want), "{e} does not contain {want}");
        }
    }

    #[test]
    fn published_ports_are_parsed_and_tasks_must_agree() {
        let p = parse_publish("8080:80, 53:5353/udp,53:53/tcp").unwrap();
        let shown: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["53:53/tcp", "8080:80/tcp", "53:5353/udp"]);
        let cs = [
            container("a", &[(SERVICE, "web"), (PUBLISH, "8080:80")]),
            container("b", &[(SERVICE, "web"), (PUBLISH, "8080:80/tcp")]),
            container("c", &[(SERVICE, "web"), (PUBLISH, "9090:80")]),
            container("d", &[(SERVICE, "web")]),
        ];
        let (defs, errors) = services(&cs);
        let web = &defs[&ServiceName::new("web").unwrap()];
        assert_eq!(web.publish, parse_publish("8080:80").unwrap());
        assert_eq!(web.tasks.len(), 2);
        let e: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(e.len(), 2, "{e:#?}");
        assert!(
            e[0].contains("vipd.publish=\"9090:80\": conflicts with service web: the service's other tasks publish \"8080:80/tcp\""),
            "{}",
            e[0]
        );
        assert!(e[1].contains("container dddddddddddd"), "{}", e[1]);
    }

    #[test]
    fn services_group_tasks_and_report_disagreements() {
        let cs = [
            container("a", &[(SERVICE, "web")]),
            container("b", &[(SERVICE, "web"), (WEIGHT, "3")]),
            container("c", &[(SERVICE, "web"), (ENDPOINT_MODE, "dnsrr")]),
            container("d", &[(SERVICE, "api"), (SCHEDULER, "nope")]),
            container("e", &[("unrelated", "x")]),
        ];
        let (defs, errors) = services(&cs);
        assert_eq!(defs.len(), 1);
        let web = &defs[&ServiceName::new("web").unwrap()];
        assert_eq!(web.tasks.values().copied().collect::<Vec<_>>(), [1, 3]);
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(
            errors[0].to_string().contains("conflicts with service web"),
            "{}",
            errors[0]
        );
        assert!(
            errors[1].to_string().contains("unknown scheduler"),
            "{}",
            errors[1]
        );
    }

    fn defined(
        name: &str,
        f: impl FnOnce(&mut ServiceDefinition),
    ) -> BTreeMap<ServiceName, ServiceDefinition> {
        let mut d = ServiceDefinition::new(ServiceName::new(name).unwrap());
        f(&mut d);
        BTreeMap::from([(d.name.clone(), d)])
    }

    #[test]
    fn a_definition_alone_is_a_service_with_no_task() {
        let stored = defined("web", |d| d.set_publish(&["8080:80"]).unwrap());
        let m = merge(&[container("e", &[("unrelated", "x")])], &stored);
        let web = &m.defs[&ServiceName::new("web").unwrap()];
        assert!(web.tasks.is_empty());
        assert_eq!(web.publish, parse_publish("8080:80").unwrap());
        assert!(m.label_errors.is_empty() && m.conflicts.is_empty());
    }

    #[test]
    fn labels_alone_behave_as_without_definitions() {
        let cs = [
            container("a", &[(SERVICE, "web"), (SCHEDULER, "wlc")]),
            container("b", &[(SERVICE, "web"), (ENDPOINT_MODE, "dnsrr")]),
        ];
        let m = merge(&cs, &defined("other", |_| {}));
        let (defs, errors) = services(&cs);
        assert_eq!(
            m.defs[&ServiceName::new("web").unwrap()],
            defs[&ServiceName::new("web").unwrap()]
        );
        assert_eq!(m.label_errors, errors);
        assert_eq!(m.defs.len(), 2, "web from labels, other from its definition");
        assert!(m.conflicts.is_empty());
    }

    #[test]
    fn labels_that_agree_with_the_definition_are_no_conflict() {
        let stored = defined("web", |d| {
            d.set_scheduler("wrr").unwrap();
            d.set_ports(&["http=80/tcp"]).unwrap();
        });
        let cs = [
            container(
                "a",
                &[(SERVICE, "web"), (SCHEDULER, "wrr"), ("vipd.port.http", "80")],
            ),
            // Unset labels are the defaults, not a disagreement.
            container("b", &[(SERVICE, "web"), (WEIGHT, "3")]),
        ];
        let m = merge(&cs, &stored);
        let web = &m.defs[&ServiceName::new("web").unwrap()];
        assert_eq!(web.tasks.values().copied().collect::<Vec<_>>(), [1, 3]);
        assert_eq!(web.scheduler.name(), "wrr");
        assert!(m.conflicts.is_empty() && m.label_errors.is_empty(), "{m:?}");
    }

    #[test]
    fn the_definition_wins_over_disagreeing_labels_and_each_disagreement_is_listed_once() {
        let stored = defined("web", |d| d.set_publish(&["8080:80"]).unwrap());
        let cs = [
            container("a", &[(SERVICE, "web"), (SCHEDULER, "wlc"), (PUBLISH, "9090:80")]),
            container(
                "b",
                &[(SERVICE, "web"), (SCHEDULER, "wlc"), (ENDPOINT_MODE, "dnsrr")],
            ),
            container("c", &[(SERVICE, "web"), ("vipd.port.http", "80")]),
        ];
        let m = merge(&cs, &stored);
        let web = &m.defs[&ServiceName::new("web").unwrap()];
        assert_eq!((web.mode, web.scheduler.name()), (EndpointMode::Vip, "rr"));
        assert_eq!(web.publish, parse_publish("8080:80").unwrap());
        assert!(web.ports.is_empty());
        assert_eq!(web.tasks.len(), 3, "every task is bound, none left out");
        assert!(m.label_errors.is_empty());
        let seen: Vec<(&str, &str, &str)> = m
            .conflicts
            .iter()
            .map(|c| {
                (
                    c.setting.as_str(),
                    c.label_value.as_str(),
                    c.stored_value.as_str(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("endpoint-mode", "dnsrr", "vip"),
                ("ports", "http=80/tcp", ""),
                ("publish", "9090:80/tcp", "8080:80/tcp"),
                ("scheduler", "wlc", "rr"),
            ]
        );
        assert!(m.conflicts.iter().all(|c| c.service == "web"));
    }

    #[test]
    fn a_definition_is_json_of_its_settings_and_is_checked_as_labels_are() {
        let stored = defined("web", |d| {
            d.set_endpoint_mode("dnsrr").unwrap();
            d.set_ports(&["dns=53/udp", "http=80"]).unwrap();
        });
        let d = &stored[&ServiceName::new("web").unwrap()];
        let text = serde_json::to_string(d).unwrap();
        assert_eq!(
            text,
            r#"{"name":"web","endpoint_mode":"dnsrr","scheduler":"rr","publish":[],"ports":["dns=53/udp","http=80/tcp"]}"#
        );
        assert_eq!(&serde_json::from_str::<ServiceDefinition>(&text).unwrap(), d);
        let bad = r#"{"name":"web","endpoint_mode":"vip","scheduler":"rr","ports":["http=80/quic"]}"#;
        let e = serde_json::from_str::<ServiceDefinition>(bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--port \"http=80/quic\": the protocol must be tcp, udp or sctp"),
            "{e}"
        );
        let mut d = d.clone();
        assert!(d
            .set_ports(&["http=80", "http=81"])
            .unwrap_err()
            .to_string()
            .contains("given twice"));
        assert!(d
            .set_ports(&["http"])
            .unwrap_err()
            .to_string()
            .contains("expected NAME=PORT"));
    }
}
