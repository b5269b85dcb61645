//! The IPv6 underlay: VXLAN in outer Ethernet/IPv6/UDP, for agents whose underlay address is
//! IPv6. The inner frame is the same as over IPv4 (VXLAN header, inner Ethernet with the VTEP
//! MACs, an inner IPv4 or IPv6 packet); only the outer IP header differs, and it is 20 bytes
//! longer.
//!
//! Outer UDP checksum: **zero** (RFC 6935 allows it for tunnels over IPv6, under the conditions
//! of RFC 6936). A computed checksum is not an option for what the datapath sends:
//! `bpf_skb_adjust_room`'s `ENCAP_L4_UDP` marks GSO packets `SKB_GSO_UDP_TUNNEL`, never
//! `..._TUNNEL_CSUM`, so the kernel would copy one checksum into every segment, wrong for all
//! but possibly one; and summing a 64 KB super-packet in BPF is out of reach. RFC 6936's
//! conditions hold: the receiver accepts zero only on the VXLAN port (our decap; the kernel's
//! VXLAN device with `udp6zerocsumrx`), every inner packet carries its own transport checksum,
//! and a corrupted outer header is caught by the decap's checks (destination must be the
//! agent's address, source a known VTEP, a known VNI, consistent lengths, an inner endpoint of
//! that network sent from an address the sending agent owns). A non-zero checksum from another
//! VTEP is accepted and not verified, as over IPv4.
//!
//! Pure functions, unit-tested on the host, run by the programs as they are.

use crate::{
    counters::Counter,
    ipv6::Ipv6Header,
    maps::Addr16,
    packet::{
        ETH_HLEN, ETH_P_IPV6, IPPROTO_UDP, IPV4_HLEN, UDP_HLEN, VXLAN_HLEN, put_outer_macs,
        put_udp_vxlan_eth,
    },
    policy::IPV6_HLEN,
};

/// Bytes added after the outer Ethernet header by encapsulation over IPv6: outer IPv6, UDP,
/// VXLAN and the inner Ethernet header (70; 50 over IPv4).
pub const VXLAN6_ENCAP_LEN: usize = IPV6_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
/// Everything in front of the inner IP header of a VXLAN-over-IPv6 frame.
pub const VXLAN6_HEADERS_LEN: usize = ETH_HLEN + VXLAN6_ENCAP_LEN;
/// What VXLAN adds to an inner packet on the underlay link's MTU (which excludes the outer
/// Ethernet header): the overlay MTU plus this must fit the underlay MTU (no fragmentation,
/// RFC 7348).
pub const VXLAN4_MTU_OVERHEAD: u32 = (IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN) as u32;
pub const VXLAN6_MTU_OVERHEAD: u32 = VXLAN6_ENCAP_LEN as u32;
/// Hop limit of the outer IPv6 header (the IPv4 underlay's TTL).
pub const OUTER_HOP_LIMIT: u8 = 64;

/// The MTU overhead of VXLAN over an underlay of this family.
#[inline(always)]
pub const fn mtu_overhead(ipv6_underlay: bool) -> u32 {
    if ipv6_underlay {
        VXLAN6_MTU_OVERHEAD
    } else {
        VXLAN4_MTU_OVERHEAD
    }
}

/// The outer flow label (RFC 6437/6438): 20 bits of the inner flow's hash, so that ECMP and RSS
/// in an IPv6 underlay that hash on the label see per-flow entropy, stable for a flow like the
/// source port. Never 0 (which means "no label").
#[inline(always)]
pub const fn vxlan_flow_label(flow_hash: u32) -> u32 {
    let label = (flow_hash ^ (flow_hash >> 20)) & 0x000f_ffff;
    if label == 0 { 1 } else { label }
}

/// Everything needed to build the headers of one frame encapsulated over IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encap6Params {
    /// Outer Ethernet (destination, source); without them zero, for the kernel's neighbour code
    /// to fill.
    pub outer_macs: Option<([u8; 6], [u8; 6])>,
    pub outer_src: Addr16,
    pub outer_dst: Addr16,
    pub src_port: u16,
    pub dst_port: u16,
    /// 20 bits, from [`vxlan_flow_label`].
    pub flow_label: u32,
    pub vni: u32,
    pub inner_src_mac: [u8; 6],
    pub inner_dst_mac: [u8; 6],
    pub inner_ethertype: u16,
    /// Length of the inner IP packet (the original frame minus its Ethernet header).
    pub inner_ip_len: usize,
}

