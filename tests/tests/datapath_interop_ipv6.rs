//! DC/OS wire compatibility for IPv6 (`dcos6`): an agent on the eBPF datapath and an agent on
//! DC/OS's kernel datapath exchange IPv6 inside the overlay, over the IPv4 underlay.
//!
//! The kernel agent is built as DC/OS builds it for `dcos6` (`userspace/lab/src/dcos.rs`):
//! `vtep1024` with its `vtep_ip6` beside its IPv4 VTEP address, the Docker bridge `d-dcos6` with
//! the gateway of its Docker half (prefix6 80, halves /81), and for the eBPF agent what dcos-net
//! writes: its `vtep_ip6` -> VTEP MAC (permanent neighbour), its `subnet6` via that `vtep_ip6`,
//! and the one FDB entry (VTEP MAC -> IPv4 agent address) of the IPv4 overlay, which sends both
//! families' frames. What the kernel puts on the wire is checked: inner Ethernet from its VTEP MAC
//! to the eBPF agent's, IPv6 inside, VNI 1024, UDP port 64000.
//!
//! The eBPF agent's maps are written through the façade as the agent will write them for IPv6
//! networks (its IPAM does not give containers IPv6 addresses yet): networks `dcos6` and `blue6`
//! on the shared VNI 1024, their subnets, IPv6-only containers on each, the kernel agent's
//! blocks as routes. ping6 and a 16 MB TCP transfer go both ways, payload intact; `dcos6` and
//! `blue6` stay apart in both directions, dropped and counted.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Stdio,
    time::Duration,
};

use overlay_common::{
    counters::Counter,
    maps::{Endpoint, Network, OverlaySubnet, RemoteRoute, SHARED_VNI, Vtep, WireVni, programs},
};
use overlay_datapath::{OverlayMaps, addr16};
use overlay_lab::{Container, Lab, LabSpec, Node, dcos};
use overlay_tests::{agent_settings, lab_pins};

/// Network ids of the eBPF agent's IPv6 networks (both on the wire VNI 1024).
const DCOS6: u32 = 2;
const BLUE6: u32 = 3;

const A1_VTEP_MAC: [u8; 6] = [0x70, 0xb3, 0xd5, 0x80, 0, 1];
const A1_VTEP_MAC_S: &str = "70:b3:d5:80:00:01";
const A2_VTEP_MAC: [u8; 6] = [0x70, 0xb3, 0xd5, 0x80, 0, 2];
const A2_VTEP_MAC_S: &str = "70:b3:d5:80:00:02";

/// DC/OS's defaults: `vtep_subnet6` fd01:a::/64, `dcos6` fd01:b::/64 with prefix6 80; `blue6`
/// a second IPv6 overlay, fd01:c::/64.
const DCOS6_SUBNET: &str = "fd01:b::/64";
const BLUE6_SUBNET: &str = "fd01:c::/64";
const A1_DCOS6: &str = "fd01:b::1:0:0:0/80";
const A2_DCOS6: &str = "fd01:b::2:0:0:0/80";
const A1_BLUE6: &str = "fd01:c::1:0:0:0/80";
const A2_BLUE6: &str = "fd01:c::2:0:0:0/80";
/// a1's Docker half of `dcos6` (the second /81 of its /80): bridge `d-dcos6` and its container.
const A1_D_DCOS6_GW: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xb, 0, 0, 1, 0x8000, 0, 1);
const C1: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xb, 0, 0, 1, 0x8000, 0, 2);
/// The eBPF agent's containers: c2 on `dcos6`, c3 on `blue6`.
const C2: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xb, 0, 0, 2, 0, 0, 2);
const C3: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xc, 0, 0, 2, 0, 0, 2);
const C3_GW: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xc, 0, 0, 2, 0, 0, 1);

/// Configures `a1` as a DC/OS agent with the kernel datapath carrying `dcos` and `dcos6`, towards
/// the agent at `a2_ip`; its Docker container `c1_veth` on `d-dcos6`.
fn dcos_kernel_agent(a1: &Node, c1_veth: &str, a2_ip: Ipv4Addr) {
    let setup = || -> anyhow::Result<()> {
        dcos::add_vtep(a1, "44.128.0.1/20", A1_VTEP_MAC_S)?;
        dcos::add_vtep_ip6(a1, "fd01:a::1/64")?;
        // The IPv4 overlay's entries: its FDB entry is the one IPv6 frames use too.
        dcos::add_peer(
            a1,
            "44.128.0.2",
            A2_VTEP_MAC_S,
            &a2_ip.to_string(),
            "9.0.2.0/24",
        )?;
        dcos::add_peer6(a1, "fd01:a::2", A2_VTEP_MAC_S, A2_DCOS6)?;
        dcos::add_peer_route6(a1, "fd01:a::2", A2_BLUE6)?;
        dcos::add_bridge(a1, "d-dcos6", &[&format!("{A1_D_DCOS6_GW}/81")])?;
        a1.exec("ip", &["link", "set", c1_veth, "master", "d-dcos6", "up"])?;
        Ok(())
    };
    setup().unwrap_or_else(|e| panic!("configuring the kernel datapath on a1: {e:#}"));
}

