//! The IPv6 underlay end to end: a lab whose fabric is IPv6 only (no IPv4 address on any node's
//! fabric link), a real master listening on its IPv6 address with `--ipv6-underlay`, real agents
//! that pick their IPv6 address by themselves and carry VXLAN in outer IPv6, real CNI containers
//! on the IPv4 `dcos` and `blue` networks. And the master's default: agents with IPv6 addresses
//! are refused (DC/OS JSON readers that assume IPv4 agent addresses keep an IPv4-only cluster).

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use overlay_common::counters::Counter;
use overlay_datapath::OverlayMaps;
use overlay_lab::{
    Container, Fabric,
    cluster::{Cluster, ClusterSpec},
};
use overlay_tests::{
    bin_path,
    fixtures::{assert_next_hop_cached, eventually},
    lab_pins,
};

fn spec(agents: usize, master_args: &[&str]) -> ClusterSpec {
    let bin_dir = bin_path("overlay-agent").parent().unwrap().to_owned();
    let mut spec = ClusterSpec::new(agents, &bin_dir);
    spec.fabric = Fabric::Ipv6;
    spec.master_args = master_args.iter().map(|a| a.to_string()).collect();
    spec
}

fn ip(c: &Container) -> Ipv4Addr {
    c.node.ip.unwrap()
}

fn maps(cluster: &Cluster, agent: &str) -> OverlayMaps {
    OverlayMaps::open_pinned(&lab_pins(&cluster.lab, agent)).unwrap()
}

