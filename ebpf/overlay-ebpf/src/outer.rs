//! The outer headers of an IPv6 underlay (`overlay_common::underlay6`): is a frame from the
//! underlay NIC VXLAN to this agent on our port, and are its outer IPv6 and UDP headers
//! consistent. The IPv4 underlay's are parsed in `decap` itself; the inner checks are `decap`'s
//! for both.

use aya_ebpf::programs::TcContext;
use overlay_common::{
    counters::Counter,
    ipv6::Ipv6Header,
    maps::{Addr16, AgentConfig},
    packet::{ETH_HLEN, ETH_P_IPV6, EthHeader, UDP_HLEN},
    policy::IPV6_HLEN,
    underlay6::{Underlay6Packet, classify_underlay6},
};

use crate::skb;

/// The outer headers of an IPv6 underlay frame. Every field is set on every path (zero when not
/// `ours`): an enum or `Option` whose other variant leaves them undefined has LLVM read
/// uninitialised registers, which the verifier refuses.
#[derive(Clone, Copy)]
pub struct Outer6 {
    /// VXLAN to us on our port, its outer headers consistent. Otherwise the host's.
    pub ours: bool,
    /// The sending VTEP's IPv6 underlay address.
    pub src: Addr16,
    /// Outer UDP source port.
    pub src_port: u16,
}

const NOT_OURS: Outer6 = Outer6 {
    ours: false,
    src: [0; 16],
    src_port: 0,
};

/// Parses an Ethernet/IPv6/UDP frame's outer headers; a [`Counter`] for VXLAN to drop on them.
/// Anything we cannot even parse as UDP over IPv6 is not ours to judge: the host stack decides.
#[inline(always)]
pub fn ipv6(ctx: &TcContext, cfg: &AgentConfig) -> Result<Outer6, Counter> {
    let Ok(eth) = skb::load::<ETH_HLEN>(ctx, 0) else {
        return Ok(NOT_OURS);
    };
    if EthHeader::parse(&eth).ethertype != ETH_P_IPV6 {
        return Ok(NOT_OURS);
    }
    let Ok(ip) = skb::load::<IPV6_HLEN>(ctx, ETH_HLEN) else {
        return Ok(NOT_OURS);
    };
    let Ok(ip) = Ipv6Header::parse(&ip) else {
        return Ok(NOT_OURS);
    };
    let Ok(udp) = skb::load::<UDP_HLEN>(ctx, ETH_HLEN + IPV6_HLEN) else {
        return Ok(NOT_OURS);
    };
    match classify_underlay6(
        &ip,
        &udp,
        ctx.len() as usize,
        cfg.vxlan_port,
        &cfg.underlay_ip,
    )? {
        Underlay6Packet::NotOurs => Ok(NOT_OURS),
        Underlay6Packet::Vxlan { outer_src, .. } => Ok(Outer6 {
            ours: true,
            src: outer_src,
            src_port: u16::from_be_bytes([udp[0], udp[1]]),
        }),
    }
}
