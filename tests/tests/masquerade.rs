//! Masquerade in BPF, against a real cluster: containers reach a host outside every overlay (the
//! lab's external host) with the agent's underlay address as their source, replies and ICMP
//! errors come back to the right container, and nothing else does.

use std::{
    net::{IpAddr, Ipv4Addr},
    process::Stdio,
    time::{Duration, Instant},
};

use overlay_common::{counters::Counter, maps::nat_direction};
use overlay_datapath::{OverlayMaps, from_addr16};
use overlay_lab::{
    Container, Node,
    cluster::{Cluster, TWO_NETWORKS},
};
use overlay_tests::fixtures::cluster_spec;
use overlay_tests::lab_pins;
use overlay_tests::support_peers::{nat_peers_script, start_peer_server};

const DCOS: u32 = 1024;
const EXT: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 254);
const A1: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 11);
const PORT: u16 = 8000;

fn cluster(agents: usize, config: &str) -> Cluster {
    cluster_with(agents, config, &[])
}

/// A cluster whose UDP flows expire after 3 s of silence, so that tests can watch them go.
fn cluster_with(agents: usize, config: &str, extra_agent_args: &[&str]) -> Cluster {
    cluster_with_udp_timeout(agents, config, 3, extra_agent_args)
}

fn cluster_with_udp_timeout(
    agents: usize,
    config: &str,
    udp_timeout_s: u32,
    extra_agent_args: &[&str],
) -> Cluster {
    let mut spec = cluster_spec(agents);
    spec.config = config.into();
    spec.agent_args = vec!["--nat-udp-timeout".into(), udp_timeout_s.to_string()];
    spec.agent_args
        .extend(extra_agent_args.iter().map(|s| s.to_string()));
    Cluster::up(spec).unwrap()
}

fn peers(node: &Node, args: &[&str]) -> String {
    let mut full = vec![nat_peers_script().to_str().unwrap().to_owned()];
    full.extend(args.iter().map(|s| s.to_string()));
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    node.exec("python3", &full).unwrap().trim().to_owned()
}

fn maps(c: &Cluster, agent: &str) -> OverlayMaps {
    OverlayMaps::open_pinned(&lab_pins(&c.lab, agent)).unwrap()
}

fn ip(c: &Container) -> Ipv4Addr {
    c.node.ip.unwrap()
}

