//! IPv6 masquerade against a real cluster: a container on a ULA network reaches the lab's
//! external host over IPv6 by TCP, UDP and ping6 with the agent's underlay IPv6 address as its
//! source, ICMPv6 errors about its flows come back to it translated (port unreachable, Packet Too
//! Big), a network that opted out is not masqueraded, and without an IPv6 address on the underlay
//! nothing goes out with a ULA source.
//!
//! The agent's IPv6 IPAM is not part of this: the containers get their IPv6 address by hand and
//! the datapath an endpoint for it (the same value as its IPv4 one), as `datapath_ipv6.rs` does.
//! The lab fabric is IPv4; this test gives the agent's and the external host's fabric links
//! IPv6 addresses (over netlink, inside the lab's namespaces) once the agent runs, which is also
//! how the agent is shown to pick its IPv6 source up when it appears.

use std::{
    io::BufRead as _,
    net::{IpAddr, Ipv6Addr},
    process::Stdio,
    time::{Duration, Instant},
};

use overlay_common::{counters::Counter, maps::nat_direction};
use overlay_datapath::{OverlayMaps, from_addr16};
use overlay_lab::{
    Container, Node,
    cluster::{Cluster, TWO_NETWORKS},
};
use overlay_netlink::Address6;
use overlay_tests::fixtures::cluster_spec;
use overlay_tests::support_peers::{nat_peers_script, start_peer_server6};
use overlay_tests::{bin_path, lab_pins};

const DCOS: u32 = 1024;
/// The fabric's IPv6 addresses: agent a1 and the external host.
const A1_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xfab, 0, 0, 0, 0, 0, 0x11);
const EXT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xfab, 0, 0, 0, 0, 0, 0xfe);
/// The containers' IPv6 networks (dcos6's fd01:b::/64 for the masquerading one) and gateway.
const X6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xb, 0, 0, 0, 0, 0, 2);
const GW6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xb, 0, 0, 0, 0, 0, 1);
const PLAIN6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xc, 0, 0, 0, 0, 0, 2);
const PLAIN_GW6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xc, 0, 0, 0, 0, 0, 1);
const PORT: u16 = 8000;

fn maps(c: &Cluster) -> OverlayMaps {
    OverlayMaps::open_pinned(&lab_pins(&c.lab, "a1")).unwrap()
}

fn stat(c: &Cluster, vni: u32, counter: Counter) -> u64 {
    maps(c).stat(vni, counter).unwrap()
}

fn peers(node: &Node, args: &[&str]) -> String {
    let mut full = vec![nat_peers_script().to_str().unwrap().to_owned()];
    full.extend(args.iter().map(|s| s.to_string()));
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    node.exec("python3", &full).unwrap().trim().to_owned()
}

fn ping6(c: &Container, dst: Ipv6Addr) -> bool {
    c.node.try_exec(
        "ping",
        &["-6", "-c", "2", "-W", "2", "-q", &dst.to_string()],
    )
}

/// A global IPv6 address on `node`'s `eth0`, usable at once.
fn add_ipv6(node: &Node, ip: Ipv6Addr, prefix_len: u8) {
    let mut nl = node.netlink().unwrap();
    let ifindex = nl.link("eth0").unwrap().ifindex;
    nl.add_address6(Address6::new(ifindex, ip, prefix_len))
        .unwrap();
}

