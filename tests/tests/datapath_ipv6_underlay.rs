//! The IPv6 underlay, run by the kernel on packets we build (`BPF_PROG_TEST_RUN`): an agent whose
//! underlay address is IPv6 encapsulates inner IPv4 and inner IPv6 in outer IPv6/UDP/VXLAN,
//! byte for byte; decapsulates outer-IPv6 VXLAN from a known VTEP; and drops malformed outer
//! IPv6 VXLAN counted by reason, in TC and (the same reasons) early in XDP. Everything else on
//! the wire (IPv4, other ports, other destinations) is the host's.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

use overlay_agent::datapath::Datapath;
use overlay_common::{
    counters::{Counter, NO_NETWORK},
    maps::{Endpoint, Network, OverlaySubnet, RemoteRoute, Vtep, WireVni, programs},
};
use overlay_datapath::{AgentSettings, PinLayout, addr16};
use overlay_tests::support_packets::*;
use overlay_tests::test_run::TestRun as _;

const VNI_A: u32 = 1024;
const VNI_B: u32 = 2048;
const LOOPBACK: u32 = 1;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const LOCAL6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, 0x11);
const LOCAL_VTEP_MAC: [u8; 6] = [0x70, 0xb3, 0xd5, 0x80, 0, 1];
/// Agent R, on the IPv6 underlay: owns 9.0.2.0/24 and fd01:a:0:2::/64 of network A.
const R6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, 0x12);
const R_VTEP_MAC: [u8; 6] = [0x70, 0xb3, 0xd5, 0x80, 0, 2];
/// Agent S, known by an IPv4 underlay address (a mixed cluster): owns 9.0.3.0/24.
const S4: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 13);
const S_VTEP_MAC: [u8; 6] = [0x70, 0xb3, 0xd5, 0x80, 0, 3];
/// Not an agent.
const STRANGER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, 0x99);

/// EP_A (9.0.1.2 and fd01:a:0:1::2) sends from the test-run skb's device; EP_B is on network B.
const EP_A: Ipv4Addr = Ipv4Addr::new(9, 0, 1, 2);
const EP_A6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xa, 0, 1, 0, 0, 0, 2);
const EP_A_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
const EP_A_GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const EP_B: Ipv4Addr = Ipv4Addr::new(9, 1, 1, 2);
const R_A: Ipv4Addr = Ipv4Addr::new(9, 0, 2, 2);
const R_A6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xa, 0, 2, 0, 0, 0, 5);

