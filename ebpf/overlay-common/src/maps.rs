//! Map names, keys and values shared by the programs and the agent's map façade.
//!
//! Addresses are 16 bytes everywhere: IPv6 as is, IPv4 as an IPv4-mapped IPv6 address
//! (`::ffff:a.b.c.d`), so the IPv6 datapath is an addition and not a layout change. All multi-byte
//! address fields are in network order; numbers (VNI, ifindex, port) are in host order.
//!
//! Changing any type here changes [`MAP_LAYOUT_VERSION`], which is part of every pin path.

/// Version of the layout of every map below. Part of the pin path, so an agent of another layout
/// version never reuses (and misreads) pinned maps of this one.
pub const MAP_LAYOUT_VERSION: u32 = 2;

/// Map names, as they appear in the object file, in `bpftool map` and under the pin directory.
pub mod names {
    pub const CONFIG: &str = "OVL_CONFIG";
    pub const ENDPOINTS: &str = "OVL_ENDPOINTS";
    pub const ROUTES: &str = "OVL_ROUTES";
    pub const SUBNETS: &str = "OVL_SUBNETS";
    pub const VTEPS: &str = "OVL_VTEPS";
    pub const NETWORKS: &str = "OVL_NETWORKS";
    pub const STATS: &str = "OVL_STATS";
    pub const NAT: &str = "OVL_NAT";
    pub const NAT_CONFIG: &str = "OVL_NAT_CONFIG";
    pub const PROTECTED: &str = "OVL_PROTECTED";
    pub const NAT_QUOTA: &str = "OVL_NAT_QUOTA";

    /// Every map the agent pins.
    pub const ALL: &[&str] = &[
        CONFIG, ENDPOINTS, ROUTES, SUBNETS, VTEPS, NETWORKS, STATS, NAT, NAT_CONFIG, PROTECTED,
        NAT_QUOTA,
    ];
}

/// Program names in the object file.
pub mod programs {
    /// TC ingress of a container's host-side veth: traffic leaving a container.
    pub const FROM_CONTAINER: &str = "from_container";
    /// TC ingress of the underlay NIC: VXLAN from other agents.
    pub const FROM_UNDERLAY: &str = "from_underlay";
    /// TC ingress of `ovl-net`, the far end of the host's link into the overlay: the host's
    /// own traffic to containers.
    pub const FROM_HOST: &str = "from_host";
    /// XDP on the underlay NIC: early drops of VXLAN `from_underlay` would drop anyway.
    pub const XDP_UNDERLAY: &str = "xdp_underlay";
}

/// The host's link into the overlay: a veth pair in the agent's namespace. Routes to every
/// overlay subnet point at [`HOST_LINK`]; the datapath sits on the ingress of its peer
/// [`HOST_LINK_PEER`], whose MAC the agent fixes to [`HOST_LINK_PEER_MAC`] so that the programs
/// need no configuration to answer the host's ARP.
pub const HOST_LINK: &str = "ovl-host";
pub const HOST_LINK_PEER: &str = "ovl-net";
pub const HOST_LINK_PEER_MAC: [u8; 6] = [0x02, 0xeb, 0x0f, 0x00, 0x00, 0x01];

/// Capacity of each map (entries). Sized for thousands of agents and a few hundred local
/// endpoints; the agent can override them at load time.
pub mod capacity {
    pub const ENDPOINTS: u32 = 4096;
    pub const ROUTES: u32 = 65536;
    pub const SUBNETS: u32 = 1024;
    pub const VTEPS: u32 = 16384;
    pub const NETWORKS: u32 = 1024;
    pub const STATS: u32 = 16384;
    /// Connection-tracking entries (two per masqueraded flow), LRU-evicted when full.
    pub const NAT: u32 = 131072;
    /// Live masqueraded flows per container and destination (LRU: a lost count only loosens the
    /// quota until the agent's next recount).
    pub const NAT_QUOTA: u32 = 65536;
    /// Control-plane destinations containers may not reach.
    pub const PROTECTED: u32 = 256;
}

