//! `overlayctl status`: is this host's agent and the master healthy, and if not, why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use overlay_api::agent::LocalClient;
use overlay_api::{MasterClient, NetworkConfig};
use overlay_common::maps::names;
use overlay_datapath::{OverlayMaps, PinLayout};
use serde::Serialize;

use crate::output::table;

#[derive(Debug, Serialize)]
pub struct Status {
    pub healthy: bool,
    /// Why not, one line each.
    pub problems: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentSection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master: Option<MasterSection>,
}

#[derive(Debug, Serialize)]
pub struct AgentSection {
    pub socket: PathBuf,
    pub running: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub registered: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub underlay_ip: Option<std::net::IpAddr>,
    pub master_reachable: bool,
    pub state_source: String,
    pub applied_revision: u64,
    pub pin_dir: String,
    /// TCX links the agent pinned (underlay NIC, host link, containers).
    pub programs_attached: usize,
    pub maps: Vec<MapFill>,
    pub ipam: Vec<IpamUse>,
    /// Drops counted since the datapath was loaded, by network and reason.
    pub drops: Vec<DropCount>,
    /// Drops in the last minute (`drops_window_seconds`: less while the agent is younger), by
    /// network and reason, from the agent's samples of the drop counters.
    pub drops_last_minute: Vec<DropCount>,
    pub drops_window_seconds: u64,
}

#[derive(Debug, Serialize)]
pub struct MapFill {
    pub map: String,
    pub entries: usize,
    pub max_entries: u32,
}

#[derive(Debug, Serialize)]
pub struct IpamUse {
    pub network: String,
    pub family: &'static str,
    pub half: String,
    pub range: String,
    pub used: u32,
    pub free: u64,
}

#[derive(Debug, Serialize)]
pub struct DropCount {
    pub network: String,
    /// The network's id (the counters' key; not its VNI, which networks share).
    pub network_id: u32,
    pub reason: &'static str,
    pub packets: u64,
}

#[derive(Debug, Serialize)]
pub struct MasterSection {
    pub urls: Vec<String>,
    pub reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `/health`'s answer (`status`, `store`, `revision`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<serde_json::Value>,
    pub store_healthy: bool,
    pub revision: u64,
    pub agents: usize,
    pub networks: usize,
}

/// Network name of every network id the configuration knows.
pub fn network_names(config: &NetworkConfig) -> BTreeMap<u32, String> {
    config
        .overlays
        .iter()
        .filter_map(|o| Some((o.id?, o.name.clone())))
        .collect()
}

/// The network of network id `id`, or the bare number when no configuration names it.
pub fn network_name(names: &BTreeMap<u32, String>, id: u32) -> String {
    match names.get(&id) {
        Some(name) => name.clone(),
        None if id == overlay_common::counters::NO_NETWORK => "(none)".into(),
        None => format!("network {id}"),
    }
}

/// `<bpffs>/ebpf-overlay/v<N>/<instance>` back into the layout it came from.
fn pins_of(pin_dir: &Path) -> anyhow::Result<PinLayout> {
    let instance = pin_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            anyhow::anyhow!("pin directory {} has no instance name", pin_dir.display())
        })?;
    let bpffs = pin_dir.ancestors().nth(3).ok_or_else(|| {
        anyhow::anyhow!("pin directory {} is not below a bpffs", pin_dir.display())
    })?;
    PinLayout::new(bpffs, instance)
}

