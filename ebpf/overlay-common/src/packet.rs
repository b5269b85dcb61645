//! Header layouts and the pure per-packet logic of the datapath.
//!
//! The programs load fixed-size header slices from the packet and call these functions; keeping
//! them free of aya-ebpf lets the host unit-test exactly the code the kernel runs. Every function
//! is `#[inline(always)]`: per packet there should be no calls, and a non-inlined function that
//! returns a `Counter` puts a BTF enum into the object that aya 0.14 fails to load (every map
//! creation then fails with EINVAL).

use crate::counters::Counter;

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const VXLAN_HLEN: usize = 8;
pub const ARP_LEN: usize = 28;

/// Bytes added after the outer Ethernet header by encapsulation: outer IPv4, UDP, VXLAN, and the
/// inner Ethernet header. With the outer Ethernet header the overhead is 64 - 14 = 50 bytes.
pub const VXLAN_ENCAP_LEN: usize = IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
/// Everything in front of the inner IP header of a VXLAN frame (outer IPv4 without options).
pub const VXLAN_HEADERS_LEN: usize = ETH_HLEN + VXLAN_ENCAP_LEN;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// VXLAN flags byte with only the I flag ("VNI valid") set, RFC 7348.
pub const VXLAN_FLAG_VNI: u8 = 0x08;
/// Largest VNI (24 bits).
pub const VNI_MAX: u32 = 0x00ff_ffff;

/// Outer UDP source ports of our VXLAN: Linux's default ephemeral range, as the kernel's VXLAN
/// device picks them. The masquerade range must be disjoint from it (the agent checks), so that
/// `from_underlay` can refuse VXLAN from a masquerade port: that is a container's datagram.
pub const VXLAN_SOURCE_PORT_MIN: u16 = 32768;
pub const VXLAN_SOURCE_PORT_MAX: u16 = 60999;

/// Outer UDP source ports are spread over [`VXLAN_SOURCE_PORT_MIN`]..=[`VXLAN_SOURCE_PORT_MAX`]
/// from a hash of the inner flow, so that the receiver's RSS and ECMP in the underlay see per-flow
/// entropy (RFC 7348, section 5).
#[inline(always)]
pub const fn vxlan_source_port(flow_hash: u32) -> u16 {
    // Folded so that hashes that differ only in their high bits still spread.
    let folded = (flow_hash ^ (flow_hash >> 16)) & 0xffff;
    let span = (VXLAN_SOURCE_PORT_MAX - VXLAN_SOURCE_PORT_MIN) as u32 + 1;
    VXLAN_SOURCE_PORT_MIN + (folded % span) as u16
}

/// murmur3's 32-bit finaliser: every input bit moves about half the output bits.
#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// A hash of an IPv4 flow (addresses `addrs` = source then destination, the transport's first
/// four bytes `ports`, zero when there are none to read, and the protocol), for the outer source
/// port of a packet the kernel has no hash for: stable per flow, spread across flows, and
/// much cheaper than the kernel's flow dissection (`bpf_get_hash_recalc`).
#[inline(always)]
pub const fn ipv4_flow_hash(addrs: [u8; 8], ports: [u8; 4], protocol: u8) -> u32 {
    let src = u32::from_be_bytes([addrs[0], addrs[1], addrs[2], addrs[3]]);
    let dst = u32::from_be_bytes([addrs[4], addrs[5], addrs[6], addrs[7]]);
    let ports = u32::from_be_bytes(ports);
    fmix32(src ^ fmix32(dst ^ fmix32(ports ^ ((protocol as u32) << 24))))
}

/// An Ethernet header's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthHeader {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ethertype: u16,
}

impl EthHeader {
    #[inline(always)]
    pub const fn parse(b: &[u8; ETH_HLEN]) -> EthHeader {
        EthHeader {
            dst: [b[0], b[1], b[2], b[3], b[4], b[5]],
            src: [b[6], b[7], b[8], b[9], b[10], b[11]],
            ethertype: u16::from_be_bytes([b[12], b[13]]),
        }
    }
}