/// A 16-byte address (IPv6, or IPv4-mapped IPv6), network order.
pub type Addr16 = [u8; 16];

/// The IPv4-mapped form of an IPv4 address given in network-order bytes.
pub const fn ipv4_mapped(v4: [u8; 4]) -> Addr16 {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// The IPv4 address inside an IPv4-mapped address, if it is one.
pub const fn ipv4_unmapped(a: &Addr16) -> Option<[u8; 4]> {
    if a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
    {
        Some([a[12], a[13], a[14], a[15]])
    } else {
        None
    }
}

/// Prefix length of an IPv4 prefix inside the 128-bit IPv4-mapped space.
pub const fn ipv4_mapped_prefix_len(v4_prefix_len: u8) -> u32 {
    96 + v4_prefix_len as u32
}

/// `OVL_CONFIG[0]`: this agent's own datapath settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentConfig {
    /// This agent's underlay address: the outer source of the VXLAN packets it sends.
    pub underlay_ip: Addr16,
    /// ifindex of the underlay NIC that VXLAN leaves through.
    pub underlay_ifindex: u32,
    /// This agent's VTEP MAC: inner source MAC of encapsulated frames (DC/OS wire format).
    pub vtep_mac: [u8; 6],
    /// VXLAN UDP destination port (DC/OS: 64000).
    pub vxlan_port: u16,
    /// Largest inner IP packet the overlay carries (container MTU); larger ones are dropped and
    /// counted instead of being fragmented by the VTEP (RFC 7348).
    pub overlay_mtu: u32,
    /// [`AgentConfig::FLAG_READY`] once the agent has written the config.
    pub flags: u32,
}

impl AgentConfig {
    pub const FLAG_READY: u32 = 1;
}

/// Key of `OVL_ENDPOINTS`: a local container's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub addr: Addr16,
}

/// Value of `OVL_ENDPOINTS`: how to reach a local container and which network it is on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// ifindex of the container's host-side veth.
    pub ifindex: u32,
    /// The network (VNI) the container is attached to.
    pub vni: u32,
    /// The container's own MAC: the only source MAC it may send with, and the destination MAC of
    /// frames delivered to it.
    pub mac: [u8; 6],
    /// MAC of the host-side veth: the container's gateway MAC and the source MAC of frames
    /// delivered to it.
    pub gateway_mac: [u8; 6],
    pub flags: u32,
    pub _pad: u32,
}

impl Endpoint {
    /// The host itself, at this network's gateway address, behind the host link: frames to it
    /// are sent out of the host link's peer (`bpf_redirect`), not into another namespace.
    pub const FLAG_HOST: u32 = 1;
}

/// Value of `OVL_ROUTES`: an agent subnet on another agent. `OVL_ROUTES` and `OVL_SUBNETS` are LPM
/// tries keyed by aya's `Key<Addr16>` (`prefix_len` in bits over the 128-bit address: IPv4 prefixes
/// are `96 + len`, see [`ipv4_mapped_prefix_len`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteRoute {
    /// Underlay address of the agent that owns the subnet: outer destination.
    pub underlay_ip: Addr16,
    /// That agent's VTEP MAC: inner destination MAC (DC/OS wire format).
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Network the subnet belongs to: the VNI the frame is sent with.
    pub vni: u32,
    pub flags: u32,
}

/// Value of `OVL_SUBNETS`: a whole overlay subnet. A destination inside one of these but with no
/// endpoint or route is dropped; a destination outside all of them is left to the host stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverlaySubnet {
    pub vni: u32,
    pub flags: u32,
}

/// Key of `OVL_VTEPS`: the underlay address of a known agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VtepKey {
    pub underlay_ip: Addr16,
}

/// Value of `OVL_VTEPS`: what we know of another agent's VTEP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vtep {
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The agent's VTEP IPv4 address (network order), for diagnostics.
    pub vtep_ip: [u8; 4],
}

/// Key of `OVL_NETWORKS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkKey {
    pub vni: u32,
}

