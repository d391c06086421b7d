//! `vipd service create|update|rm|ls` with the real binary, on the state directory's file.

use std::process::{Command, Stdio};

use crate::common::*;

/// `vipd service ARGS --state-dir DIR`: (exit code, stdout, stderr).
fn service(dir: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(vipd())
        .arg("service")
        .args(args)
        .args(["--state-dir", dir])
        .stdin(Stdio::null())
        .output()
        .expect("cannot run the vipd binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(dir: &str, args: &[&str]) -> String {
    let (code, stdout, stderr) = service(dir, args);
    assert_eq!(code, 0, "vipd service {args:?}: {stderr}");
    stdout
}

/// Refused with exit code 2 and `needle` in the message, the stored file unchanged.
fn refused(dir: &str, args: &[&str], needle: &str) {
    let file = std::path::Path::new(dir).join("services.json");
    let before = std::fs::read(&file).ok();
    let (code, stdout, stderr) = service(dir, args);
    assert_eq!(code, 2, "vipd service {args:?}: {stdout}{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in:\n{stderr}");
    assert_eq!(std::fs::read(&file).ok(), before, "the definitions changed");
}

#[test]
fn a_service_is_created_listed_updated_and_removed_and_bad_input_exits_2() {
    let dir = std::env::temp_dir().join(unique("vipd-svcdef-"));
    let d = dir.to_str().unwrap();
    assert_eq!(ok(d, &["ls"]), "no services defined\n");
    assert_eq!(
        ok(d, &["create", "web", "--publish", "8080:80"]),
        "created service web\n"
    );
    let ls = ok(d, &["ls"]);
    let row: Vec<&str> = ls.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row, ["web", "vip", "rr", "8080:80/tcp", "-"], "{ls}");

    assert_eq!(
        ok(d, &["update", "web", "--scheduler", "wrr"]),
        "updated service web\n"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(d, &["ls", "--json"])).unwrap();
    assert_eq!(
        json,
        serde_json::json!([{"name": "web", "endpoint_mode": "vip", "scheduler": "wrr",
            "publish": ["8080:80/tcp"], "ports": []}]),
        "only the scheduler changed"
    );

    refused(d, &["create", "web"], "service web is already defined");
    refused(
        d,
        &["update", "api", "--scheduler", "rr"],
        "service api is not defined",
    );
    refused(d, &["rm", "api"], "service api is not defined");
    let bad_values: [(&[&str], &str); 5] = [
        (
            &["update", "web", "--scheduler", "fast"],
            "--scheduler \"fast\": unknown scheduler",
        ),
        (
            &["create", "api", "--publish", "8080"],
            "--publish \"8080\": \"8080\": expected PUBLISHED:TARGET",
        ),
        (
            &["create", "api", "--port", "http=80/quic"],
            "the protocol must be tcp, udp or sctp",
        ),
        (
            &["create", "api", "--endpoint-mode", "anycast"],
            "expected vip or dnsrr",
        ),
        (&["create", "bad name"], "invalid service name"),
    ];
    for (args, needle) in bad_values {
        refused(d, args, needle);
    }

    assert_eq!(ok(d, &["rm", "web"]), "removed service web\n");
    assert_eq!(ok(d, &["ls"]), "no services defined\n");
    std::fs::remove_dir_all(&dir).unwrap();
}
