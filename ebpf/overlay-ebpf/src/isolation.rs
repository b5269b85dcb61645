//! Per-network isolation and anti-spoofing: who may send, and to whom.

use overlay_common::{
    counters::{Counter, Drop},
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

/// Where a packet sent on network (id) `network` to `dst` goes: a [`Hop`] inside the overlay, or
/// `None` for outside every overlay (the host stack's business). Any address of another network
/// is refused, whether or not something lives there.
#[inline(always)]
pub fn resolve(network: u32, dst: Addr16) -> Result<Option<Hop>, Counter> {
    if let Some(ep) = endpoint(dst) {
        return if ep.network == network {
            Ok(Some(Hop::Local(ep)))
        } else {
            Err(Counter::DropCrossNetwork)
        };
    }
    if let Some(r) = route(dst) {
        return if r.network == network {
            Ok(Some(Hop::Remote(r)))
        } else {
            Err(Counter::DropCrossNetwork)
        };
    }
    match overlay_subnet(dst) {
        Some(s) if s.network != network => Err(Counter::DropCrossNetwork),
        Some(_) => Err(Counter::DropNoRoute),
        None => Ok(None),
    }
}

/// The local endpoint a decapsulated packet from `src` to `dst`, that arrived in VNI `vni` from
/// the agent at `outer_src`, goes to, if it may. The VNI does not say the network (networks share
/// one by default): the addresses do. The source must lie in a subnet the sending agent owns (no
/// spoofing), that subnet's network must be the destination's (isolation, counted under the
/// source's network as a container's cross-network packet is), and the VNI must be the one that
/// network's frames carry. Drops before the source is known count under `vni_network` (the
/// network the VNI carries, if only one).
#[inline(always)]
pub fn accept_remote(
    src: &Addr16,
    dst: &Addr16,
    vni: u32,
    vni_network: u32,
    outer_src: Addr16,
) -> Result<&'static Endpoint, Drop> {
    // The source's network, when the sending agent owns the source: a packet for no endpoint
    // counts there (the VNI says no network when networks share it).
    let from = route(*src).filter(|r| r.underlay_ip == outer_src);
    let Some(ep) = endpoint(*dst) else {
        let network = from.map_or(vni_network, |r| r.network);
        return Err(Counter::DropNoEndpoint.in_network(network));
    };
    let Some(from) = from else {
        return Err(Counter::DropSpoofedSource.in_network(ep.network));
    };
    if from.network != ep.network {
        return Err(Counter::DropCrossNetwork.in_network(from.network));
    }
    if from.vni != vni {
        return Err(Counter::DropVniMismatch.in_network(from.network));
    }
    Ok(ep)
}

/// [`accept_remote`]'s yes, for a frame whose VTEP and VNI have not been looked up: the local
/// endpoint, when the sending agent at `outer_src` owns `src` in VNI `vni` and `dst` is an
/// endpoint of the same network. Such a route proves the VTEP and the VNI known (the agent writes
/// routes after both and removes them first). `None` says only "not proven": the caller names
/// the drop with the full checks.
#[inline(always)]
pub fn accepted_remote(
    src: &Addr16,
    dst: &Addr16,
    vni: u32,
    outer_src: Addr16,
) -> Option<&'static Endpoint> {
    let from = route(*src).filter(|r| r.underlay_ip == outer_src && r.vni == vni)?;
    endpoint(*dst).filter(|ep| ep.network == from.network)
}
