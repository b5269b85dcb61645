//! VXLAN decapsulation: validate what arrived from the underlay, strip it, deliver the inner frame.

use aya_ebpf::{
    bindings::{BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    programs::TcContext,
};
use overlay_common::{
    counters::{Counter, Drop, InNetwork},
    maps::{AgentConfig, Endpoint, ipv4_mapped, ipv4_unmapped},
    packet::{
        ETH_HLEN, ETH_P_IP, EthHeader, IPV4_HLEN, Ipv4Header, UDP_HLEN, UnderlayPacket, VXLAN_HLEN,
        classify_underlay, parse_vxlan,
    },
    policy::in_port_range,
};

use crate::{
    deliver, guard,
    isolation::remote_sender_matches,
    maps::{endpoint, is_known_network, is_known_vtep, nat_config},
    skb,
    stats::count,
};

/// A VXLAN frame that passed every check, ready to be stripped.
pub struct Accepted {
    pub vni: u32,
    pub endpoint: &'static Endpoint,
    pub strip_len: usize,
}

/// What an underlay frame is.
pub enum Inspected {
    /// Not VXLAN: the host's own traffic or a reply to a masqueraded flow. Carries the IPv4
    /// header when the frame has one, so the masquerade path need not parse it again.
    Host(Option<Ipv4Header>),
    /// VXLAN that passed every check, ready to be stripped.
    Vxlan(Accepted),
}

/// Decides what to do with an underlay frame: [`Inspected::Host`] for what is not VXLAN,
/// [`Inspected::Vxlan`] for VXLAN to deliver, a [`Drop`] for VXLAN to drop.
#[inline(always)]
pub fn inspect(ctx: &TcContext, cfg: &AgentConfig) -> Result<Inspected, Drop> {
    let Some(local_ip) = ipv4_unmapped(&cfg.underlay_ip) else {
        return Ok(Inspected::Host(None));
    };
    // Anything we cannot even parse as UDP/IPv4 is not ours to judge: the host stack decides.
    let Ok(eth) = skb::load::<ETH_HLEN>(ctx, 0) else {
        return Ok(Inspected::Host(None));
    };
    let eth = EthHeader::parse(&eth);
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
    let (outer_src, strip_len, vxlan_offset) = match classify_underlay(
        &eth,
        &ip,
        &udp,
        ctx.len() as usize,
        cfg.vxlan_port,
        local_ip,
    )? {
        UnderlayPacket::NotOurs => return Ok(Inspected::Host(Some(ip))),
        UnderlayPacket::Vxlan {
            outer_src,
            strip_len,
            vxlan_offset,
        } => (ipv4_mapped(outer_src), strip_len, vxlan_offset),
    };
    // Agents send VXLAN from ports outside the masquerade range; from inside it, it is a
    // container's datagram that masquerade gave this agent's address (a second line behind
    // `guard::to_outside` on the sending agent).
    let outer_src_port = u16::from_be_bytes([udp[0], udp[1]]);
    if nat_config().is_some_and(|n| in_port_range(outer_src_port, n.port_min, n.port_max)) {
        return Err(Counter::DropVxlanNatPort.into());
    }
    if !is_known_vtep(outer_src) {
        return Err(Counter::DropUnknownVtep.into());
    }
    let vxlan = skb::load::<VXLAN_HLEN>(ctx, vxlan_offset)?;
    let vni = parse_vxlan(&vxlan)?;
    if !is_known_network(vni) {
        return Err(Counter::DropUnknownVni.into());
    }
    let inner_eth = skb::load::<ETH_HLEN>(ctx, vxlan_offset + VXLAN_HLEN).in_network(vni)?;
    if EthHeader::parse(&inner_eth).ethertype != ETH_P_IP {
        return Err(Counter::DropMalformed.in_network(vni));
    }
    let inner_ip =
        skb::load::<IPV4_HLEN>(ctx, vxlan_offset + VXLAN_HLEN + ETH_HLEN).in_network(vni)?;
    let inner_ip = Ipv4Header::parse(&inner_ip).in_network(vni)?;
    // The inner packet must be all there: a cut one is never delivered as if whole.
    let inner_room = (ctx.len() as usize).saturating_sub(vxlan_offset + VXLAN_HLEN + ETH_HLEN);
    if inner_ip.total_len > inner_room {
        return Err(Counter::DropTruncated.in_network(vni));
    }
    let ep = endpoint(ipv4_mapped(inner_ip.dst))
        .ok_or(Counter::DropNoEndpoint)
        .in_network(vni)?;
    if ep.vni != vni {
        return Err(Counter::DropCrossNetwork.in_network(vni));
    }
    if !remote_sender_matches(ipv4_mapped(inner_ip.src), vni, outer_src) {
        return Err(Counter::DropSpoofedSource.in_network(vni));
    }
    // A remote container to this host at its gateway address: no control ports either.
    if ep.is_host() {
        guard::to_host_gateway(ctx, &inner_ip, vxlan_offset + VXLAN_HLEN + ETH_HLEN)
            .in_network(vni)?;
    }
    Ok(Inspected::Vxlan(Accepted {
        vni,
        endpoint: ep,
        strip_len,
    }))
}

/// Strips an accepted VXLAN frame and delivers the inner packet to its endpoint.
#[inline(always)]
pub fn deliver(ctx: &TcContext, accepted: Accepted) -> Result<i32, Drop> {
    let (vni, len) = (accepted.vni, ctx.len());
    strip(ctx, accepted.strip_len).in_network(vni)?;
    let verdict = deliver::to_endpoint(ctx, accepted.endpoint).in_network(vni)?;
    count(vni, Counter::Decapsulated, len);
    Ok(verdict)
}

/// Removes the outer IPv4/UDP/VXLAN and inner Ethernet headers, keeping the outer Ethernet header
/// (its type is already IPv4). FIXED_GSO keeps the MSS of a GSO super-packet as it was built.
#[inline(always)]
fn strip(ctx: &TcContext, strip_len: usize) -> Result<(), Counter> {
    ctx.adjust_room(
        -(strip_len as i32),
        BPF_ADJ_ROOM_MAC,
        BPF_F_ADJ_ROOM_FIXED_GSO as u64,
    )
    .map_err(|_| Counter::DropDecapFailed)
}

const _: () = assert!(UDP_HLEN + VXLAN_HLEN + ETH_HLEN + IPV4_HLEN == 50);
