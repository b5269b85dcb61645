//! The drop monitor (`overlay_common::monitor`): reads the datapath's drop events from the ring
//! buffer, names them (network, container, interface), and streams them to whoever follows
//! `GET /overlay-agent/monitor`. Reporting is switched on in the datapath only while someone
//! follows; with no subscriber the programs do nothing but read the switch.
//!
//! Everything here runs on the async runtime with its own handles of the pinned maps, never on
//! the datapath owner's thread; the owner is asked for names once a second while someone
//! follows.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use overlay_api::{
    ErrorBody,
    monitor::{DropReport, MonitorEvent, MonitorFilter, SkippedReport},
};
use overlay_common::{
    counters::{Counter, NO_NETWORK},
    monitor::{DropEvent, MonitorConfig, hook},
};
use overlay_datapath::{
    PinLayout, from_addr16,
    monitor::{MonitorSwitch, open_events},
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::broadcast,
};

use crate::{recent_drops::RecentDropsWindow, runtime::Handle};

/// How often followers get a keep-alive line (a closed connection is noticed by the next write),
/// names are refreshed and the datapath's skip count is read.
const TICK: Duration = Duration::from_secs(1);

/// Events buffered per follower before it counts as behind (`skipped by agent`).
const FOLLOWER_BUFFER: usize = 8192;

/// The running monitor; cheap to clone.
#[derive(Clone)]
pub struct Monitor {
    inner: Arc<Inner>,
}

struct Inner {
    switch: Mutex<MonitorSwitch>,
    /// What the datapath is given while someone follows.
    on: MonitorConfig,
    followers: Mutex<Followers>,
    events: broadcast::Sender<MonitorEvent>,
    names: Mutex<Names>,
    agent: Handle,
}

#[derive(Default)]
struct Followers {
    count: usize,
    /// The agent is exiting: reporting stays off whoever comes or goes.
    stopped: bool,
    /// The datapath's skip count already reported.
    skipped_seen: u64,
}

/// What the agent knows to name an event with.
#[derive(Default)]
struct Names {
    agent_ip: Option<IpAddr>,
    networks: HashMap<u32, String>,
    /// Container veths: interface name and container id.
    by_ifindex: HashMap<u32, (String, Option<String>)>,
    /// Local endpoints' addresses: container id.
    by_addr: HashMap<IpAddr, Option<String>>,
}

/// The container id in an endpoint's attachment (`<container id>/<ifname>` from CNI).
fn container_of(attachment: Option<&str>) -> Option<String> {
    attachment
        .and_then(|a| a.split('/').next())
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
}

impl Monitor {
    /// Opens the monitor's maps from `pins`, switches reporting off (an agent that died while
    /// followed leaves it on), and starts reading events and the once-a-second housekeeping.
    pub fn start(
        pins: &PinLayout,
        agent: Handle,
        per_second: u32,
        burst: u32,
    ) -> anyhow::Result<Monitor> {
        let mut switch = MonitorSwitch::open_pinned(pins)?;
        switch.set(&MonitorConfig::off())?;
        let ring = open_events(pins)?;
        // SAFETY: the ring buffer owns its map's fd, open and the same until the AsyncFd (which
        // owns the ring buffer) is dropped.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("polling the drop monitor's ring buffer: {e}"))?;
        let (events, _) = broadcast::channel(FOLLOWER_BUFFER);
        let monitor = Monitor {
            inner: Arc::new(Inner {
                switch: Mutex::new(switch),
                on: MonitorConfig::drops(per_second, burst),
                followers: Mutex::new(Followers::default()),
                events,
                names: Mutex::new(Names::default()),
                agent,
            }),
        };
        tokio::spawn(read_events(monitor.inner.clone(), ring));
        tokio::spawn(housekeeping(monitor.inner.clone()));
        Ok(monitor)
    }

    /// A new follower: reporting is on from now until the last follower is gone.
    pub fn follow(&self) -> anyhow::Result<Follower> {
        let events = self.inner.events.subscribe();
        let mut followers = self.inner.followers.lock().unwrap();
        if followers.stopped {
            anyhow::bail!("the agent is stopping");
        }
        if followers.count == 0 {
            let mut switch = self.inner.switch.lock().unwrap();
            followers.skipped_seen = switch.skipped()?;
            switch.set(&self.inner.on)?;
            tracing::info!("drop monitor on (a follower connected)");
        }
        followers.count += 1;
        Ok(Follower {
            events,
            _guard: FollowerGuard {
                inner: self.inner.clone(),
            },
        })
    }

