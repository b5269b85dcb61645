//! Small accessors over the TC context shared by the program paths.

use aya_ebpf::{helpers::generated::bpf_skb_change_tail, programs::TcContext};
use overlay_common::counters::Counter;

/// Loads a fixed-size header at `offset`; a packet too short to hold it is truncated.
#[inline(always)]
pub fn load<const N: usize>(ctx: &TcContext, offset: usize) -> Result<[u8; N], Counter> {
    ctx.load::<[u8; N]>(offset)
        .map_err(|_| Counter::DropTruncated)
}

/// ifindex of the device the packet arrived on.
#[inline(always)]
pub fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's run.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// GSO segment size; 0 for a packet that is not a GSO super-packet.
#[inline(always)]
pub fn gso_size(ctx: &TcContext) -> u32 {
    // SAFETY: as above.
    unsafe { (*ctx.skb.skb).gso_size }
}

/// Rewrites the Ethernet addresses of the frame.
#[inline(always)]
pub fn set_macs(ctx: &TcContext, dst: [u8; 6], src: [u8; 6]) -> Result<(), Counter> {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&dst);
    macs[6..].copy_from_slice(&src);
    ctx.store(0, &macs, 0).map_err(|_| Counter::DropMalformed)
}

/// Whether the frame carries a VLAN tag, in band (`ethertype`) or as the metadata the kernel
/// strips a tag into before TC runs (`vlan_present`/`vlan_proto`); the tag would survive a
/// redirect and leave the NIC.
#[inline(always)]
pub fn vlan_tagged(ctx: &TcContext, ethertype: u16) -> bool {
    // SAFETY: as above.
    let (present, proto) = unsafe { ((*ctx.skb.skb).vlan_present, (*ctx.skb.skb).vlan_proto) };
    overlay_common::policy::is_vlan_tagged(ethertype, present, proto)
}

/// Trims or extends the frame to `len` bytes (an answer built in place of the request).
#[inline(always)]
pub fn set_len(ctx: &TcContext, len: u32) -> Result<(), Counter> {
    // SAFETY: plain helper call on the program's own context.
    match unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) } {
        0 => Ok(()),
        _ => Err(Counter::DropMalformed),
    }
}
