//! VXLAN encapsulation, built in BPF: no VXLAN device.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_ADJ_ROOM_NO_CSUM_RESET,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::generated::{bpf_get_hash_recalc, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use overlay_common::{
    counters::Counter,
    maps::{AgentConfig, RemoteRoute, ipv4_unmapped},
    packet::{
        ETH_HLEN, ETH_P_IP, EncapParams, IPPROTO_TCP, IPPROTO_UDP, VXLAN_ENCAP_LEN, ipv4_flow_hash,
        vxlan_source_port, write_vxlan_headers,
    },
    underlay6::{Encap6Params, VXLAN6_ENCAP_LEN, vxlan_flow_label, write_vxlan6_headers},
};

use crate::{forward::L3, maps, skb, stats::count_in_slot};

/// Length of the inner Ethernet header, encoded for `bpf_skb_adjust_room` so the kernel records
/// where the inner frame starts (needed for GSO of the tunnelled packet).
const ENCAP_L2_ETH_LEN: u64 = (ETH_HLEN as u64) << 56;

/// `bpf_skb_adjust_room` flags for VXLAN over IPv4. FIXED_GSO keeps the inner MSS: the container
/// MTU already leaves room for the 50 bytes, so segments still fit the underlay MTU.
const ENCAP_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | ENCAP_L2_ETH_LEN;

/// The same over an IPv6 underlay: the kernel then also switches the packet's protocol to IPv6
/// (for an inner IPv4 packet), which `bpf_redirect_neigh` uses to resolve the next hop by NDP.
const ENCAP6_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | ENCAP_L2_ETH_LEN;

/// The inner flow's hash, for the outer source port (and IPv6 flow label): the kernel's when it
/// has one; for IPv4 without one, [`ipv4_flow_hash`] of the addresses and ports, read in place;
/// otherwise the kernel's flow dissection (`bpf_get_hash_recalc`).
#[inline(always)]
fn flow_hash(ctx: &TcContext, l3: &L3) -> u32 {
    let known = skb::known_hash(ctx);
    if known != 0 {
        return known;
    }
    if l3.ethertype == ETH_P_IP
        && let Ok(addrs) = skb::load::<8>(ctx, ETH_HLEN + 12)
    {
        // A fragment (all of a datagram's alike) or another protocol: the addresses alone.
        let ports = match l3.l4 {
            Some(l4)
                if !l3.fragment && (l3.protocol == IPPROTO_TCP || l3.protocol == IPPROTO_UDP) =>
            {
                skb::load::<4>(ctx, l4).unwrap_or([0; 4])
            }
            _ => [0; 4],
        };
        return ipv4_flow_hash(addrs, ports, l3.protocol);
    }
    // SAFETY: plain helper call on the program's own context.
    unsafe { bpf_get_hash_recalc(ctx.skb.skb) }
}

/// Room beyond the outer headers grown in front of a packet that is no GSO super-packet, and
/// given back at once, before it is encapsulated, when the underlay NIC reserves headroom of its
/// own. A container's datagram on a veth has about 2 bytes of headroom; the kernel grows the head
/// by what the outer headers lack, rounded up to 64 bytes, which leaves 16 in front of them, and
/// a NIC that reserves more (virtio_net: 32 with the Ethernet header) has the head reallocated a
/// second time as the packet leaves (`bpf_redirect_neigh`'s check). Growing by the outer headers
/// and this much first makes the one reallocation large enough for both; a packet that has the
/// room already (a netkit pair's headroom) is not reallocated at all. GSO super-packets (TCP) come
/// with the stack's own ample headroom.
const SPARE_HEADROOM: i32 = 32;

/// See [`SPARE_HEADROOM`]: grows and shrinks the room right behind the Ethernet header, which
/// leaves the packet and its header offsets as they were, with the head reallocated once, larger,
/// where it had to be.
#[inline(always)]
fn reserve_headroom(ctx: &TcContext, cfg: &AgentConfig, outer_len: usize) -> Result<(), Counter> {
    if cfg.flags & AgentConfig::FLAG_SPARE_HEADROOM == 0 || skb::gso_size(ctx) != 0 {
        return Ok(());
    }
    let room = outer_len as i32 + SPARE_HEADROOM;
    let keep = BPF_F_ADJ_ROOM_NO_CSUM_RESET as u64;
    let fail = |_| Counter::DropEncapFailed;
    ctx.adjust_room(room, BPF_ADJ_ROOM_MAC, keep)
        .map_err(fail)?;
    ctx.adjust_room(-room, BPF_ADJ_ROOM_MAC, keep).map_err(fail)
}

