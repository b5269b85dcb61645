//! Docker Engine on the overlay, with a real dockerd (Debian's docker.io 20.10) per lab agent.
//!
//! Each dockerd runs inside its agent's network namespace and a private mount namespace with
//! its own `/run` and `/etc/docker` (the global `/run/docker/plugins` and `/etc/docker/key.json`
//! stay untouched, and its containerd's `/opt/containerd`): `/run/docker/plugins` there is the directory of the agent's
//! `--docker-plugin-socket`. Private `--data-root`, `--exec-root`, socket; no bridge, no
//! iptables; the image is imported from a tar of busybox-static (no registry). The agents create
//! the Docker networks themselves (`--docker-host`).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant},
};

use overlay_lab::cluster::{Cluster, ClusterSpec};
use overlay_tests::{
    bin_path,
    runtimes::{
        BUSYBOX, TempDir, agent_veths, busybox_tar, cross_drops,
        docker::{DOCKER, Dockerd, IMAGE, agent_args, docker_dir, docker_half, docker_half_used},
    },
};
use serde_json::Value;

/// The lab's two networks and a dual-stack one.
const CONFIG: &str = "\
vtep_subnet: 44.128.0.0/20
vtep_mac_oui: 70:B3:D5:00:00:00
overlays:
  - name: dcos
    subnet: 9.0.0.0/8
    prefix: 24
  - name: blue
    subnet: 10.1.0.0/16
    prefix: 24
  - name: dual
    subnet: 10.2.0.0/16
    prefix: 24
    subnet6: fd01:c::/48
    prefix6: 64
";

