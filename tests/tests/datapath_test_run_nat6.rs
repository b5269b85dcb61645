//! IPv6 masquerade run by the kernel on packets we build, byte for byte (`BPF_PROG_TEST_RUN`):
//! a container's TCP, UDP and ICMPv6 echo to outside every overlay leave with the underlay's IPv6
//! address and a masquerade port, the answers come back to the container as it sent them, ICMPv6
//! errors about a flow reach it with the quoted packet rewritten (every checksum over the
//! pseudo-header right), and what may not go out is dropped and counted by reason.
//!
//! As in `datapath_test_run.rs`, the test-run skb is on loopback (ifindex 1), so the sending
//! endpoints are attached to ifindex 1. Packets and their checksums are built here, independently
//! of `overlay_common`.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::{HashMap as AyaHashMap, Map, MapData};
use overlay_agent::{datapath::Datapath, masquerade};
use overlay_common::{
    counters::{Counter, NO_NETWORK},
    maps::{
        Endpoint, NatConfig, NatEntry, NatKey, Network, OverlaySubnet, names, nat_direction,
        programs,
    },
};
use overlay_datapath::{AgentSettings, PinLayout, ProtectedDestination, addr16};
use overlay_tests::support_packets::*;
use overlay_tests::test_run::TestRun as _;

const LOOPBACK: u32 = 1;
const VNI_A: u32 = 1024;
/// A network that opted out of masquerade.
const VNI_PLAIN: u32 = 1025;

const LOCAL_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 11);
/// The underlay NIC's IPv6 address: the masquerade source.
const UNDERLAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xfab, 0, 0, 0, 0, 0, 0x11);
/// Outside every overlay: the far end, a router on the way, the master.
const EXT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xfab, 0, 0, 0, 0, 0, 0xfe);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xfab, 0, 0, 0, 0, 0, 1);
const MASTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xfab, 0, 0, 0, 0, 0, 2);

/// A container on dcos6-like network A (fd01:b::/64) and one on the plain network.
const EP6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xb, 0, 0, 0, 0, 0, 2);
const EP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
const EP_GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const PLAIN6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xc, 0, 0, 0, 0, 0, 2);
const PLAIN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x02];
const PLAIN_GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
/// MACs of underlay frames (arbitrary: the kernel fills them on the way out).
const NIC_MACS: ([u8; 6], [u8; 6]) = ([0x02, 0, 0, 0, 0xee, 1], [0x02, 0, 0, 0, 0xee, 2]);

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
    _pins: PinGuard,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Masquerade settings as the agent writes them, with `UNDERLAY6` as the IPv6 source.
fn nat(ports: std::ops::RangeInclusive<u16>, per_destination: u32) -> NatConfig {
    let cfg = masquerade::nat_config(&ports, Default::default(), 32, per_destination, None);
    masquerade::with_ipv6_source(cfg, Some(UNDERLAY6))
}

impl Fixture {
    fn new(nat_config: NatConfig) -> Fixture {
        overlay_lab::ensure_bpffs().unwrap();
        let instance = format!(
            "testrun6-{}-{}",
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
            vtep_mac: [0x70, 0xb3, 0xd5, 0x80, 0, 1],
            vxlan_port: VXLAN_PORT,
            overlay_mtu: 1420,
            spare_headroom: false,
        })
        .unwrap();
        m.set_nat_config(&nat_config).unwrap();
        m.put_network(VNI_A, Network::new(true)).unwrap();
        m.put_network(VNI_PLAIN, Network::new(false)).unwrap();
        m.put_subnet("fd01:b::/64".parse().unwrap(), OverlaySubnet::new(VNI_A))
            .unwrap();
        m.put_subnet(
            "fd01:c::/64".parse().unwrap(),
            OverlaySubnet::new(VNI_PLAIN),
        )
        .unwrap();
        m.put_endpoint(
            IpAddr::V6(EP6),
            Endpoint::container(LOOPBACK, VNI_A, EP_MAC, EP_GW_MAC),
        )
        .unwrap();
        m.put_endpoint(
            IpAddr::V6(PLAIN6),
            Endpoint::container(LOOPBACK, VNI_PLAIN, PLAIN_MAC, PLAIN_GW_MAC),
        )
        .unwrap();
        m.set_protected(&[
            ProtectedDestination {
                addr: Some(IpAddr::V6(MASTER6)),
                port: 5050,
                protocol: IPPROTO_TCP,
            },
            ProtectedDestination {
                addr: None,
                port: 9101,
                protocol: IPPROTO_TCP,
            },
        ])
        .unwrap();
        Fixture { dp, _pins: guard }
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

