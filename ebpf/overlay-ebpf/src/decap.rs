//! VXLAN decapsulation: validate what arrived from the underlay, strip it, deliver the inner frame.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    programs::TcContext,
};
use overlay_common::{
    counters::{Counter, Drop, InNetwork},
    ipv6::{Ipv6Header, is_link_local},
    maps::{Addr16, AgentConfig, Endpoint, ipv4_mapped, ipv4_unmapped},
    packet::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EthHeader, IPV4_HLEN, Ipv4Header, UDP_HLEN, UnderlayPacket,
        VXLAN_HLEN, classify_underlay, parse_vxlan,
    },
    policy::{IPV6_HLEN, in_port_range},
    underlay6::{VXLAN6_ENCAP_LEN, VXLAN6_OFFSET},
};

use crate::{
    deliver,
    forward::L3,
    guard,
    isolation::{accept_remote, accepted_remote},
    maps::{is_known_vtep, nat_config, wire_vni},
    outer, skb,
    stats::count_in_slot,
};

/// A VXLAN frame that passed every check, ready to be stripped.
pub struct Accepted {
    /// The network (id) of the inner packet, from its addresses.
    pub network: u32,
    pub endpoint: &'static Endpoint,
    pub strip_len: usize,
    /// The inner packet is IPv6.
    pub inner_ipv6: bool,
    /// The outer header is IPv6 (an IPv6 underlay). The outer Ethernet type, kept by the strip,
    /// is the outer family's until rewritten for the inner one.
    pub outer_ipv6: bool,
}

/// The outer headers of a VXLAN frame that passed their checks (either underlay family).
pub struct OuterVxlan {
    /// The sending VTEP's underlay address.
    pub src: Addr16,
    pub src_port: u16,
    /// Outer IP + UDP + VXLAN + inner Ethernet: what decapsulation removes.
    pub strip_len: usize,
    pub vxlan_offset: usize,
    pub ipv6: bool,
}

/// What an underlay frame is.
pub enum Inspected {
    /// Not VXLAN: the host's own traffic or a reply to a masqueraded flow. Carries the IPv4
    /// header when the frame has one, so the masquerade path need not parse it again.
    Host(Option<Ipv4Header>),
    /// VXLAN that passed every check, ready to be stripped.
    Vxlan(Accepted),
}

/// Decides what to do with an underlay frame (its Ethernet header `eth`, already read): [`Inspected::Host`] for what is not VXLAN,
/// [`Inspected::Vxlan`] for VXLAN to deliver, a [`Drop`] for VXLAN to drop.
#[inline(always)]
pub fn inspect(ctx: &TcContext, cfg: &AgentConfig, eth: &EthHeader) -> Result<Inspected, Drop> {
    let Some(local_ip) = ipv4_unmapped(&cfg.underlay_ip) else {
        return Ok(Inspected::Host(None));
    };
    // Anything we cannot even parse as UDP/IPv4 is not ours to judge: the host stack decides.
    if eth.ethertype != ETH_P_IP {
        return Ok(Inspected::Host(None));
    }
    let Ok(ip) = skb::load::<IPV4_HLEN>(ctx, ETH_HLEN) else {
        return Ok(Inspected::Host(None));
    };
    let Ok(ip) = Ipv4Header::parse(&ip) else {
        return Ok(Inspected::Host(None));
    };
    let Ok(udp) = skb::load::<UDP_HLEN>(ctx, ETH_HLEN + ip.header_len) else {
        return Ok(Inspected::Host(Some(ip)));
    };
    let (outer_src, strip_len, vxlan_offset) =
        match classify_underlay(eth, &ip, &udp, ctx.len() as usize, cfg.vxlan_port, local_ip)? {
            UnderlayPacket::NotOurs => return Ok(Inspected::Host(Some(ip))),
            UnderlayPacket::Vxlan {
                outer_src,
                strip_len,
                vxlan_offset,
            } => (ipv4_mapped(outer_src), strip_len, vxlan_offset),
        };
    let outer = OuterVxlan {
        src: outer_src,
        src_port: u16::from_be_bytes([udp[0], udp[1]]),
        strip_len,
        vxlan_offset,
        ipv6: false,
    };
    accept(ctx, &outer).map(Inspected::Vxlan)
}

