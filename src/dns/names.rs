//! The names vipd serves, spelled in one place: the catalog builder indexes them and the
//! fast path's table enumerates them, so the two cannot disagree on a name.
//!
//! Relative names (lowercase, no trailing dot), each also under the search domain:
//!
//! - `<svc>`: a service; `tasks.<svc>`: its tasks; `<a-b-c-d>.<svc>`: one task;
//! - `_<port>._<proto>.<svc>`: a named port (SRV), below `_<proto>.<svc>`;
//! - `d.c.b.a.in-addr.arpa`: the PTR name of `a.b.c.d` (never under the domain).

use std::net::Ipv4Addr;

use crate::core::model::Protocol;

/// The label in front of a service's name that names its tasks.
const TASKS: &str = "tasks";
/// The suffix of IPv4 PTR names.
const IN_ADDR_ARPA: &str = ".in-addr.arpa";

/// A name as the catalog keys it: lowercase (DNS names are case-insensitive).
pub fn key(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// The search domain as the catalog keeps it: lowercase, without its trailing dot.
pub fn domain(domain: &str) -> String {
    key(domain.trim_end_matches('.'))
}

/// `tasks.<svc>`: every task address of a service.
pub fn tasks(service: &str) -> String {
    format!("{TASKS}.{service}")
}

/// True when `name` is `tasks.<one label>`: vipd's even when no service has that name.
pub fn is_tasks_of_a_label(name: &str) -> bool {
    name.strip_prefix(TASKS)
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|label| !label.contains('.'))
}

/// `10.0.0.5` → `10-0-0-5`: the label naming one task.
pub fn task_label(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("{a}-{b}-{c}-{d}")
}

/// `<a-b-c-d>.<svc>`: one task of a service (the SRV targets).
pub fn task_host(ip: Ipv4Addr, service: &str) -> String {
    format!("{}.{service}", task_label(ip))
}

/// `_<port>._<proto>.<svc>`: the SRV name of a named port (the port name any case).
pub fn srv(port: &str, protocol: Protocol, service: &str) -> String {
    format!("_{}.{}", key(port), protocol_node(protocol, service))
}

/// `_<proto>.<svc>`: exists because the SRV names below it do.
pub fn protocol_node(protocol: Protocol, service: &str) -> String {
    format!("_{}.{service}", protocol.label())
}

/// `a.b.c.d` → `d.c.b.a.in-addr.arpa`.
pub fn reverse(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("{d}.{c}.{b}.{a}{IN_ADDR_ARPA}")
}

/// `d.c.b.a.in-addr.arpa` (lowercase, no trailing dot) → `a.b.c.d`; anything else → None.
pub fn parse_reverse(name: &str) -> Option<Ipv4Addr> {
    let rest = name.strip_suffix(IN_ADDR_ARPA)?;
    let mut octets = [0u8; 4];
    let mut labels = rest.split('.');
    for slot in octets.iter_mut().rev() {
        let label = labels.next()?;
        if label.is_empty() || label.len() > 3 || !label.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *slot = label.parse().ok()?;
    }
    labels.next().is_none().then(|| Ipv4Addr::from(octets))
}

/// `<rel>.<domain>`: a relative name under the search domain.
pub fn within(rel: &str, domain: &str) -> String {
    format!("{rel}.{domain}")
}

/// True when `name` is `domain` or below it.
pub fn is_within(name: &str, domain: &str) -> bool {
    name.strip_suffix(domain)
        .is_some_and(|head| head.is_empty() || head.ends_with('.'))
}

/// `<rel>.<domain>` → `<rel>`; None when `name` is not strictly below `domain`.
pub fn strip_domain<'a>(name: &'a str, domain: &str) -> Option<&'a str> {
    name.strip_suffix(domain)?.strip_suffix('.')
}

/// The absolute name (trailing dot) of a relative one: under `domain` when given, unless
/// it is there already.
pub fn absolute(rel: &str, domain: Option<&str>) -> String {
    match domain {
        Some(d) if !is_within(rel, d) => format!("{rel}.{d}."),
        _ => format!("{rel}."),
    }
}

/// Whether `name` (lowercase) can be a name in the catalog: dot-separated labels of 1-63
/// characters from a-z, 0-9, '-' and '_', not starting or ending with '-', 253 at most.
pub fn valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn service_derived_names_are_spelled_as_swarm_spells_them() {
        assert_eq!(tasks("web"), "tasks.web");
        assert_eq!(task_host(ip("10.0.0.5"), "web"), "10-0-0-5.web");
        assert_eq!(srv("HTTP", Protocol::Tcp, "web"), "_http._tcp.web");
        assert_eq!(protocol_node(Protocol::Udp, "db"), "_udp.db");
        assert_eq!(within("web", "vipd.local"), "web.vipd.local");
        assert_eq!(domain("VIPD.Local."), "vipd.local");
    }

    #[test]
    fn tasks_of_any_single_label_is_recognised() {
        assert!(is_tasks_of_a_label("tasks.web"));
        assert!(!is_tasks_of_a_label("tasks.a.b"));
        assert!(!is_tasks_of_a_label("tasksx.web"));
        assert!(!is_tasks_of_a_label("tasks"));
    }

    #[test]
    fn reverse_names_round_trip_and_reject_anything_else() {
        assert_eq!(reverse(ip("10.0.0.5")), "5.0.0.10.in-addr.arpa");
        assert_eq!(parse_reverse("5.0.0.10.in-addr.arpa"), Some(ip("10.0.0.5")));
        for other in [
            "0.10.in-addr.arpa",
            "1.100.0.0.10.in-addr.arpa",
            "x.0.0.10.in-addr.arpa",
            "256.0.0.10.in-addr.arpa",
            "0001.0.0.10.in-addr.arpa",
            "in-addr.arpa",
        ] {
            assert_eq!(parse_reverse(other), None, "{other}");
        }
    }

    #[test]
    fn the_domain_is_added_once_and_stripped_on_a_label_boundary() {
        assert_eq!(absolute("web", Some("vipd.local")), "web.vipd.local.");
        assert_eq!(absolute("a.vipd.local", Some("vipd.local")), "a.vipd.local.");
        assert_eq!(absolute("web", None), "web.");
        assert_eq!(strip_domain("web.vipd.local", "vipd.local"), Some("web"));
        assert_eq!(strip_domain("xvipd.local", "vipd.local"), None);
        assert_eq!(strip_domain("vipd.local", "vipd.local"), None);
        assert!(is_within("vipd.local", "vipd.local"));
        assert!(!is_within("xvipd.local", "vipd.local"));
    }

    #[test]
    fn valid_names_are_lowercase_dns_labels() {
        assert!(valid("web-1.a_b"));
        for bad in ["", "a..b", "-a", "a-", "A", "ü", "a b", &"x".repeat(64)] {
            assert!(!valid(bad), "{bad:?}");
        }
    }
}
