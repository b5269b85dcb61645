//! The cluster state as the master holds it in memory: configuration, every agent's
//! allocations, the revision, and what changed since the last commit. Pure logic, no I/O:
//! the writer in `master.rs` persists what `take_ops` returns.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use overlay_api::{
    AgentInfo, AgentOverlayInfo, BackendInfo, BridgeInfo, MacAddr, NetworkConfig, OverlayInfo,
    OverlayState, State, Status, VxLANInfo, WatchedDelta, vtep_name,
};

use crate::alloc::{Allocator, RestoreReport};
use crate::config::assign_network_ids;
use crate::metrics::{Gauges, Metrics};
use crate::store::{AgentRecord, NetworkRecord, Op, Origin, SettingsRecord, Snapshot, StoreError};
use crate::validate::{ConfigError, ReservedAddress, check_reserved_addresses, validate};
use overlay_api::subnets::{halves4, halves6};

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
    /// An address pool is exhausted: the registration was dropped, nothing of it kept.
    #[error("{0}")]
    Exhausted(String),
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

/// How long an agent counts as alive after its last heartbeat, unless told otherwise: three
/// of the agents' 30 s heartbeats.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long freed VTEPs, MACs and subnets are held back, unless told otherwise: longer than
/// the heartbeat timeout, so an agent deleted while alive has stopped (or re-registered and
/// got its own back) before anyone else can get them.
pub const DEFAULT_QUARANTINE: Duration = Duration::from_secs(300);

/// The master's rules that protect running agents, and what they need to know.
#[derive(Debug, Clone)]
pub struct SafetySettings {
    /// An agent heard from within this time may be running: deleting it needs force.
    pub heartbeat_timeout: Duration,
    /// Freed allocations are not reused for this long.
    pub quarantine: Duration,
    /// The master's own addresses (listen and advertised): no network may contain them.
    pub master_addresses: Vec<IpAddr>,
    /// Agents may have IPv6 underlay addresses (DC/OS's master takes IPv4 only).
    pub ipv6_underlay: bool,
}

impl Default for SafetySettings {
    fn default() -> Self {
        SafetySettings {
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            quarantine: Duration::ZERO,
            master_addresses: Vec::new(),
            ipv6_underlay: false,
        }
    }
}

/// What an agent asks of the master when it registers (DC/OS's `AgentNetworkConfig`; absent
/// fields leave the agent's record as it is, a new agent gets both bridges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentNetworkConfig {
    /// The first half of each subnet for Mesos containers (`m-<network>`).
    pub mesos_bridge: Option<bool>,
    /// The second half for Docker containers (`d-<network>`).
    pub docker_bridge: Option<bool>,
}

impl AgentNetworkConfig {
    pub(crate) fn matches(&self, record: &AgentRecord) -> bool {
        self.mesos_bridge.is_none_or(|b| b == record.mesos_bridge)
            && self.docker_bridge.is_none_or(|b| b == record.docker_bridge)
    }

    fn apply(&self, record: &mut AgentRecord) {
        if let Some(b) = self.mesos_bridge {
            record.mesos_bridge = b;
        }
        if let Some(b) = self.docker_bridge {
            record.docker_bridge = b;
        }
    }
}

/// What the master last heard from an agent (memory only, refreshed by every heartbeat).
#[derive(Debug, Clone)]
pub(crate) struct Liveness {
    pub(crate) seen: Instant,
    /// Local endpoints per network, when the agent reports them.
    pub(crate) endpoints: Option<BTreeMap<String, u32>>,
}