/// An IPv6-only container on `agent` (a veth pair, MTU 1420): `addr/prefix_len` on its eth0, a
/// default route via `gateway` if given, and a link-local address (given explicitly: the lab's
/// veths come up without a usable one of the kernel's).
fn add_container6(
    lab: &mut Lab,
    agent: &str,
    addr: Ipv6Addr,
    prefix_len: u8,
    gateway: Option<Ipv6Addr>,
) -> Container {
    let node = lab.add_container_netns().unwrap();
    let agent_node = lab.node(agent).unwrap().clone();
    let host_veth = format!("v6{}", node.role);
    #[rustfmt::skip]
    agent_node.exec("ip", &["link", "add", &host_veth, "mtu", "1420", "type", "veth", "peer",
        "name", "eth0", "netns", &node.netns]).unwrap();
    agent_node
        .exec("ip", &["link", "set", &host_veth, "up"])
        .unwrap();
    // `mtu` above sets the host end only: the container's is DC/OS's container MTU too.
    node.exec("ip", &["link", "set", "eth0", "mtu", "1420", "up"])
        .unwrap();
    let n: u16 = node.role.trim_start_matches('c').parse().unwrap();
    let ll = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, n, 2);
    for cidr in [format!("{ll}/64"), format!("{addr}/{prefix_len}")] {
        #[rustfmt::skip]
        node.exec("ip", &["-6", "addr", "add", &cidr, "dev", "eth0", "nodad"]).unwrap();
    }
    if let Some(gw) = gateway {
        #[rustfmt::skip]
        node.exec("ip", &["-6", "route", "add", "default", "via", &gw.to_string(), "dev", "eth0"])
            .unwrap();
    }
    let c = Container {
        node,
        agent: agent.into(),
        host_veth,
        ifname: "eth0".into(),
    };
    lab.record_container(c.clone()).unwrap();
    c
}

/// The container's link-local address (see [`add_container6`]).
fn link_local(c: &Container) -> Ipv6Addr {
    let n: u16 = c.node.role.trim_start_matches('c').parse().unwrap();
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, n, 2)
}

