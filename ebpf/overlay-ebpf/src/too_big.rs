//! A packet over the overlay MTU goes back to its sender as an ICMP "fragmentation needed" (IPv4
//! with DF) or ICMPv6 "Packet Too Big" carrying the overlay MTU, built in place of the packet
//! (`overlay_common::too_big`), so path MTU discovery works through the overlay. Either way it is
//! counted as `drop_too_big`.

use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    helpers::generated::{bpf_csum_diff, bpf_redirect},
    programs::TcContext,
};
use overlay_common::{
    counters::{Counter, Drop, InNetwork},
    ipv6::native_sum_to_network,
    maps::AgentConfig,
    packet::{ETH_HLEN, ETH_P_IPV6},
    too_big::{
        FRAG_NEEDED_HEADERS_LEN, FRAG_NEEDED_ROOM, PTB_HEADERS_LEN, PTB_ROOM, QUOTE_LEN,
        ipv4_answerable, ipv6_answerable, write_frag_needed_headers, write_packet_too_big_headers,
    },
};

use crate::{forward::L3, maps::OVL_SCRATCH_FRAME, skb, stats::count};

/// Answers the too-big packet of network `vni`, or drops it when it cannot be answered (IPv4
/// without DF: the sender does no path MTU discovery).
#[inline(always)]
pub fn answer(ctx: &TcContext, cfg: &AgentConfig, vni: u32, l3: &L3) -> Result<i32, Drop> {
    let len = ctx.len();
    let mtu = cfg.overlay_mtu;
    let v6 = l3.ethertype == ETH_P_IPV6;
    let answerable = if v6 {
        ipv6_answerable(l3.total_len, mtu)
    } else {
        ipv4_answerable(l3.total_len, mtu, l3.dont_fragment)
    };
    if !answerable {
        return Err(Counter::DropTooBig.in_network(vni));
    }
    let verdict = if v6 {
        packet_too_big(ctx, mtu)
    } else {
        frag_needed(ctx, mtu)
    }
    .in_network(vni)?;
    count(vni, Counter::DropTooBig, len);
    count(vni, Counter::TooBigAnswered, ctx.len());
    Ok(verdict)
}

/// Cuts the frame to its Ethernet header and the first [`QUOTE_LEN`] bytes of the packet, makes
/// `room` bytes in front of them and returns the quote's network-order partial sum.
#[inline(always)]
fn reshape(ctx: &TcContext, room: usize) -> Result<u32, Counter> {
    let fail = |_| Counter::DropTooBig;
    skb::set_len(ctx, (ETH_HLEN + QUOTE_LEN) as u32)?;
    ctx.adjust_room(room as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(fail)?;
    let headers = ETH_HLEN + room;
    ctx.pull_data((headers + QUOTE_LEN) as u32).map_err(fail)?;
    let quote = ctx.data() + headers;
    if quote + QUOTE_LEN > ctx.data_end() {
        return Err(Counter::DropTooBig);
    }
    // SAFETY: helper call on QUOTE_LEN bytes of packet data, bounds checked above.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            quote as *mut u32,
            QUOTE_LEN as u32,
            0,
        )
    };
    if sum < 0 {
        return Err(Counter::DropTooBig);
    }
    Ok(native_sum_to_network(sum as u32))
}

/// Back out of the device the packet came in on: to the container (or the host).
#[inline(always)]
fn send_back(ctx: &TcContext) -> i32 {
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(skb::ingress_ifindex(ctx), 0) as i32 }
}

#[inline(always)]
fn frag_needed(ctx: &TcContext, mtu: u32) -> Result<i32, Counter> {
    let eth = skb::load::<12>(ctx, 0)?;
    let addrs = skb::load::<8>(ctx, ETH_HLEN + 12)?;
    let quote_sum = reshape(ctx, FRAG_NEEDED_ROOM)?;
    let buf = OVL_SCRATCH_FRAME
        .get_ptr_mut(0)
        .ok_or(Counter::DropTooBig)?;
    // SAFETY: this CPU's slot (at least as long as the headers: see the size assert below).
    let h = unsafe { &mut *(buf as *mut [u8; FRAG_NEEDED_HEADERS_LEN]) };
    write_frag_needed_headers(
        h,
        (
            [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]],
            [eth[0], eth[1], eth[2], eth[3], eth[4], eth[5]],
        ),
        (
            [addrs[0], addrs[1], addrs[2], addrs[3]],
            [addrs[4], addrs[5], addrs[6], addrs[7]],
        ),
        if mtu > 0xffff { 0xffff } else { mtu as u16 },
        quote_sum,
    );
    ctx.store(0, h, 0).map_err(|_| Counter::DropTooBig)?;
    Ok(send_back(ctx))
}

#[inline(always)]
fn packet_too_big(ctx: &TcContext, mtu: u32) -> Result<i32, Counter> {
    let eth = skb::load::<12>(ctx, 0)?;
    let src = skb::load::<16>(ctx, ETH_HLEN + 8)?;
    let dst = skb::load::<16>(ctx, ETH_HLEN + 24)?;
    let quote_sum = reshape(ctx, PTB_ROOM)?;
    let buf = OVL_SCRATCH_FRAME
        .get_ptr_mut(0)
        .ok_or(Counter::DropTooBig)?;
    // SAFETY: as in `frag_needed`.
    let h = unsafe { &mut *(buf as *mut [u8; PTB_HEADERS_LEN]) };
    write_packet_too_big_headers(
        h,
        (
            [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]],
            [eth[0], eth[1], eth[2], eth[3], eth[4], eth[5]],
        ),
        (&src, &dst),
        mtu,
        quote_sum,
    );
    ctx.store(0, h, 0).map_err(|_| Counter::DropTooBig)?;
    Ok(send_back(ctx))
}

const _: () = assert!(
    PTB_HEADERS_LEN <= overlay_common::ipv6::NA_FRAME_LEN
        && FRAG_NEEDED_HEADERS_LEN <= overlay_common::ipv6::NA_FRAME_LEN
);
