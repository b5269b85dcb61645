//! What a container may never send: out of the overlay, whatever the network's masquerade
//! setting, VXLAN to an agent (it would arrive from a known VTEP, masqueraded, and bypass
//! isolation and anti-spoofing on the peer), and nothing to the control plane (`OVL_PROTECTED`:
//! the master's API unless the agent allows it, agents' control ports). (IPv6's own guards, RA
//! and Redirect first, are in `ipv6`.)

use aya_ebpf::programs::TcContext;
use overlay_common::{
    counters::Counter,
    maps::{AgentConfig, ProtectedKey, ipv4_mapped},
    packet::{ETH_HLEN, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, Ipv4Header},
    policy,
};

use crate::{
    forward::L3,
    maps::{is_known_vtep, is_protected, nat_config},
    skb,
};

/// Whether an agent (this one or a known VTEP) has this underlay address.
#[inline(always)]
fn is_agent(cfg: &AgentConfig, dst: [u8; 4]) -> bool {
    let dst = ipv4_mapped(dst);
    dst == cfg.underlay_ip || is_known_vtep(dst)
}

/// The destination port of a TCP or UDP packet whose IPv4 header `ip` starts at `l3` (None for
/// other protocols and later fragments).
#[inline(always)]
fn dst_port(ctx: &TcContext, ip: &Ipv4Header, l3: usize) -> Result<Option<u16>, Counter> {
    if (ip.protocol != IPPROTO_UDP && ip.protocol != IPPROTO_TCP) || ip.is_later_fragment {
        return Ok(None);
    }
    let ports = skb::load::<4>(ctx, l3 + ip.header_len)?;
    Ok(Some(u16::from_be_bytes([ports[2], ports[3]])))
}

/// Checks a container's packet to outside every overlay (before masquerade or the host stack):
/// nothing to loopback, multicast or broadcast addresses, no VXLAN to an agent, nothing to a
/// protected control-plane destination.
#[inline(always)]
pub fn to_outside(ctx: &TcContext, cfg: &AgentConfig, ip: &Ipv4Header) -> Result<(), Counter> {
    // Loopback, multicast, broadcast: nowhere to go, and no NAT state for them.
    let broadcast = nat_config().map_or([0; 4], |n| n.underlay_broadcast);
    if policy::is_unroutable_destination(ip.dst, broadcast) {
        return Err(Counter::DropNoRoute);
    }
    let Some(port) = dst_port(ctx, ip, ETH_HLEN)? else {
        return Ok(());
    };
    let agent = is_agent(cfg, ip.dst);
    if ip.protocol == IPPROTO_UDP && port == cfg.vxlan_port && agent {
        return Err(Counter::DropContainerVxlan);
    }
    if is_protected(ipv4_mapped(ip.dst), port, ip.protocol)
        || (agent && is_protected(ProtectedKey::ANY_AGENT, port, ip.protocol))
    {
        return Err(Counter::DropControlPlane);
    }
    Ok(())
}

/// Checks a container's packet (a local container's, or a remote one's inside VXLAN) to this
/// agent's host at a network's gateway address: the agent's control ports are out of bounds
/// there too. IPv6 behind extension headers hides its transport header from this check, so it
/// does not reach the host at all.
#[inline(always)]
pub fn to_host_gateway(ctx: &TcContext, l3: &L3) -> Result<(), Counter> {
    let Some(l4) = l3.l4 else {
        return if l3.ethertype == ETH_P_IPV6 {
            Err(Counter::DropControlPlane)
        } else {
            Ok(())
        };
    };
    if l3.protocol != IPPROTO_UDP && l3.protocol != IPPROTO_TCP {
        return Ok(());
    }
    let ports = skb::load::<4>(ctx, l4)?;
    let port = u16::from_be_bytes([ports[2], ports[3]]);
    if is_protected(ProtectedKey::ANY_AGENT, port, l3.protocol) {
        return Err(Counter::DropControlPlane);
    }
    Ok(())
}
