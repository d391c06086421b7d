//! The datapath end to end in a kernel with IPVS: a client namespace and three backends
//! on a bridge, `vipd apply` in the client, real HTTP through the VIP.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// A bridge in a namespace of its own, a client and `n` HTTP backends on `10.77.<net>.0/24`.
pub struct Lan {
    pub net: u8,
    pub client: Netns,
    /// Kept so the backends' namespaces live as long as the LAN.
    _backends: Vec<Netns>,
    httpds: Vec<Child>,
    _switch: Netns,
}

impl Lan {
    pub fn new(net: u8, n: usize) -> Self {
        let switch = Netns::new("vsw");
        switch.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
        switch.exec(&["ip", "link", "set", "br0", "up"]);
        let attach = |host: &Netns, addr: &str, port: &str| {
            veth(host, "eth0", Some(addr), &switch, port);
            switch.exec(&["ip", "link", "set", port, "master", "br0"]);
        };
        let client = Netns::new("vcl");
        attach(&client, &format!("10.77.{net}.2/24"), "p2");
        let mut backends = Vec::new();
        let mut httpds = Vec::new();
        for i in 0..n {
            let b = Netns::new("vbe");
            let host = 3 + i;
            attach(&b, &format!("10.77.{net}.{host}/24"), &format!("p{host}"));
            let root = std::env::temp_dir().join(unique("www"));
            std::fs::create_dir_all(&root).unwrap();
            std::fs::write(root.join("index.html"), format!("b{}\n", i + 1)).unwrap();
            let child = Command::new("ip")
                .args([
                    "netns", "exec", &b.name, "busybox", "httpd", "-f", "-p", "80", "-h",
                ])
                .arg(&root)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start busybox httpd");
            httpds.push(child);
            backends.push(b);
        }
        let lan = Lan {
            net,
            client,
            _backends: backends,
            httpds,
            _switch: switch,
        };
        for i in 0..n {
            lan.wait_http(&lan.backend_ip(i));
        }
        lan
    }

    pub fn ip(&self, host: usize) -> String {
        format!("10.77.{}.{host}", self.net)
    }

    pub fn backend_ip(&self, i: usize) -> String {
        self.ip(3 + i)
    }

    pub fn vip(&self) -> String {
        self.ip(100)
    }

