//! IPv6 overlays end to end, the agent's and the CNI plugin's side: a real master with an
//! IPv6-only network (DC/OS's `dcos6` shape), a dual-stack network and an IPv4 one, real agents
//! and containers attached through the real CNI plugin. Containers get one address per family
//! of their network from the CNI half of their agent's subnets; ICMPv6, TCP and UDP cross the
//! overlay within each network on one agent and across agents (256 MB intact over IPv6), the
//! host reaches its containers over IPv6 through its host link, and every cross-network pair of
//! either family is dropped and counted.

use std::{
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use overlay_api::subnets::halves6;
use overlay_common::counters::Counter;
use overlay_datapath::OverlayMaps;
use overlay_lab::{
    Container, Node,
    cluster::{Cluster, ClusterSpec, ContainerAddrs},
};
use overlay_tests::{bin_path, lab_pins};

const CONFIG: &str = "\
vtep_subnet: 44.128.0.0/20
vtep_subnet6: fd01:a::/64
vtep_mac_oui: 70:B3:D5:00:00:00
overlays:
  - name: dcos
    subnet: 9.0.0.0/8
    prefix: 24
  - name: dcos6
    subnet6: fd01:b::/64
    prefix6: 80
  - name: dual
    subnet: 10.1.0.0/16
    prefix: 24
    subnet6: fd01:c::/48
    prefix6: 64
";

const AGENTS: [&str; 3] = ["a1", "a2", "a3"];

/// A container and its addresses.
struct C {
    c: Container,
    net: &'static str,
    addrs: ContainerAddrs,
}

impl C {
    fn v6(&self) -> Ipv6Addr {
        self.addrs.ip6.expect("an IPv6 address")
    }
    fn addresses(&self) -> Vec<IpAddr> {
        self.addrs
            .ip4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.addrs.ip6.map(IpAddr::V6))
            .collect()
    }
}

fn maps(cluster: &Cluster, agent: &str) -> OverlayMaps {
    OverlayMaps::open_pinned(&lab_pins(&cluster.lab, agent)).unwrap()
}

/// `counter` of network `id`, summed over every agent.
fn stat(c: &Cluster, id: u32, counter: Counter) -> u64 {
    AGENTS
        .iter()
        .map(|a| maps(c, a).stat(id, counter).unwrap())
        .sum()
}

