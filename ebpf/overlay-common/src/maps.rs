//! Map names, keys and values shared by the programs and the agent's map façade.
//!
//! Addresses are 16 bytes everywhere: IPv6 as is, IPv4 as an IPv4-mapped IPv6 address
//! (`::ffff:a.b.c.d`), so the IPv6 datapath is an addition and not a layout change. All multi-byte
//! address fields are in network order; numbers (VNI, ifindex, port) are in host order.
//!
//! A network is named in the maps by its *network id* (`network` fields), which isolation and
//! counters key on; the *VNI* is only what its frames carry on the wire. By default every network
//! shares VNI [`SHARED_VNI`] (DC/OS's scheme), so a decapsulated packet's network comes from its
//! addresses (the route its source lies in, the endpoint it goes to), never from the VNI.
//!
//! Changing any type here changes [`MAP_LAYOUT_VERSION`], which is part of every pin path.

/// Version of the layout of every map below. Part of the pin path, so an agent of another layout
/// version never reuses (and misreads) pinned maps of this one.
/// v3: networks have an id apart from their VNI (routes carry both; `OVL_VNIS` says which VNIs
/// are accepted), `NatConfig` has the underlay's IPv6 address, and `OVL_TAIL_CALLS` has more
/// slots.
/// v4: counters live in a per-CPU array (`OVL_STATS`, indexed by [`stat_index`]) instead of a
/// per-CPU hash; each network has a counter slot (`OVL_NET_SLOTS`), which endpoints and routes
/// carry so the fast paths count without a lookup.
/// v5: `OVL_NEXT_HOPS` is an array indexed by each remote VTEP's next-hop slot, which the VTEP
/// and the routes through it carry ([`Vtep::next_hop`], [`RemoteRoute::next_hop`]), so
/// encapsulation finds the cached next hop without a hash lookup.
pub const MAP_LAYOUT_VERSION: u32 = 5;

/// The VNI every network's frames carry unless the network has its own (DC/OS: `vtep1024`).
pub const SHARED_VNI: u32 = 1024;

/// Map names, as they appear in the object file, in `bpftool map` and under the pin directory.
pub mod names {
    pub const CONFIG: &str = "OVL_CONFIG";
    pub const ENDPOINTS: &str = "OVL_ENDPOINTS";
    pub const ROUTES: &str = "OVL_ROUTES";
    pub const SUBNETS: &str = "OVL_SUBNETS";
    pub const VTEPS: &str = "OVL_VTEPS";
    pub const NETWORKS: &str = "OVL_NETWORKS";
    pub const STATS: &str = "OVL_STATS";
    /// Network id -> counter slot of `OVL_STATS` (written by the agent's map façade).
    pub const NET_SLOTS: &str = "OVL_NET_SLOTS";
    pub const NAT: &str = "OVL_NAT";
    pub const NAT_CONFIG: &str = "OVL_NAT_CONFIG";
    pub const PROTECTED: &str = "OVL_PROTECTED";
    pub const NAT_QUOTA: &str = "OVL_NAT_QUOTA";
    pub const VNIS: &str = "OVL_VNIS";
    pub const NEXT_HOPS: &str = "OVL_NEXT_HOPS";
    /// The program array of [`super::tail_calls`]. Pinned like the rest: the kernel empties a
    /// program array when no file refers to it any more, which would cut the pinned programs off
    /// their tail calls while no agent runs.
    pub const TAIL_CALLS: &str = "OVL_TAIL_CALLS";
    /// The drop monitor ([`crate::monitor`]): its ring buffer of events, its switch and rate,
    /// and each CPU's budget of events. Pinned so that the agent's monitor reads them off the
    /// owner thread, and tools can see whether it is on.
    pub const DROP_EVENTS: &str = "OVL_DROP_EVENTS";
    pub const MONITOR: &str = "OVL_MONITOR";
    pub const DROP_BUDGET: &str = "OVL_DROP_BUDGET";

