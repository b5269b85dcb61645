//! VXLAN encapsulation, built in BPF: no VXLAN device.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::generated::{bpf_get_hash_recalc, bpf_redirect_neigh},
    programs::TcContext,
};
use overlay_common::{
    counters::Counter,
    maps::{AgentConfig, RemoteRoute, ipv4_unmapped},
    packet::{ETH_HLEN, EncapParams, VXLAN_ENCAP_LEN, build_vxlan_headers, vxlan_source_port},
};

use crate::skb;

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

/// Wraps the frame (an IPv4 or IPv6 packet, `inner_ethertype`) in outer Ethernet/IPv4/UDP/VXLAN
/// towards the agent owning `route` and sends it out of the underlay NIC; the kernel's neighbour
/// table supplies the next-hop MAC. The ENCAP flags are the same for both inner families: the
/// kernel finds the inner network header behind the inner Ethernet header (L2_ETH), and the
/// inner packet's own GSO type (TCPV4/TCPV6/UDP_L4) stays as it is under the UDP tunnel's.
#[inline(always)]
pub fn to_remote(
    ctx: &TcContext,
    cfg: &AgentConfig,
    route: &RemoteRoute,
    inner_ethertype: u16,
) -> Result<i32, Counter> {
    // IPv6 underlays come later; until then an IPv6 VTEP address has no route.
    let (Some(outer_src), Some(outer_dst)) = (
        ipv4_unmapped(&cfg.underlay_ip),
        ipv4_unmapped(&route.underlay_ip),
    ) else {
        return Err(Counter::DropNoRoute);
    };
    // SAFETY: plain helper call on the program's own context.
    let flow_hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let headers = build_vxlan_headers(&EncapParams {
        outer_src,
        outer_dst,
        src_port: vxlan_source_port(flow_hash),
        dst_port: cfg.vxlan_port,
        // The wire VNI of the route's network (shared by default), not its network id.
        vni: route.vni,
        inner_src_mac: cfg.vtep_mac,
        inner_dst_mac: route.vtep_mac,
        inner_ethertype,
        inner_ip_len: (ctx.len() as usize).saturating_sub(ETH_HLEN),
    });
    ctx.adjust_room(VXLAN_ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS)
        .map_err(|_| Counter::DropEncapFailed)?;
    skb::store(ctx, 0, &headers).map_err(|_| Counter::DropEncapFailed)?;
    // SAFETY: plain helper call; no explicit next hop, the FIB decides.
    Ok(unsafe { bpf_redirect_neigh(cfg.underlay_ifindex, core::ptr::null_mut(), 0, 0) } as i32)
}
