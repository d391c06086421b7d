//! Helpers shared by the host and VM suites: namespaces that clean up after themselves,
//! commands that fail loudly, and the vipd binary cargo built.
#![allow(dead_code)]

pub mod cluster;
pub mod docker;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Fail (never skip) when not root: these tests need to create namespaces.
pub fn require_root() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_default();
    assert_eq!(
        uid, "0",
        "the kernel test suites must run as root (they create network namespaces)"
    );
}

/// Run a command; panic with its output if it fails.
pub fn run(args: &[&str]) -> String {
    let out = output(args);
    assert!(
        out.status.success(),
        "`{}` failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command and return what it did, whatever that was.
pub fn output(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", args[0]))
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A named network namespace (`ip netns add`), deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The bind-mount path, as vipd's `--netns` takes it.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Run a command inside; panic if it fails.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Run a command inside and return what it did.
    pub fn exec_output(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        output(&full)
    }

    /// `iptables-save` of one table, without the comment lines that carry dates.
    pub fn iptables_save(&self, table: &str) -> String {
        self.exec(&["iptables-save", "-t", table])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = output(&["ip", "netns", "del", &self.name]);
    }
}

/// A veth pair between two namespaces: `a_if` in `a` with `a_addr` (CIDR), `b_if` in `b`.
pub fn veth(a: &Netns, a_if: &str, a_addr: Option<&str>, b: &Netns, b_if: &str) {
    let tmp_a = unique("va");
    let tmp_b = unique("vb");
    run(&[
        "ip", "link", "add", &tmp_a, "type", "veth", "peer", "name", &tmp_b,
    ]);
    run(&["ip", "link", "set", &tmp_a, "netns", &a.name]);
    run(&["ip", "link", "set", &tmp_b, "netns", &b.name]);
    a.exec(&["ip", "link", "set", &tmp_a, "name", a_if]);
    b.exec(&["ip", "link", "set", &tmp_b, "name", b_if]);
    if let Some(addr) = a_addr {
        a.exec(&["ip", "addr", "add", addr, "dev", a_if]);
    }
    a.exec(&["ip", "link", "set", a_if, "up"]);
    b.exec(&["ip", "link", "set", b_if, "up"]);
}

/// The vipd binary cargo built for this test run, or `VIPD_TEST_BIN` when set (a copy,
/// so a long VM run is not disturbed by a rebuild of the tree meanwhile).
pub fn vipd() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("VIPD_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_vipd").to_owned())
    })
}

/// `vipd ARGS`, returning (success, stdout, stderr).
pub fn vipd_run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(vipd())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run the vipd binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Write a services file into a fresh temporary directory and return its path.
pub fn services_file(json: &str) -> String {
    let dir = std::env::temp_dir().join(unique("vipd-test-"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("services.json");
    std::fs::write(&path, json).expect("write services file");
    path.display().to_string()
}

/// `vipd apply`, which must succeed; returns its stdout.
pub fn apply(ns: &Netns, file: &str) -> String {
    let (ok, stdout, stderr) = vipd_run(&["apply", "--netns", &ns.path(), "--file", file]);
    assert!(ok, "vipd apply failed:\nstdout: {stdout}\nstderr: {stderr}");
    stdout
}

/// The N in the last line `applied N operations`.
pub fn applied_count(stdout: &str) -> usize {
    let last = stdout.lines().last().unwrap_or_default();
    last.strip_prefix("applied ")
        .and_then(|r| r.strip_suffix(" operations"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `applied N operations` line in:\n{stdout}"))
}

/// True when this kernel has IPVS.
pub fn kernel_has_ipvs() -> bool {
    Path::new("/proc/net/ip_vs").exists()
}