    /// Every map the agent pins.
    pub const ALL: &[&str] = &[
        CONFIG,
        ENDPOINTS,
        ROUTES,
        SUBNETS,
        VTEPS,
        NETWORKS,
        STATS,
        NET_SLOTS,
        NAT,
        NAT_CONFIG,
        PROTECTED,
        NAT_QUOTA,
        TAIL_CALLS,
        VNIS,
        NEXT_HOPS,
        DROP_EVENTS,
        MONITOR,
        DROP_BUDGET,
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
    /// A container's IPv6, tail-called from `from_container` (its own stack: both families in
    /// one program exceed the verifier's 512 bytes). Loaded, never attached.
    pub const FROM_CONTAINER_IPV6: &str = "from_container_ipv6";
    /// The host's IPv6, tail-called from `from_host` likewise.
    pub const FROM_HOST_IPV6: &str = "from_host_ipv6";
    /// IPv6 on the underlay NIC, tail-called from `from_underlay`: VXLAN in outer IPv6 (an
    /// IPv6 underlay) and replies to IPv6 masquerade.
    pub const FROM_UNDERLAY_IPV6: &str = "from_underlay_ipv6";
    /// A container's IPv4 leaving the overlay, masqueraded; tail-called from `from_container`
    /// (the flow table's work beside both underlays' encap exceeds 512 bytes of stack).
    pub const MASQUERADE_IPV4: &str = "masquerade_ipv4";
    /// A container's IPv6 to masquerade, tail-called from `from_container_ipv6` (masquerade on
    /// top of the IPv6 checks exceeds one program's stack).
    pub const MASQUERADE_IPV6: &str = "masquerade_ipv6";
    /// XDP on the underlay NIC: early drops of VXLAN `from_underlay` would drop anyway.
    pub const XDP_UNDERLAY: &str = "xdp_underlay";
}

/// `OVL_TAIL_CALLS`, the programs `from_container` tail-calls into: each load of the object puts
/// its own programs into the slots, so a restart swaps them with the rest.
pub mod tail_calls {
    pub const MAP: &str = super::names::TAIL_CALLS;
    /// Slot of [`super::programs::FROM_CONTAINER_IPV6`].
    pub const CONTAINER_IPV6: u32 = 0;
    /// Slot of [`super::programs::FROM_HOST_IPV6`].
    pub const HOST_IPV6: u32 = 1;
    /// Slot of [`super::programs::FROM_UNDERLAY_IPV6`].
    pub const UNDERLAY_IPV6: u32 = 2;
    /// Slot of [`super::programs::MASQUERADE_IPV4`].
    pub const MASQUERADE_IPV4: u32 = 3;
    /// Slot of [`super::programs::MASQUERADE_IPV6`].
    pub const MASQUERADE_IPV6: u32 = 4;
    pub const SLOTS: u32 = 5;
    /// Every slot and the program that goes into it.
    pub const ALL: &[(u32, &str)] = &[
        (CONTAINER_IPV6, super::programs::FROM_CONTAINER_IPV6),
        (HOST_IPV6, super::programs::FROM_HOST_IPV6),
        (UNDERLAY_IPV6, super::programs::FROM_UNDERLAY_IPV6),
        (MASQUERADE_IPV4, super::programs::MASQUERADE_IPV4),
        (MASQUERADE_IPV6, super::programs::MASQUERADE_IPV6),
    ];
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
    /// One cached next hop per remote VTEP, at its next-hop slot (slot 0 is none: one more).
    pub const NEXT_HOPS: u32 = VTEPS + 1;
    pub const NETWORKS: u32 = 1024;
    pub const VNIS: u32 = 1024;
    /// Counter slots (networks with counters of their own; slot 0 is no network's).
    pub const STAT_SLOTS: u32 = 256;
    /// `OVL_STATS` entries: every counter id of every slot.
    pub const STATS: u32 = STAT_SLOTS * super::STAT_COUNTERS_PER_SLOT;
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
    // One 128-bit value, not sixteen bytes: LLVM would merge the ten zero bytes into a `memset`,
    // which the eBPF build (bpf-linker) cannot expand inline and calls as a byte-at-a-time
    // subprogram, on every lookup by an IPv4 address.
    ((0xffff_u128 << 32) | u32::from_be_bytes(v4) as u128).to_be_bytes()
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
    IPV4_MAPPED_PREFIX_LEN + v4_prefix_len as u32
}

/// Bits of the IPv4-mapped space (`::ffff:0:0/96`) in front of the IPv4 address.
const IPV4_MAPPED_PREFIX_LEN: u32 = 96;

/// The LPM-trie prefix length (bits over the 128-bit map address) of a prefix of `len` bits in
/// the family of `addr`: IPv4-mapped addresses count from the mapped /96, IPv6 ones as they are.
pub const fn lpm_prefix_len(addr: &Addr16, len: u8) -> u32 {
    if ipv4_unmapped(addr).is_some() {
        ipv4_mapped_prefix_len(len)
    } else {
        len as u32
    }
}

/// The inverse of [`lpm_prefix_len`]: the prefix length in the address's own family of an
/// LPM-trie prefix length (a mapped prefix shorter than /96 reads as /0).
pub const fn family_prefix_len(addr: &Addr16, lpm_len: u32) -> u8 {
    let len = if ipv4_unmapped(addr).is_some() {
        lpm_len.saturating_sub(IPV4_MAPPED_PREFIX_LEN)
    } else {
        lpm_len
    };
    if len > 128 { 128 } else { len as u8 }
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
    /// [`AgentConfig::FLAG_READY`] once the agent has written the config;
    /// [`AgentConfig::FLAG_SPARE_HEADROOM`] when the underlay NIC reserves link-layer headroom.
    pub flags: u32,
}

impl AgentConfig {
    pub const FLAG_READY: u32 = 1;
    /// The underlay NIC reserves headroom of its own in front of each frame (virtio_net,
    /// hv_netvsc, ...: a bus device, not a software link): encapsulation grows a packet without
    /// headroom once by enough for both, not twice (`encap::reserve_headroom`).
    pub const FLAG_SPARE_HEADROOM: u32 = 2;
}

/// Key of `OVL_ENDPOINTS`: a local container's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub addr: Addr16,
}