/// Waits until the agent of `agent` has written `needle` to its log (or exited having written
/// it); the log on timeout.
fn wait_for_log(c: &Cluster, agent: &str, needle: &str) -> Result<String, String> {
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(c.log_path(agent)).unwrap_or_default();
        if log.contains(needle) {
            return Ok(log);
        }
        if start.elapsed() > Duration::from_secs(20) {
            return Err(log);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_ipv6_only_fabric_carries_the_overlays_isolated_and_intact() {
    let mut spec = spec(3, &["--ipv6-underlay"]);
    // XDP on the underlay too (generic: the lab's NICs are veths), so that its outer-IPv6
    // checks see the real traffic and must let it all through.
    spec.agent_args = vec!["--xdp".into(), "generic".into()];
    let mut c = Cluster::up(spec).unwrap();
    // The fabric is IPv6 only, and every agent registered with its IPv6 address (picked by
    // itself: the interface has no IPv4).
    for agent in ["a1", "a2", "a3"] {
        let node = c.node(agent).unwrap();
        let v4 = node
            .exec("ip", &["-4", "-o", "addr", "show", "dev", "eth0"])
            .unwrap();
        assert!(v4.trim().is_empty(), "{agent} has IPv4 on the fabric: {v4}");
        let info = c.agent_info(agent).unwrap();
        assert_eq!(info.ip, c.lab.fabric_address(agent).unwrap(), "{agent}");
        assert!(info.ip.is_ipv6());
    }
    // The master's state lists IPv6 agent addresses and routes carry them.
    let routes = maps(&c, "a1").routes().unwrap();
    assert!(!routes.is_empty());
    for r in routes.values() {
        let underlay = overlay_datapath::from_addr16(&r.underlay_ip);
        assert!(underlay.is_ipv6(), "route via {underlay}");
    }

    let d1 = c.add_container("a1", "dcos").unwrap();
    let d2 = c.add_container("a2", "dcos").unwrap();
    let d3 = c.add_container("a3", "dcos").unwrap();
    let d1b = c.add_container("a1", "dcos").unwrap();
    let b2 = c.add_container("a2", "blue").unwrap();
    let b3 = c.add_container("a3", "blue").unwrap();

    // Within a network, across agents and on one: ping.
    for (from, to) in [(&d1, &d2), (&d2, &d3), (&d3, &d1), (&d1, &d1b), (&b2, &b3)] {
        assert!(
            from.node.ping(ip(to)),
            "{} on {} cannot reach {} on {}",
            ip(from),
            from.agent,
            ip(to),
            to.agent
        );
    }
    // Between networks: nothing, same agent or not, both ways; counted.
    for (from, to) in [(&d2, &b2), (&d1, &b3), (&b3, &d3), (&b2, &d1)] {
        assert!(
            !from.node.ping(ip(to)),
            "isolation broken over the IPv6 underlay: {} reached {}",
            ip(from),
            ip(to)
        );
    }
    let cross: u64 = ["a1", "a2", "a3"]
        .iter()
        .map(|a| maps(&c, a).stat(1024, Counter::DropCrossNetwork).unwrap())
        .sum();
    assert!(cross > 0, "cross-network drops not counted");

    // 64 MB of TCP across agents arrives intact.
    let dir = tempfile::tempdir().unwrap();
    let (sent, got) = (dir.path().join("sent.sha"), dir.path().join("got.sha"));
    let mut server = d2.node.command("sh");
    server.args([
        "-c",
        &format!("nc -l -p 7002 | sha256sum > {}", got.display()),
    ]);
    let mut server = server.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    d1.node
        .exec(
            "bash",
            &[
                "-c",
                &format!(
                    "head -c 67108864 /dev/urandom | tee >(sha256sum > {}) | nc -N {} 7002",
                    sent.display(),
                    ip(&d2)
                ),
            ],
        )
        .unwrap();
    server.wait().unwrap();
    let elapsed = started.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let (sent, got) = (
        std::fs::read_to_string(sent).unwrap(),
        std::fs::read_to_string(got).unwrap(),
    );
    assert_eq!(sent, got, "64 MB over the IPv6 underlay: checksums differ");
    eprintln!("64 MB across agents over the IPv6 underlay in {elapsed:?}");
    let a1 = maps(&c, "a1");
    assert!(a1.stat(1024, Counter::Encapsulated).unwrap() > 100);
    assert!(maps(&c, "a2").stat(1024, Counter::Decapsulated).unwrap() > 100);
    assert_eq!(
        a1.stat(1024, Counter::DropUnderlayFamily).unwrap(),
        0,
        "no route of the other family"
    );
    for agent in ["a1", "a2", "a3"] {
        let log = std::fs::read_to_string(c.log_path(agent)).unwrap();
        assert!(
            log.contains("attached=Generic"),
            "{agent}: XDP not attached:\n{log}"
        );
        let m = maps(&c, agent);
        for vni in [0, 1024] {
            assert_eq!(
                m.stat(vni, Counter::XdpDropped).unwrap(),
                0,
                "{agent}: XDP dropped VXLAN over the IPv6 underlay"
            );
        }
    }
}

/// The next-hop cache over an IPv6 underlay: a1 mirrors neighbour discovery's entry of a2's VTEP
/// (made managed, as over IPv4), and packets encapsulated in outer IPv6 then take no kernel
/// lookup.
#[test]
fn next_hops_over_ipv6_mirror_neighbour_discovery_and_skip_the_kernel_s_lookup() {
    let mut c = Cluster::up(spec(2, &["--ipv6-underlay"])).unwrap();
    let a = c.add_container("a1", "dcos").unwrap();
    let b = c.add_container("a2", "dcos").unwrap();
    assert!(a.node.ping(ip(&b)));
    let a2_underlay = c.lab.fabric_address("a2").unwrap();
    assert!(a2_underlay.is_ipv6(), "IPv6 fabric expected: {a2_underlay}");
    let a1 = c.lab.node("a1").unwrap().clone();
    let a2 = c.lab.node("a2").unwrap().clone();
    let a2_mac = a2.mac("eth0").unwrap();
    let hop = eventually(Duration::from_secs(10), || {
        let hops = maps(&c, "a1").next_hops().unwrap();
        match hops.get(&a2_underlay) {
            Some(h) if h.dst_mac == a2_mac => Ok(*h),
            other => Err(format!(
                "a1's next hop of {a2_underlay}: {other:?} (all: {hops:?})"
            )),
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(hop.src_mac, a1.mac("eth0").unwrap(), "source MAC");
    assert_eq!(hop.ifindex, a1.ifindex("eth0").unwrap(), "device");
    assert_next_hop_cached(&c, "a1", a2_underlay, &a, ip(&b));
}

#[test]
fn the_master_refuses_ipv6_agents_unless_run_with_ipv6_underlay() {
    let mut spec = spec(1, &[]);
    spec.start_agents = false;
    let mut c = Cluster::up(spec).unwrap();
    c.spawn_agent("a1").unwrap();
    let log = wait_for_log(&c, "a1", "--ipv6-underlay").unwrap_or_else(|log| {
        panic!("the agent's refusal does not name --ipv6-underlay; its log:\n{log}")
    });
    assert!(log.contains("IPv4"), "{log}");
    // Nothing of it reached the master's state: DC/OS readers see no IPv6 agent.
    let (status, body) = c
        .master_request("GET", "/overlay-master/state", None)
        .unwrap();
    assert_eq!(status, 200);
    let state = String::from_utf8_lossy(&body);
    let agent_ip = c.lab.fabric_address("a1").unwrap();
    assert!(!state.contains(&agent_ip.to_string()), "{state}");
}

#[test]
fn an_agent_refuses_an_mtu_without_room_for_the_ipv6_headers() {
    let mut spec = spec(1, &["--ipv6-underlay"]);
    spec.start_agents = false;
    // 1450 + 70 > 1500 (over IPv4, 1450 + 50 would fit).
    spec.mtu = 1450;
    let mut c = Cluster::up(spec).unwrap();
    c.spawn_agent("a1").unwrap();
    let log = wait_for_log(&c, "a1", "leaves no room")
        .unwrap_or_else(|log| panic!("no MTU refusal in the agent's log:\n{log}"));
    assert!(
        log.contains("--mtu 1450") && log.contains("IPv6") && log.contains("--mtu 1430"),
        "{log}"
    );
    let a1 = c.lab.fabric_address("a1").unwrap();
    assert!(matches!(a1, IpAddr::V6(_)));
}
