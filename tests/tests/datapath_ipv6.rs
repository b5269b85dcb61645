//! Inner IPv6 over the IPv4 underlay between two lab agents, in real namespaces with the real
//! programs: containers resolve each other through the BPF neighbour-discovery responder (no
//! bridge), ping6 and TCP cross agents in VXLAN, and a container whose MTU is larger than the
//! overlay's learns the overlay MTU from the Packet Too Big / frag-needed the datapath sends, so
//! the next TCP connection works. The maps are written through the façade as the agent must write
//! them for a dual-stack network (the IPv4 part by `install_datapath`).

use std::net::{IpAddr, Ipv6Addr};

use overlay_agent::datapath::{OverlayMaps, addr16};
use overlay_common::{
    counters::Counter,
    maps::{OverlaySubnet, RemoteRoute},
};
use overlay_lab::{Container, Lab};
use overlay_tests::fixtures::{LabExt, lab, two_agents_over_vxlan};
use overlay_tests::lab_pins;

const VNI: u32 = 1024;
const SUBNET6: &str = "fd01:a::/48";

struct AgentPlan {
    role: &'static str,
    subnet6: &'static str,
    container6: Ipv6Addr,
    vtep_mac: [u8; 6],
}

const AGENTS: [AgentPlan; 2] = [
    AgentPlan {
        role: "a1",
        subnet6: "fd01:a:0:1::/64",
        container6: Ipv6Addr::new(0xfd01, 0xa, 0, 1, 0, 0, 0, 2),
        vtep_mac: [0x70, 0xb3, 0xd5, 0x80, 0, 1],
    },
    AgentPlan {
        role: "a2",
        subnet6: "fd01:a:0:2::/64",
        container6: Ipv6Addr::new(0xfd01, 0xa, 0, 2, 0, 0, 0, 2),
        vtep_mac: [0x70, 0xb3, 0xd5, 0x80, 0, 2],
    },
];

fn maps(lab: &Lab, role: &str) -> OverlayMaps {
    OverlayMaps::open_pinned(&lab_pins(lab, role)).unwrap()
}

fn stat(lab: &Lab, role: &str, counter: Counter) -> u64 {
    maps(lab, role).stat(VNI, counter).unwrap()
}

/// A link-local address for container `n`, given explicitly (the lab's veths come up without
/// one of the kernel's).
fn link_local(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, n, 2)
}