/// The 84 bytes in front of the inner IP packet of a VXLAN-over-IPv6 frame (see
/// [`write_vxlan6_headers`]), built on the stack (the unit tests' view; the programs write them
/// in place).
#[cfg(test)]
fn build_vxlan6_headers(p: &Encap6Params) -> [u8; VXLAN6_HEADERS_LEN] {
    let mut h = [0u8; VXLAN6_HEADERS_LEN];
    write_vxlan6_headers(&mut h, p);
    h
}

/// Writes the 84 bytes in front of the inner IP packet of a VXLAN-over-IPv6 frame into `h`,
/// every byte of it (as [`crate::packet::write_vxlan_headers`], and for the same reason): outer
/// Ethernet, IPv6 (traffic class 0, the flow label, hop limit [`OUTER_HOP_LIMIT`], next header
/// UDP), UDP with checksum 0 (see the module documentation), VXLAN, inner Ethernet.
#[inline(always)]
pub fn write_vxlan6_headers(h: &mut [u8; VXLAN6_HEADERS_LEN], p: &Encap6Params) {
    put_outer_macs(h, p.outer_macs);
    h[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    let ip = ETH_HLEN;
    // Version 6, traffic class 0, the flow label.
    h[ip..ip + 4].copy_from_slice(&((6u32 << 28) | (p.flow_label & 0x000f_ffff)).to_be_bytes());
    // A GSO super-packet's lengths are rewritten per segment by the kernel; clamp so that the
    // field never wraps.
    let payload = UDP_HLEN + VXLAN_HLEN + ETH_HLEN + p.inner_ip_len;
    let payload = if payload > 0xffff { 0xffff } else { payload } as u16;
    h[ip + 4..ip + 8].copy_from_slice(
        &(((payload as u32) << 16) | ((IPPROTO_UDP as u32) << 8) | OUTER_HOP_LIMIT as u32)
            .to_be_bytes(),
    );
    h[ip + 8..ip + 24].copy_from_slice(&p.outer_src);
    h[ip + 24..ip + 40].copy_from_slice(&p.outer_dst);
    // The UDP checksum stays 0 (see the module documentation).
    put_udp_vxlan_eth(
        &mut h[ip + IPV6_HLEN..],
        payload,
        (p.src_port, p.dst_port),
        p.vni,
        (p.inner_dst_mac, p.inner_src_mac),
        p.inner_ethertype,
    );
}

/// What an IPv6 underlay packet is to the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Underlay6Packet {
    /// Not VXLAN to us on our port: the host's own traffic, passed untouched.
    NotOurs,
    /// VXLAN on our port whose outer headers look right.
    Vxlan {
        outer_src: Addr16,
        /// Offset of the VXLAN header from the start of the frame.
        vxlan_offset: usize,
    },
}

/// Offset of the VXLAN header in a VXLAN-over-IPv6 frame (no extension headers).
pub const VXLAN6_OFFSET: usize = ETH_HLEN + IPV6_HLEN + UDP_HLEN;