/// The in-memory state: configuration, allocations, revision.
pub struct ClusterState {
    pub(crate) alloc: Allocator,
    origins: BTreeMap<String, Origin>,
    pub(crate) agents: BTreeMap<IpAddr, AgentRecord>,
    pub(crate) revision: u64,
    pending: Pending,
    pub(crate) changes: ChangeLog,
    safety: SafetySettings,
    /// Agents without an entry count as seen at `started` (after a restart the master cannot
    /// know which of its stored agents are alive).
    liveness: HashMap<IpAddr, Liveness>,
    started: Instant,
    /// The configuration file's path, for refusals that name it.
    pub(crate) config_file: Option<String>,
    /// Registration place of the next new agent.
    next_order: u64,
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
        vtep_mac_oui: config.vtep_mac_oui.clone(),
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
            safety: SafetySettings::default(),
            liveness: HashMap::new(),
            started: Instant::now(),
            config_file: None,
            next_order: 1,
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
            safety: SafetySettings::default(),
            liveness: HashMap::new(),
            started: Instant::now(),
            config_file: None,
            next_order: 1,
        };
        cluster.next_order = snapshot.agents.iter().map(|a| a.order).max().unwrap_or(0) + 1;
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

    pub fn safety(&self) -> &SafetySettings {
        &self.safety
    }

    /// Sets the safety rules (the quarantine applies to allocations freed from now on).
    pub fn set_safety(&mut self, safety: SafetySettings) {
        self.alloc.set_quarantine_hold(safety.quarantine);
        self.safety = safety;
    }

    /// Keeps what only lives in memory (safety rules, liveness, quarantine) from the state
    /// this one replaces (a reload from the store).
    pub(crate) fn inherit_runtime(&mut self, previous: &mut ClusterState) {
        self.safety = previous.safety.clone();
        self.liveness = std::mem::take(&mut previous.liveness);
        self.started = previous.started;
        self.config_file = previous.config_file.take();
        let quarantine = previous.alloc.take_quarantine();
        self.alloc.adopt_quarantine(quarantine);
        // Agents another master deleted: their allocations are quarantined here too.
        let now = Instant::now();
        for (ip, record) in &previous.agents {
            if !self.agents.contains_key(ip) {
                self.alloc.quarantine_record(record, now);
            }
        }
    }

    fn last_seen(&self, ip: IpAddr) -> Instant {
        self.liveness.get(&ip).map_or(self.started, |l| l.seen)
    }

    /// Records a heartbeat: when, and the endpoints the agent reports (if it does).
    pub(crate) fn note_heartbeat(
        &mut self,
        ip: IpAddr,
        endpoints: Option<BTreeMap<String, u32>>,
        now: Instant,
    ) {
        self.liveness.insert(
            ip,
            Liveness {
                seen: now,
                endpoints,
            },
        );
    }

    /// Every agent with its last heartbeat: `stale` once the heartbeat timeout passed
    /// without one (also for agents not heard from since this master started), `unknown`
    /// before that for those, `live` otherwise.
    pub(crate) fn liveness_report(&self, now: Instant) -> Vec<overlay_api::AgentLiveness> {
        self.agents
            .keys()
            .map(|ip| {
                let heard = self.liveness.get(ip).map(|l| l.seen);
                let ago = now.saturating_duration_since(self.last_seen(*ip));
                let status = if ago >= self.safety.heartbeat_timeout {
                    "stale"
                } else if heard.is_none() {
                    "unknown"
                } else {
                    "live"
                };
                overlay_api::AgentLiveness {
                    ip: *ip,
                    status: status.to_owned(),
                    last_heartbeat_seconds_ago: heard
                        .map(|seen| now.saturating_duration_since(seen).as_secs_f64()),
                }
            })
            .collect()
    }

    /// Agents whose last heartbeat (or this master's start) is `lease` or more ago.
    pub(crate) fn not_heard_for(&self, lease: Duration, now: Instant) -> Vec<IpAddr> {
        self.agents
            .keys()
            .filter(|ip| now.saturating_duration_since(self.last_seen(**ip)) >= lease)
            .copied()
            .collect()
    }

    /// Agents reporting endpoints on `network`, with their counts.
    fn endpoints_in(&self, network: &str) -> Vec<(IpAddr, u32)> {
        let mut holders: Vec<(IpAddr, u32)> = self
            .liveness
            .iter()
            .filter(|(ip, _)| self.agents.contains_key(ip))
            .filter_map(|(ip, l)| {
                let n = l.endpoints.as_ref()?.get(network).copied()?;
                (n > 0).then_some((*ip, n))
            })
            .collect();
        holders.sort();
        holders
    }

    /// Refuses (without `force`) to remove or disable a network that holds endpoints or that
    /// the configuration file defines.
    fn guard_network(&self, name: &str, action: &str, force: bool) -> Result<(), MasterError> {
        let holders = self.endpoints_in(name);
        let from_file = self.origins.get(name) == Some(&Origin::File);
        if force {
            if from_file || !holders.is_empty() {
                tracing::warn!(network = %name, ?holders, from_file, "forced: {action} network");
            }
            return Ok(());
        }
        if !holders.is_empty() {
            let total: u32 = holders.iter().map(|(_, n)| n).sum();
            let shown: Vec<String> = holders
                .iter()
                .take(5)
                .map(|(ip, n)| format!("agent {ip}: {n}"))
                .collect();
            return Err(MasterError::Conflict(format!(
                "network {name} holds {total} endpoint(s) ({}{}): {action} it with force=true \
                 to cut them off",
                shown.join(", "),
                if holders.len() > 5 { ", ..." } else { "" }
            )));
        }
        if from_file {
            return Err(MasterError::Conflict(format!(
                "network {name} is defined by the configuration file{}: {action} it with \
                 force=true (the file's definition applies again at the next reload or restart), \
                 or change the file",
                self.config_file
                    .as_deref()
                    .map(|path| format!(" {path}"))
                    .unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// Refuses a config reload that removes or disables a network holding endpoints (the
    /// running configuration stays; remove it through the API with force first).
    fn guard_reload(&self, candidate: &NetworkConfig) -> Result<(), MasterError> {
        let mut refused = Vec::new();
        for overlay in &self.config().overlays {
            let next = candidate.overlays.iter().find(|o| o.name == overlay.name);
            let action = match next {
                None => "removes",
                Some(next) if overlay.is_enabled() && !next.is_enabled() => "disables",
                Some(_) => continue,
            };
            let holders = self.endpoints_in(&overlay.name);
            if !holders.is_empty() {
                let total: u32 = holders.iter().map(|(_, n)| n).sum();
                refused.push(format!(
                    "the file {action} network {} which holds {total} endpoint(s) on {} agent(s)",
                    overlay.name,
                    holders.len()
                ));
            }
        }
        if refused.is_empty() {
            return Ok(());
        }
        Err(MasterError::Conflict(format!(
            "{}; remove or disable it through the API with force=true first",
            refused.join("; ")
        )))
    }

    /// The addresses no network may contain: every agent's underlay address and the master's.
    fn reserved_addresses(&self) -> Vec<ReservedAddress> {
        let mut reserved: Vec<ReservedAddress> = self
            .safety
            .master_addresses
            .iter()
            .map(|ip| ReservedAddress {
                ip: *ip,
                owner: "the master's address".into(),
            })
            .collect();
        reserved.extend(self.agents.keys().map(|ip| ReservedAddress {
            ip: *ip,
            owner: format!("agent {ip}'s underlay address"),
        }));
        reserved
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
        // Networks whose addresses are new: they must not contain the underlay's.
        let mut readdressed = BTreeSet::new();
        for overlay in &candidate.overlays {
            match old.overlays.iter().find(|o| o.name == overlay.name) {
                None => {
                    report.added.push(overlay.name.clone());
                    readdressed.insert(overlay.name.clone());
                }
                Some(previous) if previous != overlay => {
                    report.changed.push(overlay.name.clone());
                    if (previous.subnet, previous.subnet6) != (overlay.subnet, overlay.subnet6) {
                        readdressed.insert(overlay.name.clone());
                    }
                }
                Some(_) => {}
            }
        }
        for overlay in &old.overlays {
            if !candidate.overlays.iter().any(|o| o.name == overlay.name) {
                report.removed.push(overlay.name.clone());
            }
        }
        let vtep_changed =
            (old.vtep_subnet, old.vtep_subnet6) != (candidate.vtep_subnet, candidate.vtep_subnet6);
        if vtep_changed || !readdressed.is_empty() {
            check_reserved_addresses(
                &candidate,
                Some(&readdressed),
                vtep_changed,
                &self.reserved_addresses(),
            )?;
        }

        let mut alloc = Allocator::new(&candidate);
        let mut restore_report = RestoreReport::default();
        let mut agents = BTreeMap::new();
        for record in self.agents.values() {
            let restored = alloc.restore(record.clone(), &mut restore_report);
            agents.insert(restored.ip, restored);
        }
        // Quarantined allocations stay out of reach of the agents' new blocks.
        alloc.adopt_quarantine(self.alloc.quarantine().clone());
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

    /// The configuration a config file asks for: its networks (each keeping the running one's
    /// network id; the VNI is the file's: absent, the shared one) plus the networks added
    /// through the API.
    pub fn candidate_from_file(
        &self,
        mut file: NetworkConfig,
    ) -> (NetworkConfig, BTreeMap<String, Origin>) {
        let running = self.config();
        for overlay in &mut file.overlays {
            if let Some(existing) = running.overlays.iter().find(|o| o.name == overlay.name) {
                // A store from before network ids knew a network by its VNI: that is its id.
                overlay.id = existing.id.or(existing.vni);
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
        assign_network_ids(&mut file.overlays);
        (file, origins)
    }

    /// Registers (or heartbeats) an agent: allocates whatever it lacks. A new agent whose
    /// underlay address lies inside an overlay or VTEP subnet is refused.
    pub fn register(
        &mut self,
        ip: IpAddr,
        endpoints: Option<BTreeMap<String, u32>>,
        now: Instant,
        metrics: &Metrics,
    ) -> Result<AgentInfo, MasterError> {
        self.register_with(ip, endpoints, AgentNetworkConfig::default(), now, metrics)
    }

    /// [`Self::register`] with the agent's wishes (DC/OS's `AgentNetworkConfig`). When no
    /// VTEP address is left the registration is dropped whole (as DC/OS's master drops it):
    /// the agent is not stored half-allocated, and it may try again later.
    pub fn register_with(
        &mut self,
        ip: IpAddr,
        endpoints: Option<BTreeMap<String, u32>>,
        network_config: AgentNetworkConfig,
        now: Instant,
        metrics: &Metrics,
    ) -> Result<AgentInfo, MasterError> {
        let existing = self.agents.get(&ip);
        if existing.is_none() {
            if ip.is_ipv6() && !self.safety.ipv6_underlay {
                return Err(MasterError::Invalid(format!(
                    "ip = {ip}: agent addresses are IPv4 (as in DC/OS) unless the master runs \
                     with --ipv6-underlay"
                )));
            }
            crate::validate::check_agent_address(self.config(), ip)?;
        }
        self.note_heartbeat(ip, endpoints, now);
        let existing = self.agents.get(&ip);
        let bridges_unchanged = existing.is_none_or(|record| network_config.matches(record));
        if let Some(record) = existing
            && bridges_unchanged
            && self.alloc.is_complete(record)
        {
            return Ok(self.agent_info(record));
        }
        let existing = existing.cloned();
        self.alloc.expire_quarantine(now);
        let mut record = existing.clone().unwrap_or_else(|| {
            let mut record = AgentRecord::new(ip);
            record.order = self.next_order;
            record
        });
        network_config.apply(&mut record);
        let reclaimed = self.alloc.reclaim(&mut record);
        if reclaimed > 0 {
            tracing::warn!(agent = %ip, reclaimed, "a deleted agent registered again within the quarantine: it gets its own VTEP and subnets back");
        }
        let failures = self.alloc.allocate_missing_at(&mut record, now);
        metrics.record_failures(&failures);
        for failure in &failures {
            tracing::warn!(agent = %ip, reason = failure.reason.label(), network = ?failure.network, "allocation failed");
        }
        if let Some(error) = record.vtep_error.take() {
            // Dropped whole: what it took goes back at once (nobody saw it).
            self.alloc.release_tentative(&mut record);
            self.liveness.remove(&ip);
            if self.agents.remove(&ip).is_some() {
                self.pending.agents.remove(&ip);
                self.pending.deleted_agents.insert(ip);
            }
            tracing::error!(agent = %ip, %error, "registration dropped");
            return Err(MasterError::Exhausted(format!(
                "registration of agent {ip} dropped: {error}"
            )));
        }
        if existing.is_none() {
            metrics.agents_created.fetch_add(1, Ordering::Relaxed);
            self.next_order += 1;
        }
        if existing.as_ref() != Some(&record) {
            self.pending.agents.insert(ip);
        }
        let info = self.agent_info(&record);
        self.agents.insert(ip, record);
        Ok(info)
    }

    /// Forgets agents and frees their allocations (into the quarantine); returns those that
    /// existed. Without `force`, agents heard from within the heartbeat timeout are refused
    /// (the whole request, naming them): they may still be using what would be freed.
    pub fn delete_agents(
        &mut self,
        ips: &[IpAddr],
        force: bool,
        now: Instant,
    ) -> Result<Vec<IpAddr>, MasterError> {
        if !force {
            let timeout = self.safety.heartbeat_timeout;
            let alive: Vec<String> = ips
                .iter()
                .filter(|ip| self.agents.contains_key(ip))
                .filter_map(|ip| {
                    let ago = now.saturating_duration_since(self.last_seen(*ip));
                    (ago < timeout).then(|| {
                        if self.liveness.contains_key(ip) {
                            format!("agent {ip} last heartbeated {:.1} s ago", ago.as_secs_f64())
                        } else {
                            format!(
                                "agent {ip} not heard from since this master started {:.1} s ago",
                                ago.as_secs_f64()
                            )
                        }
                    })
                })
                .collect();
            if !alive.is_empty() {
                return Err(MasterError::Conflict(format!(
                    "{} (heartbeat timeout {} s): it may still be using its VTEP and subnets; \
                     stop it and wait, or delete with force=true",
                    alive.join(", "),
                    timeout.as_secs()
                )));
            }
        }
        self.alloc.expire_quarantine(now);
        let mut deleted = Vec::new();
        for ip in ips {
            if let Some(mut record) = self.agents.remove(ip) {
                self.alloc.release_agent_at(&mut record, now);
                self.pending.agents.remove(ip);
                self.pending.deleted_agents.insert(*ip);
                self.liveness.remove(ip);
                deleted.push(*ip);
            }
        }
        Ok(deleted)
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

    /// The DC/OS `State`: agents in registration order; an agent without a VTEP (only after
    /// a stored clash it could not be given a new one for) is left out rather than shown
    /// half-allocated.
    pub fn state(&self) -> State {
        State {
            network: self.shown_config(),
            agents: self
                .agents_in_order(|_| true)
                .map(|r| self.agent_info(r))
                .collect(),
        }
    }

    /// The configuration as the state shows it (`enabled` always present).
    fn shown_config(&self) -> NetworkConfig {
        let mut config = self.config().clone();
        config.overlays = config.overlays.iter().map(shown).collect();
        config
    }

    /// The agents that have a VTEP and pass `keep`, in registration order.
    fn agents_in_order(
        &self,
        keep: impl Fn(&AgentRecord) -> bool,
    ) -> impl Iterator<Item = &AgentRecord> {
        let mut records: Vec<&AgentRecord> = self
            .agents
            .values()
            .filter(|r| r.vtep_ip.is_some() && r.vtep_error.is_none() && keep(r))
            .collect();
        records.sort_by_key(|r| (r.order, r.ip));
        records.into_iter()
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
                network: self.shown_config(),
                agents: self
                    .agents_in_order(|record| changed(&record.ip))
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
            agents_stale: self
                .liveness_report(Instant::now())
                .iter()
                .filter(|l| l.status == "stale")
                .count(),
            vteps_allocated: self.alloc.vteps_allocated(),
            quarantined: self.alloc.quarantined(),
            subnets_allocated: self
                .alloc
                .subnets_allocated()
                .map(|(name, v4, v6)| (name.to_owned(), v4, v6))
                .collect(),
        }
    }

    /// An agent's record in DC/OS's `AgentInfo` shape, as DC/OS's master shows it: one
    /// entry per network the agent holds a share of (a network whose pool is exhausted for
    /// it, or that was disabled before it got a share, has none), each with the agent's one
    /// backend and a `state` of `status` only.
    pub(crate) fn agent_info(&self, record: &AgentRecord) -> AgentInfo {
        let config = self.config();
        let overlays = config
            .overlays
            .iter()
            .filter_map(|overlay| {
                let entry = record.networks.get(&overlay.name)?;
                if entry.error.is_some() || record.vtep_error.is_some() {
                    return None;
                }
                let vxlan = VxLANInfo {
                    // DC/OS's master: VNI 1024 on `vtep1024` for every network, unless this
                    // one has its own.
                    vni: overlay.wire_vni(),
                    vtep_name: vtep_name(overlay.wire_vni()),
                    vtep_ip: record.vtep_ip.map(|ip| {
                        ipnetwork::Ipv4Network::new(ip, config.vtep_subnet.prefix())
                            .expect("validated prefix")
                    }),
                    vtep_mac: record
                        .vtep_ip
                        .map(|ip| MacAddr::vtep(config.vtep_mac_oui.mac(), ip)),
                    vtep_ip6: record
                        .vtep_ip6
                        .zip(config.vtep_subnet6)
                        .map(|(ip, subnet)| {
                            ipnetwork::Ipv6Network::new(ip, subnet.prefix())
                                .expect("validated prefix")
                        }),
                    vtep_mtu: config.vtep_mtu,
                };
                let v4 = entry.subnet.map(halves4);
                let v6 = entry.subnet6.map(halves6);
                let mesos_bridge = record.mesos_bridge.then(|| BridgeInfo {
                    name: format!("m-{}", overlay.name),
                    ip: v4.map(|h| h.0),
                    ip6: v6.map(|h| h.0),
                });
                let docker_bridge = record.docker_bridge.then(|| BridgeInfo {
                    name: format!("d-{}", overlay.name),
                    ip: v4.map(|h| h.1),
                    ip6: v6.map(|h| h.1),
                });
                Some(AgentOverlayInfo {
                    info: shown(overlay),
                    subnet: entry.subnet,
                    subnet6: entry.subnet6,
                    mesos_bridge,
                    docker_bridge,
                    backend: BackendInfo { vxlan },
                    state: Some(OverlayState {
                        status: Status::Ok,
                        error: None,
                    }),
                })
            })
            .collect();
        AgentInfo {
            ip: record.ip,
            overlays,
            configuration_attempts: None,
        }
    }
}

/// A network as the state shows it: `enabled` always present, as stout prints a proto2
/// field with a default.
fn shown(overlay: &OverlayInfo) -> OverlayInfo {
    OverlayInfo {
        enabled: Some(overlay.is_enabled()),
        ..overlay.clone()
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
    force: bool,
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
            // Ids are the master's to give.
            candidate.overlays.push(OverlayInfo { id: None, ..spec });
            assign_network_ids(&mut candidate.overlays);
            origins.insert(name.clone(), Origin::Api);
            Some(name)
        }
        NetworkChange::SetEnabled { name, enabled } => {
            let index = position(&candidate, &name)?;
            if !enabled && candidate.overlays[index].is_enabled() {
                cluster.guard_network(&name, "disable", force)?;
            }
            candidate.overlays[index].enabled = Some(enabled);
            Some(name)
        }
        NetworkChange::Remove(name) => {
            let index = position(&candidate, &name)?;
            cluster.guard_network(&name, "remove", force)?;
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

/// Applies a re-read config file; refused whole when it would cut off endpoints.
pub(crate) fn apply_reload(
    cluster: &mut ClusterState,
    file_config: NetworkConfig,
    metrics: &Metrics,
) -> Result<ReconfigureReport, MasterError> {
    let (candidate, origins) = cluster.candidate_from_file(file_config);
    validate(&candidate)?;
    cluster.guard_reload(&candidate)?;
    let report = cluster.reconfigure(candidate, origins, metrics)?;
    log_reconfigure("config reload", &report);
    Ok(report)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::dcos_default;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn cluster(safety: SafetySettings) -> ClusterState {
        let mut config = dcos_default();
        assign_network_ids(&mut config.overlays);
        let mut cluster = ClusterState::fresh(config, Origin::File).unwrap();
        cluster.set_safety(safety);
        cluster
    }

    fn network(name: &str, subnet: &str) -> OverlayInfo {
        OverlayInfo {
            name: name.into(),
            subnet: Some(subnet.parse().unwrap()),
            prefix: Some(24),
            subnet6: None,
            prefix6: None,
            enabled: None,
            id: None,
            vni: None,
            masquerade: None,
        }
    }

    #[test]
    fn bridges_ipv6_agents_and_disabled_networks_as_dcos() {
        let metrics = Metrics::default();
        let mut c = cluster(SafetySettings::default());
        let now = Instant::now();
        let node = c
            .register_with(
                ip("10.0.0.5"),
                None,
                AgentNetworkConfig {
                    mesos_bridge: Some(false),
                    docker_bridge: Some(false),
                },
                now,
                &metrics,
            )
            .unwrap();
        assert!(node.overlays.iter().all(|o| o.mesos_bridge.is_none()
            && o.docker_bridge.is_none()
            && (o.subnet.is_some() || o.subnet6.is_some())));
        // A later registration saying nothing keeps the choice.
        let again = c.register(ip("10.0.0.5"), None, now, &metrics).unwrap();
        assert_eq!(again, node);

        let err = c.register(ip("fd00::5"), None, now, &metrics).unwrap_err();
        assert!(err.to_string().contains("--ipv6-underlay"), "{err}");
        let mut open = cluster(SafetySettings {
            ipv6_underlay: true,
            ..SafetySettings::default()
        });
        open.register(ip("fd00::5"), None, now, &metrics).unwrap();

        c.register(ip("10.0.0.1"), None, now, &metrics).unwrap();
        apply_network_change(
            &mut c,
            NetworkChange::SetEnabled {
                name: "dcos6".into(),
                enabled: false,
            },
            true,
            &metrics,
        )
        .unwrap();
        let newcomer = c.register(ip("10.0.0.2"), None, now, &metrics).unwrap();
        let names: Vec<&str> = newcomer
            .overlays
            .iter()
            .map(|o| o.info.name.as_str())
            .collect();
        assert_eq!(names, ["dcos"]);
        let holder = c.agent(ip("10.0.0.1")).unwrap();
        assert_eq!(holder.overlays[1].info.enabled, Some(false));
        // Registration order in the state.
        let order: Vec<IpAddr> = c.state().agents.iter().map(|a| a.ip).collect();
        assert_eq!(order, [ip("10.0.0.5"), ip("10.0.0.1"), ip("10.0.0.2")]);
    }

    #[test]
    fn live_agents_are_deleted_only_with_force() {
        let metrics = Metrics::default();
        let mut c = cluster(SafetySettings {
            heartbeat_timeout: Duration::from_secs(90),
            quarantine: Duration::from_secs(300),
            master_addresses: vec![],
            ipv6_underlay: false,
        });
        let t0 = Instant::now();
        c.register(ip("10.0.0.1"), None, t0, &metrics).unwrap();
        c.register(ip("10.0.0.2"), None, t0, &metrics).unwrap();
        let err = c
            .delete_agents(&[ip("10.0.0.1")], false, t0 + Duration::from_secs(5))
            .unwrap_err();
        assert!(matches!(err, MasterError::Conflict(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("agent 10.0.0.1 last heartbeated 5.0 s ago"),
            "{text}"
        );
        assert!(text.contains("force=true"), "{text}");
        assert_eq!(c.agent_count(), 2, "nothing deleted");
        // Silent for longer than the timeout: deletable without force.
        let later = t0 + Duration::from_secs(91);
        assert_eq!(
            c.delete_agents(&[ip("10.0.0.1")], false, later).unwrap(),
            vec![ip("10.0.0.1")]
        );
        // Forced: at once.
        assert_eq!(
            c.delete_agents(&[ip("10.0.0.2")], true, later).unwrap(),
            vec![ip("10.0.0.2")]
        );
    }

    #[test]
    fn a_newcomer_never_gets_a_quarantined_allocation() {
        let metrics = Metrics::default();
        let mut c = cluster(SafetySettings {
            heartbeat_timeout: Duration::from_secs(90),
            quarantine: Duration::from_secs(300),
            master_addresses: vec![],
            ipv6_underlay: false,
        });
        let t0 = Instant::now();
        let victim = c.register(ip("10.0.0.1"), None, t0, &metrics).unwrap();
        c.delete_agents(&[ip("10.0.0.1")], true, t0).unwrap();
        let newcomer = c.register(ip("10.0.0.66"), None, t0, &metrics).unwrap();
        let vtep = |a: &AgentInfo| a.overlays[0].backend.vxlan.clone();
        assert_ne!(vtep(&newcomer).vtep_ip, vtep(&victim).vtep_ip);
        assert_ne!(vtep(&newcomer).vtep_mac, vtep(&victim).vtep_mac);
        assert_ne!(newcomer.overlays[0].subnet, victim.overlays[0].subnet);
        assert_ne!(newcomer.overlays[1].subnet6, victim.overlays[1].subnet6);
        // The victim comes back within the quarantine: it gets its own allocation back.
        let back = c
            .register(ip("10.0.0.1"), None, t0 + Duration::from_secs(10), &metrics)
            .unwrap();
        assert_eq!(back, victim);
        // After the quarantine, freed allocations are reused.
        c.delete_agents(&[ip("10.0.0.1")], true, t0 + Duration::from_secs(20))
            .unwrap();
        let late = c
            .register(
                ip("10.0.0.77"),
                None,
                t0 + Duration::from_secs(321),
                &metrics,
            )
            .unwrap();
        assert_eq!(vtep(&late).vtep_ip, vtep(&victim).vtep_ip);
        assert_eq!(late.overlays[0].subnet, victim.overlays[0].subnet);
    }

    #[test]
    fn networks_may_not_contain_agents_or_the_master() {
        let metrics = Metrics::default();
        let mut c = cluster(SafetySettings {
            master_addresses: vec![ip("192.168.7.1")],
            ..SafetySettings::default()
        });
        let now = Instant::now();
        c.register(ip("10.250.0.11"), None, now, &metrics).unwrap();
        let err = apply_network_change(
            &mut c,
            NetworkChange::Add(network("under", "10.250.0.0/16")),
            false,
            &metrics,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("overlays[2].subnet (under) = 10.250.0.0/16"),
            "{err}"
        );
        assert!(
            err.contains("agent 10.250.0.11's underlay address"),
            "{err}"
        );
        let err = apply_network_change(
            &mut c,
            NetworkChange::Add(network("master", "192.168.0.0/16")),
            true,
            &metrics,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("the master's address 192.168.7.1"), "{err}");
        assert_eq!(c.config().overlays.len(), 2, "nothing added");

        // An agent inside an existing network cannot register.
        let err = c
            .register(ip("9.0.3.4"), None, now, &metrics)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ip = 9.0.3.4"), "{err}");
        assert!(
            err.contains("overlays[0].subnet (dcos) = 9.0.0.0/8"),
            "{err}"
        );
        let err = c
            .register(ip("44.128.0.9"), None, now, &metrics)
            .unwrap_err()
            .to_string();
        assert!(err.contains("vtep_subnet = 44.128.0.0/20"), "{err}");
        assert_eq!(c.agent_count(), 1);
    }

    #[test]
    fn networks_in_use_or_from_the_file_need_force() {
        let metrics = Metrics::default();
        let mut c = cluster(SafetySettings::default());
        let now = Instant::now();
        c.register(ip("10.0.0.1"), None, now, &metrics).unwrap();
        apply_network_change(
            &mut c,
            NetworkChange::Add(network("blue", "10.1.0.0/16")),
            false,
            &metrics,
        )
        .unwrap();
        let counts = BTreeMap::from([("blue".to_owned(), 2), ("dcos".to_owned(), 0)]);
        c.register(ip("10.0.0.1"), Some(counts), now, &metrics)
            .unwrap();

        for change in [
            NetworkChange::SetEnabled {
                name: "blue".into(),
                enabled: false,
            },
            NetworkChange::Remove("blue".into()),
        ] {
            let err = apply_network_change(&mut c, change, false, &metrics).unwrap_err();
            assert!(matches!(err, MasterError::Conflict(_)));
            let err = err.to_string();
            assert!(
                err.contains("network blue holds 2 endpoint(s) (agent 10.0.0.1: 2)"),
                "{err}"
            );
        }
        // The file's networks need force even when empty.
        let err = apply_network_change(
            &mut c,
            NetworkChange::Remove("dcos".into()),
            false,
            &metrics,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("network dcos is defined by the configuration file"),
            "{err}"
        );
        assert_eq!(c.config().overlays.len(), 3);

        // A reload that drops a network in use is refused whole.
        let counts = BTreeMap::from([("blue".to_owned(), 2), ("dcos".to_owned(), 1)]);
        c.register(ip("10.0.0.1"), Some(counts), now, &metrics)
            .unwrap();
        let mut file = dcos_default();
        file.overlays.remove(0);
        let err = apply_reload(&mut c, file, &metrics)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the file removes network dcos which holds 1 endpoint(s)"),
            "{err}"
        );
        assert_eq!(c.config().overlays.len(), 3);

        // Forced, it goes.
        apply_network_change(
            &mut c,
            NetworkChange::SetEnabled {
                name: "blue".into(),
                enabled: false,
            },
            true,
            &metrics,
        )
        .unwrap();
        assert!(!c.config().overlays[2].is_enabled());
        apply_network_change(&mut c, NetworkChange::Remove("blue".into()), true, &metrics).unwrap();
        assert_eq!(c.config().overlays.len(), 2);
    }
}