/// The fields of an IPv4 header the datapath needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Header {
    /// Header length in bytes (20 without options).
    pub header_len: usize,
    pub total_len: usize,
    pub protocol: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// Part of a fragmented datagram (more-fragments set, or a non-zero offset).
    pub is_fragment: bool,
    /// A later fragment (non-zero offset): what follows the header is not a transport header.
    pub is_later_fragment: bool,
    /// DF set: the sender does path MTU discovery.
    pub dont_fragment: bool,
    /// The header checksum is valid. Headers with options are not checked here (only their
    /// first 20 bytes are seen) and count as valid.
    pub checksum_ok: bool,
}

/// IPv4 "don't fragment" flag in the flags/offset field.
pub const IPV4_DF: u16 = 0x4000;
const IPV4_MF: u16 = 0x2000;
const IPV4_OFFSET_MASK: u16 = 0x1fff;

impl Ipv4Header {
    /// Parses the first 20 bytes of an IPv4 header; rejects what no IPv4 stack would accept.
    #[inline(always)]
    pub const fn parse(b: &[u8; IPV4_HLEN]) -> Result<Ipv4Header, Counter> {
        let version = b[0] >> 4;
        let header_len = ((b[0] & 0x0f) as usize) * 4;
        let total_len = u16::from_be_bytes([b[2], b[3]]) as usize;
        if version != 4 || header_len < IPV4_HLEN {
            return Err(Counter::DropMalformed);
        }
        if total_len < header_len {
            return Err(Counter::DropTruncated);
        }
        let frag = u16::from_be_bytes([b[6], b[7]]);
        let offset = frag & IPV4_OFFSET_MASK;
        Ok(Ipv4Header {
            header_len,
            total_len,
            protocol: b[9],
            src: [b[12], b[13], b[14], b[15]],
            dst: [b[16], b[17], b[18], b[19]],
            is_fragment: frag & IPV4_MF != 0 || offset != 0,
            is_later_fragment: offset != 0,
            dont_fragment: frag & IPV4_DF != 0,
            checksum_ok: header_len != IPV4_HLEN || ones_complement_sum(b) == 0xffff,
        })
    }
}

