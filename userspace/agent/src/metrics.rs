//! Prometheus text of the datapath counters and the agent's own, rendered from a [`Snapshot`] of
//! the agent's knowledge and a read-only view of the maps, outside the datapath's owner (the
//! NAT table's fill level comes from the sweeper's last walk, not from another one).

use std::collections::BTreeMap;

use overlay_api::agent::Family;
use overlay_common::maps::capacity;

use crate::datapath::OverlayMaps;

/// The agent's figures at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub names: BTreeMap<u32, String>,
    /// Used and free addresses per network and family.
    pub ipam: BTreeMap<(String, Family), (u64, u64)>,
    pub ipam_exhausted: BTreeMap<(String, Family), u64>,
    pub revision: u64,
    pub map_updates: u64,
    pub reconcile_errors: u64,
    pub registered: bool,
    pub allocation_changes: u64,
    pub parked: u64,
    pub nat_entries: u64,
    /// Masqueraded flows, IPv4 and IPv6.
    pub nat_flows: [u64; 2],
    pub nat_expired: u64,
    pub nat_sweep_seconds: f64,
    /// Remote VTEPs with a cached next hop, and those the kernel's lookup addresses.
    pub next_hops: [u64; 2],
}

pub fn render(s: &Snapshot, maps: &OverlayMaps) -> anyhow::Result<String> {
    let names = &s.names;
    let mut out = overlay_api::build::build_info_metric("overlay_agent");
    out.push_str(&crate::container_device::metric());
    out.push_str("# HELP overlay_datapath_packets_total Packets handled by the eBPF datapath, by network and counter (drop_* are drops by reason).\n");
    out.push_str("# TYPE overlay_datapath_packets_total counter\n");
    let stats = maps.stats()?;
    for r in &stats {
        let net = names.get(&r.network).map_or("", String::as_str);
        out.push_str(&format!(
            "overlay_datapath_packets_total{{network_id=\"{}\",network=\"{net}\",counter=\"{}\"}} {}\n",
            r.network,
            r.counter.name(),
            r.packets
        ));
    }
    out.push_str("# HELP overlay_datapath_bytes_total Bytes handled by the eBPF datapath, by network and counter.\n");
    out.push_str("# TYPE overlay_datapath_bytes_total counter\n");
    for r in &stats {
        let net = names.get(&r.network).map_or("", String::as_str);
        out.push_str(&format!(
            "overlay_datapath_bytes_total{{network_id=\"{}\",network=\"{net}\",counter=\"{}\"}} {}\n",
            r.network,
            r.counter.name(),
            r.bytes
        ));
    }
    // One per interface: a dual-stack container (or the host's gateways of both families) has
    // several entries on one.
    let mut per_net: BTreeMap<u32, usize> = BTreeMap::new();
    let interfaces: std::collections::BTreeSet<(u32, u32)> = maps
        .endpoints()?
        .values()
        .map(|e| (e.network, e.ifindex))
        .collect();
    for (network, _) in interfaces {
        *per_net.entry(network).or_default() += 1;
    }
    let id_of = |name: &str| {
        names
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .map_or(String::new(), |(id, _)| id.to_string())
    };
    out.push_str("# HELP overlay_agent_endpoints Local endpoints by network.\n# TYPE overlay_agent_endpoints gauge\n");
    for (id, n) in per_net {
        let net = names.get(&id).map_or("", String::as_str);
        out.push_str(&format!(
            "overlay_agent_endpoints{{network_id=\"{id}\",network=\"{net}\"}} {n}\n"
        ));
    }
    out.push_str("# HELP overlay_agent_ipam_addresses Container addresses of this agent's subnets (both halves), by network, family and state (free saturates at 2^64).\n# TYPE overlay_agent_ipam_addresses gauge\n");
    for ((net, family), (used, free)) in &s.ipam {
        let (id, family) = (id_of(net), family.name());
        out.push_str(&format!(
            "overlay_agent_ipam_addresses{{network_id=\"{id}\",network=\"{net}\",family=\"{family}\",state=\"used\"}} {used}\n\
             overlay_agent_ipam_addresses{{network_id=\"{id}\",network=\"{net}\",family=\"{family}\",state=\"free\"}} {free}\n"
        ));
    }
    out.push_str("# HELP overlay_agent_ipam_exhausted_total Allocations refused because the requested half had no free address, by network and family.\n# TYPE overlay_agent_ipam_exhausted_total counter\n");
    for ((net, family), n) in &s.ipam_exhausted {
        let (id, family) = (id_of(net), family.name());
        out.push_str(&format!(
            "overlay_agent_ipam_exhausted_total{{network_id=\"{id}\",network=\"{net}\",family=\"{family}\"}} {n}\n"
        ));
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
            s.revision,
        ),
        (
            "overlay_agent_map_updates_total",
            "Map entries changed by reconciliation.",
            "counter",
            s.map_updates,
        ),
        (
            "overlay_agent_reconcile_errors_total",
            "Failed reconciliations (retried).",
            "counter",
            s.reconcile_errors,
        ),
        (
            "overlay_agent_registered",
            "1 once registered with a master.",
            "gauge",
            s.registered as u64,
        ),
        (
            "overlay_agent_allocation_changed_total",
            "Times the master changed this agent's VTEP or subnets under it (see /overlay-agent/status).",
            "counter",
            s.allocation_changes,
        ),
        (
            "overlay_agent_parked_endpoints",
            "Endpoints of disabled networks, kept out of the datapath until re-enabled.",
            "gauge",
            s.parked,
        ),
        (
            "overlay_next_hops_cached",
            "Remote VTEPs whose next hop the datapath addresses from the agent's mirror of the kernel's neighbour table.",
            "gauge",
            s.next_hops[0],
        ),
        (
            "overlay_next_hops_by_kernel",
            "Remote VTEPs (IPv4) left to the kernel's next-hop lookup (unresolved, not yet managed, another device; the agent's log says why).",
            "gauge",
            s.next_hops[1],
        ),
        (
            "overlay_nat_entries",
            "Connection-tracking entries (two per masqueraded flow), as of the last sweep.",
            "gauge",
            s.nat_entries,
        ),
        (
            "overlay_nat_capacity",
            "Capacity of the NAT table (LRU-evicted when full).",
            "gauge",
            capacity::NAT as u64,
        ),
        (
            "overlay_nat_expired_total",
            "Idle NAT entries removed by the agent.",
            "counter",
            s.nat_expired,
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    out.push_str(
        "# HELP overlay_nat_flows Masqueraded flows by address family, as of the last sweep.\n\
         # TYPE overlay_nat_flows gauge\n",
    );
    for (family, n) in ["ipv4", "ipv6"].iter().zip(s.nat_flows) {
        out.push_str(&format!("overlay_nat_flows{{family=\"{family}\"}} {n}\n"));
    }
    out.push_str(&format!(
        "# HELP overlay_nat_sweep_seconds Duration of the last walk of the NAT table.\n\
         # TYPE overlay_nat_sweep_seconds gauge\noverlay_nat_sweep_seconds {:.6}\n",
        s.nat_sweep_seconds
    ));
    Ok(out)
}
