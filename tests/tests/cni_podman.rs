//! A real container runtime: Debian's podman (CNI backend) runs containers on two lab agents
//! through the `ebpf-overlay` plugin; they reach each other across agents (on a dual-stack
//! network over IPv4 and IPv6), and removing them frees their addresses.
//!
//! podman runs inside each agent's network namespace (`nsenter --net`, so that the host side of
//! the veth lands there), with its own temporary storage, config and plugin directories. The
//! image is imported from a tar of busybox-static (nothing can be pulled).

use std::{net::Ipv6Addr, path::Path, process::Command};

use overlay_api::agent::Family;
use overlay_lab::cluster::{Cluster, ClusterSpec};
use overlay_tests::{
    bin_path,
    runtimes::{
        BUSYBOX, TempDir, busybox_tar,
        podman::{IMAGE, Podman},
    },
};

const CONFIG: &str = "\
vtep_subnet: 44.128.0.0/20
vtep_mac_oui: 70:B3:D5:00:00:00
overlays:
  - name: dcos
    subnet: 9.0.0.0/8
    prefix: 24
  - name: dual
    subnet: 10.1.0.0/16
    prefix: 24
    subnet6: fd01:c::/48
    prefix6: 64
";

/// The container's global IPv6 address on eth0.
fn ipv6_of(p: &Podman, name: &str) -> Ipv6Addr {
    let out = p
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
}

#[test]
fn podman_containers_on_two_agents_reach_each_other_and_free_their_addresses() {
    assert!(
        Path::new(BUSYBOX).exists() && Command::new("podman").arg("--version").output().is_ok(),
        "needs podman and busybox-static (cargo xtask setup)"
    );
    let bin_dir = bin_path("overlay-agent").parent().unwrap().to_owned();
    let mut spec = ClusterSpec::new(2, &bin_dir);
    spec.config = CONFIG.into();
    let c = Cluster::up(spec).unwrap();
    let tmp = TempDir(std::env::temp_dir().join(format!("{}-podman", c.lab.id())));
    std::fs::create_dir_all(&tmp.0).unwrap();
    let tar = busybox_tar(&tmp.0);
    let p1 = Podman::new(&c, "a1", &tmp.0);
    let p2 = Podman::new(&c, "a2", &tmp.0);
    p1.import(&tar);
    p2.import(&tar);
    let run = |p: &Podman, name: &str, network: &str| {
        p.run(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            network,
            "--cap-add",
            "NET_RAW",
            // podman asks for more open files than this machine allows
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
            // this machine mixes cgroup v1 and v2, which crun refuses to manage
            "--cgroups",
            "disabled",
            IMAGE,
            "/bin/sleep",
            "600",
        ])
        .unwrap()
    };
    run(&p1, "one", "dcos");
    run(&p2, "two", "dcos");
    let (ip1, ip2) = (p1.container_ip("one"), p2.container_ip("two"));
    let used = |agent: &str| -> u32 {
        c.agent(agent)
            .ipam()
            .unwrap()
            .iter()
            .filter(|u| u.network == "dcos")
            .map(|u| u.used)
            .sum()
    };
    assert_eq!((used("a1"), used("a2")), (1, 1));
    // The agents' endpoints are the podman containers.
    assert!(
        c.agent("a1")
            .endpoints()
            .unwrap()
            .iter()
            .any(|e| e.ip == ip1)
    );
    assert!(
        c.agent("a2")
            .endpoints()
            .unwrap()
            .iter()
            .any(|e| e.ip == ip2)
    );
    for (p, from, to) in [(&p1, "one", ip2), (&p2, "two", ip1)] {
        let out = p.run(&["exec", from, "ping", "-c", "2", "-W", "2", &to.to_string()]);
        assert!(out.is_ok(), "{from} cannot reach {to}: {out:?}");
    }
    // A dual-stack network: each container gets an address per family through the plugin
    // and reaches the other agent's over both.
    run(&p1, "three", "dual");
    run(&p2, "four", "dual");
    let used_dual = |agent: &str, family: Family| -> u32 {
        c.agent(agent)
            .ipam()
            .unwrap()
            .iter()
            .filter(|u| u.network == "dual" && u.family == family)
            .map(|u| u.used)
            .sum()
    };
    for agent in ["a1", "a2"] {
        assert_eq!(used_dual(agent, Family::Ipv4), 1, "{agent}");
        assert_eq!(used_dual(agent, Family::Ipv6), 1, "{agent}");
    }
    let (ip3, ip4) = (p1.container_ip("three"), p2.container_ip("four"));
    let (v6_3, v6_4) = (ipv6_of(&p1, "three"), ipv6_of(&p2, "four"));
    for (agent, v6) in [("a1", v6_3), ("a2", v6_4)] {
        let eps = c.agent(agent).endpoints().unwrap();
        assert!(
            eps.iter().any(|e| e.ipv6() == Some(v6)),
            "{v6} not in {eps:?}"
        );
    }
    for (p, from, to, to6) in [(&p1, "three", ip4, v6_4), (&p2, "four", ip3, v6_3)] {
        let out = p.run(&["exec", from, "ping", "-c", "2", "-W", "2", &to.to_string()]);
        assert!(out.is_ok(), "{from} cannot reach {to}: {out:?}");
        let out = p.run(&[
            "exec",
            from,
            "ping",
            "-6",
            "-c",
            "2",
            "-W",
            "2",
            &to6.to_string(),
        ]);
        assert!(out.is_ok(), "{from} cannot reach {to6} over IPv6: {out:?}");
    }
    // Removing the containers frees their addresses and endpoints.
    for (p, name) in [(&p1, "one"), (&p2, "two"), (&p1, "three"), (&p2, "four")] {
        p.run(&["rm", "--force", "--time", "0", name]).unwrap();
    }
    assert_eq!((used("a1"), used("a2")), (0, 0));
    for agent in ["a1", "a2"] {
        assert_eq!(
            used_dual(agent, Family::Ipv4) + used_dual(agent, Family::Ipv6),
            0
        );
    }
    assert!(c.agent("a1").endpoints().unwrap().is_empty());
    assert!(c.agent("a2").endpoints().unwrap().is_empty());
}