/// Value of `OVL_NETWORKS`: a virtual network this agent takes part in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Network {
    pub flags: u32,
    pub _pad: u32,
}

impl Network {
    /// Traffic from this network to outside every overlay is masqueraded.
    pub const FLAG_MASQUERADE: u32 = 1;
}

/// Direction of a [`NatKey`].
pub mod nat_direction {
    /// Container -> outside, keyed by the original tuple.
    pub const EGRESS: u8 = 0;
    /// Outside -> agent, keyed by the translated tuple.
    pub const INGRESS: u8 = 1;
}

/// Key of `OVL_NAT`: one direction of one masqueraded flow. ICMP echo uses the identifier as the
/// local port and 0 as the remote port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NatKey {
    /// The far end (outside the overlay).
    pub remote: Addr16,
    /// Egress: the container's address. Ingress: the agent's underlay address.
    pub local: Addr16,
    pub remote_port: u16,
    /// Egress: the container's port. Ingress: the port allocated for the flow.
    pub local_port: u16,
    pub protocol: u8,
    /// [`nat_direction`].
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// Value of `OVL_NAT`: what the local end of the tuple is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    /// Egress: the underlay address. Ingress: the container's address.
    pub addr: Addr16,
    /// Egress: the allocated port. Ingress: the container's port.
    pub port: u16,
    /// [`NatEntry::FLAG_CLOSING`].
    pub flags: u16,
    /// The container's network.
    pub vni: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last packet in either direction.
    pub last_seen_ns: u64,
}

impl NatEntry {
    /// A TCP flow that has seen FIN or RST: it expires after the short closing timeout.
    pub const FLAG_CLOSING: u16 = 1;
    /// TCP handshake as masquerade saw it (`overlay_common::nat::tcp_track`): the container's SYN
    /// went out, the far end's SYN-ACK came back, the container's ACK completed it. Until then
    /// the entry lives for the short handshake timeout, not the established one.
    pub const FLAG_SYN_SENT: u16 = 2;
    pub const FLAG_SYN_ACKED: u16 = 4;
    pub const FLAG_ESTABLISHED: u16 = 8;
}

/// `OVL_NAT_CONFIG[0]`: masquerade settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatConfig {
    /// Ports handed out to masqueraded flows (inclusive); disjoint from the host's ephemeral
    /// range so the host's own connections never collide with ours.
    pub port_min: u16,
    pub port_max: u16,
    /// Ports tried (linear probing) before a flow is refused (`drop_nat_no_port`).
    pub max_probes: u32,
    /// Established TCP (handshake seen both ways).
    pub tcp_timeout_s: u32,
    pub tcp_closing_timeout_s: u32,
    pub udp_timeout_s: u32,
    pub icmp_timeout_s: u32,
    /// TCP that never completed a handshake (a bare ACK, a SYN without answer).
    pub tcp_handshake_timeout_s: u32,
    /// Live flows one container may have towards one destination (address, port, protocol);
    /// 0: no limit. Over it, new flows are dropped (`drop_nat_quota`).
    pub max_flows_per_destination: u32,
    /// The underlay network's directed broadcast address (network order; zeros if unknown):
    /// never a masquerade destination, like loopback, multicast and the limited broadcast.
    pub underlay_broadcast: [u8; 4],
    pub _pad: u32,
}

/// Key of `OVL_NAT_QUOTA`: one container's flows towards one destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NatQuotaKey {
    pub container: Addr16,
    pub remote: Addr16,
    pub remote_port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

impl NatQuotaKey {
    /// The quota key of an egress `NatKey` (container = its local end).
    pub const fn of_egress(key: &NatKey) -> NatQuotaKey {
        NatQuotaKey {
            container: key.local,
            remote: key.remote,
            remote_port: key.remote_port,
            protocol: key.protocol,
            _pad: 0,
        }
    }
}

/// Value of `OVL_NAT_QUOTA`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatQuota {
    /// Live (not closing) flows.
    pub flows: u32,
    pub _pad: u32,
}

