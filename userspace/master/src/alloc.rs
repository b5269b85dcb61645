//! Address allocation as DC/OS does it (lowest free VTEP address, lowest free per-agent subnet),
//! on in-memory free sets: each pool keeps its free indices as disjoint intervals, so taking the
//! lowest free one, reserving a given one and releasing one are all O(log n) even with 10,000
//! agents, and a pool rebuilt from the store on start is as small as its fragmentation.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnetwork::{Ipv4Network, Ipv6Network};
use overlay_api::{NetworkConfig, OverlayInfo};

use crate::store::{AgentNetworkRecord, AgentRecord};

/// Free indices of `[first, last]` as disjoint intervals (start -> inclusive end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexPool {
    first: u128,
    last: u128,
    free: BTreeMap<u128, u128>,
    allocated: u128,
}

impl IndexPool {
    /// A pool of `[first, last]`, all free; empty when `first > last`.
    pub fn new(first: u128, last: u128) -> Self {
        let mut free = BTreeMap::new();
        if first <= last {
            free.insert(first, last);
        }
        IndexPool {
            first,
            last,
            free,
            allocated: 0,
        }
    }

    pub fn allocated(&self) -> u128 {
        self.allocated
    }

    pub fn contains_index(&self, index: u128) -> bool {
        self.first <= index && index <= self.last
    }

    /// Takes the lowest free index.
    pub fn take_lowest(&mut self) -> Option<u128> {
        let (&start, &end) = self.free.iter().next()?;
        self.free.remove(&start);
        if start < end {
            self.free.insert(start + 1, end);
        }
        self.allocated += 1;
        Some(start)
    }

    /// Marks `index` as allocated; false when it is outside the pool or already allocated.
    pub fn reserve(&mut self, index: u128) -> bool {
        let Some((&start, &end)) = self.free.range(..=index).next_back() else {
            return false;
        };
        if index > end {
            return false;
        }
        self.free.remove(&start);
        if start < index {
            self.free.insert(start, index - 1);
        }
        if index < end {
            self.free.insert(index + 1, end);
        }
        self.allocated += 1;
        true
    }

    /// Returns `index` to the pool; false when it was not allocated.
    pub fn release(&mut self, index: u128) -> bool {
        if !self.contains_index(index) || self.is_free(index) {
            return false;
        }
        let mut start = index;
        let mut end = index;
        // Merge with the interval just below and the one just above.
        if index > 0
            && let Some((&below_start, &below_end)) = self.free.range(..index).next_back()
            && below_end == index - 1
        {
            self.free.remove(&below_start);
            start = below_start;
        }
        if index < u128::MAX
            && let Some(&above_end) = self.free.get(&(index + 1))
        {
            self.free.remove(&(index + 1));
            end = above_end;
        }
        self.free.insert(start, end);
        self.allocated -= 1;
        true
    }

    pub fn is_free(&self, index: u128) -> bool {
        self.free
            .range(..=index)
            .next_back()
            .is_some_and(|(_, &end)| index <= end)
    }
}

/// Host addresses of an IPv4 subnet (without network and broadcast addresses).
#[derive(Debug, Clone)]
pub struct HostPool4 {
    subnet: Ipv4Network,
    pool: IndexPool,
}

impl HostPool4 {
    pub fn new(subnet: Ipv4Network) -> Self {
        let size = 1u128 << (32 - u32::from(subnet.prefix()));
        HostPool4 {
            subnet,
            pool: IndexPool::new(1, size.saturating_sub(2)),
        }
    }

    pub fn take_lowest(&mut self) -> Option<Ipv4Addr> {
        let index = self.pool.take_lowest()?;
        Some(self.address(index))
    }

    pub fn reserve(&mut self, ip: Ipv4Addr) -> bool {
        self.index(ip).is_some_and(|i| self.pool.reserve(i))
    }

    pub fn release(&mut self, ip: Ipv4Addr) -> bool {
        self.index(ip).is_some_and(|i| self.pool.release(i))
    }

    pub fn allocated(&self) -> u128 {
        self.pool.allocated()
    }

    fn address(&self, index: u128) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + index as u32)
    }

    fn index(&self, ip: Ipv4Addr) -> Option<u128> {
        self.subnet
            .contains(ip)
            .then(|| u128::from(u32::from(ip) - u32::from(self.subnet.network())))
    }
}

/// Host addresses of an IPv6 subnet (without the all-zero subnet-router anycast address).
#[derive(Debug, Clone)]
pub struct HostPool6 {
    subnet: Ipv6Network,
    pool: IndexPool,
}

impl HostPool6 {
    pub fn new(subnet: Ipv6Network) -> Self {
        let host_bits = 128 - u32::from(subnet.prefix());
        let last = if host_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        HostPool6 {
            subnet,
            pool: IndexPool::new(1, last),
        }
    }

    pub fn take_lowest(&mut self) -> Option<Ipv6Addr> {
        let index = self.pool.take_lowest()?;
        Some(Ipv6Addr::from(u128::from(self.subnet.network()) + index))
    }

    pub fn reserve(&mut self, ip: Ipv6Addr) -> bool {
        self.index(ip).is_some_and(|i| self.pool.reserve(i))
    }

    pub fn release(&mut self, ip: Ipv6Addr) -> bool {
        self.index(ip).is_some_and(|i| self.pool.release(i))
    }

