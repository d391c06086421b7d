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

use serde::Serialize;

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
    let mode = match c.labels.get(ENDPOINT_MODE).map(String::as_str) {
        None | Some("vip") => EndpointMode::Vip,
        Some("dnsrr") => EndpointMode::Dnsrr,
        Some(_) => return Err(err(ENDPOINT_MODE, "expected vip or dnsrr".into())),
    };
    let scheduler = match c.labels.get(SCHEDULER) {
        None => Scheduler::default(),
        Some(s) => s
            .parse()
            .map_err(|e: super::model::UnknownScheduler| err(SCHEDULER, e.to_string()))?,
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
        let valid_name = !name.is_empty()
            && name.len() <= 15
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid_name {
            return Err(err(label, "a port name is 1-15 letters, digits or '-'".into()));
        }
        let (port, proto) = value.split_once('/').unwrap_or((value, "tcp"));
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| err(label, "expected PORT[/tcp|/udp|/sctp] with PORT 1-65535".into()))?;
        let protocol = match proto {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            _ => return Err(err(label, "the protocol must be tcp, udp or sctp".into())),
        };
        ports.push(NamedPort::new(&name.to_ascii_lowercase(), protocol, port));
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

/// Services from containers: each service with its tasks, and every label problem.
///
/// Tasks of one service must agree on mode, scheduler and ports; the oldest-named task
/// (the smallest container id, so the choice is stable) decides, and a task that
/// disagrees is reported and left out.
pub fn services(containers: &[Container]) -> (BTreeMap<ServiceName, ServiceDef>, Vec<LabelError>) {
    let mut defs: BTreeMap<ServiceName, ServiceDef> = BTreeMap::new();
    let mut errors = Vec::new();
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
    (defs, errors)
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
}