impl EndpointKey {
    pub const fn new(addr: Addr16) -> EndpointKey {
        EndpointKey { addr }
    }
}

/// Value of `OVL_ENDPOINTS`: how to reach a local container and which network it is on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// ifindex of the container's host-side veth.
    pub ifindex: u32,
    /// The network id of the network the container is attached to.
    pub network: u32,
    /// The container's own MAC: the only source MAC it may send with, and the destination MAC of
    /// frames delivered to it.
    pub mac: [u8; 6],
    /// MAC of the host-side veth: the container's gateway MAC and the source MAC of frames
    /// delivered to it.
    pub gateway_mac: [u8; 6],
    pub flags: u32,
    /// The counter slot of `network` (`OVL_NET_SLOTS`), so that delivery counts without a
    /// lookup. Filled by the map façade on write (constructors leave it 0: no network's).
    pub slot: u32,
}

impl Endpoint {
    /// The host itself, at this network's gateway address, behind the host link: frames to it
    /// are sent out of the host link's peer (`bpf_redirect`), not into another namespace.
    pub const FLAG_HOST: u32 = 1;

    /// A container on network `network` behind its host-side veth `ifindex` (whose MAC,
    /// `gateway_mac`, is the container's gateway MAC).
    pub const fn container(
        ifindex: u32,
        network: u32,
        mac: [u8; 6],
        gateway_mac: [u8; 6],
    ) -> Endpoint {
        Endpoint {
            ifindex,
            network,
            mac,
            gateway_mac,
            flags: 0,
            slot: 0,
        }
    }

