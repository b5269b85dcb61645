//! IPv6 inside the overlay (over the IPv4 underlay): the header, address classes, what a
//! container's ICMPv6 is to the datapath, the neighbour-discovery responder's reply (RFC 4861)
//! and the ICMPv6 checksum, unit-tested on the host.

use crate::{
    counters::Counter,
    maps::Addr16,
    packet::{ETH_HLEN, ETH_P_IPV6},
    policy::{ICMPV6_REDIRECT, ICMPV6_ROUTER_ADVERTISEMENT, IPPROTO_ICMPV6, IPV6_HLEN},
};

pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_MLD_QUERY: u8 = 130;
pub const ICMPV6_MLD_REPORT: u8 = 131;
pub const ICMPV6_MLD_DONE: u8 = 132;
pub const ICMPV6_ROUTER_SOLICITATION: u8 = 133;
pub const ICMPV6_NEIGHBOR_SOLICITATION: u8 = 135;
pub const ICMPV6_NEIGHBOR_ADVERTISEMENT: u8 = 136;
pub const ICMPV6_MLD2_REPORT: u8 = 143;

/// The hop limit every neighbour-discovery message is sent and must arrive with (RFC 4861 7.1.1:
/// proof it was not forwarded by a router).
pub const ND_HOP_LIMIT: u8 = 255;

/// The fields of an IPv6 header the datapath needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Header {
    pub payload_len: usize,
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: Addr16,
    pub dst: Addr16,
}

impl Ipv6Header {
    /// Parses a fixed IPv6 header; anything but version 6 is malformed.
    #[inline(always)]
    pub const fn parse(b: &[u8; IPV6_HLEN]) -> Result<Ipv6Header, Counter> {
        if b[0] >> 4 != 6 {
            return Err(Counter::DropMalformed);
        }
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        let mut i = 0;
        while i < 16 {
            src[i] = b[8 + i];
            dst[i] = b[24 + i];
            i += 1;
        }
        Ok(Ipv6Header {
            payload_len: u16::from_be_bytes([b[4], b[5]]) as usize,
            next_header: b[6],
            hop_limit: b[7],
            src,
            dst,
        })
    }

    /// Length of the whole packet, header included.
    #[inline(always)]
    pub const fn total_len(&self) -> usize {
        IPV6_HLEN + self.payload_len
    }
}

/// fe80::/10.
#[inline(always)]
pub const fn is_link_local(a: &Addr16) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// ff00::/8.
#[inline(always)]
pub const fn is_multicast(a: &Addr16) -> bool {
    a[0] == 0xff
}

/// `::`, the source of duplicate-address detection probes.
#[inline(always)]
pub const fn is_unspecified(a: &Addr16) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != 0 {
            return false;
        }
        i += 1;
    }
    true
}

/// What a container's ICMPv6 message (directly behind the IPv6 header) is to the datapath,
/// before any routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Icmpv6Role {
    /// Router Advertisement or Redirect: never from a container (RA guard).
    RouterMessage,
    /// Neighbor Solicitation: the ND responder answers it.
    Solicitation,
    /// Link-local housekeeping that needs no answer: MLD, Router Solicitations, Neighbor
    /// Advertisements (a container's own, unsolicited ones included).
    Housekeeping,
    /// Anything else (echo, errors): carried like any other packet.
    Other,
}

#[inline(always)]
pub const fn icmpv6_role(icmp_type: u8) -> Icmpv6Role {
    match icmp_type {
        ICMPV6_ROUTER_ADVERTISEMENT | ICMPV6_REDIRECT => Icmpv6Role::RouterMessage,
        ICMPV6_NEIGHBOR_SOLICITATION => Icmpv6Role::Solicitation,
        ICMPV6_MLD_QUERY
        | ICMPV6_MLD_REPORT
        | ICMPV6_MLD_DONE
        | ICMPV6_ROUTER_SOLICITATION
        | ICMPV6_NEIGHBOR_ADVERTISEMENT
        | ICMPV6_MLD2_REPORT => Icmpv6Role::Housekeeping,
        _ => Icmpv6Role::Other,
    }
}

