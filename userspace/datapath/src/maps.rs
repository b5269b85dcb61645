//! The typed façade over the datapath's maps. Nothing else in userspace touches a map: callers
//! speak in addresses, prefixes, network ids and VNIs; this module owns the key encodings.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, Pod,
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError, PerCpuArray,
        PerCpuValues, lpm_trie::Key,
    },
};
use ipnetwork::IpNetwork;
use overlay_common::{
    counters::{Counter, NO_NETWORK},
    maps::{
        Addr16, AgentConfig, Endpoint, EndpointKey, NatConfig, NatEntry, NatKey, NatQuota,
        NatQuotaKey, NetSlot, Network, NetworkKey, NextHop, OverlaySubnet, Protected, ProtectedKey,
        RemoteRoute, STAT_COUNTERS_PER_SLOT, Stat, VniKey, Vtep, VtepKey, WireVni, capacity,
        family_prefix_len, ipv4_mapped, ipv4_mapped_prefix_len, ipv4_unmapped, names, stat_index,
    },
};

use crate::PinLayout;

/// The 16-byte map form of an address (IPv4 as IPv4-mapped IPv6).
pub fn addr16(ip: IpAddr) -> Addr16 {
    match ip {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a 16-byte map address stands for.
pub fn from_addr16(a: &Addr16) -> IpAddr {
    match ipv4_unmapped(a) {
        Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        None => IpAddr::V6(Ipv6Addr::from(*a)),
    }
}

/// The LPM-trie key of a prefix.
pub fn prefix_key(net: IpNetwork) -> Key<Addr16> {
    let len = match net {
        IpNetwork::V4(n) => ipv4_mapped_prefix_len(n.prefix()),
        IpNetwork::V6(n) => n.prefix() as u32,
    };
    Key::new(len, addr16(net.network()))
}

/// The prefix an LPM-trie key stands for.
pub fn key_prefix(key: &Key<Addr16>) -> anyhow::Result<IpNetwork> {
    let addr = key.data();
    let len = family_prefix_len(&addr, key.prefix_len());
    IpNetwork::new(from_addr16(&addr), len).map_err(|e| anyhow!("bad prefix in map: {e}"))
}

/// This agent's own datapath settings (`OVL_CONFIG`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentSettings {
    pub underlay_ip: IpAddr,
    pub underlay_ifindex: u32,
    pub vtep_mac: [u8; 6],
    pub vxlan_port: u16,
    pub overlay_mtu: u32,
    /// The underlay NIC reserves link-layer headroom of its own
    /// (`AgentConfig::FLAG_SPARE_HEADROOM`).
    pub spare_headroom: bool,
}

/// One counter of one network, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatRow {
    /// Network id (or `NO_NETWORK`).
    pub network: u32,
    pub counter: Counter,
    pub packets: u64,
    pub bytes: u64,
}

pub struct OverlayMaps {
    config: Array<MapData, AgentConfig>,
    endpoints: HashMap<MapData, EndpointKey, Endpoint>,
    routes: LpmTrie<MapData, Addr16, RemoteRoute>,
    subnets: LpmTrie<MapData, Addr16, OverlaySubnet>,
    vteps: HashMap<MapData, VtepKey, Vtep>,
    networks: HashMap<MapData, NetworkKey, Network>,
    stats: PerCpuArray<MapData, Stat>,
    net_slots: HashMap<MapData, NetworkKey, NetSlot>,
    nat: HashMap<MapData, NatKey, NatEntry>,
    nat_config: Array<MapData, NatConfig>,
    protected: HashMap<MapData, ProtectedKey, Protected>,
    nat_quota: HashMap<MapData, NatQuotaKey, NatQuota>,
    vnis: HashMap<MapData, VniKey, WireVni>,
    /// None only when opened from the pins of an agent older than the map.
    next_hops: Option<Array<MapData, NextHop>>,
    /// Which VTEP holds which next-hop slot: what `OVL_VTEPS` says, kept here so that giving a
    /// slot out takes no walk of the map.
    hop_slots: HopSlots,
    /// The next hops last asked for ([`OverlayMaps::sync_next_hops`]): a VTEP written after
    /// them gets its entry at once, not at the next sync.
    hops_wanted: BTreeMap<IpAddr, NextHop>,
}