    /// Reads the names events are given (networks, containers) from the agent now, rather than
    /// at the next tick: a new follower's first events are named too.
    pub async fn refresh_names(&self) -> anyhow::Result<()> {
        let names = load_names(&self.inner.agent).await?;
        *self.inner.names.lock().unwrap() = names;
        Ok(())
    }

    /// Switches reporting off for good (the agent is exiting): its followers' guards may never
    /// run, and the pinned programs must not go on reporting into a ring nobody reads.
    pub fn stop(&self) {
        let mut followers = self.inner.followers.lock().unwrap();
        followers.stopped = true;
        if let Err(e) = self.inner.switch.lock().unwrap().set(&MonitorConfig::off()) {
            tracing::error!("switching the drop monitor off: {e:#}");
        }
    }

    /// Whether the datapath reports drops now.
    pub fn is_on(&self) -> bool {
        self.inner
            .switch
            .lock()
            .unwrap()
            .reports_drops()
            .unwrap_or(false)
    }
}

/// One follower's events; reporting stays on while it lives.
pub struct Follower {
    events: broadcast::Receiver<MonitorEvent>,
    _guard: FollowerGuard,
}

struct FollowerGuard {
    inner: Arc<Inner>,
}

impl Drop for FollowerGuard {
    fn drop(&mut self) {
        let mut followers = self.inner.followers.lock().unwrap();
        followers.count -= 1;
        if followers.count == 0 && !followers.stopped {
            match self.inner.switch.lock().unwrap().set(&MonitorConfig::off()) {
                Ok(()) => tracing::info!("drop monitor off (no follower left)"),
                Err(e) => tracing::error!("switching the drop monitor off: {e:#}"),
            }
        }
    }
}

/// Drains the ring whenever it has events, names them and hands them to the followers.
async fn read_events(inner: Arc<Inner>, mut ring: AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>) {
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("polling the drop monitor's ring buffer: {e}; monitor stopped");
                return;
            }
        };
        // Cleared before draining: an event submitted meanwhile makes it ready again.
        guard.clear_ready();
        let ring = guard.get_inner_mut();
        let mut batch = vec![];
        while let Some(item) = ring.next() {
            if let Some(ev) = DropEvent::from_bytes(&item) {
                batch.push(ev);
            }
        }
        if batch.is_empty() {
            continue;
        }
        let clock = Clock::now();
        let names = inner.names.lock().unwrap();
        for ev in &batch {
            // No follower (it just left): nothing to do.
            let _ = inner
                .events
                .send(MonitorEvent::Drop(name_event(&names, ev, &clock)));
        }
    }
}

/// Once a second while followed: refresh names, report what the datapath skipped.
async fn housekeeping(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        if inner.followers.lock().unwrap().count == 0 {
            continue;
        }
        match load_names(&inner.agent).await {
            Ok(names) => *inner.names.lock().unwrap() = names,
            Err(e) => tracing::warn!("drop monitor: reading names from the agent: {e:#}"),
        }
        let skipped = {
            let mut followers = inner.followers.lock().unwrap();
            if followers.count == 0 {
                continue;
            }
            let now = match inner.switch.lock().unwrap().skipped() {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("drop monitor: {e:#}");
                    continue;
                }
            };
            let new = now.saturating_sub(followers.skipped_seen);
            followers.skipped_seen = now;
            new
        };
        if skipped > 0 {
            let _ = inner.events.send(MonitorEvent::Skipped(SkippedReport {
                count: skipped,
                by: "datapath".into(),
            }));
        }
    }
}