    pub fn allocated(&self) -> u128 {
        self.pool.allocated()
    }

    fn index(&self, ip: Ipv6Addr) -> Option<u128> {
        self.subnet
            .contains(ip)
            .then(|| u128::from(ip) - u128::from(self.subnet.network()))
    }
}

/// The `/prefix` blocks of an IPv4 subnet.
#[derive(Debug, Clone)]
pub struct SubnetPool4 {
    subnet: Ipv4Network,
    prefix: u8,
    pool: IndexPool,
}

impl SubnetPool4 {
    pub fn new(subnet: Ipv4Network, prefix: u8) -> Self {
        let count = 1u128 << (prefix.saturating_sub(subnet.prefix()));
        SubnetPool4 {
            subnet,
            prefix,
            pool: IndexPool::new(0, count - 1),
        }
    }

    pub fn take_lowest(&mut self) -> Option<Ipv4Network> {
        let index = self.pool.take_lowest()?;
        let block = 1u64 << (32 - u32::from(self.prefix));
        let start = u64::from(u32::from(self.subnet.network())) + index as u64 * block;
        Some(Ipv4Network::new(Ipv4Addr::from(start as u32), self.prefix).expect("prefix <= 32"))
    }

    pub fn reserve(&mut self, block: Ipv4Network) -> bool {
        self.index(block).is_some_and(|i| self.pool.reserve(i))
    }

    pub fn release(&mut self, block: Ipv4Network) -> bool {
        self.index(block).is_some_and(|i| self.pool.release(i))
    }

    pub fn allocated(&self) -> u128 {
        self.pool.allocated()
    }

    /// Index of a block of this pool's size and alignment inside its subnet.
    fn index(&self, block: Ipv4Network) -> Option<u128> {
        if block.prefix() != self.prefix || block.ip() != block.network() {
            return None;
        }
        if !self.subnet.contains(block.network()) {
            return None;
        }
        let offset = u32::from(block.network()) - u32::from(self.subnet.network());
        Some(u128::from(offset >> (32 - u32::from(self.prefix))))
    }
}

/// The `/prefix6` blocks of an IPv6 subnet.
#[derive(Debug, Clone)]
pub struct SubnetPool6 {
    subnet: Ipv6Network,
    prefix: u8,
    pool: IndexPool,
}

impl SubnetPool6 {
    pub fn new(subnet: Ipv6Network, prefix: u8) -> Self {
        let bits = u32::from(prefix.saturating_sub(subnet.prefix()));
        let last = if bits >= 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        };
        SubnetPool6 {
            subnet,
            prefix,
            pool: IndexPool::new(0, last),
        }
    }

    fn shift(&self) -> u32 {
        128 - u32::from(self.prefix)
    }

    pub fn take_lowest(&mut self) -> Option<Ipv6Network> {
        let index = self.pool.take_lowest()?;
        let start = u128::from(self.subnet.network()) + (index << self.shift());
        Some(Ipv6Network::new(Ipv6Addr::from(start), self.prefix).expect("prefix <= 128"))
    }

    pub fn reserve(&mut self, block: Ipv6Network) -> bool {
        self.index(block).is_some_and(|i| self.pool.reserve(i))
    }

    pub fn release(&mut self, block: Ipv6Network) -> bool {
        self.index(block).is_some_and(|i| self.pool.release(i))
    }

    pub fn allocated(&self) -> u128 {
        self.pool.allocated()
    }

    fn index(&self, block: Ipv6Network) -> Option<u128> {
        if block.prefix() != self.prefix || block.ip() != block.network() {
            return None;
        }
        if !self.subnet.contains(block.network()) {
            return None;
        }
        let offset = u128::from(block.network()) - u128::from(self.subnet.network());
        Some(offset >> self.shift())
    }
}

/// The pools of one network.
#[derive(Debug, Clone)]
pub struct NetworkPools {
    pub v4: Option<SubnetPool4>,
    pub v6: Option<SubnetPool6>,
}

/// Why an allocation failed; `label` is the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureReason {
    VtepExhausted,
    Vtep6Exhausted,
    SubnetExhausted,
    Subnet6Exhausted,
}

impl FailureReason {
    pub fn label(self) -> &'static str {
        match self {
            FailureReason::VtepExhausted => "vtep_exhausted",
            FailureReason::Vtep6Exhausted => "vtep6_exhausted",
            FailureReason::SubnetExhausted => "subnet_exhausted",
            FailureReason::Subnet6Exhausted => "subnet6_exhausted",
        }
    }
}

/// A failed allocation (for metrics): the reason and the network, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: FailureReason,
    pub network: Option<String>,
}

/// One freed allocation (the VTEP MAC is derived from the VTEP address, so it goes with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freed {
    Vtep(Ipv4Addr),
    Vtep6(Ipv6Addr),
    Subnet(String, Ipv4Network),
    Subnet6(String, Ipv6Network),
}

/// Freed allocations held back from reuse until their time is up: the agent that held them may
/// still be running with them (deleted while alive, or a heartbeat in flight), and handing them
/// to a newcomer would give two hosts one VTEP or subnet.
#[derive(Debug, Clone, Default)]
pub struct Quarantine {
    hold: Duration,
    /// (reusable from, former owner, allocation), oldest first (the writer's clock is
    /// monotonic).
    entries: VecDeque<(Instant, IpAddr, Freed)>,
}

