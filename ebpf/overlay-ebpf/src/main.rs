//! ebpf-overlay's datapath: three TC programs composed from one module per concern.
//!
//! - `from_container` (TC ingress of a container's host-side veth): ARP and IPv6 neighbour
//!   solicitations answered in place; IPv4 and IPv6 checked against spoofing and network
//!   isolation, then delivered locally or encapsulated towards another agent; IPv4 to outside the
//!   overlays masqueraded out of the underlay NIC, or left to the host stack.
//! - `from_host` (TC ingress of the host link's peer): the host's own traffic to containers, local
//!   or remote (no VXLAN device), both families.
//! - `from_underlay` (TC ingress of the underlay NIC): VXLAN from known agents on our port is
//!   validated, stripped and delivered; replies to masqueraded flows are translated back and
//!   delivered; everything else (the host's own traffic) passes untouched. Its IPv6 goes to the
//!   tail-called `from_underlay_ipv6`: outer IPv6 VXLAN on an IPv6 underlay, and IPv6
//!   masquerade's replies.
//!
//! A container's IPv6 to outside every overlay is masqueraded too (`nat6`), out of the
//! underlay NIC's IPv6 address.
//!
//! Every entry point has one shape: `try_*` returns the verdict or a [`Drop`], and [`run`] is
//! the one place a packet is dropped (and counted, and reported to the drop monitor while the
//! agent has it on: [`monitor`]); `xdp_underlay`'s one drop site does the same.
#![no_std]
#![no_main]

mod arp;
mod decap;
mod deliver;
mod encap;
mod forward;
mod guard;
mod host;
mod ipv6;
mod isolation;
mod maps;
mod monitor;
mod nat;
mod nat6;
mod nd;
mod outer;
mod skb;
mod stats;
mod too_big;
mod xdp;

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use overlay_common::{
    counters::{Counter, Drop, InNetwork},
    maps::{ipv4_mapped, ipv4_unmapped, tail_calls},
    monitor::hook,
    packet::{ETH_HLEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, EthHeader, IPV4_HLEN, Ipv4Header},
};

use crate::{
    forward::L3,
    stats::{count_in_slot, drop_packet},
};

/// Runs one program path (of program `hook`) on the packet and returns its TC verdict; a
/// [`Drop`] is counted against the packet's length as it arrived, and reported to the drop
/// monitor when it is on.
#[inline(always)]
fn run(ctx: &TcContext, hook: u8, path: impl FnOnce(&TcContext) -> Result<i32, Drop>) -> i32 {
    let len = ctx.len();
    match path(ctx) {
        Ok(verdict) => verdict,
        Err(drop) => {
            monitor::report(ctx, hook, drop, len);
            drop_packet(drop, len)
        }
    }
}

#[classifier]
pub fn from_container(ctx: TcContext) -> i32 {
    run(&ctx, hook::FROM_CONTAINER, try_from_container)
}

/// Tail-called by `from_container` for IPv6 (see `overlay_common::maps::tail_calls`).
#[classifier]
pub fn from_container_ipv6(ctx: TcContext) -> i32 {
    run(&ctx, hook::FROM_CONTAINER, try_from_container_ipv6)
}

#[classifier]
pub fn from_host(ctx: TcContext) -> i32 {
    run(&ctx, hook::FROM_HOST, try_from_host)
}

/// Tail-called by `from_host` for IPv6.
#[classifier]
pub fn from_host_ipv6(ctx: TcContext) -> i32 {
    run(&ctx, hook::FROM_HOST, |ctx| {
        let cfg = maps::config().ok_or(Counter::DropNotReady)?;
        host::forward_ipv6(ctx, cfg)
    })
}

#[classifier]
pub fn from_underlay(ctx: TcContext) -> i32 {
    run(&ctx, hook::FROM_UNDERLAY, try_from_underlay)
}

/// Tail-called by `from_container` for IPv4 leaving the overlay (masquerade's own stack).
#[classifier]
pub fn masquerade_ipv4(ctx: TcContext) -> i32 {
    run(&ctx, hook::FROM_CONTAINER, try_masquerade_ipv4)
}