/// The `OVL_NEXT_HOPS` entry of `hop` towards the VTEP at `vtep`: named after it, or all zero
/// when there is none (`ifindex` 0).
fn next_hop_entry(vtep: IpAddr, hop: NextHop) -> NextHop {
    if hop.ifindex == 0 {
        NextHop::default()
    } else {
        NextHop {
            vtep: addr16(vtep),
            ..hop
        }
    }
}

/// The next-hop slots (indexes into `OVL_NEXT_HOPS`) of the remote VTEPs. Slot 0 is none.
#[derive(Debug, Default)]
struct HopSlots {
    of: BTreeMap<IpAddr, u32>,
    /// Given back, below `next`.
    free: std::collections::BTreeSet<u32>,
    /// The lowest slot never given out.
    next: u32,
}

impl HopSlots {
    /// The slots the VTEPs in `OVL_VTEPS` hold.
    fn of_vteps(vteps: &HashMap<MapData, VtepKey, Vtep>) -> anyhow::Result<HopSlots> {
        let of: BTreeMap<IpAddr, u32> = read_hash(vteps)
            .context("reading OVL_VTEPS")?
            .into_iter()
            .filter(|(_, v)| v.next_hop != 0)
            .map(|(k, v)| (from_addr16(&k.underlay_ip), u32::from(v.next_hop)))
            .collect();
        let next = of.values().max().map_or(1, |m| m + 1);
        let taken: std::collections::BTreeSet<u32> = of.values().copied().collect();
        let free = (1..next).filter(|s| !taken.contains(s)).collect();
        Ok(HopSlots { of, free, next })
    }

    /// The slot of the VTEP at `ip`, given to it now if it has none; 0 when all are taken (its
    /// frames are then addressed by the kernel's lookup).
    fn give(&mut self, ip: IpAddr) -> u32 {
        if let Some(slot) = self.of.get(&ip) {
            return *slot;
        }
        let slot = match self.free.pop_first() {
            Some(slot) => slot,
            None if self.next < capacity::NEXT_HOPS => {
                // Slot 0 is none, never given.
                let slot = self.next.max(1);
                self.next = slot + 1;
                slot
            }
            None => return 0,
        };
        self.of.insert(ip, slot);
        slot
    }

    /// Takes the slot of the VTEP at `ip` back, if it had one.
    fn take_back(&mut self, ip: IpAddr) -> Option<u32> {
        let slot = self.of.remove(&ip)?;
        self.free.insert(slot);
        Some(slot)
    }
}

/// A destination containers may not reach: one address, or (None) every agent's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtectedDestination {
    pub addr: Option<IpAddr>,
    pub port: u16,
    pub protocol: u8,
}

impl ProtectedDestination {
    fn key(&self) -> ProtectedKey {
        let addr = self.addr.map_or(ProtectedKey::ANY_AGENT, addr16);
        ProtectedKey::new(addr, self.port, self.protocol)
    }

    fn from_key(k: &ProtectedKey) -> ProtectedDestination {
        ProtectedDestination {
            addr: (k.addr != ProtectedKey::ANY_AGENT).then(|| from_addr16(&k.addr)),
            port: k.port,
            protocol: k.protocol,
        }
    }
}

fn take(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

/// Every entry of a hash map the datapath writes to, in batches ([`crate::batch`]); entry by
/// entry only where the kernel has no batch lookup.
fn read_hash<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> anyhow::Result<Vec<(K, V)>> {
    match crate::batch::hash_entries(map.map()) {
        Err(e) if crate::batch::unsupported(&e) => Ok(map.iter().collect::<Result<_, _>>()?),
        r => Ok(r.context("BPF_MAP_LOOKUP_BATCH")?),
    }
}

/// Removing an entry that is already gone is not an error: removal is idempotent.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Opens one pinned map, read-only use by tools like `overlayctl`.
fn pinned(pins: &PinLayout, name: &str) -> anyhow::Result<MapData> {
    let path = pins.map(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is an agent running with this instance?)",
            path.display()
        )
    })
}