#[test]
fn containers_reach_the_outside_as_their_agent_and_replies_come_back() {
    let mut c = cluster(2, TWO_NETWORKS);
    let x = c.add_container("a1", "dcos").unwrap();
    let y = c.add_container("a2", "blue").unwrap();
    start_peer_server(&mut c, PORT);

    // TCP: the server sees the agent's underlay address and a masquerade port; echo works.
    let seen = peers(
        &x.node,
        &["tcp-hold", &EXT.to_string(), &PORT.to_string(), "0", "0"],
    );
    let (addr, rest) = seen
        .split_once(':')
        .unwrap_or_else(|| panic!("bad answer {seen:?}"));
    assert_eq!(addr, A1.to_string(), "server saw {seen}");
    let port: u16 = rest.split_whitespace().next().unwrap().parse().unwrap();
    assert!(
        (61000..=63999).contains(&port),
        "port {port} outside the masquerade range"
    );
    assert!(seen.ends_with("echo-ok"), "{seen}");
    // UDP and ICMP echo: the external host has no route into the overlay, so any answer at all
    // proves the source was translated.
    assert_eq!(
        peers(
            &x.node,
            &["udp-flows", &EXT.to_string(), &PORT.to_string(), "1"]
        ),
        "1"
    );
    assert!(x.node.ping(EXT), "ping to the outside got no reply");
    assert!(
        y.node.ping(EXT),
        "ping from another network on another agent got no reply"
    );

    let m = maps(&c, "a1");
    for counter in [
        Counter::Masqueraded,
        Counter::Unmasqueraded,
        Counter::NatCreated,
    ] {
        assert!(
            m.stat(DCOS, counter).unwrap() > 0,
            "{} not counted",
            counter.name()
        );
    }
    let udp_flow = |m: &OverlayMaps| {
        m.nat_entries().unwrap().into_iter().any(|(k, _)| {
            k.protocol == 17
                && k.direction == nat_direction::EGRESS
                && from_addr16(&k.local) == IpAddr::V4(ip(&x))
        })
    };
    assert!(udp_flow(&m), "no UDP flow in OVL_NAT");
    let metrics = c.agent("a1").metrics().unwrap();
    assert!(
        metrics.contains("overlay_nat_entries ") && metrics.contains("counter=\"masqueraded\""),
        "{metrics}"
    );

    // Idle UDP flows expire (timeout 3 s here) and leave the table.
    let start = Instant::now();
    while udp_flow(&maps(&c, "a1")) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "UDP flow never expired"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_thousand_concurrent_flows_from_several_containers_all_work() {
    let mut c = cluster(2, TWO_NETWORKS);
    let containers: Vec<Container> = ["a1", "a1", "a2", "a2"]
        .iter()
        .map(|a| c.add_container(a, "dcos").unwrap())
        .collect();
    start_peer_server(&mut c, PORT);
    let answered: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = containers
            .iter()
            .map(|x| {
                s.spawn(move || {
                    peers(
                        &x.node,
                        &["udp-flows", &EXT.to_string(), &PORT.to_string(), "250"],
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let drops = |agent: &str| {
        let m = maps(&c, agent);
        (
            m.stat(DCOS, Counter::DropNatNoPort).unwrap(),
            m.stat(DCOS, Counter::NatPortRetries).unwrap(),
        )
    };
    assert_eq!(
        answered,
        ["250"; 4],
        "answers per container; (no-port drops, port retries) a1 {:?} a2 {:?}",
        drops("a1"),
        drops("a2")
    );
    assert_eq!(
        (drops("a1").0, drops("a2").0),
        (0, 0),
        "flows refused for want of a port"
    );
    let flows = |agent: &str| {
        maps(&c, agent)
            .nat_entries()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.direction == nat_direction::EGRESS)
            .count()
    };
    assert!(
        flows("a1") >= 500 && flows("a2") >= 500,
        "a1 {} a2 {}",
        flows("a1"),
        flows("a2")
    );
}

#[test]
fn a_host_connection_and_a_container_flow_wanting_the_same_port_both_work() {
    let mut c = cluster(1, TWO_NETWORKS);
    let x = c.add_container("a1", "dcos").unwrap();
    start_peer_server(&mut c, PORT);
    let host = c.lab.node("a1").unwrap().clone();
    let args = [
        "tcp-hold",
        &EXT.to_string(),
        &PORT.to_string(),
        "40000",
        "2",
    ]
    .map(String::from);
    let (from_host, from_container) = std::thread::scope(|s| {
        let a = s.spawn(|| peers(&host, &args.each_ref().map(String::as_str)));
        let b = s.spawn(|| peers(&x.node, &args.each_ref().map(String::as_str)));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(
        from_host,
        format!("{A1}:40000 echo-ok"),
        "the host's own connection"
    );
    assert!(
        from_container.starts_with(&format!("{A1}:")) && from_container.ends_with("echo-ok"),
        "{from_container}"
    );
    assert_ne!(
        from_container, from_host,
        "the container flow took the host's tuple"
    );
}

#[test]
fn a_reply_without_a_mapping_reaches_no_container() {
    let mut c = cluster(1, TWO_NETWORKS);
    let x = c.add_container("a1", "dcos").unwrap();
    // Quiet the container link (no IPv6 chatter) so its receive counter only moves for us.
    x.node
        .exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])
        .unwrap();
    c.lab
        .node("a1")
        .unwrap()
        .exec(
            "sysctl",
            &[
                "-qw",
                &format!("net.ipv6.conf.{}.disable_ipv6=1", x.host_veth),
            ],
        )
        .unwrap();
    let rx = || {
        x.node
            .exec("cat", &["/sys/class/net/eth0/statistics/rx_packets"])
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let before = rx();
    for port in ["61000", "61500", "63999"] {
        c.lab
            .external()
            .exec(
                "sh",
                &["-c", &format!("echo stray | nc -u -w 0 {A1} {port}")],
            )
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        rx(),
        before,
        "a packet without a mapping reached the container"
    );
    assert_eq!(
        maps(&c, "a1").stat(DCOS, Counter::Unmasqueraded).unwrap(),
        0
    );
}

#[test]
fn a_too_big_icmp_error_from_outside_reaches_the_right_container() {
    // The flow's mapping must outlive the start of two listeners and the sender: on a loaded
    // machine that took more than the 3 s the other tests' flows live (the error then found no
    // mapping and reached no container).
    let mut c = cluster_with_udp_timeout(1, TWO_NETWORKS, 60, &[]);
    let x = c.add_container("a1", "dcos").unwrap();
    let other = c.add_container("a1", "dcos").unwrap();
    start_peer_server(&mut c, PORT);
    assert_eq!(
        peers(
            &x.node,
            &["udp-flows", &EXT.to_string(), &PORT.to_string(), "1"]
        ),
        "1"
    );
    let (key, entry) = maps(&c, "a1")
        .nat_entries()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.protocol == 17 && k.direction == nat_direction::EGRESS)
        .expect("the UDP flow's mapping");
    // Listen in both containers, then let a "router" send frag-needed about the flow.
    let listen = |n: &Node| {
        let mut cmd = n.command("python3");
        cmd.arg(nat_peers_script())
            .args(["icmp-listen", "4"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        // Wait until its socket is open (a fixed sleep lost the race on a loaded machine).
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stderr.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "listening", "icmp listener did not start");
        child
    };
    let (lx, lo) = (listen(&x.node), listen(&other.node));
    peers(
        c.lab.external(),
        &[
            "icmp-too-big",
            &A1.to_string(),
            &A1.to_string(),
            &EXT.to_string(),
            &entry.port.to_string(),
            &PORT.to_string(),
            "1300",
        ],
    );
    let got_x = String::from_utf8(lx.wait_with_output().unwrap().stdout).unwrap();
    let got_other = String::from_utf8(lo.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(
        got_x.trim(),
        format!("3 4 {} {} checksum_ok", ip(&x), key.local_port),
        "the flow's container"
    );
    assert_eq!(got_other.trim(), "none", "another container got the error");
}

#[test]
fn a_network_can_opt_out_of_masquerade() {
    let config = format!(
        "{TWO_NETWORKS}  - name: plain\n    subnet: 10.2.0.0/16\n    prefix: 24\n    masquerade: false\n"
    );
    let mut c = cluster(1, &config);
    let x = c.add_container("a1", "plain").unwrap();
    let vni = c
        .agent_info("a1")
        .unwrap()
        .overlays
        .iter()
        .find(|o| o.info.name == "plain")
        .and_then(|o| o.info.id)
        .unwrap();
    assert!(
        !x.node.ping(EXT),
        "a network that opted out was masqueraded"
    );
    let m = maps(&c, "a1");
    assert_eq!(m.stat(vni, Counter::Masqueraded).unwrap(), 0);
    assert!(m.stat(vni, Counter::PassedToHost).unwrap() > 0);
}

#[test]
fn closed_flows_free_their_port_and_exhaustion_is_refused_and_counted() {
    // Four masquerade ports only.
    let mut c = cluster_with(1, TWO_NETWORKS, &["--masquerade-ports", "61000-61003"]);
    let x = c.add_container("a1", "dcos").unwrap();
    start_peer_server(&mut c, PORT);
    let ext = EXT.to_string();
    let port = PORT.to_string();
    // Twelve connections one after another, each closed: a closed flow's port is taken over at
    // once (otherwise the closing timeout would refuse the fifth).
    for i in 0..12 {
        let seen = peers(&x.node, &["tcp-hold", &ext, &port, "0", "0"]);
        assert!(seen.ends_with("echo-ok"), "connection {i}: {seen}");
    }
    assert_eq!(
        maps(&c, "a1").stat(DCOS, Counter::DropNatNoPort).unwrap(),
        0
    );
    // Five at once: four ports, so one is refused, and the refusal is counted.
    let held: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..5)
            .map(|_| {
                let (x, ext, port) = (&x, &ext, &port);
                s.spawn(move || {
                    let script = nat_peers_script();
                    // Held longer than the client's 5 s connect timeout, so the refused one cannot
                    // get in by retransmitting its SYN once another closes.
                    let args = [script.to_str().unwrap(), "tcp-hold", ext, port, "0", "8"];
                    x.node.try_exec("python3", &args)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(held.iter().filter(|ok| **ok).count(), 4, "{held:?}");
    assert!(
        maps(&c, "a1").stat(DCOS, Counter::DropNatNoPort).unwrap() > 0,
        "refusal not counted"
    );
    let metrics = c.agent("a1").metrics().unwrap();
    assert!(
        metrics.contains("counter=\"drop_nat_no_port\""),
        "{metrics}"
    );
}