/// [`inspect`] for an IPv6 underlay (`from_underlay_ipv6`), on VXLAN whose outer headers
/// `outer::ipv6` took for ours: the accepted VXLAN, or a [`Drop`].
#[inline(always)]
pub fn inspect_ipv6(ctx: &TcContext, parsed: &outer::Outer6) -> Result<Accepted, Drop> {
    let outer = OuterVxlan {
        src: parsed.src,
        src_port: parsed.src_port,
        strip_len: VXLAN6_ENCAP_LEN,
        vxlan_offset: VXLAN6_OFFSET,
        ipv6: true,
    };
    accept(ctx, &outer)
}

/// What a VXLAN frame says behind its outer headers, parsed before any map is consulted.
struct Frame {
    vni: u32,
    inner_src: Addr16,
    inner_dst: Addr16,
    inner: L3,
    inner_ipv6: bool,
}

/// Why a frame could not be parsed, by how far it got: the drop of a bad VXLAN header counts
/// under no network, that of a bad inner packet under the network its VNI carries.
enum Unparsed {
    Vxlan(Counter),
    Inner { vni: u32, reason: Counter },
}

/// Reads the VXLAN header and the inner Ethernet and IP headers (whole, not link-local).
#[inline(always)]
fn parse_frame(ctx: &TcContext, vxlan_offset: usize) -> Result<Frame, Unparsed> {
    let vxlan = skb::load::<VXLAN_HLEN>(ctx, vxlan_offset).map_err(Unparsed::Vxlan)?;
    let vni = parse_vxlan(&vxlan).map_err(Unparsed::Vxlan)?;
    let inner = |reason| Unparsed::Inner { vni, reason };
    let inner_eth = skb::load::<ETH_HLEN>(ctx, vxlan_offset + VXLAN_HLEN).map_err(inner)?;
    let inner_l3 = vxlan_offset + VXLAN_HLEN + ETH_HLEN;
    let inner_ipv6 = match EthHeader::parse(&inner_eth).ethertype {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => return Err(inner(Counter::DropMalformed)),
    };
    let (inner_src, inner_dst, l3) = if inner_ipv6 {
        let ip = Ipv6Header::parse(&skb::load::<IPV6_HLEN>(ctx, inner_l3).map_err(inner)?)
            .map_err(inner)?;
        // Link-local addresses never cross an agent: nothing from a remote container reaches a
        // local one (or the host) by link-local, whatever the map holds under that address.
        if is_link_local(&ip.src) || is_link_local(&ip.dst) {
            return Err(inner(Counter::DropLinkLocal));
        }
        (ip.src, ip.dst, L3::v6(&ip, inner_l3))
    } else {
        let ip = Ipv4Header::parse(&skb::load::<IPV4_HLEN>(ctx, inner_l3).map_err(inner)?)
            .map_err(inner)?;
        (
            ipv4_mapped(ip.src),
            ipv4_mapped(ip.dst),
            L3::v4(&ip, inner_l3),
        )
    };
    // The inner packet must be all there: a cut one is never delivered as if whole.
    let inner_room = (ctx.len() as usize).saturating_sub(inner_l3);
    if l3.total_len > inner_room {
        return Err(inner(Counter::DropTruncated));
    }
    Ok(Frame {
        vni,
        inner_src,
        inner_dst,
        inner: l3,
        inner_ipv6,
    })
}

