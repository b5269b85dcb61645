//! The host's own traffic into the overlay (no VXLAN device): it arrives on the ingress of the
//! host link's peer and goes to a local container or, in VXLAN, to a remote one
//! ([`crate::forward`]). The host belongs to every network; the network of a packet is the
//! destination's.

use aya_ebpf::{helpers::generated::bpf_redirect, programs::TcContext};
use overlay_common::{
    counters::{Counter, Drop, NO_NETWORK},
    maps::{HOST_LINK_PEER_MAC, ipv4_mapped},
    packet::{ARP_LEN, ETH_HLEN, arp_reply},
};

use crate::{
    forward::Hop,
    maps::{endpoint, route},
    skb,
    stats::count,
};

/// Answers the host's ARP for any overlay address with the host link peer's MAC.
#[inline(always)]
pub fn answer_arp(ctx: &TcContext) -> Result<i32, Drop> {
    let frame: [u8; ETH_HLEN + ARP_LEN] = skb::load(ctx, 0)?;
    let reply = arp_reply(&frame, HOST_LINK_PEER_MAC).ok_or(Counter::ArpIgnored)?;
    ctx.store(0, &reply, 0)
        .map_err(|_| Counter::DropMalformed)?;
    count(NO_NETWORK, Counter::ArpReplied, ctx.len());
    // SAFETY: plain helper call; back out of the peer, to the host.
    Ok(unsafe { bpf_redirect(skb::ingress_ifindex(ctx), 0) } as i32)
}

/// Where the host's packet to `dst` goes, and on which network.
#[inline(always)]
pub fn resolve(dst: [u8; 4]) -> Option<(u32, Hop)> {
    if let Some(ep) = endpoint(ipv4_mapped(dst)) {
        return Some((ep.vni, Hop::Local(ep)));
    }
    route(ipv4_mapped(dst)).map(|r| (r.vni, Hop::Remote(r)))
}