/// Key of `OVL_PROTECTED`: a destination containers may not reach (the master's API, an agent's
/// control port). [`ProtectedKey::ANY_AGENT`] as the address stands for every agent's addresses:
/// this agent's underlay address and gateways, and every known VTEP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProtectedKey {
    pub addr: Addr16,
    /// Destination port (host order).
    pub port: u16,
    /// IP protocol (TCP or UDP).
    pub protocol: u8,
    pub _pad: u8,
}

impl ProtectedKey {
    pub const ANY_AGENT: Addr16 = [0; 16];

    pub const fn new(addr: Addr16, port: u16, protocol: u8) -> ProtectedKey {
        ProtectedKey {
            addr,
            port,
            protocol,
            _pad: 0,
        }
    }
}

/// Value of `OVL_PROTECTED` (its presence is the rule; the flags are for later policies).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Protected {
    pub flags: u32,
}

/// Key of `OVL_STATS` (per-CPU): one counter of one network.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StatKey {
    /// The network, or [`crate::counters::NO_NETWORK`].
    pub vni: u32,
    /// A [`crate::counters::Counter`] value.
    pub counter: u32,
}

/// Value of `OVL_STATS` (per-CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stat {
    pub packets: u64,
    pub bytes: u64,
}

// Layouts are part of the on-disk (pinned) contract: pin them down.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<AgentConfig>() == 36);
    assert!(size_of::<EndpointKey>() == 16);
    assert!(size_of::<Endpoint>() == 28);
    assert!(size_of::<RemoteRoute>() == 32);
    assert!(size_of::<OverlaySubnet>() == 8);
    assert!(size_of::<VtepKey>() == 16);
    assert!(size_of::<Vtep>() == 12);
    assert!(size_of::<NetworkKey>() == 4);
    assert!(size_of::<Network>() == 8);
    assert!(size_of::<StatKey>() == 8);
    assert!(size_of::<Stat>() == 16);
    assert!(size_of::<NatKey>() == 40);
    assert!(size_of::<NatEntry>() == 32);
    assert!(size_of::<NatConfig>() == 40);
    assert!(size_of::<NatQuotaKey>() == 36);
    assert!(size_of::<NatQuota>() == 8);
    assert!(size_of::<ProtectedKey>() == 20);
    assert!(size_of::<Protected>() == 4);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] plain data with no implicit padding (checked by the
    // size asserts above), so every byte pattern is a valid value.
    unsafe impl aya::Pod for AgentConfig {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for RemoteRoute {}
    unsafe impl aya::Pod for OverlaySubnet {}
    unsafe impl aya::Pod for VtepKey {}
    unsafe impl aya::Pod for Vtep {}
    unsafe impl aya::Pod for NetworkKey {}
    unsafe impl aya::Pod for Network {}
    unsafe impl aya::Pod for StatKey {}
    unsafe impl aya::Pod for Stat {}
    unsafe impl aya::Pod for NatKey {}
    unsafe impl aya::Pod for NatEntry {}
    unsafe impl aya::Pod for NatConfig {}
    unsafe impl aya::Pod for ProtectedKey {}
    unsafe impl aya::Pod for NatQuotaKey {}
    unsafe impl aya::Pod for NatQuota {}
    unsafe impl aya::Pod for Protected {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapping_round_trips() {
        let a = ipv4_mapped([9, 0, 1, 2]);
        assert_eq!(ipv4_unmapped(&a), Some([9, 0, 1, 2]));
        let v6 = [0xfd, 1, 0, 0xb, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(ipv4_unmapped(&v6), None);
        assert_eq!(ipv4_mapped_prefix_len(24), 120);
    }

    #[test]
    fn no_implicit_padding() {
        // Sum of field sizes equals the struct size: no hidden bytes a hash lookup could miss on.
        assert_eq!(size_of::<Endpoint>(), 4 + 4 + 6 + 6 + 4 + 4);
        assert_eq!(size_of::<AgentConfig>(), 16 + 4 + 6 + 2 + 4 + 4);
        assert_eq!(size_of::<RemoteRoute>(), 16 + 6 + 2 + 4 + 4);
    }
}
