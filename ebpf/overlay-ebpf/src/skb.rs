//! Small accessors over the TC context shared by the program paths.
//!
//! Headers are read and written in place (direct packet access: one bounds check against
//! `data_end` per header) when they lie in the skb's linear part, which is where a packet's
//! headers almost always are; only a header beyond it (a GRO'd or paged skb) goes through the
//! copying helpers `bpf_skb_load_bytes` / `bpf_skb_store_bytes`.

use aya_ebpf::{helpers::generated::bpf_skb_change_tail, programs::TcContext};
use overlay_common::counters::Counter;

/// Largest offset read in place; beyond it (never a header of ours) the helpers are used. Also
/// bounds the offset for the verifier, which accepts packet-pointer arithmetic only with a
/// bounded scalar.
const DIRECT_MAX_OFFSET: usize = 0x3fff;

/// Address of `N` bytes at `offset` from `data`, if they all lie before `data_end` (a TC
/// packet's linear part, an XDP frame's first buffer).
#[inline(always)]
pub fn in_place<const N: usize>(data: usize, data_end: usize, offset: usize) -> Option<usize> {
    if offset > DIRECT_MAX_OFFSET {
        return None;
    }
    let at = data + offset;
    if at + N > data_end {
        return None;
    }
    Some(at)
}

/// Address of `N` bytes at `offset` in the linear part, if they are all there.
#[inline(always)]
fn linear<const N: usize>(ctx: &TcContext, offset: usize) -> Option<usize> {
    in_place::<N>(ctx.data(), ctx.data_end(), offset)
}

/// Loads a fixed-size header at `offset`; a packet too short to hold it is truncated.
#[inline(always)]
pub fn load<const N: usize>(ctx: &TcContext, offset: usize) -> Result<[u8; N], Counter> {
    if let Some(at) = linear::<N>(ctx, offset) {
        // SAFETY: `at..at + N` lies within data..data_end, checked just above (and by the
        // verifier on the same comparison).
        return Ok(unsafe { core::ptr::read_unaligned(at as *const [u8; N]) });
    }
    ctx.load::<[u8; N]>(offset)
        .map_err(|_| Counter::DropTruncated)
}

/// Writes `bytes` at `offset` (no checksum is updated: callers fix checksums themselves).
#[inline(always)]
pub fn store<const N: usize>(ctx: &TcContext, offset: usize, bytes: &[u8; N]) -> Result<(), ()> {
    if let Some(at) = linear::<N>(ctx, offset) {
        // SAFETY: as in `load`; the verifier makes a cloned skb's head private before a program
        // that writes to packet data runs.
        unsafe { core::ptr::write_unaligned(at as *mut [u8; N], *bytes) };
        return Ok(());
    }
    ctx.store(offset, bytes, 0).map_err(|_| ())
}

/// Writes `N` bytes at `offset` in place with `write`, which must set every byte (no copy on the
/// stack first). Only for bytes in the linear part, as room just made by `bpf_skb_adjust_room`
/// at the front always is (it lies in the skb's head); anything else is an error.
#[inline(always)]
pub fn fill<const N: usize>(
    ctx: &TcContext,
    offset: usize,
    write: impl FnOnce(&mut [u8; N]),
) -> Result<(), ()> {
    let at = linear::<N>(ctx, offset).ok_or(())?;
    // SAFETY: as in `store`; the bytes are the program's alone while it runs.
    write(unsafe { &mut *(at as *mut [u8; N]) });
    Ok(())
}

/// ifindex of the device the packet arrived on.
#[inline(always)]
pub fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's run.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Whether the program runs at TC ingress, where the kernel has just set the packet's input
/// interface to the device the hook runs on (not so on a netkit policy's transmit path).
#[inline(always)]
pub fn at_tc_ingress(ctx: &TcContext) -> bool {
    // SAFETY: the context pointer is valid for the program's run.
    unsafe { (*ctx.skb.skb).ingress_ifindex == (*ctx.skb.skb).ifindex }
}

/// Hands the verified sender's network (id) and counter slot to the program `from_container`
/// tail-calls into (`skb->cb`, which a tail call keeps): that program need not look the sender
/// up again.
#[inline(always)]
pub fn pass_sender(ctx: &TcContext, network: u32, slot: u32) {
    // SAFETY: the context pointer is valid for the program's run; `cb` is writable from TC.
    unsafe {
        (*ctx.skb.skb).cb[0] = network;
        (*ctx.skb.skb).cb[1] = slot;
    }
}

/// What [`pass_sender`] handed over: (network, slot).
#[inline(always)]
pub fn passed_sender(ctx: &TcContext) -> (u32, u32) {
    // SAFETY: as above.
    unsafe { ((*ctx.skb.skb).cb[0], (*ctx.skb.skb).cb[1]) }
}

/// The flow hash the kernel already holds for the packet (a socket's, or one computed on its
/// way), 0 if none: reading it costs no helper call and no flow dissection.
#[inline(always)]
pub fn known_hash(ctx: &TcContext) -> u32 {
    // SAFETY: as above.
    unsafe { (*ctx.skb.skb).hash }
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
    store(ctx, 0, &macs).map_err(|_| Counter::DropMalformed)
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
