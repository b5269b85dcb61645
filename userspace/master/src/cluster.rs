//! The cluster state as the master holds it in memory: configuration, every agent's
//! allocations, the revision, and what changed since the last commit. Pure logic, no I/O:
//! the writer in `master.rs` persists what `take_ops` returns.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::Ordering;

use overlay_api::{
    AgentInfo, AgentOverlayInfo, BackendInfo, BridgeInfo, MacAddr, NetworkConfig, OverlayInfo,
    OverlayState, State, Status, VTEP_NAME, VxLANInfo, WatchedDelta,
};

use crate::alloc::{Allocator, RestoreReport, halves4, halves6};
use crate::config::assign_default_vnis;
use crate::metrics::{Gauges, Metrics};
use crate::store::{AgentRecord, NetworkRecord, Op, Origin, SettingsRecord, Snapshot, StoreError};
use crate::validate::{ConfigError, validate};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MasterError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The store failed; nothing of the request was applied.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl From<ConfigError> for MasterError {
    fn from(error: ConfigError) -> Self {
        MasterError::Invalid(error.to_string())
    }
}

impl From<StoreError> for MasterError {
    fn from(error: StoreError) -> Self {
        MasterError::Unavailable(error.to_string())
    }
}

/// Records changed in memory and not yet committed.
#[derive(Debug, Default)]
struct Pending {
    settings: bool,
    /// All network records are rewritten when the list changes (positions shift).
    networks: bool,
    deleted_networks: BTreeSet<String>,
    agents: BTreeSet<IpAddr>,
    deleted_agents: BTreeSet<IpAddr>,
}

/// What a reconfiguration changed, for the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconfigureReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    /// Agents whose records changed (new blocks, freed blocks).
    pub agents_changed: usize,
}

impl ReconfigureReport {
    pub fn is_noop(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.agents_changed == 0
    }
}

/// The in-memory state: configuration, allocations, revision.
pub struct ClusterState {
    pub(crate) alloc: Allocator,
    origins: BTreeMap<String, Origin>,
    pub(crate) agents: BTreeMap<IpAddr, AgentRecord>,
    pub(crate) revision: u64,
    pending: Pending,
    pub(crate) changes: ChangeLog,
}

/// Most agent deletions remembered for deltas; beyond that, older watchers get a full state.
const MAX_TOMBSTONES: usize = 100_000;

/// Which revision last changed each agent, so watchers can be sent only what changed.
/// Kept in memory only: after a restart every watcher gets one full state.
#[derive(Debug, Default)]
pub(crate) struct ChangeLog {
    /// Watchers behind this revision get a full state (start, config change, compaction).
    full_before: u64,
    agent_revisions: HashMap<IpAddr, u64>,
    deleted: HashMap<IpAddr, u64>,
}

impl ChangeLog {
    pub(crate) fn starting_at(revision: u64) -> Self {
        ChangeLog {
            full_before: revision,
            ..ChangeLog::default()
        }
    }

    pub(crate) fn record(&mut self, revision: u64, ops: &[Op]) {
        for op in ops {
            match op {
                Op::PutSettings(_) | Op::PutNetwork(_) | Op::DeleteNetwork(_) => {
                    // Every agent's view of the networks changed.
                    self.full_before = revision;
                }
                Op::PutAgent(record) => {
                    self.agent_revisions.insert(record.ip, revision);
                    self.deleted.remove(&record.ip);
                }
                Op::DeleteAgent(ip) => {
                    self.agent_revisions.remove(ip);
                    self.deleted.insert(*ip, revision);
                }
            }
        }
        if self.deleted.len() > MAX_TOMBSTONES {
            self.full_before = revision;
            self.deleted.clear();
        }
    }
}

fn settings_of(config: &NetworkConfig) -> SettingsRecord {
    SettingsRecord {
        vtep_subnet: config.vtep_subnet,
        vtep_subnet6: config.vtep_subnet6,
        vtep_mac_oui: config.vtep_mac_oui,
        vtep_mtu: config.vtep_mtu,
        vxlan_port: config.vxlan_port,
    }
}