    /// The host at network `network`'s gateway address: reached out of the host link's peer
    /// (`peer_ifindex`), towards the host link's own MAC `host_mac`; frames to it come from
    /// [`HOST_LINK_PEER_MAC`], the MAC the host's ARP for container addresses resolves to.
    pub const fn host(peer_ifindex: u32, network: u32, host_mac: [u8; 6]) -> Endpoint {
        Endpoint {
            ifindex: peer_ifindex,
            network,
            mac: host_mac,
            gateway_mac: HOST_LINK_PEER_MAC,
            flags: Endpoint::FLAG_HOST,
            slot: 0,
        }
    }

    /// Whether this is the host's endpoint ([`Endpoint::host`]), not a container's.
    pub const fn is_host(&self) -> bool {
        self.flags & Endpoint::FLAG_HOST != 0
    }
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
    /// The counter slot of `network`, as in [`Endpoint::slot`].
    pub slot: u16,
    /// Network id of the network the subnet belongs to: a packet from a container of another
    /// network is never sent there, and a decapsulated packet from this subnet is of this network.
    pub network: u32,
    /// The VNI frames of that network carry on the wire ([`SHARED_VNI`] unless the network has
    /// its own): written by encapsulation, and the only one decapsulation accepts from the subnet.
    pub vni: u32,
    /// The next-hop slot of the VTEP at `underlay_ip` ([`Vtep::next_hop`]): where its cached next
    /// hop lies in `OVL_NEXT_HOPS`. 0: none (the kernel's lookup addresses the frame). Written by
    /// the map façade, like `slot`.
    pub next_hop: u32,
}

impl RemoteRoute {
    /// A subnet of network `network` (whose frames carry `vni`) on the agent at `underlay_ip`
    /// whose VTEP MAC is `vtep_mac`.
    pub const fn new(
        underlay_ip: Addr16,
        vtep_mac: [u8; 6],
        network: u32,
        vni: u32,
    ) -> RemoteRoute {
        RemoteRoute {
            underlay_ip,
            vtep_mac,
            slot: 0,
            network,
            vni,
            next_hop: 0,
        }
    }
}

/// Value of `OVL_SUBNETS`: a whole overlay subnet. A destination inside one of these but with no
/// endpoint or route is dropped; a destination outside all of them is left to the host stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverlaySubnet {
    /// Network id.
    pub network: u32,
    pub flags: u32,
}

impl OverlaySubnet {
    /// The whole subnet of network `network`.
    pub const fn new(network: u32) -> OverlaySubnet {
        OverlaySubnet { network, flags: 0 }
    }
}

/// Key of `OVL_VTEPS`: the underlay address of a known agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VtepKey {
    pub underlay_ip: Addr16,
}

impl VtepKey {
    pub const fn new(underlay_ip: Addr16) -> VtepKey {
        VtepKey { underlay_ip }
    }
}

/// Value of `OVL_VTEPS`: what we know of another agent's VTEP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vtep {
    pub vtep_mac: [u8; 6],
    /// This VTEP's next-hop slot, the index of its entry in `OVL_NEXT_HOPS` (0: none yet), given
    /// by the map façade when it first writes the VTEP and taken back when it removes it.
    pub next_hop: u16,
    /// The agent's VTEP IPv4 address (network order), for diagnostics.
    pub vtep_ip: [u8; 4],
}

impl Vtep {
    pub const fn new(vtep_mac: [u8; 6], vtep_ip: [u8; 4]) -> Vtep {
        Vtep {
            vtep_mac,
            next_hop: 0,
            vtep_ip,
        }
    }
}