    /// Runs `program` on `packet`, expects a drop counted exactly once under `(vni, counter)`.
    fn expect_drop(&self, what: &str, program: &str, packet: &[u8], vni: u32, counter: Counter) {
        self.dp
            .expect_counted_once(what, program, packet, TC_ACT_SHOT, vni, counter, 0);
    }

    /// Runs `program` on `frame` and expects it passed untouched and uncounted.
    fn expect_untouched(&self, what: &str, program: &str, frame: &[u8]) {
        let total = self.total_packets();
        let (verdict, out) = self.run(program, frame);
        assert_eq!(verdict, TC_ACT_OK, "{what}: verdict");
        assert!(out == frame, "{what}: frame altered: {}", hex(&out));
        assert_eq!(self.total_packets(), total, "{what}: counted");
    }

    /// The masquerade port (or echo identifier) of the container's flow `protocol`
    /// `EP6:local_port` -> `remote:remote_port`.
    fn allocated(&self, protocol: u8, local_port: u16, remote: Ipv6Addr, remote_port: u16) -> u16 {
        let key = NatKey::egress(
            protocol,
            addr16(IpAddr::V6(EP6)),
            local_port,
            addr16(IpAddr::V6(remote)),
            remote_port,
        );
        let entries = self.dp.maps().nat_entries().unwrap();
        let (_, e) = entries
            .iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("no egress entry {key:?} in {entries:?}"));
        assert_eq!(e.addr, addr16(IpAddr::V6(UNDERLAY6)), "translated source");
        assert!(
            entries
                .iter()
                .any(|(k, b)| k.direction == nat_direction::INGRESS
                    && k.local == e.addr
                    && k.local_port == e.port
                    && b.addr == key.local
                    && b.port == local_port),
            "no ingress entry for {key:?}"
        );
        e.port
    }
}

/// The checksum of an upper-layer packet over IPv6 (RFC 8200 8.1 pseudo-header).
fn checksum6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, body: &[u8]) -> u16 {
    let mut p = Vec::new();
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&(body.len() as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, next]);
    p.extend_from_slice(body);
    inet_checksum(&p)
}

/// A UDP datagram over IPv6 with its checksum.
fn udp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = udp(sport, dport, payload);
    let c = checksum6(src, dst, IPPROTO_UDP, &u);
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// A 20-byte TCP segment with `flags` over IPv6, with its checksum.
fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&7_000_000u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64800u16.to_be_bytes());
    let c = checksum6(src, dst, IPPROTO_TCP, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// An ICMPv6 echo request (128) or reply (129) with `id`.
fn echo6(src: Ipv6Addr, dst: Ipv6Addr, icmp_type: u8, id: u16) -> Vec<u8> {
    let mut m = vec![icmp_type, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0, 7]);
    m.extend((0..40u8).map(|i| i * 3));
    icmpv6(src, dst, &m)
}

/// An IPv6 packet (hop limit 64) carrying `body` (next header `next`).
fn pkt6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, body: &[u8]) -> Vec<u8> {
    ipv6(src, dst, next, 64, body)
}

/// A frame from the container on network A, and one from the underlay.
fn from_container(ip: &[u8]) -> Vec<u8> {
    eth(EP_GW_MAC, EP_MAC, ETH_P_IPV6, ip)
}

fn from_underlay(ip: &[u8]) -> Vec<u8> {
    eth(NIC_MACS.0, NIC_MACS.1, ETH_P_IPV6, ip)
}

/// The frame delivered to the container on network A.
fn to_container(ip: &[u8]) -> Vec<u8> {
    eth(EP_MAC, EP_GW_MAC, ETH_P_IPV6, ip)
}

/// An ICMPv6 error from `from` to `to`: `icmp_type`/`code`, 4 bytes of `info`, `quoted`.
fn icmpv6_error(
    from: Ipv6Addr,
    to: Ipv6Addr,
    (icmp_type, code, info): (u8, u8, u32),
    quoted: &[u8],
) -> Vec<u8> {
    let mut m = vec![icmp_type, code, 0, 0];
    m.extend_from_slice(&info.to_be_bytes());
    m.extend_from_slice(quoted);
    pkt6(from, to, IPPROTO_ICMPV6, &icmpv6(from, to, &m))
}

fn assert_frame(what: &str, got: &[u8], want: &[u8]) {
    assert!(
        got == want,
        "{what} differs:\n got  {}\n want {}",
        hex(got),
        hex(want)
    );
}

const UDP_PAYLOAD: &[u8] = b"masquerade me over IPv6";

