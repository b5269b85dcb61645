//! The real programs run by the kernel on packets we build, byte for byte (`BPF_PROG_TEST_RUN`):
//! no interfaces, no namespaces, the maps filled through the façade as the agent fills them.
//!
//! The kernel gives a test-run program an skb on the caller's loopback (ifindex 1): endpoints
//! that send in these tests are attached to ifindex 1, so the anti-spoofing check sees them on
//! their own veth.
//!
//! Networks A and B have network ids `VNI_A` and `VNI_B`. [`Fixture::new`] gives each its own VNI
//! on the wire (the per-network `vni` option: A's is 1024, B's 2048); [`Fixture::shared`] puts
//! both on VNI 1024, DC/OS's scheme and the default, where only the addresses tell them apart.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

use overlay_agent::datapath::Datapath;
use overlay_common::{
    counters::{Counter, NO_NETWORK},
    maps::{
        AgentConfig, Endpoint, HOST_LINK_PEER_MAC, Network, OverlaySubnet, RemoteRoute, SHARED_VNI,
        Vtep, WireVni, programs,
    },
};
use overlay_datapath::{AgentSettings, PinLayout, addr16};
use overlay_tests::support_packets::*;
use overlay_tests::test_run::TestRun as _;

const VNI_A: u32 = 1024;
const VNI_B: u32 = 2048;
const VNI_UNKNOWN: u32 = 4096;
const LOOPBACK: u32 = 1;

const LOCAL_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 11);
const LOCAL_VTEP_MAC: [u8; 6] = [0x70, 0xb3, 0xd5, 0x80, 0, 1];
/// Agent R: owns 9.0.2.0/24 (network A) and 9.1.2.0/24 (network B).
const R_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 12);
const R_VTEP_MAC: [u8; 6] = [0x70, 0xb3, 0xd5, 0x80, 0, 2];
/// Agent S: owns 9.0.3.0/24 (network A).
const S_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 13);
const S_VTEP_MAC: [u8; 6] = [0x70, 0xb3, 0xd5, 0x80, 0, 3];
/// Not an agent.
const STRANGER_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 99);

/// Local endpoints.
struct Ep {
    ip: Ipv4Addr,
    vni: u32,
    ifindex: u32,
    mac: [u8; 6],
    gw_mac: [u8; 6],
}

/// Container on network A, sending from the test-run skb's device.
const EP_A: Ep = Ep {
    ip: Ipv4Addr::new(9, 0, 1, 2),
    vni: VNI_A,
    ifindex: LOOPBACK,
    mac: [0x02, 0, 0, 0, 0x01, 0x02],
    gw_mac: [0x02, 0, 0, 0, 0x01, 0x01],
};
/// Container on network A behind another veth (ifindex 77).
const EP_A_ELSEWHERE: Ep = Ep {
    ip: Ipv4Addr::new(9, 0, 1, 3),
    vni: VNI_A,
    ifindex: 77,
    mac: [0x02, 0, 0, 0, 0x01, 0x03],
    gw_mac: [0x02, 0, 0, 0, 0x01, 0xfe],
};
/// Container on network B.
const EP_B: Ep = Ep {
    ip: Ipv4Addr::new(9, 1, 1, 2),
    vni: VNI_B,
    ifindex: LOOPBACK,
    mac: [0x02, 0, 0, 0, 0x02, 0x02],
    gw_mac: [0x02, 0, 0, 0, 0x02, 0x01],
};

/// Removes the pins of a test-run datapath when dropped, panics included.
struct PinGuard(PinLayout);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.remove_all() {
            eprintln!("removing test pins: {e:#}");
        }
    }
}