/// Wraps the frame (an IPv4 or IPv6 packet, `inner_ethertype`) in outer Ethernet/IPv4/UDP/VXLAN,
/// or Ethernet/IPv6/UDP/VXLAN when this agent's underlay is IPv6 (`overlay_common::underlay6`),
/// towards the agent owning `route` and sends it out of the underlay NIC. The outer MACs come
/// from the agent's cached next hop of that VTEP when it has a fresh one, with a plain redirect;
/// otherwise the kernel's route and neighbour lookup supplies them. The ENCAP flags are the same for both inner families: the
/// kernel finds the inner network header behind the inner Ethernet header (L2_ETH), and the
/// inner packet's own GSO type (TCPV4/TCPV6/UDP_L4) stays as it is under the UDP tunnel's.
#[inline(always)]
pub fn to_remote(
    ctx: &TcContext,
    cfg: &AgentConfig,
    route: &RemoteRoute,
    l3: &L3,
) -> Result<i32, Counter> {
    let inner_ethertype = l3.ethertype;
    let flow_hash = flow_hash(ctx, l3);
    let len = ctx.len();
    let inner_ip_len = (len as usize).saturating_sub(ETH_HLEN);
    let hop = maps::next_hop(route);
    let outer_macs = hop.map(|h| (h.dst_mac, h.src_mac));
    // `route.vni` is the wire VNI of the route's network (shared by default), not its network id.
    match (
        ipv4_unmapped(&cfg.underlay_ip),
        ipv4_unmapped(&route.underlay_ip),
    ) {
        (Some(outer_src), Some(outer_dst)) => {
            let params = EncapParams {
                outer_macs,
                outer_src,
                outer_dst,
                src_port: vxlan_source_port(flow_hash),
                dst_port: cfg.vxlan_port,
                vni: route.vni,
                inner_src_mac: cfg.vtep_mac,
                inner_dst_mac: route.vtep_mac,
                inner_ethertype,
                inner_ip_len,
            };
            reserve_headroom(ctx, cfg, VXLAN_ENCAP_LEN)?;
            ctx.adjust_room(VXLAN_ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS)
                .map_err(|_| Counter::DropEncapFailed)?;
            skb::fill(ctx, 0, |h| write_vxlan_headers(h, &params))
                .map_err(|_| Counter::DropEncapFailed)?;
        }
        (None, None) => {
            let params = Encap6Params {
                outer_macs,
                outer_src: cfg.underlay_ip,
                outer_dst: route.underlay_ip,
                src_port: vxlan_source_port(flow_hash),
                dst_port: cfg.vxlan_port,
                flow_label: vxlan_flow_label(flow_hash),
                vni: route.vni,
                inner_src_mac: cfg.vtep_mac,
                inner_dst_mac: route.vtep_mac,
                inner_ethertype,
                inner_ip_len,
            };
            reserve_headroom(ctx, cfg, VXLAN6_ENCAP_LEN)?;
            ctx.adjust_room(VXLAN6_ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, ENCAP6_FLAGS)
                .map_err(|_| Counter::DropEncapFailed)?;
            skb::fill(ctx, 0, |h| write_vxlan6_headers(h, &params))
                .map_err(|_| Counter::DropEncapFailed)?;
        }
        // An IPv4 underlay cannot reach an IPv6 VTEP, nor the reverse.
        _ => return Err(Counter::DropUnderlayFamily),
    }
    if let Some(hop) = hop {
        // SAFETY: plain helper call; the frame is addressed already.
        return Ok(unsafe { bpf_redirect(hop.ifindex, 0) } as i32);
    }
    count_in_slot(route.slot as u32, Counter::NextHopByKernel, len);
    // SAFETY: plain helper call; no explicit next hop, the FIB decides (IPv4 or IPv6 by the
    // packet's protocol).
    Ok(unsafe { bpf_redirect_neigh(cfg.underlay_ifindex, core::ptr::null_mut(), 0, 0) } as i32)
}