/// Sends the container's UDP, TCP SYN and ICMPv6 echo out; checks each against the packet
/// masquerade must make of it; returns what went out (UDP, TCP, echo) and the ports used.
fn egress_three_flows(f: &Fixture) -> ([Vec<u8>; 3], [u16; 3]) {
    let c = programs::FROM_CONTAINER;
    let sent = [
        pkt6(
            EP6,
            EXT6,
            IPPROTO_UDP,
            &udp6(EP6, EXT6, 40000, 9000, UDP_PAYLOAD),
        ),
        pkt6(EP6, EXT6, IPPROTO_TCP, &tcp6(EP6, EXT6, 40001, 443, 0x02)),
        pkt6(EP6, EXT6, IPPROTO_ICMPV6, &echo6(EP6, EXT6, 128, 0x4242)),
    ];
    let mut out_packets = vec![];
    let mut ports = vec![];
    for (i, packet) in sent.iter().enumerate() {
        let (verdict, out) = f.run(c, &from_container(packet));
        assert_eq!(
            verdict,
            TC_ACT_REDIRECT,
            "flow {i}: redirected out of the underlay NIC; counters {:?}",
            f.dp.maps().stats().unwrap()
        );
        let (want, port) = match i {
            0 => {
                let p = f.allocated(IPPROTO_UDP, 40000, EXT6, 9000);
                let u = udp6(UNDERLAY6, EXT6, p, 9000, UDP_PAYLOAD);
                (pkt6(UNDERLAY6, EXT6, IPPROTO_UDP, &u), p)
            }
            1 => {
                let p = f.allocated(IPPROTO_TCP, 40001, EXT6, 443);
                let t = tcp6(UNDERLAY6, EXT6, p, 443, 0x02);
                (pkt6(UNDERLAY6, EXT6, IPPROTO_TCP, &t), p)
            }
            _ => {
                let id = f.allocated(IPPROTO_ICMPV6, 0x4242, EXT6, 0);
                let e = echo6(UNDERLAY6, EXT6, 128, id);
                (pkt6(UNDERLAY6, EXT6, IPPROTO_ICMPV6, &e), id)
            }
        };
        assert!(
            (61000..=63999).contains(&port),
            "flow {i}: port {port} outside the masquerade range"
        );
        // The MACs stay: bpf_redirect_neigh fills them in on the way out.
        assert_frame(
            &format!("flow {i} as it leaves"),
            &out,
            &from_container(&want),
        );
        out_packets.push(out[14..].to_vec());
        ports.push(port);
    }
    assert_eq!(f.stat(VNI_A, Counter::Masqueraded), 3);
    assert_eq!(f.stat(VNI_A, Counter::NatCreated), 3);
    (out_packets.try_into().unwrap(), ports.try_into().unwrap())
}