/// The part of a Neighbor Solicitation behind the IPv6 header the responder reads: the ICMPv6
/// header (4), reserved (4), target (16). Options may follow.
pub const NS_BODY_LEN: usize = 24;
/// The Neighbor Advertisement frame the responder sends: Ethernet, IPv6, the NA (24) and a target
/// link-layer address option (8).
pub const NA_FRAME_LEN: usize = ETH_HLEN + IPV6_HLEN + 32;

/// The target of a Neighbor Solicitation (IPv6 header `ip`, message `ns`) that should be
/// answered: well-formed as RFC 4861 7.1.1 asks (hop limit 255, code 0, at least 24 bytes, no
/// extension headers in front, a unicast target), not a duplicate-address probe (source `::`)
/// and not about the sender's own address.
#[inline(always)]
pub const fn solicited_target(ip: &Ipv6Header, ns: &[u8; NS_BODY_LEN]) -> Option<Addr16> {
    if ip.next_header != IPPROTO_ICMPV6
        || ip.hop_limit != ND_HOP_LIMIT
        || ip.payload_len < NS_BODY_LEN
        || ns[0] != ICMPV6_NEIGHBOR_SOLICITATION
        || ns[1] != 0
    {
        return None;
    }
    let mut target = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        target[i] = ns[8 + i];
        i += 1;
    }
    if is_unspecified(&ip.src) || is_multicast(&target) || eq16(&ip.src, &target) {
        return None;
    }
    Some(target)
}

#[inline(always)]
const fn eq16(a: &Addr16, b: &Addr16) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// NA flags (RFC 4861 4.4).
const NA_FLAG_ROUTER: u8 = 0x80;
const NA_FLAG_SOLICITED: u8 = 0x40;
const NA_FLAG_OVERRIDE: u8 = 0x20;
/// Target link-layer address option.
const ND_OPT_TARGET_LL_ADDR: u8 = 2;

/// Writes into `r` the Neighbor Advertisement answering a solicitation for `target` from
/// `solicitor` at `solicitor_mac`: unicast back to it, from `target`, telling that `target` is at
/// `our_mac`; `router` sets the R flag (the gateway's own address). (Written in place: the
/// programs build it in a per-CPU buffer, off their stack.)
#[inline(always)]
pub fn write_neighbor_advertisement(
    r: &mut [u8; NA_FRAME_LEN],
    (solicitor, solicitor_mac): (&Addr16, [u8; 6]),
    target: &Addr16,
    our_mac: [u8; 6],
    router: bool,
) {
    *r = [0u8; NA_FRAME_LEN];
    r[0..6].copy_from_slice(&solicitor_mac);
    r[6..12].copy_from_slice(&our_mac);
    r[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    let ip = ETH_HLEN;
    r[ip] = 0x60;
    r[ip + 4..ip + 6].copy_from_slice(&32u16.to_be_bytes());
    r[ip + 6] = IPPROTO_ICMPV6;
    r[ip + 7] = ND_HOP_LIMIT;
    r[ip + 8..ip + 24].copy_from_slice(target);
    r[ip + 24..ip + 40].copy_from_slice(solicitor);
    let icmp = ETH_HLEN + IPV6_HLEN;
    r[icmp] = ICMPV6_NEIGHBOR_ADVERTISEMENT;
    r[icmp + 4] = NA_FLAG_SOLICITED | NA_FLAG_OVERRIDE | if router { NA_FLAG_ROUTER } else { 0 };
    r[icmp + 8..icmp + 24].copy_from_slice(target);
    r[icmp + 24] = ND_OPT_TARGET_LL_ADDR;
    r[icmp + 25] = 1; // in units of 8 bytes
    r[icmp + 26..icmp + 32].copy_from_slice(&our_mac);
    let check = icmpv6_checksum(target, solicitor, 32, sum_words(&r[icmp..icmp + 32]));
    r[icmp + 2..icmp + 4].copy_from_slice(&check.to_be_bytes());
}

/// The 32-bit ones'-complement sum of `bytes` read as network-order 16-bit words (an odd last
/// byte padded with zero), not yet folded.
#[inline(always)]
pub fn sum_words(bytes: &[u8]) -> u32 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum = add_folding(sum, u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32);
        i += 2;
    }
    if i < bytes.len() {
        sum = add_folding(sum, (bytes[i] as u32) << 8);
    }
    sum
}