struct Fixture {
    dp: Datapath,
    // Declared after `dp`: the pins go after the maps' file descriptors are closed.
    _pins: PinGuard,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Fixture {
    /// Networks A and B each on a VNI of its own.
    fn new() -> Fixture {
        Fixture::with_wire(false)
    }

    /// Networks A and B both on the shared VNI 1024.
    fn shared() -> Fixture {
        Fixture::with_wire(true)
    }

    /// The VNI network `id` is sent with.
    fn wire(shared: bool, id: u32) -> u32 {
        if shared { SHARED_VNI } else { id }
    }

    fn with_wire(shared: bool) -> Fixture {
        overlay_lab::ensure_bpffs().unwrap();
        let instance = format!(
            "testrun-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let pins = PinLayout::new(Path::new(overlay_lab::BPFFS), &instance).unwrap();
        let guard = PinGuard(pins.clone());
        let mut dp = Datapath::load(pins).unwrap();
        let m = dp.maps_mut();
        m.set_config(&AgentSettings {
            underlay_ip: IpAddr::V4(LOCAL_UNDERLAY),
            underlay_ifindex: LOOPBACK,
            vtep_mac: LOCAL_VTEP_MAC,
            vxlan_port: VXLAN_PORT,
            overlay_mtu: 1420,
            spare_headroom: false,
        })
        .unwrap();
        for vni in [VNI_A, VNI_B] {
            m.put_network(vni, Network::default()).unwrap();
        }
        if shared {
            m.put_vni(SHARED_VNI, WireVni::carrying(&[VNI_A, VNI_B]))
                .unwrap();
        } else {
            for vni in [VNI_A, VNI_B] {
                m.put_vni(vni, WireVni::carrying(&[vni])).unwrap();
            }
        }
        m.put_subnet("9.0.0.0/16".parse().unwrap(), OverlaySubnet::new(VNI_A))
            .unwrap();
        m.put_subnet("9.1.0.0/16".parse().unwrap(), OverlaySubnet::new(VNI_B))
            .unwrap();
        for ep in [&EP_A, &EP_A_ELSEWHERE, &EP_B] {
            m.put_endpoint(
                IpAddr::V4(ep.ip),
                Endpoint::container(ep.ifindex, ep.vni, ep.mac, ep.gw_mac),
            )
            .unwrap();
        }
        for (underlay, mac) in [(R_UNDERLAY, R_VTEP_MAC), (S_UNDERLAY, S_VTEP_MAC)] {
            m.put_vtep(IpAddr::V4(underlay), Vtep::new(mac, [0; 4]))
                .unwrap();
        }
        for (subnet, underlay, mac, vni) in [
            ("9.0.2.0/24", R_UNDERLAY, R_VTEP_MAC, VNI_A),
            ("9.1.2.0/24", R_UNDERLAY, R_VTEP_MAC, VNI_B),
            ("9.0.3.0/24", S_UNDERLAY, S_VTEP_MAC, VNI_A),
        ] {
            m.put_route(
                subnet.parse().unwrap(),
                RemoteRoute::new(
                    addr16(IpAddr::V4(underlay)),
                    mac,
                    vni,
                    Fixture::wire(shared, vni),
                ),
            )
            .unwrap();
        }
        Fixture { dp, _pins: guard }
    }

    fn run(&self, program: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        self.dp.run(program, packet)
    }

    fn stat(&self, network: u32, counter: Counter) -> u64 {
        self.dp.stat(network, counter)
    }

    /// Sum of every counter: to show a packet left no trace.
    fn total_packets(&self) -> u64 {
        self.dp.total_packets()
    }

    /// Runs `program` on `packet`, expects a drop counted exactly once under `(vni, counter)`.
    fn expect_drop(&self, what: &str, program: &str, packet: &[u8], vni: u32, counter: Counter) {
        self.dp
            .expect_counted_once(what, program, packet, TC_ACT_SHOT, vni, counter, 0);
    }
}

/// A frame sent by a container: to its gateway's MAC, from `src_mac`.
fn container_frame(src_mac: [u8; 6], gw_mac: [u8; 6], ip_packet: &[u8]) -> Vec<u8> {
    eth(gw_mac, src_mac, ETH_P_IP, ip_packet)
}

/// A well-formed VXLAN frame from agent R to us on network A, for a local endpoint.
fn vxlan_from_r(inner_src: Ipv4Addr, inner_dst: Ipv4Addr) -> VxlanFrame {
    VxlanFrame {
        outer_src: R_UNDERLAY,
        outer_dst: LOCAL_UNDERLAY,
        src_port: 51234,
        dst_port: VXLAN_PORT,
        flags: 0x08,
        vni: VNI_A,
        inner_dst_mac: LOCAL_VTEP_MAC,
        inner_src_mac: R_VTEP_MAC,
        inner_ip: ping_packet(inner_src, inner_dst, 56),
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[test]
fn encap_builds_dcos_vxlan_byte_for_byte() {
    let f = Fixture::new();
    let inner_ip = ping_packet(EP_A.ip, Ipv4Addr::new(9, 0, 2, 2), 56);
    let input = container_frame(EP_A.mac, EP_A.gw_mac, &inner_ip);
    let (verdict, out) = f.run(programs::FROM_CONTAINER, &input);
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "encap verdict; counters {:?}",
        f.dp.maps().stats().unwrap()
    );
    assert_eq!(out.len(), input.len() + 50, "VXLAN overhead is 50 bytes");

    // Outer Ethernet: addresses are left for bpf_redirect_neigh, the type is IPv4.
    assert_eq!(u16_at(&out, 12), ETH_P_IP, "outer ethertype");
    // Outer IPv4.
    let ip = &out[14..34];
    assert_eq!(ip[0], 0x45, "outer version/IHL");
    assert_eq!(
        u16_at(ip, 2) as usize,
        out.len() - 14,
        "outer IPv4 total length"
    );
    assert_eq!(ip[8], 64, "outer TTL");
    assert_eq!(ip[9], IPPROTO_UDP, "outer protocol");
    assert_eq!(&ip[12..16], &LOCAL_UNDERLAY.octets(), "outer source");
    assert_eq!(&ip[16..20], &R_UNDERLAY.octets(), "outer destination");
    assert_eq!(inet_checksum(ip), 0, "outer IPv4 header checksum invalid");
    assert_ne!(u16_at(ip, 10), 0, "outer IPv4 header checksum missing");
    // UDP.
    let udp = &out[34..42];
    let sport = u16_at(udp, 0);
    assert!((32768..=60999).contains(&sport), "source port {sport}");
    assert_eq!(u16_at(udp, 2), VXLAN_PORT, "destination port");
    assert_eq!(u16_at(udp, 4) as usize, out.len() - 34, "UDP length");
    assert_eq!(u16_at(udp, 6), 0, "UDP checksum must be 0");
    // VXLAN.
    assert_eq!(
        &out[42..50],
        &[0x08, 0, 0, 0, 0x00, 0x04, 0x00, 0],
        "VXLAN header (flags 0x08, VNI 1024)"
    );
    // Inner Ethernet: DC/OS wire format, VTEP MACs.
    assert_eq!(&out[50..56], &R_VTEP_MAC, "inner destination MAC");
    assert_eq!(&out[56..62], &LOCAL_VTEP_MAC, "inner source MAC");
    assert_eq!(u16_at(&out, 62), ETH_P_IP, "inner ethertype");
    assert!(out[64..] == inner_ip[..], "inner IP packet altered");
    assert_eq!(f.stat(VNI_A, Counter::Encapsulated), 1);

    // The same flow always gets the same source port (no reordering across ECMP paths).
    let (_, again) = f.run(programs::FROM_CONTAINER, &input);
    assert_eq!(u16_at(&again, 34), sport, "source port not stable per flow");

    // Exactly the overlay MTU still goes out.
    let largest = ping_packet(EP_A.ip, Ipv4Addr::new(9, 0, 2, 2), 1420 - 28);
    assert_eq!(largest.len(), 1420);
    let (verdict, out) = f.run(
        programs::FROM_CONTAINER,
        &container_frame(EP_A.mac, EP_A.gw_mac, &largest),
    );
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "a 1420-byte packet is not too big"
    );
    assert_eq!(out.len(), 14 + 1420 + 50);
    assert!(out[64..] == largest[..]);
    assert_eq!(f.stat(VNI_A, Counter::Encapsulated), 3);
}

/// With an underlay NIC that reserves link-layer headroom (`spare_headroom`, as the agent sets
/// for a bus device), encapsulation first grows and gives back extra room: the frame that leaves
/// is the same, byte for byte, for small and MTU-sized packets.
#[test]
fn encap_with_spare_headroom_builds_the_same_frames() {
    let plain = Fixture::new();
    let mut spare = Fixture::new();
    spare
        .dp
        .maps_mut()
        .set_config(&AgentSettings {
            underlay_ip: IpAddr::V4(LOCAL_UNDERLAY),
            underlay_ifindex: LOOPBACK,
            vtep_mac: LOCAL_VTEP_MAC,
            vxlan_port: VXLAN_PORT,
            overlay_mtu: 1420,
            spare_headroom: true,
        })
        .unwrap();
    let flags = spare.dp.maps().config().unwrap().unwrap().flags;
    assert_ne!(flags & AgentConfig::FLAG_SPARE_HEADROOM, 0, "flag written");
    for payload in [18, 56, 1420 - 28] {
        let inner_ip = ping_packet(EP_A.ip, Ipv4Addr::new(9, 0, 2, 2), payload);
        let input = container_frame(EP_A.mac, EP_A.gw_mac, &inner_ip);
        let (want_verdict, want) = plain.run(programs::FROM_CONTAINER, &input);
        let (verdict, got) = spare.run(programs::FROM_CONTAINER, &input);
        assert_eq!(verdict, want_verdict, "{payload}: verdict");
        assert_eq!(verdict, TC_ACT_REDIRECT, "{payload}: encapsulated");
        assert!(
            got == want,
            "{payload}: frames differ:\n{got:02x?}\n{want:02x?}"
        );
    }
    assert_eq!(spare.stat(VNI_A, Counter::Encapsulated), 3);
    assert_eq!(spare.stat(VNI_A, Counter::DropEncapFailed), 0);
}

/// The agent's mirror of the kernel's next hop (`OVL_NEXT_HOPS`): with a fresh entry for the
/// destination's VTEP, encapsulation writes the outer MACs itself (the frame is otherwise the
/// same, byte for byte) and counts no kernel lookup; without one, or with one the agent has not
/// confirmed in time, or with another VTEP's, the addresses are left to the kernel's lookup and
/// each such packet is counted.
#[test]
fn encap_addresses_the_frame_from_a_fresh_cached_next_hop_only() {
    use overlay_agent::next_hops::coarse_now_ns;
    use overlay_common::maps::NextHop;
    use std::collections::BTreeMap;

    let mut f = Fixture::new();
    let inner_ip = ping_packet(EP_A.ip, Ipv4Addr::new(9, 0, 2, 2), 56);
    let input = container_frame(EP_A.mac, EP_A.gw_mac, &inner_ip);
    let (verdict, by_kernel) = f.run(programs::FROM_CONTAINER, &input);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&by_kernel[..12], &[0; 12], "addresses left to the kernel");
    assert_eq!(f.stat(VNI_A, Counter::NextHopByKernel), 1);

    const GATEWAY_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x12];
    const NIC_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x11];
    let cache = |f: &mut Fixture, vtep: Ipv4Addr, expires_ns: u64| {
        let hop = NextHop::new(LOOPBACK, GATEWAY_MAC, NIC_MAC, expires_ns);
        f.dp.maps_mut()
            .sync_next_hops(&BTreeMap::from([(vtep.into(), hop)]))
            .unwrap();
    };
    cache(&mut f, R_UNDERLAY, coarse_now_ns() + 60_000_000_000);
    let (verdict, cached) = f.run(programs::FROM_CONTAINER, &input);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&cached[..6], &GATEWAY_MAC, "outer destination MAC");
    assert_eq!(&cached[6..12], &NIC_MAC, "outer source MAC");
    assert!(
        cached[12..] == by_kernel[12..],
        "the rest of the frame differs"
    );
    assert_eq!(
        f.stat(VNI_A, Counter::NextHopByKernel),
        1,
        "no kernel lookup"
    );
    assert_eq!(f.stat(VNI_A, Counter::Encapsulated), 2);

    // Not confirmed in time: as if there were none.
    cache(&mut f, R_UNDERLAY, coarse_now_ns().saturating_sub(1));
    let (_, expired) = f.run(programs::FROM_CONTAINER, &input);
    assert!(expired == by_kernel, "an expired entry was used");
    assert_eq!(f.stat(VNI_A, Counter::NextHopByKernel), 2);

    // Another VTEP's entry (sync leaves only it) is not this one's.
    cache(&mut f, S_UNDERLAY, coarse_now_ns() + 60_000_000_000);
    assert_eq!(f.dp.maps().next_hops().unwrap().len(), 1);
    let (_, other) = f.run(programs::FROM_CONTAINER, &input);
    assert!(other == by_kernel, "S's next hop was used towards R");
    assert_eq!(f.stat(VNI_A, Counter::NextHopByKernel), 3);

    // R's slot given back and given to another VTEP while a route to R still carries it (the
    // agent removes a VTEP's routes first, so only a packet in flight could meet this): the
    // other VTEP's next hop, now at that slot, is not R's.
    const T_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 14);
    let r_slot = f.dp.maps().next_hop_slot(R_UNDERLAY.into()).unwrap();
    f.dp.maps_mut().remove_vtep(R_UNDERLAY.into()).unwrap();
    f.dp.maps_mut()
        .put_vtep(T_UNDERLAY.into(), Vtep::new([2, 0, 0, 0, 0, 0x14], [0; 4]))
        .unwrap();
    assert_eq!(f.dp.maps().next_hop_slot(T_UNDERLAY.into()), Some(r_slot));
    cache(&mut f, T_UNDERLAY, coarse_now_ns() + 60_000_000_000);
    assert!(
        f.dp.maps()
            .next_hops()
            .unwrap()
            .contains_key(&T_UNDERLAY.into())
    );
    let (_, reused) = f.run(programs::FROM_CONTAINER, &input);
    assert!(
        reused == by_kernel,
        "T's next hop, at R's old slot, was used towards R"
    );
    assert_eq!(f.stat(VNI_A, Counter::NextHopByKernel), 4);
}

