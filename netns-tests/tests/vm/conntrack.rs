//! A UDP client that keeps one socket open and keeps sending to a VIP must leave a
//! backend as soon as vipd removes it (the stale-backend fault: with `net.ipv4.vs.conntrack=1`, the
//! flow's conntrack entry names the removed backend and lives as long as packets come).
//!
//! No dockerd: a client and two UDP echo backends on a bridge, `vipd apply` in the client.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vipd::netns::{run_in, NetnsPath};

use crate::common::*;

const NET: &str = "10.77.5";
const VIP: &str = "10.77.5.100";
const PORT: u16 = 7000;
/// The client's fixed source port: one socket, one flow, for the whole test.
const CLIENT_PORT: u16 = 40000;

/// A UDP server in `ns` on `PORT` that answers every datagram with `NAME SEQ` (the
/// datagram is the sequence number), until `stop`.
fn udp_echo(ns: &Netns, name: &'static str, stop: &Arc<AtomicBool>) -> JoinHandle<usize> {
    let sock = run_in(&NetnsPath::from_arg(&ns.name), || {
        UdpSocket::bind(("0.0.0.0", PORT))
    })
    .expect("enter the backend's namespace")
    .expect("bind the backend's UDP socket");
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let stop = Arc::clone(stop);
    std::thread::spawn(move || {
        let mut answered = 0;
        let mut buf = [0u8; 256];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let seq = String::from_utf8_lossy(&buf[..n]).into_owned();
                if sock.send_to(format!("{name} {seq}").as_bytes(), from).is_ok() {
                    answered += 1;
                }
            }
        }
        answered
    })
}

/// One request of the client: when it was sent (since the start) and who answered it.
#[derive(Debug, Clone)]
struct Sent {
    at: Duration,
    answer: Option<&'static str>,
}

/// The client: one socket bound to `CLIENT_PORT`, a datagram to the VIP every 100 ms.
struct Client {
    start: Instant,
    log: Arc<Mutex<Vec<Sent>>>,
    sending: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    sender: Option<JoinHandle<()>>,
    receiver: Option<JoinHandle<()>>,
}