/// Gives container `x` (on agent a1) the IPv6 address `ip` with a default route via `gw`, and
/// the datapath an endpoint for it. The gateway's MAC is pinned in the container's neighbour
/// table: the ND responder answers for addresses of overlay subnets, which this agent does not
/// know for IPv6 yet.
fn give_ipv6(c: &Cluster, x: &Container, ip: Ipv6Addr, gw: Ipv6Addr) {
    add_ipv6(&x.node, ip, 64);
    let gw_mac = c.lab.node("a1").unwrap().mac(&x.host_veth).unwrap();
    let gw_mac = gw_mac.map(|b| format!("{b:02x}")).join(":");
    let gw = gw.to_string();
    for args in [
        vec![
            "-6",
            "neigh",
            "replace",
            &gw,
            "lladdr",
            &gw_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
        vec![
            "-6", "route", "replace", "default", "via", &gw, "dev", "eth0",
        ],
    ] {
        x.node.exec("ip", &args).unwrap();
    }
    let mut m = maps(c);
    let ep = m.endpoints().unwrap()[&IpAddr::V4(x.node.ip.unwrap())];
    m.put_endpoint(IpAddr::V6(ip), ep).unwrap();
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ipv6_containers_reach_the_outside_as_their_agent_and_errors_come_back() {
    let config = format!(
        "{TWO_NETWORKS}  - name: plain\n    subnet: 10.2.0.0/16\n    prefix: 24\n    masquerade: false\n"
    );
    let mut spec = cluster_spec(1);
    spec.config = config;
    let mut c = Cluster::up(spec).unwrap();
    let x = c.add_container("a1", "dcos").unwrap();
    let plain = c.add_container("a1", "plain").unwrap();
    // Counters key on the network id (networks share the wire VNI).
    let plain_vni = c
        .agent_info("a1")
        .unwrap()
        .overlays
        .iter()
        .find(|o| o.info.name == "plain")
        .and_then(|o| o.info.network_id())
        .unwrap();
    give_ipv6(&c, &x, X6, GW6);
    give_ipv6(&c, &plain, PLAIN6, PLAIN_GW6);

    // The underlay has no IPv6 address yet: nothing leaves with the container's ULA source, and
    // the drop says why.
    assert!(!maps(&c).nat_config().unwrap().has_ipv6_source());
    assert!(!ping6(&x, EXT6), "ping6 got out without an IPv6 source");
    assert!(stat(&c, DCOS, Counter::DropNat6NoAddress) > 0);
    assert_eq!(stat(&c, DCOS, Counter::Masqueraded), 0);

    // Now the fabric carries IPv6: the agent picks its address up as its masquerade source.
    add_ipv6(c.lab.node("a1").unwrap(), A1_6, 64);
    add_ipv6(c.lab.external(), EXT6, 64);
    wait_for("the agent's IPv6 source", Duration::from_secs(10), || {
        maps(&c).nat_config().unwrap().underlay_ip6 == A1_6.octets()
    });
    start_peer_server6(&mut c, PORT);
    let ext = EXT6.to_string();
    let port = PORT.to_string();

    // TCP: the server sees the agent's underlay IPv6 address and a masquerade port.
    let seen = peers(&x.node, &["tcp-hold", &ext, &port, "0", "0"]);
    let (addr, rest) = seen
        .rsplit_once("]:")
        .unwrap_or_else(|| panic!("bad answer {seen:?}"));
    assert_eq!(addr, format!("[{A1_6}"), "server saw {seen}");
    let seen_port: u16 = rest.split_whitespace().next().unwrap().parse().unwrap();
    assert!(
        (61000..=63999).contains(&seen_port),
        "port {seen_port} outside the masquerade range"
    );
    assert!(seen.ends_with("echo-ok"), "{seen}");
    // UDP and ping6: the external host has no route to fd01:b::/64, so any answer at all proves
    // the source was translated and the answer translated back.
    assert_eq!(peers(&x.node, &["udp-flows", &ext, &port, "3"]), "3");
    assert!(
        ping6(&x, EXT6),
        "no ping6 reply; counters {:?}",
        maps(&c).stats().unwrap()
    );
    for counter in [
        Counter::Masqueraded,
        Counter::Unmasqueraded,
        Counter::NatCreated,
    ] {
        assert!(
            stat(&c, DCOS, counter) > 0,
            "{} not counted",
            counter.name()
        );
    }
    let flows: Vec<u8> = maps(&c)
        .nat_entries()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| {
            k.direction == nat_direction::EGRESS && from_addr16(&k.local) == IpAddr::V6(X6)
        })
        .map(|(k, _)| k.protocol)
        .collect();
    for protocol in [6, 17, 58] {
        assert!(
            flows.contains(&protocol),
            "no IPv6 flow of protocol {protocol}: {flows:?}"
        );
    }

    // A UDP datagram to a closed port: the far end's ICMPv6 port unreachable reaches the
    // container's socket (its kernel matched the rewritten quote to the socket and accepted
    // every checksum).
    let unmasqueraded = stat(&c, DCOS, Counter::Unmasqueraded);
    assert_eq!(peers(&x.node, &["udp-refused", &ext, "9"]), "refused");
    assert!(stat(&c, DCOS, Counter::Unmasqueraded) > unmasqueraded);

    // Packet Too Big from a router on the path about a live flow: the container's kernel takes
    // the smaller path MTU for its socket.
    let mut mtu = x.node.command("python3");
    mtu.arg(nat_peers_script())
        .args(["udp-mtu", &ext, &port, "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut mtu = mtu.spawn().unwrap();
    let mut lines = std::io::BufReader::new(mtu.stdout.take().unwrap()).lines();
    let answer = lines.next().unwrap().unwrap();
    let flow_port = answer
        .rsplit_once("]:")
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("bad answer {answer:?}"));
    peers(
        c.lab.external(),
        &[
            "icmp6-too-big",
            &A1_6.to_string(),
            &A1_6.to_string(),
            &ext,
            &flow_port.to_string(),
            &port,
            "1280",
        ],
    );
    let reported = lines.next().unwrap().unwrap();
    mtu.wait().unwrap();
    assert_eq!(
        reported, "mtu 1280",
        "the container's path MTU after the PTB"
    );

    // The network that opted out is not masqueraded: left to the host stack, which has no way
    // back for its ULA source.
    assert!(
        !ping6(&plain, EXT6),
        "a network that opted out was masqueraded"
    );
    assert_eq!(stat(&c, plain_vni, Counter::Masqueraded), 0);
    assert!(stat(&c, plain_vni, Counter::PassedToHost) > 0);

    // The metrics count IPv6 flows apart (as of the sweeper's next walk, every second).
    wait_for("IPv6 flows in the metrics", Duration::from_secs(5), || {
        let text = c.agent("a1").metrics().unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("overlay_nat_flows{family=\"ipv6\"} "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .is_some_and(|n| n >= 3)
    });

    // overlayctl shows the IPv6 source and the IPv6 flows in socket-address notation.
    let out = std::process::Command::new(bin_path("overlayctl"))
        .args(["datapath", "--instance", &c.lab.pin_instance("a1")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("IPv6 source: {A1_6}"))
            && text.contains(&format!("[{X6}]:"))
            && text.contains(&format!("as [{A1_6}]:")),
        "overlayctl datapath: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