/// Ones'-complement addition of 32-bit partial sums (end-around carry).
#[inline(always)]
pub const fn add_folding(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s.wrapping_add(carry as u32)
}

/// Folds a 32-bit partial sum into 16 bits.
#[inline(always)]
pub const fn fold(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// A partial sum of words read in memory order on this (little-endian) machine, as the kernel's
/// `bpf_csum_diff` returns it, as a sum of network-order words.
#[inline(always)]
pub const fn native_sum_to_network(sum: u32) -> u32 {
    u16::from_be_bytes(fold(sum).to_ne_bytes()) as u32
}

/// The ICMPv6 checksum of a message of `len` bytes whose words sum to `body_sum` (checksum field
/// zero), from `src` to `dst` (RFC 4443 2.3: over the RFC 8200 8.1 pseudo-header).
#[inline(always)]
pub fn icmpv6_checksum(src: &Addr16, dst: &Addr16, len: u32, body_sum: u32) -> u16 {
    let mut sum = add_folding(sum_words(src), sum_words(dst));
    sum = add_folding(sum, len >> 16);
    sum = add_folding(sum, len & 0xffff);
    sum = add_folding(sum, IPPROTO_ICMPV6 as u32);
    !fold(add_folding(sum, body_sum))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
    const C_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];

    fn addr(s: &str) -> Addr16 {
        s.parse::<std::net::Ipv6Addr>().unwrap().octets()
    }

    /// RFC 1071 over a byte string, independent of the code under test.
    fn reference_checksum(data: &[u8]) -> u16 {
        let mut sum: u64 = 0;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                (c[0] as u16) << 8
            };
            sum += w as u64;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn pseudo(src: &Addr16, dst: &Addr16, body: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(src);
        p.extend_from_slice(dst);
        p.extend_from_slice(&(body.len() as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, IPPROTO_ICMPV6]);
        p.extend_from_slice(body);
        p
    }

    /// An NS as the responder sees it: the IPv6 header's fields and the message.
    fn ns(src: Addr16, target: Addr16, hop_limit: u8) -> (Ipv6Header, [u8; NS_BODY_LEN]) {
        let ip = Ipv6Header {
            payload_len: 32,
            next_header: IPPROTO_ICMPV6,
            hop_limit,
            src,
            dst: addr("ff02::1:ff00:1"),
        };
        let mut m = [0u8; NS_BODY_LEN];
        m[0] = ICMPV6_NEIGHBOR_SOLICITATION;
        m[8..24].copy_from_slice(&target);
        (ip, m)
    }

    #[test]
    fn header_and_address_classes() {
        let mut h = [0u8; IPV6_HLEN];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&1000u16.to_be_bytes());
        h[6] = 17;
        h[7] = 64;
        h[8..24].copy_from_slice(&addr("fd01:b::2"));
        h[24..40].copy_from_slice(&addr("fd01:b::3"));
        let p = Ipv6Header::parse(&h).unwrap();
        assert_eq!((p.payload_len, p.next_header, p.hop_limit), (1000, 17, 64));
        assert_eq!((p.src, p.dst), (addr("fd01:b::2"), addr("fd01:b::3")));
        assert_eq!(p.total_len(), 1040);
        h[0] = 0x45;
        assert_eq!(Ipv6Header::parse(&h), Err(Counter::DropMalformed));
        assert!(is_link_local(&addr("fe80::1")) && is_link_local(&addr("febf::1")));
        assert!(!is_link_local(&addr("fec0::1")) && !is_link_local(&addr("fd01:b::1")));
        assert!(is_multicast(&addr("ff02::1:ff00:1")) && !is_multicast(&addr("fe80::1")));
        assert!(is_unspecified(&addr("::")) && !is_unspecified(&addr("::1")));
    }

    #[test]
    fn icmpv6_roles() {
        assert_eq!(icmpv6_role(134), Icmpv6Role::RouterMessage);
        assert_eq!(icmpv6_role(137), Icmpv6Role::RouterMessage);
        assert_eq!(icmpv6_role(135), Icmpv6Role::Solicitation);
        for t in [130, 131, 132, 133, 136, 143] {
            assert_eq!(icmpv6_role(t), Icmpv6Role::Housekeeping, "{t}");
        }
        for t in [1, 2, 3, 4, 128, 129] {
            assert_eq!(icmpv6_role(t), Icmpv6Role::Other, "{t}");
        }
    }

    #[test]
    fn only_proper_solicitations_are_answered() {
        let c = addr("fd01:b::2");
        let gw = addr("fd01:b::1");
        let t = |(ip, m): (Ipv6Header, [u8; NS_BODY_LEN])| solicited_target(&ip, &m);
        assert_eq!(t(ns(c, gw, 255)), Some(gw));
        assert_eq!(t(ns(addr("fe80::1"), gw, 255)), Some(gw), "from link-local");
        assert_eq!(t(ns(c, gw, 64)), None, "forwarded");
        assert_eq!(t(ns([0; 16], gw, 255)), None, "DAD probe");
        assert_eq!(t(ns(c, c, 255)), None, "own address");
        assert_eq!(t(ns(c, addr("ff02::1"), 255)), None, "multicast target");
        let (ip, mut m) = ns(c, gw, 255);
        m[1] = 1;
        assert_eq!(solicited_target(&ip, &m), None, "code 1");
        let (mut ip, m) = ns(c, gw, 255);
        ip.payload_len = 16;
        assert_eq!(solicited_target(&ip, &m), None, "shorter than an NS");
        let (mut ip, m) = ns(c, gw, 255);
        ip.next_header = 0;
        assert_eq!(solicited_target(&ip, &m), None, "behind hop-by-hop");
        let (ip, mut m) = ns(c, gw, 255);
        m[0] = ICMPV6_NEIGHBOR_ADVERTISEMENT;
        assert_eq!(solicited_target(&ip, &m), None);
    }

    #[test]
    fn advertisement_is_rfc4861_with_a_valid_checksum() {
        let c = addr("fd01:b::2");
        let gw = addr("fd01:b::1");
        let mut na = [0xaa; NA_FRAME_LEN];
        write_neighbor_advertisement(&mut na, (&c, C_MAC), &gw, GW_MAC, true);
        assert_eq!(&na[0..6], &C_MAC);
        assert_eq!(&na[6..12], &GW_MAC);
        assert_eq!(&na[12..14], &[0x86, 0xdd]);
        assert_eq!(&na[14..22], &[0x60, 0, 0, 0, 0, 32, 58, 255]);
        assert_eq!(&na[22..38], &gw, "from the target");
        assert_eq!(&na[38..54], &c, "to the solicitor");
        assert_eq!(&na[54..56], &[136, 0]);
        assert_eq!(na[58], 0xe0, "router, solicited, override");
        assert_eq!(&na[59..62], &[0, 0, 0]);
        assert_eq!(&na[62..78], &gw);
        assert_eq!(&na[78..80], &[2, 1], "target link-layer address option");
        assert_eq!(&na[80..86], &GW_MAC);
        assert_eq!(
            reference_checksum(&pseudo(&gw, &c, &na[54..86])),
            0,
            "ICMPv6 checksum"
        );
        let other = addr("fd01:b::7");
        write_neighbor_advertisement(&mut na, (&c, C_MAC), &other, GW_MAC, false);
        assert_eq!(na[58], 0x60, "not a router");
        assert_eq!(reference_checksum(&pseudo(&other, &c, &na[54..86])), 0);
    }

    #[test]
    fn checksum_of_a_native_order_partial_sum() {
        let data: Vec<u8> = (0..256u32).map(|i| (i * 37 + 11) as u8).collect();
        // What bpf_csum_diff returns on a little-endian machine: words as they sit in memory.
        let native = data.chunks(2).fold(0u32, |s, w| {
            add_folding(s, u16::from_ne_bytes([w[0], w[1]]) as u32)
        });
        assert_eq!(fold(native_sum_to_network(native)), fold(sum_words(&data)));
        let src = addr("fd01:b::1");
        let dst = addr("fd01:b::2");
        let check = icmpv6_checksum(&src, &dst, data.len() as u32, native_sum_to_network(native));
        // The checksum word added anywhere word-aligned makes the whole sum check out.
        let mut with = pseudo(&src, &dst, &data);
        with.extend_from_slice(&check.to_be_bytes());
        assert_eq!(reference_checksum(&with), 0);
    }
}