#[test]
fn ipv6_egress_is_masqueraded_and_replies_come_back_byte_for_byte() {
    let f = Fixture::new(nat(61000..=63999, 0));
    let (_, [udp_port, tcp_port, echo_id]) = egress_three_flows(&f);
    // The same flow again keeps its port.
    let again = pkt6(
        EP6,
        EXT6,
        IPPROTO_UDP,
        &udp6(EP6, EXT6, 40000, 9000, b"again"),
    );
    let (verdict, out) = f.run(programs::FROM_CONTAINER, &from_container(&again));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(u16_at(&out, 54), udp_port, "second datagram, same port");
    assert_eq!(f.stat(VNI_A, Counter::NatCreated), 3);

    // The answers, to the underlay address and the flows' ports, reach the container as if the
    // far end had answered it directly.
    let u = programs::FROM_UNDERLAY;
    let replies = [
        (
            pkt6(
                EXT6,
                UNDERLAY6,
                IPPROTO_UDP,
                &udp6(EXT6, UNDERLAY6, 9000, udp_port, b"answer"),
            ),
            pkt6(
                EXT6,
                EP6,
                IPPROTO_UDP,
                &udp6(EXT6, EP6, 9000, 40000, b"answer"),
            ),
        ),
        (
            pkt6(
                EXT6,
                UNDERLAY6,
                IPPROTO_TCP,
                &tcp6(EXT6, UNDERLAY6, 443, tcp_port, 0x12),
            ),
            pkt6(EXT6, EP6, IPPROTO_TCP, &tcp6(EXT6, EP6, 443, 40001, 0x12)),
        ),
        (
            pkt6(
                EXT6,
                UNDERLAY6,
                IPPROTO_ICMPV6,
                &echo6(EXT6, UNDERLAY6, 129, echo_id),
            ),
            pkt6(EXT6, EP6, IPPROTO_ICMPV6, &echo6(EXT6, EP6, 129, 0x4242)),
        ),
    ];
    for (i, (reply, want)) in replies.iter().enumerate() {
        let (verdict, out) = f.run(u, &from_underlay(reply));
        assert_eq!(
            verdict,
            TC_ACT_REDIRECT,
            "reply {i} delivered; counters {:?}",
            f.dp.maps().stats().unwrap()
        );
        assert_frame(
            &format!("reply {i} to the container"),
            &out,
            &to_container(want),
        );
    }
    assert_eq!(f.stat(VNI_A, Counter::Unmasqueraded), 3);

    // What answers no flow of ours is the host's: untouched, uncounted.
    let no_flow = [
        (
            "UDP to another masquerade port",
            pkt6(
                EXT6,
                UNDERLAY6,
                IPPROTO_UDP,
                &udp6(EXT6, UNDERLAY6, 9000, udp_port ^ 1, b"x"),
            ),
        ),
        (
            "UDP from another far port",
            pkt6(
                EXT6,
                UNDERLAY6,
                IPPROTO_UDP,
                &udp6(EXT6, UNDERLAY6, 9001, udp_port, b"x"),
            ),
        ),
        (
            "an echo request to the host",
            pkt6(
                EXT6,
                UNDERLAY6,
                IPPROTO_ICMPV6,
                &echo6(EXT6, UNDERLAY6, 128, echo_id),
            ),
        ),
        (
            "TCP to the host's ssh",
            pkt6(
                EXT6,
                UNDERLAY6,
                IPPROTO_TCP,
                &tcp6(EXT6, UNDERLAY6, 50000, 22, 0x02),
            ),
        ),
        (
            "a flow's tuple to another of the host's addresses",
            pkt6(
                EXT6,
                ROUTER6,
                IPPROTO_UDP,
                &udp6(EXT6, ROUTER6, 9000, udp_port, b"x"),
            ),
        ),
    ];
    for (what, p) in no_flow {
        f.expect_untouched(what, u, &from_underlay(&p));
    }
    // The IPv4 tuple of the same ports is another flow: a reply over IPv4 is not ours either.
    f.expect_untouched(
        "the same ports over IPv4",
        u,
        &eth(
            NIC_MACS.0,
            NIC_MACS.1,
            ETH_P_IP,
            &ipv4(
                Ipv4Addr::new(10, 250, 0, 254),
                LOCAL_UNDERLAY,
                IPPROTO_UDP,
                &udp(9000, udp_port, b"x"),
            ),
        ),
    );
}

#[test]
fn icmpv6_errors_about_a_flow_reach_its_container_with_the_quote_rewritten() {
    let f = Fixture::new(nat(61000..=63999, 0));
    let ([udp_out, tcp_out, echo_out], _) = egress_three_flows(&f);
    let udp_sent = pkt6(
        EP6,
        EXT6,
        IPPROTO_UDP,
        &udp6(EP6, EXT6, 40000, 9000, UDP_PAYLOAD),
    );
    let tcp_sent = pkt6(EP6, EXT6, IPPROTO_TCP, &tcp6(EP6, EXT6, 40001, 443, 0x02));
    let echo_sent = pkt6(EP6, EXT6, IPPROTO_ICMPV6, &echo6(EP6, EXT6, 128, 0x4242));
    let u = programs::FROM_UNDERLAY;
    let cases = [
        // Packet Too Big from a router on the path (MTU 1280), quoting the whole datagram: the
        // container sees its own datagram quoted, every checksum as it sent it.
        (
            "packet too big about UDP",
            (2, 0, 1280),
            ROUTER6,
            udp_out.clone(),
            udp_sent.clone(),
        ),
        // Port unreachable from the far end itself.
        (
            "port unreachable about UDP",
            (1, 4, 0),
            EXT6,
            udp_out,
            udp_sent,
        ),
        // Time exceeded quoting the echo request whole.
        (
            "time exceeded about an echo",
            (3, 0, 0),
            ROUTER6,
            echo_out,
            echo_sent,
        ),
        // Destination unreachable quoting only the IPv6 header and 8 bytes of TCP.
        (
            "address unreachable about TCP, short quote",
            (1, 3, 0),
            ROUTER6,
            tcp_out[..48].to_vec(),
            tcp_sent[..48].to_vec(),
        ),
    ];
    for (i, (what, kind, from, quoted, want_quoted)) in cases.into_iter().enumerate() {
        let error = icmpv6_error(from, UNDERLAY6, kind, &quoted);
        let (verdict, out) = f.run(u, &from_underlay(&error));
        assert_eq!(
            verdict,
            TC_ACT_REDIRECT,
            "{what}: delivered; counters {:?}",
            f.dp.maps().stats().unwrap()
        );
        let want = icmpv6_error(from, EP6, kind, &want_quoted);
        assert_frame(what, &out, &to_container(&want));
        assert_eq!(f.stat(VNI_A, Counter::Unmasqueraded), i as u64 + 1);
    }

    // Errors about no flow of ours are the host's: another source quoted, another port, an
    // echo reply quoted, a quote cut short of the transport header.
    let udp_port = f.allocated(IPPROTO_UDP, 40000, EXT6, 9000);
    let other_source = pkt6(
        ROUTER6,
        EXT6,
        IPPROTO_UDP,
        &udp6(ROUTER6, EXT6, udp_port, 9000, b"x"),
    );
    let other_port = pkt6(
        UNDERLAY6,
        EXT6,
        IPPROTO_UDP,
        &udp6(UNDERLAY6, EXT6, udp_port ^ 1, 9000, b"x"),
    );
    let reply_quoted = pkt6(
        UNDERLAY6,
        EXT6,
        IPPROTO_ICMPV6,
        &echo6(UNDERLAY6, EXT6, 129, udp_port),
    );
    let udp_ours = pkt6(
        UNDERLAY6,
        EXT6,
        IPPROTO_UDP,
        &udp6(UNDERLAY6, EXT6, udp_port, 9000, b"x"),
    );
    for (what, quoted) in [
        ("another source quoted", other_source),
        ("another port quoted", other_port),
        ("an echo reply quoted", reply_quoted),
        ("a quote of 44 bytes", udp_ours[..44].to_vec()),
    ] {
        let error = icmpv6_error(ROUTER6, UNDERLAY6, (2, 0, 1280), &quoted);
        f.expect_untouched(what, u, &from_underlay(&error));
    }
}

