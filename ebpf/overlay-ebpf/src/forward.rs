//! Forwarding inside the overlay, shared by containers' and the host's traffic and by both IP
//! families: to a local endpoint (the host's own at a gateway address included) or, in VXLAN, to
//! a remote one.

use aya_ebpf::programs::TcContext;
use overlay_common::{
    counters::{Counter, Drop, InNetwork},
    ipv6::Ipv6Header,
    maps::{AgentConfig, Endpoint, RemoteRoute},
    nat::UDP_HEADER_LEN,
    packet::{ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, Ipv4Header},
    policy::{IPV6_HLEN, is_ipv6_extension_header},
    too_big::{TCP_DATA_OFFSET, gso_segment_len, tcp_header_len},
};

use crate::{deliver, encap, guard, skb, stats::count_in_slot, too_big};

/// Where a packet inside the overlay goes next.
pub enum Hop {
    /// A container on this agent, or the host at a gateway address.
    Local(&'static Endpoint),
    /// A container behind another agent.
    Remote(&'static RemoteRoute),
}

/// What forwarding needs of an IP packet (right behind the frame's Ethernet header) of either
/// family.
pub struct L3 {
    pub ethertype: u16,
    pub total_len: usize,
    /// Length of the IPv4 header, or of the fixed IPv6 header.
    pub header_len: usize,
    /// IPv4 protocol, or the IPv6 next header.
    pub protocol: u8,
    /// Offset of the transport header; `None` when none is there to check (a later IPv4
    /// fragment) and the protocol is no transport's (an IPv6 extension header).
    pub l4: Option<usize>,
    /// IPv4 DF (always for IPv6): a too-big packet is answered, not only dropped.
    pub dont_fragment: bool,
    /// Part of a fragmented IPv4 datagram (its fragments hash alike, without ports).
    pub fragment: bool,
}

impl L3 {
    /// An IPv4 packet whose header starts at `l3`.
    #[inline(always)]
    pub fn v4(ip: &Ipv4Header, l3: usize) -> L3 {
        L3 {
            ethertype: ETH_P_IP,
            total_len: ip.total_len,
            header_len: ip.header_len,
            protocol: ip.protocol,
            l4: if ip.is_later_fragment {
                None
            } else {
                Some(l3 + ip.header_len)
            },
            dont_fragment: ip.dont_fragment,
            fragment: ip.is_fragment,
        }
    }

    /// An IPv6 packet whose header starts at `l3`.
    #[inline(always)]
    pub fn v6(ip: &Ipv6Header, l3: usize) -> L3 {
        L3 {
            ethertype: ETH_P_IPV6,
            total_len: ip.total_len(),
            header_len: IPV6_HLEN,
            protocol: ip.next_header,
            l4: if is_ipv6_extension_header(ip.next_header) {
                None
            } else {
                Some(l3 + IPV6_HLEN)
            },
            dont_fragment: true,
            fragment: false,
        }
    }
}

/// The IP length that counts against the overlay MTU: the packet's own, or, for a GSO
/// super-packet, that of each segment it is cut into. A super-packet whose transport header is not
/// TCP's or UDP's, or cannot be read, counts as fitting: its segments are not known here.
#[inline(always)]
fn wire_len(ctx: &TcContext, l3: &L3) -> usize {
    let gso_size = skb::gso_size(ctx);
    if gso_size == 0 {
        return l3.total_len;
    }
    let Some(l4) = l3.l4 else { return 0 };
    let transport_len = match l3.protocol {
        // Two bytes (data offset and flags): a one-byte bounds check compiles to a form the
        // verifier does not follow.
        IPPROTO_TCP => match skb::load::<2>(ctx, l4 + TCP_DATA_OFFSET) {
            Ok([offset, _]) => tcp_header_len(offset),
            Err(_) => return 0,
        },
        IPPROTO_UDP => UDP_HEADER_LEN,
        _ => return 0,
    };
    gso_segment_len(l3.header_len, transport_len, gso_size)
}

/// Sends a packet of network (id) `network` on to `hop` and counts it.
#[inline(always)]
pub fn into_overlay(
    ctx: &TcContext,
    cfg: &AgentConfig,
    network: u32,
    l3: &L3,
    hop: Hop,
) -> Result<i32, Drop> {
    let len = ctx.len();
    match hop {
        Hop::Local(ep) => {
            // The host at its gateway address: the agent's control ports are out of bounds.
            if ep.is_host() {
                guard::to_host_gateway(ctx, l3).in_network(network)?;
            }
            let verdict = deliver::to_endpoint(ctx, ep).in_network(network)?;
            // The endpoint is of `network` (the callers checked): its slot is the network's.
            count_in_slot(ep.slot, Counter::LocalDelivered, len);
            Ok(verdict)
        }
        Hop::Remote(route) => {
            // VTEPs must not fragment (RFC 7348): a packet over the overlay MTU, or a GSO
            // super-packet whose segments would be, goes back to its sender as a "too big" error
            // when it can (path MTU discovery), and is counted as dropped either way.
            if wire_len(ctx, l3) > cfg.overlay_mtu as usize {
                return too_big::answer(ctx, cfg, network, l3);
            }
            let verdict = encap::to_remote(ctx, cfg, route, l3).in_network(network)?;
            count_in_slot(route.slot as u32, Counter::Encapsulated, len);
            Ok(verdict)
        }
    }
}