impl OverlayMaps {
    /// The maps an agent pinned, opened without loading anything: for inspection tools.
    pub fn open_pinned(pins: &PinLayout) -> anyhow::Result<OverlayMaps> {
        OverlayMaps {
            config: Map::Array(pinned(pins, names::CONFIG)?).try_into()?,
            endpoints: Map::HashMap(pinned(pins, names::ENDPOINTS)?).try_into()?,
            routes: Map::LpmTrie(pinned(pins, names::ROUTES)?).try_into()?,
            subnets: Map::LpmTrie(pinned(pins, names::SUBNETS)?).try_into()?,
            vteps: Map::HashMap(pinned(pins, names::VTEPS)?).try_into()?,
            networks: Map::HashMap(pinned(pins, names::NETWORKS)?).try_into()?,
            stats: Map::PerCpuArray(pinned(pins, names::STATS)?).try_into()?,
            net_slots: Map::HashMap(pinned(pins, names::NET_SLOTS)?).try_into()?,
            nat: Map::LruHashMap(pinned(pins, names::NAT)?).try_into()?,
            nat_config: Map::Array(pinned(pins, names::NAT_CONFIG)?).try_into()?,
            protected: Map::HashMap(pinned(pins, names::PROTECTED)?).try_into()?,
            nat_quota: Map::LruHashMap(pinned(pins, names::NAT_QUOTA)?).try_into()?,
            vnis: Map::HashMap(pinned(pins, names::VNIS)?).try_into()?,
            next_hops: match MapData::from_pin(pins.map(names::NEXT_HOPS)) {
                Ok(map) => Some(Map::Array(map).try_into()?),
                Err(_) => None,
            },
            hop_slots: HopSlots::default(),
            hops_wanted: BTreeMap::new(),
        }
        .with_hop_slots()
    }

    /// The maps of a freshly loaded object (the agent's loader), taken out of it.
    pub fn take_from(ebpf: &mut Ebpf) -> anyhow::Result<OverlayMaps> {
        let mut maps = OverlayMaps {
            config: take(ebpf, names::CONFIG)?.try_into()?,
            endpoints: take(ebpf, names::ENDPOINTS)?.try_into()?,
            routes: take(ebpf, names::ROUTES)?.try_into()?,
            subnets: take(ebpf, names::SUBNETS)?.try_into()?,
            vteps: take(ebpf, names::VTEPS)?.try_into()?,
            networks: take(ebpf, names::NETWORKS)?.try_into()?,
            stats: take(ebpf, names::STATS)?.try_into()?,
            net_slots: take(ebpf, names::NET_SLOTS)?.try_into()?,
            nat: take(ebpf, names::NAT)?.try_into()?,
            nat_config: take(ebpf, names::NAT_CONFIG)?.try_into()?,
            protected: take(ebpf, names::PROTECTED)?.try_into()?,
            nat_quota: take(ebpf, names::NAT_QUOTA)?.try_into()?,
            vnis: take(ebpf, names::VNIS)?.try_into()?,
            next_hops: Some(take(ebpf, names::NEXT_HOPS)?.try_into()?),
            hop_slots: HopSlots::default(),
            hops_wanted: BTreeMap::new(),
        }
        .with_hop_slots()?;
        maps.name_counters_of_no_network()?;
        Ok(maps)
    }

    fn with_hop_slots(mut self) -> anyhow::Result<OverlayMaps> {
        self.hop_slots = HopSlots::of_vteps(&self.vteps)?;
        Ok(self)
    }

    pub fn set_config(&mut self, s: &AgentSettings) -> anyhow::Result<()> {
        let cfg = AgentConfig {
            underlay_ip: addr16(s.underlay_ip),
            underlay_ifindex: s.underlay_ifindex,
            vtep_mac: s.vtep_mac,
            vxlan_port: s.vxlan_port,
            overlay_mtu: s.overlay_mtu,
            flags: AgentConfig::FLAG_READY
                | if s.spare_headroom {
                    AgentConfig::FLAG_SPARE_HEADROOM
                } else {
                    0
                },
        };
        self.config.set(0, cfg, 0).context("writing OVL_CONFIG")
    }

    pub fn config(&self) -> anyhow::Result<Option<AgentConfig>> {
        let cfg = self.config.get(&0, 0).context("reading OVL_CONFIG")?;
        Ok((cfg.flags & AgentConfig::FLAG_READY != 0).then_some(cfg))
    }

    pub fn put_endpoint(&mut self, ip: IpAddr, ep: Endpoint) -> anyhow::Result<()> {
        let ep = Endpoint {
            slot: self.counter_slot(ep.network)?,
            ..ep
        };
        self.endpoints
            .insert(EndpointKey::new(addr16(ip)), ep, 0)
            .with_context(|| format!("adding endpoint {ip} to OVL_ENDPOINTS"))
    }

