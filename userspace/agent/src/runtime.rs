//! The running agent: one thread owns the [`Agent`] (the datapath and what the agent knows)
//! and runs the commands the master follower, the local API, the Docker driver and the timers
//! send it, one at a time, each answered on its own channel. What may block for long (veth
//! lookups, the host's routes, the NAT table walk, metrics rendering) runs outside it, so no
//! request waits behind another's slow work.

use std::{net::IpAddr, sync::Arc, time::Duration};

use anyhow::anyhow;
use ipnetwork::{Ipv4Network, Ipv6Network};
use overlay_api::{
    AgentInfo, MasterClient, State,
    agent::{AddEndpoint, AgentStatus, EndpointInfo, Family, GcRequest, Half, IpamUsage, Released},
};
use tokio::sync::oneshot;

use crate::{
    agent::{Agent, Applied},
    datapath::{OverlayMaps, PinLayout},
    endpoints::{EndpointError, Veth},
    host_link::HostLink,
};

/// One command: run against the agent on its owner's thread.
type Command = Box<dyn FnOnce(&mut Agent) + Send>;

/// The way to the agent's owner; cheap to clone.
#[derive(Clone)]
pub struct Handle {
    commands: std::sync::mpsc::Sender<Command>,
    /// The maps opened again from their pins, read outside the owner (metrics).
    view: Arc<OverlayMaps>,
}

/// Why a command got no answer: the owner is gone (the agent is stopping).
fn owner_gone() -> anyhow::Error {
    anyhow!("the agent's datapath owner has stopped")
}

impl Handle {
    /// Starts the owner's thread around `agent`.
    pub fn spawn(agent: Agent) -> anyhow::Result<Handle> {
        let view = Arc::new(OverlayMaps::open_pinned(agent.datapath().pins())?);
        let (commands, receiver) = std::sync::mpsc::channel::<Command>();
        std::thread::Builder::new()
            .name("datapath-owner".into())
            .spawn(move || {
                let mut agent = agent;
                // Ends when every handle is gone.
                while let Ok(command) = receiver.recv() {
                    command(&mut agent);
                }
            })?;
        Ok(Handle { commands, view })
    }

