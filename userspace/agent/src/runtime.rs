//! The running agent: one [`Core`] owning the datapath and what the agent knows, shared by the
//! master-following loop and the local API.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use ipnetwork::Ipv4Network;
use overlay_api::{
    AgentInfo, MacAddr, MasterClient, State,
    agent::{AddEndpoint, AgentStatus, EndpointInfo, GcRequest, IpamUsage, Released},
};
use overlay_common::maps::{Endpoint, HOST_LINK_PEER_MAC, programs};

use crate::{
    datapath::{AgentSettings, Datapath},
    desired::{DesiredDatapath, vtep_of},
    host_link::HostLink,
    ipam::{self, CniConfs, Ipam, IpamError, ParkedEndpoint},
    netdev::{self, Link},
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

/// Why an endpoint request failed; the API maps these to HTTP status codes.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("agent not ready: {0}")]
    NotReady(String),
    /// No free address in the requested half (HTTP 507).
    #[error("{0}")]
    Exhausted(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub struct Core {
    dp: Datapath,
    underlay: Link,
    mtu: u32,
    /// This agent's allocation, from registration and every watched state.
    me: Option<AgentInfo>,
    state: Option<State>,
    revision: u64,
    map_updates: u64,
    reconcile_errors: u64,
    /// Container addresses (absent: callers must give every endpoint's address).
    ipam: Option<Ipam>,
    /// CNI config files kept in step with this agent's networks.
    cni_confs: Option<CniConfs>,
    /// The host's link into the overlay, once set up.
    host_link: Option<HostLink>,
    /// Parked endpoints (disabled networks) when there is no IPAM to keep them in.
    parked_in_memory: BTreeMap<Ipv4Addr, ParkedEndpoint>,
    /// Times the master changed this agent's VTEP or subnets under it, and the last change.
    allocation_changes: u64,
    allocation_changed: Option<String>,
    /// Wakes the heartbeat: the endpoint counts the master is told about changed, or the
    /// master forgot this agent.
    heartbeat_now: Arc<tokio::sync::Notify>,
    /// Where every applied state is saved, for a restart while no master answers.
    state_dir: Option<PathBuf>,
    state_source: StateSource,
    /// Whether the master answered the last request (registration, heartbeat, watch).
    master_reachable: bool,
}

pub type Shared = Arc<Mutex<Core>>;

impl Core {
    pub fn new(dp: Datapath, underlay: Link, mtu: u32) -> Core {
        Core {
            dp,
            underlay,
            mtu,
            me: None,
            state: None,
            revision: 0,
            map_updates: 0,
            reconcile_errors: 0,
            ipam: None,
            cni_confs: None,
            host_link: None,
            parked_in_memory: BTreeMap::new(),
            allocation_changes: 0,
            allocation_changed: None,
            heartbeat_now: Arc::new(tokio::sync::Notify::new()),
            state_dir: None,
            state_source: StateSource::None,
            master_reachable: false,
        }
    }

    /// Endpoints set aside while their network is disabled.
    fn parked(&self) -> BTreeMap<Ipv4Addr, ParkedEndpoint> {
        match &self.ipam {
            Some(ipam) => ipam.parked().clone(),
            None => self.parked_in_memory.clone(),
        }
    }

    fn park(&mut self, ip: Ipv4Addr, endpoint: ParkedEndpoint) -> anyhow::Result<()> {
        match &mut self.ipam {
            Some(ipam) => ipam.park(ip, endpoint),
            None => {
                self.parked_in_memory.insert(ip, endpoint);
                Ok(())
            }
        }
    }

    fn unpark(&mut self, ip: Ipv4Addr) -> anyhow::Result<Option<ParkedEndpoint>> {
        match &mut self.ipam {
            Some(ipam) => ipam.unpark(ip),
            None => Ok(self.parked_in_memory.remove(&ip)),
        }
    }

    /// Local endpoints per network name (parked ones included): what the master is told, so
    /// that it refuses to remove or disable a network still in use without force.
    pub fn endpoint_counts(&self) -> anyhow::Result<BTreeMap<String, u32>> {
        let names = self.network_names();
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        let parked = self.parked();
        let vnis = self
            .dp
            .maps_ref()
            .endpoints()?
            .into_values()
            .filter(|e| e.flags & Endpoint::FLAG_HOST == 0)
            .map(|e| e.vni)
            .chain(parked.values().map(|p| p.vni));
        for vni in vnis {
            let name = names
                .get(&vni)
                .cloned()
                .unwrap_or_else(|| format!("vni-{vni}"));
            *counts.entry(name).or_default() += 1;
        }
        Ok(counts)
    }

    /// Notified whenever the heartbeat should go out at once.
    pub fn heartbeat_trigger(&self) -> Arc<tokio::sync::Notify> {
        self.heartbeat_now.clone()
    }

    /// Sets aside the endpoints of disabled networks (out of the datapath: their traffic is
    /// dropped, nobody reaches them) and puts them back when their network is enabled again;
    /// endpoints of networks gone from the configuration are removed. Addresses and IPAM
    /// records stay throughout, so the containers need nothing from their runtime.
    fn sync_parked(&mut self, state: &State) -> anyhow::Result<usize> {
        let enabled: BTreeMap<u32, bool> = state
            .network
            .overlays
            .iter()
            .filter_map(|o| Some((o.vni?, o.is_enabled())))
            .collect();
        let mut changed = 0;
        for e in self.endpoints()? {
            match enabled.get(&e.vni) {
                Some(true) => {}
                Some(false) => {
                    // Recorded first: a crash in between leaves it both parked and in the map,
                    // and the next state parks it again.
                    self.park(
                        e.ip,
                        ParkedEndpoint {
                            vni: e.vni,
                            ifindex: e.ifindex,
                            mac: e.container_mac,
                            gateway_mac: e.gateway_mac,
                        },
                    )?;
                    self.dp.maps().remove_endpoint(IpAddr::V4(e.ip))?;
                    tracing::warn!(ip = %e.ip, network = %e.network, "network disabled: endpoint parked (kept, out of the datapath until the network is enabled)");
                    changed += 1;
                }
                None => {
                    tracing::info!(ip = %e.ip, "network of endpoint removed: disconnecting it");
                    self.remove_endpoint(e.ip).map_err(|e| anyhow!("{e}"))?;
                    changed += 1;
                }
            }
        }
        for (ip, p) in self.parked() {
            let key = format!("if{}", p.ifindex);
            match enabled.get(&p.vni) {
                Some(false) => {}
                Some(true) => {
                    let veth = netdev::name_of(p.ifindex);
                    let expected = self
                        .ipam
                        .as_ref()
                        .and_then(|i| i.get(ip))
                        .map(|a| a.host_veth.clone());
                    match veth {
                        Some(name) if expected.as_ref().is_none_or(|x| *x == name) => {
                            self.dp
                                .attach_keyed(&name, programs::FROM_CONTAINER, &key)?;
                            self.dp.maps().put_endpoint(
                                IpAddr::V4(ip),
                                Endpoint {
                                    ifindex: p.ifindex,
                                    vni: p.vni,
                                    mac: p.mac.0,
                                    gateway_mac: p.gateway_mac.0,
                                    ..Default::default()
                                },
                            )?;
                            tracing::info!(%ip, veth = %name, "network enabled again: endpoint back in the datapath");
                        }
                        _ => {
                            tracing::info!(%ip, "veth of parked endpoint is gone: forgetting it");
                            self.dp.detach(programs::FROM_CONTAINER, &key)?;
                        }
                    }
                    self.unpark(ip)?;
                    changed += 1;
                }
                None => {
                    tracing::info!(%ip, "network of parked endpoint removed: disconnecting it");
                    self.dp.detach(programs::FROM_CONTAINER, &key)?;
                    self.unpark(ip)?;
                    if let Some(ipam) = &mut self.ipam {
                        ipam.release(ip)?;
                    }
                    changed += 1;
                }
            }
        }
        if changed > 0 {
            self.heartbeat_now.notify_one();
        }
        Ok(changed)
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
        let mut subnets: BTreeMap<String, Option<Ipv4Network>> = BTreeMap::new();
        for ov in &old.overlays {
            let now = new
                .overlays
                .iter()
                .find(|o| o.info.name == ov.info.name)
                .and_then(|o| o.subnet);
            if let (Some(before), Some(after)) = (ov.subnet, now)
                && before != after
            {
                changes.push(format!(
                    "network {}: subnet {before} -> {after}",
                    ov.info.name
                ));
            }
            subnets.insert(ov.info.name.clone(), now);
        }
        if changes.is_empty() {
            return;
        }
        let names = self.network_names();
        let mut stranded: Vec<Ipv4Addr> = Vec::new();
        let active = self.endpoints().unwrap_or_default();
        let parked = self.parked();
        let endpoints = active
            .iter()
            .map(|e| (e.ip, e.vni))
            .chain(parked.iter().map(|(ip, p)| (*ip, p.vni)));
        for (ip, vni) in endpoints {
            let inside = names
                .get(&vni)
                .and_then(|n| subnets.get(n).copied().flatten())
                .is_some_and(|s| s.contains(ip));
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

    /// Gives the agent the host's link into the overlay: from then on every network's gateway
    /// address is the host's, reachable from containers local and remote.
    pub fn set_host_link(&mut self, link: HostLink) {
        self.host_link = Some(link);
    }

    /// Keeps the host's endpoints (one per network, at this agent's gateway address), addresses
    /// and routes in step with this agent's allocation. Returns the number of map changes.
    fn sync_host(&mut self) -> anyhow::Result<usize> {
        let Some(link) = self.host_link.clone() else {
            return Ok(0);
        };
        let mut routes = BTreeMap::new();
        let mut wanted: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
        let networks = self.dp.maps_ref().networks()?;
        for ov in self.me.iter().flat_map(|me| &me.overlays) {
            let vni = ov.backend.vxlan.vni;
            let half = ov.mesos_bridge.as_ref().and_then(|b| b.ip);
            let (Some(subnet), Some(half), true) =
                (ov.info.subnet, half, networks.contains_key(&vni))
            else {
                continue;
            };
            let gateway = ipam::gateway_of(half);
            routes.insert(subnet, gateway);
            let ep = Endpoint {
                ifindex: link.peer.ifindex,
                vni,
                mac: link.host.mac,
                gateway_mac: HOST_LINK_PEER_MAC,
                flags: Endpoint::FLAG_HOST,
                _pad: 0,
            };
            wanted.insert(IpAddr::V4(gateway), ep);
        }
        let current: BTreeMap<IpAddr, Endpoint> = self
            .dp
            .maps_ref()
            .endpoints()?
            .into_iter()
            .filter(|(_, e)| e.flags & Endpoint::FLAG_HOST != 0)
            .collect();
        let changes = reconcile::diff(&wanted, &current);
        for c in &changes {
            match c {
                reconcile::Change::Put(ip, ep) => self.dp.maps().put_endpoint(*ip, *ep)?,
                reconcile::Change::Remove(ip) => self.dp.maps().remove_endpoint(*ip)?,
            }
        }
        link.sync(&routes)
            .context("routing the host into the overlay")?;
        Ok(changes.len())
    }

    /// Gives the agent its IPAM: endpoints may then be added without an address.
    pub fn set_ipam(&mut self, ipam: Ipam) {
        self.ipam = Some(ipam);
    }

    /// Makes the agent write one CNI config file per network it has a subnet on.
    pub fn set_cni_confs(&mut self, confs: CniConfs) {
        self.cni_confs = Some(confs);
    }

    pub fn underlay_ip(&self) -> IpAddr {
        IpAddr::V4(self.underlay.ipv4.expect("checked at start"))
    }

    pub fn me(&self) -> Option<&AgentInfo> {
        self.me.as_ref()
    }

    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }

    /// Records this agent's allocation and writes the datapath config (VTEP MAC, port, MTU).
    pub fn set_me(&mut self, me: AgentInfo, vxlan_port: u16) -> anyhow::Result<()> {
        self.check_allocation_change(&me);
        if let Some((vtep_mac, _)) = vtep_of(&me) {
            let underlay_ip = self.underlay_ip();
            self.dp.maps().set_config(&AgentSettings {
                underlay_ip,
                underlay_ifindex: self.underlay.ifindex,
                vtep_mac,
                vxlan_port,
                overlay_mtu: self.mtu,
            })?;
        }
        self.me = Some(me);
        Ok(())
    }

    /// Applies a state from the master: this agent's allocation, then the master-driven maps by
    /// difference, then endpoints whose network is gone. Returns the number of map changes.
    pub fn apply_state(&mut self, state: State, revision: u64) -> anyhow::Result<usize> {
        let changed = self.apply(state, revision)?;
        self.state_source = StateSource::Master;
        self.save_applied();
        Ok(changed)
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

    /// Makes the agent save every state it applies into `dir`.
    pub fn set_state_dir(&mut self, dir: PathBuf) {
        self.state_dir = Some(dir);
    }

    /// While no master answers: loads the state saved in the state directory and applies it
    /// (the pinned maps already hold it; this brings back the agent's knowledge: allocation,
    /// networks, subnets), so that containers can be attached until the master is back.
    /// Returns the revision loaded, None without a saved state or once a master state applied.
    pub fn restore_saved(&mut self) -> anyhow::Result<Option<u64>> {
        if self.state_source != StateSource::None {
            return Ok(None);
        }
        let Some(dir) = self.state_dir.clone() else {
            return Ok(None);
        };
        let Some(saved) = saved::load(&dir, self.underlay_ip())? else {
            return Ok(None);
        };
        self.set_me(saved.me, saved.state.network.vxlan_port)?;
        self.apply(saved.state, saved.revision)
            .context("applying the saved master state")?;
        self.state_source = StateSource::Saved;
        Ok(Some(saved.revision))
    }

    pub fn set_master_reachable(&mut self, reachable: bool) {
        self.master_reachable = reachable;
    }

    fn apply(&mut self, state: State, revision: u64) -> anyhow::Result<usize> {
        let my_ip = self.underlay_ip();
        if let Some(me) = state.agents.iter().find(|a| a.ip == my_ip).cloned() {
            self.set_me(me, state.network.vxlan_port)?;
        }
        let desired = DesiredDatapath::from_state(&state, my_ip);
        let current = reconcile::current(self.dp.maps_ref())?;
        let plan = Plan::between(&desired, &current);
        let mut changed = plan
            .apply(self.dp.maps())
            .context("applying the reconcile plan")?;
        changed += self.sync_parked(&state)?;
        changed += self.sync_host()?;
        self.map_updates += changed as u64;
        self.state = Some(state);
        self.revision = revision;
        self.sync_cni_confs();
        if changed > 0 {
            tracing::info!(revision, changed, "datapath reconciled");
        }
        Ok(changed)
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
            parked_endpoints: self.parked().into_keys().collect(),
            allocation_changes: self.allocation_changes,
            allocation_changed: self.allocation_changed.clone(),
            master_reachable: self.master_reachable,
            state_source: self.state_source.as_str().to_owned(),
        }
    }

    fn network_names(&self) -> BTreeMap<u32, String> {
        let mut names = BTreeMap::new();
        if let Some(s) = &self.state {
            for o in &s.network.overlays {
                if let Some(vni) = o.vni {
                    names.insert(vni, o.name.clone());
                }
            }
        }
        names
    }

    /// Local endpoints, from the pinned map (the source of truth across restarts).
    pub fn endpoints(&self) -> anyhow::Result<Vec<EndpointInfo>> {
        let names = self.network_names();
        let mut out = vec![];
        for (ip, e) in self.dp.maps_ref().endpoints()? {
            let IpAddr::V4(ip) = ip else { continue };
            if e.flags & Endpoint::FLAG_HOST != 0 {
                continue; // the host's own endpoints are the agent's business, not an API's
            }
            out.push(EndpointInfo {
                network: names.get(&e.vni).cloned().unwrap_or_default(),
                vni: e.vni,
                ip,
                host_veth: netdev::name_of(e.ifindex).unwrap_or_default(),
                ifindex: e.ifindex,
                container_mac: MacAddr(e.mac),
                gateway_mac: MacAddr(e.gateway_mac),
                subnet: None,
                gateway: None,
                attachment: None,
            });
            let info = out.last_mut().expect("just pushed");
            if let Some(range) = self.half_containing(&info.network, ip) {
                info.subnet = Some(range);
                info.gateway = Some(crate::ipam::gateway_of(range));
            }
            info.attachment = self
                .ipam
                .as_ref()
                .and_then(|i| i.get(ip))
                .and_then(|a| a.attachment.clone());
        }
        Ok(out)
    }

    /// Connects a container: validates the request against this agent's allocation, takes its
    /// address (the requested one, or the next free one of the requested half from the IPAM),
    /// attaches the container program to its veth, then publishes the endpoint. On failure
    /// nothing is left behind (an address allocated here is released). Adding an attachment
    /// that already has an endpoint returns it (re-wired if its veth changed).
    pub fn add_endpoint(&mut self, req: &AddEndpoint) -> Result<EndpointInfo, EndpointError> {
        let me = self.me.as_ref().ok_or_else(|| {
            EndpointError::NotReady(
                "not registered with a master yet (no master answers and no saved state)".into(),
            )
        })?;
        let ov = me
            .overlays
            .iter()
            .find(|o| o.info.name == req.network)
            .ok_or_else(|| {
                EndpointError::Invalid(format!(
                    "network {:?} is not configured on this agent",
                    req.network
                ))
            })?;
        if !ov.info.is_enabled() {
            return Err(EndpointError::Conflict(format!(
                "network {:?} is disabled: no new containers until it is enabled again",
                req.network
            )));
        }
        let vni = self
            .network_names()
            .into_iter()
            .find(|(_, n)| *n == req.network)
            .map(|(v, _)| v)
            .ok_or_else(|| {
                EndpointError::Invalid(format!("network {:?} has no VNI", req.network))
            })?;
        let subnet = ov.subnet.ok_or_else(|| {
            EndpointError::Invalid(format!(
                "network {:?}: this agent has no subnet (allocation failed)",
                req.network
            ))
        })?;
        if let Some(ip) = req.ip {
            ipam::half_of(ip, subnet).map_err(EndpointError::Invalid)?;
        }
        let existing = self.dp.maps_ref().endpoints()?;
        let same_endpoint = |ip: Ipv4Addr| {
            existing.get(&IpAddr::V4(ip)).is_some_and(|e| {
                e.mac == req.container_mac.0
                    && netdev::name_of(e.ifindex).as_deref() == Some(&req.host_veth)
            })
        };
        // The same attachment again: its address, its endpoint if still wired the same way.
        let mut reused = None;
        if let (Some(att), Some(ipam)) = (&req.attachment, &self.ipam)
            && let Some((ip, a)) = ipam.find_attachment(att)
        {
            if a.network != req.network || req.ip.is_some_and(|r| r != ip) {
                return Err(EndpointError::Conflict(format!(
                    "attachment {att} already has address {ip} on network {}",
                    a.network
                )));
            }
            if same_endpoint(ip) {
                return Ok(self.endpoint_info(ip)?);
            }
            if let Some(e) = existing.get(&IpAddr::V4(ip)) {
                tracing::info!(%ip, attachment = %att, "re-wiring the endpoint of an attachment");
                self.disconnect(ip, e.ifindex)?;
            }
            reused = Some(ip);
        }
        let (ip, allocated) = match reused {
            Some(ip) => (ip, false),
            None => {
                if let Some(ip) = req.ip
                    && existing.contains_key(&IpAddr::V4(ip))
                {
                    if same_endpoint(ip) {
                        return Ok(self.endpoint_info(ip)?);
                    }
                    return Err(EndpointError::Conflict(format!(
                        "address {ip} is already used by another endpoint"
                    )));
                }
                match &mut self.ipam {
                    Some(ipam) => {
                        let taken: BTreeSet<Ipv4Addr> = existing
                            .keys()
                            .filter_map(|k| match k {
                                IpAddr::V4(ip) => Some(*ip),
                                IpAddr::V6(_) => None,
                            })
                            .collect();
                        let ip = ipam
                            .allocate(
                                &req.network,
                                subnet,
                                req.half,
                                req.ip,
                                req.attachment.as_deref(),
                                &req.host_veth,
                                &taken,
                            )
                            .map_err(|e| match e {
                                IpamError::Exhausted { .. } => {
                                    EndpointError::Exhausted(e.to_string())
                                }
                                IpamError::Invalid(m) => EndpointError::Invalid(m),
                                IpamError::Conflict(m) => EndpointError::Conflict(m),
                                IpamError::Io(e) => EndpointError::Internal(e),
                            })?;
                        (ip, true)
                    }
                    None => (
                        req.ip.ok_or_else(|| {
                            EndpointError::Invalid("this agent has no IPAM: give an ip".into())
                        })?,
                        false,
                    ),
                }
            }
        };
        if let Err(e) = self.connect(ip, vni, req) {
            if allocated && let Some(ipam) = &mut self.ipam {
                let _ = ipam.release(ip);
            }
            return Err(e);
        }
        if let Some(ipam) = &mut self.ipam {
            ipam.set_host_veth(ip, &req.host_veth)?;
        }
        tracing::info!(%ip, veth = %req.host_veth, network = %req.network, vni, "endpoint added");
        self.heartbeat_now.notify_one();
        Ok(self.endpoint_info(ip)?)
    }

    /// Attaches the container program to the veth and publishes the endpoint.
    fn connect(&mut self, ip: Ipv4Addr, vni: u32, req: &AddEndpoint) -> Result<(), EndpointError> {
        let veth = netdev::link(&req.host_veth)
            .map_err(|e| EndpointError::Invalid(format!("host_veth: {e:#}")))?;
        netdev::refuse_router_messages(&veth.name)
            .map_err(|e| EndpointError::Invalid(format!("host_veth: {e:#}")))?;
        let key = format!("if{}", veth.ifindex);
        self.dp
            .attach_keyed(&veth.name, programs::FROM_CONTAINER, &key)?;
        let ep = Endpoint {
            ifindex: veth.ifindex,
            vni,
            mac: req.container_mac.0,
            gateway_mac: veth.mac,
            ..Default::default()
        };
        if let Err(e) = self.dp.maps().put_endpoint(IpAddr::V4(ip), ep) {
            let _ = self.dp.detach(programs::FROM_CONTAINER, &key);
            return Err(e.into());
        }
        Ok(())
    }

    /// Map entry first (no more traffic to it), then its program.
    fn disconnect(&mut self, ip: Ipv4Addr, ifindex: u32) -> anyhow::Result<()> {
        self.dp.maps().remove_endpoint(IpAddr::V4(ip))?;
        self.dp
            .detach(programs::FROM_CONTAINER, &format!("if{ifindex}"))?;
        Ok(())
    }

    fn endpoint_info(&self, ip: Ipv4Addr) -> anyhow::Result<EndpointInfo> {
        self.endpoints()?
            .into_iter()
            .find(|e| e.ip == ip)
            .ok_or_else(|| anyhow!("endpoint {ip} vanished"))
    }

    /// Disconnects a container and frees its address.
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), EndpointError> {
        let existing = self.dp.maps_ref().endpoints()?;
        let allocated = self.ipam.as_ref().is_some_and(|i| i.get(ip).is_some());
        let parked = self.parked().get(&ip).copied();
        match (existing.get(&IpAddr::V4(ip)), parked) {
            (Some(e), _) => {
                self.disconnect(ip, e.ifindex)?;
                if parked.is_some() {
                    self.unpark(ip)?;
                }
            }
            (None, Some(p)) => {
                self.dp
                    .detach(programs::FROM_CONTAINER, &format!("if{}", p.ifindex))?;
                self.unpark(ip)?;
            }
            (None, None) if allocated => {}
            (None, None) => {
                return Err(EndpointError::NotFound(format!(
                    "no endpoint with address {ip}"
                )));
            }
        }
        if let Some(ipam) = &mut self.ipam {
            ipam.release(ip)?;
        }
        self.heartbeat_now.notify_one();
        tracing::info!(%ip, "endpoint removed");
        Ok(())
    }

    /// This agent's subnet of `network`, if it has one (the Docker driver's pools).
    pub fn subnet_of(&self, network: &str) -> Option<Ipv4Network> {
        self.me
            .as_ref()?
            .overlays
            .iter()
            .find(|o| o.info.name == network)?
            .subnet
    }

    /// Takes an address before its endpoint exists (Docker's IPAM RequestAddress): `requested`
    /// or the next free one of `half`. Persisted before it returns.
    pub fn reserve_address(
        &mut self,
        network: &str,
        half: overlay_api::agent::Half,
        requested: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, EndpointError> {
        let subnet = self.subnet_of(network).ok_or_else(|| {
            EndpointError::Invalid(format!("network {network:?} has no subnet on this agent"))
        })?;
        let taken: BTreeSet<Ipv4Addr> = self
            .dp
            .maps_ref()
            .endpoints()?
            .keys()
            .filter_map(|k| match k {
                IpAddr::V4(ip) => Some(*ip),
                IpAddr::V6(_) => None,
            })
            .collect();
        let ipam = self
            .ipam
            .as_mut()
            .ok_or_else(|| EndpointError::Invalid("this agent has no IPAM".into()))?;
        ipam.allocate(network, subnet, half, requested, None, "", &taken)
            .map_err(|e| match e {
                IpamError::Exhausted { .. } => EndpointError::Exhausted(e.to_string()),
                IpamError::Invalid(m) => EndpointError::Invalid(m),
                IpamError::Conflict(m) => EndpointError::Conflict(m),
                IpamError::Io(e) => EndpointError::Internal(e),
            })
    }

    /// Names the attachment of a reserved address (Docker's CreateEndpoint).
    pub fn set_attachment(&mut self, ip: Ipv4Addr, attachment: &str) -> anyhow::Result<()> {
        match &mut self.ipam {
            Some(ipam) => ipam.set_attachment(ip, attachment),
            None => Ok(()),
        }
    }

    /// Disconnects an endpoint (map entry, program) but keeps its address (Docker's Leave).
    pub fn unwire_endpoint(&mut self, ip: Ipv4Addr) -> anyhow::Result<()> {
        if let Some(e) = self.dp.maps_ref().endpoints()?.get(&IpAddr::V4(ip)) {
            self.disconnect(ip, e.ifindex)?;
        }
        Ok(())
    }

    /// Releases an attachment: its endpoint and its address. Unknown attachments release
    /// nothing (DEL is idempotent).
    pub fn release_attachment(&mut self, attachment: &str) -> Result<Released, EndpointError> {
        let found = self
            .ipam
            .as_ref()
            .and_then(|i| i.find_attachment(attachment))
            .map(|(ip, a)| (ip, a.host_veth.clone()));
        let Some((ip, host_veth)) = found else {
            return Ok(Released {
                attachment: attachment.to_owned(),
                ip: None,
                host_veth: None,
            });
        };
        self.remove_endpoint(ip)?;
        tracing::info!(%ip, %attachment, "attachment released");
        Ok(Released {
            attachment: attachment.to_owned(),
            ip: Some(ip),
            host_veth: Some(host_veth),
        })
    }

    /// Releases every attachment of a network that is not in `keep` (CNI GC).
    pub fn gc(&mut self, req: &GcRequest) -> Result<Vec<Released>, EndpointError> {
        let stale: Vec<String> = self
            .ipam
            .as_ref()
            .map(|i| {
                i.allocations()
                    .values()
                    .filter(|a| a.network == req.network)
                    .filter_map(|a| a.attachment.clone())
                    .filter(|a| !req.keep.contains(a))
                    .collect()
            })
            .unwrap_or_default();
        stale.iter().map(|a| self.release_attachment(a)).collect()
    }

    /// Address usage per network (that has a subnet here) and half.
    pub fn ipam_usage(&self) -> Vec<IpamUsage> {
        let (Some(ipam), Some(me)) = (&self.ipam, &self.me) else {
            return vec![];
        };
        me.overlays
            .iter()
            .filter_map(|o| o.subnet.map(|s| (o.info.name.as_str(), s)))
            .flat_map(|(net, subnet)| ipam.usage(net, subnet))
            .collect()
    }

    /// The half of this agent's subnet of `network` that holds `ip`.
    fn half_containing(&self, network: &str, ip: Ipv4Addr) -> Option<Ipv4Network> {
        let subnet = self
            .me
            .as_ref()?
            .overlays
            .iter()
            .find(|o| o.info.name == network)?
            .subnet?;
        crate::ipam::halves(subnet)
            .into_iter()
            .find(|h| h.contains(ip))
    }

    /// Writes the CNI config of every network this agent has a subnet on; removes the others.
    fn sync_cni_confs(&self) {
        let (Some(confs), Some(me)) = (&self.cni_confs, &self.me) else {
            return;
        };
        let networks: Vec<crate::cni_conf::ConfNetwork> = me
            .overlays
            .iter()
            .enumerate()
            .filter(|(_, o)| o.subnet.is_some() && o.info.is_enabled())
            .map(|(order, o)| crate::cni_conf::ConfNetwork {
                order,
                name: o.info.name.clone(),
            })
            .collect();
        if let Err(e) = confs.sync(&networks) {
            tracing::warn!(dir = %confs.dir.display(), "writing CNI configs: {e:#}");
        }
    }

    /// After a restart: give every endpoint whose veth still exists this binary's program (the
    /// pinned link is reused, so the swap is atomic), and forget endpoints whose veth is gone.
    pub fn restore_endpoints(&mut self) -> anyhow::Result<()> {
        for (ip, e) in self.dp.maps_ref().endpoints()? {
            if e.flags & Endpoint::FLAG_HOST != 0 {
                continue; // kept by `sync_host` on the next state
            }
            let key = format!("if{}", e.ifindex);
            match netdev::name_of(e.ifindex) {
                Some(name) => {
                    netdev::refuse_router_messages(&name)?;
                    self.dp
                        .attach_keyed(&name, programs::FROM_CONTAINER, &key)?;
                    tracing::info!(%ip, veth = %name, "endpoint kept across restart");
                }
                None => {
                    tracing::info!(%ip, "veth of endpoint is gone: removing it");
                    self.dp.maps().remove_endpoint(ip)?;
                    self.dp.detach(programs::FROM_CONTAINER, &key)?;
                }
            }
        }
        Ok(())
    }

    /// Prometheus text exposition of the datapath counters and the agent's own.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let names = self.network_names();
        let mut out = overlay_api::build::build_info_metric("overlay_agent");
        out.push_str("# HELP overlay_datapath_packets_total Packets handled by the eBPF datapath, by network and counter (drop_* are drops by reason).\n");
        out.push_str("# TYPE overlay_datapath_packets_total counter\n");
        let stats = self.dp.maps_ref().stats()?;
        for r in &stats {
            let net = names.get(&r.vni).map_or("", String::as_str);
            out.push_str(&format!(
                "overlay_datapath_packets_total{{vni=\"{}\",network=\"{net}\",counter=\"{}\"}} {}\n",
                r.vni,
                r.counter.name(),
                r.packets
            ));
        }
        out.push_str("# HELP overlay_datapath_bytes_total Bytes handled by the eBPF datapath, by network and counter.\n");
        out.push_str("# TYPE overlay_datapath_bytes_total counter\n");
        for r in &stats {
            let net = names.get(&r.vni).map_or("", String::as_str);
            out.push_str(&format!(
                "overlay_datapath_bytes_total{{vni=\"{}\",network=\"{net}\",counter=\"{}\"}} {}\n",
                r.vni,
                r.counter.name(),
                r.bytes
            ));
        }
        let maps = self.dp.maps_ref();
        let mut per_net: BTreeMap<u32, usize> = BTreeMap::new();
        for e in maps.endpoints()?.values() {
            *per_net.entry(e.vni).or_default() += 1;
        }
        out.push_str("# HELP overlay_agent_endpoints Local endpoints by network.\n# TYPE overlay_agent_endpoints gauge\n");
        for (vni, n) in per_net {
            let net = names.get(&vni).map_or("", String::as_str);
            out.push_str(&format!(
                "overlay_agent_endpoints{{vni=\"{vni}\",network=\"{net}\"}} {n}\n"
            ));
        }
        let mut ipam: BTreeMap<String, (u32, u32)> = BTreeMap::new();
        for u in self.ipam_usage() {
            let e = ipam.entry(u.network).or_default();
            e.0 += u.used;
            e.1 += u.free;
        }
        out.push_str("# HELP overlay_agent_ipam_addresses Container addresses of this agent's subnets (both halves), by network and state.\n# TYPE overlay_agent_ipam_addresses gauge\n");
        for (net, (used, free)) in &ipam {
            out.push_str(&format!(
                "overlay_agent_ipam_addresses{{network=\"{net}\",state=\"used\"}} {used}\n\
                 overlay_agent_ipam_addresses{{network=\"{net}\",state=\"free\"}} {free}\n"
            ));
        }
        out.push_str("# HELP overlay_agent_ipam_exhausted_total Allocations refused because the requested half had no free address.\n# TYPE overlay_agent_ipam_exhausted_total counter\n");
        if let Some(i) = &self.ipam {
            for net in ipam.keys() {
                out.push_str(&format!(
                    "overlay_agent_ipam_exhausted_total{{network=\"{net}\"}} {}\n",
                    i.exhausted(net)
                ));
            }
        }
        for (name, help, kind, value) in [
            (
                "overlay_agent_remote_routes",
                "Remote agent subnets in the datapath.",
                "gauge",
                maps.routes()?.len() as u64,
            ),
            (
                "overlay_agent_known_vteps",
                "Other agents' VTEPs in the datapath.",
                "gauge",
                maps.vteps()?.len() as u64,
            ),
            (
                "overlay_agent_applied_revision",
                "Master state revision applied to the datapath.",
                "gauge",
                self.revision,
            ),
            (
                "overlay_agent_map_updates_total",
                "Map entries changed by reconciliation.",
                "counter",
                self.map_updates,
            ),
            (
                "overlay_agent_reconcile_errors_total",
                "Failed reconciliations (retried).",
                "counter",
                self.reconcile_errors,
            ),
            (
                "overlay_agent_registered",
                "1 once registered with a master.",
                "gauge",
                self.me.is_some() as u64,
            ),
            (
                "overlay_agent_allocation_changed_total",
                "Times the master changed this agent's VTEP or subnets under it (see /overlay-agent/status).",
                "counter",
                self.allocation_changes,
            ),
            (
                "overlay_agent_parked_endpoints",
                "Endpoints of disabled networks, kept out of the datapath until re-enabled.",
                "gauge",
                self.parked().len() as u64,
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
        out.push_str(&crate::masquerade::metrics(maps)?);
        Ok(out)
    }

    /// Removes idle masqueraded flows from the NAT table.
    pub fn sweep_nat(&mut self) -> anyhow::Result<usize> {
        crate::masquerade::sweep(self.dp.maps())
    }
}

/// Registers with the master until it answers, then follows its watch for as long as the agent
/// runs, reconciling the datapath on every new revision. Master outages only pause updates:
/// the datapath keeps forwarding with what it has.
pub async fn follow_master(core: Shared, client: MasterClient) {
    let (my_ip, heartbeat_now) = {
        let c = core.lock().unwrap();
        (c.underlay_ip(), c.heartbeat_trigger())
    };
    let mut backoff = Duration::from_millis(100);
    let mut tried_saved = false;
    loop {
        match crate::endpoint_report::heartbeat(&client, my_ip, &core).await {
            Ok(me) => {
                tracing::info!(%my_ip, "registered with the master");
                if let Err(conflict) = crate::vtep_mtu::check(core.lock().unwrap().mtu, &me) {
                    tracing::error!("{conflict}");
                    eprintln!("overlay-agent: {conflict}");
                    std::process::exit(crate::vtep_mtu::EXIT_CONFLICT);
                }
                // The port comes with the first state; until then the saved state's, or the
                // default.
                {
                    let mut c = core.lock().unwrap();
                    c.set_master_reachable(true);
                    let port = c
                        .state
                        .as_ref()
                        .map_or(overlay_api::DEFAULT_VXLAN_PORT, |s| s.network.vxlan_port);
                    if let Err(e) = c.set_me(me, port) {
                        tracing::error!("writing datapath config: {e:#}");
                    }
                }
                break;
            }
            Err(e) => {
                tracing::warn!("registering with the master failed (retrying in {backoff:?}): {e}");
                if !tried_saved {
                    tried_saved = true;
                    let mut c = core.lock().unwrap();
                    c.set_master_reachable(false);
                    match c.restore_saved() {
                        Ok(Some(revision)) => tracing::warn!(
                            revision,
                            "no master answers: running from the saved state (allocation and networks of revision {revision}); containers can be attached, the master's state will replace it once it answers"
                        ),
                        Ok(None) => tracing::warn!(
                            "no master answers and no saved state: containers cannot be attached until a master answers"
                        ),
                        Err(e) => tracing::error!(
                            "no master answers and the saved state is unusable: {e:#}"
                        ),
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    let heartbeat = {
        let client = client.clone();
        let core = core.clone();
        let heartbeat_now = heartbeat_now.clone();
        tokio::spawn(async move {
            loop {
                // Every 30 s, and at once when the endpoint counts change or the master
                // forgot this agent.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                    _ = heartbeat_now.notified() => {}
                }
                let answered = crate::endpoint_report::heartbeat(&client, my_ip, &core).await;
                if let Err(e) = &answered {
                    tracing::warn!("heartbeat to the master failed: {e}");
                }
                core.lock().unwrap().set_master_reachable(answered.is_ok());
            }
        })
    };
    // Deltas: the master sends only the agents that changed since `after` (the first answer,
    // after 0, is the whole state), so a change costs the same with 10 agents or 10,000.
    let mut after = 0u64;
    let mut state: Option<State> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        match client.watch_delta(after, Duration::from_secs(25)).await {
            Ok(Some(delta)) => {
                backoff = Duration::from_millis(100);
                core.lock().unwrap().set_master_reachable(true);
                let revision = delta.revision;
                let current = match state.take() {
                    Some(mut s) => {
                        delta.apply_to(&mut s);
                        s
                    }
                    None => delta.state,
                };
                if !current.agents.iter().any(|a| a.ip == my_ip) {
                    tracing::error!(%my_ip, revision, "the master no longer knows this agent (deleted while it runs): registering again");
                    heartbeat_now.notify_one();
                }
                state = Some(current.clone());
                let applied = {
                    let mut c = core.lock().unwrap();
                    let r = c.apply_state(current, revision);
                    if r.is_err() {
                        c.note_reconcile_error();
                    }
                    r
                };
                match applied {
                    Ok(_) => after = revision,
                    Err(e) => {
                        tracing::error!(revision, "reconciling failed (will retry): {e:#}");
                        tokio::time::sleep(backoff).await;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("watching the master failed (retrying in {backoff:?}): {e}");
                core.lock().unwrap().set_master_reachable(false);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        if heartbeat.is_finished() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_addresses_must_be_usable_hosts_of_the_agent_subnet() {
        let subnet: Ipv4Network = "9.0.1.0/24".parse().unwrap();
        assert!(ipam::half_of("9.0.1.2".parse().unwrap(), subnet).is_ok());
        assert!(ipam::half_of("9.0.1.130".parse().unwrap(), subnet).is_ok());
        for bad in [
            "9.0.2.2",
            "9.0.1.0",
            "9.0.1.1",
            "9.0.1.127",
            "9.0.1.128",
            "9.0.1.129",
            "9.0.1.255",
        ] {
            assert!(
                ipam::half_of(bad.parse().unwrap(), subnet).is_err(),
                "{bad} accepted"
            );
        }
    }
}