impl Quarantine {
    pub fn new(hold: Duration) -> Self {
        Quarantine {
            hold,
            entries: VecDeque::new(),
        }
    }

    pub fn hold(&self) -> Duration {
        self.hold
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Every pool of one configuration.
#[derive(Debug, Clone)]
pub struct Allocator {
    config: NetworkConfig,
    vtep4: HostPool4,
    vtep6: Option<HostPool6>,
    networks: BTreeMap<String, NetworkPools>,
    /// Freed allocations still reserved in the pools above, released when their time is up.
    quarantine: Quarantine,
}

/// What happened while (re)building pools from stored records.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// Allocations dropped because they no longer fit or clashed with another agent's.
    pub dropped: Vec<String>,
}

impl Allocator {
    /// Empty pools for a validated configuration.
    pub fn new(config: &NetworkConfig) -> Self {
        let networks = config
            .overlays
            .iter()
            .map(|o| (o.name.clone(), Self::network_pools(o)))
            .collect();
        Allocator {
            config: config.clone(),
            vtep4: HostPool4::new(config.vtep_subnet),
            vtep6: config.vtep_subnet6.map(HostPool6::new),
            networks,
            quarantine: Quarantine::default(),
        }
    }

    /// Freed allocations are held for `hold` before reuse (zero: reused at once).
    pub fn set_quarantine_hold(&mut self, hold: Duration) {
        self.quarantine.hold = hold;
    }

    /// Allocations freed but not reusable yet.
    pub fn quarantined(&self) -> usize {
        self.quarantine.len()
    }

    pub fn quarantine(&self) -> &Quarantine {
        &self.quarantine
    }

    /// Hands the quarantine over (to the allocator of a new configuration).
    pub fn take_quarantine(&mut self) -> Quarantine {
        let hold = self.quarantine.hold;
        std::mem::replace(&mut self.quarantine, Quarantine::new(hold))
    }

    /// Takes over another allocator's quarantine: each entry is reserved again in these pools;
    /// entries that no longer fit (network removed, subnet changed) or that an agent holds now
    /// are dropped.
    pub fn adopt_quarantine(&mut self, quarantine: Quarantine) {
        self.quarantine.hold = quarantine.hold;
        for (until, owner, freed) in quarantine.entries {
            if self.reserve_freed(&freed) {
                self.quarantine.entries.push_back((until, owner, freed));
            }
        }
    }

    /// Quarantines what `record` holds in these pools, for an agent deleted elsewhere (by
    /// another master of a shared store): its allocations, free in the reloaded pools, are
    /// held back as if deleted here. Those already taken are left alone.
    pub fn quarantine_record(&mut self, record: &AgentRecord, now: Instant) {
        if self.quarantine.hold.is_zero() {
            return;
        }
        let mut freed = Vec::new();
        freed.extend(record.vtep_ip.map(Freed::Vtep));
        freed.extend(record.vtep_ip6.map(Freed::Vtep6));
        for (name, entry) in &record.networks {
            freed.extend(entry.subnet.map(|b| Freed::Subnet(name.clone(), b)));
            freed.extend(entry.subnet6.map(|b| Freed::Subnet6(name.clone(), b)));
        }
        let until = now + self.quarantine.hold;
        for item in freed {
            if self.reserve_freed(&item) {
                self.quarantine.entries.push_back((until, record.ip, item));
            }
        }
    }

    fn reserve_freed(&mut self, freed: &Freed) -> bool {
        match freed {
            Freed::Vtep(ip) => self.vtep4.reserve(*ip),
            Freed::Vtep6(ip) => self.vtep6.as_mut().is_some_and(|p| p.reserve(*ip)),
            Freed::Subnet(name, block) => self
                .networks
                .get_mut(name)
                .and_then(|p| p.v4.as_mut())
                .is_some_and(|p| p.reserve(*block)),
            Freed::Subnet6(name, block) => self
                .networks
                .get_mut(name)
                .and_then(|p| p.v6.as_mut())
                .is_some_and(|p| p.reserve(*block)),
        }
    }

    fn release_freed(&mut self, freed: &Freed) {
        match freed {
            Freed::Vtep(ip) => {
                self.vtep4.release(*ip);
            }
            Freed::Vtep6(ip) => {
                if let Some(pool) = self.vtep6.as_mut() {
                    pool.release(*ip);
                }
            }
            Freed::Subnet(name, block) => {
                if let Some(pool) = self.networks.get_mut(name).and_then(|p| p.v4.as_mut()) {
                    pool.release(*block);
                }
            }
            Freed::Subnet6(name, block) => {
                if let Some(pool) = self.networks.get_mut(name).and_then(|p| p.v6.as_mut()) {
                    pool.release(*block);
                }
            }
        }
    }

    /// Frees an allocation of `owner`: into quarantine (still reserved) or, without one, at
    /// once.
    fn free(&mut self, owner: IpAddr, freed: Freed, now: Instant) {
        if self.quarantine.hold.is_zero() {
            self.release_freed(&freed);
        } else {
            self.quarantine
                .entries
                .push_back((now + self.quarantine.hold, owner, freed));
        }
    }