/// Value of `OVL_NEXT_HOPS` (an array indexed by the VTEP's next-hop slot, [`Vtep::next_hop`]):
/// the underlay next hop towards a remote VTEP as the kernel's own route and neighbour entry
/// have it, mirrored by the agent so that encapsulation can address the frame itself and
/// `bpf_redirect` it, without the kernel's route and neighbour lookup after the program
/// (`bpf_redirect_neigh`). The agent rewrites every entry
/// on each route, neighbour or link change it hears of, and at least every few seconds; an entry
/// it has not confirmed by `expires_ns` is not used (the agent stopped or is stuck), so a stale
/// MAC outlives the agent by seconds at most, and the kernel's lookup takes over.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// The device the route leaves by (the underlay NIC).
    pub ifindex: u32,
    /// The neighbour's MAC (the gateway's, or the VTEP's own on the same link).
    pub dst_mac: [u8; 6],
    /// The device's own MAC.
    pub src_mac: [u8; 6],
    /// `CLOCK_MONOTONIC` (coarse, as `bpf_ktime_get_coarse_ns`) after which the entry is stale.
    pub expires_ns: u64,
    /// The underlay address of the VTEP the entry is for, written by the map façade with it: a
    /// route is only ever sent by the entry of its own VTEP, even while a slot given back is
    /// given to another VTEP.
    pub vtep: Addr16,
}

impl NextHop {
    /// The next hop (its VTEP is filled in by whoever writes it at the VTEP's slot).
    pub const fn new(ifindex: u32, dst_mac: [u8; 6], src_mac: [u8; 6], expires_ns: u64) -> Self {
        NextHop {
            ifindex,
            dst_mac,
            src_mac,
            expires_ns,
            vtep: [0; 16],
        }
    }

    /// Whether the agent's confirmation still holds at `now_ns` (same clock as `expires_ns`).
    pub const fn is_fresh(&self, now_ns: u64) -> bool {
        now_ns < self.expires_ns && self.ifindex != 0
    }
}

/// Key of `OVL_NETWORKS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkKey {
    /// Network id.
    pub network: u32,
}

impl NetworkKey {
    pub const fn new(network: u32) -> NetworkKey {
        NetworkKey { network }
    }
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

    /// A network this agent takes part in, masquerading its traffic to the outside or not.
    pub const fn new(masquerade: bool) -> Network {
        Network {
            flags: if masquerade {
                Network::FLAG_MASQUERADE
            } else {
                0
            },
            _pad: 0,
        }
    }

    pub const fn masquerades(&self) -> bool {
        self.flags & Network::FLAG_MASQUERADE != 0
    }
}

/// Key of `OVL_VNIS`: a VNI this agent accepts VXLAN frames in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VniKey {
    pub vni: u32,
}

impl VniKey {
    pub const fn new(vni: u32) -> VniKey {
        VniKey { vni }
    }
}

/// Value of `OVL_VNIS`: which networks a VNI carries. It never decides a packet's network (its
/// addresses do); it only attributes the drops that happen before the inner packet is read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireVni {
    /// The network id of the only network on this VNI, or [`crate::counters::NO_NETWORK`] when
    /// several networks share it.
    pub network: u32,
    pub flags: u32,
}

impl WireVni {
    /// A VNI carrying exactly the networks `networks` (ids).
    pub fn carrying(networks: &[u32]) -> WireVni {
        WireVni {
            network: match networks {
                [only] => *only,
                _ => crate::counters::NO_NETWORK,
            },
            flags: 0,
        }
    }
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

impl NatKey {
    /// The egress key of a flow, from the container's packet as it left the container
    /// (source: the container, destination: the far end).
    pub const fn egress(
        protocol: u8,
        container: Addr16,
        container_port: u16,
        remote: Addr16,
        remote_port: u16,
    ) -> NatKey {
        NatKey {
            remote,
            local: container,
            remote_port,
            local_port: container_port,
            protocol,
            direction: nat_direction::EGRESS,
            _pad: [0; 2],
        }
    }

    /// The ingress key of a flow, from the far end's answer as it reaches this agent (source:
    /// the far end, destination: the underlay address and the port allocated for the flow).
    pub const fn ingress(
        protocol: u8,
        remote: Addr16,
        remote_port: u16,
        underlay: Addr16,
        port: u16,
    ) -> NatKey {
        NatKey {
            remote,
            local: underlay,
            remote_port,
            local_port: port,
            protocol,
            direction: nat_direction::INGRESS,
            _pad: [0; 2],
        }
    }