impl ClusterState {
    /// A state with no agents for a validated configuration (first start).
    pub fn fresh(config: NetworkConfig, origin: Origin) -> Result<Self, MasterError> {
        validate(&config)?;
        let origins = config
            .overlays
            .iter()
            .map(|o| (o.name.clone(), origin))
            .collect();
        Ok(ClusterState {
            alloc: Allocator::new(&config),
            origins,
            agents: BTreeMap::new(),
            revision: 0,
            pending: Pending {
                settings: true,
                networks: true,
                ..Pending::default()
            },
            changes: ChangeLog::default(),
        })
    }

    /// Rebuilds the state from the store; `None` when the store is empty. Allocations that
    /// clash (which a correct store never holds) are dropped, logged, and re-allocated.
    pub fn from_snapshot(snapshot: Snapshot) -> Result<Option<Self>, MasterError> {
        let Some(settings) = snapshot.settings else {
            return Ok(None);
        };
        let mut networks = snapshot.networks;
        networks.sort_by_key(|n| n.position);
        let config = NetworkConfig {
            vtep_subnet: settings.vtep_subnet,
            vtep_subnet6: settings.vtep_subnet6,
            vtep_mac_oui: settings.vtep_mac_oui,
            vtep_mtu: settings.vtep_mtu,
            vxlan_port: settings.vxlan_port,
            overlays: networks.iter().map(|n| n.info.clone()).collect(),
        };
        validate(&config).map_err(|e| {
            MasterError::Invalid(format!("the stored configuration is invalid: {e}"))
        })?;
        let mut cluster = ClusterState {
            alloc: Allocator::new(&config),
            origins: networks
                .iter()
                .map(|n| (n.info.name.clone(), n.origin))
                .collect(),
            agents: BTreeMap::new(),
            revision: snapshot.revision,
            pending: Pending::default(),
            changes: ChangeLog::starting_at(snapshot.revision),
        };
        let mut report = RestoreReport::default();
        for stored in snapshot.agents {
            let restored = cluster.alloc.restore(stored.clone(), &mut report);
            if restored != stored {
                cluster.pending.agents.insert(restored.ip);
            }
            cluster.agents.insert(restored.ip, restored);
        }
        for dropped in &report.dropped {
            tracing::error!(%dropped, "stored allocation clashes; it will be re-allocated");
        }
        // Agents that lost something (or had failed) get what they lack now.
        for ip in cluster.pending.agents.clone() {
            let record = cluster.agents.get_mut(&ip).expect("agent just restored");
            cluster.alloc.allocate_missing(record);
        }
        Ok(Some(cluster))
    }

