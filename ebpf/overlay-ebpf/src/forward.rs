//! Forwarding inside the overlay, shared by containers' and the host's traffic: to a local
//! endpoint (the host's own at a gateway address included) or, in VXLAN, to a remote one.

use aya_ebpf::programs::TcContext;
use overlay_common::{
    counters::{Counter, Drop, InNetwork},
    maps::{AgentConfig, Endpoint, RemoteRoute},
    packet::{ETH_HLEN, Ipv4Header},
};

use crate::{deliver, encap, guard, skb, stats::count};

/// Where a packet inside the overlay goes next.
pub enum Hop {
    /// A container on this agent, or the host at a gateway address.
    Local(&'static Endpoint),
    /// A container behind another agent.
    Remote(&'static RemoteRoute),
}

/// Sends a packet of network `vni` (IPv4 header `ip`) on to `hop` and counts it.
#[inline(always)]
pub fn into_overlay(
    ctx: &TcContext,
    cfg: &AgentConfig,
    vni: u32,
    ip: &Ipv4Header,
    hop: Hop,
) -> Result<i32, Drop> {
    let len = ctx.len();
    match hop {
        Hop::Local(ep) => {
            // The host at its gateway address: the agent's control ports are out of bounds.
            if ep.is_host() {
                guard::to_host_gateway(ctx, ip, ETH_HLEN).in_network(vni)?;
            }
            let verdict = deliver::to_endpoint(ctx, ep).in_network(vni)?;
            count(vni, Counter::LocalDelivered, len);
            Ok(verdict)
        }
        Hop::Remote(route) => {
            // VTEPs must not fragment (RFC 7348): a non-GSO packet over the overlay MTU is
            // refused and counted rather than sent in pieces.
            if skb::gso_size(ctx) == 0 && ip.total_len > cfg.overlay_mtu as usize {
                return Err(Counter::DropTooBig.in_network(vni));
            }
            let verdict = encap::to_remote(ctx, cfg, route).in_network(vni)?;
            count(vni, Counter::Encapsulated, len);
            Ok(verdict)
        }
    }
}
