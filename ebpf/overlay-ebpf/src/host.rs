//! The host's own traffic into the overlay (no VXLAN device): it arrives on the ingress of the
//! host link's peer and goes to a local container or, in VXLAN, to a remote one. The host belongs
//! to every network; the network of a packet is the destination's.

use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::generated::bpf_redirect, programs::TcContext};
use overlay_common::{
    counters::{Counter, NO_NETWORK},
    maps::{AgentConfig, HOST_LINK_PEER_MAC, ipv4_mapped},
    packet::{ARP_LEN, ETH_HLEN, IPV4_HLEN, Ipv4Header, arp_reply},
};

use crate::{
    deliver, encap,
    isolation::Destination,
    maps::{endpoint, route},
    skb,
    stats::count,
};

/// Answers the host's ARP for any overlay address with the host link peer's MAC.
#[inline(always)]
pub fn answer_arp(ctx: &TcContext) -> Result<i32, (u32, Counter)> {
    let frame: [u8; ETH_HLEN + ARP_LEN] = skb::load(ctx, 0).map_err(|c| (NO_NETWORK, c))?;
    let Some(reply) = arp_reply(&frame, HOST_LINK_PEER_MAC) else {
        count(NO_NETWORK, Counter::ArpIgnored, ctx.len());
        return Ok(TC_ACT_SHOT as i32);
    };
    ctx.store(0, &reply, 0)
        .map_err(|_| (NO_NETWORK, Counter::DropMalformed))?;
    count(NO_NETWORK, Counter::ArpReplied, ctx.len());
    // SAFETY: plain helper call; back out of the peer, to the host.
    Ok(unsafe { bpf_redirect(skb::ingress_ifindex(ctx), 0) } as i32)
}

/// Where the host's packet to `dst` goes, and on which network.
#[inline(always)]
fn resolve(dst: [u8; 4]) -> Option<(u32, Destination)> {
    if let Some(ep) = endpoint(ipv4_mapped(dst)) {
        return Some((ep.vni, Destination::Local(ep)));
    }
    route(ipv4_mapped(dst)).map(|r| (r.vni, Destination::Remote(r)))
}

/// Sends an IPv4 packet from the host to the container it is addressed to.
#[inline(always)]
pub fn forward(ctx: &TcContext, cfg: &AgentConfig) -> Result<i32, (u32, Counter)> {
    let none = |c| (NO_NETWORK, c);
    let ip =
        Ipv4Header::parse(&skb::load::<IPV4_HLEN>(ctx, ETH_HLEN).map_err(none)?).map_err(none)?;
    let (vni, dest) = resolve(ip.dst).ok_or(none(Counter::DropNoRoute))?;
    let in_net = |c| (vni, c);
    let len = ctx.len();
    match dest {
        Destination::Local(ep) => {
            let verdict = deliver::to_endpoint(ctx, ep).map_err(in_net)?;
            count(vni, Counter::LocalDelivered, len);
            Ok(verdict)
        }
        Destination::Remote(r) => {
            if skb::gso_size(ctx) == 0 && ip.total_len > cfg.overlay_mtu as usize {
                return Err(in_net(Counter::DropTooBig));
            }
            let verdict = encap::to_remote(ctx, cfg, r).map_err(in_net)?;
            count(vni, Counter::Encapsulated, len);
            Ok(verdict)
        }
        Destination::Outside => Err(none(Counter::DropNoRoute)),
    }
}
