//! The running master: a single writer thread that changes the cluster state and persists
//! every change before anyone can see it, and the read side (state snapshots, deltas,
//! revision notifications) used by the HTTP API.
//!
//! Writes are group-committed: the writer takes every queued command, applies them to the
//! in-memory state under the state lock, commits the resulting records in one store
//! transaction (fsync), and only then releases the lock and answers. Readers therefore never
//! see an allocation that is not durable, and a failed commit is undone by reloading the
//! in-memory state from the store or, when the store cannot even be read (a full or read-only
//! disk, etcd unreachable), from a copy of what was last committed: the master never exits
//! over a store fault, keeps serving reads, heartbeats and watches, and refuses writes with a
//! 503 naming the store until it works again.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Instant;

use bytes::Bytes;
use overlay_api::{AgentInfo, NetworkConfig, OverlayInfo};
use tokio::sync::{oneshot, watch};

pub use crate::cluster::{
    AgentNetworkConfig, ClusterState, MasterError, NetworkChange, ReconfigureReport, SafetySettings,
};
use crate::cluster::{ChangeLog, apply_network_change, apply_reload, log_reconfigure};
use crate::config::assign_network_ids;
use crate::metrics::Metrics;
use crate::store::memory::MemoryStore;
use crate::store::{Op, Origin, Snapshot, Store, StoreError};

/// Commands taken by the writer in one store transaction at most.
const MAX_BATCH: usize = 512;
/// Times a batch (or the start-up commit) is recomputed after another writer of a shared store
/// committed first.
const MAX_CONFLICT_RETRIES: usize = 20;

type Reply<T> = oneshot::Sender<Result<T, MasterError>>;

/// Per-network endpoint counts an agent reports with its heartbeat.
pub type EndpointCounts = BTreeMap<String, u32>;

enum Command {
    Register(
        IpAddr,
        Option<EndpointCounts>,
        AgentNetworkConfig,
        Reply<AgentInfo>,
    ),
    /// Agents to delete; `true`: even if heard from recently.
    DeleteAgents(Vec<IpAddr>, bool, Reply<Vec<IpAddr>>),
    /// A change and whether it is forced.
    ChangeNetworks(NetworkChange, bool, Reply<Option<OverlayInfo>>),
    Reload(NetworkConfig, Reply<ReconfigureReport>),
    /// Another writer of a shared store committed `revision`: catch up if behind it.
    Refresh(u64),
}

/// A command's result, computed before the commit and sent once the commit outcome is known.
enum Outcome {
    Agent(Result<AgentInfo, MasterError>),
    Deleted(Result<Vec<IpAddr>, MasterError>),
    Network(Result<Option<OverlayInfo>, MasterError>),
    Report(Result<ReconfigureReport, MasterError>),
    Nothing,
}

/// Sends a command's answer once the batch's commit outcome is known.
fn deliver(command: Command, outcome: Outcome, commit: Result<(), MasterError>) {
    fn send<T>(reply: Reply<T>, commit: Result<(), MasterError>, result: Result<T, MasterError>) {
        let _ = reply.send(commit.and(result));
    }
    match (command, outcome) {
        (Command::Register(_, _, _, reply), Outcome::Agent(result)) => send(reply, commit, result),
        (Command::DeleteAgents(_, _, reply), Outcome::Deleted(result)) => {
            send(reply, commit, result)
        }
        (Command::ChangeNetworks(_, _, reply), Outcome::Network(result)) => {
            send(reply, commit, result)
        }
        (Command::Reload(_, reply), Outcome::Report(result)) => send(reply, commit, result),
        (Command::Refresh(_), Outcome::Nothing) => {}
        _ => unreachable!("every command has its own kind of outcome"),
    }
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
    cluster: Mutex<ClusterState>,
    store: Arc<dyn Store>,
    /// What the store held after the last commit or load: undoes a failed commit when the
    /// store cannot be read back. Touched by the writer only.
    committed: MemoryStore,
    revision_tx: watch::Sender<u64>,
    pub metrics: Metrics,
    state_cache: tokio::sync::Mutex<Option<StateBody>>,
    /// Delta bodies of the current revision by `after` (watchers mostly share one `after`).
    delta_cache: tokio::sync::Mutex<(u64, HashMap<u64, Bytes>)>,
    commands: mpsc::Sender<Command>,
    /// Container addresses each agent reported with its last heartbeat (memory only: agents
    /// report again within a heartbeat).
    reported: Mutex<HashMap<IpAddr, AgentReport>>,
}