async fn load_names(agent: &Handle) -> anyhow::Result<Names> {
    let me = agent.me().await?;
    let endpoints = agent.endpoints().await?;
    let mut names = Names {
        agent_ip: Some(agent.call(|a| a.underlay_ip()).await?),
        ..Default::default()
    };
    if let Some(me) = &me {
        for o in &me.overlays {
            if let Some(id) = o.info.network_id() {
                names.networks.insert(id, o.info.name.clone());
            }
        }
    }
    for ep in endpoints {
        let container = container_of(ep.attachment.as_deref());
        names
            .networks
            .entry(ep.network_id)
            .or_insert(ep.network.clone());
        names
            .by_ifindex
            .insert(ep.ifindex, (ep.host_veth.clone(), container.clone()));
        for a in ep.addresses() {
            names.by_addr.insert(a.ip, container.clone());
        }
    }
    Ok(names)
}

/// CLOCK_MONOTONIC (the programs' clock) and the wall clock read together, to date events.
struct Clock {
    monotonic_ns: u64,
    wall: SystemTime,
}

impl Clock {
    fn now() -> Clock {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: plain syscall writing into `ts`.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Clock {
            monotonic_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
            wall: SystemTime::now(),
        }
    }

    fn wall_time(&self, monotonic_ns: u64) -> SystemTime {
        self.wall - Duration::from_nanos(self.monotonic_ns.saturating_sub(monotonic_ns))
    }
}

/// RFC 3339 in UTC with microseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

fn protocol_name(ev: &DropEvent) -> String {
    if ev.flags & DropEvent::FLAG_ADDRESSES == 0 {
        return match ev.ethertype {
            overlay_common::packet::ETH_P_ARP => "arp".into(),
            0 => "unknown".into(),
            other => format!("ethertype 0x{other:04x}"),
        };
    }
    match ev.protocol {
        0 => "hopopt".into(),
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        other => other.to_string(),
    }
}

fn name_event(names: &Names, ev: &DropEvent, clock: &Clock) -> DropReport {
    let addresses = ev.flags & DropEvent::FLAG_ADDRESSES != 0;
    let ports = ev.flags & DropEvent::FLAG_PORTS != 0;
    let src = addresses.then(|| from_addr16(&ev.src));
    let dst = addresses.then(|| from_addr16(&ev.dst));
    let veth = names.by_ifindex.get(&ev.ifindex);
    let by_addr = |a: Option<IpAddr>| a.and_then(|a| names.by_addr.get(&a).cloned().flatten());
    // Arrived on a container's veth: it came from that container.
    let src_container = match (ev.hook, veth) {
        (hook::FROM_CONTAINER, Some((_, c))) => c.clone().or_else(|| by_addr(src)),
        _ => by_addr(src),
    };
    DropReport {
        time: rfc3339(clock.wall_time(ev.time_ns)),
        agent: names
            .agent_ip
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        network: (ev.network != NO_NETWORK).then(|| {
            names
                .networks
                .get(&ev.network)
                .cloned()
                .unwrap_or_else(|| format!("id {}", ev.network))
        }),
        network_id: ev.network,
        reason: Counter::from_u32(ev.reason)
            .map(|c| c.name().to_owned())
            .unwrap_or_else(|| format!("reason {}", ev.reason)),
        program: hook::name(ev.hook).into(),
        protocol: protocol_name(ev),
        src,
        dst,
        src_port: ports.then_some(ev.src_port),
        dst_port: ports.then_some(ev.dst_port),
        ifindex: ev.ifindex,
        interface: veth.map(|(name, _)| name.clone()),
        src_container,
        dst_container: by_addr(dst),
        len: ev.len,
        inner: ev.flags & DropEvent::FLAG_INNER != 0,
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

/// `GET /overlay-agent/monitor?type=drop&network=N&container=ID`: newline-delimited JSON for as
/// long as the connection stays open (a blank line every second keeps it alive).
async fn follow(State(api): State<OperatorApi>, Query(filter): Query<MonitorFilter>) -> Response {
    if let Some(kind) = filter.kind.as_deref()
        && kind != "drop"
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!("type {kind:?}: the monitor reports only \"drop\" events"),
        );
    }
    if let Err(e) = api.monitor.refresh_names().await {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("reading network and container names: {e:#}"),
        );
    }
    let follower = match api.monitor.follow() {
        Ok(f) => f,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("switching the drop monitor on: {e:#}"),
            );
        }
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick fires at once: the answer's head goes out before any event.
    let lines = futures_util::stream::unfold(
        (follower, filter, tick),
        |(mut follower, filter, mut tick)| async move {
            let line = loop {
                tokio::select! {
                    received = follower.events.recv() => match received {
                        Ok(event) if filter.matches(&event) => {
                            let mut line = serde_json::to_vec(&event).unwrap_or_default();
                            line.push(b'\n');
                            break Bytes::from(line);
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let event = MonitorEvent::Skipped(SkippedReport { count: n, by: "agent".into() });
                            let mut line = serde_json::to_vec(&event).unwrap_or_default();
                            line.push(b'\n');
                            break Bytes::from(line);
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    },
                    _ = tick.tick() => break Bytes::from_static(b"\n"),
                }
            };
            Some((Ok::<_, Infallible>(line), (follower, filter, tick)))
        },
    );
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(lines),
    )
        .into_response()
}