/// The folded 16-bit ones'-complement sum of a 20-byte header (0xffff when its checksum field
/// is right).
#[inline(always)]
const fn ones_complement_sum(header: &[u8; IPV4_HLEN]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < IPV4_HLEN {
        sum += u16::from_be_bytes([header[i], header[i + 1]]) as u32;
        i += 2;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum (RFC 1071) of an IPv4 header whose checksum field is zero.
#[inline(always)]
pub fn ipv4_header_checksum(header: &[u8; IPV4_HLEN]) -> u16 {
    !ones_complement_sum(header)
}

/// What an underlay packet is to the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnderlayPacket {
    /// Not VXLAN on our port: the host's own traffic, passed untouched.
    NotOurs,
    /// VXLAN on our port whose outer headers look right.
    Vxlan {
        outer_src: [u8; 4],
        /// Length of outer IPv4 + UDP + VXLAN + inner Ethernet: what decapsulation removes after
        /// the outer Ethernet header.
        strip_len: usize,
        /// Offset of the VXLAN header from the start of the frame.
        vxlan_offset: usize,
    },
}

/// Classifies an underlay frame from its Ethernet and IPv4 headers and the UDP header at
/// `ETH_HLEN + ip.header_len`. `frame_len` is the whole frame's length (skb->len); `local_ip`
/// is this agent's underlay address: VXLAN to any other address is not ours to take.
#[inline(always)]
pub fn classify_underlay(
    eth: &EthHeader,
    ip: &Ipv4Header,
    udp: &[u8; UDP_HLEN],
    frame_len: usize,
    vxlan_port: u16,
    local_ip: [u8; 4],
) -> Result<UnderlayPacket, Counter> {
    // A later fragment carries no UDP header: the host stack reassembles or drops it.
    if eth.ethertype != ETH_P_IP
        || ip.protocol != IPPROTO_UDP
        || ip.dst != local_ip
        || ip.is_later_fragment
    {
        return Ok(UnderlayPacket::NotOurs);
    }
    let dst_port = u16::from_be_bytes([udp[2], udp[3]]);
    if dst_port != vxlan_port {
        return Ok(UnderlayPacket::NotOurs);
    }
    // From here on it claims to be ours: anything inconsistent is dropped and counted.
    if ip.is_fragment {
        return Err(Counter::DropFragmented);
    }
    if !ip.checksum_ok {
        return Err(Counter::DropMalformed);
    }
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    let ip_payload = ip.total_len - ip.header_len;
    let strip_len = ip.header_len + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
    if ip.total_len > frame_len.saturating_sub(ETH_HLEN)
        || ip.total_len < strip_len + IPV4_HLEN
        || udp_len > ip_payload
    {
        return Err(Counter::DropTruncated);
    }
    // GSO and GRO keep the UDP and IP lengths of a super-packet consistent too.
    if udp_len != ip_payload {
        return Err(Counter::DropMalformed);
    }
    Ok(UnderlayPacket::Vxlan {
        outer_src: ip.src,
        strip_len,
        vxlan_offset: ETH_HLEN + ip.header_len + UDP_HLEN,
    })
}

/// The VNI of a VXLAN header; anything but exactly the I flag (and zero reserved bits) is refused,
/// as the kernel's own VXLAN driver refuses unknown flags.
#[inline(always)]
pub const fn parse_vxlan(h: &[u8; VXLAN_HLEN]) -> Result<u32, Counter> {
    if h[0] != VXLAN_FLAG_VNI || h[1] != 0 || h[2] != 0 || h[3] != 0 || h[7] != 0 {
        return Err(Counter::DropBadVxlanFlags);
    }
    Ok(u32::from_be_bytes([0, h[4], h[5], h[6]]))
}

/// Everything needed to build the headers of one encapsulated frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncapParams {
    /// Outer Ethernet (destination, source): the cached next hop's; without one they are written
    /// zero, and the kernel's neighbour code fills them as the frame is sent.
    pub outer_macs: Option<([u8; 6], [u8; 6])>,
    pub outer_src: [u8; 4],
    pub outer_dst: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub vni: u32,
    /// Inner Ethernet source: the local VTEP MAC.
    pub inner_src_mac: [u8; 6],
    /// Inner Ethernet destination: the remote VTEP MAC.
    pub inner_dst_mac: [u8; 6],
    /// Inner Ethernet type: the inner packet's family ([`ETH_P_IP`] or [`ETH_P_IPV6`]).
    pub inner_ethertype: u16,
    /// Length of the inner IP packet (the original frame minus its Ethernet header).
    pub inner_ip_len: usize,
}

/// The 64 bytes in front of the inner IP packet of a VXLAN frame (see [`write_vxlan_headers`]),
/// built on the stack (the unit tests' view; the programs write them in place).
#[cfg(test)]
fn build_vxlan_headers(p: &EncapParams) -> [u8; VXLAN_HEADERS_LEN] {
    let mut h = [0u8; VXLAN_HEADERS_LEN];
    write_vxlan_headers(&mut h, p);
    h
}

/// Writes the 64 bytes in front of the inner IP packet of a VXLAN frame into `h`, every byte of
/// it (`h` may be the packet's own fresh headroom): outer Ethernet, outer IPv4 with its checksum,
/// UDP with checksum 0 (allowed over IPv4 by RFC 7348), VXLAN, inner Ethernet.
///
/// Fields are written four bytes at a time where they meet, zero bytes included, and nothing is
/// cleared first: LLVM turns a run of zero-byte stores into a `memset`, which the eBPF build
/// (bpf-linker) cannot expand inline and calls as a byte-at-a-time subprogram.
#[inline(always)]
pub fn write_vxlan_headers(h: &mut [u8; VXLAN_HEADERS_LEN], p: &EncapParams) {
    put_outer_macs(h, p.outer_macs);
    // A GSO super-packet's length is rewritten per segment by the kernel; clamp so the field never
    // wraps.
    let ip_total = IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN + p.inner_ip_len;
    let ip_total = if ip_total > 0xffff { 0xffff } else { ip_total } as u16;
    let ip = ETH_HLEN;
    // Ethernet type, version 4 with a 20-byte header, TOS 0.
    h[12..16].copy_from_slice(&(((ETH_P_IP as u32) << 16) | 0x4500).to_be_bytes());
    // Length, ID 0, DF: VTEPs must not fragment (RFC 7348), and with DF an ID of 0 is correct
    // (RFC 6864).
    h[ip + 2..ip + 4].copy_from_slice(&ip_total.to_be_bytes());
    h[ip + 4..ip + 8].copy_from_slice(&(IPV4_DF as u32).to_be_bytes());
    // TTL, protocol, checksum.
    let checksum = vxlan_ipv4_checksum(ip_total, p.outer_src, p.outer_dst);
    h[ip + 8..ip + 12].copy_from_slice(
        &((64u32 << 24) | ((IPPROTO_UDP as u32) << 16) | checksum as u32).to_be_bytes(),
    );
    h[ip + 12..ip + 16].copy_from_slice(&p.outer_src);
    h[ip + 16..ip + 20].copy_from_slice(&p.outer_dst);
    let udp_len = ip_total - IPV4_HLEN as u16;
    put_udp_vxlan_eth(
        &mut h[ip + IPV4_HLEN..],
        udp_len,
        (p.src_port, p.dst_port),
        p.vni,
        (p.inner_dst_mac, p.inner_src_mac),
        p.inner_ethertype,
    );
}