/// Drops by network name and reason, as an agent reports them.
pub type DropReport = BTreeMap<String, BTreeMap<String, u64>>;

/// What an agent reported with its last heartbeat.
#[derive(Debug, Clone, Default)]
pub struct AgentReport {
    pub endpoints: Vec<overlay_api::ReportedEndpoint>,
    pub drops: DropReport,
}

impl Master {
    /// Recovers the stored state, reconciles it with `file_config` (the configuration given
    /// at start, before default VNIs), persists the outcome and starts the writer thread.
    pub fn start(
        store: Arc<dyn Store>,
        file_config: NetworkConfig,
    ) -> Result<Arc<Master>, MasterError> {
        Self::start_with(store, file_config, SafetySettings::default())
    }

    /// [`Master::start`] with the rules that protect running agents (heartbeat timeout,
    /// quarantine of freed allocations, the master's own addresses).
    pub fn start_with(
        store: Arc<dyn Store>,
        file_config: NetworkConfig,
        safety: SafetySettings,
    ) -> Result<Arc<Master>, MasterError> {
        let metrics = Metrics::default();
        let mut attempt = 0;
        let (cluster, committed) = loop {
            match Self::recover(store.as_ref(), file_config.clone(), &safety, &metrics) {
                Err(MasterError::Conflict(reason)) if attempt < MAX_CONFLICT_RETRIES => {
                    // Another master of a shared store committed meanwhile: start over.
                    attempt += 1;
                    tracing::info!(%reason, "start-up commit lost a race; reloading");
                }
                other => break other?,
            }
        };
        let (revision_tx, _) = watch::channel(cluster.revision);
        let (commands, receiver) = mpsc::channel();
        let changes = store.changes();
        let master = Arc::new(Master {
            cluster: Mutex::new(cluster),
            store,
            committed,
            revision_tx,
            metrics,
            state_cache: tokio::sync::Mutex::new(None),
            delta_cache: tokio::sync::Mutex::new((0, HashMap::new())),
            commands,
            reported: Mutex::new(HashMap::new()),
        });
        let writer = Arc::clone(&master);
        std::thread::Builder::new()
            .name("overlay-writer".into())
            .spawn(move || writer.run_writer(receiver))
            .map_err(|e| MasterError::Unavailable(format!("cannot start writer thread: {e}")))?;
        if let Some(changes) = changes {
            let master = Arc::downgrade(&master);
            std::thread::Builder::new()
                .name("overlay-follower".into())
                .spawn(move || {
                    for revision in changes {
                        let Some(master) = master.upgrade() else {
                            return;
                        };
                        if revision > master.revision() {
                            let _ = master.commands.send(Command::Refresh(revision));
                        }
                    }
                })
                .map_err(|e| {
                    MasterError::Unavailable(format!("cannot start follower thread: {e}"))
                })?;
        }
        Ok(master)
    }