    pub fn config(&self) -> &NetworkConfig {
        self.alloc.config()
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn agent_count(&self) -> usize {
        self.agents.len()
    }

    pub fn agent(&self, ip: IpAddr) -> Option<AgentInfo> {
        self.agents.get(&ip).map(|record| self.agent_info(record))
    }

    /// Switches to a new configuration: every kept allocation must still fit (else the whole
    /// change is refused), removed networks' blocks are freed, and agents get blocks of added
    /// networks at once. Nothing changes when it fails.
    pub fn reconfigure(
        &mut self,
        candidate: NetworkConfig,
        origins: BTreeMap<String, Origin>,
        metrics: &Metrics,
    ) -> Result<ReconfigureReport, MasterError> {
        validate(&candidate)?;
        let old = self.config().clone();
        let mut report = ReconfigureReport::default();
        for overlay in &candidate.overlays {
            match old.overlays.iter().find(|o| o.name == overlay.name) {
                None => report.added.push(overlay.name.clone()),
                Some(previous) if previous != overlay => report.changed.push(overlay.name.clone()),
                Some(_) => {}
            }
        }
        for overlay in &old.overlays {
            if !candidate.overlays.iter().any(|o| o.name == overlay.name) {
                report.removed.push(overlay.name.clone());
            }
        }

        let mut alloc = Allocator::new(&candidate);
        let mut restore_report = RestoreReport::default();
        let mut agents = BTreeMap::new();
        for record in self.agents.values() {
            let restored = alloc.restore(record.clone(), &mut restore_report);
            agents.insert(restored.ip, restored);
        }
        if !restore_report.dropped.is_empty() {
            let shown: Vec<&str> = restore_report
                .dropped
                .iter()
                .take(3)
                .map(String::as_str)
                .collect();
            return Err(MasterError::Invalid(format!(
                "incompatible change: {} existing allocation(s) would not fit the new configuration \
                 (e.g. {}); a network's subnet or prefix can only change while no agent holds a \
                 block outside it; remove and re-add the network instead",
                restore_report.dropped.len(),
                shown.join("; ")
            )));
        }
        let mut failures = Vec::new();
        for record in agents.values_mut() {
            failures.extend(alloc.allocate_missing(record));
        }
        metrics.record_failures(&failures);

        for (ip, record) in &agents {
            if self.agents.get(ip) != Some(record) {
                self.pending.agents.insert(*ip);
                report.agents_changed += 1;
            }
        }
        if settings_of(&old) != settings_of(&candidate) {
            self.pending.settings = true;
        }
        if old.overlays != candidate.overlays || self.origins != origins {
            self.pending.networks = true;
        }
        for name in &report.removed {
            self.pending.deleted_networks.insert(name.clone());
        }
        self.alloc = alloc;
        self.agents = agents;
        self.origins = origins;
        Ok(report)
    }

    /// The configuration a config file asks for: its networks (VNIs kept from the running
    /// ones when the file gives none) plus the networks added through the API.
    pub fn candidate_from_file(
        &self,
        mut file: NetworkConfig,
    ) -> (NetworkConfig, BTreeMap<String, Origin>) {
        let running = self.config();
        for overlay in &mut file.overlays {
            if overlay.vni.is_none()
                && let Some(existing) = running.overlays.iter().find(|o| o.name == overlay.name)
            {
                overlay.vni = existing.vni;
            }
        }
        let mut origins: BTreeMap<String, Origin> = file
            .overlays
            .iter()
            .map(|o| (o.name.clone(), Origin::File))
            .collect();
        for overlay in &running.overlays {
            if self.origins.get(&overlay.name) == Some(&Origin::Api)
                && !origins.contains_key(&overlay.name)
            {
                origins.insert(overlay.name.clone(), Origin::Api);
                file.overlays.push(overlay.clone());
            }
        }
        assign_default_vnis(&mut file.overlays);
        (file, origins)
    }

    /// Registers (or heartbeats) an agent: allocates whatever it lacks.
    pub fn register(&mut self, ip: IpAddr, metrics: &Metrics) -> AgentInfo {
        let existing = self.agents.get(&ip);
        if let Some(record) = existing
            && self.alloc.is_complete(record)
        {
            return self.agent_info(record);
        }
        let mut record = existing.cloned().unwrap_or_else(|| AgentRecord::new(ip));
        let failures = self.alloc.allocate_missing(&mut record);
        metrics.record_failures(&failures);
        for failure in &failures {
            tracing::warn!(agent = %ip, reason = failure.reason.label(), network = ?failure.network, "allocation failed");
        }
        if existing.is_none() {
            metrics.agents_created.fetch_add(1, Ordering::Relaxed);
        }
        if existing != Some(&record) {
            self.pending.agents.insert(ip);
        }
        let info = self.agent_info(&record);
        self.agents.insert(ip, record);
        info
    }

    /// Forgets agents and frees their allocations; returns those that existed.
    pub fn delete_agents(&mut self, ips: &[IpAddr]) -> Vec<IpAddr> {
        let mut deleted = Vec::new();
        for ip in ips {
            if let Some(mut record) = self.agents.remove(ip) {
                self.alloc.release_agent(&mut record);
                self.pending.agents.remove(ip);
                self.pending.deleted_agents.insert(*ip);
                deleted.push(*ip);
            }
        }
        deleted
    }

    /// The store operations for everything changed since the last call.
    pub(crate) fn take_ops(&mut self) -> Vec<Op> {
        let pending = std::mem::take(&mut self.pending);
        let mut ops = Vec::new();
        if pending.settings {
            ops.push(Op::PutSettings(settings_of(self.config())));
        }
        for name in pending.deleted_networks {
            ops.push(Op::DeleteNetwork(name));
        }
        if pending.networks {
            for (position, info) in self.config().overlays.iter().enumerate() {
                ops.push(Op::PutNetwork(NetworkRecord {
                    info: info.clone(),
                    origin: self
                        .origins
                        .get(&info.name)
                        .copied()
                        .unwrap_or(Origin::File),
                    position: position as u32,
                }));
            }
        }
        for ip in pending.deleted_agents {
            ops.push(Op::DeleteAgent(ip));
        }
        for ip in pending.agents {
            if let Some(record) = self.agents.get(&ip) {
                ops.push(Op::PutAgent(record.clone()));
            }
        }
        ops
    }

    /// The DC/OS `State`.
    pub fn state(&self) -> State {
        State {
            network: self.config().clone(),
            agents: self.agents.values().map(|r| self.agent_info(r)).collect(),
        }
    }

    /// What changed after revision `after`: a full state when the change log does not reach
    /// back that far (or `after` is from the future, e.g. another master's data).
    pub fn delta(&self, after: u64) -> WatchedDelta {
        if after < self.changes.full_before || after > self.revision {
            return WatchedDelta {
                revision: self.revision,
                full: true,
                state: self.state(),
                deleted: Vec::new(),
            };
        }
        let changed = |ip: &IpAddr| {
            self.changes
                .agent_revisions
                .get(ip)
                .is_some_and(|&revision| revision > after)
        };
        let mut deleted: Vec<IpAddr> = self
            .changes
            .deleted
            .iter()
            .filter(|&(_, &revision)| revision > after)
            .map(|(&ip, _)| ip)
            .collect();
        deleted.sort();
        WatchedDelta {
            revision: self.revision,
            full: false,
            state: State {
                network: self.config().clone(),
                agents: self
                    .agents
                    .values()
                    .filter(|record| changed(&record.ip))
                    .map(|record| self.agent_info(record))
                    .collect(),
            },
            deleted,
        }
    }

    pub fn gauges(&self) -> Gauges {
        Gauges {
            revision: self.revision,
            agents: self.agents.len(),
            agents_failed: self
                .agents
                .values()
                .filter(|r| {
                    r.vtep_error.is_some() || r.networks.values().any(|n| n.error.is_some())
                })
                .count(),
            vteps_allocated: self.alloc.vteps_allocated(),
            subnets_allocated: self
                .alloc
                .subnets_allocated()
                .map(|(name, v4, v6)| (name.to_owned(), v4, v6))
                .collect(),
        }
    }

    /// An agent's record in DC/OS's `AgentInfo` shape.
    pub(crate) fn agent_info(&self, record: &AgentRecord) -> AgentInfo {
        let config = self.config();
        let overlays = config
            .overlays
            .iter()
            .map(|overlay| {
                let vxlan = VxLANInfo {
                    vni: overlay.vni.expect("validated configs have VNIs"),
                    vtep_name: VTEP_NAME.to_owned(),
                    vtep_ip: record.vtep_ip.map(|ip| {
                        ipnetwork::Ipv4Network::new(ip, config.vtep_subnet.prefix())
                            .expect("validated prefix")
                    }),
                    vtep_mac: record
                        .vtep_ip
                        .map(|ip| MacAddr::vtep(config.vtep_mac_oui, ip)),
                    vtep_ip6: record
                        .vtep_ip6
                        .zip(config.vtep_subnet6)
                        .map(|(ip, subnet)| {
                            ipnetwork::Ipv6Network::new(ip, subnet.prefix())
                                .expect("validated prefix")
                        }),
                    vtep_mtu: config.vtep_mtu,
                };
                let mut info = AgentOverlayInfo {
                    info: overlay.clone(),
                    subnet: None,
                    subnet6: None,
                    mesos_bridge: None,
                    docker_bridge: None,
                    backend: BackendInfo { vxlan },
                    state: None,
                };
                let entry = record.networks.get(&overlay.name);
                let error = record
                    .vtep_error
                    .clone()
                    .or_else(|| entry.and_then(|e| e.error.clone()));
                match (error, entry) {
                    (Some(error), _) => {
                        info.state = Some(OverlayState {
                            status: Status::Failed,
                            error: Some(error),
                        });
                    }
                    (None, Some(entry)) => {
                        info.subnet = entry.subnet;
                        info.subnet6 = entry.subnet6;
                        let v4 = entry.subnet.map(halves4);
                        let v6 = entry.subnet6.map(halves6);
                        info.mesos_bridge = Some(BridgeInfo {
                            name: format!("m-{}", overlay.name),
                            ip: v4.map(|h| h.0),
                            ip6: v6.map(|h| h.0),
                        });
                        info.docker_bridge = Some(BridgeInfo {
                            name: format!("d-{}", overlay.name),
                            ip: v4.map(|h| h.1),
                            ip6: v6.map(|h| h.1),
                        });
                        info.state = Some(OverlayState {
                            status: Status::Ok,
                            error: None,
                        });
                    }
                    // Not yet allocated (cannot be observed outside the writer).
                    (None, None) => {
                        info.state = Some(OverlayState {
                            status: Status::Configuring,
                            error: None,
                        });
                    }
                }
                info
            })
            .collect();
        AgentInfo {
            ip: record.ip,
            overlays,
            configuration_attempts: None,
        }
    }
}

/// A change of the network list requested through the API.
#[derive(Debug, Clone)]
pub enum NetworkChange {
    Add(OverlayInfo),
    SetEnabled { name: String, enabled: bool },
    Remove(String),
}

pub(crate) fn apply_network_change(
    cluster: &mut ClusterState,
    change: NetworkChange,
    metrics: &Metrics,
) -> Result<Option<OverlayInfo>, MasterError> {
    let mut candidate = cluster.config().clone();
    let mut origins = cluster.origins.clone();
    let position = |config: &NetworkConfig, name: &str| {
        config
            .overlays
            .iter()
            .position(|o| o.name == name)
            .ok_or_else(|| MasterError::NotFound(format!("no network named {name:?}")))
    };
    let name = match change {
        NetworkChange::Add(spec) => {
            if candidate.overlays.iter().any(|o| o.name == spec.name) {
                return Err(MasterError::Conflict(format!(
                    "name = {}: a network with this name exists",
                    spec.name
                )));
            }
            let name = spec.name.clone();
            candidate.overlays.push(spec);
            assign_default_vnis(&mut candidate.overlays);
            origins.insert(name.clone(), Origin::Api);
            Some(name)
        }
        NetworkChange::SetEnabled { name, enabled } => {
            let index = position(&candidate, &name)?;
            candidate.overlays[index].enabled = Some(enabled);
            Some(name)
        }
        NetworkChange::Remove(name) => {
            let index = position(&candidate, &name)?;
            candidate.overlays.remove(index);
            origins.remove(&name);
            None
        }
    };
    let report = cluster.reconfigure(candidate, origins, metrics)?;
    log_reconfigure("API network change", &report);
    Ok(name.and_then(|name| {
        cluster
            .config()
            .overlays
            .iter()
            .find(|o| o.name == name)
            .cloned()
    }))
}

pub(crate) fn log_reconfigure(what: &str, report: &ReconfigureReport) {
    if report.is_noop() {
        tracing::info!("{what}: no change");
        return;
    }
    for name in &report.removed {
        tracing::warn!(network = %name, "{what}: network removed; its allocations are freed");
    }
    tracing::info!(
        added = ?report.added,
        removed = ?report.removed,
        changed = ?report.changed,
        agents_changed = report.agents_changed,
        "{what}: configuration applied"
    );
}