/// Installs the eBPF datapath on `a2` as the agent would for the IPv6 networks `dcos6` and
/// `blue6` on the shared VNI: programs on eth0 and the containers' veths, both networks and
/// their subnets, `containers` (address, network) as endpoints under their global and
/// link-local addresses, the kernel agent a1 as a VTEP owning its `dcos6` and `blue6` blocks.
fn install_ebpf_agent(lab: &Lab, containers: &[(&Container, Ipv6Addr, u32)]) {
    let a2 = lab.node("a2").unwrap().clone();
    let a1_ip = lab.node("a1").unwrap().ip.unwrap();
    let settings = agent_settings(&a2, A2_VTEP_MAC);
    let mut endpoints = vec![];
    for (c, addr, network) in containers {
        let ep = Endpoint::container(
            a2.ifindex(&c.host_veth).unwrap(),
            *network,
            c.node.mac(&c.ifname).unwrap(),
            a2.mac(&c.host_veth).unwrap(),
        );
        endpoints.push((c.host_veth.clone(), *addr, link_local(c), ep));
    }
    let pins = lab_pins(lab, "a2");
    overlay_lab::in_netns(&a2, move || {
        let mut dp = overlay_agent::datapath::Datapath::load(pins)?;
        dp.attach("eth0", programs::FROM_UNDERLAY)?;
        for (veth, ..) in &endpoints {
            dp.attach(veth, programs::FROM_CONTAINER)?;
        }
        let m = dp.maps_mut();
        m.set_config(&settings)?;
        for network in [DCOS6, BLUE6] {
            m.put_network(network, Network::default())?;
        }
        m.put_vni(SHARED_VNI, WireVni::carrying(&[DCOS6, BLUE6]))?;
        m.put_subnet(DCOS6_SUBNET.parse()?, OverlaySubnet::new(DCOS6))?;
        m.put_subnet(BLUE6_SUBNET.parse()?, OverlaySubnet::new(BLUE6))?;
        for (_, addr, ll, ep) in endpoints {
            m.put_endpoint(IpAddr::V6(addr), ep)?;
            m.put_endpoint(IpAddr::V6(ll), ep)?;
        }
        m.put_vtep(IpAddr::V4(a1_ip), Vtep::new(A1_VTEP_MAC, [0; 4]))?;
        let a1 = addr16(IpAddr::V4(a1_ip));
        for (block, network) in [(A1_DCOS6, DCOS6), (A1_BLUE6, BLUE6)] {
            m.put_route(
                block.parse()?,
                RemoteRoute::new(a1, A1_VTEP_MAC, network, SHARED_VNI),
            )?;
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("installing the eBPF datapath on a2: {e:#}"));
}

fn maps(lab: &Lab) -> OverlayMaps {
    OverlayMaps::open_pinned(&lab_pins(lab, "a2")).unwrap()
}

fn stat(lab: &Lab, network: u32, counter: Counter) -> u64 {
    maps(lab).stat(network, counter).unwrap()
}

/// What both sides say, for failure messages.
fn diagnostics(lab: &Lab) -> String {
    let a1 = lab.node("a1").unwrap();
    let stats = maps(lab)
        .stats()
        .map(|s| format!("{s:?}"))
        .unwrap_or_else(|e| e.to_string());
    let show = |args: &[&str]| a1.exec("ip", args).unwrap_or_else(|e| e.to_string());
    format!(
        "a2 counters: {stats}\na1 vtep1024: {}\na1 neigh6: {}\na1 routes6: {}\na1 fdb: {}",
        show(&["-s", "-d", "link", "show", "vtep1024"]),
        show(&["-6", "neigh", "show"]),
        show(&["-6", "route", "show"]),
        a1.exec("bridge", &["fdb", "show", "dev", "vtep1024"])
            .unwrap_or_else(|e| e.to_string()),
    )
}

fn ping6(from: &Container, to: Ipv6Addr) -> bool {
    from.node
        .try_exec("ping", &["-6", "-c", "2", "-W", "2", "-q", &to.to_string()])
}

/// Sends `size` random bytes over TCP from `client` to `server_ip:port` where `server` listens;
/// returns the SHA-256 sums (sent, received) and the received length, or why the client failed.
fn tcp_transfer(
    server: &Node,
    client: &Node,
    server_ip: Ipv6Addr,
    port: u16,
    size: usize,
) -> Result<(String, String, u64), String> {
    let dir = tempfile::tempdir().unwrap();
    let recv = dir.path().join("received");
    let send = dir.path().join("sent");
    let mut listener = server.command("sh");
    listener
        .args([
            "-c",
            &format!("exec timeout 60 nc -6 -l -p {port} > {}", recv.display()),
        ])
        .stdin(Stdio::null());
    let mut listener = listener.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let sent = client.exec(
        "sh",
        &[
            "-c",
            &format!(
                "head -c {size} /dev/urandom > {s}; timeout 60 nc -N {server_ip} {port} < {s}",
                s = send.display()
            ),
        ],
    );
    if let Err(e) = sent {
        let _ = listener.kill();
        let _ = listener.wait();
        return Err(format!(
            "TCP {} -> [{server_ip}]:{port} failed: {e:#}",
            client.role
        ));
    }
    listener.wait().unwrap();
    let sum = |p: &std::path::Path| {
        overlay_lab::run("sha256sum", &[p.to_str().unwrap()])
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    let received_len = std::fs::metadata(&recv).map(|m| m.len()).unwrap_or(0);
    Ok((sum(&send), sum(&recv), received_len))
}

/// The VXLAN frames a1's kernel sends to a2 while `during` runs, as tcpdump decodes them on a2's
/// eth0 (`-T vxlan` for DC/OS's port 64000), inner headers included: the first two frames.
fn kernel_frames(lab: &Lab, during: impl FnOnce()) -> String {
    let a2 = lab.node("a2").unwrap().clone();
    let a1_ip = lab.node("a1").unwrap().ip.unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("frames.txt");
    let mut cmd = a2.command("sh");
    cmd.args([
        "-c",
        &format!(
            "exec timeout 20 tcpdump -l -nn -e -i eth0 -T vxlan -c 2 'udp dst port 64000 and src host {a1_ip}' > {} 2>/dev/null",
            out.display()
        ),
    ])
    .stdin(Stdio::null());
    let mut tcpdump = cmd.spawn().unwrap();
    // tcpdump needs a moment to open the socket; nothing to poll for.
    std::thread::sleep(Duration::from_millis(800));
    during();
    let _ = tcpdump.wait();
    std::fs::read_to_string(&out).unwrap_or_default()
}

#[test]
fn ebpf_agent_and_dcos_kernel_agent_exchange_ipv6() {
    let mut lab = Lab::up(LabSpec {
        agents: 2,
        id: None,
    })
    .unwrap();
    let c1 = add_container6(&mut lab, "a1", C1, 81, Some(A1_D_DCOS6_GW));
    // On-link for their network's whole subnet: the datapath answers their solicitations.
    let c2 = add_container6(&mut lab, "a2", C2, 64, None);
    // c3 reaches beyond its subnet through a gateway address (answered the same way).
    let c3 = add_container6(&mut lab, "a2", C3, 64, Some(C3_GW));
    let a1 = lab.node("a1").unwrap().clone();
    let a2 = lab.node("a2").unwrap().clone();
    dcos_kernel_agent(&a1, &c1.host_veth, a2.ip.unwrap());
    install_ebpf_agent(&lab, &[(&c2, C2, DCOS6), (&c3, C3, BLUE6)]);

    // What the kernel sends: the IPv6 packet in an inner frame from its VTEP MAC to ours (the
    // neighbour entry of our vtep_ip6), VNI 1024, to UDP 64000 at our IPv4 address (the FDB).
    let frames = kernel_frames(&lab, || {
        assert!(
            ping6(&c1, C2),
            "kernel-datapath container cannot ping6 the eBPF-datapath container\n{}",
            diagnostics(&lab)
        );
    });
    let a2_ip = a2.ip.unwrap().to_string();
    for want in [
        &format!("> {a2_ip}.64000: VXLAN, flags [I] (0x08), vni 1024"),
        &format!("{A1_VTEP_MAC_S} > {A2_VTEP_MAC_S}, ethertype IPv6 (0x86dd)"),
        &format!("{C1} > {C2}: ICMP6, echo request"),
    ] {
        assert!(
            frames.contains(want.as_str()),
            "{want:?} not in what the kernel VTEP sent:\n{frames}"
        );
    }
    assert!(
        !frames.contains("ICMP6, neighbor solicitation"),
        "the kernel solicited across the overlay (its neighbour entry is permanent):\n{frames}"
    );
    assert!(
        ping6(&c2, C1),
        "eBPF-datapath container cannot ping6 the kernel-datapath container\n{}",
        diagnostics(&lab)
    );
    assert!(
        stat(&lab, DCOS6, Counter::NdReplied) > 0,
        "c2's NS answered"
    );

    // TCP, both ways, large enough for GSO super-packets through both VTEPs.
    let (encap, decap) = (
        stat(&lab, DCOS6, Counter::Encapsulated),
        stat(&lab, DCOS6, Counter::Decapsulated),
    );
    for (what, server, client, server_ip, port) in [
        ("kernel -> eBPF", &c2.node, &c1.node, C2, 5001),
        ("eBPF -> kernel", &c1.node, &c2.node, C1, 5002),
    ] {
        let size = 16_000_000;
        let (sent, received, len) = tcp_transfer(server, client, server_ip, port, size)
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", diagnostics(&lab)));
        assert_eq!(
            len,
            size as u64,
            "{what}: bytes lost\n{}",
            diagnostics(&lab)
        );
        assert_eq!(sent, received, "{what}: payload corrupted (SHA-256)");
    }
    assert!(
        stat(&lab, DCOS6, Counter::Encapsulated) > encap + 100,
        "eBPF -> kernel did not go through encap\n{}",
        diagnostics(&lab)
    );
    assert!(
        stat(&lab, DCOS6, Counter::Decapsulated) > decap + 100,
        "kernel -> eBPF did not go through decap\n{}",
        diagnostics(&lab)
    );
    let vtep: serde_json::Value = serde_json::from_str(
        &a1.exec("ip", &["-s", "-j", "link", "show", "vtep1024"])
            .unwrap(),
    )
    .unwrap();
    for dir in ["rx", "tx"] {
        assert!(
            vtep[0]["stats64"][dir]["packets"].as_u64().unwrap_or(0) > 100,
            "vtep1024 {dir} counter: {vtep}"
        );
    }

    // dcos6 and blue6 share the VNI and a1 routes both to a2, yet stay apart: the kernel
    // container's packet to blue6 is dropped at decap (counted under its source's network), and
    // blue6's packet to the kernel container before it leaves a2.
    let drops = |n| stat(&lab, n, Counter::DropCrossNetwork);
    let (dcos6_drops, blue6_drops) = (drops(DCOS6), drops(BLUE6));
    let decapsulated = stat(&lab, BLUE6, Counter::Decapsulated);
    assert!(!ping6(&c1, C3), "dcos6 (kernel agent) reached blue6");
    assert!(
        drops(DCOS6) >= dcos6_drops + 2,
        "kernel -> blue6 not dropped as cross-network\n{}",
        diagnostics(&lab)
    );
    assert_eq!(stat(&lab, BLUE6, Counter::Decapsulated), decapsulated);
    let encapsulated = stat(&lab, BLUE6, Counter::Encapsulated);
    assert!(!ping6(&c3, C1), "blue6 reached dcos6 on the kernel agent");
    assert!(
        drops(BLUE6) > blue6_drops,
        "blue6 -> kernel container not dropped as cross-network\n{}",
        diagnostics(&lab)
    );
    assert_eq!(stat(&lab, BLUE6, Counter::Encapsulated), encapsulated);
    drop(lab);
}
