//! DC/OS wire compatibility: an agent on the eBPF datapath talks to an agent on DC/OS's kernel
//! datapath (Linux bridge `m-dcos`, VXLAN device `vtep1024` on port 64000, static neighbour and
//! FDB entries, a route via the peer's VTEP IP), TCP both ways, payload intact.

use std::{net::Ipv4Addr, process::Stdio, time::Duration};

use overlay_common::counters::Counter;
use overlay_datapath::OverlayMaps;
use overlay_lab::{Lab, LabSpec, Node, dcos};
use overlay_tests::{PeerAgent, install_datapath, lab_pins};

const VNI: u32 = 1024;
const A1_VTEP_MAC: [u8; 6] = [0x70, 0xb3, 0xd5, 0x80, 0, 1];
const A1_VTEP_MAC_S: &str = "70:b3:d5:80:00:01";
const A2_VTEP_MAC: [u8; 6] = [0x70, 0xb3, 0xd5, 0x80, 0, 2];
const A2_VTEP_MAC_S: &str = "70:b3:d5:80:00:02";
const A1_SUBNET: &str = "9.0.1.0/24";
const A2_SUBNET: &str = "9.0.2.0/24";

/// Configures `a1` as a DC/OS agent with the kernel datapath, its container `c1_veth` on the
/// bridge, towards a2 at `a2_ip`.
fn dcos_kernel_agent(a1: &Node, c1_veth: &str, a2_ip: Ipv4Addr) {
    let setup = || -> anyhow::Result<()> {
        a1.exec("ip", &["link", "add", "m-dcos", "type", "bridge"])?;
        a1.exec("ip", &["addr", "add", "9.0.1.1/24", "dev", "m-dcos"])?;
        a1.exec("ip", &["link", "set", "m-dcos", "up"])?;
        a1.exec("ip", &["link", "set", c1_veth, "master", "m-dcos", "up"])?;
        dcos::add_vtep(a1, "44.128.0.1/20", A1_VTEP_MAC_S)?;
        dcos::add_peer(
            a1,
            "44.128.0.2",
            A2_VTEP_MAC_S,
            &a2_ip.to_string(),
            A2_SUBNET,
        )?;
        a1.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        Ok(())
    };
    setup().unwrap_or_else(|e| panic!("configuring the kernel datapath on a1: {e:#}"));
}

/// What the kernel side and our counters say, for failure messages.
fn diagnostics(lab: &Lab, a1: &Node) -> String {
    let stats = OverlayMaps::open_pinned(&lab_pins(lab, "a2"))
        .and_then(|m| m.stats())
        .map(|s| format!("{s:?}"))
        .unwrap_or_else(|e| e.to_string());
    let vtep = a1
        .exec("ip", &["-s", "-d", "link", "show", "vtep1024"])
        .unwrap_or_else(|e| e.to_string());
    let neigh = a1
        .exec("ip", &["neigh", "show", "dev", "vtep1024"])
        .unwrap_or_else(|e| e.to_string());
    let fdb = a1
        .exec("bridge", &["fdb", "show", "dev", "vtep1024"])
        .unwrap_or_else(|e| e.to_string());
    format!("a2 counters: {stats}\na1 vtep1024:\n{vtep}\nneigh: {neigh}\nfdb: {fdb}")
}

fn stat(lab: &Lab, counter: Counter) -> u64 {
    OverlayMaps::open_pinned(&lab_pins(lab, "a2"))
        .unwrap()
        .stat(VNI, counter)
        .unwrap()
}

/// Sends `size` random bytes over TCP from `client` to `server_ip:port` where `server` listens;
/// returns (sent, received).
fn tcp_transfer(
    server: &Node,
    client: &Node,
    server_ip: Ipv4Addr,
    port: u16,
    size: usize,
) -> (Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let recv = dir.path().join("received");
    let send = dir.path().join("sent");
    let mut listener = server.command("sh");
    listener
        .args([
            "-c",
            &format!("exec timeout 60 nc -l -p {port} > {}", recv.display()),
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
        panic!(
            "TCP client {} -> {server_ip}:{port} failed: {e:#}",
            client.role
        );
    }
    listener.wait().unwrap();
    (
        std::fs::read(&send).unwrap(),
        std::fs::read(&recv).unwrap_or_default(),
    )
}

#[test]
fn ebpf_agent_and_dcos_kernel_agent_exchange_tcp() {
    let mut lab = Lab::up(LabSpec {
        agents: 2,
        id: None,
    })
    .unwrap();
    let c1 = lab
        .add_container(
            "a1",
            Ipv4Addr::new(9, 0, 1, 2),
            24,
            Ipv4Addr::new(9, 0, 1, 1),
            1420,
        )
        .unwrap();
    let c2 = lab
        .add_container(
            "a2",
            Ipv4Addr::new(9, 0, 2, 2),
            24,
            Ipv4Addr::new(9, 0, 2, 1),
            1420,
        )
        .unwrap();
    let a1 = lab.node("a1").unwrap().clone();
    let a2 = lab.node("a2").unwrap().clone();
    let a1_ip = a1.ip.unwrap();

    // a1: DC/OS's kernel datapath.
    dcos_kernel_agent(&a1, &c1.host_veth, a2.ip.unwrap());

    // a2: the eBPF datapath, with a1 as a known agent owning a1's container subnet.
    let a1_peer = PeerAgent {
        underlay_ip: a1_ip,
        vtep_mac: A1_VTEP_MAC,
        subnet: A1_SUBNET,
    };
    install_datapath(
        &lab,
        "a2",
        A2_VTEP_MAC,
        VNI,
        Some("9.0.0.0/8"),
        &[&c2],
        &[a1_peer],
    )
    .unwrap();

    let (c1_ip, c2_ip) = (c1.node.ip.unwrap(), c2.node.ip.unwrap());
    assert!(
        c1.node.ping(c2_ip),
        "kernel-datapath container cannot ping the eBPF-datapath container\n{}",
        diagnostics(&lab, &a1)
    );
    assert!(
        c2.node.ping(c1_ip),
        "eBPF-datapath container cannot ping the kernel-datapath container\n{}",
        diagnostics(&lab, &a1)
    );

    // TCP, both ways, large enough for GSO super-packets through both VTEPs.
    for (what, server, client, server_ip, port) in [
        ("kernel -> eBPF", &c2.node, &c1.node, c2_ip, 5001),
        ("eBPF -> kernel", &c1.node, &c2.node, c1_ip, 5002),
    ] {
        let (sent, received) = tcp_transfer(server, client, server_ip, port, 8_000_000);
        assert_eq!(
            received.len(),
            sent.len(),
            "{what}: bytes lost\n{}",
            diagnostics(&lab, &a1)
        );
        assert!(received == sent, "{what}: payload corrupted");
    }

    // Both directions took the datapath's VXLAN paths, and the kernel VTEP carried them.
    assert!(
        stat(&lab, Counter::Encapsulated) > 100,
        "eBPF -> kernel did not go through encap\n{}",
        diagnostics(&lab, &a1)
    );
    assert!(
        stat(&lab, Counter::Decapsulated) > 100,
        "kernel -> eBPF did not go through decap\n{}",
        diagnostics(&lab, &a1)
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
    drop(lab);
}