struct Fixture {
    dp: Datapath,
    pins: PinLayout,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Err(e) = self.pins.remove_all() {
            eprintln!("removing test pins: {e:#}");
        }
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Fixture {
    fn new() -> Fixture {
        overlay_lab::ensure_bpffs().unwrap();
        let instance = format!(
            "testrun6u-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let pins = PinLayout::new(Path::new(overlay_lab::BPFFS), &instance).unwrap();
        let mut dp = Datapath::load(pins.clone()).unwrap();
        let m = dp.maps_mut();
        m.set_config(&AgentSettings {
            underlay_ip: IpAddr::V6(LOCAL6),
            underlay_ifindex: LOOPBACK,
            vtep_mac: LOCAL_VTEP_MAC,
            vxlan_port: VXLAN_PORT,
            overlay_mtu: 1420,
            spare_headroom: false,
        })
        .unwrap();
        for vni in [VNI_A, VNI_B] {
            m.put_network(vni, Network::default()).unwrap();
            // Each network on a VNI of its own (the per-network option).
            m.put_vni(vni, WireVni::carrying(&[vni])).unwrap();
        }
        for (subnet, vni) in [
            ("9.0.0.0/16", VNI_A),
            ("9.1.0.0/16", VNI_B),
            ("fd01:a::/48", VNI_A),
        ] {
            m.put_subnet(subnet.parse().unwrap(), OverlaySubnet::new(vni))
                .unwrap();
        }
        let ep_a = Endpoint::container(LOOPBACK, VNI_A, EP_A_MAC, EP_A_GW_MAC);
        m.put_endpoint(IpAddr::V4(EP_A), ep_a).unwrap();
        m.put_endpoint(IpAddr::V6(EP_A6), ep_a).unwrap();
        m.put_endpoint(
            IpAddr::V4(EP_B),
            Endpoint::container(78, VNI_B, [2, 0, 0, 0, 2, 2], [2, 0, 0, 0, 2, 1]),
        )
        .unwrap();
        m.put_vtep(IpAddr::V6(R6), Vtep::new(R_VTEP_MAC, [0; 4]))
            .unwrap();
        m.put_vtep(IpAddr::V4(S4), Vtep::new(S_VTEP_MAC, [0; 4]))
            .unwrap();
        for (subnet, underlay, mac) in [
            ("9.0.2.0/24", IpAddr::V6(R6), R_VTEP_MAC),
            ("fd01:a:0:2::/64", IpAddr::V6(R6), R_VTEP_MAC),
            ("9.0.3.0/24", IpAddr::V4(S4), S_VTEP_MAC),
        ] {
            m.put_route(
                subnet.parse().unwrap(),
                RemoteRoute::new(addr16(underlay), mac, VNI_A, VNI_A),
            )
            .unwrap();
        }
        Fixture { dp, pins }
    }

    fn run(&self, program: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        self.dp.run(program, packet)
    }

    fn stat(&self, network: u32, counter: Counter) -> u64 {
        self.dp.stat(network, counter)
    }

    fn total_packets(&self) -> u64 {
        self.dp.total_packets()
    }

    /// Runs `program` on `packet` and expects `verdict` with exactly one count, under
    /// `(vni, counter)` (and, for XDP drops, `xdp_dropped`).
    fn expect_drop(&self, what: &str, program: &str, packet: &[u8], verdict: u32, c: Counter) {
        let also = u64::from(program == programs::XDP_UNDERLAY);
        self.dp
            .expect_counted_once(what, program, packet, verdict, NO_NETWORK, c, also);
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// An outer Ethernet/IPv6/UDP/VXLAN frame from `src` to `dst` (UDP checksum 0, RFC 6935), the
/// inner frame from R's VTEP MAC to ours.
fn vxlan6_frame(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    src_port: u16,
    flags: u8,
    vni: u32,
    inner_ethertype: u16,
    inner: &[u8],
) -> Vec<u8> {
    let inner_frame = eth(LOCAL_VTEP_MAC, R_VTEP_MAC, inner_ethertype, inner);
    let u = udp(src_port, VXLAN_PORT, &vxlan(flags, vni, &inner_frame));
    eth(
        [0x02, 0, 0, 0, 0xee, 0x01],
        [0x02, 0, 0, 0, 0xee, 0x02],
        ETH_P_IPV6,
        &ipv6(src, dst, IPPROTO_UDP, 64, &u),
    )
}

/// What our encapsulation of `inner` (of `inner_ethertype`) towards R must be, given the source
/// port and flow label it picked: written out field by field, independently of the datapath's
/// own header builder.
fn expected_encap6(inner_ethertype: u16, inner: &[u8], sport: u16, label: u32) -> Vec<u8> {
    let mut f = vec![0u8; 12]; // outer MACs: left to bpf_redirect_neigh
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    let payload = (8 + 8 + 14 + inner.len()) as u16;
    f.extend_from_slice(&[0x60, (label >> 16) as u8, (label >> 8) as u8, label as u8]);
    f.extend_from_slice(&payload.to_be_bytes());
    f.extend_from_slice(&[IPPROTO_UDP, 64]);
    f.extend_from_slice(&LOCAL6.octets());
    f.extend_from_slice(&R6.octets());
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&VXLAN_PORT.to_be_bytes());
    f.extend_from_slice(&payload.to_be_bytes());
    f.extend_from_slice(&[0, 0]); // zero checksum (RFC 6935/6936)
    f.extend_from_slice(&[0x08, 0, 0, 0, 0x00, 0x04, 0x00, 0]); // VNI 1024
    f.extend_from_slice(&R_VTEP_MAC);
    f.extend_from_slice(&LOCAL_VTEP_MAC);
    f.extend_from_slice(&inner_ethertype.to_be_bytes());
    f.extend_from_slice(inner);
    f
}

/// Runs the container's frame through `from_container` and checks the outer-IPv6 encapsulation
/// byte for byte; returns (source port, flow label).
fn check_encap6(f: &Fixture, inner_ethertype: u16, inner: &[u8]) -> (u16, u32) {
    let input = eth(EP_A_GW_MAC, EP_A_MAC, inner_ethertype, inner);
    let (verdict, out) = f.run(programs::FROM_CONTAINER, &input);
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "encap verdict; counters {:?}",
        f.dp.maps().stats().unwrap()
    );
    assert_eq!(out.len(), input.len() + 70, "VXLAN over IPv6 adds 70 bytes");
    let sport = u16_at(&out, 54);
    let label = u32::from_be_bytes([0, out[15] & 0x0f, out[16], out[17]]);
    assert!((32768..=60999).contains(&sport), "source port {sport}");
    assert_ne!(label, 0, "flow label carries the flow's entropy");
    let want = expected_encap6(inner_ethertype, inner, sport, label);
    assert!(
        out == want,
        "outer IPv6 encapsulation differs:\n got  {}\n want {}",
        hex(&out),
        hex(&want)
    );
    // The same flow keeps its port and label (no reordering across ECMP paths).
    let (_, again) = f.run(programs::FROM_CONTAINER, &input);
    assert!(again == out, "not stable per flow");
    (sport, label)
}

#[test]
fn encap_over_ipv6_is_byte_exact_for_both_inner_families() {
    let f = Fixture::new();
    check_encap6(&f, ETH_P_IP, &ping_packet(EP_A, R_A, 56));
    assert_eq!(f.stat(VNI_A, Counter::Encapsulated), 2);
    check_encap6(&f, ETH_P_IPV6, &ping6_packet(EP_A6, R_A6, 56));
    assert_eq!(f.stat(VNI_A, Counter::Encapsulated), 4);
    // Another flow gets other entropy.
    let syn = |sport| ipv4(EP_A, R_A, IPPROTO_TCP, &tcp_syn(EP_A, R_A, sport, 80));
    let (p1, l1) = check_encap6(&f, ETH_P_IP, &syn(40001));
    let (p2, l2) = check_encap6(&f, ETH_P_IP, &syn(40002));
    assert!(p1 != p2 || l1 != l2, "two flows, one source port and label");

    // The overlay MTU is the inner packet's limit whatever the underlay: 1420 goes out in 1490
    // bytes of outer IPv6, 1421 with DF does not.
    let largest = ping_packet(EP_A, R_A, 1420 - 28);
    assert_eq!(largest.len(), 1420);
    let (verdict, out) = f.run(
        programs::FROM_CONTAINER,
        &eth(EP_A_GW_MAC, EP_A_MAC, ETH_P_IP, &largest),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT, "1420 bytes fit");
    assert_eq!(out.len() - 14, 1490);
    let mut too_big = ping_packet(EP_A, R_A, 1421 - 28);
    too_big[6] = 0x40; // DF
    too_big[10..12].copy_from_slice(&[0, 0]);
    let c = inet_checksum(&too_big[..20]);
    too_big[10..12].copy_from_slice(&c.to_be_bytes());
    let before = f.stat(VNI_A, Counter::DropTooBig);
    f.run(
        programs::FROM_CONTAINER,
        &eth(EP_A_GW_MAC, EP_A_MAC, ETH_P_IP, &too_big),
    );
    assert_eq!(f.stat(VNI_A, Counter::DropTooBig), before + 1);

    // A VTEP known by an IPv4 address cannot be reached from an IPv6 underlay.
    let before = f.stat(VNI_A, Counter::DropUnderlayFamily);
    let (verdict, _) = f.run(
        programs::FROM_CONTAINER,
        &eth(
            EP_A_GW_MAC,
            EP_A_MAC,
            ETH_P_IP,
            &ping_packet(EP_A, Ipv4Addr::new(9, 0, 3, 3), 8),
        ),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(f.stat(VNI_A, Counter::DropUnderlayFamily), before + 1);
}

#[test]
fn decap_of_outer_ipv6_delivers_both_inner_families_byte_for_byte() {
    let f = Fixture::new();
    let inner = ping_packet(R_A, EP_A, 56);
    let input = vxlan6_frame(R6, LOCAL6, 51234, 0x08, VNI_A, ETH_P_IP, &inner);
    // XDP lets it on to TC.
    assert_eq!(f.run(programs::XDP_UNDERLAY, &input).0, XDP_PASS);
    let (verdict, out) = f.run(programs::FROM_UNDERLAY, &input);
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "decap; counters {:?}",
        f.dp.maps().stats().unwrap()
    );
    let want = eth(EP_A_MAC, EP_A_GW_MAC, ETH_P_IP, &inner);
    assert_eq!(out.len(), input.len() - 70);
    assert!(
        out == want,
        "decapsulated frame differs:\n got  {}\n want {}",
        hex(&out),
        hex(&want)
    );
    assert_eq!(f.stat(VNI_A, Counter::Decapsulated), 1);

    let inner6 = ping6_packet(R_A6, EP_A6, 56);
    let input = vxlan6_frame(R6, LOCAL6, 51234, 0x08, VNI_A, ETH_P_IPV6, &inner6);
    let (verdict, out) = f.run(programs::FROM_UNDERLAY, &input);
    assert_eq!(verdict, TC_ACT_REDIRECT, "decap of inner IPv6");
    let want = eth(EP_A_MAC, EP_A_GW_MAC, ETH_P_IPV6, &inner6);
    assert!(
        out == want,
        "decapsulated IPv6 differs:\n got  {}\n want {}",
        hex(&out),
        hex(&want)
    );
    assert_eq!(f.stat(VNI_A, Counter::Decapsulated), 2);

    // Isolation still holds behind the outer IPv6: R's address on network A to a network-B
    // endpoint is dropped.
    let cross = vxlan6_frame(
        R6,
        LOCAL6,
        51234,
        0x08,
        VNI_A,
        ETH_P_IP,
        &ping_packet(R_A, EP_B, 8),
    );
    let before = f.stat(VNI_A, Counter::DropCrossNetwork);
    assert_eq!(f.run(programs::FROM_UNDERLAY, &cross).0, TC_ACT_SHOT);
    assert_eq!(f.stat(VNI_A, Counter::DropCrossNetwork), before + 1);
}

#[test]
fn malformed_outer_ipv6_vxlan_is_dropped_by_reason_in_tc_and_xdp() {
    let f = Fixture::new();
    let inner = ping_packet(R_A, EP_A, 56);
    let good = vxlan6_frame(R6, LOCAL6, 51234, 0x08, VNI_A, ETH_P_IP, &inner);

    let stranger = vxlan6_frame(STRANGER6, LOCAL6, 51234, 0x08, VNI_A, ETH_P_IP, &inner);
    let unknown_vni = vxlan6_frame(R6, LOCAL6, 51234, 0x08, 4096, ETH_P_IP, &inner);
    let bad_flags = vxlan6_frame(R6, LOCAL6, 51234, 0x88, VNI_A, ETH_P_IP, &inner);
    // The IPv6 payload length claims more than the frame holds.
    let mut cut = good.clone();
    let claimed = u16_at(&cut, 18) + 10;
    cut[18..20].copy_from_slice(&claimed.to_be_bytes());
    cut[58..60].copy_from_slice(&claimed.to_be_bytes());
    // UDP shorter than the IPv6 payload: inconsistent.
    let mut short_udp = good.clone();
    let less = u16_at(&short_udp, 58) - 4;
    short_udp[58..60].copy_from_slice(&less.to_be_bytes());
    // UDP longer than the IPv6 payload.
    let mut long_udp = good.clone();
    let more = u16_at(&long_udp, 58) + 4;
    long_udp[58..60].copy_from_slice(&more.to_be_bytes());
    // Room for VXLAN and an inner Ethernet header, not for an inner IP header.
    let stub = {
        let u = udp(51234, VXLAN_PORT, &vxlan(0x08, VNI_A, &[0u8; 14 + 10]));
        eth(
            [2; 6],
            [4; 6],
            ETH_P_IPV6,
            &ipv6(R6, LOCAL6, IPPROTO_UDP, 64, &u),
        )
    };
    for (what, frame, reason) in [
        ("unknown VTEP", &stranger, Counter::DropUnknownVtep),
        ("unknown VNI", &unknown_vni, Counter::DropUnknownVni),
        ("bad VXLAN flags", &bad_flags, Counter::DropBadVxlanFlags),
        (
            "payload length past the frame",
            &cut,
            Counter::DropTruncated,
        ),
        (
            "UDP shorter than the payload",
            &short_udp,
            Counter::DropMalformed,
        ),
        (
            "UDP longer than the payload",
            &long_udp,
            Counter::DropTruncated,
        ),
        ("no room for an inner packet", &stub, Counter::DropTruncated),
    ] {
        f.expect_drop(what, programs::FROM_UNDERLAY, frame, TC_ACT_SHOT, reason);
        f.expect_drop(what, programs::XDP_UNDERLAY, frame, XDP_DROP, reason);
    }
    assert!(f.stat(NO_NETWORK, Counter::XdpDropped) >= 7);

    // Not VXLAN to us: the host's, untouched and uncounted.
    let to_other = vxlan6_frame(R6, STRANGER6, 51234, 0x08, VNI_A, ETH_P_IP, &inner);
    let other_port = {
        let mut p = good.clone();
        p[56..58].copy_from_slice(&4789u16.to_be_bytes());
        p
    };
    let outer_ipv4 = VxlanFrame {
        outer_src: Ipv4Addr::new(10, 250, 0, 12),
        outer_dst: Ipv4Addr::new(10, 250, 0, 11),
        src_port: 51234,
        dst_port: VXLAN_PORT,
        flags: 0x08,
        vni: VNI_A,
        inner_dst_mac: LOCAL_VTEP_MAC,
        inner_src_mac: R_VTEP_MAC,
        inner_ip: inner.clone(),
    }
    .frame();
    let host_udp6 = eth(
        [2; 6],
        [4; 6],
        ETH_P_IPV6,
        &ipv6(R6, LOCAL6, IPPROTO_UDP, 64, &udp(5353, 5353, b"hello")),
    );
    for (what, frame) in [
        ("to another address", &to_other),
        ("another port", &other_port),
        ("outer IPv4 on an IPv6 underlay", &outer_ipv4),
        ("the host's own UDP", &host_udp6),
    ] {
        let total = f.total_packets();
        let (verdict, out) = f.run(programs::FROM_UNDERLAY, frame);
        assert_eq!(verdict, TC_ACT_OK, "{what}");
        assert!(out == *frame, "{what}: altered");
        assert_eq!(f.run(programs::XDP_UNDERLAY, frame).0, XDP_PASS, "{what}");
        assert_eq!(f.total_packets(), total, "{what}: counted");
    }
}
