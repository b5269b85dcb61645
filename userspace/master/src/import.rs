//! `overlay-master --import-dcos-state FILE`: seeds the store from the JSON of a DC/OS
//! master's `GET /overlay-master/state`, so a running DC/OS cluster can be converted in
//! place: every agent keeps its VTEP address, VTEP MAC and subnets (and its bridges, or lack
//! of them), in DC/OS's registration order; the networks come across with their VNIs.
//!
//! Everything is checked before anything is written, and the import is one store
//! transaction. Into an empty store it writes the whole state. Into a store that already
//! holds a state it is accepted only where it agrees: the same VTEP subnet and OUI, the same
//! definition of every network it names, and for every agent either the same allocation or
//! none that clashes with another's. Anything else is refused, naming each conflict.
//!
//! Imported networks are recorded as added through the API, so a `--config` file that does
//! not list one of them does not remove it (and its allocations) at the next start.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use overlay_api::{MacAddr, NetworkConfig, State};

use crate::alloc::{Allocator, RestoreReport};
use crate::cluster::ClusterState;
use crate::config::assign_network_ids;
use crate::store::{
    AgentNetworkRecord, AgentRecord, NetworkRecord, Op, Origin, SettingsRecord, Store,
};
use crate::validate::{check_agent_address, validate};
use overlay_api::SHARED_VNI;
use overlay_api::subnets::{halves4, halves6};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("DC/OS state file {path}: {reason}")]
    File { path: String, reason: String },
    /// The file's state cannot be taken over as it is (each reason names the agent/field).
    #[error("DC/OS state {path} cannot be imported:\n  {}", .reasons.join("\n  "))]
    Invalid { path: String, reasons: Vec<String> },
    /// The store already holds allocations that disagree with the file.
    #[error(
        "the store already holds a state that conflicts with {path} (nothing imported):\n  {}",
        .reasons.join("\n  ")
    )]
    Conflict { path: String, reasons: Vec<String> },
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// Agents written.
    pub imported: Vec<IpAddr>,
    /// Agents the store already held with the same allocation.
    pub unchanged: Vec<IpAddr>,
    /// Agents of the file without any network entry (DC/OS keeps no VTEP for them in its
    /// state): they get a new allocation when they register.
    pub skipped: Vec<IpAddr>,
    /// Networks written.
    pub networks: Vec<String>,
}

/// Reads the file and imports it (see the module comment).
pub fn import_file(
    store: &dyn Store,
    path: &std::path::Path,
    ipv6_underlay: bool,
) -> Result<ImportReport, ImportError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ImportError::File {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let state: State = serde_json::from_str(&text).map_err(|e| ImportError::File {
        path: shown.clone(),
        reason: format!("not a DC/OS overlay state: {e}"),
    })?;
    import_state(store, &state, ipv6_underlay, &shown)
}

