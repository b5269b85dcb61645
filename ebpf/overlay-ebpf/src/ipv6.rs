//! A container's IPv6 (inner IPv6 over the IPv4 underlay): RA guard, anti-spoofing (source
//! address and MAC the endpoint's), link-local kept to the gateway, neighbour discovery answered,
//! then the same isolation and forwarding as IPv4, and masquerade to the outside (`nat6`).

use aya_ebpf::programs::TcContext;
use overlay_common::{
    counters::{Counter, Drop, InNetwork},
    ipv6::{Icmpv6Role, Ipv6Header, icmpv6_role, is_link_local, is_multicast},
    maps::AgentConfig,
    packet::{ETH_HLEN, EthHeader},
    policy::{IPPROTO_ICMPV6, IPV6_HLEN},
};

use crate::{
    forward::{self, L3},
    isolation,
    maps::{endpoint, overlay_subnet},
    nat6, nd, skb,
};

/// The role of the packet's ICMPv6 message, if it carries one right behind the IPv6 header.
#[inline(always)]
fn role(ctx: &TcContext, ip: &Ipv6Header) -> Icmpv6Role {
    if ip.next_header != IPPROTO_ICMPV6 {
        return Icmpv6Role::Other;
    }
    match skb::load::<1>(ctx, ETH_HLEN + IPV6_HLEN) {
        Ok(t) => icmpv6_role(t[0]),
        Err(_) => Icmpv6Role::Other,
    }
}

/// Why an IPv6 packet whose sender is not a verified endpoint is dropped: someone else's (or an
/// unassigned) overlay address is spoofing; link-local housekeeping (MLD, solicitations) of a
/// container whose link-local address is unknown needs no answer; the rest is IPv6 from an
/// address no IPv6 overlay has (a container on an IPv4-only network).
#[inline(always)]
fn unverified(ip: &Ipv6Header, role: Icmpv6Role) -> Counter {
    if endpoint(ip.src).is_some() || overlay_subnet(ip.src).is_some() {
        Counter::DropSpoofedSource
    } else if matches!(role, Icmpv6Role::Housekeeping | Icmpv6Role::Solicitation) {
        Counter::NdIgnored
    } else {
        Counter::DropIpv6
    }
}

/// A container's IPv6 frame (Ethernet header `eth`).
#[inline(always)]
pub fn from_container(ctx: &TcContext, cfg: &AgentConfig, eth: &EthHeader) -> Result<i32, Drop> {
    let ip = Ipv6Header::parse(&skb::load::<IPV6_HLEN>(ctx, ETH_HLEN)?)?;
    let role = role(ctx, &ip);
    // Never from a container, whoever it claims to be: its RA configured the host (issue 17).
    if role == Icmpv6Role::RouterMessage {
        return Err(Counter::DropRouterMessage.into());
    }
    if ip.total_len() > (ctx.len() as usize).saturating_sub(ETH_HLEN) {
        return Err(Counter::DropTruncated.into());
    }
    let Ok(sender) = isolation::verified_sender(ip.src, eth.src, skb::ingress_ifindex(ctx)) else {
        return Err(unverified(&ip, role).into());
    };
    let vni = sender.network;
    match role {
        Icmpv6Role::Solicitation => return nd::answer_container(ctx, &ip, sender),
        Icmpv6Role::Housekeeping => return Err(Counter::NdIgnored.in_network(vni)),
        _ => {}
    }
    // Link-local traffic goes to the gateway only (answered above); never to another container
    // or the host stack.
    if is_link_local(&ip.src) || is_link_local(&ip.dst) {
        return Err(Counter::DropLinkLocal.in_network(vni));
    }
    if is_multicast(&ip.dst) {
        return Err(Counter::DropNoRoute.in_network(vni));
    }
    match isolation::resolve(vni, ip.dst).in_network(vni)? {
        Some(hop) => forward::into_overlay(ctx, cfg, vni, &L3::v6(&ip, ETH_HLEN), hop),
        // Outside every overlay: masqueraded, or the host stack's (as IPv4).
        None => nat6::to_outside(ctx, cfg, &ip, (vni, sender.slot)),
    }
}