#[test]
fn ipv6_to_the_outside_drops_and_passes_are_counted_by_reason() {
    let mut f = Fixture::new(nat(61000..=63999, 2));
    let c = programs::FROM_CONTAINER;
    let udp_to = |dst: Ipv6Addr, port: u16| {
        from_container(&pkt6(
            EP6,
            dst,
            IPPROTO_UDP,
            &udp6(EP6, dst, 40000, port, b"x"),
        ))
    };
    let syn_to = |dst: Ipv6Addr, port: u16| {
        from_container(&pkt6(
            EP6,
            dst,
            IPPROTO_TCP,
            &tcp6(EP6, dst, 40000, port, 0x02),
        ))
    };

    // Nowhere to go: IPv4 in IPv6 clothes, loopback, unspecified.
    for (what, dst) in [
        ("IPv4-mapped", "::ffff:10.250.0.254"),
        ("loopback", "::1"),
        ("unspecified", "::"),
    ] {
        f.expect_drop(
            what,
            c,
            &udp_to(dst.parse().unwrap(), 9000),
            VNI_A,
            Counter::DropNoRoute,
        );
    }
    // The control plane over IPv6: the master's API, an agent port on this agent's IPv6
    // address, VXLAN to it; extension headers hide the port from the check, so they do not
    // reach an agent at all.
    for (what, frame, counter) in [
        (
            "the master's API",
            syn_to(MASTER6, 5050),
            Counter::DropControlPlane,
        ),
        (
            "an agent port on the underlay's IPv6 address",
            syn_to(UNDERLAY6, 9101),
            Counter::DropControlPlane,
        ),
        (
            "VXLAN to this agent's IPv6 address",
            udp_to(UNDERLAY6, VXLAN_PORT),
            Counter::DropContainerVxlan,
        ),
        (
            "a hop-by-hop header in front, to this agent",
            from_container(&pkt6(EP6, UNDERLAY6, 0, &[17, 0, 1, 4, 0, 0, 0, 0])),
            Counter::DropControlPlane,
        ),
    ] {
        f.expect_drop(what, c, &frame, VNI_A, counter);
    }
    // A container's IPv4 address in IPv6 form is the key of its IPv4 endpoint, not an IPv6
    // address of its own.
    let mut f2 = Fixture::new(nat(61000..=63999, 0));
    let v4 = Ipv4Addr::new(9, 0, 1, 2);
    f2.dp
        .maps_mut()
        .put_endpoint(
            IpAddr::V4(v4),
            Endpoint::container(LOOPBACK, VNI_A, EP_MAC, EP_GW_MAC),
        )
        .unwrap();
    let mapped = v4.to_ipv6_mapped();
    f2.expect_drop(
        "an IPv4-mapped source",
        c,
        &from_container(&pkt6(
            mapped,
            EXT6,
            IPPROTO_UDP,
            &udp6(mapped, EXT6, 40000, 9000, b"x"),
        )),
        VNI_A,
        Counter::DropSpoofedSource,
    );
    drop(f2);
    // Masquerade translates TCP, UDP and echo requests only.
    for (what, packet) in [
        (
            "a fragment",
            pkt6(EP6, EXT6, 44, &[17, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0, 0]),
        ),
        ("SCTP", pkt6(EP6, EXT6, 132, &[0u8; 16])),
        (
            "an echo reply",
            pkt6(EP6, EXT6, IPPROTO_ICMPV6, &echo6(EP6, EXT6, 129, 7)),
        ),
        (
            "an ICMPv6 error",
            icmpv6_error(EP6, EXT6, (1, 4, 0), &[0u8; 48]),
        ),
    ] {
        f.expect_drop(
            what,
            c,
            &from_container(&packet),
            VNI_A,
            Counter::DropNatUnsupported,
        );
    }
    // Quota: two flows towards one destination, the third refused.
    for port in [41000, 41001] {
        let p = pkt6(EP6, EXT6, IPPROTO_UDP, &udp6(EP6, EXT6, port, 7000, b"q"));
        assert_eq!(f.run(c, &from_container(&p)).0, TC_ACT_REDIRECT);
    }
    let third = pkt6(EP6, EXT6, IPPROTO_UDP, &udp6(EP6, EXT6, 41002, 7000, b"q"));
    f.expect_drop(
        "a third flow to one destination",
        c,
        &from_container(&third),
        VNI_A,
        Counter::DropNatQuota,
    );

    // Not masqueraded, left to the host stack untouched: the host's own IPv6 address on another
    // port, and anything from a network that opted out.
    for (what, frame, vni) in [
        ("this agent's IPv6 address", syn_to(UNDERLAY6, 8080), VNI_A),
        (
            "a network that opted out",
            eth(
                PLAIN_GW_MAC,
                PLAIN_MAC,
                ETH_P_IPV6,
                &pkt6(
                    PLAIN6,
                    EXT6,
                    IPPROTO_UDP,
                    &udp6(PLAIN6, EXT6, 40000, 9000, b"x"),
                ),
            ),
            VNI_PLAIN,
        ),
    ] {
        let passed = f.stat(vni, Counter::PassedToHost);
        let (verdict, out) = f.run(c, &frame);
        assert_eq!(verdict, TC_ACT_OK, "{what}");
        assert!(out == frame, "{what}: altered");
        assert_eq!(f.stat(vni, Counter::PassedToHost), passed + 1, "{what}");
    }
    assert_eq!(f.stat(VNI_PLAIN, Counter::Masqueraded), 0);

    // A reply for a flow whose container has gone.
    let port = f.allocated(IPPROTO_UDP, 41000, EXT6, 7000);
    f.dp.maps_mut().remove_endpoint(IpAddr::V6(EP6)).unwrap();
    f.expect_drop(
        "a reply to a container that is gone",
        programs::FROM_UNDERLAY,
        &from_underlay(&pkt6(
            EXT6,
            UNDERLAY6,
            IPPROTO_UDP,
            &udp6(EXT6, UNDERLAY6, 7000, port, b"late"),
        )),
        VNI_A,
        Counter::DropNoEndpoint,
    );
    f.dp.maps_mut()
        .put_endpoint(
            IpAddr::V6(EP6),
            Endpoint::container(LOOPBACK, VNI_A, EP_MAC, EP_GW_MAC),
        )
        .unwrap();

    // No IPv6 address on the underlay: nothing leaves with the container's ULA source, and the
    // drop says why.
    let without = masquerade::with_ipv6_source(nat(61000..=63999, 2), None);
    f.dp.maps_mut().set_nat_config(&without).unwrap();
    let masqueraded = f.stat(VNI_A, Counter::Masqueraded);
    f.expect_drop(
        "no IPv6 source",
        c,
        &udp_to(EXT6, 9000),
        VNI_A,
        Counter::DropNat6NoAddress,
    );
    assert_eq!(f.stat(VNI_A, Counter::Masqueraded), masqueraded);
    // ... and replies to the old address are no longer ours.
    f.expect_untouched(
        "a reply while there is no IPv6 source",
        programs::FROM_UNDERLAY,
        &from_underlay(&pkt6(
            EXT6,
            UNDERLAY6,
            IPPROTO_UDP,
            &udp6(EXT6, UNDERLAY6, 7000, port, b"late"),
        )),
    );
    assert_eq!(f.stat(NO_NETWORK, Counter::DropNat6NoAddress), 0);
}