impl Client {
    fn start(ns: &Netns) -> Self {
        let sock = run_in(&NetnsPath::from_arg(&ns.name), || {
            UdpSocket::bind(("0.0.0.0", CLIENT_PORT))
        })
        .expect("enter the client's namespace")
        .expect("bind the client's UDP socket");
        let to: SocketAddr = format!("{VIP}:{PORT}").parse().unwrap();
        sock.connect(to).expect("connect the client's socket to the VIP");
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let recv_sock = sock.try_clone().unwrap();
        let start = Instant::now();
        let log = Arc::new(Mutex::new(Vec::<Sent>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let sending = Arc::new(AtomicBool::new(true));
        let sender = {
            let (log, sending) = (Arc::clone(&log), Arc::clone(&sending));
            std::thread::spawn(move || {
                let mut seq = 0usize;
                while sending.load(Ordering::Relaxed) {
                    log.lock().unwrap().push(Sent {
                        at: start.elapsed(),
                        answer: None,
                    });
                    // A send can fail (ECONNREFUSED after an ICMP error): keep going.
                    let _ = sock.send(seq.to_string().as_bytes());
                    seq += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        let receiver = {
            let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = recv_sock.recv(&mut buf) else {
                        continue;
                    };
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let mut parts = text.split(' ');
                    let who = match parts.next() {
                        Some("b1") => "b1",
                        Some("b2") => "b2",
                        _ => continue,
                    };
                    if let Some(seq) = parts.next().and_then(|s| s.parse::<usize>().ok()) {
                        if let Some(sent) = log.lock().unwrap().get_mut(seq) {
                            sent.answer = Some(who);
                        }
                    }
                }
            })
        };
        Client {
            start,
            log,
            sending,
            stop,
            sender: Some(sender),
            receiver: Some(receiver),
        }
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn log(&self) -> Vec<Sent> {
        self.log.lock().unwrap().clone()
    }

    /// Wait until `n` requests in a row were answered, and return who answered the last.
    fn wait_answers(&self, n: usize) -> &'static str {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            // The newest request may still be in flight: look at the ones before it.
            let settled = &log[..log.len().saturating_sub(1)];
            if settled.len() >= n && settled[settled.len() - n..].iter().all(|s| s.answer.is_some()) {
                return settled.last().unwrap().answer.unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "the VIP never answered {n} requests in a row: {log:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stop sending; the answers to the last requests are still taken for a moment.
    fn stop(&mut self) {
        self.sending.store(false, Ordering::Relaxed);
        if let Some(t) = self.sender.take() {
            let _ = t.join();
            std::thread::sleep(Duration::from_millis(500));
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.receiver.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The UDP conntrack entries of `ns`, as `conntrack -L -p udp` prints them, if the tool is
/// installed (information only: nothing here depends on it).
fn conntrack_udp(ns: &Netns) -> String {
    let out = ns.exec_output(&["conntrack", "-L", "-p", "udp"]);
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        format!(
            "(conntrack -L failed: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
}

/// A services file for one service `udp` over the given backend hosts.
fn udp_file(hosts: &[u8]) -> String {
    let b: Vec<String> = hosts.iter().map(|h| format!(r#"{{"ip":"{NET}.{h}"}}"#)).collect();
    services_file(&format!(
        r#"{{"services":[{{"name":"udp","vip":"{VIP}","fwmark":260,"backends":[{}]}}]}}"#,
        b.join(",")
    ))
}

/// `vipd apply` in `ns` with `extra` arguments; must succeed; returns its stdout.
fn apply_with(ns: &Netns, file: &str, extra: &[&str]) -> String {
    let path = ns.path();
    let mut args = vec!["apply", "--netns", &path, "--file", file];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = vipd_run(&args);
    assert!(ok, "vipd apply failed:\nstdout: {stdout}\nstderr: {stderr}");
    stdout
}

/// What the client saw around the removal of the backend it was stuck to.
struct Removal {
    stuck: &'static str,
    other: &'static str,
    /// Every request from the moment `vipd apply` started, with its send time relative to
    /// the moment the apply returned.
    around: Vec<(f64, Option<&'static str>)>,
}

impl Removal {
    fn lines(&self) -> String {
        let l: Vec<String> = self
            .around
            .iter()
            .map(|(t, a)| format!("{t:+.2} s: {}", a.unwrap_or("-")))
            .collect();
        l.join("\n  ")
    }

    /// Requests sent at or after `from` s (relative to the apply's return).
    fn since(&self, from: f64) -> impl Iterator<Item = &(f64, Option<&'static str>)> {
        self.around.iter().filter(move |(t, _)| *t >= from)
    }

    /// Send time of the last request the removed backend answered.
    fn last_by_stuck(&self) -> Option<f64> {
        self.around
            .iter()
            .rev()
            .find(|(_, a)| *a == Some(self.stuck))
            .map(|(t, _)| *t)
    }

    /// Send time of the first request the other backend answered.
    fn first_by_other(&self) -> Option<f64> {
        self.around
            .iter()
            .find(|(_, a)| *a == Some(self.other))
            .map(|(t, _)| *t)
    }
}

/// A client and two UDP echo backends on a bridge, a VIP over both (`vipd apply` with
/// `extra` arguments); the client's one flow sticks to one backend, which is then removed
/// from the services file. The client goes on for 3 s after the apply returns.
fn remove_the_backend_of_one_udp_flow(extra: &[&str]) -> Removal {
    require_root();
    assert!(
        kernel_has_ipvs(),
        "the VM suite needs a kernel with IPVS (run it with scripts/vm/run.sh)"
    );
    let switch = Netns::new("vsw");
    switch.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
    switch.exec(&["ip", "link", "set", "br0", "up"]);
    let attach = |host: &Netns, h: u8| {
        let port = format!("p{h}");
        veth(host, "eth0", Some(&format!("{NET}.{h}/24")), &switch, &port);
        switch.exec(&["ip", "link", "set", &port, "master", "br0"]);
    };
    let client = Netns::new("vcl");
    attach(&client, 2);
    let b1 = Netns::new("vbe");
    attach(&b1, 3);
    let b2 = Netns::new("vbe");
    attach(&b2, 4);
    let stop = Arc::new(AtomicBool::new(false));
    let servers = [udp_echo(&b1, "b1", &stop), udp_echo(&b2, "b2", &stop)];
    let host_of = |name: &str| if name == "b1" { 3u8 } else { 4u8 };

    apply_with(&client, &udp_file(&[3, 4]), extra);
    let mut c = Client::start(&client);
    let stuck = c.wait_answers(10);
    let other = if stuck == "b1" { "b2" } else { "b1" };
    // Two more seconds on the same flow: it stays with one backend.
    std::thread::sleep(Duration::from_secs(2));
    let before = c.log();
    let answered: Vec<&str> = before.iter().filter_map(|s| s.answer).collect();
    assert!(
        answered.iter().all(|a| *a == stuck),
        "one socket, one flow, one backend: {answered:?}"
    );
    eprintln!(
        "before: {} requests, {} answered, all by {stuck}",
        before.len(),
        answered.len()
    );
    eprintln!("conntrack before:\n{}", conntrack_udp(&client));

    let removed_at = c.now();
    let out = apply_with(&client, &udp_file(&[host_of(other)]), extra);
    let applied_at = c.now();
    assert_eq!(
        out,
        format!(
            "ipvsadm -d -f 260 -r {NET}.{}:0\napplied 1 operations\n",
            host_of(stuck)
        ),
        "removing the backend is one operation, whatever vipd does besides"
    );
    eprintln!(
        "removed {stuck} ({NET}.{}): vipd apply ran from {:.2} s to {:.2} s",
        host_of(stuck),
        removed_at.as_secs_f64(),
        applied_at.as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(3));
    eprintln!("conntrack after:\n{}", conntrack_udp(&client));
    eprintln!(
        "ipvsadm -Lnc after:\n{}",
        String::from_utf8_lossy(&client.exec_output(&["ipvsadm", "-Lnc"]).stdout)
    );
    c.stop();
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().expect("an echo server");
    }
    apply_with(&client, &services_file("{}"), extra);

    let base = applied_at.as_secs_f64();
    let removal = Removal {
        stuck,
        other,
        around: c
            .log()
            .into_iter()
            .filter(|s| s.at >= removed_at)
            .map(|s| (s.at.as_secs_f64() - base, s.answer))
            .collect(),
    };
    eprintln!("from the start of the apply:\n  {}", removal.lines());
    let count = |a: Option<&str>| removal.since(0.0).filter(|(_, x)| *x == a).count();
    eprintln!(
        "requests sent after the apply returned: {} answered by the removed {stuck}, \
         {} by {other}, {} unanswered; last answer by {stuck} at {:?} s, first by {other} \
         at {:?} s (send times, relative to the apply's return)",
        count(Some(stuck)),
        count(Some(other)),
        count(None),
        removal.last_by_stuck(),
        removal.first_by_other(),
    );
    removal
}

/// With vipd's sysctls the flow moves to the other backend at once. The
/// kernel does it (Linux >= 5.9, "ipvs: queue delayed work to expire no destination
/// connections if expire_nodest_conn=1"): removing a destination expires its IPVS
/// connections, and with `conntrack=1` each takes its conntrack entry with it. Measured
/// the other way: with `--sysctl expire_nodest_conn=0` the flow stays pinned to the
/// removed backend and every later request is lost, so this test guards that sysctl.
#[test]
fn a_udp_client_on_one_socket_leaves_a_removed_backend_at_once() {
    let r = remove_the_backend_of_one_udp_flow(&[]);
    let (stuck, other) = (r.stuck, r.other);
    assert_eq!(
        r.since(0.0).filter(|(_, a)| *a == Some(stuck)).count(),
        0,
        "the removed backend {stuck} still answers the client's flow:\n  {}",
        r.lines()
    );
    let (last, first) = (r.last_by_stuck(), r.first_by_other());
    assert!(
        first.is_some_and(|f| f - last.unwrap_or(f64::NEG_INFINITY) <= 1.0 && f <= 1.0),
        "{other} did not take the flow within 1 s of {stuck}'s last answer:\n  {}",
        r.lines()
    );
    let lost: Vec<f64> = r
        .since(first.unwrap())
        .filter(|(_, a)| a.is_none())
        .map(|(t, _)| *t)
        .collect();
    assert!(
        lost.is_empty(),
        "requests lost after the flow moved: {lost:?}\n  {}",
        r.lines()
    );
}