#[test]
fn decap_delivers_the_inner_packet_to_the_endpoint() {
    let f = Fixture::new();
    let v = vxlan_from_r(Ipv4Addr::new(9, 0, 2, 2), EP_A.ip);
    let input = v.frame();
    let (verdict, out) = f.run(programs::FROM_UNDERLAY, &input);
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "decap verdict; counters {:?}",
        f.dp.maps().stats().unwrap()
    );
    let expected = eth(EP_A.mac, EP_A.gw_mac, ETH_P_IP, &v.inner_ip);
    assert_eq!(out.len(), input.len() - 50);
    assert!(
        out == expected,
        "decapsulated frame differs:\n got  {}\n want {}",
        hex(&out),
        hex(&expected)
    );
    assert_eq!(f.stat(VNI_A, Counter::Decapsulated), 1);
}

#[test]
fn underlay_drops_are_counted_by_reason() {
    let f = Fixture::new();
    let ok = vxlan_from_r(Ipv4Addr::new(9, 0, 2, 2), EP_A.ip);
    let u = programs::FROM_UNDERLAY;

    let stranger = VxlanFrame {
        outer_src: STRANGER_UNDERLAY,
        ..ok.clone()
    };
    f.expect_drop(
        "unknown VTEP",
        u,
        &stranger.frame(),
        NO_NETWORK,
        Counter::DropUnknownVtep,
    );
    for flags in [0x00, 0x0c, 0x88, 0xff] {
        let bad = VxlanFrame {
            flags,
            ..ok.clone()
        };
        f.expect_drop(
            &format!("VXLAN flags {flags:#04x}"),
            u,
            &bad.frame(),
            NO_NETWORK,
            Counter::DropBadVxlanFlags,
        );
    }
    let unknown_vni = VxlanFrame {
        vni: VNI_UNKNOWN,
        ..ok.clone()
    };
    f.expect_drop(
        "unknown VNI",
        u,
        &unknown_vni.frame(),
        NO_NETWORK,
        Counter::DropUnknownVni,
    );
    // Cut right after the UDP header, headers still claiming the full length.
    let full = ok.frame();
    f.expect_drop(
        "cut after the UDP header",
        u,
        &full[..42],
        NO_NETWORK,
        Counter::DropTruncated,
    );
    // Cut in the middle of the inner IPv4 header.
    f.expect_drop(
        "cut in the inner IPv4 header",
        u,
        &full[..14 + 20 + 8 + 8 + 14 + 10],
        NO_NETWORK,
        Counter::DropTruncated,
    );
    // Consistent headers, but an empty datagram: no VXLAN header at all.
    let empty = eth(
        [2, 0, 0, 0, 0xee, 1],
        [2, 0, 0, 0, 0xee, 2],
        ETH_P_IP,
        &ipv4(
            R_UNDERLAY,
            LOCAL_UNDERLAY,
            IPPROTO_UDP,
            &udp(51234, VXLAN_PORT, &[]),
        ),
    );
    f.expect_drop(
        "empty VXLAN datagram",
        u,
        &empty,
        NO_NETWORK,
        Counter::DropTruncated,
    );
    let not_local = vxlan_from_r(Ipv4Addr::new(9, 0, 2, 2), Ipv4Addr::new(9, 0, 1, 77));
    f.expect_drop(
        "inner destination not local",
        u,
        &not_local.frame(),
        VNI_A,
        Counter::DropNoEndpoint,
    );
    let other_net = vxlan_from_r(Ipv4Addr::new(9, 0, 2, 2), EP_B.ip);
    f.expect_drop(
        "inner destination on network B, VNI of network A",
        u,
        &other_net.frame(),
        VNI_A,
        Counter::DropCrossNetwork,
    );
    let foreign_src = vxlan_from_r(Ipv4Addr::new(9, 0, 3, 5), EP_A.ip);
    f.expect_drop(
        "inner source of agent S sent by agent R",
        u,
        &foreign_src.frame(),
        VNI_A,
        Counter::DropSpoofedSource,
    );
    let local_src = vxlan_from_r(EP_A_ELSEWHERE.ip, EP_A.ip);
    f.expect_drop(
        "inner source is one of our own endpoints",
        u,
        &local_src.frame(),
        VNI_A,
        Counter::DropSpoofedSource,
    );
    // (Its VNI is A's, but the addresses decide: network B's source, network A's destination.)
    let b_src_on_a = vxlan_from_r(Ipv4Addr::new(9, 1, 2, 5), EP_A.ip);
    f.expect_drop(
        "inner source in R's subnet of network B to network A, sent with VNI A",
        u,
        &b_src_on_a.frame(),
        VNI_B,
        Counter::DropCrossNetwork,
    );
    // Network B to network B, but in A's VNI: B's frames carry B's own VNI.
    let b_in_a_vni = vxlan_from_r(Ipv4Addr::new(9, 1, 2, 5), EP_B.ip);
    f.expect_drop(
        "network B's packet in network A's VNI",
        u,
        &b_in_a_vni.frame(),
        VNI_B,
        Counter::DropVniMismatch,
    );

    // After all that, the good frame still goes through.
    let (verdict, _) = f.run(u, &ok.frame());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(f.stat(VNI_A, Counter::Decapsulated), 1);
}

#[test]
fn container_drops_are_counted_by_reason() {
    let f = Fixture::new();
    let c = programs::FROM_CONTAINER;
    let remote = Ipv4Addr::new(9, 0, 2, 2);

    let foreign_ip = ping_packet(Ipv4Addr::new(9, 0, 1, 99), remote, 56);
    f.expect_drop(
        "source IP of no endpoint",
        c,
        &container_frame(EP_A.mac, EP_A.gw_mac, &foreign_ip),
        NO_NETWORK,
        Counter::DropSpoofedSource,
    );
    let own_ip = ping_packet(EP_A.ip, remote, 56);
    f.expect_drop(
        "own IP, foreign MAC",
        c,
        &container_frame([0x02, 0, 0, 0, 0x01, 0x99], EP_A.gw_mac, &own_ip),
        NO_NETWORK,
        Counter::DropSpoofedSource,
    );
    let neighbour_ip = ping_packet(EP_A_ELSEWHERE.ip, remote, 56);
    f.expect_drop(
        "IP and MAC of the container behind another veth",
        c,
        &container_frame(EP_A_ELSEWHERE.mac, EP_A.gw_mac, &neighbour_ip),
        NO_NETWORK,
        Counter::DropSpoofedSource,
    );
    for (what, dst) in [
        ("local endpoint of network B", EP_B.ip),
        ("remote route of network B", Ipv4Addr::new(9, 1, 2, 5)),
        ("unrouted address of network B", Ipv4Addr::new(9, 1, 200, 5)),
    ] {
        let p = ping_packet(EP_A.ip, dst, 56);
        f.expect_drop(
            what,
            c,
            &container_frame(EP_A.mac, EP_A.gw_mac, &p),
            VNI_A,
            Counter::DropCrossNetwork,
        );
    }
    // Without DF (with DF the sender is answered: too_big_packets_are_answered_...).
    let mut too_big = ping_packet(EP_A.ip, remote, 1421 - 28);
    assert_eq!(too_big.len(), 1421);
    clear_dont_fragment(&mut too_big);
    f.expect_drop(
        "1421 bytes to a remote route",
        c,
        &container_frame(EP_A.mac, EP_A.gw_mac, &too_big),
        VNI_A,
        Counter::DropTooBig,
    );
    assert_eq!(f.stat(VNI_A, Counter::Encapsulated), 0);
}

