//! The outer headers of a frame from the underlay NIC, of the underlay's family (the agent's
//! underlay address says which: IPv4-mapped, or IPv6): is it VXLAN to us on our port, and are
//! its outer IP and UDP headers consistent. Shared by `decap` (TC); the inner checks stay there.

use aya_ebpf::programs::TcContext;
use overlay_common::{
    counters::Counter,
    ipv6::Ipv6Header,
    maps::{Addr16, AgentConfig, ipv4_mapped, ipv4_unmapped},
    packet::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EthHeader, IPV4_HLEN, Ipv4Header, UDP_HLEN, UnderlayPacket,
        classify_underlay,
    },
    policy::IPV6_HLEN,
    underlay6::{Underlay6Packet, VXLAN6_ENCAP_LEN, classify_underlay6},
};

use crate::skb;

/// VXLAN whose outer headers passed their checks.
pub struct OuterVxlan {
    /// The sending VTEP's underlay address (16 bytes, IPv4-mapped for IPv4).
    pub src: Addr16,
    /// Outer UDP source port.
    pub src_port: u16,
    /// Outer IP + UDP + VXLAN + inner Ethernet: what decapsulation removes after the outer
    /// Ethernet header.
    pub strip_len: usize,
    pub vxlan_offset: usize,
    /// The outer header is IPv6.
    pub ipv6: bool,
}

/// What a frame from the underlay is, by its outer headers.
pub enum Outer {
    /// Not VXLAN to us (with the IPv4 header when it has one, for masquerade's replies).
    Host(Option<Ipv4Header>),
    Vxlan(OuterVxlan),
}

/// Parses the outer headers; a [`Counter`] for VXLAN to drop on them. Anything we cannot even
/// parse as UDP over the underlay's family is not ours to judge: the host stack decides.
#[inline(always)]
pub fn parse(ctx: &TcContext, cfg: &AgentConfig) -> Result<Outer, Counter> {
    let Ok(eth) = skb::load::<ETH_HLEN>(ctx, 0) else {
        return Ok(Outer::Host(None));
    };
    let eth = EthHeader::parse(&eth);
    match ipv4_unmapped(&cfg.underlay_ip) {
        Some(local_ip) => parse_ipv4(ctx, &eth, cfg.vxlan_port, local_ip),
        None if eth.ethertype == ETH_P_IPV6 => parse_ipv6(ctx, cfg),
        // The host's own IPv4 on an IPv6 underlay.
        None => Ok(Outer::Host(None)),
    }
}

#[inline(always)]
fn parse_ipv4(
    ctx: &TcContext,
    eth: &EthHeader,
    vxlan_port: u16,
    local_ip: [u8; 4],
) -> Result<Outer, Counter> {
    if eth.ethertype != ETH_P_IP {
        return Ok(Outer::Host(None));
    }
    let Ok(ip) = skb::load::<IPV4_HLEN>(ctx, ETH_HLEN) else {
        return Ok(Outer::Host(None));
    };
    let Ok(ip) = Ipv4Header::parse(&ip) else {
        return Ok(Outer::Host(None));
    };
    let Ok(udp) = skb::load::<UDP_HLEN>(ctx, ETH_HLEN + ip.header_len) else {
        return Ok(Outer::Host(Some(ip)));
    };
    match classify_underlay(eth, &ip, &udp, ctx.len() as usize, vxlan_port, local_ip)? {
        UnderlayPacket::NotOurs => Ok(Outer::Host(Some(ip))),
        UnderlayPacket::Vxlan {
            outer_src,
            strip_len,
            vxlan_offset,
        } => Ok(Outer::Vxlan(OuterVxlan {
            src: ipv4_mapped(outer_src),
            src_port: u16::from_be_bytes([udp[0], udp[1]]),
            strip_len,
            vxlan_offset,
            ipv6: false,
        })),
    }
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, cfg: &AgentConfig) -> Result<Outer, Counter> {
    let Ok(ip) = skb::load::<IPV6_HLEN>(ctx, ETH_HLEN) else {
        return Ok(Outer::Host(None));
    };
    let Ok(ip) = Ipv6Header::parse(&ip) else {
        return Ok(Outer::Host(None));
    };
    let Ok(udp) = skb::load::<UDP_HLEN>(ctx, ETH_HLEN + IPV6_HLEN) else {
        return Ok(Outer::Host(None));
    };
    match classify_underlay6(
        &ip,
        &udp,
        ctx.len() as usize,
        cfg.vxlan_port,
        &cfg.underlay_ip,
    )? {
        Underlay6Packet::NotOurs => Ok(Outer::Host(None)),
        Underlay6Packet::Vxlan {
            outer_src,
            vxlan_offset,
        } => Ok(Outer::Vxlan(OuterVxlan {
            src: outer_src,
            src_port: u16::from_be_bytes([udp[0], udp[1]]),
            strip_len: VXLAN6_ENCAP_LEN,
            vxlan_offset,
            ipv6: true,
        })),
    }
}