/// Pings every (from, to) pair concurrently (either family); whether each got a reply.
fn ping_all(pairs: &[(&C, IpAddr)]) -> Vec<bool> {
    std::thread::scope(|s| {
        let handles: Vec<_> = pairs
            .iter()
            .map(|(c, to)| {
                s.spawn(move || {
                    c.c.node
                        .try_exec("ping", &["-c", "2", "-W", "2", "-q", &to.to_string()])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Starts `script` (`sh -c`) in `node` and gives it a moment to listen.
fn listen(node: &Node, script: &str) -> std::process::Child {
    let mut server = node.command("sh");
    server.args(["-c", script]);
    let server = server.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    server
}

/// Runs `script` (`sh -c`) in `node`.
fn sh(node: &Node, script: &str) {
    node.exec("sh", &["-c", script]).unwrap();
}

/// One TCP message and one UDP datagram from `from` to `to` over IPv6.
fn tcp_and_udp6(from: &C, to: &C, port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let dst = to.v6().to_string();
    let got = dir.path().join("tcp");
    let mut server = listen(
        &to.c.node,
        &format!("nc -6 -l -p {port} > {}", got.display()),
    );
    sh(
        &from.c.node,
        &format!("echo tcp6-hello | timeout 10 nc -N {dst} {port}"),
    );
    server.wait().unwrap();
    assert_eq!(
        std::fs::read_to_string(&got).unwrap(),
        "tcp6-hello\n",
        "TCP over IPv6 {} -> {dst}",
        from.v6()
    );
    let got = dir.path().join("udp");
    let mut server = listen(
        &to.c.node,
        &format!("timeout 3 nc -6 -u -l -p {port} > {}", got.display()),
    );
    sh(
        &from.c.node,
        &format!("echo udp6-hello | timeout 1 nc -6 -u -q 0 {dst} {port}"),
    );
    let _ = server.wait();
    assert_eq!(
        std::fs::read_to_string(&got).unwrap(),
        "udp6-hello\n",
        "UDP over IPv6 {} -> {dst}",
        from.v6()
    );
}

/// `bytes` random bytes over TCP/IPv6 from `from` to `to`; the SHA-256 of what left and of what
/// arrived.
fn bulk6(from: &C, to: &C, bytes: u64) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (sent, received, fifo) = (
        dir.path().join("sent"),
        dir.path().join("received"),
        dir.path().join("fifo"),
    );
    let mut server = listen(
        &to.c.node,
        &format!("nc -6 -l -p 7100 | sha256sum > {}", received.display()),
    );
    sh(
        &from.c.node,
        &format!(
            "mkfifo {f}; sha256sum < {f} > {s} & head -c {bytes} /dev/urandom | tee {f} | timeout 60 nc -N {dst} 7100; wait",
            f = fifo.display(),
            s = sent.display(),
            dst = to.v6()
        ),
    );
    server.wait().unwrap();
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    (read(&sent), read(&received))
}

#[test]
fn ipv6_and_dual_stack_networks_carry_traffic_isolated_end_to_end() {
    let bin_dir = bin_path("overlay-agent").parent().unwrap().to_owned();
    let mut spec = ClusterSpec::new(3, &bin_dir);
    spec.config = CONFIG.into();
    let mut c = Cluster::up(spec).unwrap();
    let info = c.agent_info("a1").unwrap();
    let id_of = |net: &str| {
        info.overlays
            .iter()
            .find(|o| o.info.name == net)
            .and_then(|o| o.info.network_id())
            .unwrap_or_else(|| panic!("no id for {net}"))
    };
    let ids = [id_of("dcos"), id_of("dcos6"), id_of("dual")];

    // Two containers per network on a1, one on each other agent.
    let mut all: Vec<C> = vec![];
    for net in ["dcos", "dcos6", "dual"] {
        for agent in ["a1", "a1", "a2", "a3"] {
            let (container, addrs) = c.add_container_addrs(agent, net).unwrap();
            all.push(C {
                c: container,
                net,
                addrs,
            });
        }
    }
    // One address per family of the network, from the CNI (first) half of the agent's
    // subnet of that family.
    for x in &all {
        let me = c.agent_info(&x.c.agent).unwrap();
        let ov = me.overlays.iter().find(|o| o.info.name == x.net).unwrap();
        match x.net {
            "dcos" => assert!(x.addrs.ip4.is_some() && x.addrs.ip6.is_none()),
            "dcos6" => assert!(x.addrs.ip4.is_none() && x.addrs.ip6.is_some()),
            _ => assert!(x.addrs.ip4.is_some() && x.addrs.ip6.is_some()),
        }
        if let Some(v6) = x.addrs.ip6 {
            let (cni, _) = halves6(ov.subnet6.unwrap());
            assert!(cni.contains(v6), "{v6} outside the CNI half {cni}");
            assert_ne!(v6, overlay_api::subnets::gateway6(cni));
        }
        if let Some(v4) = x.addrs.ip4 {
            let (cni, _) = overlay_api::subnets::halves4(ov.subnet.unwrap());
            assert!(cni.contains(v4), "{v4} outside the CNI half {cni}");
        }
        // The agent lists the container with the same addresses.
        let eps = c.agent(&x.c.agent).endpoints().unwrap();
        let ep = eps
            .iter()
            .find(|e| e.host_veth == x.c.host_veth)
            .unwrap_or_else(|| panic!("{} not listed: {eps:?}", x.c.host_veth));
        assert_eq!(ep.ipv6(), x.addrs.ip6);
        assert_eq!(ep.ipv4(), x.addrs.ip4);
        // No router advertisements are heeded in the container, and it made no address of its
        // own: only what the plugin gave it (and its link-local one from its MAC).
        if x.addrs.ip6.is_some() {
            let accept_ra =
                x.c.node
                    .exec("cat", &["/proc/sys/net/ipv6/conf/eth0/accept_ra"])
                    .unwrap();
            assert_eq!(accept_ra.trim(), "0");
            let addrs =
                x.c.node
                    .exec("ip", &["-6", "-o", "addr", "show", "dev", "eth0"])
                    .unwrap();
            assert_eq!(addrs.lines().count(), 2, "{addrs}");
        }
    }

    // Within each network, every container reaches every other over each family it has.
    let mut pairs: Vec<(&C, IpAddr)> = vec![];
    for a in &all {
        for b in all
            .iter()
            .filter(|b| b.net == a.net && b.c.host_veth != a.c.host_veth)
        {
            pairs.extend(b.addresses().into_iter().map(|to| (a, to)));
        }
    }
    let replies = ping_all(&pairs);
    for ((from, to), ok) in pairs.iter().zip(&replies) {
        assert!(
            ok,
            "{}: {:?} on {} cannot reach {to}; a1 counters {:?}",
            from.net,
            from.addresses(),
            from.c.agent,
            maps(&c, "a1").stats().unwrap()
        );
    }
    assert!(
        stat(&c, ids[1], Counter::NdReplied) > 0,
        "dcos6's neighbour discovery answered in BPF"
    );
    assert!(stat(&c, ids[1], Counter::Encapsulated) > 0);

    // TCP and UDP over IPv6, on one agent and across agents, in both IPv6 networks.
    for (n, net) in ["dcos6", "dual"].into_iter().enumerate() {
        let of: Vec<&C> = all.iter().filter(|x| x.net == net).collect();
        assert_eq!(
            (of[0].c.agent.as_str(), of[1].c.agent.as_str()),
            ("a1", "a1")
        );
        tcp_and_udp6(of[0], of[1], 7000 + n as u16);
        tcp_and_udp6(of[0], of[2], 7010 + n as u16);
        tcp_and_udp6(of[3], of[0], 7020 + n as u16);
    }

    // The host reaches its own and other agents' containers over IPv6 (its gateway address on
    // the host link is the source; the replies come back to its host endpoint).
    let host = c.node("a1").unwrap().clone();
    for x in all.iter().filter(|x| x.addrs.ip6.is_some()) {
        assert!(
            host.ping_ip(IpAddr::V6(x.v6())),
            "the host of a1 cannot reach {} on {}",
            x.v6(),
            x.c.agent
        );
    }

    // Every cross-network pair is dropped, IPv4 and IPv6, and counted under the sender's
    // network.
    let before: Vec<u64> = ids
        .iter()
        .map(|id| stat(&c, *id, Counter::DropCrossNetwork))
        .collect();
    let mut cross: Vec<(&C, IpAddr)> = vec![];
    for a in &all {
        for b in all.iter().filter(|b| b.net != a.net) {
            for to in b.addresses() {
                // A container reaches the other network's family only if it has that family.
                if a.addresses().iter().any(|f| f.is_ipv4() == to.is_ipv4()) {
                    cross.push((a, to));
                }
            }
        }
    }
    let replies = ping_all(&cross);
    for ((from, to), ok) in cross.iter().zip(&replies) {
        assert!(
            !ok,
            "isolation broken: {} ({:?}) reached {to}",
            from.net,
            from.addresses()
        );
    }
    for (n, id) in ids.iter().enumerate() {
        let after = stat(&c, *id, Counter::DropCrossNetwork);
        assert!(
            after > before[n],
            "network {id}: cross-network drops {} -> {after}",
            before[n]
        );
    }
    // The metrics show the IPAM of each family by network id.
    let metrics = c.agent("a1").metrics().unwrap();
    for needle in [
        format!(
            "overlay_agent_ipam_addresses{{network_id=\"{}\",network=\"dcos6\",family=\"ipv6\",state=\"used\"}} 2",
            ids[1]
        ),
        format!(
            "overlay_agent_ipam_addresses{{network_id=\"{}\",network=\"dual\",family=\"ipv4\",state=\"used\"}} 2",
            ids[2]
        ),
        format!(
            "overlay_agent_ipam_addresses{{network_id=\"{}\",network=\"dual\",family=\"ipv6\",state=\"used\"}} 2",
            ids[2]
        ),
    ] {
        assert!(
            metrics.contains(&needle),
            "metrics lack {needle}:\n{metrics}"
        );
    }

    // 256 MB over IPv6 across agents, intact.
    let (a, b) = {
        let of: Vec<&C> = all.iter().filter(|x| x.net == "dcos6").collect();
        (of[0], of[2])
    };
    let started = std::time::Instant::now();
    let (sent, received) = bulk6(a, b, 256 << 20);
    let took = started.elapsed();
    assert_eq!(sent.len(), 64, "no checksum of what was sent");
    assert_eq!(sent, received, "256 MB over IPv6 arrived changed");
    eprintln!(
        "256 MB over IPv6 a1 -> a2 in {:.1} s ({:.2} Gbit/s with generation and hashing)",
        took.as_secs_f64(),
        (256u64 << 23) as f64 / took.as_secs_f64() / 1e9
    );
}