#[test]
fn host_traffic_on_the_underlay_passes_untouched() {
    let f = Fixture::new();
    let macs = ([0x02, 0, 0, 0, 0xee, 1], [0x02, 0, 0, 0, 0xee, 2]);
    let frames = [
        (
            "UDP to another port from a known agent",
            eth(
                macs.0,
                macs.1,
                ETH_P_IP,
                &ipv4(
                    R_UNDERLAY,
                    LOCAL_UNDERLAY,
                    IPPROTO_UDP,
                    &udp(51234, 53, &[0x08; 64]),
                ),
            ),
        ),
        (
            "UDP from the VXLAN port, to another port",
            eth(
                macs.0,
                macs.1,
                ETH_P_IP,
                &ipv4(
                    R_UNDERLAY,
                    LOCAL_UNDERLAY,
                    IPPROTO_UDP,
                    &udp(
                        VXLAN_PORT,
                        4789,
                        &vxlan_from_r(R_UNDERLAY, EP_A.ip).udp_payload(),
                    ),
                ),
            ),
        ),
        (
            "TCP to port 64000",
            eth(
                macs.0,
                macs.1,
                ETH_P_IP,
                &ipv4(
                    R_UNDERLAY,
                    LOCAL_UNDERLAY,
                    IPPROTO_TCP,
                    &tcp_syn(R_UNDERLAY, LOCAL_UNDERLAY, 40000, VXLAN_PORT),
                ),
            ),
        ),
        (
            "ARP request",
            arp_request(macs.1, R_UNDERLAY, LOCAL_UNDERLAY),
        ),
        (
            "IPv6 UDP to port 64000",
            ipv6_udp_frame(macs.0, macs.1, VXLAN_PORT),
        ),
    ];
    for (what, frame) in frames {
        let total = f.total_packets();
        let (verdict, out) = f.run(programs::FROM_UNDERLAY, &frame);
        assert_eq!(verdict, TC_ACT_OK, "{what}: verdict");
        assert!(out == frame, "{what}: frame altered");
        assert_eq!(f.total_packets(), total, "{what}: counted");
    }
}

#[test]
fn arp_request_for_the_gateway_gets_an_rfc826_reply() {
    let f = Fixture::new();
    let gateway = Ipv4Addr::new(9, 0, 1, 1);
    let request = arp_request(EP_A.mac, EP_A.ip, gateway);
    let (verdict, out) = f.run(programs::FROM_CONTAINER, &request);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "bpf_redirect back out of the veth"
    );
    let expected = arp_reply(EP_A.gw_mac, gateway, EP_A.mac, EP_A.ip);
    assert!(
        out == expected,
        "ARP reply differs:\n got  {}\n want {}",
        hex(&out),
        hex(&expected)
    );
    assert_eq!(f.stat(VNI_A, Counter::ArpReplied), 1);

    // A request claiming another container's address is not answered.
    let spoofed = arp_request(EP_A.mac, EP_A_ELSEWHERE.ip, gateway);
    f.expect_drop(
        "ARP with a foreign sender address",
        programs::FROM_CONTAINER,
        &spoofed,
        NO_NETWORK,
        Counter::DropSpoofedSource,
    );
}

/// Sets IPv4 header fields of the frame's outer header and recomputes its checksum.
fn patch_outer_ipv4(frame: &mut [u8], patch: impl FnOnce(&mut [u8])) {
    let ip = &mut frame[14..34];
    patch(ip);
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = inet_checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn outer_fragments_are_never_decapsulated() {
    let f = Fixture::new();
    let ok = vxlan_from_r(Ipv4Addr::new(9, 0, 2, 2), EP_A.ip);
    // First fragment of a larger VXLAN datagram, as a router on the underlay cuts it (our own
    // encap leaves DF clear): MF set, the UDP length that of the whole datagram.
    let mut first = ok.frame();
    first[38..40].copy_from_slice(&1480u16.to_be_bytes());
    patch_outer_ipv4(&mut first, |ip| ip[6] = 0x20);
    // A later fragment whose payload happens to look like a VXLAN UDP header.
    let mut later = ok.frame();
    patch_outer_ipv4(&mut later, |ip| ip[6..8].copy_from_slice(&[0x00, 0xb9]));
    for (what, frame) in [("first fragment", first), ("later fragment", later)] {
        let (verdict, _) = f.run(programs::FROM_UNDERLAY, &frame);
        assert_ne!(
            verdict,
            TC_ACT_REDIRECT,
            "{what} decapsulated and delivered as a whole packet; counters {:?}",
            f.dp.maps().stats().unwrap()
        );
    }
    assert_eq!(f.stat(VNI_A, Counter::Decapsulated), 0);
}

#[test]
fn inner_packet_longer_than_the_frame_is_truncated() {
    let f = Fixture::new();
    let mut v = vxlan_from_r(Ipv4Addr::new(9, 0, 2, 2), EP_A.ip);
    // Inner header claims 1000 bytes; 84 are there. Outer headers are consistent.
    v.inner_ip[2..4].copy_from_slice(&1000u16.to_be_bytes());
    v.inner_ip[10..12].copy_from_slice(&[0, 0]);
    let c = inet_checksum(&v.inner_ip[..20]);
    v.inner_ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.expect_drop(
        "inner IPv4 total length 1000 in an 84-byte inner packet",
        programs::FROM_UNDERLAY,
        &v.frame(),
        VNI_A,
        Counter::DropTruncated,
    );
}

/// An IPv6 frame from EP_A carrying `payload` with next header `next` (checksums are not checked
/// before the drop).
fn ipv6_from_a(next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, 255]);
    p.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&[0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(payload);
    eth([0x33, 0x33, 0, 0, 0, 1], EP_A.mac, ETH_P_IPV6, &p)
}

#[test]
fn container_guards_drop_what_a_container_may_never_send() {
    let mut f = Fixture::new();
    let c = programs::FROM_CONTAINER;
    let master = Ipv4Addr::new(10, 250, 0, 1);
    f.dp.maps_mut()
        .set_nat_config(&overlay_agent::masquerade::nat_config(
            &(61000..=63999),
            Default::default(),
            32,
            1024,
            None,
        ))
        .unwrap();
    f.dp.maps_mut()
        .set_protected(&[
            overlay_datapath::ProtectedDestination {
                addr: Some(IpAddr::V4(master)),
                port: 5050,
                protocol: IPPROTO_TCP,
            },
            overlay_datapath::ProtectedDestination {
                addr: None,
                port: 9101,
                protocol: IPPROTO_TCP,
            },
        ])
        .unwrap();
    let udp_to = |dst: Ipv4Addr, port: u16| {
        container_frame(
            EP_A.mac,
            EP_A.gw_mac,
            &ipv4(EP_A.ip, dst, IPPROTO_UDP, &udp(40000, port, b"x")),
        )
    };
    // A VLAN tag in band (a test run's skb has no tag metadata; real packets are in
    // security_datapath.rs), even on a packet that would otherwise be fine.
    let mut tagged = udp_to(Ipv4Addr::new(9, 0, 2, 2), 7000);
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x64]);
    f.expect_drop(
        "802.1Q tag",
        c,
        &tagged,
        NO_NETWORK,
        Counter::DropVlanTagged,
    );
    let mut qinq = udp_to(Ipv4Addr::new(9, 0, 2, 2), 7000);
    qinq.splice(12..12, [0x88, 0xa8, 0x00, 0xc8, 0x81, 0x00, 0x00, 0x64]);
    f.expect_drop(
        "802.1ad + 802.1Q",
        c,
        &qinq,
        NO_NETWORK,
        Counter::DropVlanTagged,
    );
    // IPv6: RA and Redirect have their own reason; the rest is IPv6 not carried yet.
    let ra = [134u8, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    f.expect_drop(
        "RA",
        c,
        &ipv6_from_a(58, &ra),
        NO_NETWORK,
        Counter::DropRouterMessage,
    );
    let mut redirect = [0u8; 40];
    redirect[0] = 137;
    f.expect_drop(
        "Redirect",
        c,
        &ipv6_from_a(58, &redirect),
        NO_NETWORK,
        Counter::DropRouterMessage,
    );
    let ipv6_udp = ipv6_udp_frame(EP_A.gw_mac, EP_A.mac, 9999);
    f.expect_drop("IPv6 UDP", c, &ipv6_udp, NO_NETWORK, Counter::DropIpv6);
    let lldp = eth(EP_A.gw_mac, EP_A.mac, 0x88cc, &[0; 46]);
    f.expect_drop("LLDP", c, &lldp, NO_NETWORK, Counter::DropUnsupportedEth);
    // VXLAN through masquerade, to a known agent and to this one.
    for dst in [R_UNDERLAY, LOCAL_UNDERLAY] {
        f.expect_drop(
            "UDP to an agent's VXLAN port",
            c,
            &udp_to(dst, VXLAN_PORT),
            VNI_A,
            Counter::DropContainerVxlan,
        );
    }
    // The control plane: the master's API, and an agent port on any agent's address.
    let syn_to = |dst: Ipv4Addr, port: u16| {
        container_frame(
            EP_A.mac,
            EP_A.gw_mac,
            &ipv4(
                EP_A.ip,
                dst,
                IPPROTO_TCP,
                &tcp_syn(EP_A.ip, dst, 40000, port),
            ),
        )
    };
    for (dst, port) in [(master, 5050), (R_UNDERLAY, 9101), (LOCAL_UNDERLAY, 9101)] {
        f.expect_drop(
            "control plane",
            c,
            &syn_to(dst, port),
            VNI_A,
            Counter::DropControlPlane,
        );
    }
    // Not protected: the master on another port, port 9101 elsewhere than on an agent.
    for (dst, port) in [(master, 5051), (Ipv4Addr::new(192, 0, 2, 7), 9101)] {
        let (verdict, _) = f.run(c, &syn_to(dst, port));
        assert_ne!(verdict, TC_ACT_SHOT, "{dst}:{port} dropped");
    }
    assert_eq!(f.stat(VNI_A, Counter::DropControlPlane), 3);
    // From the underlay: VXLAN from a masquerade source port is refused even from a known VTEP.
    let mut v = vxlan_from_r(Ipv4Addr::new(9, 0, 2, 2), EP_A.ip);
    v.src_port = 61500;
    f.expect_drop(
        "VXLAN from a masquerade port",
        programs::FROM_UNDERLAY,
        &v.frame(),
        NO_NETWORK,
        Counter::DropVxlanNatPort,
    );
    v.src_port = 60999;
    let (verdict, _) = f.run(programs::FROM_UNDERLAY, &v.frame());
    assert_eq!(verdict, TC_ACT_REDIRECT, "VXLAN from a VTEP source port");
}

