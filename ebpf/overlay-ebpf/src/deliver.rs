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
    if ep.is_host() {
        // The host link's peer lives in this namespace: out of it, into the host stack.
        // SAFETY: plain helper call.
        return Ok(unsafe { bpf_redirect(ep.ifindex, 0) } as i32);
    }
    // bpf_redirect_peer works at TC ingress only, where the kernel has just set the skb's
    // input interface to the device the hook runs on. A program running as a netkit pair's
    // policy (the container's transmit path, `--container-device netkit`) is not at ingress:
    // the kernel would drop a peer redirect there, so it hands the frame to the target's
    // host-side device instead (whose transmit puts it into the container).
    // SAFETY: the context pointer is valid for the program's run.
    let at_ingress = unsafe { (*ctx.skb.skb).ingress_ifindex } == skb::ingress_ifindex(ctx);
    if !at_ingress {
        // SAFETY: plain helper call.
        return Ok(unsafe { bpf_redirect(ep.ifindex, 0) } as i32);
    }
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32)
}