    /// Gives an agent back what was quarantined from it (it was deleted while alive and has
    /// registered again): its old VTEP and blocks instead of new ones, so its running
    /// containers keep working. Returns how many allocations came back.
    pub fn reclaim(&mut self, agent: &mut AgentRecord) -> usize {
        let owner = agent.ip;
        let mut reclaimed = 0;
        let entries = std::mem::take(&mut self.quarantine.entries);
        for (until, from, freed) in entries {
            if from != owner {
                self.quarantine.entries.push_back((until, from, freed));
                continue;
            }
            // Still reserved in the pools: it only changes hands back.
            let slot_free = match &freed {
                Freed::Vtep(ip) => agent.vtep_ip.is_none().then(|| agent.vtep_ip = Some(*ip)),
                Freed::Vtep6(ip) => agent.vtep_ip6.is_none().then(|| agent.vtep_ip6 = Some(*ip)),
                Freed::Subnet(name, block) => {
                    let entry = agent
                        .networks
                        .entry(name.clone())
                        .or_insert(AgentNetworkRecord {
                            subnet: None,
                            subnet6: None,
                            error: None,
                        });
                    entry.subnet.is_none().then(|| entry.subnet = Some(*block))
                }
                Freed::Subnet6(name, block) => {
                    let entry = agent
                        .networks
                        .entry(name.clone())
                        .or_insert(AgentNetworkRecord {
                            subnet: None,
                            subnet6: None,
                            error: None,
                        });
                    entry
                        .subnet6
                        .is_none()
                        .then(|| entry.subnet6 = Some(*block))
                }
            };
            if slot_free.is_some() {
                reclaimed += 1;
            } else {
                self.quarantine.entries.push_back((until, from, freed));
            }
        }
        reclaimed
    }

    /// Returns to the pools every quarantined allocation whose time is up; returns how many.
    pub fn expire_quarantine(&mut self, now: Instant) -> usize {
        let mut released = 0;
        while let Some((until, _, _)) = self.quarantine.entries.front()
            && *until <= now
        {
            let (_, _, freed) = self.quarantine.entries.pop_front().expect("front exists");
            self.release_freed(&freed);
            released += 1;
        }
        released
    }