// ---- IPv6 inside the overlay (over the IPv4 underlay) ----

const A6_GATEWAY: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xa, 0, 1, 0, 0, 0, 1);
const EP_A6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xa, 0, 1, 0, 0, 0, 2);
const EP_A6_ELSEWHERE: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xa, 0, 1, 0, 0, 0, 3);
/// EP_A's link-local address (EUI-64 of its MAC 02:00:00:00:01:02).
const EP_A_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0xff, 0xfe00, 0x0102);
const EP_B6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xb, 0, 1, 0, 0, 0, 2);
/// Containers behind agent R (network A) and S.
const R_A6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xa, 0, 2, 0, 0, 0, 5);
const S_A6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xa, 0, 3, 0, 0, 0, 5);
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x01];
const HOST_PEER_IFINDEX: u32 = 55;

/// Network A's IPv6 subnet fd01:a::/48 (this agent's block fd01:a:0:1::/64, R's fd01:a:0:2::/64,
/// S's fd01:a:0:3::/64) and network B's fd01:b::/48 (R's block fd01:b:0:2::/64): what the agent
/// must write for a dual-stack network. EP_A's link-local address is an endpoint of its own.
fn with_ipv6(f: &mut Fixture) {
    let m = f.dp.maps_mut();
    for (subnet, vni) in [("fd01:a::/48", VNI_A), ("fd01:b::/48", VNI_B)] {
        m.put_subnet(subnet.parse().unwrap(), OverlaySubnet::new(vni))
            .unwrap();
    }
    for (ip, ep) in [
        (EP_A6, &EP_A),
        (EP_A_LINK_LOCAL, &EP_A),
        (EP_A6_ELSEWHERE, &EP_A_ELSEWHERE),
        (EP_B6, &EP_B),
    ] {
        m.put_endpoint(
            IpAddr::V6(ip),
            Endpoint {
                ifindex: ep.ifindex,
                network: ep.vni,
                mac: ep.mac,
                gateway_mac: ep.gw_mac,
                ..Default::default()
            },
        )
        .unwrap();
    }
    m.put_endpoint(
        IpAddr::V6(A6_GATEWAY),
        Endpoint::host(HOST_PEER_IFINDEX, VNI_A, HOST_MAC),
    )
    .unwrap();
    for (subnet, underlay, mac, vni) in [
        ("fd01:a:0:2::/64", R_UNDERLAY, R_VTEP_MAC, VNI_A),
        ("fd01:b:0:2::/64", R_UNDERLAY, R_VTEP_MAC, VNI_B),
        ("fd01:a:0:3::/64", S_UNDERLAY, S_VTEP_MAC, VNI_A),
    ] {
        m.put_route(
            subnet.parse().unwrap(),
            RemoteRoute::new(addr16(IpAddr::V4(underlay)), mac, vni, vni),
        )
        .unwrap();
    }
}

fn ipv6_frame(src_mac: [u8; 6], gw_mac: [u8; 6], ip_packet: &[u8]) -> Vec<u8> {
    eth(gw_mac, src_mac, ETH_P_IPV6, ip_packet)
}

/// VXLAN from agent R on network `vni` carrying the IPv6 packet `inner`.
fn vxlan6_from_r(vni: u32, inner: &[u8]) -> Vec<u8> {
    let inner_frame = eth(LOCAL_VTEP_MAC, R_VTEP_MAC, ETH_P_IPV6, inner);
    let u = udp(51234, VXLAN_PORT, &vxlan(0x08, vni, &inner_frame));
    eth(
        [0x02, 0, 0, 0, 0xee, 0x01],
        [0x02, 0, 0, 0, 0xee, 0x02],
        ETH_P_IP,
        &ipv4(R_UNDERLAY, LOCAL_UNDERLAY, IPPROTO_UDP, &u),
    )
}

#[test]
fn ipv6_is_delivered_encapsulated_and_decapsulated_byte_for_byte() {
    let mut f = Fixture::new();
    with_ipv6(&mut f);
    let c = programs::FROM_CONTAINER;

    // Local delivery: to the container's MAC from its gateway's, the packet itself untouched
    // (hop limit as for IPv4's TTL: the overlay is one link).
    let p = ping6_packet(EP_A6, EP_A6_ELSEWHERE, 56);
    let (verdict, out) = f.run(c, &ipv6_frame(EP_A.mac, EP_A.gw_mac, &p));
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "local delivery; counters {:?}",
        f.dp.maps().stats().unwrap()
    );
    let expected = eth(EP_A_ELSEWHERE.mac, EP_A_ELSEWHERE.gw_mac, ETH_P_IPV6, &p);
    assert!(
        out == expected,
        "delivered frame differs:\n got  {}\n want {}",
        hex(&out),
        hex(&expected)
    );
    assert_eq!(f.stat(VNI_A, Counter::LocalDelivered), 1);

    // Encapsulation: outer IPv4/UDP/VXLAN as for IPv4, inner Ethernet type IPv6.
    let p = ping6_packet(EP_A6, R_A6, 56);
    let input = ipv6_frame(EP_A.mac, EP_A.gw_mac, &p);
    let (verdict, out) = f.run(c, &input);
    assert_eq!(verdict, TC_ACT_REDIRECT, "encap");
    assert_eq!(out.len(), input.len() + 50);
    assert_eq!(u16_at(&out, 12), ETH_P_IP, "outer ethertype");
    let ip = &out[14..34];
    assert_eq!(inet_checksum(ip), 0, "outer IPv4 header checksum");
    assert_eq!(u16_at(ip, 2) as usize, out.len() - 14);
    assert_eq!(&ip[12..16], &LOCAL_UNDERLAY.octets());
    assert_eq!(&ip[16..20], &R_UNDERLAY.octets());
    assert_eq!(u16_at(&out, 36), VXLAN_PORT);
    assert_eq!(u16_at(&out, 38) as usize, out.len() - 34, "UDP length");
    assert_eq!(
        &out[42..50],
        &[0x08, 0, 0, 0, 0x00, 0x04, 0x00, 0],
        "VNI 1024"
    );
    assert_eq!(&out[50..56], &R_VTEP_MAC);
    assert_eq!(&out[56..62], &LOCAL_VTEP_MAC);
    assert_eq!(u16_at(&out, 62), ETH_P_IPV6, "inner ethertype");
    assert!(out[64..] == p[..], "inner IPv6 packet altered");
    assert_eq!(f.stat(VNI_A, Counter::Encapsulated), 1);
    // Exactly the overlay MTU still goes out.
    let largest = ping6_packet(EP_A6, R_A6, 1420 - 48);
    assert_eq!(largest.len(), 1420);
    let (verdict, _) = f.run(c, &ipv6_frame(EP_A.mac, EP_A.gw_mac, &largest));
    assert_eq!(verdict, TC_ACT_REDIRECT, "1420 bytes fit");

    // Decapsulation: the outer headers go, the frame becomes IPv6 to the container.
    let p = ping6_packet(R_A6, EP_A6, 56);
    let input = vxlan6_from_r(VNI_A, &p);
    let (verdict, out) = f.run(programs::FROM_UNDERLAY, &input);
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "decap; counters {:?}",
        f.dp.maps().stats().unwrap()
    );
    let expected = eth(EP_A.mac, EP_A.gw_mac, ETH_P_IPV6, &p);
    assert_eq!(out.len(), input.len() - 50);
    assert!(
        out == expected,
        "decapsulated frame differs:\n got  {}\n want {}",
        hex(&out),
        hex(&expected)
    );
    assert_eq!(f.stat(VNI_A, Counter::Decapsulated), 1);

    // The host's own IPv6 to a container, through the host link.
    let p = ping6_packet(A6_GATEWAY, EP_A6, 56);
    let (verdict, out) = f.run(
        programs::FROM_HOST,
        &eth(HOST_LINK_PEER_MAC, HOST_MAC, ETH_P_IPV6, &p),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT, "from the host");
    assert!(out == eth(EP_A.mac, EP_A.gw_mac, ETH_P_IPV6, &p));
    assert_eq!(f.stat(VNI_A, Counter::LocalDelivered), 2);
}

