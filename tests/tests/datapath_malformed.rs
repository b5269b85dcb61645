//! Malformed and unwelcome VXLAN on the wire: sent from the lab's external host to an agent running
//! the datapath, dropped and counted by reason, never reaching the container; the agent's own
//! traffic (other UDP ports, ping) is untouched.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use overlay_common::{
    counters::{Counter, NO_NETWORK},
    maps::{RemoteRoute, Vtep},
};
use overlay_datapath::{OverlayMaps, addr16};
use overlay_lab::{Lab, Node};
use overlay_tests::fixtures::{LabExt, lab};
use overlay_tests::{install_datapath, lab_pins, support_packets::*};

const VNI: u32 = 1024;
const A2_VTEP_MAC: [u8; 6] = [0x70, 0xb3, 0xd5, 0x80, 0, 2];
const EXT_VTEP_MAC: [u8; 6] = [0x70, 0xb3, 0xd5, 0x80, 0, 0xfe];
/// The subnet the external host "owns" once it is registered as an agent.
const EXT_SUBNET: &str = "9.0.250.0/24";
const EXT_INNER_SRC: Ipv4Addr = Ipv4Addr::new(9, 0, 250, 5);

/// Received-packet counter of `ifname` in `node`'s namespace (`ip -s -j link show`).
fn rx_packets(node: &Node, ifname: &str) -> u64 {
    let out = overlay_lab::run(
        "ip",
        &["-n", &node.netns, "-s", "-j", "link", "show", ifname],
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no rx counter for {ifname}: {out}"))
}

fn stat(lab: &Lab, vni: u32, counter: Counter) -> u64 {
    OverlayMaps::open_pinned(&lab_pins(lab, "a2"))
        .unwrap()
        .stat(vni, counter)
        .unwrap()
}

fn all_stats(lab: &Lab) -> String {
    format!(
        "{:?}",
        OverlayMaps::open_pinned(&lab_pins(lab, "a2"))
            .unwrap()
            .stats()
            .unwrap()
    )
}

/// Waits until `counter` of `vni` on a2 reaches `want` (packets cross the fabric asynchronously).
fn wait_for_stat(lab: &Lab, vni: u32, counter: Counter, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = stat(lab, vni, counter);
        if now >= want || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn malformed_vxlan_from_the_wire_is_dropped_and_counted() {
    let mut lab = lab(2);
    let c = lab.container("a2", "9.0.2.2/24");
    let a2 = lab.node("a2").unwrap().clone();
    let ext = lab.external().clone();
    let a2_ip = a2.ip.unwrap();
    let ext_ip = ext.ip.unwrap();
    // Quiet the container link: no IPv6 autoconfiguration chatter from the host-side veth, so its
    // rx counter only moves for what the datapath delivers.
    a2.exec(
        "sysctl",
        &[
            "-qw",
            &format!("net.ipv6.conf.{}.disable_ipv6=1", c.host_veth),
        ],
    )
    .unwrap();
    c.node
        .exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])
        .unwrap();

    install_datapath(&lab, "a2", A2_VTEP_MAC, VNI, Some("9.0.0.0/8"), &[&c], &[]).unwrap();

    let good = VxlanFrame {
        outer_src: ext_ip,
        outer_dst: a2_ip,
        src_port: 0, // the socket picks it
        dst_port: VXLAN_PORT,
        flags: 0x08,
        vni: VNI,
        inner_dst_mac: A2_VTEP_MAC,
        inner_src_mac: EXT_VTEP_MAC,
        inner_ip: ping_packet(EXT_INNER_SRC, c.node.ip.unwrap(), 56),
    };
    let rx_before = rx_packets(&c.node, "eth0");

    // 1. The external host is no agent: its VXLAN is refused however well-formed.
    send_udp(
        &ext,
        a2_ip,
        VXLAN_PORT,
        &[good.udp_payload(), good.udp_payload()],
    )
    .unwrap();
    assert_eq!(
        wait_for_stat(&lab, NO_NETWORK, Counter::DropUnknownVtep, 2),
        2,
        "drop_unknown_vtep; counters {}",
        all_stats(&lab)
    );

    // 2. Registered as an agent (a known VTEP owning a subnet), its malformed VXLAN is still
    // refused, each for its reason.
    let ext_route = (
        EXT_SUBNET.parse().unwrap(),
        RemoteRoute::new(addr16(IpAddr::V4(ext_ip)), EXT_VTEP_MAC, VNI, VNI),
    );
    {
        let mut m = OverlayMaps::open_pinned(&lab_pins(&lab, "a2")).unwrap();
        m.put_vtep(IpAddr::V4(ext_ip), Vtep::new(EXT_VTEP_MAC, [0; 4]))
            .unwrap();
        m.put_route(ext_route.0, ext_route.1).unwrap();
    }
    let bad_flags = VxlanFrame {
        flags: 0x0c,
        ..good.clone()
    };
    let unknown_vni = VxlanFrame {
        vni: 4242,
        ..good.clone()
    };
    // Cut after the UDP header: an empty datagram to the VXLAN port.
    let truncated: Vec<u8> = vec![];
    // Cut inside the inner IPv4 header.
    let cut_inner = good.udp_payload()[..8 + 14 + 10].to_vec();
    send_udp(
        &ext,
        a2_ip,
        VXLAN_PORT,
        &[
            bad_flags.udp_payload(),
            unknown_vni.udp_payload(),
            truncated,
            cut_inner,
        ],
    )
    .unwrap();
    for (counter, want) in [
        (Counter::DropBadVxlanFlags, 1),
        (Counter::DropUnknownVni, 1),
        (Counter::DropTruncated, 2),
    ] {
        assert_eq!(
            wait_for_stat(&lab, NO_NETWORK, counter, want),
            want,
            "{}; counters {}",
            counter.name(),
            all_stats(&lab)
        );
    }
    assert_eq!(stat(&lab, VNI, Counter::Decapsulated), 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        rx_packets(&c.node, "eth0"),
        rx_before,
        "a dropped packet reached the container"
    );

    // Control: the same path does deliver a well-formed frame, and the rx counter sees it.
    send_udp(&ext, a2_ip, VXLAN_PORT, &[good.udp_payload()]).unwrap();
    assert_eq!(
        wait_for_stat(&lab, VNI, Counter::Decapsulated, 1),
        1,
        "the well-formed frame was not decapsulated; counters {}",
        all_stats(&lab)
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while rx_packets(&c.node, "eth0") == rx_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        rx_packets(&c.node, "eth0") > rx_before,
        "the delivered frame did not show in the container's rx counter"
    );

    // 3. The agent's own traffic is untouched: UDP to another port, and ping.
    let recv = a2
        .command("python3")
        .args([
            "-c",
            "import socket, sys\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.bind(('0.0.0.0', 6000)); s.settimeout(5)\n\
             print(s.recvfrom(2048)[0].hex(), flush=True)\n",
        ])
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let payload = good.udp_payload(); // VXLAN-looking bytes, but not on the VXLAN port
    send_udp(&ext, a2_ip, 6000, &[payload.clone()]).unwrap();
    let out = recv.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        hex(&payload),
        "UDP to port 6000 did not arrive intact"
    );
    assert!(ext.ping(a2_ip), "ping from the external host to a2 failed");
    assert!(a2.ping(ext_ip), "ping from a2 to the external host failed");
    assert_eq!(
        stat(&lab, VNI, Counter::Decapsulated),
        1,
        "host traffic taken for VXLAN"
    );
    drop(lab);
}