#[test]
fn ipv6_ports_run_out_like_ipv4_ones() {
    // Two masquerade ports: a third concurrent flow to one destination finds none.
    let f = Fixture::new(nat(61000..=61001, 0));
    let c = programs::FROM_CONTAINER;
    for port in [42000, 42001] {
        let p = pkt6(EP6, EXT6, IPPROTO_UDP, &udp6(EP6, EXT6, port, 7000, b"p"));
        assert_eq!(f.run(c, &from_container(&p)).0, TC_ACT_REDIRECT);
    }
    let third = pkt6(EP6, EXT6, IPPROTO_UDP, &udp6(EP6, EXT6, 42002, 7000, b"p"));
    let (verdict, _) = f.run(c, &from_container(&third));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(f.stat(VNI_A, Counter::DropNatNoPort), 1);
    assert!(f.stat(VNI_A, Counter::NatPortRetries) > 0);
    // Another destination port is another tuple: the same two ports serve it.
    let other = pkt6(EP6, EXT6, IPPROTO_UDP, &udp6(EP6, EXT6, 42002, 7001, b"p"));
    assert_eq!(f.run(c, &from_container(&other)).0, TC_ACT_REDIRECT);
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Opens `flows` masqueraded UDP flows from `EP6` to `EXT6` (two NAT entries each); returns the
/// table's entries.
fn open_udp_flows(f: &Fixture, flows: u16) -> Vec<(NatKey, NatEntry)> {
    for i in 0..flows {
        let p = pkt6(
            EP6,
            EXT6,
            IPPROTO_UDP,
            &udp6(EP6, EXT6, 10_000 + i, 53, b"q"),
        );
        let verdict = f.run(programs::FROM_CONTAINER, &from_container(&p)).0;
        assert_eq!(verdict, TC_ACT_REDIRECT, "flow {i}");
    }
    f.dp.maps().nat_entries().unwrap()
}

/// Another handle on the NAT table pinned at `pin`.
fn nat_table(pin: &Path) -> AyaHashMap<MapData, NatKey, NatEntry> {
    Map::LruHashMap(MapData::from_pin(pin).unwrap())
        .try_into()
        .unwrap()
}

/// A thread that removes and puts back every one of `entries` in the NAT table pinned at `pin`,
/// `passes` times over: the churn of closing and opening flows.
fn churn(
    pin: &Path,
    entries: Vec<(NatKey, NatEntry)>,
    passes: usize,
) -> std::thread::JoinHandle<()> {
    let mut table = nat_table(pin);
    std::thread::spawn(move || {
        for _ in 0..passes {
            for (k, e) in entries.iter().rev() {
                table.remove(k).unwrap();
                table.insert(k, e, 0).unwrap();
            }
        }
    })
}

/// The keys the NAT table of `f` holds.
fn nat_keys(f: &Fixture) -> Vec<NatKey> {
    f.dp.maps()
        .nat_entries()
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// The agent's walk of the flow table (its sweep, its metrics, `overlayctl`) is exact while
/// entries come and go under it, as LRU eviction and closing flows make them in a connection
/// storm: every walk ends, returns each entry at most once and nothing that never existed, and the
/// sweep's quota recount counts each flow once. An entry-by-entry walk fails this: when the key
/// it stands on goes, the kernel answers the next `GET_NEXT_KEY` with the table's first key and
/// the walk reads everything again.
#[test]
fn the_flow_table_walk_is_exact_while_entries_come_and_go_under_it() {
    const FLOWS: u16 = 3_000;
    const CHURN_PASSES: usize = 30;
    let mut f = Fixture::new(nat(10_000..=39_999, 0));
    let all = open_udp_flows(&f, FLOWS);
    let keys: HashSet<NatKey> = all.iter().map(|(k, _)| *k).collect();
    assert_eq!(all.len(), 2 * FLOWS as usize, "two entries per flow");
    assert_eq!(keys.len(), all.len(), "a quiet walk reads each entry once");
    let swept = masquerade::sweep(f.dp.maps_mut()).unwrap();
    assert_eq!(swept.remaining, 2 * FLOWS as usize);
    assert_eq!(swept.flows, [0, FLOWS as usize], "IPv4 and IPv6 flows");
    let quotas = f.dp.maps().nat_quotas().unwrap();
    assert_eq!(quotas.len(), 1, "one destination: {quotas:?}");
    assert_eq!(
        quotas[0].1.flows,
        u32::from(FLOWS),
        "each flow counted once"
    );

    // Another handle on the pinned table removes and puts back every entry, over and over,
    // while this one walks.
    let churning = churn(&f._pins.0.map(names::NAT), all.clone(), CHURN_PASSES);
    let mut walks = 0;
    while !churning.is_finished() {
        let seen = f.dp.maps().nat_entries().unwrap();
        walks += 1;
        let distinct: HashSet<NatKey> = seen.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            distinct.len(),
            seen.len(),
            "walk {walks} read {} entries, {} distinct",
            seen.len(),
            distinct.len()
        );
        assert!(
            distinct.is_subset(&keys),
            "walk {walks} read an entry never made"
        );
    }
    churning.join().unwrap();
    assert!(walks > 1, "walks ran while entries came and went");
    assert_eq!(f.dp.maps().nat_entries().unwrap().len(), all.len());
}

/// The layout upgrade copies the old agent's tables into the new ones while the old programs
/// still run on them (`overlay_datapath::batch::copy`): a copy under churn reads each entry at
/// most once and only entries that exist, and a quiet copy carries every one. An entry-by-entry
/// copy (`BPF_MAP_GET_NEXT_KEY`, as the upgrade did before) is timed beside it for comparison.
#[test]
fn the_upgrade_copies_a_flow_table_exactly_while_entries_come_and_go_under_it() {
    use std::os::fd::AsFd as _;
    const FLOWS: u16 = 3_000;
    const CHURN_PASSES: usize = 30;
    let f = Fixture::new(nat(10_000..=39_999, 0));
    let new = Fixture::new(nat(10_000..=39_999, 0));
    let all = open_udp_flows(&f, FLOWS);
    let keys: HashSet<NatKey> = all.iter().map(|(k, _)| *k).collect();
    assert_eq!(all.len(), 2 * FLOWS as usize);
    let from = MapData::from_pin(f._pins.0.map(names::NAT)).unwrap();
    let to_pin = new._pins.0.map(names::NAT);
    let to = MapData::from_pin(&to_pin).unwrap();
    let (key_len, value_len) = (size_of::<NatKey>(), size_of::<NatEntry>());
    let copy = |from: &MapData, to: &MapData| {
        overlay_datapath::batch::copy(from.fd().as_fd(), to.fd().as_fd(), key_len, value_len)
            .unwrap()
    };
    let clear = |pin: &Path| {
        let mut t = nat_table(pin);
        for k in keys.iter() {
            let _ = t.remove(k);
        }
    };
    let started = std::time::Instant::now();
    assert_eq!(
        copy(&from, &to),
        all.len(),
        "a quiet copy carries every entry"
    );
    let batched = started.elapsed();
    let copied: HashSet<NatKey> = nat_keys(&new).into_iter().collect();
    assert_eq!(copied, keys);
    clear(&to_pin);
    // For comparison, the entry-by-entry copy (GET_NEXT_KEY and a lookup per entry through
    // aya's iterator, then an update).
    let one_by_one = |from_pin: &Path, to_pin: &Path| {
        let (src, mut dst) = (nat_table(from_pin), nat_table(to_pin));
        let mut n = 0;
        for entry in src.iter() {
            let Ok((k, e)) = entry else { continue };
            dst.insert(k, e, 0).unwrap();
            n += 1;
        }
        n
    };
    let from_pin = f._pins.0.map(names::NAT);
    let started = std::time::Instant::now();
    assert_eq!(one_by_one(&from_pin, &to_pin), all.len());
    let entry_by_entry = started.elapsed();
    eprintln!(
        "quiet copy of {} entries: batches {batched:?}, entry by entry {entry_by_entry:?}",
        all.len()
    );

    // Another handle on the old table removes and puts back every entry, over and over, while
    // the copies run: as the old programs close and open flows during an upgrade.
    let churning = churn(&from_pin, all.clone(), CHURN_PASSES);
    let mut copies = 0;
    while !churning.is_finished() {
        clear(&to_pin);
        let n = copy(&from, &to);
        copies += 1;
        let landed = nat_keys(&new);
        assert!(
            n <= all.len(),
            "copy {copies} read {n} entries of a {}-entry table",
            all.len()
        );
        assert_eq!(
            landed.len(),
            n,
            "copy {copies}: each entry read once lands once"
        );
        assert!(
            landed.iter().all(|k| keys.contains(k)),
            "copy {copies} wrote an entry never made"
        );
        if copies == 1 {
            // The entry-by-entry copy under the same churn, for the record: it starts over
            // whenever the entry it stands on has gone.
            clear(&to_pin);
            let started = std::time::Instant::now();
            let n = one_by_one(&from_pin, &to_pin);
            eprintln!(
                "entry-by-entry copy under churn read {n} entries of {} in {:?}",
                all.len(),
                started.elapsed()
            );
        }
    }
    churning.join().unwrap();
    assert!(copies > 1, "copies ran while entries came and went");
    eprintln!("{copies} batch copies under churn, each entry at most once");
    clear(&to_pin);
    assert_eq!(copy(&from, &to), all.len());
}