/// `GET /overlay-agent/drops`: the drops of the last minute, by network and reason.
async fn recent_drops(State(api): State<OperatorApi>) -> Response {
    match api.recent.report().await {
        Ok(r) => Json(r).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

/// What the operator routes need.
#[derive(Clone)]
pub struct OperatorApi {
    pub monitor: Monitor,
    pub recent: RecentDropsWindow,
}

pub fn router(api: OperatorApi) -> Router {
    Router::new()
        .route("/overlay-agent/monitor", get(follow))
        .route("/overlay-agent/drops", get(recent_drops))
        .with_state(api)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_796_194_800_123_456);
        assert_eq!(rfc3339(t), "2026-12-02T07:00:00.123456Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn events_are_named_with_what_the_agent_knows() {
        let mut names = Names {
            agent_ip: Some("10.0.0.1".parse().unwrap()),
            ..Default::default()
        };
        names.networks.insert(1, "dcos".into());
        names
            .by_ifindex
            .insert(7, ("veth-a".into(), Some("ctr-a".into())));
        names
            .by_addr
            .insert("9.0.1.2".parse().unwrap(), Some("ctr-a".into()));
        names
            .by_addr
            .insert("10.1.1.2".parse().unwrap(), Some("ctr-b".into()));
        let ev = DropEvent {
            time_ns: 1_000,
            network: 1,
            reason: Counter::DropCrossNetwork as u32,
            ifindex: 7,
            len: 60,
            src: overlay_common::maps::ipv4_mapped([9, 0, 1, 2]),
            dst: overlay_common::maps::ipv4_mapped([10, 1, 1, 2]),
            src_port: 4000,
            dst_port: 5000,
            protocol: 17,
            hook: hook::FROM_CONTAINER,
            flags: DropEvent::FLAG_ADDRESSES | DropEvent::FLAG_PORTS,
            ethertype: 0x0800,
            ..Default::default()
        };
        let clock = Clock {
            monotonic_ns: 2_000,
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(10),
        };
        let r = name_event(&names, &ev, &clock);
        assert_eq!(r.time, "1970-01-01T00:00:09.999999Z");
        assert_eq!(r.network.as_deref(), Some("dcos"));
        assert_eq!(r.reason, "drop_cross_network");
        assert_eq!(r.program, "from_container");
        assert_eq!(r.protocol, "udp");
        assert_eq!(r.src, Some("9.0.1.2".parse().unwrap()));
        assert_eq!((r.src_port, r.dst_port), (Some(4000), Some(5000)));
        assert_eq!(r.interface.as_deref(), Some("veth-a"));
        assert_eq!(r.src_container.as_deref(), Some("ctr-a"));
        assert_eq!(r.dst_container.as_deref(), Some("ctr-b"));
        // Of no network, no addresses: said so, not made up.
        let bare = DropEvent {
            reason: Counter::DropUnsupportedEth as u32,
            ethertype: 0x88cc,
            hook: hook::FROM_HOST,
            ..Default::default()
        };
        let r = name_event(&names, &bare, &clock);
        assert_eq!((r.network, r.src, r.src_port), (None, None, None));
        assert_eq!(r.protocol, "ethertype 0x88cc");
        assert_eq!(container_of(Some("abc/eth0")).as_deref(), Some("abc"));
        assert_eq!(container_of(None), None);
    }
}
