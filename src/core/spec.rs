//! The desired state of one sandbox, as given to `vipd apply --file`, and its validation.
//!
//! Input is parsed into loose `Raw*` structs first, then checked as a whole: every problem
//! is reported with the path of the field it concerns (`services[1].vip`), and nothing is
//! changed unless the whole file is valid.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;

use super::ipvs::Timeouts;
use super::labels::Publish;
use super::model::{BackendAddr, FwMark, Scheduler, ServiceName, Vip};

/// The largest weight `ipvsadm` accepts.
pub const MAX_WEIGHT: u32 = 65_535;
/// The default weight of a backend.
pub const DEFAULT_WEIGHT: u32 = 1;

/// One backend (task) of a service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Backend {
    pub addr: BackendAddr,
    pub weight: u32,
    /// The port connections are forwarded to; 0 keeps the packet's own port (a VIP).
    #[serde(skip_serializing_if = "is_zero")]
    pub port: u16,
}

fn is_zero(port: &u16) -> bool {
    *port == 0
}

/// One service as vipd should program it in a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServiceSpec {
    pub name: ServiceName,
    pub vip: Vip,
    pub fwmark: FwMark,
    pub scheduler: Scheduler,
    /// IPVS persistence (`ipvsadm -p`), in seconds.
    pub persistence: Option<u32>,
    pub backends: Vec<Backend>,
    /// A port published on the routing mesh: set in the ingress namespace, where the
    /// service's address is the namespace's own and only this port is marked (in
    /// PREROUTING); `None` for a VIP in a sandbox.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<Publish>,
}

/// Everything vipd should have in one sandbox namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct SandboxSpec {
    pub services: Vec<ServiceSpec>,
    /// IPVS connection timeouts to set in the namespace; `None` leaves them as they are.
    pub timeouts: Option<Timeouts>,
}

/// One problem with the input, and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// The input was refused; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Not JSON of the expected shape.
    #[error("invalid services file: {0}")]
    Syntax(String),
    /// Well-formed but wrong in one or more fields.
    #[error("invalid services file:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Fields(Vec<FieldError>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    services: Vec<RawService>,
    #[serde(default)]
    timeouts: Option<RawTimeouts>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    vip: String,
    fwmark: u64,
    #[serde(default)]
    scheduler: Option<String>,
    #[serde(default)]
    persistence: Option<u64>,
    #[serde(default)]
    backends: Vec<RawBackend>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    ip: String,
    #[serde(default)]
    weight: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    tcp: u64,
    tcpfin: u64,
    udp: u64,
}

