//! Early drops on the underlay NIC (XDP, before the kernel builds an skb): VXLAN that
//! `from_underlay` would drop anyway, for the same reasons and counted under the same counters
//! (`drop_unknown_vtep`, `drop_unknown_vni`, `drop_fragmented`, `drop_truncated`,
//! `drop_malformed`, `drop_bad_vxlan_flags`, `drop_vxlan_nat_port`; over an IPv6 underlay the
//! same checks on the outer IPv6 header), plus `xdp_dropped` for
//! each, so the per-reason figures are the same with XDP attached or not. Everything else
//! passes on to TC untouched: this program only ever answers `XDP_PASS` or `XDP_DROP`, and
//! only drops on the outer headers' checks, which need no skb. The inner checks (endpoint,
//! isolation, spoofing) stay in `decap`.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_xdp_load_bytes,
    programs::XdpContext,
};
use overlay_common::{
    counters::{Counter, Drop},
    ipv6::Ipv6Header,
    maps::{ipv4_mapped, ipv4_unmapped},
    packet::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EthHeader, IPV4_HLEN, Ipv4Header, UDP_HLEN, UnderlayPacket,
        VXLAN_HLEN, classify_underlay, parse_vxlan,
    },
    policy::{IPV6_HLEN, in_port_range},
    underlay6::{Underlay6Packet, classify_underlay6},
};

use crate::{
    maps::{config, is_known_vtep, nat_config, wire_vni},
    stats::count,
};

/// Length of the frame as TC would see it (`skb->len`): the byte counts agree too.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> u32 {
    (ctx.data_end() - ctx.data()) as u32
}

/// The program's one drop site: counts the drop under its reason (as TC would have) and as
/// dropped in XDP.
#[inline(always)]
pub fn drop_early(drop: Drop, bytes: u32) -> u32 {
    count(drop.network, drop.reason, bytes);
    count(drop.network, Counter::XdpDropped, bytes);
    XDP_DROP
}

/// Copies `N` bytes at `offset` out of the frame; `None` if the frame is shorter. Read in place
/// when they lie in the frame's first buffer, through `bpf_xdp_load_bytes` otherwise (a
/// multi-buffer frame) into a buffer left uninitialised (a zeroed one costs a `memset` call:
/// see `overlay_common::packet::write_vxlan_headers`).
#[inline(always)]
fn load<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    if let Some(at) = crate::skb::in_place::<N>(ctx.data(), ctx.data_end(), offset) {
        // SAFETY: `at..at + N` lies within data..data_end, checked by `in_place`.
        return Some(unsafe { core::ptr::read_unaligned(at as *const [u8; N]) });
    }
    let mut buf = core::mem::MaybeUninit::<[u8; N]>::uninit();
    // SAFETY: the helper writes N bytes into `buf` or fails (checking the frame's bounds); `buf`
    // is read only after it succeeded.
    let r =
        unsafe { bpf_xdp_load_bytes(ctx.ctx, offset as u32, buf.as_mut_ptr() as *mut _, N as u32) };
    (r == 0).then(|| unsafe { buf.assume_init() })
}

/// `Ok(XDP_PASS)` for everything TC should see, a [`Drop`] for VXLAN that TC would drop on its
/// outer headers (all counted under no network, as `decap` counts them).
#[inline(always)]
pub fn try_from_underlay(ctx: &XdpContext) -> Result<u32, Drop> {
    // Not configured yet, or nothing we can parse: TC (and the host stack) decide, as without us.
    let Some(cfg) = config() else {
        return Ok(XDP_PASS);
    };
    let Some(eth) = load::<ETH_HLEN>(ctx, 0) else {
        return Ok(XDP_PASS);
    };
    let eth = EthHeader::parse(&eth);
    // The outer headers, of the underlay's family: the VTEP, its source port, the VXLAN offset.
    let (outer_src, outer_src_port, vxlan_offset) = match ipv4_unmapped(&cfg.underlay_ip) {
        Some(local_ip) => {
            if eth.ethertype != ETH_P_IP {
                return Ok(XDP_PASS);
            }
            let Some(ip) = load::<IPV4_HLEN>(ctx, ETH_HLEN) else {
                return Ok(XDP_PASS);
            };
            let Ok(ip) = Ipv4Header::parse(&ip) else {
                return Ok(XDP_PASS);
            };
            let Some(udp) = load::<UDP_HLEN>(ctx, ETH_HLEN + ip.header_len) else {
                return Ok(XDP_PASS);
            };
            match classify_underlay(
                &eth,
                &ip,
                &udp,
                frame_len(ctx) as usize,
                cfg.vxlan_port,
                local_ip,
            )? {
                UnderlayPacket::NotOurs => return Ok(XDP_PASS),
                UnderlayPacket::Vxlan { vxlan_offset, .. } => (
                    ipv4_mapped(ip.src),
                    u16::from_be_bytes([udp[0], udp[1]]),
                    vxlan_offset,
                ),
            }
        }
        // An IPv6 underlay: the same early drops on outer IPv6 (`underlay6`).
        None => {
            if eth.ethertype != ETH_P_IPV6 {
                return Ok(XDP_PASS);
            }
            let Some(ip) = load::<IPV6_HLEN>(ctx, ETH_HLEN) else {
                return Ok(XDP_PASS);
            };
            let Ok(ip) = Ipv6Header::parse(&ip) else {
                return Ok(XDP_PASS);
            };
            let Some(udp) = load::<UDP_HLEN>(ctx, ETH_HLEN + IPV6_HLEN) else {
                return Ok(XDP_PASS);
            };
            match classify_underlay6(
                &ip,
                &udp,
                frame_len(ctx) as usize,
                cfg.vxlan_port,
                &cfg.underlay_ip,
            )? {
                Underlay6Packet::NotOurs => return Ok(XDP_PASS),
                Underlay6Packet::Vxlan {
                    outer_src,
                    vxlan_offset,
                } => (
                    outer_src,
                    u16::from_be_bytes([udp[0], udp[1]]),
                    vxlan_offset,
                ),
            }
        }
    };
    // The order of `decap::inspect`: the same packet gets the same reason.
    if nat_config().is_some_and(|n| in_port_range(outer_src_port, n.port_min, n.port_max)) {
        return Err(Counter::DropVxlanNatPort.into());
    }
    if !is_known_vtep(outer_src) {
        return Err(Counter::DropUnknownVtep.into());
    }
    let Some(vxlan) = load::<VXLAN_HLEN>(ctx, vxlan_offset) else {
        return Ok(XDP_PASS);
    };
    let vni = parse_vxlan(&vxlan)?;
    if wire_vni(vni).is_none() {
        return Err(Counter::DropUnknownVni.into());
    }
    Ok(XDP_PASS)
}
