//! What the agent owns: the datapath and everything it knows (its allocation, the master's
//! state, its containers, counters). Exactly one task holds an [`Agent`]
//! ([`crate::runtime`]); everyone else sends it commands. Nothing here blocks for long: the
//! veth lookups of a request, the host's routes and the NAT sweep run outside it.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    sync::Arc,
};

use anyhow::Context as _;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use overlay_api::{
    AgentInfo, MacAddr, State,
    agent::{AddEndpoint, AgentStatus, EndpointInfo, Family, GcRequest, Half, IpamUsage, Released},
};

use crate::{
    cni_conf::{CniConfs, ConfNetwork},
    datapath::Datapath,
    desired::{DesiredDatapath, LocalFacts, agent_settings, vtep_of},
    endpoints::{Allocation, EndpointError, Endpoints, Veth},
    metrics::Snapshot,
    reconcile::{self, Plan},
    saved::{self, SavedState},
};

/// Where the state applied to the datapath came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateSource {
    /// Nothing applied yet.
    None,
    /// The state last applied before a restart, loaded because no master answered.
    Saved,
    /// The master's watch.
    Master,
}

impl StateSource {
    pub fn as_str(self) -> &'static str {
        match self {
            StateSource::None => "none",
            StateSource::Saved => "saved",
            StateSource::Master => "master",
        }
    }
}

/// What applying a state did.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Map entries changed.
    pub changed: usize,
    /// The host's routes into the overlay as they should be now (set outside the owner: it
    /// talks to the kernel's routing tables); None without a host link.
    pub host_routes: Option<BTreeMap<IpNetwork, IpAddr>>,
}

pub struct Agent {
    dp: Datapath,
    local: LocalFacts,
    /// This agent's allocation, from registration and every watched state.
    me: Option<AgentInfo>,
    state: Option<State>,
    /// Network name per VNI of `state`.
    names: BTreeMap<u32, String>,
    revision: u64,
    map_updates: u64,
    reconcile_errors: u64,
    endpoints: Endpoints,
    /// CNI config files kept in step with this agent's networks.
    cni_confs: Option<CniConfs>,
    /// Times the master changed this agent's VTEP or subnets under it, and the last change.
    allocation_changes: u64,
    allocation_changed: Option<String>,
    /// Wakes the heartbeat: the endpoint counts the master is told about changed.
    heartbeat_now: Arc<tokio::sync::Notify>,
    /// Where every applied state is saved, for a restart while no master answers.
    state_dir: Option<PathBuf>,
    state_source: StateSource,
    /// Whether the master answered the last request (registration, heartbeat, watch).
    master_reachable: bool,
    /// The NAT sweeper's last figures: entries left, entries expired since start.
    nat_entries: u64,
    /// Masqueraded flows by family (IPv4, IPv6), as of the last sweep.
    nat_flows: [u64; 2],
    nat_expired: u64,
    nat_sweep_seconds: f64,
    /// Remote VTEPs with a cached next hop and without, as last written.
    next_hops: [u64; 2],
}

impl Agent {
    /// The agent around a loaded datapath. Restores the endpoints the pinned map kept and
    /// writes the settings that need no master (masquerade).
    pub fn start(
        mut dp: Datapath,
        local: LocalFacts,
        endpoints: Endpoints,
        state_dir: Option<PathBuf>,
        cni_confs: Option<CniConfs>,
    ) -> anyhow::Result<Agent> {
        let mut endpoints = endpoints;
        endpoints.restore(&mut dp)?;
        let nat = Plan {
            nat_config: local.nat,
            ..Default::default()
        };
        nat.apply(&mut dp, &mut endpoints)
            .context("writing the masquerade settings")?;
        Ok(Agent {
            dp,
            local,
            me: None,
            state: None,
            names: BTreeMap::new(),
            revision: 0,
            map_updates: 0,
            reconcile_errors: 0,
            endpoints,
            cni_confs,
            allocation_changes: 0,
            allocation_changed: None,
            heartbeat_now: Arc::new(tokio::sync::Notify::new()),
            state_dir,
            state_source: StateSource::None,
            master_reachable: false,
            nat_entries: 0,
            nat_flows: [0; 2],
            nat_expired: 0,
            nat_sweep_seconds: 0.0,
            next_hops: [0; 2],
        })
    }