    /// Loads the store, reconciles it with the file and commits the outcome; also returns a
    /// copy of what the store now holds.
    fn recover(
        store: &dyn Store,
        file_config: NetworkConfig,
        safety: &SafetySettings,
        metrics: &Metrics,
    ) -> Result<(ClusterState, MemoryStore), MasterError> {
        let snapshot = store.load()?;
        let committed = MemoryStore::from_snapshot(snapshot.clone());
        let mut cluster = match ClusterState::from_snapshot(snapshot)? {
            Some(mut cluster) => {
                cluster.set_safety(safety.clone());
                tracing::info!(
                    revision = cluster.revision,
                    agents = cluster.agents.len(),
                    networks = cluster.config().overlays.len(),
                    "recovered stored state"
                );
                let (candidate, origins) = cluster.candidate_from_file(file_config);
                // A broken file is reported as such, before any comparison with the store.
                crate::validate::validate(&candidate)?;
                let report =
                    cluster
                        .reconfigure(candidate, origins, metrics)
                        .map_err(|e| match e {
                            MasterError::Invalid(message) => MasterError::Invalid(format!(
                                "the configuration does not match the stored state: {message}"
                            )),
                            other => other,
                        })?;
                log_reconfigure("start-up reconciliation", &report);
                cluster
            }
            None => {
                let mut config = file_config;
                assign_network_ids(&mut config.overlays);
                tracing::info!("empty store: starting from the configuration");
                crate::validate::check_reserved_addresses(
                    &config,
                    None,
                    true,
                    &safety
                        .master_addresses
                        .iter()
                        .map(|ip| crate::validate::ReservedAddress {
                            ip: *ip,
                            owner: "the master's address".into(),
                        })
                        .collect::<Vec<_>>(),
                )?;
                let mut cluster = ClusterState::fresh(config, Origin::File)?;
                cluster.set_safety(safety.clone());
                cluster
            }
        };
        let ops = cluster.take_ops();
        if !ops.is_empty() {
            let before = cluster.revision;
            cluster.revision = match store.commit(before, &ops) {
                Ok(revision) => revision,
                Err(error @ StoreError::Conflict { .. }) => {
                    return Err(MasterError::Conflict(error.to_string()));
                }
                Err(error) => return Err(error.into()),
            };
            Self::record_committed(&committed, before, cluster.revision, &ops);
            metrics.store_commits.fetch_add(1, Ordering::Relaxed);
        }
        // Watchers from before this start cannot be given a delta.
        cluster.changes = ChangeLog::starting_at(cluster.revision);
        Ok((cluster, committed))
    }

    /// Applies a successful commit to the copy of the store's contents.
    fn record_committed(committed: &MemoryStore, before: u64, after: u64, ops: &[Op]) {
        match committed.commit(before, ops) {
            Ok(revision) if revision == after => {}
            // Cannot happen (the writer keeps both in step); the copy is only a fallback.
            other => tracing::error!(?other, after, "copy of the committed state out of step"),
        }
    }

