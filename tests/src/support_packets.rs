//! Packets built byte by byte for the datapath tests, independently of `overlay_common::packet`
//! (so a bug there is not mirrored here), and a helper to send them from a lab node.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// DC/OS's VXLAN port.
pub const VXLAN_PORT: u16 = 64000;

/// TC verdicts as the kernel defines them (`include/uapi/linux/pkt_cls.h`).
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// The Internet checksum (RFC 1071) of `data`: the one's complement of the one's complement sum
/// of its 16-bit words, an odd last byte padded with zero.
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame.
pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 packet without options, DF set, with a correct header checksum.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    assert!(total <= 0xffff, "IPv4 packet too long");
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x1234u16.to_be_bytes()); // identification
    h[6] = 0x40; // DF
    h[8] = 64; // TTL
    h[9] = protocol;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = inet_checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let mut p = h.to_vec();
    p.extend_from_slice(payload);
    p
}

/// An ICMP echo request with a correct checksum.
pub fn icmp_echo(id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(data);
    let c = inet_checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// An IPv4 ICMP echo request from `src` to `dst` carrying `data_len` pattern bytes.
pub fn ping_packet(src: Ipv4Addr, dst: Ipv4Addr, data_len: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..data_len).map(|i| (i * 7 + 3) as u8).collect();
    ipv4(src, dst, IPPROTO_ICMP, &icmp_echo(0x4242, 1, &data))
}

/// A UDP datagram with checksum 0 (allowed over IPv4).
pub fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&src_port.to_be_bytes());
    u.extend_from_slice(&dst_port.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// A TCP SYN segment from `src:sport` to `dst:dport` with a correct checksum.
pub fn tcp_syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&1_000_000u32.to_be_bytes());
    t[12] = 5 << 4; // data offset
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, IPPROTO_TCP]);
    pseudo.extend_from_slice(&(t.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&t);
    let c = inet_checksum(&pseudo);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// A VXLAN header (RFC 7348) with these flags and VNI, followed by `inner_frame`.
pub fn vxlan(flags: u8, vni: u32, inner_frame: &[u8]) -> Vec<u8> {
    let v = vni.to_be_bytes();
    let mut p = vec![flags, 0, 0, 0, v[1], v[2], v[3], 0];
    p.extend_from_slice(inner_frame);
    p
}

/// What one VXLAN frame on the underlay is made of.
#[derive(Clone, Debug)]
pub struct VxlanFrame {
    pub outer_src: Ipv4Addr,
    pub outer_dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub flags: u8,
    pub vni: u32,
    pub inner_dst_mac: [u8; 6],
    pub inner_src_mac: [u8; 6],
    /// The inner IPv4 packet.
    pub inner_ip: Vec<u8>,
}

impl VxlanFrame {
    /// The UDP payload: VXLAN header, inner Ethernet header, inner IP packet.
    pub fn udp_payload(&self) -> Vec<u8> {
        let inner = eth(
            self.inner_dst_mac,
            self.inner_src_mac,
            ETH_P_IP,
            &self.inner_ip,
        );
        vxlan(self.flags, self.vni, &inner)
    }

    /// The whole frame as it arrives on the underlay NIC (outer MACs arbitrary).
    pub fn frame(&self) -> Vec<u8> {
        let u = udp(self.src_port, self.dst_port, &self.udp_payload());
        let ip = ipv4(self.outer_src, self.outer_dst, IPPROTO_UDP, &u);
        eth(
            [0x02, 0, 0, 0, 0xee, 0x01],
            [0x02, 0, 0, 0, 0xee, 0x02],
            ETH_P_IP,
            &ip,
        )
    }
}

/// An Ethernet/IPv4 ARP request (RFC 826) for `target_ip`, broadcast, 42 bytes (no padding).
pub fn arp_request(sender_mac: [u8; 6], sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
    a.extend_from_slice(&sender_mac);
    a.extend_from_slice(&sender_ip.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target_ip.octets());
    eth([0xff; 6], sender_mac, ETH_P_ARP, &a)
}

/// The ARP reply RFC 826 prescribes for [`arp_request`]`(req_mac, req_ip, target_ip)` answered
/// by `target_mac`: unicast back to the requester, opcode 2, sender and target swapped.
pub fn arp_reply(
    target_mac: [u8; 6],
    target_ip: Ipv4Addr,
    req_mac: [u8; 6],
    req_ip: Ipv4Addr,
) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4, 0, 2];
    a.extend_from_slice(&target_mac);
    a.extend_from_slice(&target_ip.octets());
    a.extend_from_slice(&req_mac);
    a.extend_from_slice(&req_ip.octets());
    eth(req_mac, target_mac, ETH_P_ARP, &a)
}