    fn network_pools(overlay: &OverlayInfo) -> NetworkPools {
        NetworkPools {
            v4: overlay
                .subnet
                .zip(overlay.prefix)
                .map(|(s, p)| SubnetPool4::new(s, p)),
            v6: overlay
                .subnet6
                .zip(overlay.prefix6)
                .map(|(s, p)| SubnetPool6::new(s, p)),
        }
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    pub fn vteps_allocated(&self) -> u128 {
        self.vtep4.allocated()
    }

    /// Allocated (IPv4, IPv6) blocks per network.
    pub fn subnets_allocated(&self) -> impl Iterator<Item = (&str, u128, u128)> {
        self.networks.iter().map(|(name, pools)| {
            (
                name.as_str(),
                pools.v4.as_ref().map_or(0, SubnetPool4::allocated),
                pools.v6.as_ref().map_or(0, SubnetPool6::allocated),
            )
        })
    }

    /// Re-reserves a stored agent's allocations, dropping (and reporting) those that do not
    /// fit this configuration or are already held by another agent, and entries of networks
    /// that no longer exist. Returns the cleaned record.
    pub fn restore(&mut self, mut agent: AgentRecord, report: &mut RestoreReport) -> AgentRecord {
        if let Some(ip) = agent.vtep_ip
            && !self.vtep4.reserve(ip)
        {
            report.dropped.push(format!(
                "agent {}: VTEP {ip} (outside vtep_subnet or taken)",
                agent.ip
            ));
            agent.vtep_ip = None;
        }
        if let Some(ip6) = agent.vtep_ip6 {
            let kept = self.vtep6.as_mut().is_some_and(|pool| pool.reserve(ip6));
            if !kept {
                report.dropped.push(format!(
                    "agent {}: VTEP {ip6} (outside vtep_subnet6 or taken)",
                    agent.ip
                ));
                agent.vtep_ip6 = None;
            }
        }
        let agent_ip = agent.ip;
        agent.networks.retain(|name, entry| {
            let Some(pools) = self.networks.get_mut(name) else {
                return false;
            };
            if let Some(block) = entry.subnet {
                let kept = pools.v4.as_mut().is_some_and(|pool| pool.reserve(block));
                if !kept {
                    report.dropped.push(format!(
                        "agent {agent_ip}: {name} subnet {block} (does not fit or taken)"
                    ));
                    entry.subnet = None;
                }
            }
            if let Some(block) = entry.subnet6 {
                let kept = pools.v6.as_mut().is_some_and(|pool| pool.reserve(block));
                if !kept {
                    report.dropped.push(format!(
                        "agent {agent_ip}: {name} subnet6 {block} (does not fit or taken)"
                    ));
                    entry.subnet6 = None;
                }
            }
            true
        });
        agent
    }

    /// True when the agent holds everything this configuration gives it.
    pub fn is_complete(&self, agent: &AgentRecord) -> bool {
        if agent.vtep_error.is_some()
            || agent.vtep_ip.is_none()
            || (self.vtep6.is_some() && agent.vtep_ip6.is_none())
        {
            return false;
        }
        self.config.overlays.iter().all(|overlay| {
            // A disabled network is not given to agents that do not hold it yet (DC/OS).
            if !overlay.is_enabled() && !agent.networks.contains_key(&overlay.name) {
                return true;
            }
            agent.networks.get(&overlay.name).is_some_and(|entry| {
                entry.error.is_none()
                    && (overlay.subnet.is_none() || entry.subnet.is_some())
                    && (overlay.subnet6.is_none() || entry.subnet6.is_some())
            })
        })
    }

    /// Allocates whatever the agent lacks (VTEP addresses, a block of each network), retrying
    /// earlier failures. Exhaustion is recorded in the agent (its state becomes STATUS_FAILED)
    /// and returned for metrics; the agent's other allocations are kept.
    pub fn allocate_missing(&mut self, agent: &mut AgentRecord) -> Vec<Failure> {
        self.allocate_missing_at(agent, Instant::now())
    }

    /// [`Self::allocate_missing`] at `now` (blocks given up for lack of a VTEP are quarantined
    /// from then).
    pub fn allocate_missing_at(&mut self, agent: &mut AgentRecord, now: Instant) -> Vec<Failure> {
        let mut failures = Vec::new();
        agent.vtep_error = None;
        if agent.vtep_ip.is_none() {
            agent.vtep_ip = self.vtep4.take_lowest();
        }
        if let Some(pool) = self.vtep6.as_mut()
            && agent.vtep_ip6.is_none()
        {
            agent.vtep_ip6 = pool.take_lowest();
        }
        if agent.vtep_ip.is_none() {
            agent.vtep_error = Some(format!(
                "no free VTEP address left in vtep_subnet {}",
                self.config.vtep_subnet
            ));
            failures.push(Failure {
                reason: FailureReason::VtepExhausted,
                network: None,
            });
        } else if let Some(subnet6) = self.config.vtep_subnet6
            && agent.vtep_ip6.is_none()
        {
            agent.vtep_error = Some(format!(
                "no free VTEP address left in vtep_subnet6 {subnet6}"
            ));
            failures.push(Failure {
                reason: FailureReason::Vtep6Exhausted,
                network: None,
            });
        }
        if agent.vtep_error.is_some() {
            // Without a VTEP the agent cannot use any network: hold no blocks for it.
            self.release_networks(agent, now);
            return failures;
        }
        for overlay in &self.config.overlays {
            if !overlay.is_enabled() && !agent.networks.contains_key(&overlay.name) {
                continue;
            }
            let pools = self
                .networks
                .get_mut(&overlay.name)
                .expect("pools exist for every configured network");
            let entry = agent
                .networks
                .entry(overlay.name.clone())
                .or_insert(AgentNetworkRecord {
                    subnet: None,
                    subnet6: None,
                    error: None,
                });
            entry.error = None;
            let mut errors = Vec::new();
            if let Some(pool) = pools.v4.as_mut()
                && entry.subnet.is_none()
            {
                entry.subnet = pool.take_lowest();
                if entry.subnet.is_none() {
                    errors.push(format!(
                        "no free /{} left in subnet {}",
                        overlay.prefix.unwrap_or_default(),
                        overlay.subnet.expect("pool implies subnet")
                    ));
                    failures.push(Failure {
                        reason: FailureReason::SubnetExhausted,
                        network: Some(overlay.name.clone()),
                    });
                }
            }
            if let Some(pool) = pools.v6.as_mut()
                && entry.subnet6.is_none()
            {
                entry.subnet6 = pool.take_lowest();
                if entry.subnet6.is_none() {
                    errors.push(format!(
                        "no free /{} left in subnet6 {}",
                        overlay.prefix6.unwrap_or_default(),
                        overlay.subnet6.expect("pool implies subnet6")
                    ));
                    failures.push(Failure {
                        reason: FailureReason::Subnet6Exhausted,
                        network: Some(overlay.name.clone()),
                    });
                }
            }
            if !errors.is_empty() {
                entry.error = Some(format!("network {}: {}", overlay.name, errors.join(", ")));
            }
        }
        failures
    }

    /// Frees everything the agent holds (through the quarantine, if one is set).
    pub fn release_agent(&mut self, agent: &mut AgentRecord) {
        self.release_agent_at(agent, Instant::now());
    }

    /// [`Self::release_agent`] at `now`.
    pub fn release_agent_at(&mut self, agent: &mut AgentRecord, now: Instant) {
        let owner = agent.ip;
        if let Some(ip) = agent.vtep_ip.take() {
            self.free(owner, Freed::Vtep(ip), now);
        }
        if let Some(ip6) = agent.vtep_ip6.take()
            && self.vtep6.is_some()
        {
            self.free(owner, Freed::Vtep6(ip6), now);
        }
        self.release_networks(agent, now);
    }

    /// Returns at once (no quarantine) everything a registration that is being dropped took:
    /// nobody ever saw it.
    pub fn release_tentative(&mut self, agent: &mut AgentRecord) {
        let mut freed = Vec::new();
        freed.extend(agent.vtep_ip.take().map(Freed::Vtep));
        freed.extend(agent.vtep_ip6.take().map(Freed::Vtep6));
        for (name, entry) in std::mem::take(&mut agent.networks) {
            freed.extend(entry.subnet.map(|b| Freed::Subnet(name.clone(), b)));
            freed.extend(entry.subnet6.map(|b| Freed::Subnet6(name.clone(), b)));
        }
        for item in &freed {
            self.release_freed(item);
        }
    }

    fn release_networks(&mut self, agent: &mut AgentRecord, now: Instant) {
        let owner = agent.ip;
        for (name, entry) in std::mem::take(&mut agent.networks) {
            let Some(pools) = self.networks.get(&name) else {
                continue;
            };
            let (has_v4, has_v6) = (pools.v4.is_some(), pools.v6.is_some());
            if let (Some(block), true) = (entry.subnet, has_v4) {
                self.free(owner, Freed::Subnet(name.clone(), block), now);
            }
            if let (Some(block), true) = (entry.subnet6, has_v6) {
                self.free(owner, Freed::Subnet6(name, block), now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{assign_network_ids, dcos_default};
    use overlay_api::subnets::{halves4, halves6};
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::net::IpAddr;

    fn config_with(vtep: &str, subnet: &str, prefix: u8) -> NetworkConfig {
        let mut config = dcos_default();
        config.vtep_subnet = vtep.parse().unwrap();
        config.overlays[0].subnet = Some(subnet.parse().unwrap());
        config.overlays[0].prefix = Some(prefix);
        assign_network_ids(&mut config.overlays);
        config
    }

    fn agent(n: u32) -> AgentRecord {
        AgentRecord::new(IpAddr::from(Ipv4Addr::from(0x0a00_0000 + n)))
    }

    #[test]
    fn index_pool_takes_lowest_and_merges_on_release() {
        let mut pool = IndexPool::new(1, 10);
        assert_eq!(pool.take_lowest(), Some(1));
        assert_eq!(pool.take_lowest(), Some(2));
        assert!(pool.reserve(5));
        assert!(!pool.reserve(5));
        assert!(!pool.reserve(11));
        assert_eq!(pool.take_lowest(), Some(3));
        assert!(pool.release(2));
        assert!(!pool.release(2));
        assert_eq!(pool.take_lowest(), Some(2));
        assert!(pool.release(5));
        assert!(pool.release(3));
        assert!(pool.release(2));
        assert!(pool.release(1));
        assert_eq!(
            pool.free.len(),
            1,
            "released indices merge back into one interval"
        );
        assert_eq!(pool.allocated(), 0);
    }

    #[test]
    fn dcos_example_allocation() {
        let config = config_with("44.128.0.0/20", "9.0.0.0/8", 24);
        let mut alloc = Allocator::new(&config);
        let mut first = agent(1);
        let mut second = agent(2);
        assert!(alloc.allocate_missing(&mut first).is_empty());
        assert!(alloc.allocate_missing(&mut second).is_empty());
        assert_eq!(second.vtep_ip, Some("44.128.0.2".parse().unwrap()));
        assert_eq!(second.vtep_ip6, Some("fd01:a::2".parse().unwrap()));
        let dcos = &second.networks["dcos"];
        assert_eq!(dcos.subnet, Some("9.0.1.0/24".parse().unwrap()));
        let (mesos, docker) = halves4(dcos.subnet.unwrap());
        assert_eq!(mesos, "9.0.1.0/25".parse().unwrap());
        assert_eq!(docker, "9.0.1.128/25".parse().unwrap());
        let dcos6 = &second.networks["dcos6"];
        assert_eq!(dcos6.subnet6, Some("fd01:b::1:0:0:0/80".parse().unwrap()));
        let (mesos6, docker6) = halves6(dcos6.subnet6.unwrap());
        assert_eq!(mesos6, "fd01:b::1:0:0:0/81".parse().unwrap());
        assert_eq!(docker6, "fd01:b::1:8000:0:0/81".parse().unwrap());
        assert!(alloc.is_complete(&second));
    }

    #[test]
    fn lowest_free_is_reused_after_release() {
        let config = config_with("44.128.0.0/20", "9.0.0.0/8", 24);
        let mut alloc = Allocator::new(&config);
        let mut agents: Vec<AgentRecord> = (0..5).map(agent).collect();
        for a in &mut agents {
            alloc.allocate_missing(a);
        }
        alloc.release_agent(&mut agents[1]);
        let mut newcomer = agent(100);
        alloc.allocate_missing(&mut newcomer);
        assert_eq!(newcomer.vtep_ip, Some("44.128.0.2".parse().unwrap()));
        assert_eq!(
            newcomer.networks["dcos"].subnet,
            Some("9.0.1.0/24".parse().unwrap())
        );
    }

    #[test]
    fn exhaustion_is_recorded_and_retried() {
        // A /30 has two VTEP addresses; the network has two /24s.
        let config = config_with("44.128.0.0/30", "9.0.0.0/23", 24);
        let mut alloc = Allocator::new(&config);
        let mut a = agent(1);
        let mut b = agent(2);
        let mut c = agent(3);
        assert!(alloc.allocate_missing(&mut a).is_empty());
        assert!(alloc.allocate_missing(&mut b).is_empty());
        let failures = alloc.allocate_missing(&mut c);
        assert_eq!(failures[0].reason, FailureReason::VtepExhausted);
        assert!(c.vtep_error.as_deref().unwrap().contains("44.128.0.0/30"));
        assert!(c.networks.is_empty());
        assert!(!alloc.is_complete(&c));

        alloc.release_agent(&mut a);
        assert!(alloc.allocate_missing(&mut c).is_empty());
        assert!(alloc.is_complete(&c));
        assert_eq!(c.vtep_ip, Some("44.128.0.1".parse().unwrap()));
    }

    #[test]
    fn subnet_exhaustion_fails_only_that_network() {
        let config = config_with("44.128.0.0/20", "9.0.0.0/24", 24);
        let mut alloc = Allocator::new(&config);
        let mut a = agent(1);
        let mut b = agent(2);
        alloc.allocate_missing(&mut a);
        let failures = alloc.allocate_missing(&mut b);
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].reason, FailureReason::SubnetExhausted);
        assert_eq!(failures[0].network.as_deref(), Some("dcos"));
        assert!(
            b.networks["dcos"]
                .error
                .as_deref()
                .unwrap()
                .contains("9.0.0.0/24")
        );
        assert!(b.networks["dcos6"].subnet6.is_some());
    }

    #[test]
    fn restore_drops_clashing_allocations() {
        let config = config_with("44.128.0.0/20", "9.0.0.0/8", 24);
        let mut alloc = Allocator::new(&config);
        let mut a = agent(1);
        alloc.allocate_missing(&mut a);
        let mut copy = a.clone();
        copy.ip = "10.9.9.9".parse().unwrap();

        let mut fresh = Allocator::new(&config);
        let mut report = RestoreReport::default();
        let a = fresh.restore(a, &mut report);
        let copy = fresh.restore(copy, &mut report);
        assert!(report.dropped.len() >= 3, "{:?}", report.dropped);
        assert!(fresh.is_complete(&a));
        assert!(copy.vtep_ip.is_none());
        assert!(!fresh.is_complete(&copy));
    }

    #[test]
    fn quarantined_allocations_are_not_reused_until_their_time_is_up() {
        let config = config_with("44.128.0.0/20", "9.0.0.0/8", 24);
        let mut alloc = Allocator::new(&config);
        alloc.set_quarantine_hold(Duration::from_secs(60));
        let t0 = Instant::now();
        let mut agents: Vec<AgentRecord> = (1..=3).map(agent).collect();
        for a in &mut agents {
            alloc.allocate_missing_at(a, t0);
        }
        let deleted = agents[1].clone();
        alloc.release_agent_at(&mut agents[1], t0);
        assert_eq!(alloc.quarantined(), 4, "VTEP, VTEP6, dcos and dcos6 blocks");

        // A newcomer within the quarantine gets fresh allocations, none of the deleted ones.
        let mut newcomer = agent(100);
        assert_eq!(alloc.expire_quarantine(t0 + Duration::from_secs(59)), 0);
        alloc.allocate_missing_at(&mut newcomer, t0 + Duration::from_secs(59));
        assert_ne!(newcomer.vtep_ip, deleted.vtep_ip);
        assert_ne!(newcomer.vtep_ip6, deleted.vtep_ip6);
        assert_ne!(
            newcomer.networks["dcos"].subnet,
            deleted.networks["dcos"].subnet
        );
        assert_ne!(
            newcomer.networks["dcos6"].subnet6,
            deleted.networks["dcos6"].subnet6
        );
        assert_eq!(newcomer.vtep_ip, Some("44.128.0.4".parse().unwrap()));

        // After it, they are reusable (lowest free again).
        assert_eq!(alloc.expire_quarantine(t0 + Duration::from_secs(60)), 4);
        assert_eq!(alloc.quarantined(), 0);
        let mut later = agent(101);
        alloc.allocate_missing_at(&mut later, t0 + Duration::from_secs(61));
        assert_eq!(later.vtep_ip, deleted.vtep_ip);
        assert_eq!(
            later.networks["dcos"].subnet,
            deleted.networks["dcos"].subnet
        );
    }

    #[test]
    fn a_deleted_agent_registering_again_gets_its_own_allocation_back() {
        let config = config_with("44.128.0.0/20", "9.0.0.0/8", 24);
        let mut alloc = Allocator::new(&config);
        alloc.set_quarantine_hold(Duration::from_secs(60));
        let t0 = Instant::now();
        let mut a = agent(1);
        let mut b = agent(2);
        alloc.allocate_missing_at(&mut a, t0);
        alloc.allocate_missing_at(&mut b, t0);
        let original = b.clone();
        alloc.release_agent_at(&mut b, t0);
        let mut back = agent(2);
        assert_eq!(alloc.reclaim(&mut back), 4);
        assert!(alloc.allocate_missing_at(&mut back, t0).is_empty());
        assert_eq!(back, original);
        assert_eq!(alloc.quarantined(), 0);
        // Nothing was double-counted: a rebuilt allocator agrees.
        let mut rebuilt = Allocator::new(&config);
        let mut report = RestoreReport::default();
        rebuilt.restore(a.clone(), &mut report);
        rebuilt.restore(back.clone(), &mut report);
        assert!(report.dropped.is_empty());
        assert_eq!(rebuilt.vteps_allocated(), alloc.vteps_allocated());
    }

    #[test]
    fn quarantine_survives_a_new_configuration_except_what_no_longer_fits() {
        let config = config_with("44.128.0.0/20", "9.0.0.0/8", 24);
        let mut alloc = Allocator::new(&config);
        alloc.set_quarantine_hold(Duration::from_secs(60));
        let t0 = Instant::now();
        let mut a = agent(1);
        alloc.allocate_missing_at(&mut a, t0);
        alloc.release_agent_at(&mut a, t0);
        let mut fewer = config.clone();
        fewer.overlays.retain(|o| o.name == "dcos");
        let mut next = Allocator::new(&fewer);
        next.adopt_quarantine(alloc.quarantine().clone());
        assert_eq!(
            next.quarantined(),
            3,
            "the dcos6 block went with its network"
        );
        let mut newcomer = agent(5);
        next.allocate_missing_at(&mut newcomer, t0);
        assert_eq!(newcomer.vtep_ip, Some("44.128.0.2".parse().unwrap()));
        assert_eq!(
            newcomer.networks["dcos"].subnet,
            Some("9.0.1.0/24".parse().unwrap())
        );
    }

    proptest! {
        /// With a quarantine, whatever sequence of registrations and deletions: no live agent
        /// ever gets an allocation freed less than the quarantine ago, and nothing leaks.
        #[test]
        fn nothing_freed_within_the_quarantine_is_handed_out(
            ops in proptest::collection::vec((0u32..30, any::<bool>(), 0u64..5), 1..150)
        ) {
            let config = config_with("44.128.0.0/26", "9.0.0.0/19", 24);
            let hold = Duration::from_secs(10);
            let mut alloc = Allocator::new(&config);
            alloc.set_quarantine_hold(hold);
            let t0 = Instant::now();
            let mut now = t0;
            let mut agents: BTreeMap<u32, AgentRecord> = BTreeMap::new();
            // VTEP address -> (freed at, by whom)
            let mut freed: BTreeMap<Ipv4Addr, (Instant, u32)> = BTreeMap::new();
            let mut freed_blocks: BTreeMap<Ipv4Network, (Instant, u32)> = BTreeMap::new();
            for (n, register, step) in ops {
                now += Duration::from_secs(step);
                alloc.expire_quarantine(now);
                if register {
                    if !agents.contains_key(&n) {
                        let mut record = agent(n);
                        alloc.reclaim(&mut record);
                        alloc.allocate_missing_at(&mut record, now);
                        if let Some(ip) = record.vtep_ip
                            && let Some((at, by)) = freed.get(&ip)
                        {
                            prop_assert!(*by == n || now.duration_since(*at) >= hold, "VTEP {} reused after {:?}", ip, now.duration_since(*at));
                        }
                        for entry in record.networks.values() {
                            if let Some(block) = entry.subnet
                                && let Some((at, by)) = freed_blocks.get(&block)
                            {
                                prop_assert!(*by == n || now.duration_since(*at) >= hold);
                            }
                        }
                        agents.insert(n, record);
                    }
                } else if let Some(mut record) = agents.remove(&n) {
                    if let Some(ip) = record.vtep_ip {
                        freed.insert(ip, (now, n));
                    }
                    for entry in record.networks.values() {
                        if let Some(block) = entry.subnet {
                            freed_blocks.insert(block, (now, n));
                        }
                    }
                    alloc.release_agent_at(&mut record, now);
                }
            }
            // Once every quarantine is over, the pools hold exactly the agents' allocations.
            alloc.expire_quarantine(now + hold);
            let held = agents.values().filter(|r| r.vtep_ip.is_some()).count() as u128;
            prop_assert_eq!(alloc.vteps_allocated(), held);
        }
    }

    proptest! {
        /// Any sequence of registrations and deletions leaves no two agents sharing a VTEP
        /// address, MAC or block, and a rebuilt allocator agrees with the running one.
        #[test]
        fn no_two_agents_share_anything(ops in proptest::collection::vec((0u32..40, any::<bool>()), 1..200)) {
            let config = config_with("44.128.0.0/26", "9.0.0.0/19", 24);
            let mut alloc = Allocator::new(&config);
            let mut agents: BTreeMap<u32, AgentRecord> = BTreeMap::new();
            for (n, register) in ops {
                if register {
                    let record = agents.entry(n).or_insert_with(|| agent(n));
                    alloc.allocate_missing(record);
                } else if let Some(mut record) = agents.remove(&n) {
                    alloc.release_agent(&mut record);
                }
            }
            let mut vteps = BTreeSet::new();
            let mut macs = BTreeSet::new();
            let mut blocks = BTreeSet::new();
            let mut blocks6 = BTreeSet::new();
            for record in agents.values() {
                if let Some(ip) = record.vtep_ip {
                    prop_assert!(config.vtep_subnet.contains(ip));
                    prop_assert!(vteps.insert(ip));
                    prop_assert!(macs.insert(overlay_api::MacAddr::vtep(config.vtep_mac_oui.mac(), ip)));
                }
                for entry in record.networks.values() {
                    if let Some(block) = entry.subnet {
                        prop_assert!(blocks.insert(block));
                    }
                    if let Some(block) = entry.subnet6 {
                        prop_assert!(blocks6.insert(block));
                    }
                }
            }
            // The pool's count agrees with the agents' records (nothing leaked on release).
            prop_assert_eq!(alloc.vteps_allocated(), vteps.len() as u128);
            let mut rebuilt = Allocator::new(&config);
            let mut report = RestoreReport::default();
            for record in agents.values() {
                let restored = rebuilt.restore(record.clone(), &mut report);
                prop_assert_eq!(&restored, record);
            }
            prop_assert!(report.dropped.is_empty());
            let mut probe_a = agent(1000);
            let mut probe_b = agent(1000);
            alloc.allocate_missing(&mut probe_a);
            rebuilt.allocate_missing(&mut probe_b);
            prop_assert_eq!(probe_a, probe_b);
        }
    }
}
