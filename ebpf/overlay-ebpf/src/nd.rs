//! Neighbour-discovery responder (RFC 4861), the IPv6 twin of `arp`: a container's Neighbor
//! Solicitation for its gateway, or for any other address of its network, is answered with the
//! MAC of its host-side veth, so containers never need a bridge; the host's solicitations for
//! overlay addresses are answered with the host link peer's MAC.

use aya_ebpf::{helpers::generated::bpf_redirect, programs::TcContext};
use overlay_common::{
    counters::{Counter, Drop, InNetwork},
    ipv6::{Ipv6Header, NA_FRAME_LEN, NS_BODY_LEN, solicited_target, write_neighbor_advertisement},
    maps::{Addr16, Endpoint, HOST_LINK_PEER_MAC},
    packet::ETH_HLEN,
    policy::IPV6_HLEN,
};

use crate::{
    maps::{OVL_SCRATCH_FRAME, endpoint, overlay_subnet, route},
    skb,
    stats::count_in_slot,
};

/// Whether `target` is an address of network `vni` worth answering for, and whether it is the
/// gateway's own (the host's endpoint: the NA's router flag).
#[inline(always)]
fn target_in_network(target: &Addr16, vni: u32) -> Result<bool, Counter> {
    if let Some(ep) = endpoint(*target) {
        return if ep.network == vni {
            Ok(ep.is_host())
        } else {
            Err(Counter::DropCrossNetwork)
        };
    }
    match overlay_subnet(*target) {
        Some(s) if s.network == vni => Ok(false),
        Some(_) => Err(Counter::DropCrossNetwork),
        // Outside every overlay: nothing of ours to claim.
        None => Err(Counter::NdIgnored),
    }
}

/// The solicitation's target, if it is one to answer.
#[inline(always)]
fn target(ctx: &TcContext, ip: &Ipv6Header) -> Result<Addr16, Counter> {
    let body = skb::load::<NS_BODY_LEN>(ctx, ETH_HLEN + IPV6_HLEN)?;
    solicited_target(ip, &body).ok_or(Counter::NdIgnored)
}

/// Replaces the frame by the advertisement for `target` (at `our_mac`) to the solicitor, and
/// sends it back out of the device it came in on.
#[inline(always)]
fn reply(
    ctx: &TcContext,
    solicitor: (&Addr16, [u8; 6]),
    target: &Addr16,
    our_mac: [u8; 6],
    router: bool,
) -> Result<i32, Counter> {
    let na = OVL_SCRATCH_FRAME
        .get_ptr_mut(0)
        .ok_or(Counter::DropMalformed)?;
    // SAFETY: this CPU's slot; programs do not preempt each other on one CPU.
    let na = unsafe { &mut *na };
    write_neighbor_advertisement(na, solicitor, target, our_mac, router);
    if ctx.len() as usize != NA_FRAME_LEN {
        skb::set_len(ctx, NA_FRAME_LEN as u32)?;
    }
    ctx.store(0, na, 0).map_err(|_| Counter::DropMalformed)?;
    // SAFETY: plain helper call; egress of the ingress device delivers to its far end.
    Ok(unsafe { bpf_redirect(skb::ingress_ifindex(ctx), 0) } as i32)
}

/// A verified container's Neighbor Solicitation (`sender` is the endpoint it came from).
#[inline(always)]
pub fn answer_container(ctx: &TcContext, ip: &Ipv6Header, sender: &Endpoint) -> Result<i32, Drop> {
    let vni = sender.network;
    let target = target(ctx, ip).in_network(vni)?;
    let router = target_in_network(&target, vni).in_network(vni)?;
    let verdict = reply(
        ctx,
        (&ip.src, sender.mac),
        &target,
        sender.gateway_mac,
        router,
    )
    .in_network(vni)?;
    count_in_slot(sender.slot, Counter::NdReplied, ctx.len());
    Ok(verdict)
}

/// The host's Neighbor Solicitation for an overlay address (its routes to the overlay point at
/// the host link): answered like its ARP, with the host link peer's MAC.
#[inline(always)]
pub fn answer_host(ctx: &TcContext, ip: &Ipv6Header) -> Result<i32, Drop> {
    let target = target(ctx, ip)?;
    if endpoint(target).is_none() && route(target).is_none() && overlay_subnet(target).is_none() {
        return Err(Counter::NdIgnored.into());
    }
    let eth = skb::load::<12>(ctx, 0)?;
    let host_mac = [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]];
    let verdict = reply(ctx, (&ip.src, host_mac), &target, HOST_LINK_PEER_MAC, false)?;
    count_in_slot(0, Counter::NdReplied, ctx.len());
    Ok(verdict)
}
