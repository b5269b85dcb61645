//! The maps, declared once with the shared layouts from `overlay_common::maps`. All are BTF maps
//! so that `bpftool map dump` prints their keys and values as structs.

use aya_ebpf::{
    btf_maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf, lpm_trie::Key,
    },
    macros::btf_map,
};
use overlay_common::ipv6::NA_FRAME_LEN;
use overlay_common::maps::{
    Addr16, AgentConfig, Endpoint, EndpointKey, NatConfig, NatEntry, NatKey, NatQuota, NatQuotaKey,
    NetSlot, Network, NetworkKey, NextHop, OverlaySubnet, Protected, ProtectedKey, RemoteRoute,
    Stat, VniKey, Vtep, VtepKey, WireVni, capacity, tail_calls,
};
use overlay_common::monitor::{DropBudget, DropEvent, MonitorConfig, RING_BYTES};

#[btf_map]
pub static OVL_CONFIG: Array<AgentConfig, 1> = Array::new();

#[btf_map]
pub static OVL_ENDPOINTS: HashMap<EndpointKey, Endpoint, { capacity::ENDPOINTS as usize }> =
    HashMap::new();

#[btf_map]
pub static OVL_ROUTES: LpmTrie<Addr16, RemoteRoute, { capacity::ROUTES as usize }> = LpmTrie::new();

#[btf_map]
pub static OVL_SUBNETS: LpmTrie<Addr16, OverlaySubnet, { capacity::SUBNETS as usize }> =
    LpmTrie::new();

#[btf_map]
pub static OVL_VTEPS: HashMap<VtepKey, Vtep, { capacity::VTEPS as usize }> = HashMap::new();

#[btf_map]
pub static OVL_NETWORKS: HashMap<NetworkKey, Network, { capacity::NETWORKS as usize }> =
    HashMap::new();

/// The underlay next hop of each remote VTEP, mirrored by the agent from the kernel's route and
/// neighbour tables (`overlay_common::maps::NextHop`), at the VTEP's next-hop slot: a route
/// carries the slot, so encapsulation reads its next hop by index, not by a hash of the address.
#[btf_map]
pub static OVL_NEXT_HOPS: Array<NextHop, { capacity::NEXT_HOPS as usize }> = Array::new();

/// The VNIs VXLAN is accepted in, and which networks each carries.
#[btf_map]
pub static OVL_VNIS: HashMap<VniKey, WireVni, { capacity::VNIS as usize }> = HashMap::new();

/// Counters, by `overlay_common::maps::stat_index(slot, counter)`: an array, so counting is
/// an inlined bounds check and an add (no hash, no insert on a first packet).
#[btf_map]
pub static OVL_STATS: PerCpuArray<Stat, { capacity::STATS as usize }> = PerCpuArray::new();

/// Network id -> its counter slot, for counts whose path has no endpoint or route at hand
/// (drops, mostly).
#[btf_map]
pub static OVL_NET_SLOTS: HashMap<NetworkKey, NetSlot, { capacity::STAT_SLOTS as usize }> =
    HashMap::new();

#[btf_map]
pub static OVL_NAT: LruHashMap<NatKey, NatEntry, { capacity::NAT as usize }> = LruHashMap::new();

#[btf_map]
pub static OVL_NAT_CONFIG: Array<NatConfig, 1> = Array::new();

#[btf_map]
pub static OVL_NAT_QUOTA: LruHashMap<NatQuotaKey, NatQuota, { capacity::NAT_QUOTA as usize }> =
    LruHashMap::new();

/// Per-CPU scratch for a quota key (keeps it off `from_container`'s stack). Not pinned: its
/// content never outlives one program run.
#[btf_map]
pub static OVL_SCRATCH_QUOTA_KEY: PerCpuArray<NatQuotaKey, 1> = PerCpuArray::new();

/// Per-CPU scratch for a NAT key (the other direction of a flow being refreshed).
#[btf_map]
pub static OVL_SCRATCH_NAT_KEY: PerCpuArray<NatKey, 1> = PerCpuArray::new();

/// `overlay_common::maps::tail_calls`: filled by the agent's loader.
#[btf_map]
pub static OVL_TAIL_CALLS: ProgramArray<{ tail_calls::SLOTS as usize }> = ProgramArray::new();

/// Per-CPU scratch for a frame the datapath answers with (a Neighbor Advertisement), built off
/// the stack. Not pinned either.
#[btf_map]
pub static OVL_SCRATCH_FRAME: PerCpuArray<[u8; NA_FRAME_LEN], 1> = PerCpuArray::new();

#[btf_map]
pub static OVL_PROTECTED: HashMap<ProtectedKey, Protected, { capacity::PROTECTED as usize }> =
    HashMap::new();

/// The drop monitor's events (`overlay_common::monitor`), read by the agent.
#[btf_map]
pub static OVL_DROP_EVENTS: RingBuf<DropEvent, { RING_BYTES as usize }> = RingBuf::new();

