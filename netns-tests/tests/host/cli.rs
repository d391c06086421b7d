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