/// Tail-called by `from_container_ipv6` for IPv6 it masquerades.
#[classifier]
pub fn masquerade_ipv6(ctx: TcContext) -> i32 {
    run(&ctx, hook::FROM_CONTAINER, nat6::try_masquerade)
}

/// Tail-called by `from_underlay` for IPv6 (its own stack): on an IPv6 underlay, VXLAN in outer
/// IPv6 is validated, stripped and delivered; replies and ICMPv6 errors to masqueraded flows are
/// translated back and delivered; the rest (the host's own IPv6) passes untouched.
#[classifier]
pub fn from_underlay_ipv6(ctx: TcContext) -> i32 {
    run(&ctx, hook::FROM_UNDERLAY, try_from_underlay_ipv6)
}

#[inline(always)]
fn try_from_container(ctx: &TcContext) -> Result<i32, Drop> {
    let eth = EthHeader::parse(&skb::load::<ETH_HLEN>(ctx, 0)?);
    // Before anything else: a tag must never reach the underlay (VLAN hopping).
    if skb::vlan_tagged(ctx, eth.ethertype) {
        return Err(Counter::DropVlanTagged.into());
    }
    let cfg = maps::config().ok_or(Counter::DropNotReady)?;
    match eth.ethertype {
        ETH_P_IP => {}
        ETH_P_ARP => return arp::respond(ctx),
        ETH_P_IPV6 => {
            // SAFETY: on success the IPv6 program takes the packet and this one ends here.
            unsafe { maps::OVL_TAIL_CALLS.tail_call(ctx, tail_calls::CONTAINER_IPV6) };
            // Its slot is empty until the loader has filled it.
            return Err(Counter::DropNotReady.into());
        }
        _ => return Err(Counter::DropUnsupportedEth.into()),
    }
    let ip = Ipv4Header::parse(&skb::load::<IPV4_HLEN>(ctx, ETH_HLEN)?)?;
    // A frame shorter than its IP header claims is cut: never forwarded as if whole.
    if ip.total_len > (ctx.len() as usize).saturating_sub(ETH_HLEN) {
        return Err(Counter::DropTruncated.into());
    }
    let sender =
        isolation::verified_sender(ipv4_mapped(ip.src), eth.src, skb::ingress_ifindex(ctx))?;
    let network = sender.network;
    match isolation::resolve(network, ipv4_mapped(ip.dst)).in_network(network)? {
        Some(hop) => forward::into_overlay(ctx, cfg, network, &L3::v4(&ip, ETH_HLEN), hop),
        None => {
            guard::to_outside(ctx, cfg, &ip).in_network(network)?;
            // To this agent itself, or from a network that does not masquerade: the host stack.
            let to_host = ipv4_mapped(ip.dst) == cfg.underlay_ip;
            if to_host || !maps::masquerades(network) {
                count_in_slot(sender.slot, Counter::PassedToHost, ctx.len());
                return Ok(TC_ACT_OK as i32);
            }
            skb::pass_sender(ctx, network, sender.slot);
            // SAFETY: on success the masquerade program takes the packet and this one ends here.
            unsafe { maps::OVL_TAIL_CALLS.tail_call(ctx, tail_calls::MASQUERADE_IPV4) };
            // Its slot is empty until the loader has filled it.
            Err(Counter::DropNotReady.in_network(network))
        }
    }
}

/// `masquerade_ipv4`: what `from_container` found leaving the overlay from a network that
/// masquerades. The sender was verified there, which handed over its network and counter slot
/// (`skb::pass_sender`; this program is only ever reached by that tail call).
#[inline(always)]
fn try_masquerade_ipv4(ctx: &TcContext) -> Result<i32, Drop> {
    let cfg = maps::config().ok_or(Counter::DropNotReady)?;
    let ip = Ipv4Header::parse(&skb::load::<IPV4_HLEN>(ctx, ETH_HLEN)?)?;
    let (network, slot) = skb::passed_sender(ctx);
    nat::masquerade(ctx, cfg, &ip, network, slot).in_network(network)
}

#[inline(always)]
fn try_from_container_ipv6(ctx: &TcContext) -> Result<i32, Drop> {
    let eth = EthHeader::parse(&skb::load::<ETH_HLEN>(ctx, 0)?);
    let cfg = maps::config().ok_or(Counter::DropNotReady)?;
    ipv6::from_container(ctx, cfg, &eth)
}