/// Classifies an Ethernet/IPv6 underlay frame from its IPv6 header and the UDP header right
/// behind it. `frame_len` is the whole frame's length (skb->len); `local_ip` this agent's
/// underlay address. Only UDP directly behind the fixed header is VXLAN: a packet with extension
/// headers (a fragment, say) is the host's to judge, and VTEPs never send one (they do not
/// fragment, RFC 7348).
#[inline(always)]
pub fn classify_underlay6(
    ip: &Ipv6Header,
    udp: &[u8; UDP_HLEN],
    frame_len: usize,
    vxlan_port: u16,
    local_ip: &Addr16,
) -> Result<Underlay6Packet, Counter> {
    if ip.next_header != IPPROTO_UDP || ip.dst != *local_ip {
        return Ok(Underlay6Packet::NotOurs);
    }
    if u16::from_be_bytes([udp[2], udp[3]]) != vxlan_port {
        return Ok(Underlay6Packet::NotOurs);
    }
    // From here on it claims to be ours: anything inconsistent is dropped and counted.
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    if ip.total_len() > frame_len.saturating_sub(ETH_HLEN)
        || ip.payload_len < UDP_HLEN + VXLAN_HLEN + ETH_HLEN + IPV4_HLEN
        || udp_len > ip.payload_len
    {
        return Err(Counter::DropTruncated);
    }
    // GSO and GRO keep the UDP and IPv6 lengths of a super-packet consistent too.
    if udp_len != ip.payload_len {
        return Err(Counter::DropMalformed);
    }
    Ok(Underlay6Packet::Vxlan {
        outer_src: ip.src,
        vxlan_offset: VXLAN6_OFFSET,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{ETH_P_IP, parse_vxlan};

    const LOCAL: Addr16 = [0xfd, 0, 2, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
    const PEER: Addr16 = [0xfd, 0, 2, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12];

    #[test]
    fn headers_written_in_place_cover_every_byte() {
        for len in [0, 84, 1430, 70_000] {
            let mut p = params(ETH_P_IPV6, len);
            p.outer_macs = Some(([2, 0, 0, 0, 0, 0x0b], [2, 0, 0, 0, 0, 0x0a]));
            let mut garbage = [0xa5u8; VXLAN6_HEADERS_LEN];
            write_vxlan6_headers(&mut garbage, &p);
            let zeroes = build_vxlan6_headers(&p);
            assert_eq!(garbage, zeroes, "inner length {len}");
            assert_eq!(
                &zeroes[0..14],
                &[2, 0, 0, 0, 0, 0x0b, 2, 0, 0, 0, 0, 0x0a, 0x86, 0xdd]
            );
            assert_eq!(&zeroes[14..18], &[0x60, 0x0a, 0xbc, 0xde]);
            assert_eq!(&zeroes[20..22], &[IPPROTO_UDP, OUTER_HOP_LIMIT]);
        }
    }

    fn params(inner_ethertype: u16, inner_ip_len: usize) -> Encap6Params {
        Encap6Params {
            outer_macs: None,
            outer_src: LOCAL,
            outer_dst: PEER,
            src_port: 0xc123,
            dst_port: 64000,
            flow_label: 0xabcde,
            vni: 1024,
            inner_src_mac: [0x70, 0xb3, 0xd5, 0x80, 0, 1],
            inner_dst_mac: [0x70, 0xb3, 0xd5, 0x80, 0, 2],
            inner_ethertype,
            inner_ip_len,
        }
    }

    #[test]
    fn encap6_headers_are_byte_exact() {
        let h = build_vxlan6_headers(&params(ETH_P_IP, 84));
        let mut want = [0u8; VXLAN6_HEADERS_LEN];
        want[12..14].copy_from_slice(&[0x86, 0xdd]);
        // Version 6, traffic class 0, flow label 0xabcde.
        want[14..18].copy_from_slice(&[0x60, 0x0a, 0xbc, 0xde]);
        want[18..20].copy_from_slice(&((8 + 8 + 14 + 84) as u16).to_be_bytes());
        want[20] = 17;
        want[21] = 64;
        want[22..38].copy_from_slice(&LOCAL);
        want[38..54].copy_from_slice(&PEER);
        want[54..56].copy_from_slice(&0xc123u16.to_be_bytes());
        want[56..58].copy_from_slice(&64000u16.to_be_bytes());
        want[58..60].copy_from_slice(&((8 + 8 + 14 + 84) as u16).to_be_bytes());
        // UDP checksum 0 (RFC 6935).
        want[62..70].copy_from_slice(&[0x08, 0, 0, 0, 0, 0x04, 0, 0]);
        want[70..76].copy_from_slice(&[0x70, 0xb3, 0xd5, 0x80, 0, 2]);
        want[76..82].copy_from_slice(&[0x70, 0xb3, 0xd5, 0x80, 0, 1]);
        want[82..84].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(h, want);
        assert_eq!(parse_vxlan(h[62..70].try_into().unwrap()), Ok(1024));
        let v6 = build_vxlan6_headers(&params(ETH_P_IPV6, 104));
        assert_eq!(&v6[82..84], &[0x86, 0xdd], "inner IPv6");
    }

    #[test]
    fn encap6_lengths_of_a_gso_superpacket_never_wrap() {
        let h = build_vxlan6_headers(&params(ETH_P_IP, 70_000));
        assert_eq!(&h[18..20], &[0xff, 0xff]);
        assert_eq!(&h[58..60], &[0xff, 0xff]);
    }

    #[test]
    fn flow_label_is_20_bits_never_zero_and_spreads() {
        for hash in [0u32, 1, 0xfffff, 0x100000, 0x1234_5678, u32::MAX] {
            let l = vxlan_flow_label(hash);
            assert!(l != 0 && l <= 0xfffff, "{hash:#x} -> {l:#x}");
        }
        assert_ne!(vxlan_flow_label(1), vxlan_flow_label(2));
        assert_ne!(vxlan_flow_label(0x0010_0000), vxlan_flow_label(0x0020_0000));
        // Bits above 20 are masked out of the field.
        let mut p = params(ETH_P_IP, 84);
        p.flow_label = 0xfff0_0001;
        assert_eq!(&build_vxlan6_headers(&p)[14..18], &[0x60, 0, 0, 1]);
    }

    #[test]
    fn mtu_overhead_per_family() {
        assert_eq!(mtu_overhead(false), 50);
        assert_eq!(mtu_overhead(true), 70);
    }

    fn header(payload_len: usize, next: u8, src: Addr16, dst: Addr16) -> Ipv6Header {
        Ipv6Header {
            payload_len,
            next_header: next,
            hop_limit: 64,
            src,
            dst,
        }
    }

    fn udp(dst_port: u16, len: usize) -> [u8; 8] {
        let mut u = [0u8; 8];
        u[0..2].copy_from_slice(&50000u16.to_be_bytes());
        u[2..4].copy_from_slice(&dst_port.to_be_bytes());
        u[4..6].copy_from_slice(&(len as u16).to_be_bytes());
        u
    }

    #[test]
    fn underlay6_classification() {
        let payload = 8 + 8 + 14 + 84;
        let frame = 14 + 40 + payload;
        let ip = header(payload, 17, PEER, LOCAL);
        assert_eq!(
            classify_underlay6(&ip, &udp(64000, payload), frame, 64000, &LOCAL),
            Ok(Underlay6Packet::Vxlan {
                outer_src: PEER,
                vxlan_offset: 62
            })
        );
        // Not ours: another port, another destination, not UDP, extension headers.
        for (ip, u) in [
            (ip, udp(4789, payload)),
            (header(payload, 17, PEER, PEER), udp(64000, payload)),
            (header(payload, 6, PEER, LOCAL), udp(64000, payload)),
            (header(payload, 44, PEER, LOCAL), udp(64000, payload)),
            (header(payload, 0, PEER, LOCAL), udp(64000, payload)),
        ] {
            assert_eq!(
                classify_underlay6(&ip, &u, frame, 64000, &LOCAL),
                Ok(Underlay6Packet::NotOurs)
            );
        }
        // Cut: the frame is shorter than the IPv6 header says.
        assert_eq!(
            classify_underlay6(&ip, &udp(64000, payload), frame - 1, 64000, &LOCAL),
            Err(Counter::DropTruncated)
        );
        // Too short to hold VXLAN, inner Ethernet and an inner IP header.
        let tiny = 8 + 8 + 14 + 19;
        assert_eq!(
            classify_underlay6(
                &header(tiny, 17, PEER, LOCAL),
                &udp(64000, tiny),
                14 + 40 + tiny,
                64000,
                &LOCAL
            ),
            Err(Counter::DropTruncated)
        );
        // UDP longer than the IPv6 payload: truncated; shorter: inconsistent.
        assert_eq!(
            classify_underlay6(&ip, &udp(64000, payload + 1), frame, 64000, &LOCAL),
            Err(Counter::DropTruncated)
        );
        assert_eq!(
            classify_underlay6(&ip, &udp(64000, payload - 1), frame, 64000, &LOCAL),
            Err(Counter::DropMalformed)
        );
    }
}