/// Whether drops are reported, and at what rate; written by the agent.
#[btf_map]
pub static OVL_MONITOR: Array<MonitorConfig, 1> = Array::new();

/// Each CPU's budget of drop events, and the events it skipped.
#[btf_map]
pub static OVL_DROP_BUDGET: PerCpuArray<DropBudget, 1> = PerCpuArray::new();

/// Whether containers may not reach `addr:port` over `protocol`.
#[inline(always)]
pub fn is_protected(addr: Addr16, port: u16, protocol: u8) -> bool {
    OVL_PROTECTED
        .get_ptr(ProtectedKey::new(addr, port, protocol))
        .is_some()
}

/// Masquerade settings, once the agent has written them (a port range is never empty).
#[inline(always)]
pub fn nat_config() -> Option<&'static NatConfig> {
    OVL_NAT_CONFIG
        .get(0)
        .filter(|c| c.port_min != 0 && c.port_min <= c.port_max)
}

/// Whether network (id) `network` masquerades traffic leaving the overlay.
#[inline(always)]
pub fn masquerades(network: u32) -> bool {
    // SAFETY: entries are replaced whole.
    unsafe { OVL_NETWORKS.get(NetworkKey::new(network)) }
        .is_some_and(|n| n.flags & overlay_common::maps::Network::FLAG_MASQUERADE != 0)
}

/// The agent's configuration, once it has written one.
#[inline(always)]
pub fn config() -> Option<&'static AgentConfig> {
    OVL_CONFIG
        .get(0)
        .filter(|c| c.flags & AgentConfig::FLAG_READY != 0)
}

/// The local endpoint with this address.
#[inline(always)]
pub fn endpoint(addr: Addr16) -> Option<&'static Endpoint> {
    // SAFETY: the agent replaces entries whole (map update), never writes into them in place.
    unsafe { OVL_ENDPOINTS.get(EndpointKey { addr }) }
}

/// The remote agent subnet containing this address.
#[inline(always)]
pub fn route(addr: Addr16) -> Option<&'static RemoteRoute> {
    OVL_ROUTES.get(&Key::new(128, addr))
}

/// The overlay subnet containing this address.
#[inline(always)]
pub fn overlay_subnet(addr: Addr16) -> Option<&'static OverlaySubnet> {
    OVL_SUBNETS.get(&Key::new(128, addr))
}

/// Whether this underlay address is a known agent's.
#[inline(always)]
pub fn is_known_vtep(underlay_ip: Addr16) -> bool {
    OVL_VTEPS.get_ptr(VtepKey { underlay_ip }).is_some()
}

/// The cached next hop of the VTEP `route` goes to, while the agent's confirmation of it holds.
#[inline(always)]
pub fn next_hop(route: &RemoteRoute) -> Option<&'static NextHop> {
    if route.next_hop == 0 {
        return None;
    }
    let hop = OVL_NEXT_HOPS.get(route.next_hop)?;
    // A slot given back and given to another VTEP between the route's lookup and this one (the
    // agent removes a VTEP's routes before the VTEP, so only then) holds another VTEP's hop.
    if !is_hop_of(hop, route) {
        return None;
    }
    // SAFETY: plain helper call (the coarse clock: a tick's precision is plenty for an expiry
    // seconds away, and it costs a memory read, not a clock read).
    let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns() };
    hop.is_fresh(now).then_some(hop)
}

/// Whether `hop` is the entry of the VTEP `route` goes to, comparing the addresses four bytes at
/// a time: as `[u8; 16]` LLVM compares them byte by byte (32 loads), for it cannot know that
/// they are aligned.
#[inline(always)]
fn is_hop_of(hop: &NextHop, route: &RemoteRoute) -> bool {
    let a = hop.vtep.as_ptr().cast::<u32>();
    let b = route.underlay_ip.as_ptr().cast::<u32>();
    // SAFETY: both fields lie at offsets that are multiples of 4 in structs aligned to at least
    // 4 (asserted below), so each of the four u32 reads is aligned and inside its field.
    unsafe {
        a.read() == b.read()
            && a.add(1).read() == b.add(1).read()
            && a.add(2).read() == b.add(2).read()
            && a.add(3).read() == b.add(3).read()
    }
}

const _: () = {
    use core::mem::{align_of, offset_of};
    assert!(align_of::<NextHop>() >= 4 && offset_of!(NextHop, vtep) % 4 == 0);
    assert!(align_of::<RemoteRoute>() >= 4 && offset_of!(RemoteRoute, underlay_ip) % 4 == 0);
};

/// What VNI `vni` carries, if VXLAN is accepted in it.
#[inline(always)]
pub fn wire_vni(vni: u32) -> Option<&'static WireVni> {
    // SAFETY: entries are replaced whole.
    unsafe { OVL_VNIS.get(VniKey::new(vni)) }
}
