//! ebpf-overlay's datapath: two TC programs composed from one module per concern.
//!
//! - `from_container` (TC ingress of a container's host-side veth): ARP answered in place; IPv4
//!   checked against spoofing and network isolation, then delivered locally, encapsulated towards
//!   another agent, masqueraded out of the underlay NIC, or left to the host stack.
//! - `from_host` (TC ingress of the host link's peer): the host's own traffic to containers, local
//!   or remote (no VXLAN device).
//! - `from_underlay` (TC ingress of the underlay NIC): VXLAN from known agents on our port is
//!   validated, stripped and delivered; replies to masqueraded flows are translated back and
//!   delivered; everything else (the host's own traffic) passes untouched.
#![no_std]
#![no_main]

mod arp;
mod decap;
mod deliver;
mod encap;
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
    counters::{Counter, NO_NETWORK},
    maps::{Endpoint, ipv4_mapped},
    packet::{ETH_HLEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, EthHeader, IPV4_HLEN, Ipv4Header},
};

use crate::{
    isolation::Destination,
    stats::{count, drop_packet},
};

#[classifier]
pub fn from_container(ctx: TcContext) -> i32 {
    let len = ctx.len();
    match try_from_container(&ctx) {
        Ok(verdict) => verdict,
        Err((vni, reason)) => drop_packet(vni, reason, len),
    }
}

fn try_from_container(ctx: &TcContext) -> Result<i32, (u32, Counter)> {
    let none = |c| (NO_NETWORK, c);
    let eth = EthHeader::parse(&skb::load::<ETH_HLEN>(ctx, 0).map_err(none)?);
    // Before anything else: a tag must never reach the underlay (VLAN hopping).
    if skb::vlan_tagged(ctx, eth.ethertype) {
        return Err(none(Counter::DropVlanTagged));
    }
    let Some(cfg) = maps::config() else {
        return Err(none(Counter::DropNotReady));
    };
    match eth.ethertype {
        ETH_P_IP => {}
        ETH_P_ARP => return arp::respond(ctx),
        // Not carried yet, and never the host stack's: a container's Router Advertisement
        // configured the host (issue 17).
        ETH_P_IPV6 => return Err(none(guard::ipv6_drop_reason(ctx))),
        _ => return Err(none(Counter::DropUnsupportedEth)),
    }
    let ip =
        Ipv4Header::parse(&skb::load::<IPV4_HLEN>(ctx, ETH_HLEN).map_err(none)?).map_err(none)?;
    // A frame shorter than its IP header claims is cut: never forwarded as if whole.
    if ip.total_len > (ctx.len() as usize).saturating_sub(ETH_HLEN) {
        return Err(none(Counter::DropTruncated));
    }
    let sender =
        isolation::verified_sender(ipv4_mapped(ip.src), eth.src, skb::ingress_ifindex(ctx))
            .map_err(none)?;
    let vni = sender.vni;
    let in_net = |c| (vni, c);
    match isolation::resolve(vni, ipv4_mapped(ip.dst)).map_err(in_net)? {
        Destination::Local(ep) => {
            if ep.flags & Endpoint::FLAG_HOST != 0 {
                guard::to_host_gateway(ctx, &ip, ETH_HLEN).map_err(in_net)?;
            }
            let verdict = deliver::to_endpoint(ctx, ep).map_err(in_net)?;
            count(vni, Counter::LocalDelivered, ctx.len());
            Ok(verdict)
        }
        Destination::Remote(route) => {
            // VTEPs must not fragment (RFC 7348): a non-GSO packet over the overlay MTU is
            // refused and counted rather than sent in pieces.
            if skb::gso_size(ctx) == 0 && ip.total_len > cfg.overlay_mtu as usize {
                return Err(in_net(Counter::DropTooBig));
            }
            let len = ctx.len();
            let verdict = encap::to_remote(ctx, cfg, route).map_err(in_net)?;
            count(vni, Counter::Encapsulated, len);
            Ok(verdict)
        }
        Destination::Outside => {
            guard::to_outside(ctx, cfg, &ip).map_err(in_net)?;
            // To this agent itself, or from a network that does not masquerade: the host stack.
            let to_host = ipv4_mapped(ip.dst) == cfg.underlay_ip;
            if to_host || !maps::masquerades(vni) {
                count(vni, Counter::PassedToHost, ctx.len());
                return Ok(TC_ACT_OK as i32);
            }
            nat::masquerade(ctx, cfg, &ip, vni).map_err(in_net)
        }
    }
}

#[classifier]
pub fn from_underlay(ctx: TcContext) -> i32 {
    let len = ctx.len();
    // Until the agent has configured us, the host's traffic must flow as if we were not here.
    let Some(cfg) = maps::config() else {
        return TC_ACT_OK as i32;
    };
    let accepted = match decap::inspect(&ctx, cfg) {
        Ok(decap::Inspected::Vxlan(accepted)) => accepted,
        Ok(decap::Inspected::Host(None)) => return TC_ACT_OK as i32,
        // Not VXLAN: a reply to a masqueraded flow, or the host's own traffic.
        Ok(decap::Inspected::Host(Some(ip))) => {
            return match nat::unmasquerade(&ctx, cfg, &ip) {
                Ok(Some(verdict)) => verdict,
                Ok(None) => TC_ACT_OK as i32,
                Err((vni, reason)) => drop_packet(vni, reason, len),
            };
        }
        Err((vni, reason)) => return drop_packet(vni, reason, len),
    };
    let vni = accepted.vni;
    if let Err(reason) = decap::strip(&ctx, accepted.strip_len) {
        return drop_packet(vni, reason, len);
    }
    match deliver::to_endpoint(&ctx, accepted.endpoint) {
        Ok(verdict) => {
            count(vni, Counter::Decapsulated, len);
            verdict
        }
        Err(reason) => drop_packet(vni, reason, len),
    }
}

#[classifier]
pub fn from_host(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let verdict = match maps::config() {
        None => Err((NO_NETWORK, Counter::DropNotReady)),
        Some(cfg) => match skb::load::<ETH_HLEN>(&ctx, 0).map(|e| EthHeader::parse(&e).ethertype) {
            // The host's tagged frames have no VLAN to go to in the overlay either.
            Ok(t) if skb::vlan_tagged(&ctx, t) => Err((NO_NETWORK, Counter::DropVlanTagged)),
            Ok(ETH_P_IP) => host::forward(&ctx, cfg),
            Ok(ETH_P_ARP) => host::answer_arp(&ctx),
            // IPv6 and the rest: nothing in the overlay to take it yet.
            Ok(_) => Err((NO_NETWORK, Counter::DropNoRoute)),
            Err(c) => Err((NO_NETWORK, c)),
        },
    };
    verdict.unwrap_or_else(|(vni, reason)| drop_packet(vni, reason, len))
}

/// XDP on the underlay NIC (native mode where the driver has it): VXLAN that `from_underlay`
/// would drop on its outer headers is dropped here, early and counted alike; the rest goes on
/// to TC.
#[xdp]
pub fn xdp_underlay(ctx: XdpContext) -> u32 {
    let len = xdp::frame_len(&ctx);
    match xdp::try_from_underlay(&ctx) {
        Ok(action) => action,
        Err((vni, reason)) => xdp::drop_early(vni, reason, len),
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