    pub fn remove_endpoint(&mut self, ip: IpAddr) -> anyhow::Result<()> {
        ignore_missing(self.endpoints.remove(&EndpointKey::new(addr16(ip))))
            .with_context(|| format!("removing endpoint {ip} from OVL_ENDPOINTS"))
    }

    /// Every endpoint, as written (the counter slot is this façade's business: left out).
    pub fn endpoints(&self) -> anyhow::Result<BTreeMap<IpAddr, Endpoint>> {
        self.endpoints
            .iter()
            .map(|r| r.map(|(k, v)| (from_addr16(&k.addr), Endpoint { slot: 0, ..v })))
            .collect::<Result<_, _>>()
            .context("reading OVL_ENDPOINTS")
    }

    pub fn put_route(&mut self, subnet: IpNetwork, route: RemoteRoute) -> anyhow::Result<()> {
        let vtep = from_addr16(&route.underlay_ip);
        let route = RemoteRoute {
            // Slots are below capacity::STAT_SLOTS (256), which fits.
            slot: self.counter_slot(route.network)? as u16,
            // The VTEP is written before its routes; one that is not (yet) has no cached hop.
            next_hop: self.hop_slots.of.get(&vtep).copied().unwrap_or(0),
            ..route
        };
        self.routes
            .insert(&prefix_key(subnet), route, 0)
            .with_context(|| format!("adding route {subnet} to OVL_ROUTES"))
    }

    pub fn remove_route(&mut self, subnet: IpNetwork) -> anyhow::Result<()> {
        ignore_missing(self.routes.remove(&prefix_key(subnet)))
            .with_context(|| format!("removing route {subnet} from OVL_ROUTES"))
    }

    pub fn routes(&self) -> anyhow::Result<BTreeMap<IpNetwork, RemoteRoute>> {
        let mut out = BTreeMap::new();
        for r in self.routes.iter() {
            let (k, v) = r.context("reading OVL_ROUTES")?;
            // The counter and next-hop slots are this façade's business: left out.
            let v = RemoteRoute {
                slot: 0,
                next_hop: 0,
                ..v
            };
            out.insert(key_prefix(&k)?, v);
        }
        Ok(out)
    }

    pub fn put_subnet(&mut self, subnet: IpNetwork, value: OverlaySubnet) -> anyhow::Result<()> {
        self.subnets
            .insert(&prefix_key(subnet), value, 0)
            .with_context(|| format!("adding overlay subnet {subnet} to OVL_SUBNETS"))
    }

    pub fn remove_subnet(&mut self, subnet: IpNetwork) -> anyhow::Result<()> {
        ignore_missing(self.subnets.remove(&prefix_key(subnet)))
            .with_context(|| format!("removing overlay subnet {subnet} from OVL_SUBNETS"))
    }

    pub fn subnets(&self) -> anyhow::Result<BTreeMap<IpNetwork, OverlaySubnet>> {
        let mut out = BTreeMap::new();
        for r in self.subnets.iter() {
            let (k, v) = r.context("reading OVL_SUBNETS")?;
            out.insert(key_prefix(&k)?, v);
        }
        Ok(out)
    }

    /// Writes the VTEP of the agent at `underlay_ip`, giving it a next-hop slot the first time
    /// (and its cached next hop, if one was asked for already).
    pub fn put_vtep(&mut self, underlay_ip: IpAddr, vtep: Vtep) -> anyhow::Result<()> {
        let known = self.hop_slots.of.contains_key(&underlay_ip);
        let slot = self.hop_slots.give(underlay_ip);
        if slot == 0 {
            tracing::warn!(
                vtep = %underlay_ip,
                "all {} next-hop slots are taken: frames to this VTEP are addressed by the kernel's lookup",
                capacity::NEXT_HOPS - 1
            );
        }
        let vtep = Vtep {
            // Slots are below capacity::NEXT_HOPS (16385), which fits.
            next_hop: slot as u16,
            ..vtep
        };
        self.vteps
            .insert(VtepKey::new(addr16(underlay_ip)), vtep, 0)
            .with_context(|| format!("adding VTEP of agent {underlay_ip} to OVL_VTEPS"))?;
        if !known && slot != 0 {
            let hop = self
                .hops_wanted
                .get(&underlay_ip)
                .copied()
                .unwrap_or_default();
            self.write_next_hop(underlay_ip, slot, hop)?;
        }
        Ok(())
    }