#[test]
fn docker_and_cni_containers_share_the_overlay_across_agents() {
    assert!(
        Path::new(BUSYBOX).exists() && Path::new(DOCKER).exists(),
        "needs docker.io and busybox-static (cargo xtask setup)"
    );
    let bin_dir = bin_path("overlay-agent").parent().unwrap().to_owned();
    let root = TempDir(std::env::temp_dir().join(format!(
        "eo-docker-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )));
    std::fs::create_dir_all(&root.0).unwrap();
    let mut spec = ClusterSpec::new(2, &bin_dir);
    spec.agent_args = agent_args(&root.0);
    spec.config = CONFIG.into();
    let host_run_docker = Path::new("/run/docker").exists();
    let mut c = Cluster::up(spec).unwrap();
    let tar = busybox_tar(&root.0);
    let (d1, d2) = (
        Dockerd::spawn(&c, "a1", &root.0),
        Dockerd::spawn(&c, "a2", &root.0),
    );
    d1.wait_ready();
    d2.wait_ready();
    for d in [&d1, &d2] {
        d.run(&["import", tar.to_str().unwrap(), IMAGE]).unwrap();
        d.wait_network("dcos");
        d.wait_network("blue");
        d.wait_network("dual");
    }
    // The driver's socket refuses what it should, and changes nothing doing so.
    let plugin = |call: &str, body: &[u8]| -> (u16, Value) {
        let sock = docker_dir(&root.0, "a1").join("plugins/ebpf-overlay.sock");
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let (status, out) =
            overlay_api::agent::http_exchange(&mut s, "POST", &format!("/{call}"), Some(body))
                .unwrap();
        (status, serde_json::from_slice(&out).unwrap_or(Value::Null))
    };
    let (status, v) = plugin("Plugin.Activate", b"");
    assert_eq!(status, 200);
    assert_eq!(
        v["Implements"],
        serde_json::json!(["NetworkDriver", "IpamDriver"])
    );
    assert_eq!(plugin("Unknown.Call", b"{}").0, 404);
    let cni_half_ip = {
        let half = docker_half(&c, "a1", "dcos");
        Ipv4Addr::from(u32::from(half.network()) - 10)
    };
    for (call, body, want) in [
        (
            "NetworkDriver.CreateEndpoint",
            "{not json".to_owned(),
            "not JSON",
        ),
        (
            "IpamDriver.RequestPool",
            r#"{"V6":true,"Options":{"network":"dcos"}}"#.to_owned(),
            "IPv6",
        ),
        (
            "IpamDriver.RequestPool",
            r#"{"Options":{"network":"green"}}"#.to_owned(),
            "green",
        ),
        (
            "IpamDriver.RequestAddress",
            format!(r#"{{"PoolID":"dcos","Address":"{cni_half_ip}"}}"#),
            "outside",
        ),
        (
            "NetworkDriver.Join",
            r#"{"EndpointID":"nope"}"#.to_owned(),
            "unknown endpoint",
        ),
        (
            "NetworkDriver.CreateEndpoint",
            r#"{"NetworkID":"x","EndpointID":"e"}"#.to_owned(),
            "not an ebpf-overlay network",
        ),
    ] {
        let (status, v) = plugin(call, body.as_bytes());
        let err = v["Err"].as_str().unwrap_or_default();
        assert!(
            status != 200 && err.contains(want),
            "{call} {body}: {status} {v}"
        );
    }
    assert_eq!(
        docker_half_used(&c, "a1", "dcos"),
        0,
        "a refused call allocated"
    );
    assert_eq!(agent_veths(&c, "a1"), 0, "a refused call left a veth");
    let cni1 = c.add_container("a1", "dcos").unwrap();
    let cni2 = c.add_container("a2", "dcos").unwrap();
    let blue = c.add_container("a1", "blue").unwrap();
    let (cni1_ip, cni2_ip, blue_ip) = (
        cni1.node.ip.unwrap(),
        cni2.node.ip.unwrap(),
        blue.node.ip.unwrap(),
    );
    let run = |d: &Dockerd, name: &str, extra: &[&str]| {
        let mut args = vec!["run", "-d", "--name", name, "--network", "dcos"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, "/bin/sleep", "600"]);
        d.run(&args).unwrap()
    };
    run(&d1, "one", &[]);
    let half2 = docker_half(&c, "a2", "dcos");
    let wanted = Ipv4Addr::from(u32::from(half2.network()) + 20);
    run(&d2, "two", &["--ip", &wanted.to_string()]);
    let (ip1, ip2) = (d1.container_ip("one"), d2.container_ip("two"));
    assert!(
        docker_half(&c, "a1", "dcos").contains(ip1),
        "{ip1}: not the docker half"
    );
    assert_eq!(ip2, wanted, "--ip");
    assert_eq!(
        (
            docker_half_used(&c, "a1", "dcos"),
            docker_half_used(&c, "a2", "dcos")
        ),
        (1, 1)
    );
    // Wired like a CNI container: an endpoint of the agent.
    assert!(
        c.agent("a1")
            .endpoints()
            .unwrap()
            .iter()
            .any(|e| e.ip == ip1)
    );
    // Docker <-> CNI on one agent and across agents, Docker <-> Docker across agents.
    assert!(d1.pings("one", cni1_ip), "docker -> cni, same agent");
    assert!(cni1.node.ping(ip1), "cni -> docker, same agent");
    assert!(d1.pings("one", cni2_ip), "docker -> cni, across agents");
    assert!(cni2.node.ping(ip1), "cni -> docker, across agents");
    assert!(
        d1.pings("one", ip2) && d2.pings("two", ip1),
        "docker <-> docker across agents"
    );
    // Isolation: the blue container is not reachable, nor does it reach in; the drops are
    // counted against the sender's network.
    let (dcos_drops, blue_drops) = (cross_drops(&c, "a1", "dcos"), cross_drops(&c, "a1", "blue"));
    assert!(!d1.pings("one", blue_ip), "dcos reached blue");
    assert!(!blue.node.ping(ip1), "blue reached dcos");
    assert!(
        cross_drops(&c, "a1", "dcos") > dcos_drops,
        "docker -> blue not counted"
    );
    assert!(
        cross_drops(&c, "a1", "blue") > blue_drops,
        "blue -> docker not counted"
    );
    // --mac-address (base64 in the endpoint options) is the endpoint's MAC.
    run(&d1, "mac", &["--mac-address", "02:42:0a:bb:cc:dd"]);
    let mac_ip = d1.container_ip("mac");
    let ep = c
        .agent("a1")
        .endpoints()
        .unwrap()
        .into_iter()
        .find(|e| e.ip == mac_ip)
        .unwrap();
    assert_eq!(ep.container_mac.to_string(), "02:42:0a:bb:cc:dd");
    assert!(
        d1.pings("mac", cni2_ip),
        "--mac-address container unreachable"
    );
    d1.run(&["rm", "-f", "mac"]).unwrap();
    // An address in use is refused, and nothing is left of the attempt.
    let dup = d2.run(&[
        "run",
        "-d",
        "--name",
        "dup",
        "--network",
        "dcos",
        "--ip",
        &wanted.to_string(),
        IMAGE,
        "/bin/sleep",
        "600",
    ]);
    assert!(dup.is_err(), "a second container got {wanted}");
    let _ = d2.run(&["rm", "-f", "dup"]);
    assert_eq!(
        docker_half_used(&c, "a2", "dcos"),
        1,
        "the refused --ip left something"
    );
    // A dual-stack network: the agent made its Docker network --ipv6 with the IPv6 docker half;
    // its containers get an IPv6 address from it (and the IPv6 gateway from Join) and reach
    // each other across agents over IPv6.
    let inspect: Value =
        serde_json::from_str(&d1.run(&["network", "inspect", "dual"]).unwrap()).unwrap();
    assert_eq!(inspect[0]["EnableIPv6"], true, "{inspect}");
    let dual_run = |d: &Dockerd, name: &str| {
        d.run(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "dual",
            IMAGE,
            "/bin/sleep",
            "600",
        ])
        .unwrap()
    };
    dual_run(&d1, "six1");
    dual_run(&d2, "six2");
    let ipv6_of = |d: &Dockerd, name: &str| -> Ipv6Addr {
        let out = d
            .run(&[
                "exec", name, "ip", "-6", "-o", "addr", "show", "dev", "eth0",
            ])
            .unwrap();
        let words: Vec<&str> = out.split_whitespace().collect();
        words
            .windows(2)
            .filter(|w| w[0] == "inet6")
            .filter_map(|w| w[1].split('/').next()?.parse::<Ipv6Addr>().ok())
            .find(|a| !a.is_unicast_link_local())
            .unwrap_or_else(|| panic!("no global IPv6 address in {out:?}"))
    };
    let (six1, six2) = (ipv6_of(&d1, "six1"), ipv6_of(&d2, "six2"));
    for (agent, v6) in [("a1", six1), ("a2", six2)] {
        let me = c.agent_info(agent).unwrap();
        let dual = me.overlays.iter().find(|o| o.info.name == "dual").unwrap();
        let (_, docker6) = overlay_api::subnets::halves6(dual.subnet6.unwrap());
        assert!(
            docker6.contains(v6),
            "{v6} outside the IPv6 docker half {docker6}"
        );
        let eps = c.agent(agent).endpoints().unwrap();
        assert!(
            eps.iter().any(|e| e.ipv6() == Some(v6)),
            "{v6} not in {eps:?}"
        );
    }
    let route6 = d1.run(&["exec", "six1", "ip", "-6", "route"]).unwrap();
    assert!(route6.contains("default via"), "{route6}");
    let ping6 = |d: &Dockerd, from: &str, to: Ipv6Addr| {
        // The kernel's link-local address of a Docker container is tentative for a moment.
        let start = Instant::now();
        loop {
            if d.run(&[
                "exec",
                from,
                "ping",
                "-6",
                "-c",
                "1",
                "-W",
                "2",
                &to.to_string(),
            ])
            .is_ok()
            {
                return true;
            }
            if start.elapsed() > Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    assert!(
        ping6(&d1, "six1", six2),
        "docker -> docker over IPv6 across agents"
    );
    assert!(ping6(&d2, "six2", six1), "and back");
    d1.run(&["rm", "-f", "six1"]).unwrap();
    d2.run(&["rm", "-f", "six2"]).unwrap();
    for a in ["a1", "a2"] {
        assert_eq!(
            docker_half_used(&c, a, "dual"),
            0,
            "{a}: dual-stack addresses leaked"
        );
    }
    // disconnect/connect: the container comes back (as eth1) with a working interface.
    d1.run(&["network", "disconnect", "dcos", "one"]).unwrap();
    assert_eq!(
        docker_half_used(&c, "a1", "dcos"),
        0,
        "disconnect kept the address"
    );
    d1.run(&["network", "connect", "dcos", "one"]).unwrap();
    let out = d1.run(&["exec", "one", "ip", "-4", "-o", "addr"]).unwrap();
    let reconnected: Ipv4Addr = out
        .lines()
        .find(|l| !l.contains(" lo "))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address after connect: {out}"));
    assert!(d1.pings("one", cni2_ip), "after disconnect/connect");
    assert!(docker_half(&c, "a1", "dcos").contains(reconnected));
    // --restart=always across a dockerd restart: it comes back wired, nothing duplicated.
    run(&d1, "always", &["--restart=always"]);
    let d1 = d1.restart(&c, "a1", &root.0);
    let start = Instant::now();
    while !d1.pings("always", cni2_ip) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the restart=always container is not back on the overlay"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        docker_half_used(&c, "a1", "dcos"),
        1,
        "after the dockerd restart: only the running container holds an address"
    );
    d1.run(&["rm", "-f", "always"]).unwrap();
    d1.run(&["start", "one"]).unwrap();
    // Not restart=always: dockerd stopped it; started again, it is wired anew.
    let ip1 = d1.container_ip("one");
    // An agent restart changes nothing for running containers, and what it persisted lets
    // Docker remove them afterwards.
    c.stop_agent("a1");
    c.start_agent("a1").unwrap();
    assert!(
        d1.pings("one", cni2_ip) && d2.pings("two", ip1),
        "after the agent restart"
    );
    // Removal frees the address, the endpoint and the veth.
    d1.run(&["rm", "-f", "one"]).unwrap();
    d2.run(&["rm", "-f", "two"]).unwrap();
    for a in ["a1", "a2"] {
        assert_eq!(docker_half_used(&c, a, "dcos"), 0, "{a}: address leaked");
        assert!(
            c.agent(a)
                .endpoints()
                .unwrap()
                .iter()
                .all(|e| e.ip != ip1 && e.ip != ip2),
            "{a}: endpoint leaked"
        );
        assert_eq!(agent_veths(&c, a), 0, "{a}: veth leaked");
    }
    // The address is free again: --ip takes it once more.
    run(&d2, "again", &["--ip", &wanted.to_string()]);
    assert_eq!(d2.container_ip("again"), wanted);
    d2.run(&["rm", "-f", "again"]).unwrap();
    assert_eq!(docker_half_used(&c, "a2", "dcos"), 0);
    // A network removed from the master (forced: it still holds containers): its Docker networks
    // and CNI files go with it.
    let (status, body) = c
        .master_request("DELETE", "/overlay-master/networks/blue?force=true", None)
        .unwrap();
    assert!(
        status < 300,
        "removing blue: {status} {}",
        String::from_utf8_lossy(&body)
    );
    let start = Instant::now();
    loop {
        let docker_gone = [&d1, &d2]
            .iter()
            .all(|d| d.run(&["network", "inspect", "blue"]).is_err());
        let files: Vec<String> = ["a1", "a2"]
            .iter()
            .flat_map(|a| [c.cni_conf_dir(a), c.mesos_cni_conf_dir(a)])
            .flat_map(|d| std::fs::read_dir(d).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let files_gone = !files.iter().any(|f| f.contains("blue"));
        if docker_gone && files_gone {
            assert!(
                files.iter().any(|f| f == "10-dcos.conflist")
                    && files.iter().any(|f| f == "dcos.conf")
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "blue is still there: docker {docker_gone}, files {files:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    d1.wait_network("dcos");
    let host_opt = Path::new("/opt/containerd").exists();
    drop(d1);
    drop(d2);
    assert_eq!(
        Path::new("/opt/containerd").exists(),
        host_opt,
        "dockerd wrote to /opt"
    );
    assert!(
        !Path::new("/run/docker").exists() || host_run_docker,
        "/run/docker was touched"
    );
    // The agent removes its plugin socket on exit.
    c.stop_agent("a1");
    assert!(
        !docker_dir(&root.0, "a1")
            .join("plugins/ebpf-overlay.sock")
            .exists()
    );
}
