//! ebpf-overlay's datapath: three TC programs composed from one module per concern.
//!
//! - `from_container` (TC ingress of a container's host-side veth): ARP answered in place; IPv4
//!   checked against spoofing and network isolation, then delivered locally, encapsulated towards
//!   another agent, masqueraded out of the underlay NIC, or left to the host stack.
//! - `from_host` (TC ingress of the host link's peer): the host's own traffic to containers, local
//!   or remote (no VXLAN device).
//! - `from_underlay` (TC ingress of the underlay NIC): VXLAN from known agents on our port is
//!   validated, stripped and delivered; replies to masqueraded flows are translated back and
//!   delivered; everything else (the host's own traffic) passes untouched.
//!
//! Every entry point has one shape: `try_*` returns the verdict or a [`Drop`], and [`run`] is
//! the one place a packet is dropped (and counted).
#![no_std]
#![no_main]

mod arp;
mod decap;
mod deliver;
mod encap;
mod forward;
mod guard;
mod host;
mod isolation;
mod maps;
mod nat;
mod skb;
mod stats;
mod xdp;

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use overlay_common::{
    counters::{Counter, Drop, InNetwork},
    maps::ipv4_mapped,
    packet::{ETH_HLEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, EthHeader, IPV4_HLEN, Ipv4Header},
};

use crate::stats::{count, drop_packet};

/// Runs one program path on the packet and returns its TC verdict; a [`Drop`] is counted
/// against the packet's length as it arrived.
#[inline(always)]
fn run(ctx: &TcContext, path: impl FnOnce(&TcContext) -> Result<i32, Drop>) -> i32 {
    let len = ctx.len();
    match path(ctx) {
        Ok(verdict) => verdict,
        Err(drop) => drop_packet(drop, len),
    }
}

#[classifier]
pub fn from_container(ctx: TcContext) -> i32 {
    run(&ctx, try_from_container)
}

#[classifier]
pub fn from_host(ctx: TcContext) -> i32 {
    run(&ctx, try_from_host)
}

#[classifier]
pub fn from_underlay(ctx: TcContext) -> i32 {
    run(&ctx, try_from_underlay)
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
        // Not carried yet, and never the host stack's: a container's Router Advertisement
        // configured the host (issue 17).
        ETH_P_IPV6 => return Err(guard::ipv6_drop_reason(ctx).into()),
        _ => return Err(Counter::DropUnsupportedEth.into()),
    }
    let ip = Ipv4Header::parse(&skb::load::<IPV4_HLEN>(ctx, ETH_HLEN)?)?;
    // A frame shorter than its IP header claims is cut: never forwarded as if whole.
    if ip.total_len > (ctx.len() as usize).saturating_sub(ETH_HLEN) {
        return Err(Counter::DropTruncated.into());
    }
    let sender =
        isolation::verified_sender(ipv4_mapped(ip.src), eth.src, skb::ingress_ifindex(ctx))?;
    let vni = sender.vni;
    match isolation::resolve(vni, ipv4_mapped(ip.dst)).in_network(vni)? {
        Some(hop) => forward::into_overlay(ctx, cfg, vni, &ip, hop),
        None => {
            guard::to_outside(ctx, cfg, &ip).in_network(vni)?;
            // To this agent itself, or from a network that does not masquerade: the host stack.
            let to_host = ipv4_mapped(ip.dst) == cfg.underlay_ip;
            if to_host || !maps::masquerades(vni) {
                count(vni, Counter::PassedToHost, ctx.len());
                return Ok(TC_ACT_OK as i32);
            }
            nat::masquerade(ctx, cfg, &ip, vni).in_network(vni)
        }
    }
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
            let (vni, hop) = host::resolve(ip.dst).ok_or(Counter::DropNoRoute)?;
            forward::into_overlay(ctx, cfg, vni, &ip, hop)
        }
        ETH_P_ARP => host::answer_arp(ctx),
        // IPv6 and the rest: nothing in the overlay to take it yet.
        _ => Err(Counter::DropNoRoute.into()),
    }
}

#[inline(always)]
fn try_from_underlay(ctx: &TcContext) -> Result<i32, Drop> {
    // Until the agent has configured us, the host's traffic must flow as if we were not here.
    let Some(cfg) = maps::config() else {
        return Ok(TC_ACT_OK as i32);
    };
    match decap::inspect(ctx, cfg)? {
        decap::Inspected::Vxlan(accepted) => decap::deliver(ctx, accepted),
        decap::Inspected::Host(None) => Ok(TC_ACT_OK as i32),
        // Not VXLAN: a reply to a masqueraded flow, or the host's own traffic.
        decap::Inspected::Host(Some(ip)) => {
            Ok(nat::unmasquerade(ctx, cfg, &ip)?.unwrap_or(TC_ACT_OK as i32))
        }
    }
}

/// XDP on the underlay NIC (native mode where the driver has it): VXLAN that `from_underlay`
/// would drop on its outer headers is dropped here, early and counted alike; the rest goes on
/// to TC.
#[xdp]
pub fn xdp_underlay(ctx: XdpContext) -> u32 {
    let len = xdp::frame_len(&ctx);
    match xdp::try_from_underlay(&ctx) {
        Ok(action) => action,
        Err(drop) => xdp::drop_early(drop, len),
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