#[test]
fn ipv6_spoofing_isolation_and_link_local_drops_are_counted_by_reason() {
    let mut f = Fixture::new();
    with_ipv6(&mut f);
    let c = programs::FROM_CONTAINER;
    let from_a = |p: &[u8]| ipv6_frame(EP_A.mac, EP_A.gw_mac, p);

    // Anti-spoofing: the source address and MAC must be the endpoint's on this veth.
    let unassigned = Ipv6Addr::new(0xfd01, 0xa, 0, 1, 0, 0, 0, 0x99);
    for (what, frame) in [
        (
            "unassigned address of the network",
            from_a(&ping6_packet(unassigned, R_A6, 8)),
        ),
        (
            "own address, foreign MAC",
            ipv6_frame(
                [0x02, 0, 0, 0, 0x01, 0x99],
                EP_A.gw_mac,
                &ping6_packet(EP_A6, R_A6, 8),
            ),
        ),
        (
            "address and MAC of the container behind another veth",
            ipv6_frame(
                EP_A_ELSEWHERE.mac,
                EP_A.gw_mac,
                &ping6_packet(EP_A6_ELSEWHERE, R_A6, 8),
            ),
        ),
        (
            "the gateway's address",
            from_a(&ping6_packet(A6_GATEWAY, R_A6, 8)),
        ),
    ] {
        f.expect_drop(what, c, &frame, NO_NETWORK, Counter::DropSpoofedSource);
    }
    // An address no IPv6 overlay has: IPv6 that is not carried.
    let outsider = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    f.expect_drop(
        "source outside every IPv6 overlay",
        c,
        &from_a(&ping6_packet(outsider, R_A6, 8)),
        NO_NETWORK,
        Counter::DropIpv6,
    );
    // Isolation: any address of network B, local, remote or unassigned.
    for (what, dst) in [
        ("local endpoint of network B", EP_B6),
        (
            "remote route of network B",
            Ipv6Addr::new(0xfd01, 0xb, 0, 2, 0, 0, 0, 5),
        ),
        (
            "unrouted address of network B",
            Ipv6Addr::new(0xfd01, 0xb, 0, 0x99, 0, 0, 0, 5),
        ),
    ] {
        f.expect_drop(
            what,
            c,
            &from_a(&ping6_packet(EP_A6, dst, 8)),
            VNI_A,
            Counter::DropCrossNetwork,
        );
    }
    // Link-local goes to the gateway only: never to another container or the host.
    let other_link_local = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0xff, 0xfe00, 0x0103);
    f.expect_drop(
        "link-local to link-local",
        c,
        &from_a(&ping6_packet(EP_A_LINK_LOCAL, other_link_local, 8)),
        VNI_A,
        Counter::DropLinkLocal,
    );
    f.expect_drop(
        "link-local source to a global address",
        c,
        &from_a(&ping6_packet(EP_A_LINK_LOCAL, EP_A6_ELSEWHERE, 8)),
        VNI_A,
        Counter::DropLinkLocal,
    );
    f.expect_drop(
        "global source to a link-local address",
        c,
        &from_a(&ping6_packet(EP_A6, other_link_local, 8)),
        VNI_A,
        Counter::DropLinkLocal,
    );
    // RA guard: an RA or Redirect from a verified container is still refused.
    let ra = icmpv6(
        EP_A_LINK_LOCAL,
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
        &[134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0],
    );
    f.expect_drop(
        "RA",
        c,
        &from_a(&ipv6(
            EP_A_LINK_LOCAL,
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
            IPPROTO_ICMPV6,
            255,
            &ra,
        )),
        NO_NETWORK,
        Counter::DropRouterMessage,
    );
    // MLD reports and the like need no answer: ignored, counted on the network.
    let mld = ipv6(
        EP_A_LINK_LOCAL,
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16),
        IPPROTO_ICMPV6,
        1,
        &icmpv6(
            EP_A_LINK_LOCAL,
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16),
            &[143, 0, 0, 0, 0, 0, 0, 0],
        ),
    );
    f.expect_drop("MLDv2 report", c, &from_a(&mld), VNI_A, Counter::NdIgnored);
    // Outside every overlay, from a network that does not masquerade (this fixture's): left to
    // the host stack, as IPv4 (IPv6 masquerade: datapath_test_run_nat6.rs).
    let (verdict, _) = f.run(c, &from_a(&ping6_packet(EP_A6, outsider, 8)));
    assert_eq!(verdict, TC_ACT_OK, "to outside the overlays");
    assert_eq!(f.stat(VNI_A, Counter::PassedToHost), 1);
    assert_eq!(f.stat(VNI_A, Counter::Encapsulated), 0);
    assert_eq!(f.stat(VNI_A, Counter::LocalDelivered), 0);

    // From the underlay: the inner IPv6 source must be the sending agent's, on the VNI's network.
    let u = programs::FROM_UNDERLAY;
    for (what, inner, counter) in [
        (
            "inner source of agent S sent by R",
            ping6_packet(S_A6, EP_A6, 8),
            Counter::DropSpoofedSource,
        ),
        (
            "inner destination on network B",
            ping6_packet(R_A6, EP_B6, 8),
            Counter::DropCrossNetwork,
        ),
        (
            "inner destination link-local",
            ping6_packet(R_A6, EP_A_LINK_LOCAL, 8),
            Counter::DropLinkLocal,
        ),
        (
            "inner destination not local",
            ping6_packet(R_A6, Ipv6Addr::new(0xfd01, 0xa, 0, 1, 0, 0, 0, 0x77), 8),
            Counter::DropNoEndpoint,
        ),
    ] {
        f.expect_drop(what, u, &vxlan6_from_r(VNI_A, &inner), VNI_A, counter);
    }
    let mut cut = ping6_packet(R_A6, EP_A6, 8);
    cut[4..6].copy_from_slice(&1000u16.to_be_bytes());
    f.expect_drop(
        "inner payload length beyond the frame",
        u,
        &vxlan6_from_r(VNI_A, &cut),
        VNI_A,
        Counter::DropTruncated,
    );
    assert_eq!(f.stat(VNI_A, Counter::Decapsulated), 0);
}