    fn wait_http(&self, ip: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self
                .client
                .exec_output(&["curl", "-s", "--max-time", "2", &format!("http://{ip}/")]);
            if out.status.success() {
                return;
            }
            assert!(Instant::now() < deadline, "backend {ip} never answered HTTP");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `count` new connections from the client to `ip`, in one curl process; answers by name.
    pub fn requests(&self, ip: &str, count: usize) -> BTreeMap<String, usize> {
        let url = format!("http://{ip}/");
        let mut args = vec!["curl", "-s", "--max-time", "5", "-H", "Connection: close"];
        for _ in 0..count {
            args.push(&url);
        }
        let body = self.client.exec(&args);
        let mut seen = BTreeMap::new();
        for line in body.lines() {
            *seen.entry(line.to_owned()).or_insert(0) += 1;
        }
        assert_eq!(
            seen.values().sum::<usize>(),
            count,
            "not every request was answered: {body:?}"
        );
        seen
    }

    /// A services file for one service `web` over the given backends.
    pub fn web_file(&self, backends: &[usize]) -> String {
        let b: Vec<String> = backends
            .iter()
            .map(|i| format!(r#"{{"ip":"{}"}}"#, self.backend_ip(*i)))
            .collect();
        services_file(&format!(
            r#"{{"services":[{{"name":"web","vip":"{}","fwmark":256,"backends":[{}]}}]}}"#,
            self.vip(),
            b.join(",")
        ))
    }

    fn sysctl(&self, name: &str) -> String {
        self.client
            .exec(&["cat", &format!("/proc/sys/net/ipv4/vs/{name}")])
            .trim()
            .to_owned()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for c in &mut self.httpds {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

#[test]
fn a_vip_balances_over_its_backends_and_leaves_no_trace() {
    require_root();
    assert!(
        kernel_has_ipvs(),
        "the VM suite needs a kernel with IPVS (run it with scripts/vm/run.sh)"
    );
    let lan = Lan::new(1, 3);
    let c = &lan.client;

    // Someone else's IPVS services and iptables rule, which vipd must never touch.
    c.exec(&["ipvsadm", "-A", "-t", &format!("{}:80", lan.ip(200)), "-s", "rr"]);
    c.exec(&["ipvsadm", "-A", "-f", "999", "-s", "wlc"]);
    c.exec(&[
        "iptables",
        "-t",
        "mangle",
        "-A",
        "OUTPUT",
        "-d",
        "10.9.9.9/32",
        "-j",
        "MARK",
        "--set-mark",
        "999",
    ]);
    let pristine_mangle = c.iptables_save("mangle");
    let pristine_nat = c.iptables_save("nat");
    let defaults: Vec<String> = [
        "conntrack",
        "conn_reuse_mode",
        "expire_nodest_conn",
        "expire_quiescent_template",
    ]
    .iter()
    .map(|n| lan.sysctl(n))
    .collect();

    let out = apply(c, &lan.web_file(&[0, 1, 2]));
    assert!(out.contains("ipvsadm -A -f 256 -s rr\n"), "{out}");
    assert!(applied_count(&out) > 0, "{out}");

    assert_eq!(
        lan.requests(&lan.vip(), 30),
        counts(&[("b1", 10), ("b2", 10), ("b3", 10)])
    );

    let ipvsadm = c.exec(&["ipvsadm", "-Ln"]);
    assert!(ipvsadm.contains("FWM  256 rr"), "{ipvsadm}");
    for i in 0..3 {
        let line = format!("-> {}:0", lan.backend_ip(i));
        assert!(
            ipvsadm.lines().any(|l| l.contains(&line) && l.contains("Masq")),
            "{ipvsadm}"
        );
    }
    let mangle = c.exec(&["iptables", "-t", "mangle", "-S"]);
    let mark = format!(
        "-A VIPD-OUTPUT -d {}/32 -m comment --comment \"vipd:web:256\" -j MARK --set-xmark 0x100/0xffffffff",
        lan.vip()
    );
    assert!(mangle.contains(&mark), "{mangle}");
    assert!(mangle.contains("-A OUTPUT -j VIPD-OUTPUT"), "{mangle}");
    let nat = c.exec(&["iptables", "-t", "nat", "-S"]);
    let snat = format!(
        "-A VIPD-POSTROUTING -d 10.77.1.0/24 -m ipvs --ipvs -m comment --comment \"vipd:snat\" -j SNAT --to-source {}",
        lan.ip(2)
    );
    assert!(nat.contains(&snat), "{nat}");
    assert_eq!(lan.sysctl("conntrack"), "1");
    assert_eq!(lan.sysctl("conn_reuse_mode"), "0");
    assert_eq!(lan.sysctl("expire_nodest_conn"), "1");
    assert_eq!(lan.sysctl("expire_quiescent_template"), "1");

    let ping = c.exec_output(&["ping", "-c", "1", "-W", "3", &lan.vip()]);
    assert!(
        ping.status.success(),
        "ping VIP: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    let (ok, show, err) = vipd_run(&["show", "--netns", &c.name]);
    assert!(ok, "{err}");
    assert!(show.contains("FWM  256 rr"), "{show}");
    assert!(show.contains(&format!("# web vip {}", lan.vip())), "{show}");
    assert!(
        show.contains("(2 other IPVS service(s) in this namespace are not vipd's)"),
        "{show}"
    );

    // Nothing changed: nothing to do.
    let again = apply(c, &lan.web_file(&[0, 1, 2]));
    assert_eq!(again, "applied 0 operations\n");

    // One backend leaves: exactly one operation, and it gets no more requests.
    let out = apply(c, &lan.web_file(&[0, 1]));
    assert_eq!(
        out,
        format!(
            "ipvsadm -d -f 256 -r {}:0\napplied 1 operations\n",
            lan.backend_ip(2)
        )
    );
    assert_eq!(lan.requests(&lan.vip(), 30), counts(&[("b1", 15), ("b2", 15)]));

    // Foreign state is still there.
    let ipvsadm = c.exec(&["ipvsadm", "-Ln"]);
    assert!(
        ipvsadm.contains(&format!("TCP  {}:80 rr", lan.ip(200))),
        "{ipvsadm}"
    );
    assert!(ipvsadm.contains("FWM  999 wlc"), "{ipvsadm}");
    assert!(c
        .iptables_save("mangle")
        .contains("-A OUTPUT -d 10.9.9.9/32 -j MARK --set-xmark 0x3e7/0xffffffff"));

    // An empty file: no vipd state left, foreign state intact, sysctls as they were.
    let out = apply(c, &services_file(r#"{"services":[]}"#));
    assert!(out.contains("ipvsadm -D -f 256\n"), "{out}");
    let ipvsadm = c.exec(&["ipvsadm", "-Ln"]);
    assert!(!ipvsadm.contains("FWM  256"), "{ipvsadm}");
    assert!(ipvsadm.contains("FWM  999 wlc"), "{ipvsadm}");
    assert!(
        ipvsadm.contains(&format!("TCP  {}:80 rr", lan.ip(200))),
        "{ipvsadm}"
    );
    assert_eq!(c.iptables_save("mangle"), pristine_mangle);
    assert_eq!(c.iptables_save("nat"), pristine_nat);
    let after: Vec<String> = [
        "conntrack",
        "conn_reuse_mode",
        "expire_nodest_conn",
        "expire_quiescent_template",
    ]
    .iter()
    .map(|n| lan.sysctl(n))
    .collect();
    assert_eq!(after, defaults);
    assert_eq!(apply(c, &services_file("{}")), "applied 0 operations\n");
}

#[test]
fn weights_schedulers_timeouts_and_a_foreign_fwmark() {
    require_root();
    assert!(
        kernel_has_ipvs(),
        "the VM suite needs a kernel with IPVS (run it with scripts/vm/run.sh)"
    );
    let lan = Lan::new(2, 2);
    let c = &lan.client;
    let file = services_file(&format!(
        r#"{{"services":[{{"name":"web","vip":"{}","fwmark":300,"scheduler":"wrr",
             "backends":[{{"ip":"{}","weight":2}},{{"ip":"{}","weight":1}}]}}],
            "timeouts":{{"tcp":3600,"tcpfin":60,"udp":120}}}}"#,
        lan.vip(),
        lan.backend_ip(0),
        lan.backend_ip(1)
    ));
    apply(c, &file);
    assert_eq!(lan.requests(&lan.vip(), 30), counts(&[("b1", 20), ("b2", 10)]));
    let timeouts = c.exec(&["ipvsadm", "-L", "--timeout"]);
    assert!(
        timeouts.contains("Timeout (tcp tcpfin udp): 3600 60 120"),
        "{timeouts}"
    );
    assert_eq!(apply(c, &file), "applied 0 operations\n");

    // --dry-run prints and changes nothing.
    let (ok, out, err) = vipd_run(&[
        "apply",
        "--dry-run",
        "--netns",
        &c.name,
        "--file",
        &services_file("{}"),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("ipvsadm -D -f 300"), "{out}");
    assert!(out.ends_with("none applied\n"), "{out}");
    assert!(c.exec(&["ipvsadm", "-Ln"]).contains("FWM  300 wrr"));

    // A fwmark taken by someone else's IPVS service is refused before anything changes.
    c.exec(&["ipvsadm", "-A", "-f", "301", "-s", "rr"]);
    let before = c.iptables_save("mangle");
    let clash = services_file(&format!(
        r#"{{"services":[{{"name":"api","vip":"{}","fwmark":301}}]}}"#,
        lan.ip(101)
    ));
    let (ok, _, err) = vipd_run(&["apply", "--netns", &c.name, "--file", &clash]);
    assert!(!ok);
    assert!(
        err.contains("fwmark 301 (0x12d) is already used by an IPVS service vipd does not own"),
        "{err}"
    );
    assert_eq!(before, c.iptables_save("mangle"));

    let (ok, json, err) = vipd_run(&["show", "--json", "--netns", &c.name]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("show --json is JSON");
    assert_eq!(v["services"][0]["name"], "web");
    assert_eq!(v["services"][0]["fwmark"], 300);
    assert_eq!(v["services"][0]["destinations"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["foreign_services"], 1);
    apply(c, &services_file("{}"));
}
