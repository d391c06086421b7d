//! The host ports already held, so the routing mesh does not publish a port a host
//! process listens on.

use std::collections::BTreeSet;
use std::fs;
use std::io;

use super::IngressError;
use crate::core::model::{PortKey, Protocol};

/// TCP state `LISTEN` as `/proc/net/tcp` prints it (`st` column).
const TCP_LISTEN: u8 = 0x0A;

/// The ports held in the calling thread's network namespace: TCP sockets in state
/// LISTEN and every UDP socket (the kernel lists only bound ones), IPv4 and IPv6, from
/// `/proc/thread-self/net/{tcp,tcp6,udp,udp6}`. A missing IPv6 listing (IPv6 disabled)
/// counts as empty.
pub fn bound_ports() -> Result<BTreeSet<PortKey>, IngressError> {
    let mut out = BTreeSet::new();
    for (file, proto, optional) in [
        ("tcp", Protocol::Tcp, false),
        ("tcp6", Protocol::Tcp, true),
        ("udp", Protocol::Udp, false),
        ("udp6", Protocol::Udp, true),
    ] {
        let path = format!("/proc/thread-self/net/{file}");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if optional && e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(IngressError::ProcNet { path, source }),
        };
        let ports = parse_proc_net(&text, proto).map_err(|(line, text)| IngressError::ProcNetParse {
            path: path.clone(),
            line,
            text,
        })?;
        out.extend(ports.into_iter().map(|p| PortKey::new(proto, p)));
    }
    Ok(out)
}

/// The local ports of one `/proc/net/{tcp,udp}[6]` listing that are held: TCP sockets in
/// state LISTEN, every UDP socket. On a line it cannot read, its number (from 1) and text.
fn parse_proc_net(text: &str, proto: Protocol) -> Result<Vec<u16>, (usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        if first == "sl" {
            continue;
        }
        let local = fields.next();
        let _remote = fields.next();
        let state = fields.next();
        let parsed = local
            .and_then(|l| l.rsplit_once(':'))
            .and_then(|(_, port)| u16::from_str_radix(port, 16).ok())
            .zip(state.and_then(|s| u8::from_str_radix(s, 16).ok()));
        let Some((port, state)) = parsed else {
            return Err((n + 1, line.to_owned()));
        };
        if port == 0 || (proto == Protocol::Tcp && state != TCP_LISTEN) {
            continue;
        }
        out.push(port);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as this kernel printed them: a listener on 127.0.0.1:53 with one accepted
    // connection (both ends ESTABLISHED), a listener on [::]:8080, UDP bound on
    // 0.0.0.0:5353 and [::1]:161, and a connected UDP client socket.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0035 00000000:0000 0A 00000000:00000001 00:00000000 00000000     0        0 1099128 2 00000000565d7859 100 0 0 10 0
   1: 0100007F:0035 0100007F:83DA 01 00000000:00000000 00:00000000 00000000     0        0 0 1 000000000c042a11 20 0 0 10 -1
   2: 0100007F:83DA 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 1099129 2 00000000f1d5b1e7 20 0 0 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1099127 1 000000009066586b 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 1031: 0100007F:B79B 0100007F:14E9 01 00000000:00000000 00:00000000 00000000     0        0 1099132 2 000000001c340fd4 0
 8533: 00000000:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1099130 2 000000008d967220 0
";
    const UDP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 3341: 00000000000000000000000001000000:00A1 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1099131 2 00000000633cbef9 0
";

    #[test]
    fn tcp_counts_only_listening_sockets() {
        // 0x83DA (33754) is the ESTABLISHED client end: not a held port.
        assert_eq!(parse_proc_net(TCP, Protocol::Tcp), Ok(vec![53]));
        assert_eq!(parse_proc_net(TCP6, Protocol::Tcp), Ok(vec![8080]));
    }

    #[test]
    fn udp_counts_every_bound_socket() {
        assert_eq!(parse_proc_net(UDP, Protocol::Udp), Ok(vec![5353, 0xB79B]));
        assert_eq!(parse_proc_net(UDP6, Protocol::Udp), Ok(vec![161]));
    }

    #[test]
    fn an_empty_listing_has_no_ports() {
        let header = TCP.lines().next().unwrap();
        assert_eq!(parse_proc_net(header, Protocol::Tcp), Ok(vec![]));
        assert_eq!(parse_proc_net("", Protocol::Udp), Ok(vec![]));
    }

    #[test]
    fn a_line_it_cannot_read_is_reported_with_its_number() {
        let text = format!("{TCP}   3: garbage\n");
        let (line, text) = parse_proc_net(&text, Protocol::Tcp).unwrap_err();
        assert_eq!(line, 5);
        assert!(text.contains("garbage"));
        assert!(parse_proc_net("   0: 0100007F:0035 00000000:0000 ZZ", Protocol::Tcp).is_err());
    }

    #[test]
    fn protocols_print_as_iptables_writes_them() {
        assert_eq!(Protocol::Tcp.to_string(), "tcp");
        assert_eq!(Protocol::Udp.to_string(), "udp");
        assert!(Protocol::Tcp < Protocol::Udp);
    }
}
