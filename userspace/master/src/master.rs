//! The master's state machine: the in-memory state (`Core`), the single writer thread that
//! changes it and persists every change before anyone can see it, and the read side
//! (state snapshots, revision notifications) used by the HTTP API.
//!
//! Writes are group-committed: the writer takes every queued command, applies them to the
//! in-memory state under the state lock, commits the resulting records in one store
//! transaction (fsync), and only then releases the lock and answers. Readers therefore never
//! see an allocation that is not durable, and a failed commit is undone by reloading the
//! in-memory state from the store.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, mpsc};

use bytes::Bytes;
use overlay_api::{
    AgentInfo, AgentOverlayInfo, BackendInfo, BridgeInfo, MacAddr, NetworkConfig, OverlayInfo,
    OverlayState, State, Status, VTEP_NAME, VxLANInfo, WatchedDelta,
};
use tokio::sync::{oneshot, watch};

use crate::alloc::{Allocator, RestoreReport, halves4, halves6};
use crate::config::assign_default_vnis;
use crate::metrics::{Gauges, Metrics};
use crate::store::{NetworkRecord, Op, Origin, SettingsRecord, Snapshot, Store, StoreError};
use crate::validate::{ConfigError, validate};

/// Commands taken by the writer in one store transaction at most.
const MAX_BATCH: usize = 512;

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
pub struct Core {
    alloc: Allocator,
    origins: BTreeMap<String, Origin>,
    agents: BTreeMap<IpAddr, crate::store::AgentRecord>,
    revision: u64,
    pending: Pending,
    changes: ChangeLog,
}

/// Most agent deletions remembered for deltas; beyond that, older watchers get a full state.
const MAX_TOMBSTONES: usize = 100_000;

/// Which revision last changed each agent, so watchers can be sent only what changed.
/// Kept in memory only: after a restart every watcher gets one full state.
#[derive(Debug, Default)]
struct ChangeLog {
    /// Watchers behind this revision get a full state (start, config change, compaction).
    full_before: u64,
    agent_revisions: HashMap<IpAddr, u64>,
    deleted: HashMap<IpAddr, u64>,
}

impl ChangeLog {
    fn starting_at(revision: u64) -> Self {
        ChangeLog {
            full_before: revision,
            ..ChangeLog::default()
        }
    }