    /// Removes the VTEP of the agent at `underlay_ip` (after the routes through it: the plan's
    /// order), clears its cached next hop and takes its slot back.
    pub fn remove_vtep(&mut self, underlay_ip: IpAddr) -> anyhow::Result<()> {
        ignore_missing(self.vteps.remove(&VtepKey::new(addr16(underlay_ip))))
            .with_context(|| format!("removing VTEP of agent {underlay_ip} from OVL_VTEPS"))?;
        if let Some(slot) = self.hop_slots.take_back(underlay_ip) {
            self.write_next_hop(underlay_ip, slot, NextHop::default())?;
        }
        Ok(())
    }

    /// Every VTEP, as written (the next-hop slot is this façade's business: left out).
    pub fn vteps(&self) -> anyhow::Result<BTreeMap<IpAddr, Vtep>> {
        self.vteps
            .iter()
            .map(|r| r.map(|(k, v)| (from_addr16(&k.underlay_ip), Vtep { next_hop: 0, ..v })))
            .collect::<Result<_, _>>()
            .context("reading OVL_VTEPS")
    }

    /// Writes `hop` (zeroed: none) at `slot`, the next-hop slot of the VTEP at `vtep`.
    fn write_next_hop(&mut self, vtep: IpAddr, slot: u32, hop: NextHop) -> anyhow::Result<()> {
        let Some(map) = self.next_hops.as_mut() else {
            return Ok(());
        };
        map.set(slot, next_hop_entry(vtep, hop), 0)
            .with_context(|| {
                format!("writing the next hop of VTEP {vtep} to OVL_NEXT_HOPS slot {slot}")
            })
    }

    /// Makes `OVL_NEXT_HOPS` hold exactly `wanted` (remote VTEP -> next hop), each at its VTEP's
    /// slot, every entry written anew (a write is the agent's confirmation: it moves the expiry
    /// on); the slots of VTEPs not in `wanted` are cleared. A VTEP not written yet gets its entry
    /// when it is ([`OverlayMaps::put_vtep`]). Returns the entries written and cleared.
    pub fn sync_next_hops(
        &mut self,
        wanted: &BTreeMap<IpAddr, NextHop>,
    ) -> anyhow::Result<(usize, usize)> {
        let entries: Vec<(u32, NextHop)> = self
            .hop_slots
            .of
            .iter()
            .map(|(vtep, slot)| {
                let hop = wanted.get(vtep).copied().unwrap_or_default();
                (*slot, next_hop_entry(*vtep, hop))
            })
            .collect();
        let written = entries.iter().filter(|(_, h)| h.ifindex != 0).count();
        let map = self
            .next_hops
            .as_mut()
            .ok_or_else(|| anyhow!("{} is not pinned", names::NEXT_HOPS))?;
        // One syscall for the whole cache, however many VTEPs (the agent writes it every few
        // seconds and on every change it mirrors); entry by entry on kernels without batches.
        match crate::batch::put_entries(map.map(), &entries) {
            Err(e) if crate::batch::unsupported(&e) => {
                for (slot, hop) in &entries {
                    map.set(*slot, hop, 0)
                        .with_context(|| format!("writing OVL_NEXT_HOPS slot {slot}"))?;
                }
            }
            r => r.context("writing OVL_NEXT_HOPS (BPF_MAP_UPDATE_BATCH)")?,
        }
        self.hops_wanted = wanted.clone();
        Ok((written, entries.len() - written))
    }

    /// The next-hop slot of the VTEP at `vtep`, if it has one.
    pub fn next_hop_slot(&self, vtep: IpAddr) -> Option<u32> {
        self.hop_slots.of.get(&vtep).copied()
    }

    /// The cached next hops by remote VTEP (empty from an agent older than the map).
    pub fn next_hops(&self) -> anyhow::Result<BTreeMap<IpAddr, NextHop>> {
        let Some(map) = &self.next_hops else {
            return Ok(BTreeMap::new());
        };
        let mut out = BTreeMap::new();
        for (vtep, slot) in &self.hop_slots.of {
            let hop = map
                .get(slot, 0)
                .with_context(|| format!("reading OVL_NEXT_HOPS slot {slot}"))?;
            if hop.ifindex != 0 && hop.vtep == addr16(*vtep) {
                out.insert(*vtep, hop);
            }
        }
        Ok(out)
    }

