//! Delivery to a container on this agent: straight into its network namespace.

use aya_ebpf::{
    helpers::generated::{bpf_redirect, bpf_redirect_peer},
    programs::TcContext,
};
use overlay_common::{counters::Counter, maps::Endpoint};

use crate::skb;

/// Addresses the frame to the container (gateway MAC -> container MAC) and hands it to the peer
/// of its host-side veth, skipping the backlog queue (`bpf_redirect_peer`, TC ingress only); or,
/// for the host's own endpoint, to the host stack.
#[inline(always)]
pub fn to_endpoint(ctx: &TcContext, ep: &Endpoint) -> Result<i32, Counter> {
    skb::set_macs(ctx, ep.mac, ep.gateway_mac)?;
    // Straight into the container's namespace where the kernel allows it: bpf_redirect_peer
    // works at TC ingress only. Otherwise out of the target's host-side device: for the host's
    // own endpoint (its link's peer is in this namespace, so this enters the host stack), and
    // from a netkit pair's policy (`--container-device netkit`), which runs on the container's
    // transmit path where a peer redirect would be dropped; the device's transmit puts the
    // frame into the container.
    let into_peer = !ep.is_host() && skb::at_tc_ingress(ctx);
    // SAFETY: plain helper calls.
    let verdict = unsafe {
        if into_peer {
            bpf_redirect_peer(ep.ifindex, 0)
        } else {
            bpf_redirect(ep.ifindex, 0)
        }
    };
    Ok(verdict as i32)
}
