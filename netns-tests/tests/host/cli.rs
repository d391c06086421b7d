//! The `vipd` binary on the host: input is refused before anything changes, and a kernel
//! without IPVS gets a clear message.

use crate::common::*;

const GOOD: &str =
    r#"{"services":[{"name":"web","vip":"10.0.0.100","fwmark":256,"backends":[{"ip":"10.0.0.3"}]}]}"#;

fn refused(ns: &Netns, json: &str, needle: &str) {
    let before = ns.iptables_save("mangle") + &ns.iptables_save("nat");
    let file = services_file(json);
    let (ok, stdout, stderr) = vipd_run(&["apply", "--netns", &ns.path(), "--file", &file]);
    assert!(!ok, "vipd accepted {json}: {stdout}");
    assert!(
        stderr.contains(needle),
        "expected {needle:?} in the error, got:\n{stderr}"
    );
    assert_eq!(stdout, "", "nothing may be printed as applied");
    assert_eq!(
        before,
        ns.iptables_save("mangle") + &ns.iptables_save("nat"),
        "the namespace changed"
    );
}

#[test]
fn bad_input_is_refused_with_the_field_named_and_nothing_changed() {
    require_root();
    let ns = Netns::new("vcli");
    refused(
        &ns,
        r#"{"services":[{"name":"web","vip":"10.0.0.100","fwmark":256,"scheduler":"fastest"}]}"#,
        "services[0].scheduler: unknown scheduler \"fastest\"",
    );
    refused(
        &ns,
        r#"{"services":[{"name":"a","vip":"10.0.0.100","fwmark":256},{"name":"b","vip":"10.0.0.101","fwmark":256}]}"#,
        "services[1].fwmark: duplicate fwmark 256",
    );
    refused(
        &ns,
        r#"{"services":[{"name":"a","vip":"10.0.0.100","fwmark":256},{"name":"b","vip":"10.0.0.100","fwmark":257}]}"#,
        "services[1].vip: duplicate VIP 10.0.0.100",
    );
    refused(
        &ns,
        r#"{"services":[{"name":"a","vip":"10.0.0.300","fwmark":256}]}"#,
        "services[0].vip: invalid address \"10.0.0.300\"",
    );
    refused(
        &ns,
        r#"{"services":[{"name":"a","vip":"10.0.0.1","fwmark":256,"backends":[{"ip":"nope"}]}]}"#,
        "services[0].backends[0].ip: invalid address \"nope\"",
    );
    refused(
        &ns,
        r#"{"services":[{"name":"a","vip":"10.0.0.1"}]}"#,
        "missing field `fwmark`",
    );
    refused(&ns, "not json", "invalid services file");
}