    /// The key of the other direction of this key's flow, whose `entry` this key maps to: the
    /// local end becomes what the entry rewrites it to.
    pub const fn paired(&self, entry: &NatEntry) -> NatKey {
        NatKey {
            remote: self.remote,
            local: entry.addr,
            remote_port: self.remote_port,
            local_port: entry.port,
            protocol: self.protocol,
            direction: self.direction ^ 1,
            _pad: [0; 2],
        }
    }

    pub const fn is_egress(&self) -> bool {
        self.direction == nat_direction::EGRESS
    }
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
    /// The container's network (network id).
    pub network: u32,
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
    /// The source IPv6 traffic is masqueraded to: the underlay NIC's global IPv6 address
    /// (network order). All zeros while it has none: IPv6 to the outside is then dropped
    /// (`drop_nat6_no_address`), never sent with an overlay source.
    pub underlay_ip6: Addr16,
}

impl NatConfig {
    /// Whether IPv6 can be masqueraded (the underlay NIC has an IPv6 address).
    pub const fn has_ipv6_source(&self) -> bool {
        let a = &self.underlay_ip6;
        let mut i = 0;
        while i < 16 {
            if a[i] != 0 {
                return true;
            }
            i += 1;
        }
        false
    }
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
    /// `container`'s flows towards `remote`:`remote_port` over `protocol`.
    pub const fn new(
        container: Addr16,
        remote: Addr16,
        remote_port: u16,
        protocol: u8,
    ) -> NatQuotaKey {
        NatQuotaKey {
            container,
            remote,
            remote_port,
            protocol,
            _pad: 0,
        }
    }

    /// The quota key of an egress `NatKey` (container = its local end).
    pub const fn of_egress(key: &NatKey) -> NatQuotaKey {
        NatQuotaKey::new(key.local, key.remote, key.remote_port, key.protocol)
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

impl NatQuota {
    pub const fn new(flows: u32) -> NatQuota {
        NatQuota { flows, _pad: 0 }
    }
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

/// Counter ids per slot of `OVL_STATS`: every [`crate::counters::Counter`] value is below it.
pub const STAT_COUNTERS_PER_SLOT: u32 = 96;

/// The `OVL_STATS` index of counter (id) `counter` in counter slot `slot`; a slot out of range
/// counts in slot 0 (no network's), never in another network's.
#[inline(always)]
pub const fn stat_index(slot: u32, counter: u32) -> u32 {
    let slot = if slot < capacity::STAT_SLOTS { slot } else { 0 };
    slot * STAT_COUNTERS_PER_SLOT + counter
}

/// Value of `OVL_NET_SLOTS` (key [`NetworkKey`]): the network's counter slot in `OVL_STATS`.
/// Slot 0 is [`crate::counters::NO_NETWORK`]'s, and where a network without a slot counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetSlot {
    pub slot: u32,
}

/// Value of `OVL_STATS` (per-CPU array, index [`stat_index`]): one counter of one network. The
/// agent writes `network` and `counter` when it gives the slot to a network (so `bpftool map
/// dump` says whose counter each entry is); the programs only add to `packets` and `bytes`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stat {
    /// The network id, or [`crate::counters::NO_NETWORK`].
    pub network: u32,
    /// A [`crate::counters::Counter`] value.
    pub counter: u32,
    pub packets: u64,
    pub bytes: u64,
}

impl Stat {
    /// Counter (id) `counter` of network (id) `network`, at zero.
    pub const fn of(network: u32, counter: u32) -> Stat {
        Stat {
            network,
            counter,
            packets: 0,
            bytes: 0,
        }
    }
}

// Layouts are part of the on-disk (pinned) contract: pin them down.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<AgentConfig>() == 36);
    assert!(size_of::<EndpointKey>() == 16);
    assert!(size_of::<Endpoint>() == 28);
    assert!(size_of::<RemoteRoute>() == 36);
    assert!(size_of::<OverlaySubnet>() == 8);
    assert!(size_of::<VtepKey>() == 16);
    assert!(size_of::<Vtep>() == 12);
    assert!(size_of::<NextHop>() == 40);
    assert!(size_of::<NetworkKey>() == 4);
    assert!(size_of::<Network>() == 8);
    assert!(size_of::<VniKey>() == 4);
    assert!(size_of::<WireVni>() == 8);
    assert!(size_of::<NetSlot>() == 4);
    assert!(size_of::<Stat>() == 24);
    assert!(size_of::<NatKey>() == 40);
    assert!(size_of::<NatEntry>() == 32);
    assert!(size_of::<NatConfig>() == 52);
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
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for NetworkKey {}
    unsafe impl aya::Pod for Network {}
    unsafe impl aya::Pod for VniKey {}
    unsafe impl aya::Pod for WireVni {}
    unsafe impl aya::Pod for NetSlot {}
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
    fn every_tail_call_has_its_own_slot_inside_the_program_array() {
        let mut seen = [false; tail_calls::SLOTS as usize];
        for &(slot, name) in tail_calls::ALL {
            assert!(slot < tail_calls::SLOTS, "{name} in slot {slot}");
            assert!(!seen[slot as usize], "{name} shares slot {slot}");
            seen[slot as usize] = true;
        }
    }