    /// Runs `f` on the owner and waits for its answer.
    /// The maps opened from their pins, for reads outside the owner.
    pub fn view(&self) -> Arc<OverlayMaps> {
        self.view.clone()
    }

    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Agent) -> R + Send + 'static,
    ) -> anyhow::Result<R> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Box::new(move |a| {
                let _ = reply.send(f(a));
            }))
            .map_err(|_| owner_gone())?;
        answer.await.map_err(|_| owner_gone())
    }

    /// [`Handle::call`] for synchronous callers (the Docker driver's threads); never from
    /// inside the async runtime.
    pub fn call_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Agent) -> R + Send + 'static,
    ) -> anyhow::Result<R> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Box::new(move |a| {
                let _ = reply.send(f(a));
            }))
            .map_err(|_| owner_gone())?;
        answer.blocking_recv().map_err(|_| owner_gone())
    }

    /// Sends `f` without waiting for it.
    pub fn tell(&self, f: impl FnOnce(&mut Agent) + Send + 'static) {
        let _ = self.commands.send(Box::new(f));
    }

    pub async fn me(&self) -> anyhow::Result<Option<AgentInfo>> {
        self.call(|a| a.me().cloned()).await
    }

    pub async fn status(&self) -> anyhow::Result<AgentStatus> {
        self.call(|a| a.status()).await
    }

    pub async fn endpoints(&self) -> anyhow::Result<Vec<EndpointInfo>> {
        self.call(|a| a.endpoints()).await?
    }

    /// Connects a container; its veth is looked up first, outside the owner.
    pub async fn add_endpoint(&self, req: AddEndpoint) -> Result<EndpointInfo, EndpointError> {
        let name = req.host_veth.clone();
        let veth = tokio::task::spawn_blocking(move || Veth::resolve(&name))
            .await
            .map_err(|e| EndpointError::Internal(e.into()))?;
        self.call(move |a| a.add_endpoint(&req, &veth)).await?
    }

    pub async fn remove_endpoint(&self, ip: IpAddr) -> Result<(), EndpointError> {
        self.call(move |a| a.remove_endpoint(ip)).await?
    }

    pub async fn release_attachment(&self, id: String) -> Result<Released, EndpointError> {
        self.call(move |a| a.release_attachment(&id)).await?
    }

    pub async fn gc(&self, req: GcRequest) -> Result<Vec<Released>, EndpointError> {
        self.call(move |a| a.gc(&req)).await?
    }

    pub async fn ipam_usage(&self) -> anyhow::Result<Vec<IpamUsage>> {
        self.call(|a| a.ipam_usage()).await
    }

    /// Prometheus text: the agent's figures from the owner, the maps read here.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let snapshot = self.call(|a| a.metrics_snapshot()).await?;
        let view = self.view.clone();
        tokio::task::spawn_blocking(move || crate::metrics::render(&snapshot, &view)).await?
    }

    // The Docker driver's calls (from its blocking threads).

    pub fn blocking_me(&self) -> anyhow::Result<Option<AgentInfo>> {
        self.call_blocking(|a| a.me().cloned())
    }

    pub fn blocking_subnet_of(&self, network: &str) -> anyhow::Result<Option<Ipv4Network>> {
        let network = network.to_owned();
        self.call_blocking(move |a| a.subnet_of(&network))
    }

    pub fn blocking_subnet6_of(&self, network: &str) -> anyhow::Result<Option<Ipv6Network>> {
        let network = network.to_owned();
        self.call_blocking(move |a| a.subnet6_of(&network))
    }

    pub fn blocking_add_endpoint(&self, req: AddEndpoint) -> Result<EndpointInfo, EndpointError> {
        let veth = Veth::resolve(&req.host_veth);
        self.call_blocking(move |a| a.add_endpoint(&req, &veth))?
    }

    pub fn blocking_remove_endpoint(&self, ip: IpAddr) -> Result<(), EndpointError> {
        self.call_blocking(move |a| a.remove_endpoint(ip))?
    }

    pub fn blocking_unwire_endpoint(&self, ip: IpAddr) -> anyhow::Result<()> {
        self.call_blocking(move |a| a.unwire_endpoint(ip))?
    }

    pub fn blocking_reserve_address(
        &self,
        network: &str,
        family: Family,
        half: Half,
        requested: Option<IpAddr>,
    ) -> Result<IpAddr, EndpointError> {
        let network = network.to_owned();
        self.call_blocking(move |a| a.reserve_address(&network, family, half, requested))?
    }

    pub fn blocking_set_attachment(&self, ip: IpAddr, attachment: &str) -> anyhow::Result<()> {
        let attachment = attachment.to_owned();
        self.call_blocking(move |a| a.set_attachment(ip, &attachment))?
    }
}

/// Brings the host's routes into the overlay in step with what was applied (outside the owner:
/// it talks to the kernel's routing tables).
async fn sync_host_routes(host_link: &Option<HostLink>, applied: &Applied) -> anyhow::Result<()> {
    let (Some(link), Some(routes)) = (host_link.clone(), applied.host_routes.clone()) else {
        return Ok(());
    };
    tokio::task::spawn_blocking(move || link.sync(&routes))
        .await?
        .map_err(|e| e.context("routing the host into the overlay"))
}