#[inline(always)]
fn try_from_host(ctx: &TcContext) -> Result<i32, Drop> {
    let cfg = maps::config().ok_or(Counter::DropNotReady)?;
    let ethertype = EthHeader::parse(&skb::load::<ETH_HLEN>(ctx, 0)?).ethertype;
    // The host's tagged frames have no VLAN to go to in the overlay either.
    if skb::vlan_tagged(ctx, ethertype) {
        return Err(Counter::DropVlanTagged.into());
    }
    match ethertype {
        ETH_P_IP => {
            let ip = Ipv4Header::parse(&skb::load::<IPV4_HLEN>(ctx, ETH_HLEN)?)?;
            let (network, hop) = host::resolve(ipv4_mapped(ip.dst)).ok_or(Counter::DropNoRoute)?;
            forward::into_overlay(ctx, cfg, network, &L3::v4(&ip, ETH_HLEN), hop)
        }
        ETH_P_IPV6 => {
            // SAFETY: as in `try_from_container`.
            unsafe { maps::OVL_TAIL_CALLS.tail_call(ctx, tail_calls::HOST_IPV6) };
            Err(Counter::DropNotReady.into())
        }
        ETH_P_ARP => host::answer_arp(ctx),
        // The rest: nothing in the overlay to take it.
        _ => Err(Counter::DropNoRoute.into()),
    }
}

#[inline(always)]
fn try_from_underlay(ctx: &TcContext) -> Result<i32, Drop> {
    // Until the agent has configured us, the host's traffic must flow as if we were not here.
    let Some(cfg) = maps::config() else {
        return Ok(TC_ACT_OK as i32);
    };
    let Ok(eth) = skb::load::<ETH_HLEN>(ctx, 0) else {
        return Ok(TC_ACT_OK as i32);
    };
    let eth = EthHeader::parse(&eth);
    if eth.ethertype == ETH_P_IPV6 {
        // SAFETY: as in `try_from_container`.
        unsafe { maps::OVL_TAIL_CALLS.tail_call(ctx, tail_calls::UNDERLAY_IPV6) };
        // Slot still empty: the host's IPv6 flows as if we were not here.
        return Ok(TC_ACT_OK as i32);
    }
    match decap::inspect(ctx, cfg, &eth)? {
        decap::Inspected::Vxlan(accepted) => decap::deliver(ctx, accepted),
        decap::Inspected::Host(None) => Ok(TC_ACT_OK as i32),
        // Not VXLAN: a reply to a masqueraded flow, or the host's own traffic.
        decap::Inspected::Host(Some(ip)) => {
            Ok(nat::unmasquerade(ctx, cfg, &ip)?.unwrap_or(TC_ACT_OK as i32))
        }
    }
}

#[inline(always)]
fn try_from_underlay_ipv6(ctx: &TcContext) -> Result<i32, Drop> {
    let Some(cfg) = maps::config() else {
        return Ok(TC_ACT_OK as i32);
    };
    if ipv4_unmapped(&cfg.underlay_ip).is_none() {
        let parsed = outer::ipv6(ctx, cfg)?;
        if parsed.ours {
            let accepted = decap::inspect_ipv6(ctx, &parsed)?;
            return decap::deliver(ctx, accepted);
        }
    }
    // Not VXLAN to us: a reply to a masqueraded IPv6 flow, or the host's own IPv6.
    Ok(nat6::unmasquerade(ctx)?.unwrap_or(TC_ACT_OK as i32))
}

/// XDP on the underlay NIC (native mode where the driver has it): VXLAN that `from_underlay`
/// would drop on its outer headers is dropped here, early and counted alike; the rest goes on
/// to TC.
#[xdp]
pub fn xdp_underlay(ctx: XdpContext) -> u32 {
    let len = xdp::frame_len(&ctx);
    match xdp::try_from_underlay(&ctx) {
        Ok(action) => action,
        Err(drop) => {
            monitor::report(&ctx, hook::XDP_UNDERLAY, drop, len);
            xdp::drop_early(drop, len)
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program; the verifier rejects code that could get here.
    loop {}
}

// GPL-compatible: bpf_redirect_neigh and friends are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