    fn record(&mut self, revision: u64, ops: &[Op]) {
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

impl Core {
    /// A state with no agents for a validated configuration (first start).
    pub fn fresh(config: NetworkConfig, origin: Origin) -> Result<Self, MasterError> {
        validate(&config)?;
        let origins = config
            .overlays
            .iter()
            .map(|o| (o.name.clone(), origin))
            .collect();
        Ok(Core {
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
        let mut core = Core {
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
            let restored = core.alloc.restore(stored.clone(), &mut report);
            if restored != stored {
                core.pending.agents.insert(restored.ip);
            }
            core.agents.insert(restored.ip, restored);
        }
        for dropped in &report.dropped {
            tracing::error!(%dropped, "stored allocation clashes; it will be re-allocated");
        }
        // Agents that lost something (or had failed) get what they lack now.
        for ip in core.pending.agents.clone() {
            let record = core.agents.get_mut(&ip).expect("agent just restored");
            core.alloc.allocate_missing(record);
        }
        Ok(Some(core))
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
        let mut record = existing
            .cloned()
            .unwrap_or_else(|| crate::store::AgentRecord::new(ip));
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
    fn take_ops(&mut self) -> Vec<Op> {
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
    fn agent_info(&self, record: &crate::store::AgentRecord) -> AgentInfo {
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

type Reply<T> = oneshot::Sender<Result<T, MasterError>>;

enum Command {
    Register(IpAddr, Reply<AgentInfo>),
    DeleteAgents(Vec<IpAddr>, Reply<Vec<IpAddr>>),
    ChangeNetworks(NetworkChange, Reply<Option<OverlayInfo>>),
    Reload(NetworkConfig, Reply<ReconfigureReport>),
}

/// Sends a command's answer once the batch's commit outcome is known.
type Finish = Box<dyn FnOnce(Result<(), MasterError>) + Send>;

fn finish<T: Send + 'static>(reply: Reply<T>, result: Result<T, MasterError>) -> Finish {
    Box::new(move |commit| {
        let _ = reply.send(commit.and(result));
    })
}

/// The state JSON of one revision, serialised once and shared by every reader.
#[derive(Debug, Clone)]
pub struct StateBody {
    pub revision: u64,
    /// `{"revision":N,"state":{...}}`
    pub watch_body: Bytes,
    state_range: std::ops::Range<usize>,
}

impl StateBody {
    /// The `State` alone (a slice of the watch body, no copy).
    pub fn state_json(&self) -> Bytes {
        self.watch_body.slice(self.state_range.clone())
    }
}

/// The running master, shared by the HTTP handlers.
pub struct Master {
    core: Mutex<Core>,
    store: Arc<dyn Store>,
    revision_tx: watch::Sender<u64>,
    pub metrics: Metrics,
    state_cache: tokio::sync::Mutex<Option<StateBody>>,
    /// Delta bodies of the current revision by `after` (watchers mostly share one `after`).
    delta_cache: tokio::sync::Mutex<(u64, HashMap<u64, Bytes>)>,
    commands: mpsc::Sender<Command>,
}

impl Master {
    /// Recovers the stored state, reconciles it with `file_config` (the configuration given
    /// at start, before default VNIs), persists the outcome and starts the writer thread.
    pub fn start(
        store: Arc<dyn Store>,
        file_config: NetworkConfig,
    ) -> Result<Arc<Master>, MasterError> {
        let metrics = Metrics::default();
        let snapshot = store.load()?;
        let mut core = match Core::from_snapshot(snapshot)? {
            Some(mut core) => {
                tracing::info!(
                    revision = core.revision,
                    agents = core.agents.len(),
                    networks = core.config().overlays.len(),
                    "recovered stored state"
                );
                let (candidate, origins) = core.candidate_from_file(file_config);
                let report =
                    core.reconfigure(candidate, origins, &metrics)
                        .map_err(|e| match e {
                            MasterError::Invalid(message) => MasterError::Invalid(format!(
                                "the configuration does not match the stored state: {message}"
                            )),
                            other => other,
                        })?;
                log_reconfigure("start-up reconciliation", &report);
                core
            }
            None => {
                let mut config = file_config;
                assign_default_vnis(&mut config.overlays);
                tracing::info!("empty store: starting from the configuration");
                Core::fresh(config, Origin::File)?
            }
        };
        let ops = core.take_ops();
        if !ops.is_empty() {
            core.revision = store.commit(core.revision, &ops)?;
            metrics.store_commits.fetch_add(1, Ordering::Relaxed);
        }
        // Watchers from before this start cannot be given a delta.
        core.changes = ChangeLog::starting_at(core.revision);
        let (revision_tx, _) = watch::channel(core.revision);
        let (commands, receiver) = mpsc::channel();
        let master = Arc::new(Master {
            core: Mutex::new(core),
            store,
            revision_tx,
            metrics,
            state_cache: tokio::sync::Mutex::new(None),
            delta_cache: tokio::sync::Mutex::new((0, HashMap::new())),
            commands,
        });
        let writer = Arc::clone(&master);
        std::thread::Builder::new()
            .name("overlay-writer".into())
            .spawn(move || writer.run_writer(receiver))
            .map_err(|e| MasterError::Unavailable(format!("cannot start writer thread: {e}")))?;
        Ok(master)
    }

    fn lock_core(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock leaves a state we cannot trust: stop rather than serve it.
        self.core.lock().unwrap_or_else(|_| {
            tracing::error!("state lock poisoned by a panic; exiting");
            std::process::exit(70)
        })
    }

    pub fn revision(&self) -> u64 {
        *self.revision_tx.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision_tx.subscribe()
    }

    pub fn config(&self) -> NetworkConfig {
        self.lock_core().config().clone()
    }

    pub fn metrics_text(&self) -> String {
        let gauges = self.lock_core().gauges();
        self.metrics.render(&gauges)
    }

    /// Registers or heartbeats an agent. A complete agent is answered from memory; anything
    /// else goes through the writer and is durable before the answer.
    pub async fn register(&self, ip: IpAddr) -> Result<AgentInfo, MasterError> {
        {
            let core = self.lock_core();
            if let Some(record) = core.agents.get(&ip)
                && core.alloc.is_complete(record)
            {
                let info = core.agent_info(record);
                self.metrics.registrations.fetch_add(1, Ordering::Relaxed);
                return Ok(info);
            }
        }
        let info = self.send(|reply| Command::Register(ip, reply)).await?;
        self.metrics.registrations.fetch_add(1, Ordering::Relaxed);
        Ok(info)
    }

    pub async fn delete_agents(&self, ips: Vec<IpAddr>) -> Result<Vec<IpAddr>, MasterError> {
        self.send(|reply| Command::DeleteAgents(ips, reply)).await
    }

    /// Applies an API change of the network list; returns the network as it now is (None
    /// after a removal).
    pub async fn change_networks(
        &self,
        change: NetworkChange,
    ) -> Result<Option<OverlayInfo>, MasterError> {
        self.send(|reply| Command::ChangeNetworks(change, reply))
            .await
    }

    /// Applies a re-read config file (SIGHUP); a bad one changes nothing.
    pub async fn reload(
        &self,
        file_config: NetworkConfig,
    ) -> Result<ReconfigureReport, MasterError> {
        let result = self.send(|reply| Command::Reload(file_config, reply)).await;
        match &result {
            Ok(_) => self.metrics.config_reloads.fetch_add(1, Ordering::Relaxed),
            Err(_) => self
                .metrics
                .config_reload_errors
                .fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    async fn send<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, MasterError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .map_err(|_| MasterError::Unavailable("the writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| MasterError::Unavailable("the writer has stopped".into()))?
    }

    /// The current state JSON, serialised at most once per revision.
    pub async fn state_body(self: &Arc<Self>) -> StateBody {
        let mut cache = self.state_cache.lock().await;
        if let Some(body) = cache.as_ref()
            && body.revision == self.revision()
        {
            return body.clone();
        }
        let master = Arc::clone(self);
        let body = tokio::task::spawn_blocking(move || master.render_state())
            .await
            .expect("rendering the state does not panic");
        *cache = Some(body.clone());
        body
    }

    /// The `WatchedDelta` JSON after `after`, serialised once per (revision, after).
    pub async fn delta_body(self: &Arc<Self>, after: u64) -> Bytes {
        let mut cache = self.delta_cache.lock().await;
        let revision = self.revision();
        if cache.0 != revision {
            *cache = (revision, HashMap::new());
        }
        if let Some(body) = cache.1.get(&after) {
            return body.clone();
        }
        let master = Arc::clone(self);
        let (rendered_revision, body) = tokio::task::spawn_blocking(move || {
            let core = master.lock_core();
            let delta = core.delta(after);
            let body = serde_json::to_vec(&delta).expect("deltas always serialise");
            (core.revision, Bytes::from(body))
        })
        .await
        .expect("rendering a delta does not panic");
        if rendered_revision == cache.0 {
            cache.1.insert(after, body.clone());
        }
        body
    }

    fn render_state(&self) -> StateBody {
        let (revision, state) = {
            let core = self.lock_core();
            (core.revision, core.state())
        };
        let prefix = format!("{{\"revision\":{revision},\"state\":");
        let mut body = prefix.clone().into_bytes();
        serde_json::to_writer(&mut body, &state).expect("state always serialises");
        let end = body.len();
        body.push(b'}');
        StateBody {
            revision,
            watch_body: Bytes::from(body),
            state_range: prefix.len()..end,
        }
    }

    fn run_writer(&self, receiver: mpsc::Receiver<Command>) {
        while let Ok(first) = receiver.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            self.apply_batch(batch);
        }
    }

    fn apply_batch(&self, batch: Vec<Command>) {
        let mut core = self.lock_core();
        let finishers: Vec<Finish> = batch
            .into_iter()
            .map(|command| self.execute(&mut core, command))
            .collect();
        let ops = core.take_ops();
        let outcome = if ops.is_empty() {
            Ok(None)
        } else {
            self.store.commit(core.revision, &ops).map(Some)
        };
        match outcome {
            Ok(new_revision) => {
                if let Some(revision) = new_revision {
                    core.revision = revision;
                    core.changes.record(revision, &ops);
                    self.metrics.store_commits.fetch_add(1, Ordering::Relaxed);
                }
                drop(core);
                if let Some(revision) = new_revision {
                    self.revision_tx.send_replace(revision);
                }
                for finisher in finishers {
                    finisher(Ok(()));
                }
            }
            Err(error) => {
                self.metrics
                    .store_commit_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "store commit failed; reloading the state from the store");
                // Undo the in-memory changes by reloading what is durable.
                match self
                    .store
                    .load()
                    .map_err(MasterError::from)
                    .and_then(Core::from_snapshot)
                {
                    Ok(Some(reloaded)) => *core = reloaded,
                    Ok(None) | Err(_) => {
                        tracing::error!("cannot reload the state from the store; exiting");
                        std::process::exit(70);
                    }
                }
                drop(core);
                let error = MasterError::from(error);
                for finisher in finishers {
                    finisher(Err(error.clone()));
                }
            }
        }
    }

    fn execute(&self, core: &mut Core, command: Command) -> Finish {
        match command {
            Command::Register(ip, reply) => {
                let info = core.register(ip, &self.metrics);
                finish(reply, Ok(info))
            }
            Command::DeleteAgents(ips, reply) => {
                let deleted = core.delete_agents(&ips);
                self.metrics
                    .agents_deleted
                    .fetch_add(deleted.len() as u64, Ordering::Relaxed);
                if !deleted.is_empty() {
                    tracing::info!(agents = ?deleted, "agents deleted, allocations freed");
                }
                finish(reply, Ok(deleted))
            }
            Command::ChangeNetworks(change, reply) => {
                let result = apply_network_change(core, change, &self.metrics);
                finish(reply, result)
            }
            Command::Reload(file_config, reply) => {
                let (candidate, origins) = core.candidate_from_file(file_config);
                let result = core.reconfigure(candidate, origins, &self.metrics);
                if let Ok(report) = &result {
                    log_reconfigure("config reload", report);
                }
                finish(reply, result)
            }
        }
    }
}

fn apply_network_change(
    core: &mut Core,
    change: NetworkChange,
    metrics: &Metrics,
) -> Result<Option<OverlayInfo>, MasterError> {
    let mut candidate = core.config().clone();
    let mut origins = core.origins.clone();
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
    let report = core.reconfigure(candidate, origins, metrics)?;
    log_reconfigure("API network change", &report);
    Ok(name.and_then(|name| {
        core.config()
            .overlays
            .iter()
            .find(|o| o.name == name)
            .cloned()
    }))
}

fn log_reconfigure(what: &str, report: &ReconfigureReport) {
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
    use crate::store::memory::MemoryStore;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn spec(name: &str, subnet: &str) -> OverlayInfo {
        OverlayInfo {
            name: name.into(),
            subnet: Some(subnet.parse().unwrap()),
            prefix: Some(24),
            subnet6: None,
            prefix6: None,
            enabled: None,
            vni: None,
        }
    }

    #[tokio::test]
    async fn registration_is_idempotent_and_survives_restart() {
        let store = Arc::new(MemoryStore::new());
        let master = Master::start(store.clone(), dcos_default()).unwrap();
        let first = master.register(ip("10.0.0.1")).await.unwrap();
        let second = master.register(ip("10.0.0.2")).await.unwrap();
        assert_eq!(master.register(ip("10.0.0.1")).await.unwrap(), first);
        assert_eq!(
            second.overlays[0].subnet,
            Some("9.0.1.0/24".parse().unwrap())
        );
        assert_eq!(
            second.overlays[0].backend.vxlan.vtep_mac,
            Some("70:b3:d5:80:00:02".parse().unwrap())
        );
        let revision = master.revision();

        let restarted = Master::start(store, dcos_default()).unwrap();
        assert_eq!(
            restarted.revision(),
            revision,
            "an unchanged config writes nothing"
        );
        assert_eq!(restarted.register(ip("10.0.0.1")).await.unwrap(), first);
        assert_eq!(restarted.register(ip("10.0.0.2")).await.unwrap(), second);
    }

    #[tokio::test]
    async fn network_changes_reach_registered_agents() {
        let store = Arc::new(MemoryStore::new());
        let master = Master::start(store.clone(), dcos_default()).unwrap();
        master.register(ip("10.0.0.1")).await.unwrap();
        let added = master
            .change_networks(NetworkChange::Add(spec("dev", "10.10.0.0/16")))
            .await
            .unwrap()
            .unwrap();
        assert!(added.vni.is_some());
        let info = master.register(ip("10.0.0.1")).await.unwrap();
        let dev = info.overlays.iter().find(|o| o.info.name == "dev").unwrap();
        assert_eq!(dev.subnet, Some("10.10.0.0/24".parse().unwrap()));

        // Overlapping networks are refused whole.
        let err = master
            .change_networks(NetworkChange::Add(spec("dup", "10.10.5.0/24")))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("10.10.5.0/24"), "{err}");

        master
            .change_networks(NetworkChange::SetEnabled {
                name: "dev".into(),
                enabled: false,
            })
            .await
            .unwrap();
        assert_eq!(master.config().overlays[2].enabled, Some(false));

        // An API network survives a restart with the same file.
        let restarted = Master::start(store.clone(), dcos_default()).unwrap();
        assert_eq!(restarted.config().overlays.len(), 3);
        restarted
            .change_networks(NetworkChange::Remove("dev".into()))
            .await
            .unwrap();
        let info = restarted.register(ip("10.0.0.1")).await.unwrap();
        assert_eq!(info.overlays.len(), 2);
        assert!(matches!(
            restarted
                .change_networks(NetworkChange::Remove("dev".into()))
                .await,
            Err(MasterError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn deltas_rebuild_the_full_state() {
        let store = Arc::new(MemoryStore::new());
        let master = Master::start(store, dcos_default()).unwrap();
        for n in 1..=5 {
            master.register(IpAddr::from([10, 0, 0, n])).await.unwrap();
        }
        let (base_revision, mut copy) = {
            let core = master.lock_core();
            (core.revision(), core.state())
        };
        master.register(ip("10.0.0.9")).await.unwrap();
        master
            .delete_agents(vec![ip("10.0.0.2"), ip("10.0.0.3")])
            .await
            .unwrap();
        let delta = master.lock_core().delta(base_revision);
        assert!(!delta.full);
        assert_eq!(delta.state.agents.len(), 1, "only the new agent changed");
        assert_eq!(delta.deleted, vec![ip("10.0.0.2"), ip("10.0.0.3")]);
        delta.apply_to(&mut copy);
        assert_eq!(copy, master.lock_core().state());

        // A network change makes older watchers resynchronise with a full state.
        master
            .change_networks(NetworkChange::Add(spec("dev", "10.10.0.0/16")))
            .await
            .unwrap();
        let core = master.lock_core();
        let delta = core.delta(base_revision);
        assert!(delta.full);
        assert_eq!(delta.state, core.state());
        let current = core.delta(core.revision());
        assert!(!current.full && current.state.agents.is_empty() && current.deleted.is_empty());
        assert!(
            core.delta(core.revision() + 5).full,
            "a revision from the future resyncs"
        );
    }

    /// A store whose commits can be made to fail.
    struct FlakyStore {
        inner: MemoryStore,
        failing: std::sync::atomic::AtomicBool,
    }

    impl Store for FlakyStore {
        fn load(&self) -> Result<Snapshot, StoreError> {
            self.inner.load()
        }

        fn commit(&self, expected: u64, ops: &[Op]) -> Result<u64, StoreError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Backend {
                    context: "test".into(),
                    reason: "disk on fire".into(),
                });
            }
            self.inner.commit(expected, ops)
        }
    }

    #[tokio::test]
    async fn a_failed_commit_applies_nothing() {
        let store = Arc::new(FlakyStore {
            inner: MemoryStore::new(),
            failing: false.into(),
        });
        let master = Master::start(store.clone(), dcos_default()).unwrap();
        master.register(ip("10.0.0.1")).await.unwrap();
        let before = master.lock_core().state();
        let revision = master.revision();

        store.failing.store(true, Ordering::SeqCst);
        let err = master.register(ip("10.0.0.2")).await.unwrap_err();
        assert!(matches!(err, MasterError::Unavailable(_)), "{err}");
        let err = master
            .change_networks(NetworkChange::Add(spec("dev", "10.10.0.0/16")))
            .await
            .unwrap_err();
        assert!(matches!(err, MasterError::Unavailable(_)), "{err}");
        assert_eq!(master.lock_core().state(), before);
        assert_eq!(master.revision(), revision);
        assert_eq!(
            master.metrics.store_commit_errors.load(Ordering::Relaxed),
            2
        );

        // Once the store works again the freed tentative allocation is handed out normally.
        store.failing.store(false, Ordering::SeqCst);
        let info = master.register(ip("10.0.0.2")).await.unwrap();
        assert_eq!(
            info.overlays[0].backend.vxlan.vtep_ip,
            Some("44.128.0.2/20".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn restart_with_incompatible_prefix_is_refused() {
        let store = Arc::new(MemoryStore::new());
        let master = Master::start(store.clone(), dcos_default()).unwrap();
        master.register(ip("10.0.0.1")).await.unwrap();
        master.register(ip("10.0.0.2")).await.unwrap();
        let mut changed = dcos_default();
        changed.overlays[0].prefix = Some(23);
        let err = Master::start(store.clone(), changed).err().unwrap();
        assert!(err.to_string().contains("incompatible"), "{err}");

        // Removing a network from the file frees its blocks at start.
        let mut fewer = dcos_default();
        fewer.overlays.remove(1);
        let restarted = Master::start(store, fewer).unwrap();
        let info = restarted.register(ip("10.0.0.2")).await.unwrap();
        assert_eq!(info.overlays.len(), 1);
    }
}