fn agent_section(socket: &Path, master_names: Option<&BTreeMap<u32, String>>) -> AgentSection {
    let client = LocalClient::new(socket);
    let mut section = AgentSection {
        socket: socket.to_owned(),
        running: false,
        error: None,
        registered: false,
        underlay_ip: None,
        master_reachable: false,
        state_source: String::new(),
        applied_revision: 0,
        pin_dir: String::new(),
        programs_attached: 0,
        maps: vec![],
        ipam: vec![],
        drops: vec![],
        drops_last_minute: vec![],
        drops_window_seconds: 0,
    };
    let status = match client.status() {
        Ok(status) => status,
        Err(error) => {
            section.error = Some(crate::chain(&error));
            return section;
        }
    };
    section.running = true;
    section.registered = status.agent.is_some();
    section.underlay_ip = status.agent.as_ref().map(|a| a.ip);
    section.master_reachable = status.master_reachable;
    section.state_source = status.state_source.clone();
    section.applied_revision = status.applied_revision;
    section.pin_dir = status.pin_dir.clone();
    let mut names = master_names.cloned().unwrap_or_default();
    if let Some(agent) = &status.agent {
        for o in &agent.overlays {
            if let Some(id) = o.info.id {
                names.entry(id).or_insert_with(|| o.info.name.clone());
            }
        }
    }
    match client.ipam() {
        Ok(usage) => {
            section.ipam = usage
                .into_iter()
                .map(|u| IpamUse {
                    network: u.network,
                    family: u.family.name(),
                    half: u.half.name().to_owned(),
                    range: u.range.to_string(),
                    used: u.used,
                    free: u.free,
                })
                .collect()
        }
        Err(error) => section.error = Some(format!("IPAM: {}", crate::chain(&error))),
    }
    match client.recent_drops() {
        Ok(recent) => {
            section.drops_window_seconds = recent.window_seconds;
            section.drops_last_minute = recent
                .drops
                .into_iter()
                .map(|d| DropCount {
                    network: d
                        .network
                        .unwrap_or_else(|| network_name(&names, d.network_id)),
                    network_id: d.network_id,
                    reason: overlay_common::counters::Counter::ALL
                        .iter()
                        .find(|c| c.name() == d.reason)
                        .map_or("unknown", |c| c.name()),
                    packets: d.packets,
                })
                .collect();
        }
        // An agent from before the drop monitor: nothing to show, nothing wrong.
        Err(overlay_api::agent::LocalError::Rejected { status: 404, .. }) => {}
        Err(error) => {
            section.error = Some(format!(
                "drops of the last minute: {}",
                crate::chain(&error)
            ))
        }
    }
    let pin_dir = PathBuf::from(&status.pin_dir);
    section.programs_attached = std::fs::read_dir(pin_dir.join("links"))
        .map(|d| d.count())
        .unwrap_or(0);
    match pins_of(&pin_dir).and_then(|pins| Ok((OverlayMaps::open_pinned(&pins)?, pins))) {
        Ok((maps, pins)) => {
            let counts: Vec<(&str, anyhow::Result<usize>)> = vec![
                (names::ENDPOINTS, maps.endpoints().map(|m| m.len())),
                (names::ROUTES, maps.routes().map(|m| m.len())),
                (names::SUBNETS, maps.subnets().map(|m| m.len())),
                (names::VTEPS, maps.vteps().map(|m| m.len())),
                (names::NEXT_HOPS, maps.next_hops().map(|m| m.len())),
                (names::NETWORKS, maps.networks().map(|m| m.len())),
                (names::NAT, maps.nat_entries().map(|m| m.len())),
                (names::PROTECTED, maps.protected().map(|m| m.len())),
            ];
            for (map, entries) in counts {
                let max_entries = aya::maps::MapInfo::from_pin(pins.map(map))
                    .map(|i| i.max_entries())
                    .unwrap_or(0);
                section.maps.push(MapFill {
                    map: map.to_owned(),
                    entries: entries.unwrap_or(0),
                    max_entries,
                });
            }
            if let Ok(stats) = maps.stats() {
                section.drops = stats
                    .into_iter()
                    .filter(|r| r.counter.is_drop() && r.packets > 0)
                    .map(|r| DropCount {
                        network: network_name(&names, r.network),
                        network_id: r.network,
                        reason: r.counter.name(),
                        packets: r.packets,
                    })
                    .collect();
            }
        }
        Err(error) => section.error = Some(format!("maps: {error:#}")),
    }
    section
}

async fn master_section(client: &MasterClient) -> (MasterSection, Option<NetworkConfig>) {
    let mut section = MasterSection {
        urls: client.base_urls().to_vec(),
        reachable: false,
        error: None,
        health: None,
        store_healthy: false,
        revision: 0,
        agents: 0,
        networks: 0,
    };
    match client.health().await {
        Ok(health) => {
            section.reachable = true;
            section.store_healthy = health.get("status").and_then(|s| s.as_str()) == Some("ok");
            section.revision = health.get("revision").and_then(|r| r.as_u64()).unwrap_or(0);
            section.health = Some(health);
        }
        Err(error) => {
            section.error = Some(crate::chain(&error));
            return (section, None);
        }
    }
    match client.state().await {
        Ok(state) => {
            section.agents = state.agents.len();
            section.networks = state.network.overlays.len();
            (section, Some(state.network))
        }
        Err(error) => {
            section.error = Some(crate::chain(&error));
            (section, None)
        }
    }
}