/// An IPv6 frame carrying a UDP datagram to `dst_port` (fd00::1 -> fd00::2, checksum left 0:
/// nothing here verifies it).
pub fn ipv6_udp_frame(dst_mac: [u8; 6], src_mac: [u8; 6], dst_port: u16) -> Vec<u8> {
    let u = udp(40000, dst_port, b"not ipv4");
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(u.len() as u16).to_be_bytes());
    p.push(IPPROTO_UDP);
    p.push(64);
    let mut src = [0u8; 16];
    src[0] = 0xfd;
    src[15] = 1;
    let mut dst = src;
    dst[15] = 2;
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&u);
    eth(dst_mac, src_mac, ETH_P_IPV6, &p)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends each payload as one UDP datagram from a socket in `node`'s namespace to `dst:port`
/// (the kernel there builds the outer IPv4/UDP headers).
pub fn send_udp(
    node: &overlay_lab::Node,
    dst: Ipv4Addr,
    port: u16,
    payloads: &[Vec<u8>],
) -> anyhow::Result<()> {
    const SCRIPT: &str = "import socket, sys\n\
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
        for h in sys.argv[3:]:\n    s.sendto(bytes.fromhex(h), (sys.argv[1], int(sys.argv[2])))\n";
    let dst = dst.to_string();
    let port = port.to_string();
    let hexes: Vec<String> = payloads.iter().map(|p| hex(p)).collect();
    let mut args = vec!["-c", SCRIPT, &dst, &port];
    args.extend(hexes.iter().map(String::as_str));
    node.exec("python3", &args)?;
    Ok(())
}

pub const IPPROTO_ICMPV6: u8 = 58;

/// An IPv6 packet (no extension headers).
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, hop_limit: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, hop_limit]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// An ICMPv6 message with its checksum over the RFC 8200 pseudo-header.
pub fn icmpv6(src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> Vec<u8> {
    let mut m = message.to_vec();
    m[2] = 0;
    m[3] = 0;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(m.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_ICMPV6]);
    pseudo.extend_from_slice(&m);
    let c = inet_checksum(&pseudo);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// An ICMPv6 echo request packet from `src` to `dst` with `data_len` pattern bytes.
pub fn ping6_packet(src: Ipv6Addr, dst: Ipv6Addr, data_len: usize) -> Vec<u8> {
    let mut m = vec![128, 0, 0, 0, 0x42, 0x42, 0, 1];
    m.extend((0..data_len).map(|i| (i * 7 + 3) as u8));
    ipv6(src, dst, IPPROTO_ICMPV6, 64, &icmpv6(src, dst, &m))
}

/// The solicited-node multicast address of `target` (RFC 4291 2.7.1).
pub fn solicited_node(target: Ipv6Addr) -> Ipv6Addr {
    let t = target.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    )
}

/// A Neighbor Solicitation frame (RFC 4861 4.3) for `target` from `src` at `src_mac`, to the
/// target's solicited-node group, with a source link-layer address option.
pub fn neighbor_solicitation(src_mac: [u8; 6], src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let dst = solicited_node(target);
    let mut m = vec![135, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&target.octets());
    m.extend_from_slice(&[1, 1]);
    m.extend_from_slice(&src_mac);
    let d = dst.octets();
    eth(
        [0x33, 0x33, d[12], d[13], d[14], d[15]],
        src_mac,
        ETH_P_IPV6,
        &ipv6(src, dst, IPPROTO_ICMPV6, 255, &icmpv6(src, dst, &m)),
    )
}

/// The Neighbor Advertisement RFC 4861 prescribes as the answer to [`neighbor_solicitation`]
/// `(req_mac, req, target)` given by `target_mac`: unicast to the solicitor, solicited and
/// override set, router set if `router`, with a target link-layer address option.
pub fn neighbor_advertisement(
    target_mac: [u8; 6],
    target: Ipv6Addr,
    req_mac: [u8; 6],
    req: Ipv6Addr,
    router: bool,
) -> Vec<u8> {
    let flags = 0x60 | if router { 0x80 } else { 0 };
    let mut m = vec![136, 0, 0, 0, flags, 0, 0, 0];
    m.extend_from_slice(&target.octets());
    m.extend_from_slice(&[2, 1]);
    m.extend_from_slice(&target_mac);
    eth(
        req_mac,
        target_mac,
        ETH_P_IPV6,
        &ipv6(target, req, IPPROTO_ICMPV6, 255, &icmpv6(target, req, &m)),
    )
}