#[test]
fn neighbour_solicitations_get_rfc4861_advertisements_within_the_network() {
    let mut f = Fixture::new();
    with_ipv6(&mut f);
    let c = programs::FROM_CONTAINER;

    // The gateway's own address: answered with the gateway MAC, as a router.
    let (verdict, out) = f.run(c, &neighbor_solicitation(EP_A.mac, EP_A6, A6_GATEWAY));
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "back out of the veth; counters {:?}",
        f.dp.maps().stats().unwrap()
    );
    let expected = neighbor_advertisement(EP_A.gw_mac, A6_GATEWAY, EP_A.mac, EP_A6, true);
    assert!(
        out == expected,
        "NA differs:\n got  {}\n want {}",
        hex(&out),
        hex(&expected)
    );
    // Any other address of the network, from the container's link-local address.
    let (verdict, out) = f.run(c, &neighbor_solicitation(EP_A.mac, EP_A_LINK_LOCAL, R_A6));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let expected = neighbor_advertisement(EP_A.gw_mac, R_A6, EP_A.mac, EP_A_LINK_LOCAL, false);
    assert!(
        out == expected,
        "NA differs:\n got  {}\n want {}",
        hex(&out),
        hex(&expected)
    );
    // Without a source link-layer option (78 bytes), the answer is still the whole NA.
    let snm = solicited_node(EP_A6_ELSEWHERE);
    let mut m = vec![135, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&EP_A6_ELSEWHERE.octets());
    let bare = eth(
        [0x33, 0x33, 0xff, 0, 0, 3],
        EP_A.mac,
        ETH_P_IPV6,
        &ipv6(EP_A6, snm, IPPROTO_ICMPV6, 255, &icmpv6(EP_A6, snm, &m)),
    );
    assert_eq!(bare.len(), 78);
    let (verdict, out) = f.run(c, &bare);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert!(
        out == neighbor_advertisement(EP_A.gw_mac, EP_A6_ELSEWHERE, EP_A.mac, EP_A6, false),
        "NA to a bare NS: {}",
        hex(&out)
    );
    assert_eq!(f.stat(VNI_A, Counter::NdReplied), 3);

    // Not answered: another network's address, an address outside the overlays, a
    // duplicate-address probe, a solicitor that is not who it claims to be.
    f.expect_drop(
        "NS for network B's container",
        c,
        &neighbor_solicitation(EP_A.mac, EP_A6, EP_B6),
        VNI_A,
        Counter::DropCrossNetwork,
    );
    f.expect_drop(
        "NS for an outside address",
        c,
        &neighbor_solicitation(
            EP_A.mac,
            EP_A6,
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
        ),
        VNI_A,
        Counter::NdIgnored,
    );
    f.expect_drop(
        "duplicate-address probe",
        c,
        &neighbor_solicitation(EP_A.mac, Ipv6Addr::UNSPECIFIED, EP_A6),
        NO_NETWORK,
        Counter::NdIgnored,
    );
    f.expect_drop(
        "NS from another container's address",
        c,
        &neighbor_solicitation(EP_A.mac, EP_A6_ELSEWHERE, A6_GATEWAY),
        NO_NETWORK,
        Counter::DropSpoofedSource,
    );
    let mut forwarded = neighbor_solicitation(EP_A.mac, EP_A6, A6_GATEWAY);
    forwarded[21] = 64;
    f.expect_drop(
        "NS with hop limit 64 (forwarded)",
        c,
        &forwarded,
        VNI_A,
        Counter::NdIgnored,
    );

    // The host's solicitation for a container: answered with the host link peer's MAC.
    let (verdict, out) = f.run(
        programs::FROM_HOST,
        &neighbor_solicitation(HOST_MAC, A6_GATEWAY, EP_A6),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT, "host NS");
    assert!(
        out == neighbor_advertisement(HOST_LINK_PEER_MAC, EP_A6, HOST_MAC, A6_GATEWAY, false),
        "host NA: {}",
        hex(&out)
    );
    assert_eq!(f.stat(NO_NETWORK, Counter::NdReplied), 1);
}

/// Clears DF in an IPv4 packet and fixes its header checksum.
fn clear_dont_fragment(ip: &mut [u8]) {
    ip[6] &= !0x40;
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = inet_checksum(&ip[..20]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn too_big_packets_are_answered_with_the_overlay_mtu_byte_for_byte() {
    let mut f = Fixture::new();
    with_ipv6(&mut f);
    let c = programs::FROM_CONTAINER;
    const QUOTE: usize = 256;

    // IPv4 with DF: ICMP frag-needed (RFC 1191) from the destination, MTU 1420.
    let remote = Ipv4Addr::new(9, 0, 2, 2);
    let p = ping_packet(EP_A.ip, remote, 1500 - 28);
    let input = container_frame(EP_A.mac, EP_A.gw_mac, &p);
    let (verdict, out) = f.run(c, &input);
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "sent back; counters {:?}",
        f.dp.maps().stats().unwrap()
    );
    assert_eq!(out.len(), 14 + 20 + 8 + QUOTE);
    assert_eq!(&out[0..6], &EP_A.mac, "to the sender");
    assert_eq!(&out[6..12], &EP_A.gw_mac, "from its gateway");
    assert_eq!(u16_at(&out, 12), ETH_P_IP);
    let ip = &out[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(inet_checksum(ip), 0, "IPv4 header checksum");
    assert_eq!(u16_at(ip, 2) as usize, out.len() - 14);
    assert_eq!(ip[9], IPPROTO_ICMP);
    assert_eq!(
        &ip[12..16],
        &remote.octets(),
        "from the packet's destination"
    );
    assert_eq!(&ip[16..20], &EP_A.ip.octets(), "to its source");
    assert_eq!(
        &out[34..36],
        &[3, 4],
        "destination unreachable, fragmentation needed"
    );
    assert_eq!(&out[36 + 2..42], &[0, 0, 0x05, 0x8c], "next-hop MTU 1420");
    assert_eq!(inet_checksum(&out[34..]), 0, "ICMP checksum");
    assert!(out[42..] == p[..QUOTE], "quote of the packet");
    assert_eq!(f.stat(VNI_A, Counter::DropTooBig), 1);
    assert_eq!(f.stat(VNI_A, Counter::TooBigAnswered), 1);
    assert_eq!(f.stat(VNI_A, Counter::Encapsulated), 0);

    // IPv6: ICMPv6 Packet Too Big (RFC 4443 3.2).
    let p = ping6_packet(EP_A6, R_A6, 1500 - 48);
    let input = ipv6_frame(EP_A.mac, EP_A.gw_mac, &p);
    let (verdict, out) = f.run(c, &input);
    assert_eq!(verdict, TC_ACT_REDIRECT, "IPv6 sent back");
    assert_eq!(out.len(), 14 + 40 + 8 + QUOTE);
    assert_eq!(&out[0..6], &EP_A.mac);
    assert_eq!(&out[6..12], &EP_A.gw_mac);
    assert_eq!(u16_at(&out, 12), ETH_P_IPV6);
    assert_eq!(out[14] >> 4, 6);
    assert_eq!(u16_at(&out, 18) as usize, 8 + QUOTE, "payload length");
    assert_eq!(out[20], IPPROTO_ICMPV6);
    assert_eq!(
        &out[22..38],
        &R_A6.octets(),
        "from the packet's destination"
    );
    assert_eq!(&out[38..54], &EP_A6.octets(), "to its source");
    assert_eq!(&out[54..56], &[2, 0], "packet too big");
    assert_eq!(&out[58..62], &1420u32.to_be_bytes(), "MTU");
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&R_A6.octets());
    pseudo.extend_from_slice(&EP_A6.octets());
    pseudo.extend_from_slice(&((8 + QUOTE) as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_ICMPV6]);
    pseudo.extend_from_slice(&out[54..]);
    assert_eq!(inet_checksum(&pseudo), 0, "ICMPv6 checksum");
    assert!(out[62..] == p[..QUOTE], "quote of the packet");
    assert_eq!(f.stat(VNI_A, Counter::DropTooBig), 2);
    assert_eq!(f.stat(VNI_A, Counter::TooBigAnswered), 2);

    // IPv4 without DF: the sender does no path MTU discovery; dropped and counted only.
    let mut p = ping_packet(EP_A.ip, remote, 1500 - 28);
    clear_dont_fragment(&mut p);
    f.expect_drop(
        "1500 bytes without DF",
        c,
        &container_frame(EP_A.mac, EP_A.gw_mac, &p),
        VNI_A,
        Counter::DropTooBig,
    );
    assert_eq!(f.stat(VNI_A, Counter::TooBigAnswered), 2);
}

/// A frame agent R sends in the shared VNI 1024, from `src` to `dst`.
fn shared_vxlan_from_r(src: Ipv4Addr, dst: Ipv4Addr) -> VxlanFrame {
    VxlanFrame {
        vni: SHARED_VNI,
        ..vxlan_from_r(src, dst)
    }
}

#[test]
fn shared_vni_carries_every_network_and_encap_writes_it() {
    let f = Fixture::shared();
    // Network B's container to R's block of network B: VNI 1024 on the wire, counted under B.
    let inner = ping_packet(EP_B.ip, Ipv4Addr::new(9, 1, 2, 2), 56);
    let (verdict, out) = f.run(
        programs::FROM_CONTAINER,
        &container_frame(EP_B.mac, EP_B.gw_mac, &inner),
    );
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "encap verdict; counters {:?}",
        f.dp.maps().stats().unwrap()
    );
    assert_eq!(
        &out[42..50],
        &[0x08, 0, 0, 0, 0x00, 0x04, 0x00, 0],
        "network B goes out in VNI 1024"
    );
    assert!(out[64..] == inner[..]);
    assert_eq!(f.stat(VNI_B, Counter::Encapsulated), 1);
    assert_eq!(f.stat(VNI_A, Counter::Encapsulated), 0);

    // Both networks come in on VNI 1024 and reach their own network's containers.
    for (src, ep, network) in [
        (Ipv4Addr::new(9, 0, 2, 2), &EP_A, VNI_A),
        (Ipv4Addr::new(9, 1, 2, 2), &EP_B, VNI_B),
    ] {
        let v = shared_vxlan_from_r(src, ep.ip);
        let (verdict, out) = f.run(programs::FROM_UNDERLAY, &v.frame());
        assert_eq!(
            verdict,
            TC_ACT_REDIRECT,
            "{src} -> {}; counters {:?}",
            ep.ip,
            f.dp.maps().stats().unwrap()
        );
        assert!(out == eth(ep.mac, ep.gw_mac, ETH_P_IP, &v.inner_ip));
        assert_eq!(f.stat(network, Counter::Decapsulated), 1);
    }
}