/// The checks behind the outer headers, the same for both underlay families: the sender is a
/// known VTEP outside the masquerade ports, the VNI a known network, the inner packet whole and
/// for a local endpoint of that network from an address the sending agent owns.
///
/// A frame that passes takes two lookups (the sending agent's route to the inner source, the
/// destination endpoint), not four: a route to the inner source through this very VTEP in this
/// very VNI proves both known, for the agent writes a route only after its VTEP and VNI, and
/// removes it before them (`reconcile::Plan::apply`). Only a frame that fails is looked at again,
/// check by check in the order above, to name its drop.
#[inline(always)]
fn accept(ctx: &TcContext, outer: &OuterVxlan) -> Result<Accepted, Drop> {
    let outer_src = outer.src;
    // Agents send VXLAN from ports outside the masquerade range; from inside it, it is a
    // container's datagram that masquerade gave this agent's address (a second line behind
    // `guard::to_outside` on the sending agent).
    let outer_src_port = outer.src_port;
    if nat_config().is_some_and(|n| in_port_range(outer_src_port, n.port_min, n.port_max)) {
        return Err(Counter::DropVxlanNatPort.into());
    }
    let frame = parse_frame(ctx, outer.vxlan_offset);
    if let Ok(f) = &frame
        && let Some(ep) = accepted_remote(&f.inner_src, &f.inner_dst, f.vni, outer_src)
    {
        return accepted(ctx, outer, f, ep);
    }
    if !is_known_vtep(outer_src) {
        return Err(Counter::DropUnknownVtep.into());
    }
    let (vni, inner) = match frame {
        Ok(f) => (f.vni, Ok(f)),
        Err(Unparsed::Inner { vni, reason }) => (vni, Err(reason)),
        Err(Unparsed::Vxlan(reason)) => return Err(reason.into()),
    };
    // Until the inner addresses say the network, drops count under the one the VNI carries
    // (none when networks share it).
    let carried = wire_vni(vni).ok_or(Counter::DropUnknownVni)?.network;
    let f = inner.in_network(carried)?;
    let ep = accept_remote(&f.inner_src, &f.inner_dst, vni, carried, outer_src)?;
    accepted(ctx, outer, &f, ep)
}

/// The frame, accepted for local endpoint `ep`; if that is the host at a gateway address, only
/// once the agent's control ports are found out of its reach, as from a local container.
#[inline(always)]
fn accepted(
    ctx: &TcContext,
    outer: &OuterVxlan,
    frame: &Frame,
    ep: &'static Endpoint,
) -> Result<Accepted, Drop> {
    if ep.is_host() {
        guard::to_host_gateway(ctx, &frame.inner).in_network(ep.network)?;
    }
    Ok(Accepted {
        network: ep.network,
        endpoint: ep,
        strip_len: outer.strip_len,
        inner_ipv6: frame.inner_ipv6,
        outer_ipv6: outer.ipv6,
    })
}

/// Strips an accepted VXLAN frame and delivers the inner packet to its endpoint.
#[inline(always)]
pub fn deliver(ctx: &TcContext, accepted: Accepted) -> Result<i32, Drop> {
    let (network, len) = (accepted.network, ctx.len());
    strip(
        ctx,
        accepted.strip_len,
        accepted.inner_ipv6,
        accepted.outer_ipv6,
    )
    .in_network(network)?;
    let verdict = deliver::to_endpoint(ctx, accepted.endpoint).in_network(network)?;
    count_in_slot(accepted.endpoint.slot, Counter::Decapsulated, len);
    Ok(verdict)
}

/// Removes the outer IP/UDP/VXLAN and inner Ethernet headers, keeping the outer Ethernet header
/// (its type is the outer family's; when the inner family differs it is rewritten, and
/// DECAP_L3_IPV4/IPV6 make the kernel's protocol of the packet the inner one too). FIXED_GSO
/// keeps the MSS of a GSO super-packet as it was built.
#[inline(always)]
fn strip(
    ctx: &TcContext,
    strip_len: usize,
    inner_ipv6: bool,
    outer_ipv6: bool,
) -> Result<(), Counter> {
    let fail = |_| Counter::DropDecapFailed;
    let family_changes = inner_ipv6 != outer_ipv6;
    let flags = match (family_changes, inner_ipv6) {
        (false, _) => BPF_F_ADJ_ROOM_FIXED_GSO as u64,
        (true, true) => BPF_F_ADJ_ROOM_FIXED_GSO as u64 | BPF_F_ADJ_ROOM_DECAP_L3_IPV6 as u64,
        (true, false) => BPF_F_ADJ_ROOM_FIXED_GSO as u64 | BPF_F_ADJ_ROOM_DECAP_L3_IPV4 as u64,
    };
    ctx.adjust_room(-(strip_len as i32), BPF_ADJ_ROOM_MAC, flags)
        .map_err(fail)?;
    if family_changes {
        let ethertype = if inner_ipv6 { ETH_P_IPV6 } else { ETH_P_IP };
        ctx.store(12, &ethertype.to_be_bytes(), 0).map_err(fail)?;
    }
    Ok(())
}

const _: () = assert!(UDP_HLEN + VXLAN_HLEN + ETH_HLEN + IPV4_HLEN == 50);