#[test]
fn a_missing_namespace_or_file_is_named() {
    require_root();
    let file = services_file(GOOD);
    let (ok, _, stderr) = vipd_run(&["apply", "--netns", "no-such-ns-vipd", "--file", &file]);
    assert!(!ok);
    assert!(
        stderr.contains("--netns: network namespace /run/netns/no-such-ns-vipd cannot be opened"),
        "{stderr}"
    );
    let ns = Netns::new("vcli");
    let (ok, _, stderr) = vipd_run(&[
        "apply",
        "--netns",
        &ns.name,
        "--file",
        "/nonexistent/services.json",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("--file /nonexistent/services.json: cannot read"),
        "{stderr}"
    );
    let (ok, _, stderr) = vipd_run(&[
        "apply",
        "--netns",
        &ns.name,
        "--file",
        &file,
        "--sysctl",
        "conntrack=yes",
    ]);
    assert!(!ok);
    assert!(stderr.contains("--sysctl \"conntrack=yes\""), "{stderr}");
}

#[test]
fn without_ipvs_in_the_kernel_apply_says_so_and_changes_nothing() {
    require_root();
    assert!(
        !kernel_has_ipvs(),
        "this suite is for a host kernel without IPVS; the VM suite covers kernels with it"
    );
    let ns = Netns::new("vcli");
    let before = ns.iptables_save("mangle");
    let file = services_file(GOOD);
    let (ok, _, stderr) = vipd_run(&["apply", "--netns", &ns.name, "--file", &file]);
    assert!(!ok);
    assert!(stderr.contains("this kernel has no IPVS"), "{stderr}");
    assert_eq!(before, ns.iptables_save("mangle"));
    let (ok, _, stderr) = vipd_run(&["show", "--netns", &ns.name]);
    assert!(!ok);
    assert!(stderr.contains("this kernel has no IPVS"), "{stderr}");
}

/// scripts/vipd.service is a unit systemd accepts without a warning (checked with
/// `systemd-analyze verify`, on a copy that starts the vipd just built), and the config
/// file it points at, scripts/vipd.toml, is one `vipd run` accepts.
#[test]
fn the_systemd_unit_verifies_and_the_example_config_is_accepted() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/vipd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/vipd run\n"), "{unit}");
    let dir = std::env::temp_dir().join(unique("vipd-unit-"));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("vipd.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/vipd", vipd())).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");

    // The example config, uncommented, is accepted (--dns-listen, which conflicts with
    // the other DNS settings, left out) and its settings reach `vipd run`: an ingress
    // subnet set in the file is checked as the flag is, before anything starts.
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/vipd.toml")).unwrap();
    let mut config: String = example
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| l.contains(" = ") && !l.starts_with("dns-listen") && !l.starts_with("ingress-subnet"))
        .map(|l| format!("{l}\n"))
        .collect();
    config.push_str("ingress-subnet = \"10.254.255.1/30\"\n");
    let file = dir.join("vipd.toml");
    std::fs::write(&file, config).unwrap();
    let (ok, _, stderr) = vipd_run(&["run", "--config", file.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("--ingress-subnet \"10.254.255.1/30\": expected a network address"),
        "{stderr}"
    );
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "vip_pool = \"10.9.0.0/16\"\n").unwrap();
    let (ok, _, stderr) = vipd_run(&["run", "--config", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("unknown setting \"vip_pool\""), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vipd ARGS` with `env` added: (exit code, stderr).
fn vipd_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = std::process::Command::new(vipd())
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("cannot run the vipd binary");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The exit codes README's "Exit codes" table lists, for the cases this host can
/// produce: 2 for input vipd cannot use, 3 for an engine endpoint it cannot use, 4 for
/// a kernel without IPVS.
#[test]
fn exit_codes_tell_bad_input_an_unusable_engine_and_a_kernel_without_ipvs_apart() {
    require_root();
    let ns = Netns::new("vcli");
    let dir = std::env::temp_dir().join(unique("vipd-exit-"));
    std::fs::create_dir_all(&dir).unwrap();

    // 2: a bad flag (clap), a bad value, a bad services file, a missing one, a bad
    // config file.
    let good = services_file(GOOD);
    let bad_spec = services_file(r#"{"services":[{"name":"a","vip":"10.0.0.1"}]}"#);
    let bad_config = dir.join("bad.toml");
    std::fs::write(&bad_config, "vip_pool = \"10.9.0.0/16\"\n").unwrap();
    for args in [
        vec!["apply", "--no-such-flag"],
        vec!["apply", "--netns", &ns.name, "--file", &good, "--sysctl", "x"],
        vec!["apply", "--netns", &ns.name, "--file", &bad_spec],
        vec!["apply", "--netns", &ns.name, "--file", "/nonexistent-vipd/s.json"],
        vec!["apply", "--netns", "no-such-ns-vipd", "--file", &good],
        vec!["run", "--config", bad_config.to_str().unwrap()],
        vec!["run", "--vip-pool", "10.0.0.0/99"],
        vec!["run", "--ingress-subnet", "10.254.255.1/30"],
    ] {
        let (code, stderr) = vipd_exit(&args, &[]);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
    }

    // 3: a DOCKER_HOST vipd cannot use is fatal at start (an engine that does not answer
    // yet is waited for instead).
    let state = dir.join("state");
    let socket = dir.join("vipd.sock");
    let (code, stderr) = vipd_exit(
        &[
            "run",
            "--no-dns",
            "--no-ingress",
            "--no-metrics",
            "--state-dir",
            state.to_str().unwrap(),
            "--admin-socket",
            socket.to_str().unwrap(),
        ],
        &[("DOCKER_HOST", "ssh://nowhere.invalid")],
    );
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains("unsupported Docker endpoint \"ssh://nowhere.invalid\""),
        "{stderr}"
    );

    // 4: this kernel has no IPVS, for `apply` and `show` alike.
    assert!(!kernel_has_ipvs(), "this suite is for a host kernel without IPVS");
    for args in [
        vec!["apply", "--netns", &ns.name, "--file", &good],
        vec!["show", "--netns", &ns.name],
    ] {
        let (code, stderr) = vipd_exit(&args, &[]);
        assert_eq!(code, Some(4), "{args:?}: {stderr}");
        assert!(stderr.contains("this kernel has no IPVS"), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