#[test]
fn shared_vni_cross_network_packets_from_a_remote_vtep_or_a_container_are_dropped_and_counted() {
    let f = Fixture::shared();
    let u = programs::FROM_UNDERLAY;
    // A remote VTEP forges what a kernel agent's datapath (no isolation) would forward: network
    // B's source to network A's container, and the other way, both in VNI 1024.
    f.expect_drop(
        "B -> A in VNI 1024",
        u,
        &shared_vxlan_from_r(Ipv4Addr::new(9, 1, 2, 5), EP_A.ip).frame(),
        VNI_B,
        Counter::DropCrossNetwork,
    );
    f.expect_drop(
        "A -> B in VNI 1024",
        u,
        &shared_vxlan_from_r(Ipv4Addr::new(9, 0, 2, 5), EP_B.ip).frame(),
        VNI_A,
        Counter::DropCrossNetwork,
    );
    // A source R does not own (S's block of A; a local container's address) is spoofed, on any
    // network: the anti-spoofing check stays in front of the network check.
    f.expect_drop(
        "S's source sent by R in VNI 1024",
        u,
        &shared_vxlan_from_r(Ipv4Addr::new(9, 0, 3, 5), EP_B.ip).frame(),
        VNI_B,
        Counter::DropSpoofedSource,
    );
    f.expect_drop(
        "a local address as source in VNI 1024",
        u,
        &shared_vxlan_from_r(EP_A_ELSEWHERE.ip, EP_A.ip).frame(),
        VNI_A,
        Counter::DropSpoofedSource,
    );
    // For no endpoint, the network is the source's, which R owns (a shared VNI names none).
    f.expect_drop(
        "no such endpoint in VNI 1024",
        u,
        &shared_vxlan_from_r(Ipv4Addr::new(9, 0, 2, 5), Ipv4Addr::new(9, 0, 1, 77)).frame(),
        VNI_A,
        Counter::DropNoEndpoint,
    );
    // VNI 2048 is nobody's once both networks share 1024.
    f.expect_drop(
        "B's old VNI",
        u,
        &VxlanFrame {
            vni: VNI_B,
            ..vxlan_from_r(Ipv4Addr::new(9, 1, 2, 5), EP_B.ip)
        }
        .frame(),
        NO_NETWORK,
        Counter::DropUnknownVni,
    );
    assert_eq!(f.stat(VNI_A, Counter::Decapsulated), 0);
    assert_eq!(f.stat(VNI_B, Counter::Decapsulated), 0);

    // A container of network A: to network B's local and remote addresses (never encapsulated,
    // whatever the VNI would be), and VXLAN of its own in VNI 1024 to an agent.
    let c = programs::FROM_CONTAINER;
    for dst in [
        EP_B.ip,
        Ipv4Addr::new(9, 1, 2, 2),
        Ipv4Addr::new(9, 1, 9, 9),
    ] {
        f.expect_drop(
            &format!("container of A to {dst} on B"),
            c,
            &container_frame(EP_A.mac, EP_A.gw_mac, &ping_packet(EP_A.ip, dst, 56)),
            VNI_A,
            Counter::DropCrossNetwork,
        );
    }
    let forged = shared_vxlan_from_r(Ipv4Addr::new(9, 0, 1, 2), EP_B.ip);
    let forged_udp = udp(51234, VXLAN_PORT, &forged.udp_payload());
    f.expect_drop(
        "container's own VXLAN in VNI 1024 to agent R",
        c,
        &container_frame(
            EP_A.mac,
            EP_A.gw_mac,
            &ipv4(EP_A.ip, R_UNDERLAY, IPPROTO_UDP, &forged_udp),
        ),
        VNI_A,
        Counter::DropContainerVxlan,
    );
    assert_eq!(f.stat(VNI_A, Counter::Encapsulated), 0);
}

/// The micro-benchmark's packets (`cargo xtask bench --micro`) take the paths its table names:
/// each run's verdict, output and counter are checked by the fixture itself, so a misrouted
/// packet fails here as it fails the bench.
#[test]
fn micro_benchmark_cases_take_their_paths() {
    let bench = overlay_tests::micro_bench::MicroBench::new().unwrap();
    let cases = bench.cases().unwrap();
    let names: Vec<_> = cases.iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        [
            "local delivery",
            "encap",
            "decap",
            "masquerade egress",
            "reply translation",
            "ARP reply",
            "NDP reply",
            "drop (cross network)"
        ]
    );
    for case in &cases {
        let ns = bench.run(case, 3).unwrap();
        assert_eq!(ns.len(), 3, "{}", case.name);
    }
    let drop = cases.last().unwrap();
    bench.run_repeated(drop, 10).unwrap();
    // Repeating a path that rewrites its packet would measure its own output: refused.
    assert!(bench.run_repeated(&cases[1], 10).is_err());
}

/// A network's counter slot comes back when the network goes and nothing of it is left, and the
/// next network finds it zeroed: networks that come and go do not use up the 255 slots (after
/// which every new network would count, unseen, in the no-network slot).
#[test]
fn a_removed_networks_counter_slot_is_given_back_zeroed() {
    const GONE: u32 = 4001;
    const NEXT: u32 = 4002;
    let mut f = Fixture::new();
    let m = f.dp.maps_mut();
    // Network A still has endpoints and routes here: they count in its slot, which stays.
    let slot_a = m.counter_slots().unwrap()[&VNI_A];
    m.remove_network(VNI_A).unwrap();
    assert_eq!(m.counter_slots().unwrap().get(&VNI_A), Some(&slot_a));

    m.put_network(GONE, Network::default()).unwrap();
    let slot = m.counter_slots().unwrap()[&GONE];
    assert_ne!(slot, 0);
    m.add_counts(GONE, Counter::Encapsulated as u32, &[(7, 700)])
        .unwrap();
    assert!(
        m.stats()
            .unwrap()
            .iter()
            .any(|r| r.network == GONE && r.packets == 7)
    );
    m.remove_network(GONE).unwrap();
    assert!(!m.counter_slots().unwrap().contains_key(&GONE));

    m.put_network(NEXT, Network::default()).unwrap();
    assert_eq!(
        m.counter_slots().unwrap()[&NEXT],
        slot,
        "the lowest free slot is reused"
    );
    let rows = m.stats().unwrap();
    assert!(
        rows.iter().all(|r| r.network != GONE),
        "the gone network is still reported"
    );
    assert!(
        rows.iter()
            .filter(|r| r.network == NEXT)
            .all(|r| r.packets == 0 && r.bytes == 0),
        "the reused slot kept the gone network's counts"
    );
}
