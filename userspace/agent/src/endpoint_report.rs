//! What the agent tells the master about its containers with each heartbeat: the endpoint
//! counts per network (the master's guard against removing a network in use) and every
//! container address (the master's `/overlay-master/endpoints` and Networks page).

use std::collections::BTreeMap;
use std::net::IpAddr;

use overlay_api::{AgentInfo, MasterClient, ReportedEndpoint};

use crate::runtime::Shared;

/// Drops by network name and reason.
pub type DropReport = BTreeMap<String, BTreeMap<String, u64>>;

/// The heartbeat's payload, read from the agent's state.
pub fn report(core: &Shared) -> (BTreeMap<String, u32>, Vec<ReportedEndpoint>, DropReport) {
    let c = core.lock().unwrap();
    let names: BTreeMap<u32, String> = c
        .me()
        .map(|me| {
            me.overlays
                .iter()
                .map(|o| (o.backend.vxlan.vni, o.info.name.clone()))
                .collect()
        })
        .unwrap_or_default();
    let mut drops = DropReport::new();
    for row in c.datapath().maps_ref().stats().unwrap_or_default() {
        if row.counter.is_drop() && row.packets > 0 {
            let network = names
                .get(&row.vni)
                .cloned()
                .unwrap_or_else(|| format!("vni {}", row.vni));
            *drops
                .entry(network)
                .or_default()
                .entry(row.counter.name().to_owned())
                .or_default() += row.packets;
        }
    }
    let counts = c.endpoint_counts().unwrap_or_default();
    let list = c
        .endpoints()
        .unwrap_or_default()
        .into_iter()
        .map(|e| ReportedEndpoint {
            ip: IpAddr::V4(e.ip),
            network: e.network,
            container: e.attachment,
            interface: e.host_veth,
            mac: e.container_mac,
        })
        .collect();
    (counts, list, drops)
}

/// One heartbeat with the full report.
pub async fn heartbeat(
    client: &MasterClient,
    my_ip: IpAddr,
    core: &Shared,
) -> Result<AgentInfo, overlay_api::ClientError> {
    let (counts, list, drops) = report(core);
    client
        .heartbeat_with_endpoints(my_ip, counts, list, drops)
        .await
}