/// Writes the outer Ethernet addresses (destination, source) at the start of `h`, zero without
/// them: as two stores, not twelve zero bytes (see [`write_vxlan_headers`]).
#[inline(always)]
pub fn put_outer_macs(h: &mut [u8], macs: Option<([u8; 6], [u8; 6])>) {
    match macs {
        Some((dst, src)) => {
            h[0..6].copy_from_slice(&dst);
            h[6..12].copy_from_slice(&src);
        }
        None => {
            h[0..8].copy_from_slice(&0u64.to_ne_bytes());
            h[8..12].copy_from_slice(&0u32.to_ne_bytes());
        }
    }
}

/// The header checksum of the outer IPv4 header [`write_vxlan_headers`] writes (version 4,
/// 20 bytes, TOS 0, ID 0, DF, TTL 64, UDP), summed from its fields rather than read back.
#[inline(always)]
pub const fn vxlan_ipv4_checksum(total_len: u16, src: [u8; 4], dst: [u8; 4]) -> u16 {
    let sum = 0x4500u32
        + total_len as u32
        + IPV4_DF as u32
        + ((64u32 << 8) | IPPROTO_UDP as u32)
        + u16::from_be_bytes([src[0], src[1]]) as u32
        + u16::from_be_bytes([src[2], src[3]]) as u32
        + u16::from_be_bytes([dst[0], dst[1]]) as u32
        + u16::from_be_bytes([dst[2], dst[3]]) as u32;
    !crate::ipv6::fold(sum)
}

/// Writes what follows the outer IP header of a VXLAN frame, the same over both underlay
/// families, into `h` (which starts at the UDP header), every byte of it: UDP of `udp_len` with
/// checksum 0 (`ports` = source, destination), VXLAN with `vni`, the inner Ethernet header
/// (`macs` = destination, source).
#[inline(always)]
pub fn put_udp_vxlan_eth(
    h: &mut [u8],
    udp_len: u16,
    ports: (u16, u16),
    vni: u32,
    macs: ([u8; 6], [u8; 6]),
    inner_ethertype: u16,
) {
    h[0..4].copy_from_slice(&(((ports.0 as u32) << 16) | ports.1 as u32).to_be_bytes());
    // Length, checksum 0.
    h[4..8].copy_from_slice(&((udp_len as u32) << 16).to_be_bytes());
    let vx = UDP_HLEN;
    // Flags (the VNI is valid), 24 reserved bits; the VNI, 8 reserved bits.
    h[vx..vx + 4].copy_from_slice(&((VXLAN_FLAG_VNI as u32) << 24).to_be_bytes());
    h[vx + 4..vx + 8].copy_from_slice(&((vni & VNI_MAX) << 8).to_be_bytes());
    let inner = vx + VXLAN_HLEN;
    h[inner..inner + 6].copy_from_slice(&macs.0);
    h[inner + 6..inner + 12].copy_from_slice(&macs.1);
    h[inner + 12..inner + 14].copy_from_slice(&inner_ethertype.to_be_bytes());
}