    /// Network (id) `id` takes part here.
    pub fn put_network(&mut self, id: u32, network: Network) -> anyhow::Result<()> {
        // Its counters get their slot now: its drops count under it from the first packet.
        self.counter_slot(id)?;
        self.networks
            .insert(NetworkKey::new(id), network, 0)
            .with_context(|| format!("adding network {id} to OVL_NETWORKS"))
    }

    /// Network (id) `id` takes part here no more. Its counter slot goes back once no endpoint
    /// or route of it is left to count in it (the reconciler removes a network after those), so
    /// networks that come and go do not use the slots up; the next network to take the slot
    /// finds it zeroed.
    pub fn remove_network(&mut self, id: u32) -> anyhow::Result<()> {
        ignore_missing(self.networks.remove(&NetworkKey::new(id)))
            .with_context(|| format!("removing network {id} from OVL_NETWORKS"))?;
        self.release_counter_slot(id)
    }

    fn release_counter_slot(&mut self, network: u32) -> anyhow::Result<()> {
        if network == NO_NETWORK {
            return Ok(());
        }
        let counted = self.endpoints()?.values().any(|e| e.network == network)
            || self.routes()?.values().any(|r| r.network == network);
        if counted {
            return Ok(());
        }
        ignore_missing(self.net_slots.remove(&NetworkKey::new(network)))
            .with_context(|| format!("giving back the counter slot of network {network}"))
    }

    /// Every network by id.
    pub fn networks(&self) -> anyhow::Result<BTreeMap<u32, Network>> {
        self.networks
            .iter()
            .map(|r| r.map(|(k, v)| (k.network, v)))
            .collect::<Result<_, _>>()
            .context("reading OVL_NETWORKS")
    }

    /// VXLAN is accepted in VNI `vni`, which carries what `carries` says.
    pub fn put_vni(&mut self, vni: u32, carries: WireVni) -> anyhow::Result<()> {
        self.vnis
            .insert(VniKey::new(vni), carries, 0)
            .with_context(|| format!("adding VNI {vni} to OVL_VNIS"))
    }

    pub fn remove_vni(&mut self, vni: u32) -> anyhow::Result<()> {
        ignore_missing(self.vnis.remove(&VniKey::new(vni)))
            .with_context(|| format!("removing VNI {vni} from OVL_VNIS"))
    }

    /// Every VNI VXLAN is accepted in.
    pub fn vnis(&self) -> anyhow::Result<BTreeMap<u32, WireVni>> {
        self.vnis
            .iter()
            .map(|r| r.map(|(k, v)| (k.vni, v)))
            .collect::<Result<_, _>>()
            .context("reading OVL_VNIS")
    }

    /// Every counter that counted something, summed over CPUs, sorted by network then counter.
    pub fn stats(&self) -> anyhow::Result<Vec<StatRow>> {
        let mut rows = Vec::new();
        let mut slots = vec![(NO_NETWORK, 0)];
        slots.extend(
            self.counter_slots()?
                .into_iter()
                .filter(|(n, _)| *n != NO_NETWORK),
        );
        for (network, slot) in slots {
            for &counter in Counter::ALL {
                let per_cpu = self
                    .stats
                    .get(&stat_index(slot, counter as u32), 0)
                    .context("reading OVL_STATS")?;
                let (packets, bytes) = per_cpu
                    .iter()
                    .fold((0u64, 0u64), |(p, b), s| (p + s.packets, b + s.bytes));
                if packets == 0 && bytes == 0 {
                    continue;
                }
                rows.push(StatRow {
                    network,
                    counter,
                    packets,
                    bytes,
                });
            }
        }
        rows.sort_by_key(|r| (r.network, r.counter as u32));
        Ok(rows)
    }

    /// Every network's counter slot (`OVL_NET_SLOTS`), by network id.
    pub fn counter_slots(&self) -> anyhow::Result<BTreeMap<u32, u32>> {
        self.net_slots
            .iter()
            .map(|r| r.map(|(k, v)| (k.network, v.slot)))
            .collect::<Result<_, _>>()
            .context("reading OVL_NET_SLOTS")
    }