    #[test]
    fn ipv4_mapping_round_trips() {
        let a = ipv4_mapped([9, 0, 1, 2]);
        assert_eq!(a, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 9, 0, 1, 2]);
        assert_eq!(
            a,
            std::net::Ipv4Addr::new(9, 0, 1, 2)
                .to_ipv6_mapped()
                .octets()
        );
        assert_eq!(ipv4_unmapped(&a), Some([9, 0, 1, 2]));
        assert_eq!(ipv4_unmapped(&ipv4_mapped([255; 4])), Some([255; 4]));
        let v6 = [0xfd, 1, 0, 0xb, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(ipv4_unmapped(&v6), None);
        assert_eq!(ipv4_mapped_prefix_len(24), 120);
    }

    #[test]
    fn lpm_prefix_lengths_count_ipv4_from_the_mapped_96() {
        let v4 = ipv4_mapped([9, 0, 0, 0]);
        let v6 = [0xfd, 1, 0, 0xb, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        for len in [0u8, 8, 24, 31, 32] {
            assert_eq!(lpm_prefix_len(&v4, len), 96 + len as u32);
            assert_eq!(family_prefix_len(&v4, lpm_prefix_len(&v4, len)), len);
        }
        for len in [0u8, 48, 64, 128] {
            assert_eq!(lpm_prefix_len(&v6, len), len as u32);
            assert_eq!(family_prefix_len(&v6, lpm_prefix_len(&v6, len)), len);
        }
        // A mapped prefix shorter than the mapping itself is no IPv4 prefix at all.
        assert_eq!(family_prefix_len(&v4, 80), 0);
    }

    #[test]
    fn nat_keys_of_both_directions_pair_up() {
        let container = ipv4_mapped([9, 0, 1, 2]);
        let remote = ipv4_mapped([10, 250, 0, 254]);
        let underlay = ipv4_mapped([10, 0, 0, 1]);
        let egress = NatKey::egress(6, container, 40000, remote, 80);
        assert_eq!(
            egress,
            NatKey {
                remote,
                local: container,
                remote_port: 80,
                local_port: 40000,
                protocol: 6,
                direction: nat_direction::EGRESS,
                _pad: [0; 2],
            }
        );
        assert!(egress.is_egress());
        let ingress = NatKey::ingress(6, remote, 80, underlay, 61000);
        assert_eq!(ingress.direction, nat_direction::INGRESS);
        assert!(!ingress.is_egress());
        assert_eq!((ingress.local, ingress.local_port), (underlay, 61000));
        assert_eq!((ingress.remote, ingress.remote_port), (remote, 80));
        // Each direction's entry names the other's local end, so pairing goes both ways.
        let out = NatEntry {
            addr: underlay,
            port: 61000,
            ..Default::default()
        };
        let back = NatEntry {
            addr: container,
            port: 40000,
            ..Default::default()
        };
        assert_eq!(egress.paired(&out), ingress);
        assert_eq!(ingress.paired(&back), egress);
        assert_eq!(
            NatQuotaKey::of_egress(&egress),
            NatQuotaKey::new(container, remote, 80, 6)
        );
    }

    #[test]
    fn value_constructors_zero_their_padding_and_set_their_flags() {
        let host = Endpoint::host(7, 1024, [2, 0, 0, 0, 0, 9]);
        assert!(host.is_host());
        assert_eq!(host.gateway_mac, HOST_LINK_PEER_MAC);
        assert_eq!((host.ifindex, host.network, host.slot), (7, 1024, 0));
        let c = Endpoint::container(8, 1024, [2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        assert!(!c.is_host());
        assert_eq!(c.flags, 0);
        assert!(Network::new(true).masquerades());
        assert_eq!(Network::new(false), Network::default());
        let r = RemoteRoute::new(
            ipv4_mapped([10, 0, 0, 2]),
            [2, 0, 0, 0, 0, 3],
            7,
            SHARED_VNI,
        );
        assert_eq!((r.slot, r.next_hop, r.network, r.vni), (0, 0, 7, 1024));
        assert_eq!(WireVni::carrying(&[7]).network, 7);
        assert_eq!(
            WireVni::carrying(&[7, 8]).network,
            crate::counters::NO_NETWORK
        );
        assert_eq!(WireVni::carrying(&[]).network, crate::counters::NO_NETWORK);
        let v = Vtep::new([2, 0, 0, 0, 0, 3], [44, 128, 0, 2]);
        assert_eq!(v.next_hop, 0);
        assert_eq!(NatQuota::new(3), NatQuota { flows: 3, _pad: 0 });
        assert_eq!(OverlaySubnet::new(1024).flags, 0);
    }

    #[test]
    fn a_next_hop_is_used_until_it_expires() {
        let hop = NextHop::new(3, [2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 1], 1_000);
        assert!(hop.is_fresh(999));
        assert!(!hop.is_fresh(1_000));
        assert!(!hop.is_fresh(5_000));
        // A zeroed entry (never written) is never used, whatever the clock says.
        assert!(!NextHop::default().is_fresh(0));
        assert!(!NextHop { ifindex: 0, ..hop }.is_fresh(0));
    }

    #[test]
    fn no_implicit_padding() {
        // Sum of field sizes equals the struct size: no hidden bytes a hash lookup could miss on.
        assert_eq!(size_of::<Endpoint>(), 4 + 4 + 6 + 6 + 4 + 4);
        assert_eq!(size_of::<AgentConfig>(), 16 + 4 + 6 + 2 + 4 + 4);
        assert_eq!(size_of::<RemoteRoute>(), 16 + 6 + 2 + 4 + 4 + 4);
        assert_eq!(size_of::<Stat>(), 4 + 4 + 8 + 8);
        assert_eq!(size_of::<NextHop>(), 4 + 6 + 6 + 8 + 16);
    }

    #[test]
    fn every_counter_has_its_own_index_inside_its_slot() {
        use crate::counters::Counter;
        for &c in Counter::ALL {
            assert!((c as u32) < STAT_COUNTERS_PER_SLOT, "{}", c.name());
        }
        let last = capacity::STAT_SLOTS - 1;
        assert_eq!(stat_index(0, 5), 5);
        assert_eq!(stat_index(2, 17), 2 * STAT_COUNTERS_PER_SLOT + 17);
        assert!(stat_index(last, STAT_COUNTERS_PER_SLOT - 1) < capacity::STATS);
        // A slot past the end counts as no network's, never in someone else's slot.
        assert_eq!(stat_index(capacity::STAT_SLOTS, 17), 17);
        assert_eq!(stat_index(u32::MAX, 17), 17);
    }
}
