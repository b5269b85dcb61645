//! Control-plane figures: how long from a new agent joining until every other agent's maps route
//! to it, read straight from the pinned `OVL_ROUTES` maps (through `overlay-datapath`, no helper
//! process, so polling 50 agents every few milliseconds costs microseconds).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_datapath::{OverlayMaps, PinLayout, from_addr16};
use overlay_lab::cluster::{Cluster, ClusterSpec};

/// One overlay over 9.0.0.0/8 in /24s: room for thousands of agents (the lab's default second
/// network is a /16 and would run out at 256).
pub const ONE_NETWORK: &str = "\
vtep_subnet: 44.128.0.0/20
vtep_mac_oui: 70:B3:D5:00:00:00
overlays:
  - name: dcos
    subnet: 9.0.0.0/8
    prefix: 24
";

/// An agent's pinned maps, opened by path (aya, no helper process).
pub struct RoutesMap {
    maps: OverlayMaps,
}

impl RoutesMap {
    pub fn open(instance: &str) -> anyhow::Result<RoutesMap> {
        let pins = PinLayout::new(Path::new(overlay_lab::BPFFS), instance)?;
        Ok(RoutesMap {
            maps: OverlayMaps::open_pinned(&pins)?,
        })
    }

    /// Underlay address of every route's value.
    pub fn underlays(&self) -> anyhow::Result<Vec<IpAddr>> {
        Ok(self
            .maps
            .routes()?
            .values()
            .map(|r| from_addr16(&r.underlay_ip))
            .collect())
    }

    pub fn routes_to(&self, ip: Ipv4Addr) -> anyhow::Result<bool> {
        Ok(self.underlays()?.contains(&IpAddr::V4(ip)))
    }
}

/// One join: milliseconds from the master holding the new agent (its registration) and from
/// starting its process, to the last other agent's maps routing to it.
#[derive(Clone, Debug)]
pub struct JoinSample {
    pub from_register_ms: f64,
    pub from_spawn_ms: f64,
}

/// The master's count of registrations that created an agent (cheap to poll, unlike the whole
/// state at 1,000 agents; it moves once the new agent is committed).
fn agents_created(c: &Cluster) -> Option<u64> {
    let (_, body) = c.master_request("GET", "/metrics", None).ok()?;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix("overlay_master_agents_created_total "))
        .and_then(|v| v.trim().parse().ok())
}

/// Adds a real agent (namespace + process) and times until every other real agent routes to it.
pub fn join_once(c: &mut Cluster) -> anyhow::Result<JoinSample> {
    let others: Vec<String> = c.lab.agents().iter().map(|n| n.role.clone()).collect();
    let maps: Vec<RoutesMap> = others
        .iter()
        .map(|a| RoutesMap::open(&c.lab.pin_instance(a)))
        .collect::<anyhow::Result<_>>()?;
    let node = c.lab.add_agent()?;
    let new_ip = node.ip.context("new agent without IP")?;
    let created_before = agents_created(c).context("master metrics")?;
    let spawned = Instant::now();
    c.spawn_agent(&node.role)?;
    let mut registered: Option<Instant> = None;
    let mut done: Vec<Option<Instant>> = vec![None; maps.len()];
    while spawned.elapsed() < Duration::from_secs(30) {
        if registered.is_none() && agents_created(c).is_some_and(|n| n > created_before) {
            registered = Some(Instant::now());
        }
        if registered.is_some() {
            for (d, m) in done.iter_mut().zip(&maps) {
                if d.is_none() && m.routes_to(new_ip)? {
                    *d = Some(Instant::now());
                }
            }
            if done.iter().all(Option::is_some) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let Some(registered) = registered else {
        bail!("agent {} never registered within 30 s", node.role);
    };
    let last = done
        .iter()
        .map(|d| d.context("an agent never routed to the new one within 30 s"))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or(registered);
    c.wait_agent_ready(&node.role)?;
    Ok(JoinSample {
        from_register_ms: (last - registered).as_secs_f64() * 1e3,
        from_spawn_ms: (last - spawned).as_secs_f64() * 1e3,
    })
}

/// Joins into a cluster of `agents` real agents (one network).
#[derive(Clone, Debug, Default)]
pub struct JoinSet {
    pub agents: usize,
    /// Real agents (namespace + process) joining one at a time.
    pub real: Vec<JoinSample>,
    /// Simulated agents registered over HTTP: from the request until every real agent routes
    /// to it (exact start, unlike a real agent's registration inside its process).
    pub simulated_ms: Vec<f64>,
}

/// A cluster of `agents` real agents, then `runs` simulated and `runs` real agents joining.
pub fn joins(bin_dir: &Path, agents: usize, runs: usize) -> anyhow::Result<JoinSet> {
    let mut spec = ClusterSpec::new(agents, bin_dir);
    spec.config = ONE_NETWORK.into();
    let mut c = Cluster::up(spec)?;
    let mut set = JoinSet {
        agents,
        ..Default::default()
    };
    {
        let maps: Vec<RoutesMap> = c
            .lab
            .agents()
            .iter()
            .map(|a| RoutesMap::open(&c.lab.pin_instance(&a.role)))
            .collect::<anyhow::Result<_>>()?;
        for k in 0..runs {
            set.simulated_ms
                .push(simulated_join(&c, &maps, fake_ip(5000 + k))?);
        }
    }
    for _ in 0..runs {
        set.real.push(join_once(&mut c)?);
    }
    Ok(set)
}

/// Registers `ip` as an agent over HTTP; milliseconds from the request until every map in
/// `maps` routes to it.
fn simulated_join(c: &Cluster, maps: &[RoutesMap], ip: Ipv4Addr) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    register(c, ip)?;
    let mut pending: Vec<&RoutesMap> = maps.iter().collect();
    while !pending.is_empty() {
        let mut still = vec![];
        for m in pending {
            if !m.routes_to(ip)? {
                still.push(m);
            }
        }
        pending = still;
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("simulated agent {ip} not routed within 30 s");
        }
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

fn fake_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        252 + (i / 50_000) as u8,
        (i / 200 % 250) as u8,
        (i % 200 + 1) as u8,
    )
}