/// Collects both sections (either may be skipped) and judges them.
pub async fn collect(agent_socket: Option<&Path>, master: Option<&MasterClient>) -> Status {
    let (master, config) = match master {
        Some(client) => {
            let (section, config) = master_section(client).await;
            (Some(section), config)
        }
        None => (None, None),
    };
    let names = config.as_ref().map(network_names);
    let agent = agent_socket.map(|socket| agent_section(socket, names.as_ref()));
    let mut problems = Vec::new();
    if let Some(a) = &agent {
        if !a.running {
            problems.push(format!(
                "agent: not answering on {} ({})",
                a.socket.display(),
                a.error.as_deref().unwrap_or("?")
            ));
        } else {
            if !a.registered {
                problems.push("agent: not registered with a master".into());
            }
            if !a.master_reachable {
                problems.push(format!(
                    "agent: master unreachable from the agent (running from {} state)",
                    a.state_source
                ));
            }
            if a.programs_attached == 0 {
                problems.push("agent: no programs attached".into());
            }
            if let Some(m) = &master
                && m.reachable
                && a.applied_revision < m.revision
            {
                problems.push(format!(
                    "agent: applied revision {} is behind the master's {}",
                    a.applied_revision, m.revision
                ));
            }
            for fill in &a.maps {
                if fill.max_entries > 0 && fill.entries * 10 >= fill.max_entries as usize * 9 {
                    problems.push(format!(
                        "agent: map {} is {}% full ({}/{})",
                        fill.map,
                        fill.entries * 100 / fill.max_entries as usize,
                        fill.entries,
                        fill.max_entries
                    ));
                }
            }
            if let Some(error) = &a.error {
                problems.push(format!("agent: {error}"));
            }
        }
    }
    if let Some(m) = &master {
        if !m.reachable {
            problems.push(format!(
                "master: {}",
                m.error.as_deref().unwrap_or("unreachable")
            ));
        } else if !m.store_healthy {
            problems.push(format!(
                "master: store not healthy ({})",
                m.health.as_ref().map(|h| h.to_string()).unwrap_or_default()
            ));
        }
    }
    Status {
        healthy: problems.is_empty(),
        problems,
        agent,
        master,
    }
}

pub fn render(s: &Status) -> String {
    let mut out = String::new();
    out.push_str(if s.healthy {
        "healthy\n"
    } else {
        "NOT HEALTHY\n"
    });
    for p in &s.problems {
        out.push_str(&format!("  ! {p}\n"));
    }
    if let Some(a) = &s.agent {
        out.push_str(&format!("\nagent ({}):\n", a.socket.display()));
        if a.running {
            out.push_str(&format!(
                "  registered: {}{}\n  master reachable: {} (state from {})\n  applied revision: {}\n  pins: {}\n  programs attached: {}\n",
                if a.registered { "yes" } else { "no" },
                a.underlay_ip.map(|ip| format!(" as {ip}")).unwrap_or_default(),
                if a.master_reachable { "yes" } else { "no" },
                a.state_source,
                a.applied_revision,
                a.pin_dir,
                a.programs_attached
            ));
            out.push_str("  maps:\n");
            let rows: Vec<Vec<String>> = a
                .maps
                .iter()
                .map(|m| {
                    vec![
                        m.map.clone(),
                        m.entries.to_string(),
                        m.max_entries.to_string(),
                        if m.max_entries > 0 {
                            format!("{:.1}%", m.entries as f64 * 100.0 / m.max_entries as f64)
                        } else {
                            "-".into()
                        },
                    ]
                })
                .collect();
            out.push_str(&indent(&table(&["MAP", "ENTRIES", "MAX", "FILL"], &rows)));
            out.push_str("  ipam:\n");
            let rows: Vec<Vec<String>> = a
                .ipam
                .iter()
                .map(|u| {
                    vec![
                        u.network.clone(),
                        u.family.into(),
                        u.half.clone(),
                        u.range.clone(),
                        u.used.to_string(),
                        u.free.to_string(),
                    ]
                })
                .collect();
            out.push_str(&indent(&table(
                &["NETWORK", "FAMILY", "HALF", "RANGE", "USED", "FREE"],
                &rows,
            )));
            out.push_str(&format!(
                "  drops in the last minute ({} s, from counter deltas):\n",
                a.drops_window_seconds
            ));
            if a.drops_last_minute.is_empty() {
                out.push_str("    none\n");
            } else {
                let rows: Vec<Vec<String>> = a
                    .drops_last_minute
                    .iter()
                    .map(|d| vec![d.network.clone(), d.reason.into(), d.packets.to_string()])
                    .collect();
                out.push_str(&indent(&table(&["NETWORK", "REASON", "PACKETS"], &rows)));
            }
            out.push_str("  drops since the datapath was loaded:\n");
            if a.drops.is_empty() {
                out.push_str("    none\n");
            } else {
                let rows: Vec<Vec<String>> = a
                    .drops
                    .iter()
                    .map(|d| vec![d.network.clone(), d.reason.into(), d.packets.to_string()])
                    .collect();
                out.push_str(&indent(&table(&["NETWORK", "REASON", "PACKETS"], &rows)));
            }
        } else {
            out.push_str("  not running\n");
        }
    }
    if let Some(m) = &s.master {
        out.push_str(&format!("\nmaster ({}):\n", m.urls.join(", ")));
        if m.reachable {
            out.push_str(&format!(
                "  store healthy: {}\n  revision: {}\n  agents: {}\n  networks: {}\n",
                if m.store_healthy { "yes" } else { "no" },
                m.revision,
                m.agents,
                m.networks
            ));
        } else {
            out.push_str("  unreachable\n");
        }
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
