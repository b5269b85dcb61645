//! Per-network isolation and anti-spoofing: who may send, and to whom.

use overlay_common::{
    counters::Counter,
    maps::{Addr16, Endpoint},
};

use crate::{
    forward::Hop,
    maps::{endpoint, overlay_subnet, route},
};

/// The endpoint a container's frame claims to come from, if the claim holds: its source IP is a
/// local endpoint attached to the veth the frame arrived on, with that endpoint's MAC.
#[inline(always)]
pub fn verified_sender(
    src_ip: Addr16,
    src_mac: [u8; 6],
    ingress_ifindex: u32,
) -> Result<&'static Endpoint, Counter> {
    match endpoint(src_ip) {
        Some(ep) if ep.ifindex == ingress_ifindex && ep.mac == src_mac => Ok(ep),
        _ => Err(Counter::DropSpoofedSource),
    }
}

/// Where a packet sent on network `vni` to `dst` goes: a [`Hop`] inside the overlay, or `None`
/// for outside every overlay (the host stack's business). Any address of another network is
/// refused, whether or not something lives there.
#[inline(always)]
pub fn resolve(vni: u32, dst: Addr16) -> Result<Option<Hop>, Counter> {
    if let Some(ep) = endpoint(dst) {
        return if ep.vni == vni {
            Ok(Some(Hop::Local(ep)))
        } else {
            Err(Counter::DropCrossNetwork)
        };
    }
    if let Some(r) = route(dst) {
        return if r.vni == vni {
            Ok(Some(Hop::Remote(r)))
        } else {
            Err(Counter::DropCrossNetwork)
        };
    }
    match overlay_subnet(dst) {
        Some(s) if s.vni != vni => Err(Counter::DropCrossNetwork),
        Some(_) => Err(Counter::DropNoRoute),
        None => Ok(None),
    }
}

/// Whether a decapsulated packet's inner source is plausible: it lies in a subnet of network `vni`
/// that belongs to the agent the VXLAN packet came from.
#[inline(always)]
pub fn remote_sender_matches(inner_src: Addr16, vni: u32, outer_src: Addr16) -> bool {
    matches!(route(inner_src), Some(r) if r.vni == vni && r.underlay_ip == outer_src)
}