    fn lock_state(&self) -> MutexGuard<'_, ClusterState> {
        // A panic while holding the lock leaves a state we cannot trust: stop rather than serve it.
        self.cluster.lock().unwrap_or_else(|_| {
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
        self.lock_state().config().clone()
    }

    /// Whether agents may have IPv6 underlay addresses.
    pub fn ipv6_underlay(&self) -> bool {
        self.lock_state().safety().ipv6_underlay
    }

    pub fn metrics_text(&self) -> String {
        let gauges = self.lock_state().gauges();
        self.metrics.render(&gauges)
    }

    /// The configuration file's path, named when a change of one of its networks is refused.
    pub fn set_config_file(&self, path: &std::path::Path) {
        self.lock_state().config_file = Some(path.display().to_string());
    }

    /// Replaces what `agent` reported about its containers and drops.
    pub fn note_report(
        &self,
        agent: IpAddr,
        mut endpoints: Vec<overlay_api::ReportedEndpoint>,
        drops: DropReport,
    ) {
        endpoints.sort();
        self.reported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(agent, AgentReport { endpoints, drops });
    }

    /// The reports of the agents the master knows (a deleted agent's report goes with it).
    pub fn reports(&self) -> BTreeMap<IpAddr, AgentReport> {
        let known: std::collections::BTreeSet<IpAddr> =
            self.lock_state().agents.keys().copied().collect();
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        reported.retain(|ip, _| known.contains(ip));
        reported.iter().map(|(ip, r)| (*ip, r.clone())).collect()
    }

    /// Every reported container address, by agent and address.
    pub fn endpoints(&self) -> Vec<overlay_api::ClusterEndpoint> {
        self.reports()
            .into_iter()
            .flat_map(|(agent, report)| {
                report
                    .endpoints
                    .into_iter()
                    .map(move |endpoint| overlay_api::ClusterEndpoint { agent, endpoint })
            })
            .collect()
    }

    /// Whether the store answers a read now. Blocks: call it off the async threads.
    pub fn probe_store(&self) -> Result<(), String> {
        self.store.probe().map_err(|e| e.to_string())
    }

    /// Every agent with when it last heartbeated and whether that makes it stale.
    pub fn liveness(&self) -> Vec<overlay_api::AgentLiveness> {
        self.lock_state().liveness_report(Instant::now())
    }

    /// Deletes the agents not heard from for `lease` (an expired lease, as flannel's), freeing
    /// their subnets; returns them.
    pub async fn reclaim_expired(
        &self,
        lease: std::time::Duration,
    ) -> Result<Vec<IpAddr>, MasterError> {
        let expired = self.lock_state().not_heard_for(lease, Instant::now());
        if expired.is_empty() {
            return Ok(expired);
        }
        self.delete_agents(expired, true).await
    }

    /// Registers or heartbeats an agent. A complete agent is answered from memory; anything
    /// else goes through the writer and is durable before the answer.
    pub async fn register(&self, ip: IpAddr) -> Result<AgentInfo, MasterError> {
        self.heartbeat(ip, None).await
    }

    /// Registers or heartbeats an agent that reports its endpoints per network.
    pub async fn heartbeat(
        &self,
        ip: IpAddr,
        endpoints: Option<EndpointCounts>,
    ) -> Result<AgentInfo, MasterError> {
        self.heartbeat_with(ip, endpoints, AgentNetworkConfig::default())
            .await
    }

    /// [`Master::heartbeat`] with the agent's wishes (bridges), as DC/OS agents register.
    pub async fn heartbeat_with(
        &self,
        ip: IpAddr,
        endpoints: Option<EndpointCounts>,
        network_config: AgentNetworkConfig,
    ) -> Result<AgentInfo, MasterError> {
        let endpoints = {
            let mut cluster = self.lock_state();
            let complete = cluster.agents.get(&ip).is_some_and(|record| {
                network_config.matches(record) && cluster.alloc.is_complete(record)
            });
            if complete {
                cluster.note_heartbeat(ip, endpoints, Instant::now());
                let info = cluster.agent(ip).expect("agent just found");
                self.metrics.registrations.fetch_add(1, Ordering::Relaxed);
                return Ok(info);
            }
            endpoints
        };
        let info = self
            .send(|reply| Command::Register(ip, endpoints, network_config, reply))
            .await?;
        self.metrics.registrations.fetch_add(1, Ordering::Relaxed);
        Ok(info)
    }

    /// Deletes agents; without `force`, agents heard from within the heartbeat timeout are
    /// refused (409, naming them).
    pub async fn delete_agents(
        &self,
        ips: Vec<IpAddr>,
        force: bool,
    ) -> Result<Vec<IpAddr>, MasterError> {
        self.send(|reply| Command::DeleteAgents(ips, force, reply))
            .await
    }

    /// Applies an API change of the network list; returns the network as it now is (None
    /// after a removal).
    pub async fn change_networks(
        &self,
        change: NetworkChange,
    ) -> Result<Option<OverlayInfo>, MasterError> {
        self.change_networks_forced(change, false).await
    }

    /// [`Master::change_networks`]; with `force`, also removes or disables a network that
    /// holds endpoints or that the configuration file defines.
    pub async fn change_networks_forced(
        &self,
        change: NetworkChange,
        force: bool,
    ) -> Result<Option<OverlayInfo>, MasterError> {
        self.send(|reply| Command::ChangeNetworks(change, force, reply))
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
            let cluster = master.lock_state();
            let delta = cluster.delta(after);
            let body = serde_json::to_vec(&delta).expect("deltas always serialise");
            (cluster.revision, Bytes::from(body))
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
            let cluster = self.lock_state();
            (cluster.revision, cluster.state())
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
        let mut cluster = self.lock_state();
        if batch.iter().any(|c| matches!(c, Command::Refresh(_))) {
            let newest = batch
                .iter()
                .filter_map(|c| match c {
                    Command::Refresh(revision) => Some(*revision),
                    _ => None,
                })
                .max()
                .unwrap_or(0);
            if newest > cluster.revision
                && let Err(error) = self.reload_from_store(&mut cluster)
            {
                tracing::warn!(%error, "cannot catch up with the shared store; will on the next change");
            }
        }
        let mut attempt = 0;
        loop {
            let outcomes: Vec<Outcome> = batch
                .iter()
                .map(|command| self.execute(&mut cluster, command))
                .collect();
            let ops = cluster.take_ops();
            let outcome = if ops.is_empty() {
                Ok(None)
            } else {
                self.store.commit(cluster.revision, &ops).map(Some)
            };
            match outcome {
                Ok(new_revision) => {
                    if let Some(revision) = new_revision {
                        Self::record_committed(&self.committed, cluster.revision, revision, &ops);
                        cluster.revision = revision;
                        cluster.changes.record(revision, &ops);
                        self.metrics.store_commits.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(cluster);
                    if let Some(revision) = new_revision {
                        self.revision_tx.send_replace(revision);
                    }
                    for (command, outcome) in batch.into_iter().zip(outcomes) {
                        deliver(command, outcome, Ok(()));
                    }
                    return;
                }
                Err(error) => {
                    let conflict = matches!(error, StoreError::Conflict { .. });
                    if !conflict {
                        self.metrics
                            .store_commit_errors
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::error!(%error, "store commit failed; reloading the state from the store");
                    }
                    // Undo the in-memory changes by reloading what is durable (and, on a
                    // shared store, what the other writers committed); a store that cannot
                    // even be read (full or read-only disk) leaves the last committed copy.
                    let reloaded = match self.reload_from_store(&mut cluster) {
                        Ok(()) => true,
                        Err(reload) => {
                            tracing::warn!(%reload, "cannot read the store back; serving the last committed state");
                            self.restore_committed(&mut cluster);
                            false
                        }
                    };
                    if conflict && reloaded && attempt < MAX_CONFLICT_RETRIES {
                        // Another writer won: recompute the batch on top of its commit.
                        attempt += 1;
                        tracing::debug!(%error, attempt, "lost a commit race; retrying the batch");
                        continue;
                    }
                    drop(cluster);
                    let error = MasterError::from(error);
                    for (command, outcome) in batch.into_iter().zip(outcomes) {
                        deliver(command, outcome, Err(error.clone()));
                    }
                    return;
                }
            }
        }
    }

    /// Replaces the in-memory state with the store's. Watchers keep their deltas: agents that
    /// differ are recorded as changed at the loaded revision (a changed network list makes
    /// every watcher resynchronise).
    fn reload_from_store(&self, cluster: &mut ClusterState) -> Result<(), MasterError> {
        let snapshot = self.store.load()?;
        self.replace_state(cluster, snapshot.clone())?;
        self.committed.replace(snapshot);
        Ok(())
    }

    /// Puts back the state of the last commit, after a failed commit whose store cannot be
    /// read (it was valid when committed, so rebuilding it cannot fail).
    fn restore_committed(&self, cluster: &mut ClusterState) {
        let snapshot = self
            .committed
            .load()
            .expect("the in-memory copy always loads");
        if let Err(error) = self.replace_state(cluster, snapshot) {
            tracing::error!(%error, "cannot rebuild the last committed state; exiting");
            std::process::exit(70);
        }
    }

    /// Replaces the in-memory state with `snapshot` (see `reload_from_store`).
    fn replace_state(
        &self,
        cluster: &mut ClusterState,
        snapshot: Snapshot,
    ) -> Result<(), MasterError> {
        let Some(mut reloaded) = ClusterState::from_snapshot(snapshot)? else {
            return Err(MasterError::Unavailable(
                "the store lost its settings record".into(),
            ));
        };
        let revision = reloaded.revision;
        if revision < cluster.revision {
            // A member behind the others answered; the next commit's compare fails and
            // reloads again, so nothing stale is ever committed.
            tracing::warn!(
                stored = revision,
                ours = cluster.revision,
                "the store answered an older revision than ours"
            );
        }
        let mut changes = std::mem::take(&mut cluster.changes);
        if reloaded.config() != cluster.config() {
            changes = ChangeLog::starting_at(revision);
        } else {
            let mut ops = Vec::new();
            for (ip, record) in &reloaded.agents {
                if cluster.agents.get(ip) != Some(record) {
                    ops.push(Op::PutAgent(record.clone()));
                }
            }
            for ip in cluster.agents.keys() {
                if !reloaded.agents.contains_key(ip) {
                    ops.push(Op::DeleteAgent(*ip));
                }
            }
            if !ops.is_empty() {
                changes.record(revision.max(cluster.revision), &ops);
            }
        }
        reloaded.changes = changes;
        reloaded.inherit_runtime(cluster);
        let advanced = revision > cluster.revision;
        *cluster = reloaded;
        if advanced {
            self.revision_tx.send_replace(revision);
        }
        Ok(())
    }

    fn execute(&self, cluster: &mut ClusterState, command: &Command) -> Outcome {
        match command {
            Command::Register(ip, endpoints, network_config, _) => {
                Outcome::Agent(cluster.register_with(
                    *ip,
                    endpoints.clone(),
                    *network_config,
                    Instant::now(),
                    &self.metrics,
                ))
            }
            Command::DeleteAgents(ips, force, _) => {
                let result = cluster.delete_agents(ips, *force, Instant::now());
                if let Ok(deleted) = &result {
                    self.metrics
                        .agents_deleted
                        .fetch_add(deleted.len() as u64, Ordering::Relaxed);
                    if !deleted.is_empty() {
                        tracing::info!(agents = ?deleted, force, "agents deleted, allocations freed (quarantined)");
                    }
                }
                Outcome::Deleted(result)
            }
            Command::ChangeNetworks(change, force, _) => Outcome::Network(apply_network_change(
                cluster,
                change.clone(),
                *force,
                &self.metrics,
            )),
            Command::Reload(file_config, _) => {
                Outcome::Report(apply_reload(cluster, file_config.clone(), &self.metrics))
            }
            Command::Refresh(_) => Outcome::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::dcos_default;
    use crate::store::memory::MemoryStore;
    use crate::store::{Op, Snapshot, StoreError};

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
            id: None,
            vni: None,
            masquerade: None,
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
        assert!(
            added.id.is_some() && added.vni.is_none(),
            "an id of its own, the shared VNI"
        );
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
            let cluster = master.lock_state();
            (cluster.revision(), cluster.state())
        };
        master.register(ip("10.0.0.9")).await.unwrap();
        master
            .delete_agents(vec![ip("10.0.0.2"), ip("10.0.0.3")], true)
            .await
            .unwrap();
        let delta = master.lock_state().delta(base_revision);
        assert!(!delta.full);
        assert_eq!(delta.state.agents.len(), 1, "only the new agent changed");
        assert_eq!(delta.deleted, vec![ip("10.0.0.2"), ip("10.0.0.3")]);
        delta.apply_to(&mut copy);
        assert_eq!(copy, master.lock_state().state());

        // A network change makes older watchers resynchronise with a full state.
        master
            .change_networks(NetworkChange::Add(spec("dev", "10.10.0.0/16")))
            .await
            .unwrap();
        let cluster = master.lock_state();
        let delta = cluster.delta(base_revision);
        assert!(delta.full);
        assert_eq!(delta.state, cluster.state());
        let current = cluster.delta(cluster.revision());
        assert!(!current.full && current.state.agents.is_empty() && current.deleted.is_empty());
        assert!(
            cluster.delta(cluster.revision() + 5).full,
            "a revision from the future resyncs"
        );
    }

    /// A store whose commits, and loads, can be made to fail.
    struct FlakyStore {
        inner: MemoryStore,
        failing: std::sync::atomic::AtomicBool,
        unreadable: std::sync::atomic::AtomicBool,
    }

    impl Store for FlakyStore {
        fn load(&self) -> Result<Snapshot, StoreError> {
            if self.unreadable.load(Ordering::SeqCst) {
                return Err(StoreError::Backend {
                    context: "test".into(),
                    reason: "Previous I/O error occurred".into(),
                });
            }
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
            unreadable: false.into(),
        });
        let master = Master::start(store.clone(), dcos_default()).unwrap();
        master.register(ip("10.0.0.1")).await.unwrap();
        let before = master.lock_state().state();
        let revision = master.revision();

        store.failing.store(true, Ordering::SeqCst);
        let err = master.register(ip("10.0.0.2")).await.unwrap_err();
        assert!(matches!(err, MasterError::Unavailable(_)), "{err}");
        let err = master
            .change_networks(NetworkChange::Add(spec("dev", "10.10.0.0/16")))
            .await
            .unwrap_err();
        assert!(matches!(err, MasterError::Unavailable(_)), "{err}");
        assert_eq!(master.lock_state().state(), before);
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

    /// The master exited (status 70) when a failed commit could not be undone by reading the
    /// store back (redb refuses reads after an I/O error): now the last committed state is
    /// kept, heartbeats are served, and writes resume once the store works.
    #[tokio::test]
    async fn an_unreadable_store_keeps_the_last_committed_state() {
        let store = Arc::new(FlakyStore {
            inner: MemoryStore::new(),
            failing: false.into(),
            unreadable: false.into(),
        });
        let master = Master::start(store.clone(), dcos_default()).unwrap();
        let first = master.register(ip("10.0.0.1")).await.unwrap();
        let before = master.lock_state().state();
        let revision = master.revision();

        store.failing.store(true, Ordering::SeqCst);
        store.unreadable.store(true, Ordering::SeqCst);
        for n in 2..=4 {
            let err = master
                .register(IpAddr::from([10, 0, 0, n]))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("disk on fire"), "{err}");
        }
        let err = master
            .change_networks(NetworkChange::Add(spec("dev", "10.10.0.0/16")))
            .await
            .unwrap_err();
        assert!(matches!(err, MasterError::Unavailable(_)), "{err}");
        assert_eq!(master.lock_state().state(), before, "nothing half-applied");
        assert_eq!(master.revision(), revision);
        assert_eq!(master.register(ip("10.0.0.1")).await.unwrap(), first);

        store.failing.store(false, Ordering::SeqCst);
        store.unreadable.store(false, Ordering::SeqCst);
        let second = master.register(ip("10.0.0.2")).await.unwrap();
        assert_eq!(
            second.overlays[0].backend.vxlan.vtep_ip,
            Some("44.128.0.2/20".parse().unwrap())
        );
        assert_eq!(master.revision(), revision + 1);
        let restarted = Master::start(store, dcos_default()).unwrap();
        assert_eq!(restarted.register(ip("10.0.0.1")).await.unwrap(), first);
        assert_eq!(restarted.register(ip("10.0.0.2")).await.unwrap(), second);
    }

    #[tokio::test]
    async fn an_agent_deleted_by_another_master_is_quarantined_here_too() {
        let store = Arc::new(MemoryStore::new());
        let safety = SafetySettings {
            quarantine: std::time::Duration::from_secs(300),
            ..SafetySettings::default()
        };
        let a = Master::start_with(store.clone(), dcos_default(), safety.clone()).unwrap();
        a.register(ip("10.0.0.1")).await.unwrap();
        let victim = a.register(ip("10.0.0.2")).await.unwrap();
        // Another master of the same store deletes the agent.
        let b = Master::start_with(store.clone(), dcos_default(), safety).unwrap();
        assert_eq!(
            b.delete_agents(vec![ip("10.0.0.2")], true).await.unwrap(),
            vec![ip("10.0.0.2")]
        );
        // This master learns it from the store (its commit loses the race and reloads): the
        // newcomer does not get the deleted agent's allocation.
        let newcomer = a.register(ip("10.0.0.3")).await.unwrap();
        assert!(a.lock_state().agent(ip("10.0.0.2")).is_none());
        assert_ne!(
            newcomer.overlays[0].backend.vxlan.vtep_ip,
            victim.overlays[0].backend.vxlan.vtep_ip
        );
        assert_ne!(newcomer.overlays[0].subnet, victim.overlays[0].subnet);
        assert_ne!(newcomer.overlays[1].subnet6, victim.overlays[1].subnet6);
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