/// Parse and validate a services file.
pub fn parse(json: &str) -> Result<SandboxSpec, SpecError> {
    let raw: RawFile = serde_json::from_str(json).map_err(|e| SpecError::Syntax(e.to_string()))?;
    let mut errors = Vec::new();
    let mut err = |field: String, reason: String| errors.push(FieldError { field, reason });

    let mut services = Vec::new();
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut vips: BTreeMap<IpAddr, usize> = BTreeMap::new();
    let mut marks: BTreeMap<u64, usize> = BTreeMap::new();

    for (i, rs) in raw.services.iter().enumerate() {
        let at = |f: &str| format!("services[{i}].{f}");
        let name = match ServiceName::new(&rs.name) {
            Ok(n) => Some(n),
            Err(e) => {
                err(at("name"), e.to_string());
                None
            }
        };
        if let Some(first) = names.insert(rs.name.clone(), i) {
            err(
                at("name"),
                format!("duplicate service name {:?} (also services[{first}])", rs.name),
            );
        }
        let vip = match parse_unicast_v4(&rs.vip) {
            Ok(a) => {
                if let Some(first) = vips.insert(a, i) {
                    err(at("vip"), format!("duplicate VIP {a} (also services[{first}])"));
                }
                Some(Vip::new(a))
            }
            Err(reason) => {
                err(at("vip"), reason);
                None
            }
        };
        let fwmark = match u32::try_from(rs.fwmark).ok().and_then(FwMark::new) {
            Some(m) => {
                if let Some(first) = marks.insert(rs.fwmark, i) {
                    err(
                        at("fwmark"),
                        format!("duplicate fwmark {} (also services[{first}])", rs.fwmark),
                    );
                }
                Some(m)
            }
            None => {
                err(
                    at("fwmark"),
                    format!("fwmark {} is out of range 1..=4294967295", rs.fwmark),
                );
                None
            }
        };
        let scheduler = match rs.scheduler.as_deref().map(str::parse::<Scheduler>) {
            None => Some(Scheduler::default()),
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                err(at("scheduler"), e.to_string());
                None
            }
        };
        let persistence = match rs.persistence {
            None => None,
            Some(p) if (1..=u64::from(u32::MAX)).contains(&p) => Some(p as u32),
            Some(p) => {
                err(
                    at("persistence"),
                    format!("persistence {p} s is out of range 1..=4294967295"),
                );
                None
            }
        };
        let mut backends = Vec::new();
        let mut seen = BTreeSet::new();
        for (j, rb) in rs.backends.iter().enumerate() {
            let bat = |f: &str| format!("services[{i}].backends[{j}].{f}");
            let addr = match parse_unicast_v4(&rb.ip) {
                Ok(a) if vip.is_some_and(|v| v.addr() == a) => {
                    err(bat("ip"), format!("backend {a} is the service's own VIP"));
                    None
                }
                Ok(a) => {
                    if !seen.insert(a) {
                        err(bat("ip"), format!("duplicate backend {a}"));
                    }
                    Some(BackendAddr::new(a))
                }
                Err(reason) => {
                    err(bat("ip"), reason);
                    None
                }
            };
            let weight = match rb.weight {
                None => Some(DEFAULT_WEIGHT),
                Some(w) if w <= u64::from(MAX_WEIGHT) => Some(w as u32),
                Some(w) => {
                    err(
                        bat("weight"),
                        format!("weight {w} is out of range 0..={MAX_WEIGHT}"),
                    );
                    None
                }
            };
            if let (Some(addr), Some(weight)) = (addr, weight) {
                backends.push(Backend {
                    addr,
                    weight,
                    port: 0,
                });
            }
        }
        if let (Some(name), Some(vip), Some(fwmark), Some(scheduler)) = (name, vip, fwmark, scheduler) {
            backends.sort_by_key(|b| b.addr);
            services.push(ServiceSpec {
                name,
                vip,
                fwmark,
                scheduler,
                persistence,
                backends,
                publish: None,
            });
        }
    }

    let timeouts = raw.timeouts.and_then(|t| {
        let mut ok = true;
        for (f, v) in [("tcp", t.tcp), ("tcpfin", t.tcpfin), ("udp", t.udp)] {
            if v == 0 || v > i32::MAX as u64 {
                err(
                    format!("timeouts.{f}"),
                    format!("timeout {v} s is out of range 1..=2147483647"),
                );
                ok = false;
            }
        }
        ok.then_some(Timeouts {
            tcp: t.tcp as u32,
            tcp_fin: t.tcpfin as u32,
            udp: t.udp as u32,
        })
    });

    if errors.is_empty() {
        services.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(SandboxSpec { services, timeouts })
    } else {
        Err(SpecError::Fields(errors))
    }
}