/// Registers with the master until it answers, then follows its watch for as long as the agent
/// runs, reconciling the datapath on every new revision. Master outages only pause updates:
/// the datapath keeps forwarding with what it has.
pub async fn follow_master(
    agent: Handle,
    client: MasterClient,
    host_link: Option<HostLink>,
) -> anyhow::Result<()> {
    let (my_ip, heartbeat_now) = agent
        .call(|a| (a.underlay_ip(), a.heartbeat_trigger()))
        .await?;
    let mut backoff = Duration::from_millis(100);
    let mut tried_saved = false;
    loop {
        match crate::endpoint_report::heartbeat(&client, my_ip, &agent).await {
            Ok(me) => {
                tracing::info!(%my_ip, "registered with the master");
                let mtu = agent.call(|a| a.mtu()).await?;
                if let Err(conflict) = crate::vtep_mtu::check(mtu, &me) {
                    tracing::error!("{conflict}");
                    eprintln!("overlay-agent: {conflict}");
                    std::process::exit(crate::vtep_mtu::EXIT_CONFLICT);
                }
                // The port comes with the first state; until then the saved state's, or the
                // default.
                agent
                    .call(move |a| {
                        a.set_master_reachable(true);
                        if let Err(e) = a.set_me(me) {
                            tracing::error!("writing datapath config: {e:#}");
                        }
                    })
                    .await?;
                break;
            }
            Err(e) => {
                tracing::warn!("registering with the master failed (retrying in {backoff:?}): {e}");
                if !tried_saved {
                    tried_saved = true;
                    let restored = agent
                        .call(|a| {
                            a.set_master_reachable(false);
                            a.restore_saved()
                        })
                        .await?;
                    match restored {
                        Ok(Some((revision, applied))) => {
                            tracing::warn!(
                                revision,
                                "no master answers: running from the saved state (allocation and networks of revision {revision}); containers can be attached, the master's state will replace it once it answers"
                            );
                            if let Err(e) = sync_host_routes(&host_link, &applied).await {
                                tracing::error!("{e:#}");
                            }
                        }
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
        let agent = agent.clone();
        let heartbeat_now = heartbeat_now.clone();
        tokio::spawn(async move {
            loop {
                // Every 30 s, and at once when the endpoint counts change or the master
                // forgot this agent.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                    _ = heartbeat_now.notified() => {}
                }
                let answered = crate::endpoint_report::heartbeat(&client, my_ip, &agent).await;
                if let Err(e) = &answered {
                    tracing::warn!("heartbeat to the master failed: {e}");
                }
                let ok = answered.is_ok();
                agent.tell(move |a| a.set_master_reachable(ok));
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
                agent.tell(|a| a.set_master_reachable(true));
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
                let applied = match agent
                    .call(move |a| a.apply_state(current, revision))
                    .await?
                {
                    // A failed plan is counted by the owner, a failed route sync here.
                    Ok(applied) => sync_host_routes(&host_link, &applied)
                        .await
                        .inspect_err(|_| agent.tell(|a| a.note_reconcile_error())),
                    Err(e) => Err(e),
                };
                match applied {
                    Ok(()) => after = revision,
                    Err(e) => {
                        tracing::error!(revision, "reconciling failed (will retry): {e:#}");
                        tokio::time::sleep(backoff).await;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("watching the master failed (retrying in {backoff:?}): {e}");
                agent.tell(|a| a.set_master_reachable(false));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        if heartbeat.is_finished() {
            return Err(anyhow!("the heartbeat stopped"));
        }
    }
}

/// Follows the IPv6 address of the underlay NIC `ifname` (`ifindex`) for masquerade, on a
/// thread of its own: every `period` its addresses are read over netlink and a new source (or
/// its loss) is handed to the owner. The address may come after the agent starts (DAD, SLAAC,
/// an operator), so it is not read only once.
pub fn spawn_ipv6_source_watcher(
    agent: Handle,
    ifname: String,
    ifindex: u32,
    period: Duration,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let mut nl = overlay_netlink::Handle::new()?;
    Ok(std::thread::Builder::new()
        .name("ipv6-source".into())
        .spawn(move || {
            let mut source = crate::masquerade::Ipv6Source::default();
            let mut failing = false;
            loop {
                match nl.addresses6(Some(ifindex)) {
                    Ok(addresses) => {
                        failing = false;
                        let found = crate::masquerade::pick_ipv6_source(&addresses);
                        if let Some(new) = source.update(&ifname, found) {
                            agent.tell(move |a| {
                                if let Err(e) = a.set_ipv6_source(new) {
                                    tracing::warn!("{e:#}");
                                }
                            });
                        }
                    }
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!("reading the IPv6 addresses of {ifname}: {e}");
                    }
                    Err(_) => {}
                }
                std::thread::sleep(period);
            }
        })?)
}

/// Removes idle masqueraded flows (the kernel's LRU only evicts when full), on a thread of its
/// own with its own handle of the maps: the owner only hears the result. Housekeeping, so it
/// yields the CPU: it runs at a lower priority and rests at least `period`, and at least as long
/// as the last walk took (a full table costs at most half a core).
pub fn spawn_nat_sweeper(
    agent: Handle,
    pins: &PinLayout,
    period: Duration,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let mut maps = OverlayMaps::open_pinned(pins)?;
    Ok(std::thread::Builder::new()
        .name("nat-sweeper".into())
        .spawn(move || {
            // SAFETY: plain syscalls on this thread's own id.
            unsafe {
                let tid = libc::gettid() as libc::id_t;
                libc::setpriority(libc::PRIO_PROCESS, tid, 10);
            }
            loop {
                let started = std::time::Instant::now();
                let swept = crate::masquerade::sweep(&mut maps);
                let took = started.elapsed();
                match swept {
                    Ok(s) => agent.tell(move |a| a.nat_swept(s, took)),
                    Err(e) => tracing::warn!("sweeping the NAT table: {e:#}"),
                }
                std::thread::sleep(period.max(took));
            }
        })?)
}
