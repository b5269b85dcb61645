//! The host's own traffic into the overlay (no VXLAN device): it arrives on the ingress of the
//! host link's peer and goes to a local container or, in VXLAN, to a remote one
//! ([`crate::forward`]). The host belongs to every network; the network of a packet is the
//! destination's.

use aya_ebpf::{helpers::generated::bpf_redirect, programs::TcContext};
use overlay_common::{
    counters::{Counter, Drop},
    ipv6::{Icmpv6Role, Ipv6Header, icmpv6_role, is_link_local, is_multicast},
    maps::{Addr16, AgentConfig, HOST_LINK_PEER_MAC},
    packet::{ARP_LEN, ETH_HLEN, arp_reply},
    policy::{IPPROTO_ICMPV6, IPV6_HLEN},
};

use crate::{
    forward::{self, Hop, L3},
    maps::{endpoint, route},
    nd, skb,
    stats::count_in_slot,
};

/// Answers the host's ARP for any overlay address with the host link peer's MAC.
#[inline(always)]
pub fn answer_arp(ctx: &TcContext) -> Result<i32, Drop> {
    let frame: [u8; ETH_HLEN + ARP_LEN] = skb::load(ctx, 0)?;
    let reply = arp_reply(&frame, HOST_LINK_PEER_MAC).ok_or(Counter::ArpIgnored)?;
    ctx.store(0, &reply, 0)
        .map_err(|_| Counter::DropMalformed)?;
    count_in_slot(0, Counter::ArpReplied, ctx.len());
    // SAFETY: plain helper call; back out of the peer, to the host.
    Ok(unsafe { bpf_redirect(skb::ingress_ifindex(ctx), 0) } as i32)
}

/// Where the host's packet to `dst` goes, and on which network.
#[inline(always)]
pub fn resolve(dst: Addr16) -> Option<(u32, Hop)> {
    if let Some(ep) = endpoint(dst) {
        return Some((ep.network, Hop::Local(ep)));
    }
    route(dst).map(|r| (r.network, Hop::Remote(r)))
}

/// The host's IPv6 into the overlay: its solicitations for overlay addresses answered (as its
/// ARP), its link housekeeping ignored, packets to containers forwarded.
#[inline(always)]
pub fn forward_ipv6(ctx: &TcContext, cfg: &AgentConfig) -> Result<i32, Drop> {
    let ip = Ipv6Header::parse(&skb::load::<IPV6_HLEN>(ctx, ETH_HLEN)?)?;
    if ip.next_header == IPPROTO_ICMPV6 {
        let icmp_type = skb::load::<1>(ctx, ETH_HLEN + IPV6_HLEN)?;
        match icmpv6_role(icmp_type[0]) {
            Icmpv6Role::Solicitation => return nd::answer_host(ctx, &ip),
            Icmpv6Role::Housekeeping | Icmpv6Role::RouterMessage => {
                return Err(Counter::NdIgnored.into());
            }
            Icmpv6Role::Other => {}
        }
    }
    if is_link_local(&ip.dst) || is_multicast(&ip.dst) {
        return Err(Counter::DropLinkLocal.into());
    }
    let (network, hop) = resolve(ip.dst).ok_or(Counter::DropNoRoute)?;
    forward::into_overlay(ctx, cfg, network, &L3::v6(&ip, ETH_HLEN), hop)
}