/// What the agent writes for the IPv6 half of a dual-stack network: the network's IPv6 subnet,
/// the container's IPv6 and link-local addresses as endpoints (the same value as its IPv4 one),
/// and the peer's IPv6 block as a route.
fn add_ipv6(lab: &Lab, i: usize, container: &Container) {
    let plan = &AGENTS[i];
    let peer = &AGENTS[1 - i];
    let ll = link_local(i as u16 + 1);
    container
        .node
        .exec(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("{ll}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        )
        .unwrap();
    container
        .node
        .exec(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("{}/48", plan.container6),
                "dev",
                "eth0",
                "nodad",
            ],
        )
        .unwrap();
    let mut m = maps(lab, plan.role);
    let ep = m.endpoints().unwrap()[&IpAddr::V4(container.node.ip.unwrap())];
    m.put_subnet(SUBNET6.parse().unwrap(), OverlaySubnet::new(VNI))
        .unwrap();
    m.put_endpoint(IpAddr::V6(plan.container6), ep).unwrap();
    m.put_endpoint(IpAddr::V6(ll), ep).unwrap();
    let peer_underlay = lab.node(peer.role).unwrap().ip.unwrap();
    m.put_route(
        peer.subnet6.parse().unwrap(),
        RemoteRoute::new(addr16(IpAddr::V4(peer_underlay)), peer.vtep_mac, VNI, VNI),
    )
    .unwrap();
}

/// Sends `bytes` random bytes over TCP from `from` to `to_addr` and checks they arrive intact.
fn tcp_transfer(from: &Container, to: &Container, to_addr: &str, listen: &[&str], bytes: usize) {
    let dir = tempfile::tempdir().unwrap();
    let recv = dir.path().join("received");
    let send = dir.path().join("sent");
    let mut server = to.node.command("sh");
    server
        .args([
            "-c",
            &format!("nc {} -l -p 5001 > {}", listen.join(" "), recv.display()),
        ])
        .stdin(std::process::Stdio::null());
    let mut server = server.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    from.node
        .exec(
            "sh",
            &[
                "-c",
                &format!(
                    "head -c {bytes} /dev/urandom > {s}; timeout 60 nc -N {to_addr} 5001 < {s}",
                    s = send.display()
                ),
            ],
        )
        .unwrap();
    server.wait().unwrap();
    let sent = std::fs::read(&send).unwrap();
    let received = std::fs::read(&recv).unwrap();
    assert_eq!(received.len(), sent.len(), "bytes lost across agents");
    assert!(received == sent, "payload corrupted across agents");
}

#[test]
fn ipv6_containers_on_two_agents_talk_and_learn_the_overlay_mtu() {
    let mut lab = lab(2);
    let c1 = lab.container("a1", "9.0.1.2/25");
    let c2 = lab.container("a2", "9.0.2.2/25");
    two_agents_over_vxlan(&lab, VNI, [&c1, &c2]);
    for (i, c) in [&c1, &c2].into_iter().enumerate() {
        add_ipv6(&lab, i, c);
    }

    // On-link /48: c1 solicits c2's address itself; the datapath answers, no bridge.
    let c2_addr = AGENTS[1].container6.to_string();
    let ping6 = |c: &Container, dst: &str| {
        c.node
            .try_exec("ping", &["-6", "-c", "2", "-W", "2", "-q", dst])
    };
    assert!(
        ping6(&c1, &c2_addr),
        "no ping6 reply across agents; a1 counters {:?}",
        maps(&lab, "a1").stats().unwrap()
    );
    assert!(stat(&lab, "a1", Counter::NdReplied) > 0, "c1's NS answered");
    assert!(stat(&lab, "a1", Counter::Encapsulated) > 0);
    assert!(stat(&lab, "a2", Counter::Decapsulated) > 0);
    assert!(ping6(&c2, &AGENTS[0].container6.to_string()), "and back");
    // Nothing reaches the other container by link-local: its solicitation is not answered, and
    // with a neighbour entry forced in, the packet is dropped and counted.
    let c2_link_local = format!("{}%eth0", link_local(2));
    let decapsulated = stat(&lab, "a2", Counter::Decapsulated);
    let ping_ll = |c: &Container| {
        c.node
            .try_exec("ping", &["-6", "-c", "1", "-W", "1", "-q", &c2_link_local])
    };
    assert!(!ping_ll(&c1), "link-local reached another container");
    let gw_mac = lab.node("a1").unwrap().mac(&c1.host_veth).unwrap();
    let gw_mac = gw_mac.map(|b| format!("{b:02x}")).join(":");
    c1.node
        .exec(
            "ip",
            &[
                "-6",
                "neigh",
                "replace",
                &link_local(2).to_string(),
                "lladdr",
                &gw_mac,
                "dev",
                "eth0",
            ],
        )
        .unwrap();
    let before = stat(&lab, "a1", Counter::DropLinkLocal);
    assert!(!ping_ll(&c1), "link-local reached another container");
    assert!(stat(&lab, "a1", Counter::DropLinkLocal) > before);
    assert_eq!(stat(&lab, "a2", Counter::Decapsulated), decapsulated);

    // TCP over IPv6 across agents (GSO super-packets through encap and decap).
    tcp_transfer(&c1, &c2, &c2_addr, &["-6"], 16_000_000);

    // c1 and c2 believe their links carry 1500 bytes. c1's too-big packets get a Packet Too Big
    // / frag-needed from the datapath, the kernel takes the overlay MTU for the destination, and
    // TCP goes on with the smaller MSS: a single ping (IPv6), and TCP's GSO super-packets (IPv4),
    // whose 1500-byte segments would not fit the overlay although the super-packet is no
    // single packet over its MTU.
    for (dev, node) in [
        ("eth0", &c1.node),
        (c1.host_veth.as_str(), lab.node("a1").unwrap()),
        ("eth0", &c2.node),
        (c2.host_veth.as_str(), lab.node("a2").unwrap()),
    ] {
        node.exec("ip", &["link", "set", dev, "mtu", "1500"])
            .unwrap();
    }
    let answered = stat(&lab, "a1", Counter::TooBigAnswered);
    let _ = c1.node.try_exec(
        "ping",
        &[
            "-6", "-c", "1", "-W", "1", "-s", "1452", "-M", "do", &c2_addr,
        ],
    );
    assert_eq!(stat(&lab, "a1", Counter::TooBigAnswered), answered + 1);
    tcp_transfer(&c1, &c2, "9.0.2.2", &[], 4_000_000);
    assert!(
        stat(&lab, "a1", Counter::TooBigAnswered) > answered + 1,
        "no frag-needed for TCP's super-packets"
    );
    let route6 = c1
        .node
        .exec("ip", &["-6", "route", "get", &c2_addr])
        .unwrap();
    assert!(
        route6.contains("mtu 1420"),
        "IPv6 path MTU not learned: {route6}"
    );
    let route4 = c1.node.exec("ip", &["route", "get", "9.0.2.2"]).unwrap();
    assert!(
        route4.contains("mtu 1420"),
        "IPv4 path MTU not learned: {route4}"
    );
    tcp_transfer(&c1, &c2, &c2_addr, &["-6"], 4_000_000);
    tcp_transfer(&c1, &c2, "9.0.2.2", &[], 4_000_000);
    drop(lab);
}
