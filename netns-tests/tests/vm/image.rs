//! vipd from its container image (the Dockerfile, built with scripts/docker/vipd-image.sh
//! before the VM suite; scripts/test.sh passes its path in VIPD_IMAGE_TAR), run against the
//! private dockerd with the privileges the Dockerfile's `docker run` line gives it: a
//! service's VIP balances real requests from a client container.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use vipd::netns::{run_in, NetnsPath};

use super::agent::{require_ipvs_vm, run_one, sandbox_of, sleeper, state_dir, vip_of, wait_for, Took};
use crate::common::docker::{dockerd, one_vipd_run_at_a_time, IMAGE};

/// The tag scripts/docker/vipd-image.sh gives the image by default.
const TAG: &str = "vipd:test";

/// The page a GET of `http://ADDR/` returns, asked from inside `sandbox`.
fn get(sandbox: &str, addr: &str) -> String {
    run_in(&NetnsPath::from_arg(sandbox), || {
        let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok::<_, std::io::Error>(
            answer
                .rsplit("\r\n\r\n")
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
        )
    })
    .expect("enter the client's namespace")
    .unwrap_or_else(|e| format!("error: {e}"))
}

/// Shows a container's state and log if the test fails.
struct ShowLogs<'a>(&'a crate::common::docker::Dockerd, String);

impl Drop for ShowLogs<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let state = self
                .0
                .docker_output(&["inspect", "-f", "{{json .State}}", &self.1]);
            let logs = self.0.docker_output(&["logs", &self.1]);
            eprintln!(
                "--- vipd's container: {} ---\n{}{}",
                String::from_utf8_lossy(&state.stdout),
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr)
            );
        }
    }
}

#[test]
fn vipd_from_its_image_gives_a_service_a_vip_that_balances() {
    let _turn = one_vipd_run_at_a_time();
    let _took = Took::new();
    require_ipvs_vm();
    let tar = std::env::var("VIPD_IMAGE_TAR")
        .expect("VIPD_IMAGE_TAR: the image scripts/docker/vipd-image.sh saves (scripts/test.sh passes it)");
    assert!(Path::new(&tar).is_file(), "no image tarball at {tar}");
    let d = dockerd();
    d.docker(&["load", "-i", &tar]);
    let net = d.network("vimg", &[]);
    let tasks: Vec<_> = ["i1", "i2"]
        .iter()
        .map(|name| {
            let args = [
                "--network",
                &net.name,
                "--label",
                "vipd.service=imgweb",
                "-e",
                &format!("NAME={name}"),
                IMAGE,
                "sh",
                "-c",
                "echo $NAME > /www/index.html && exec httpd -f -p 80 -h /www",
            ]
            .map(str::to_owned);
            run_one(d, &args)
        })
        .collect();
    let client = run_one(d, &sleeper(&net.name, &[]));
    let client_sb = sandbox_of(d, &client.id);

    // vipd in its container: host network (dockerd's namespace), the four capabilities,
    // the engine's socket, its namespaces directory and a state directory.
    let socket = d.host.strip_prefix("unix://").expect("a unix socket");
    let netns_dir = Path::new(&client_sb).parent().unwrap().display().to_string();
    let state = state_dir();
    let agent = d.run(&[
        "--network",
        "host",
        "--cap-drop",
        "ALL",
        "--cap-add",
        "NET_ADMIN",
        "--cap-add",
        "NET_RAW",
        "--cap-add",
        "SYS_ADMIN",
        "--cap-add",
        "NET_BIND_SERVICE",
        // /proc/sys writable: vipd sets IPVS sysctls in each sandbox.
        "--security-opt",
        "systempaths=unconfined",
        "-v",
        &format!("{socket}:/var/run/docker.sock"),
        // The documented line adds `:rslave`, so namespaces created later show up; the
        // VM's /tmp is a private mount, which Docker refuses for that. vipd starts after
        // the containers here, so the plain (recursive) bind has their namespaces.
        "-v",
        &format!("{netns_dir}:{netns_dir}"),
        "-v",
        &format!("{}:/var/lib/vipd", state.display()),
        TAG,
        "run",
        "--no-ingress",
        "--resync-interval",
        "5",
    ]);
    let _show = ShowLogs(d, agent.id.clone());
    let logs = || d.docker_output(&["logs", &agent.id]);
    let vip = wait_for("the VIP in the client", Duration::from_secs(180), || {
        vip_of(&client_sb, "imgweb").is_some()
    });
    eprintln!("VIP in the client {vip:?} after vipd's container started");
    let vip = vip_of(&client_sb, "imgweb").unwrap();
    let mut seen = BTreeMap::new();
    wait_for("both tasks behind the VIP", Duration::from_secs(120), || {
        *seen.entry(get(&client_sb, &format!("{vip}:80"))).or_insert(0) += 1;
        seen.contains_key("i1") && seen.contains_key("i2")
    });
    let mut counts = BTreeMap::new();
    for _ in 0..20 {
        *counts.entry(get(&client_sb, &format!("{vip}:80"))).or_insert(0) += 1;
    }
    let out = logs();
    assert_eq!(
        counts,
        BTreeMap::from([("i1".to_owned(), 10), ("i2".to_owned(), 10)]),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `vipd status` from inside the container, and the capabilities vipd runs with.
    let status = d.docker(&["exec", &agent.id, "vipd", "status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("imgweb ") && l.contains(" 2/2")),
        "{status}"
    );
    let caps = d.docker(&["exec", &agent.id, "grep", "^CapEff", "/proc/1/status"]);
    assert_eq!(caps.split_whitespace().nth(1), Some("0000000000203400"), "{caps}");
    eprintln!("{status}");
    d.docker(&["stop", "-t", "10", &agent.id]);
    drop(agent);
    drop(client);
    drop(tasks);
}