fn register(c: &Cluster, ip: Ipv4Addr) -> anyhow::Result<()> {
    let body = format!("{{\"ip\":\"{ip}\"}}");
    let (status, answer) =
        c.master_request("POST", "/overlay-master/agents", Some(body.as_bytes()))?;
    if status != 200 {
        bail!(
            "registering {ip}: {status} {}",
            String::from_utf8_lossy(&answer)
        );
    }
    Ok(())
}

/// Simulated agents: registered over HTTP, control plane only.
#[derive(Clone, Debug, Default)]
pub struct ScaleResult {
    pub fake_agents: usize,
    /// All registrations answered.
    pub register_ms: f64,
    /// From the first registration until every real agent's maps hold every simulated agent.
    pub all_routed_ms: f64,
    /// One more simulated agent: from its registration request until every real agent routes
    /// to it.
    pub one_more_ms: Vec<f64>,
    /// A real agent joining the cluster of simulated ones (see [`JoinSample`]).
    pub real_join: Vec<JoinSample>,
}

pub fn scale(bin_dir: &Path, fake: usize, runs: usize) -> anyhow::Result<ScaleResult> {
    let mut spec = ClusterSpec::new(2, bin_dir);
    spec.config = ONE_NETWORK.into();
    let mut c = Cluster::up(spec)?;
    let maps: Vec<RoutesMap> = ["a1", "a2"]
        .iter()
        .map(|a| RoutesMap::open(&c.lab.pin_instance(a)))
        .collect::<anyhow::Result<_>>()?;
    let start = Instant::now();
    let workers = 4;
    std::thread::scope(|s| -> anyhow::Result<()> {
        let c = &c;
        let hs: Vec<_> = (0..workers)
            .map(|w| {
                s.spawn(move || -> anyhow::Result<()> {
                    for i in (w..fake).step_by(workers) {
                        register(c, fake_ip(i))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join()
                .map_err(|_| anyhow::anyhow!("register worker panicked"))??;
        }
        Ok(())
    })?;
    let register_ms = start.elapsed().as_secs_f64() * 1e3;
    // a1 routes to a2 and every fake agent, and the other way round.
    let want = fake + 1;
    loop {
        let mut ok = true;
        for m in &maps {
            ok &= m.underlays()?.len() >= want;
        }
        if ok {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("{fake} simulated agents not all routed within 120 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let all_routed_ms = start.elapsed().as_secs_f64() * 1e3;
    let mut one_more_ms = vec![];
    for k in 0..runs {
        one_more_ms.push(simulated_join(&c, &maps, fake_ip(fake + k))?);
    }
    let mut real_join = vec![];
    for _ in 0..runs {
        real_join.push(join_once(&mut c)?);
    }
    Ok(ScaleResult {
        fake_agents: fake,
        register_ms,
        all_routed_ms,
        one_more_ms,
        real_join,
    })
}