/// The reply to an ARP request, as the 42-byte frame to send back, if `frame` is an Ethernet/IPv4
/// ARP request that should be answered with `our_mac`. Requests for the sender's own address
/// (duplicate-address probes and gratuitous ARP) get no answer.
#[inline(always)]
pub fn arp_reply(
    frame: &[u8; ETH_HLEN + ARP_LEN],
    our_mac: [u8; 6],
) -> Option<[u8; ETH_HLEN + ARP_LEN]> {
    let arp = &frame[ETH_HLEN..];
    let is_eth_ipv4_request = arp[0..2] == [0, 1] // hardware type Ethernet
        && arp[2..4] == [0x08, 0x00] // protocol type IPv4
        && arp[4] == 6
        && arp[5] == 4
        && arp[6..8] == [0, 1]; // request
    if !is_eth_ipv4_request {
        return None;
    }
    let sender_mac = &arp[8..14];
    let sender_ip = &arp[14..18];
    let target_ip = &arp[24..28];
    // Probes (sender 0.0.0.0), gratuitous ARP (sender == target): no answer.
    if sender_ip == target_ip || sender_ip == [0, 0, 0, 0] || target_ip == [0, 0, 0, 0] {
        return None;
    }
    let mut r = [0u8; ETH_HLEN + ARP_LEN];
    r[0..6].copy_from_slice(sender_mac);
    r[6..12].copy_from_slice(&our_mac);
    r[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    let a = ETH_HLEN;
    r[a..a + 6].copy_from_slice(&arp[0..6]);
    r[a + 6..a + 8].copy_from_slice(&[0, 2]); // reply
    r[a + 8..a + 14].copy_from_slice(&our_mac);
    r[a + 14..a + 18].copy_from_slice(target_ip);
    r[a + 18..a + 24].copy_from_slice(sender_mac);
    r[a + 24..a + 28].copy_from_slice(sender_ip);
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(total_len: u16, proto: u8, src: [u8; 4], dst: [u8; 4]) -> [u8; IPV4_HLEN] {
        let mut h = [0u8; IPV4_HLEN];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&total_len.to_be_bytes());
        h[8] = 64;
        h[9] = proto;
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        let c = ipv4_header_checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // A header whose checksum is known (from a captured packet): 0xb861.
        let h: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header_checksum(&h), 0xb861);
    }

    /// A frame of `inner_ip_len` bytes of IPv4 from 10.0.0.1 to 10.0.0.2 in VNI 1024, from
    /// port 0xc123 to 64000, with its outer MACs left to the kernel.
    fn params(inner_ip_len: usize) -> EncapParams {
        EncapParams {
            outer_macs: None,
            outer_src: [10, 0, 0, 1],
            outer_dst: [10, 0, 0, 2],
            src_port: 0xc123,
            dst_port: 64000,
            vni: 1024,
            inner_src_mac: [0x70, 0xb3, 0xd5, 0x80, 0, 1],
            inner_dst_mac: [0x70, 0xb3, 0xd5, 0x80, 0, 2],
            inner_ethertype: ETH_P_IP,
            inner_ip_len,
        }
    }

    #[test]
    fn encap_headers_are_byte_exact() {
        let p = params(84);
        let h = build_vxlan_headers(&p);
        assert_eq!(&h[12..14], &[0x08, 0x00]);
        let ip: [u8; 20] = h[14..34].try_into().unwrap();
        let parsed = Ipv4Header::parse(&ip).unwrap();
        assert_eq!(parsed.total_len, 20 + 8 + 8 + 14 + 84);
        assert_eq!(parsed.protocol, IPPROTO_UDP);
        assert_eq!((parsed.src, parsed.dst), ([10, 0, 0, 1], [10, 0, 0, 2]));
        // A header with a correct checksum sums to zero.
        assert_eq!(ipv4_header_checksum(&ip), 0);
        assert_eq!(&h[34..36], &0xc123u16.to_be_bytes());
        assert_eq!(&h[36..38], &64000u16.to_be_bytes());
        assert_eq!(&h[38..40], &((8 + 8 + 14 + 84) as u16).to_be_bytes());
        assert_eq!(&h[40..42], &[0, 0], "UDP checksum 0 over IPv4");
        assert_eq!(&h[42..50], &[0x08, 0, 0, 0, 0, 0x04, 0x00, 0]);
        assert_eq!(parse_vxlan(h[42..50].try_into().unwrap()), Ok(1024));
        assert_eq!(&h[50..56], &p.inner_dst_mac);
        assert_eq!(&h[56..62], &p.inner_src_mac);
        assert_eq!(&h[62..64], &[0x08, 0x00]);
    }

    #[test]
    fn encap_headers_written_in_place_cover_every_byte_and_sum_right() {
        for (inner_ip_len, src, dst) in [
            (28, [10, 0, 0, 1], [10, 0, 0, 2]),
            (1450, [192, 168, 255, 254], [172, 16, 0, 9]),
            (70_000, [255, 255, 255, 255], [0, 0, 0, 0]),
            (0, [1, 2, 3, 4], [5, 6, 7, 8]),
        ] {
            let p = EncapParams {
                outer_macs: Some(([0x02, 0, 0, 0, 0, 0x0b], [0x02, 0, 0, 0, 0, 0x0a])),
                outer_src: src,
                outer_dst: dst,
                src_port: 0xfedc,
                dst_port: 4789,
                vni: 0xabcdef,
                inner_ethertype: ETH_P_IPV6,
                ..params(inner_ip_len)
            };
            // Headroom holds whatever was there before: every byte must be written.
            let mut garbage = [0xa5u8; VXLAN_HEADERS_LEN];
            write_vxlan_headers(&mut garbage, &p);
            let mut zeroes = [0u8; VXLAN_HEADERS_LEN];
            write_vxlan_headers(&mut zeroes, &p);
            assert_eq!(garbage, zeroes, "inner length {inner_ip_len}");
            assert_eq!(&zeroes[0..12], &[2, 0, 0, 0, 0, 0x0b, 2, 0, 0, 0, 0, 0x0a]);
            let ip: [u8; 20] = zeroes[14..34].try_into().unwrap();
            assert_eq!(ipv4_header_checksum(&ip), 0, "inner length {inner_ip_len}");
            assert_eq!(&ip[0..2], &[0x45, 0]);
            assert_eq!(&ip[4..10], &[0, 0, 0x40, 0, 64, IPPROTO_UDP]);
            assert_eq!(
                parse_vxlan(zeroes[42..50].try_into().unwrap()),
                Ok(0xabcdef)
            );
        }
    }

    #[test]
    fn ipv4_flow_hashes_are_stable_and_spread_source_ports() {
        let addrs = [9, 0, 1, 2, 9, 0, 2, 2];
        let h = ipv4_flow_hash(addrs, [0x9c, 0x40, 0x13, 0x89], IPPROTO_UDP);
        assert_eq!(
            h,
            ipv4_flow_hash(addrs, [0x9c, 0x40, 0x13, 0x89], IPPROTO_UDP)
        );
        assert_ne!(
            h,
            ipv4_flow_hash(addrs, [0x9c, 0x40, 0x13, 0x89], IPPROTO_TCP)
        );
        assert_ne!(
            h,
            ipv4_flow_hash([9, 0, 1, 3, 9, 0, 2, 2], [0x9c, 0x40, 0x13, 0x89], 17)
        );
        // Consecutive client ports (a connection-rate test) land on many outer source ports.
        let mut ports = std::collections::BTreeSet::new();
        for sport in 40000u16..41000 {
            let p = sport.to_be_bytes();
            ports.insert(vxlan_source_port(ipv4_flow_hash(
                addrs,
                [p[0], p[1], 0, 80],
                6,
            )));
        }
        assert!(ports.len() > 950, "{} distinct source ports", ports.len());
    }

    #[test]
    fn encap_length_of_gso_superpacket_never_wraps() {
        let h = build_vxlan_headers(&params(70_000));
        assert_eq!(&h[16..18], &[0xff, 0xff]);
    }

    #[test]
    fn source_port_stays_in_dynamic_range() {
        for hash in [0u32, 1, 0xffff, 0x1234_5678, u32::MAX, 0x8000_0000] {
            let port = vxlan_source_port(hash);
            assert!(
                (VXLAN_SOURCE_PORT_MIN..=VXLAN_SOURCE_PORT_MAX).contains(&port),
                "{port}"
            );
        }
        assert_ne!(vxlan_source_port(1), vxlan_source_port(2));
        assert_ne!(
            vxlan_source_port(0x0001_0000),
            vxlan_source_port(0x0002_0000)
        );
    }

    #[test]
    fn vxlan_flags_are_strict() {
        assert_eq!(
            parse_vxlan(&[0x08, 0, 0, 0, 0xab, 0xcd, 0xef, 0]),
            Ok(0xabcdef)
        );
        assert_eq!(
            parse_vxlan(&[0x00, 0, 0, 0, 0, 4, 0, 0]),
            Err(Counter::DropBadVxlanFlags)
        );
        assert_eq!(
            parse_vxlan(&[0x88, 0, 0, 0, 0, 4, 0, 0]),
            Err(Counter::DropBadVxlanFlags)
        );
        assert_eq!(
            parse_vxlan(&[0x08, 0, 0, 0, 0, 4, 0, 1]),
            Err(Counter::DropBadVxlanFlags)
        );
    }

    #[test]
    fn ipv4_parse_rejects_bad_headers() {
        let mut h = ipv4(40, IPPROTO_TCP, [1, 2, 3, 4], [5, 6, 7, 8]);
        assert!(Ipv4Header::parse(&h).is_ok());
        h[0] = 0x65;
        assert_eq!(Ipv4Header::parse(&h), Err(Counter::DropMalformed));
        h[0] = 0x44;
        assert_eq!(Ipv4Header::parse(&h), Err(Counter::DropMalformed));
        h[0] = 0x46;
        h[2..4].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(Ipv4Header::parse(&h), Err(Counter::DropTruncated));
    }

    #[test]
    fn underlay_classification() {
        const LOCAL: [u8; 4] = [10, 0, 0, 1];
        let eth = EthHeader {
            dst: [0; 6],
            src: [0; 6],
            ethertype: ETH_P_IP,
        };
        let total = (20 + 8 + 8 + 14 + 20) as u16;
        let raw = ipv4(total, IPPROTO_UDP, [10, 0, 0, 9], LOCAL);
        let ip = Ipv4Header::parse(&raw).unwrap();
        assert!(ip.checksum_ok && !ip.is_fragment);
        let udp = |port: u16, len: u16| {
            let mut u = [0u8; 8];
            u[2..4].copy_from_slice(&port.to_be_bytes());
            u[4..6].copy_from_slice(&len.to_be_bytes());
            u
        };
        let frame_len = 14 + total as usize;
        let classify = |ip: &Ipv4Header, udp: &[u8; 8], frame_len| {
            classify_underlay(&eth, ip, udp, frame_len, 64000, LOCAL)
        };
        let good = udp(64000, total - 20);
        assert_eq!(
            classify(&ip, &good, frame_len),
            Ok(UnderlayPacket::Vxlan {
                outer_src: [10, 0, 0, 9],
                strip_len: 50,
                vxlan_offset: 42
            })
        );
        // Another port, another protocol, another destination: the host's business.
        assert_eq!(
            classify(&ip, &udp(53, total - 20), frame_len),
            Ok(UnderlayPacket::NotOurs)
        );
        let tcp = Ipv4Header {
            protocol: IPPROTO_TCP,
            ..ip
        };
        assert_eq!(
            classify(&tcp, &good, frame_len),
            Ok(UnderlayPacket::NotOurs)
        );
        let elsewhere = Ipv4Header {
            dst: [10, 0, 0, 2],
            ..ip
        };
        assert_eq!(
            classify(&elsewhere, &good, frame_len),
            Ok(UnderlayPacket::NotOurs)
        );
        // Cut off: the frame is shorter than the IP header claims.
        assert_eq!(
            classify(&ip, &good, frame_len - 1),
            Err(Counter::DropTruncated)
        );
        // Too short to hold an inner IPv4 packet.
        let short = Ipv4Header {
            total_len: 20 + 8 + 8 + 14,
            ..ip
        };
        assert_eq!(
            classify(&short, &udp(64000, 30), frame_len),
            Err(Counter::DropTruncated)
        );
        // UDP length disagreeing with the IP payload.
        assert_eq!(
            classify(&ip, &udp(64000, total - 19), frame_len),
            Err(Counter::DropTruncated)
        );
        assert_eq!(
            classify(&ip, &udp(64000, total - 21), frame_len),
            Err(Counter::DropMalformed)
        );
        // Bad outer checksum.
        let mut bad = raw;
        bad[10] ^= 0xff;
        let bad = Ipv4Header::parse(&bad).unwrap();
        assert!(!bad.checksum_ok);
        assert_eq!(
            classify(&bad, &good, frame_len),
            Err(Counter::DropMalformed)
        );
    }

    #[test]
    fn fragments_are_never_taken_for_whole_vxlan_frames() {
        let mut first = ipv4(1500, IPPROTO_UDP, [10, 0, 0, 9], [10, 0, 0, 1]);
        first[6] = 0x20; // MF
        first[10..12].copy_from_slice(&[0, 0]);
        let c = ipv4_header_checksum(&first);
        first[10..12].copy_from_slice(&c.to_be_bytes());
        let ip = Ipv4Header::parse(&first).unwrap();
        assert!(ip.is_fragment && !ip.is_later_fragment && ip.checksum_ok);
        let eth = EthHeader {
            dst: [0; 6],
            src: [0; 6],
            ethertype: ETH_P_IP,
        };
        let mut udp = [0u8; 8];
        udp[2..4].copy_from_slice(&64000u16.to_be_bytes());
        udp[4..6].copy_from_slice(&1480u16.to_be_bytes());
        assert_eq!(
            classify_underlay(&eth, &ip, &udp, 14 + 1500, 64000, [10, 0, 0, 1]),
            Err(Counter::DropFragmented)
        );
        let later = Ipv4Header {
            is_later_fragment: true,
            ..ip
        };
        assert_eq!(
            classify_underlay(&eth, &later, &udp, 14 + 1500, 64000, [10, 0, 0, 1]),
            Ok(UnderlayPacket::NotOurs)
        );
    }

    #[test]
    fn encap_sets_dont_fragment() {
        let p = EncapParams {
            inner_ethertype: ETH_P_IPV6,
            ..params(100)
        };
        let h = build_vxlan_headers(&p);
        assert_eq!(&h[62..64], &[0x86, 0xdd], "inner IPv6");
        let ip = Ipv4Header::parse(h[14..34].try_into().unwrap()).unwrap();
        assert_eq!(&h[20..22], &IPV4_DF.to_be_bytes());
        assert!(!ip.is_fragment && ip.checksum_ok);
    }

    #[test]
    fn arp_responder() {
        let container_mac = [2, 0, 0, 0, 0, 1];
        let gw_mac = [2, 0, 0, 0, 0, 0xfe];
        let mut req = [0u8; 42];
        req[0..6].copy_from_slice(&[0xff; 6]);
        req[6..12].copy_from_slice(&container_mac);
        req[12..14].copy_from_slice(&[0x08, 0x06]);
        req[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        req[22..28].copy_from_slice(&container_mac);
        req[28..32].copy_from_slice(&[9, 0, 1, 2]);
        req[38..42].copy_from_slice(&[9, 0, 1, 1]);
        let r = arp_reply(&req, gw_mac).expect("answered");
        assert_eq!(&r[0..6], &container_mac);
        assert_eq!(&r[6..12], &gw_mac);
        assert_eq!(&r[20..22], &[0, 2]);
        assert_eq!(&r[22..28], &gw_mac);
        assert_eq!(&r[28..32], &[9, 0, 1, 1]);
        assert_eq!(&r[32..38], &container_mac);
        assert_eq!(&r[38..42], &[9, 0, 1, 2]);
        // Gratuitous ARP / duplicate address probe: no answer.
        let mut garp = req;
        garp[38..42].copy_from_slice(&[9, 0, 1, 2]);
        assert_eq!(arp_reply(&garp, gw_mac), None);
        let mut probe = req;
        probe[28..32].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(arp_reply(&probe, gw_mac), None);
        // A reply is not answered.
        let mut reply = req;
        reply[21] = 2;
        assert_eq!(arp_reply(&reply, gw_mac), None);
    }
}