    fn alloc(&self) -> Allocation<'_> {
        Allocation {
            me: self.me.as_ref(),
            names: &self.names,
        }
    }

    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }

    pub fn underlay_ip(&self) -> IpAddr {
        self.local.underlay_ip
    }

    /// Notified whenever the heartbeat should go out at once.
    pub fn heartbeat_trigger(&self) -> Arc<tokio::sync::Notify> {
        self.heartbeat_now.clone()
    }

    /// The overlay MTU this agent was started with (`--mtu`).
    pub fn mtu(&self) -> u32 {
        self.local.mtu
    }

    pub fn me(&self) -> Option<&AgentInfo> {
        self.me.as_ref()
    }

    /// The VXLAN port of the applied state (the default before one).
    pub fn vxlan_port(&self) -> u16 {
        self.state
            .as_ref()
            .map_or(overlay_api::DEFAULT_VXLAN_PORT, |s| s.network.vxlan_port)
    }

    /// Says loudly when the master changed this agent's VTEP or a subnet under it (it was
    /// deleted and registered again after the quarantine, or its store lost it): containers
    /// keep their addresses and endpoints (nothing is silently renumbered), and those now
    /// outside this agent's subnets are named.
    fn check_allocation_change(&mut self, new: &AgentInfo) {
        let Some(old) = &self.me else { return };
        let mut changes = Vec::new();
        if let (Some(before), Some(after)) = (vtep_of(old), vtep_of(new))
            && before != after
        {
            changes.push(format!(
                "VTEP {} ({}) -> {} ({})",
                before.1,
                MacAddr(before.0),
                after.1,
                MacAddr(after.0)
            ));
        }
        // This agent's subnets of each network after the change, both families.
        let mut subnets: BTreeMap<String, Vec<IpNetwork>> = BTreeMap::new();
        for ov in &old.overlays {
            let now = new.overlays.iter().find(|o| o.info.name == ov.info.name);
            let now4 = now.and_then(|o| o.subnet);
            let now6 = now.and_then(|o| o.subnet6);
            if let (Some(before), Some(after)) = (ov.subnet, now4)
                && before != after
            {
                changes.push(format!(
                    "network {}: subnet {before} -> {after}",
                    ov.info.name
                ));
            }
            if let (Some(before), Some(after)) = (ov.subnet6, now6)
                && before != after
            {
                changes.push(format!(
                    "network {}: subnet6 {before} -> {after}",
                    ov.info.name
                ));
            }
            subnets.insert(
                ov.info.name.clone(),
                now4.map(IpNetwork::V4)
                    .into_iter()
                    .chain(now6.map(IpNetwork::V6))
                    .collect(),
            );
        }
        if changes.is_empty() {
            return;
        }
        let mut stranded: Vec<IpAddr> = Vec::new();
        let active = self.endpoints().unwrap_or_default();
        let parked = self.endpoints.parked();
        let endpoints = active
            .iter()
            .flat_map(|e| e.addresses().into_iter().map(|a| (a.ip, e.network_id)))
            .chain(
                parked
                    .iter()
                    .filter(|(ip, _)| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
                    .map(|(ip, p)| (*ip, p.vni)),
            );
        for (ip, vni) in endpoints {
            let inside = self
                .names
                .get(&vni)
                .and_then(|n| subnets.get(n))
                .is_some_and(|s| s.iter().any(|s| s.contains(ip)));
            if !inside {
                stranded.push(ip);
            }
        }
        self.allocation_changes += 1;
        let message = format!(
            "the master changed this agent's allocation under it: {}; endpoints now outside              this agent's subnets (kept as they are, recreate their containers): {stranded:?}",
            changes.join(", ")
        );
        tracing::error!("{message}");
        self.allocation_changed = Some(message);
    }

    /// Records this agent's allocation (registration) and writes its datapath config.
    pub fn set_me(&mut self, me: AgentInfo) -> anyhow::Result<()> {
        self.check_allocation_change(&me);
        let plan = Plan {
            config: agent_settings(&me, &self.local, self.vxlan_port()),
            ..Default::default()
        };
        plan.apply(&mut self.dp, &mut self.endpoints)?;
        self.me = Some(me);
        Ok(())
    }

    /// Applies a state from the master: this agent's allocation, then every map by difference
    /// (one plan: networks, routes, VTEPs, the host's and the containers' endpoints).
    pub fn apply_state(&mut self, state: State, revision: u64) -> anyhow::Result<Applied> {
        let applied = self.apply(state, revision);
        if applied.is_err() {
            self.reconcile_errors += 1;
        }
        let applied = applied?;
        self.state_source = StateSource::Master;
        self.save_applied();
        Ok(applied)
    }

    /// Saves the state just applied and this agent's allocation (a failure is logged: the
    /// datapath has the state, only a restart without master would miss it).
    fn save_applied(&self) {
        let (Some(dir), Some(me), Some(state)) = (&self.state_dir, &self.me, &self.state) else {
            return;
        };
        let saved = SavedState {
            version: 1,
            revision: self.revision,
            me: me.clone(),
            state: state.clone(),
        };
        if let Err(e) = saved::save(dir, &saved) {
            tracing::warn!(dir = %dir.display(), "saving the applied master state: {e:#}");
        }
    }

    /// While no master answers: loads the state saved in the state directory and applies it
    /// (the pinned maps already hold it; this brings back the agent's knowledge: allocation,
    /// networks, subnets), so that containers can be attached until the master is back.
    /// Returns the revision loaded (None without a saved state or once a master state applied)
    /// and what applying it did.
    pub fn restore_saved(&mut self) -> anyhow::Result<Option<(u64, Applied)>> {
        if self.state_source != StateSource::None {
            return Ok(None);
        }
        let Some(dir) = self.state_dir.clone() else {
            return Ok(None);
        };
        let Some(saved) = saved::load(&dir, self.underlay_ip())? else {
            return Ok(None);
        };
        self.check_allocation_change(&saved.me);
        self.me = Some(saved.me);
        let applied = self
            .apply(saved.state, saved.revision)
            .context("applying the saved master state")?;
        self.state_source = StateSource::Saved;
        Ok(Some((saved.revision, applied)))
    }

    pub fn set_master_reachable(&mut self, reachable: bool) {
        self.master_reachable = reachable;
    }

    fn apply(&mut self, state: State, revision: u64) -> anyhow::Result<Applied> {
        let my_ip = self.underlay_ip();
        if let Some(me) = state.agents.iter().find(|a| a.ip == my_ip).cloned() {
            self.check_allocation_change(&me);
            self.me = Some(me);
        }
        self.names = state
            .network
            .overlays
            .iter()
            .filter_map(|o| Some((o.network_id()?, o.name.clone())))
            .collect();
        let desired = DesiredDatapath::from_state(&state, self.me.as_ref(), &self.local);
        let current = reconcile::read_maps(self.dp.maps())?;
        let plan = Plan::between(&desired, &current, &self.endpoints.parked());
        let changed = plan
            .apply(&mut self.dp, &mut self.endpoints)
            .context("applying the reconcile plan")?;
        if !plan.endpoints.is_empty() {
            self.heartbeat_now.notify_one();
        }
        self.map_updates += changed as u64;
        self.state = Some(state);
        self.revision = revision;
        self.sync_cni_confs();
        if changed > 0 {
            tracing::info!(revision, changed, "datapath reconciled");
        }
        Ok(Applied {
            changed,
            host_routes: self.local.host_link.map(|_| desired.host_routes),
        })
    }

    /// Writes the CNI config of every network this agent has a subnet on; removes the others.
    fn sync_cni_confs(&self) {
        let (Some(confs), Some(me)) = (&self.cni_confs, &self.me) else {
            return;
        };
        let networks: Vec<ConfNetwork> = me
            .overlays
            .iter()
            .enumerate()
            .filter(|(_, o)| (o.subnet.is_some() || o.subnet6.is_some()) && o.info.is_enabled())
            .map(|(order, o)| ConfNetwork {
                order,
                name: o.info.name.clone(),
            })
            .collect();
        if let Err(e) = confs.sync(&networks) {
            tracing::warn!(dir = %confs.dir.display(), "writing CNI configs: {e:#}");
        }
    }

    pub fn note_reconcile_error(&mut self) {
        self.reconcile_errors += 1;
    }

    pub fn status(&self) -> AgentStatus {
        AgentStatus {
            agent: self.me.clone(),
            applied_revision: self.revision,
            map_updates: self.map_updates,
            pin_dir: self.dp.pins().dir().display().to_string(),
            parked_endpoints: self.endpoints.parked().into_keys().collect(),
            allocation_changes: self.allocation_changes,
            allocation_changed: self.allocation_changed.clone(),
            master_reachable: self.master_reachable,
            state_source: self.state_source.as_str().to_owned(),
        }
    }

    /// Local endpoints per network name, for the heartbeat.
    pub fn endpoint_counts(&self) -> anyhow::Result<BTreeMap<String, u32>> {
        self.endpoints.counts(&self.dp, &self.names)
    }

    pub fn endpoints(&self) -> anyhow::Result<Vec<EndpointInfo>> {
        self.endpoints.list(&self.dp, self.alloc())
    }

    pub fn add_endpoint(
        &mut self,
        req: &AddEndpoint,
        veth: &Veth,
    ) -> Result<EndpointInfo, EndpointError> {
        let alloc = Allocation {
            me: self.me.as_ref(),
            names: &self.names,
        };
        let info = self.endpoints.add(&mut self.dp, alloc, req, veth)?;
        self.heartbeat_now.notify_one();
        Ok(info)
    }

    pub fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), EndpointError> {
        self.endpoints.remove(&mut self.dp, ip)?;
        self.heartbeat_now.notify_one();
        Ok(())
    }

    pub fn release_attachment(&mut self, attachment: &str) -> Result<Released, EndpointError> {
        let r = self.endpoints.release(&mut self.dp, attachment)?;
        if r.ip.is_some() {
            self.heartbeat_now.notify_one();
        }
        Ok(r)
    }

    pub fn gc(&mut self, req: &GcRequest) -> Result<Vec<Released>, EndpointError> {
        let r = self.endpoints.gc(&mut self.dp, req)?;
        if !r.is_empty() {
            self.heartbeat_now.notify_one();
        }
        Ok(r)
    }

    pub fn ipam_usage(&self) -> Vec<IpamUsage> {
        self.endpoints.usage(self.me.as_ref())
    }

    /// This agent's IPv4 subnet of `network`, if it has one (the Docker driver's pools).
    pub fn subnet_of(&self, network: &str) -> Option<Ipv4Network> {
        self.alloc().subnet_of(network)
    }

    /// This agent's IPv6 subnet of `network`, if it has one (the Docker driver's IPv6 pools).
    pub fn subnet6_of(&self, network: &str) -> Option<Ipv6Network> {
        self.alloc().subnet6_of(network)
    }

    pub fn reserve_address(
        &mut self,
        network: &str,
        family: Family,
        half: Half,
        requested: Option<IpAddr>,
    ) -> Result<IpAddr, EndpointError> {
        let alloc = Allocation {
            me: self.me.as_ref(),
            names: &self.names,
        };
        self.endpoints
            .reserve_address(&self.dp, alloc, network, family, half, requested)
    }

    pub fn set_attachment(&mut self, ip: IpAddr, attachment: &str) -> anyhow::Result<()> {
        self.endpoints.set_attachment(ip, attachment)
    }

    pub fn unwire_endpoint(&mut self, ip: IpAddr) -> anyhow::Result<()> {
        self.endpoints.unwire(&mut self.dp, ip)
    }

    /// Makes `source` (the underlay NIC's IPv6 address, or none) the source of IPv6 masquerade:
    /// into this agent's facts, so that every later reconciliation keeps it, and into the maps.
    pub fn set_ipv6_source(&mut self, source: Option<Ipv6Addr>) -> anyhow::Result<()> {
        let Some(nat) = self.local.nat else {
            return Ok(());
        };
        let nat = crate::masquerade::with_ipv6_source(nat, source);
        if self.local.nat == Some(nat) {
            return Ok(());
        }
        self.local.nat = Some(nat);
        let plan = Plan {
            nat_config: Some(nat),
            ..Default::default()
        };
        plan.apply(&mut self.dp, &mut self.endpoints)
            .context("writing the IPv6 masquerade source")?;
        self.map_updates += 1;
        Ok(())
    }

    /// The underlay addresses of the other agents' VTEPs in the datapath (the next-hop cache's
    /// subjects).
    pub fn remote_vteps(&self) -> std::collections::BTreeSet<IpAddr> {
        let me = self.local.underlay_ip;
        match self.dp.maps().vteps() {
            Ok(vteps) => vteps.into_keys().filter(|ip| *ip != me).collect(),
            Err(e) => {
                tracing::warn!("reading the VTEPs for the next-hop cache: {e:#}");
                Default::default()
            }
        }
    }

    /// Writes the next-hop cache (`crate::next_hops`); `uncached` VTEPs keep the kernel's
    /// lookup. An entry the map cannot take stays uncached: the kernel's lookup is always right.
    pub fn set_next_hops(
        &mut self,
        hops: BTreeMap<IpAddr, overlay_common::maps::NextHop>,
        uncached: usize,
    ) {
        match self.dp.maps_mut().sync_next_hops(&hops) {
            Ok(_) => self.next_hops = [hops.len() as u64, uncached as u64],
            Err(e) => tracing::warn!("writing the next-hop cache: {e:#}"),
        }
    }

    /// Records what the NAT sweeper found and how long its walk took.
    pub fn nat_swept(&mut self, swept: crate::masquerade::Swept, took: std::time::Duration) {
        self.nat_expired += swept.expired as u64;
        self.nat_entries = swept.remaining as u64;
        self.nat_flows = swept.flows.map(|n| n as u64);
        self.nat_sweep_seconds = took.as_secs_f64();
    }

    /// What the metrics need from the agent's knowledge (the maps are read by the renderer).
    pub fn metrics_snapshot(&self) -> Snapshot {
        let mut ipam: BTreeMap<(String, Family), (u64, u64)> = BTreeMap::new();
        for u in self.ipam_usage() {
            let e = ipam.entry((u.network, u.family)).or_default();
            e.0 += u64::from(u.used);
            e.1 = e.1.saturating_add(u.free);
        }
        let exhausted = match self.endpoints.ipam() {
            Some(i) => ipam
                .keys()
                .map(|(n, f)| ((n.clone(), *f), i.exhausted(n, *f)))
                .collect(),
            None => BTreeMap::new(),
        };
        Snapshot {
            names: self.names.clone(),
            ipam,
            ipam_exhausted: exhausted,
            revision: self.revision,
            map_updates: self.map_updates,
            reconcile_errors: self.reconcile_errors,
            registered: self.me.is_some(),
            allocation_changes: self.allocation_changes,
            parked: self.endpoints.parked().len() as u64,
            nat_entries: self.nat_entries,
            nat_flows: self.nat_flows,
            nat_expired: self.nat_expired,
            nat_sweep_seconds: self.nat_sweep_seconds,
            next_hops: self.next_hops,
        }
    }
}