    /// The counter slot of network (id) `network`, given to it now if it has none: the lowest
    /// free one, its counters named (network, counter) and zeroed. Slot 0 is no network's, and
    /// where a network counts while all are taken. A slot comes back when its network goes and
    /// nothing of it is left ([`Self::remove_network`]).
    fn counter_slot(&mut self, network: u32) -> anyhow::Result<u32> {
        if network == NO_NETWORK {
            return Ok(0);
        }
        let key = NetworkKey::new(network);
        match self.net_slots.get(&key, 0) {
            Ok(s) => return Ok(s.slot),
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).context("reading OVL_NET_SLOTS"),
        }
        let taken: std::collections::BTreeSet<u32> = self.counter_slots()?.into_values().collect();
        let Some(slot) = (1..capacity::STAT_SLOTS).find(|s| !taken.contains(s)) else {
            return Ok(0);
        };
        self.name_counters(slot, network, true)?;
        self.net_slots
            .insert(key, NetSlot { slot }, 0)
            .with_context(|| format!("giving network {network} counter slot {slot}"))?;
        Ok(slot)
    }

    /// Adds per-CPU counts (packets, bytes; one pair per CPU) to counter (id) `counter` of
    /// network (id) `network`: counters carried over from another layout. A counter id this
    /// layout has no room for is left out.
    pub fn add_counts(
        &mut self,
        network: u32,
        counter: u32,
        per_cpu: &[(u64, u64)],
    ) -> anyhow::Result<()> {
        if counter >= STAT_COUNTERS_PER_SLOT {
            return Ok(());
        }
        let slot = self.counter_slot(network)?;
        let index = stat_index(slot, counter);
        let old = self.stats.get(&index, 0).context("reading OVL_STATS")?;
        let values: Vec<Stat> = old
            .iter()
            .enumerate()
            .map(|(cpu, s)| {
                let (p, b) = per_cpu.get(cpu).copied().unwrap_or_default();
                Stat {
                    packets: s.packets + p,
                    bytes: s.bytes + b,
                    ..*s
                }
            })
            .collect();
        let values = PerCpuValues::try_from(values)
            .map_err(|e| anyhow!("per-CPU values of OVL_STATS: {e}"))?;
        self.stats
            .set(index, values, 0)
            .context("writing OVL_STATS")
    }

    /// Writes the identity (network, counter) of every counter of `slot` on every CPU, its
    /// counts zeroed (`reset`) or kept.
    fn name_counters(&mut self, slot: u32, network: u32, reset: bool) -> anyhow::Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        for counter in 0..STAT_COUNTERS_PER_SLOT {
            let index = stat_index(slot, counter);
            let values: Vec<Stat> = if reset {
                vec![Stat::of(network, counter); cpus]
            } else {
                let old = self.stats.get(&index, 0).context("reading OVL_STATS")?;
                old.iter()
                    .map(|s| Stat {
                        network,
                        counter,
                        ..*s
                    })
                    .collect()
            };
            let values = PerCpuValues::try_from(values)
                .map_err(|e| anyhow!("per-CPU values of OVL_STATS: {e}"))?;
            self.stats
                .set(index, values, 0)
                .with_context(|| format!("naming counter {counter} of slot {slot} in OVL_STATS"))?;
        }
        Ok(())
    }

    /// Names the counters of slot 0 (no network's) once, keeping what they counted (the map may
    /// be a pinned one the datapath has been counting in).
    fn name_counters_of_no_network(&mut self) -> anyhow::Result<()> {
        let last = stat_index(0, STAT_COUNTERS_PER_SLOT - 1);
        let named = self
            .stats
            .get(&last, 0)
            .context("reading OVL_STATS")?
            .iter()
            .all(|s| s.counter == STAT_COUNTERS_PER_SLOT - 1);
        if named {
            return Ok(());
        }
        self.name_counters(0, NO_NETWORK, false)
    }

    pub fn set_nat_config(&mut self, cfg: &NatConfig) -> anyhow::Result<()> {
        self.nat_config
            .set(0, cfg, 0)
            .context("writing OVL_NAT_CONFIG")
    }

    pub fn nat_config(&self) -> anyhow::Result<NatConfig> {
        self.nat_config.get(&0, 0).context("reading OVL_NAT_CONFIG")
    }

    /// Every connection-tracking entry (two per masqueraded flow), read in batches: the datapath
    /// adds and removes entries during the walk (see [`crate::batch`]).
    pub fn nat_entries(&self) -> anyhow::Result<Vec<(NatKey, NatEntry)>> {
        read_hash(&self.nat).context("reading OVL_NAT")
    }

    pub fn remove_nat(&mut self, key: &NatKey) -> anyhow::Result<()> {
        ignore_missing(self.nat.remove(key)).context("removing an entry from OVL_NAT")
    }

    /// Live flows per container and destination, as the datapath counts them.
    pub fn nat_quotas(&self) -> anyhow::Result<Vec<(NatQuotaKey, NatQuota)>> {
        read_hash(&self.nat_quota).context("reading OVL_NAT_QUOTA")
    }

    /// Makes `OVL_NAT_QUOTA` hold exactly these counts (the agent's recount of live flows).
    pub fn set_nat_quotas(&mut self, counts: &BTreeMap<NatQuotaKey, u32>) -> anyhow::Result<()> {
        for (k, flows) in counts {
            self.nat_quota
                .insert(k, NatQuota::new(*flows), 0)
                .context("writing OVL_NAT_QUOTA")?;
        }
        for (k, _) in self.nat_quotas()? {
            if !counts.contains_key(&k) {
                ignore_missing(self.nat_quota.remove(&k))
                    .context("removing an entry from OVL_NAT_QUOTA")?;
            }
        }
        Ok(())
    }

    /// The control-plane destinations containers may not reach.
    pub fn protected(&self) -> anyhow::Result<Vec<ProtectedDestination>> {
        self.protected
            .keys()
            .map(|k| k.map(|k| ProtectedDestination::from_key(&k)))
            .collect::<Result<_, _>>()
            .context("reading OVL_PROTECTED")
    }

    /// Makes `OVL_PROTECTED` hold exactly `wanted`.
    pub fn set_protected(&mut self, wanted: &[ProtectedDestination]) -> anyhow::Result<()> {
        for d in wanted {
            self.protected
                .insert(d.key(), Protected::default(), 0)
                .with_context(|| format!("writing OVL_PROTECTED entry {d:?}"))?;
        }
        for d in self.protected()? {
            if !wanted.contains(&d) {
                ignore_missing(self.protected.remove(&d.key()))
                    .context("removing an entry from OVL_PROTECTED")?;
            }
        }
        Ok(())
    }

    /// Packets counted for `counter` on network (id) `network` (0 if never hit).
    pub fn stat(&self, network: u32, counter: Counter) -> anyhow::Result<u64> {
        Ok(self
            .stats()?
            .iter()
            .find(|r| r.network == network && r.counter == counter)
            .map_or(0, |r| r.packets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_hop_slots_are_given_lowest_first_kept_and_taken_back() {
        let ip = |last: u8| IpAddr::V4(Ipv4Addr::new(10, 0, 0, last));
        let mut slots = HopSlots::default();
        assert_eq!((slots.give(ip(1)), slots.give(ip(2))), (1, 2));
        assert_eq!(slots.give(ip(1)), 1, "a VTEP keeps its slot");
        assert_eq!(slots.take_back(ip(1)), Some(1));
        assert_eq!(slots.take_back(ip(1)), None);
        assert_eq!(slots.give(ip(3)), 1, "the slot given back goes first");
        assert_eq!(slots.give(ip(4)), 3);
        // All taken: none (the kernel's lookup), and nothing recorded.
        slots.next = capacity::NEXT_HOPS;
        assert_eq!(slots.give(ip(5)), 0);
        assert!(!slots.of.contains_key(&ip(5)));
    }

    #[test]
    fn prefixes_round_trip_through_their_lpm_keys() {
        for net in [
            "9.0.1.0/24",
            "9.0.1.2/31",
            "9.0.1.2/32",
            "0.0.0.0/0",
            "fd01:b::/64",
        ] {
            let net: IpNetwork = net.parse().unwrap();
            let key = prefix_key(net);
            assert_eq!(key_prefix(&key).unwrap(), net, "{net}");
        }
        // IPv4 prefixes sit inside the mapped /96; IPv6 ones count from bit 0.
        assert_eq!(prefix_key("9.0.1.0/24".parse().unwrap()).prefix_len(), 120);
        assert_eq!(prefix_key("fd01:b::/64".parse().unwrap()).prefix_len(), 64);
        let ip: IpAddr = "9.0.1.2".parse().unwrap();
        assert_eq!(from_addr16(&addr16(ip)), ip);
    }
}