/// An IPv4 unicast address, or why not.
fn parse_unicast_v4(text: &str) -> Result<IpAddr, String> {
    let addr: IpAddr = text
        .parse()
        .map_err(|_| format!("invalid address {text:?}: expected an IPv4 address like 10.0.0.100"))?;
    let v4 = match addr {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => return Err(format!("{addr} is IPv6: only IPv4 is supported for now")),
    };
    if v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() || v4.is_loopback() {
        return Err(format!("{addr} is not a unicast address"));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> Vec<String> {
        match parse(json) {
            Err(SpecError::Fields(v)) => v.into_iter().map(|e| e.to_string()).collect(),
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn the_documented_example_parses_with_defaults() {
        let spec = parse(
            r#"{"services":[{"name":"web","vip":"10.0.0.100","fwmark":256,
                "backends":[{"ip":"10.0.0.4"},{"ip":"10.0.0.3","weight":2}]}]}"#,
        )
        .unwrap();
        let web = &spec.services[0];
        assert_eq!(web.name.as_str(), "web");
        assert_eq!(web.fwmark.get(), 256);
        assert_eq!(web.scheduler, Scheduler::RoundRobin);
        assert_eq!(web.backends[0].addr.to_string(), "10.0.0.3");
        assert_eq!(web.backends[0].weight, 2);
        assert_eq!(web.backends[1].weight, DEFAULT_WEIGHT);
        assert_eq!(spec.timeouts, None);
    }

    #[test]
    fn an_empty_file_means_no_services() {
        assert!(parse("{}").unwrap().services.is_empty());
        assert!(parse(r#"{"services":[]}"#).unwrap().services.is_empty());
    }

    #[test]
    fn every_bad_field_is_named() {
        let errs = fields(
            r#"{"services":[
                {"name":"web","vip":"10.0.0.100","fwmark":256,"scheduler":"roundrobin"},
                {"name":"api","vip":"10.0.0.100","fwmark":256,"backends":[{"ip":"10.0.0.x"},{"ip":"10.0.0.3","weight":70000}]},
                {"name":"web","vip":"fe80::1","fwmark":0}
            ]}"#,
        );
        let want = [
            "services[0].scheduler: unknown scheduler \"roundrobin\"",
            "services[1].vip: duplicate VIP 10.0.0.100 (also services[0])",
            "services[1].fwmark: duplicate fwmark 256 (also services[0])",
            "services[1].backends[0].ip: invalid address \"10.0.0.x\"",
            "services[1].backends[1].weight: weight 70000 is out of range",
            "services[2].name: duplicate service name \"web\" (also services[0])",
            "services[2].vip: fe80::1 is IPv6",
            "services[2].fwmark: fwmark 0 is out of range",
        ];
        for w in want {
            assert!(
                errs.iter().any(|e| e.starts_with(w)),
                "missing {w:?} in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), want.len(), "{errs:#?}");
    }

    #[test]
    fn backends_must_be_distinct_unicast_and_not_the_vip() {
        let errs = fields(
            r#"{"services":[{"name":"web","vip":"10.0.0.100","fwmark":1,"backends":[
                {"ip":"10.0.0.3"},{"ip":"10.0.0.3"},{"ip":"10.0.0.100"},{"ip":"224.0.0.1"}]}]}"#,
        );
        assert_eq!(
            errs,
            [
                "services[0].backends[1].ip: duplicate backend 10.0.0.3",
                "services[0].backends[2].ip: backend 10.0.0.100 is the service's own VIP",
                "services[0].backends[3].ip: 224.0.0.1 is not a unicast address",
            ]
        );
    }

    #[test]
    fn unknown_fields_and_bad_json_are_refused() {
        assert!(matches!(parse(r#"{"servces":[]}"#), Err(SpecError::Syntax(m)) if m.contains("servces")));
        assert!(matches!(parse("{"), Err(SpecError::Syntax(_))));
        assert!(matches!(
            parse(r#"{"services":[{"name":"web","vip":"10.0.0.1"}]}"#),
            Err(SpecError::Syntax(m)) if m.contains("fwmark")
        ));
    }

    #[test]
    fn timeouts_are_checked() {
        let spec = parse(r#"{"timeouts":{"tcp":3600,"tcpfin":120,"udp":300}}"#).unwrap();
        assert_eq!(
            spec.timeouts,
            Some(Timeouts {
                tcp: 3600,
                tcp_fin: 120,
                udp: 300
            })
        );
        assert_eq!(
            fields(r#"{"timeouts":{"tcp":0,"tcpfin":120,"udp":300}}"#),
            ["timeouts.tcp: timeout 0 s is out of range 1..=2147483647"]
        );
    }
}