/// The file's state as store records: settings, networks (in its order, ids given, a VNI of
/// its own where its agents' backends say one other than the shared 1024)
/// and agents (in its order). Refused where DC/OS's state cannot be kept as it is.
fn records_of(
    state: &State,
    ipv6_underlay: bool,
    path: &str,
) -> Result<(NetworkConfig, Vec<AgentRecord>, Vec<IpAddr>), ImportError> {
    let invalid = |reasons: Vec<String>| ImportError::Invalid {
        path: path.to_owned(),
        reasons,
    };
    let mut config = state.network.clone();
    // DC/OS's state has no VNI per network: its agents' backends say it (1024 for all, which
    // is our default too). A backend with another VNI (a state of ours, a network with its own)
    // comes across as that network's `vni`. Network ids (none in DC/OS's state) are given
    // below.
    for overlay in &mut config.overlays {
        if overlay.vni.is_none() {
            overlay.vni = state
                .agents
                .iter()
                .flat_map(|a| &a.overlays)
                .find(|o| o.info.name == overlay.name)
                .map(|o| o.backend.vxlan.vni)
                .filter(|&vni| vni != SHARED_VNI);
        }
    }
    assign_network_ids(&mut config.overlays);
    validate(&config).map_err(|e| invalid(vec![format!("network: {e}")]))?;

    let mut reasons = Vec::new();
    let mut agents = Vec::new();
    let mut skipped = Vec::new();
    let mut seen_ips = BTreeSet::new();
    for (index, agent) in state.agents.iter().enumerate() {
        let field = format!("agents[{index}] ({})", agent.ip);
        if !seen_ips.insert(agent.ip) {
            reasons.push(format!("{field}: listed twice"));
            continue;
        }
        if agent.ip.is_ipv6() && !ipv6_underlay {
            reasons.push(format!(
                "{field}: an IPv6 agent address needs --ipv6-underlay"
            ));
            continue;
        }
        if let Err(e) = check_agent_address(&config, agent.ip) {
            reasons.push(format!("{field}: {e}"));
            continue;
        }
        let Some(first) = agent.overlays.first() else {
            skipped.push(agent.ip);
            continue;
        };
        let vxlan = &first.backend.vxlan;
        let mut record = AgentRecord::new(agent.ip);
        record.order = index as u64 + 1;
        let Some(vtep_ip) = vxlan.vtep_ip else {
            reasons.push(format!("{field}: no backend.vxlan.vtep_ip"));
            continue;
        };
        record.vtep_ip = Some(vtep_ip.ip());
        if vtep_ip.prefix() != config.vtep_subnet.prefix() {
            reasons.push(format!(
                "{field}: vtep_ip {vtep_ip} does not carry vtep_subnet's prefix /{}",
                config.vtep_subnet.prefix()
            ));
        }
        // The MAC is derived, never stored: a different one could not be kept.
        let derived = MacAddr::vtep(config.vtep_mac_oui.mac(), vtep_ip.ip());
        if vxlan.vtep_mac != Some(derived) {
            reasons.push(format!(
                "{field}: vtep_mac {} is not the one its VTEP address gives ({derived}); it \
                 cannot be kept",
                vxlan.vtep_mac.map_or("(none)".into(), |m| m.to_string())
            ));
        }
        record.vtep_ip6 = vxlan.vtep_ip6.map(|ip| ip.ip());
        let mut bridges = BTreeSet::new();
        for (place, overlay) in agent.overlays.iter().enumerate() {
            let field = format!("{field}.overlays[{place}] ({})", overlay.info.name);
            let same_vtep = overlay.backend.vxlan.vtep_ip == vxlan.vtep_ip
                && overlay.backend.vxlan.vtep_ip6 == vxlan.vtep_ip6;
            if !same_vtep {
                reasons.push(format!(
                    "{field}: a different VTEP than the agent's other networks"
                ));
            }
            let Some(network) = config.overlays.iter().find(|o| o.name == overlay.info.name) else {
                reasons.push(format!(
                    "{field}: no such network in the state's network list"
                ));
                continue;
            };
            if record.networks.contains_key(&network.name) {
                reasons.push(format!("{field}: listed twice"));
                continue;
            }
            // The bridges must be the halves the subnet gives (the agent's CNI configs and
            // Docker networks were made from them).
            let expect = |bridge: &Option<overlay_api::BridgeInfo>, first: bool| {
                let Some(bridge) = bridge else {
                    return Ok(false);
                };
                let v4 = overlay
                    .subnet
                    .map(halves4)
                    .map(|h| if first { h.0 } else { h.1 });
                let v6 = overlay
                    .subnet6
                    .map(halves6)
                    .map(|h| if first { h.0 } else { h.1 });
                if bridge.ip != v4 || bridge.ip6 != v6 {
                    return Err(format!(
                        "{field}: bridge {} is not the {} half of the agent's subnet",
                        bridge.name,
                        if first { "first" } else { "second" }
                    ));
                }
                Ok(true)
            };
            match (
                expect(&overlay.mesos_bridge, true),
                expect(&overlay.docker_bridge, false),
            ) {
                (Ok(mesos), Ok(docker)) => {
                    bridges.insert((mesos, docker));
                }
                (Err(e), _) | (_, Err(e)) => reasons.push(e),
            }
            record.networks.insert(
                network.name.clone(),
                AgentNetworkRecord {
                    subnet: overlay.subnet,
                    subnet6: overlay.subnet6,
                    error: None,
                },
            );
        }
        match bridges.len() {
            0 => {}
            1 => {
                let (mesos, docker) = *bridges.first().expect("one element");
                record.mesos_bridge = mesos;
                record.docker_bridge = docker;
            }
            _ => reasons.push(format!(
                "{field}: bridges on some networks and not on others (this master keeps one \
                 choice per agent)"
            )),
        }
        agents.push(record);
    }
    // Every allocation must fit the networks and be held once.
    let mut alloc = Allocator::new(&config);
    let mut report = RestoreReport::default();
    for record in &agents {
        let restored = alloc.restore(record.clone(), &mut report);
        if restored.networks.len() != record.networks.len() {
            reasons.push(format!("agent {}: a network entry was dropped", record.ip));
        }
    }
    reasons.extend(report.dropped);
    if !reasons.is_empty() {
        return Err(invalid(reasons));
    }
    Ok((config, agents, skipped))
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

/// Imports an already parsed state (`path` names it in errors).
pub fn import_state(
    store: &dyn Store,
    state: &State,
    ipv6_underlay: bool,
    path: &str,
) -> Result<ImportReport, ImportError> {
    let (config, agents, skipped) = records_of(state, ipv6_underlay, path)?;
    let snapshot = store.load()?;
    let revision = snapshot.revision;
    let mut report = ImportReport {
        skipped,
        ..ImportReport::default()
    };
    let mut ops = Vec::new();
    match ClusterState::from_snapshot(snapshot.clone()).map_err(|e| ImportError::Conflict {
        path: path.to_owned(),
        reasons: vec![format!("the stored state is unusable: {e}")],
    })? {
        None => {
            ops.push(Op::PutSettings(settings_of(&config)));
            for (position, info) in config.overlays.iter().enumerate() {
                ops.push(Op::PutNetwork(NetworkRecord {
                    info: info.clone(),
                    origin: Origin::Api,
                    position: position as u32,
                }));
                report.networks.push(info.name.clone());
            }
            for record in agents {
                report.imported.push(record.ip);
                ops.push(Op::PutAgent(record));
            }
        }
        Some(stored) => {
            let reasons = merge_into(&stored, &config, agents, &mut report, &mut ops);
            if !reasons.is_empty() {
                return Err(ImportError::Conflict {
                    path: path.to_owned(),
                    reasons,
                });
            }
        }
    }
    if !ops.is_empty() {
        store.commit(revision, &ops)?;
    }
    Ok(report)
}

/// Adds the file's agents to a store that holds a state: refused where they disagree.
fn merge_into(
    stored: &ClusterState,
    config: &NetworkConfig,
    agents: Vec<AgentRecord>,
    report: &mut ImportReport,
    ops: &mut Vec<Op>,
) -> Vec<String> {
    let mut reasons = Vec::new();
    let running = stored.config();
    if (running.vtep_subnet, running.vtep_mac_oui.mac())
        != (config.vtep_subnet, config.vtep_mac_oui.mac())
    {
        reasons.push(format!(
            "vtep_subnet/vtep_mac_oui: stored {} / {}, file {} / {}",
            running.vtep_subnet, running.vtep_mac_oui, config.vtep_subnet, config.vtep_mac_oui
        ));
    }
    let addresses = |o: &overlay_api::OverlayInfo| (o.subnet, o.prefix, o.subnet6, o.prefix6);
    for overlay in &config.overlays {
        match running.overlays.iter().find(|o| o.name == overlay.name) {
            Some(existing) if addresses(existing) == addresses(overlay) => {}
            Some(existing) => reasons.push(format!(
                "network {}: stored as {:?}, the file says {:?} (subnet, prefix, subnet6, prefix6)",
                overlay.name,
                addresses(existing),
                addresses(overlay)
            )),
            None => reasons.push(format!(
                "network {}: not in the stored state (add it first)",
                overlay.name
            )),
        }
    }
    if !reasons.is_empty() {
        return reasons;
    }
    // Who holds what in the store, to name the holder of a clash.
    let mut holders: BTreeMap<String, IpAddr> = BTreeMap::new();
    let key_of = |record: &AgentRecord| {
        let mut keys = Vec::new();
        keys.extend(record.vtep_ip.map(|ip| format!("VTEP {ip}")));
        keys.extend(record.vtep_ip6.map(|ip| format!("VTEP {ip}")));
        for (name, entry) in &record.networks {
            for block in entry
                .subnet
                .map(IpNetwork::V4)
                .into_iter()
                .chain(entry.subnet6.map(IpNetwork::V6))
            {
                keys.push(format!("{name} subnet {block}"));
            }
        }
        keys
    };
    for record in stored.agents.values() {
        for key in key_of(record) {
            holders.insert(key, record.ip);
        }
    }
    let mut next_order = stored.agents.values().map(|r| r.order).max().unwrap_or(0) + 1;
    for mut record in agents {
        if let Some(existing) = stored.agents.get(&record.ip) {
            let same = existing.vtep_ip == record.vtep_ip
                && record.networks.iter().all(|(name, entry)| {
                    existing
                        .networks
                        .get(name)
                        .is_some_and(|e| (e.subnet, e.subnet6) == (entry.subnet, entry.subnet6))
                });
            if same {
                report.unchanged.push(record.ip);
            } else {
                reasons.push(format!(
                    "agent {}: the store gives it another allocation than the file",
                    record.ip
                ));
            }
            continue;
        }
        let clashes: Vec<String> = key_of(&record)
            .into_iter()
            .filter_map(|key| {
                holders
                    .get(&key)
                    .map(|holder| format!("{key} held by agent {holder}"))
            })
            .collect();
        if !clashes.is_empty() {
            reasons.push(format!("agent {}: {}", record.ip, clashes.join(", ")));
            continue;
        }
        record.order = next_order;
        next_order += 1;
        report.imported.push(record.ip);
        ops.push(Op::PutAgent(record));
    }
    reasons
}
