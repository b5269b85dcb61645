//! ARP responder: containers resolve their gateway (and every other on-link address) to the MAC of
//! their host-side veth, so no bridge is needed.

use aya_ebpf::{helpers::generated::bpf_redirect, programs::TcContext};
use overlay_common::{
    counters::{Counter, Drop, InNetwork},
    maps::ipv4_mapped,
    packet::{ARP_LEN, ETH_HLEN, arp_reply},
};

use crate::{isolation::verified_sender, skb, stats::count_in_slot};

/// Answers an ARP request from the container behind this veth by sending the reply back out of
/// the same veth. ARP that needs no answer is dropped as `arp_ignored`.
#[inline(always)]
pub fn respond(ctx: &TcContext) -> Result<i32, Drop> {
    let frame: [u8; ETH_HLEN + ARP_LEN] = skb::load(ctx, 0)?;
    let sender_ip = [frame[28], frame[29], frame[30], frame[31]];
    let sender_mac = [frame[6], frame[7], frame[8], frame[9], frame[10], frame[11]];
    let ifindex = skb::ingress_ifindex(ctx);
    // Probes (sender 0.0.0.0) come from no endpoint yet; anything else must be the endpoint
    // behind this veth speaking for itself.
    let ep = match verified_sender(ipv4_mapped(sender_ip), sender_mac, ifindex) {
        Ok(ep) => ep,
        Err(_) if sender_ip == [0, 0, 0, 0] => return Err(Counter::ArpIgnored.into()),
        Err(c) => return Err(c.into()),
    };
    let network = ep.network;
    // Replies, gratuitous ARP: nobody behind the veth to hear them.
    let reply = arp_reply(&frame, ep.gateway_mac)
        .ok_or(Counter::ArpIgnored)
        .in_network(network)?;
    skb::store(ctx, 0, &reply)
        .map_err(|_| Counter::DropMalformed)
        .in_network(network)?;
    count_in_slot(ep.slot, Counter::ArpReplied, ctx.len());
    // SAFETY: plain helper call; egress of the ingress veth delivers to its peer, the container.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}
