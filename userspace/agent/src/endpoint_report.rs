//! What the agent tells the master about its containers with each heartbeat: the endpoint
//! counts per network (the master's guard against removing a network in use) and every
//! container address (the master's `/overlay-master/endpoints` and Networks page).

use std::collections::BTreeMap;
use std::net::IpAddr;

use overlay_api::{AgentInfo, MasterClient, ReportedEndpoint};

use crate::runtime::Handle;

/// Drops by network name and reason.
pub type DropReport = BTreeMap<String, BTreeMap<String, u64>>;

/// The heartbeat's payload: counts and endpoints from the owner, drops read from the pinned
/// counters outside it.
pub async fn report(agent: &Handle) -> (BTreeMap<String, u32>, Vec<ReportedEndpoint>, DropReport) {
    let (names, counts, endpoints) = agent
        .call(|a| {
            let names: BTreeMap<u32, String> = a
                .me()
                .map(|me| {
                    me.overlays
                        .iter()
                        // By network id: the VNI does not tell networks apart (they share one).
                        .filter_map(|o| Some((o.info.network_id()?, o.info.name.clone())))
                        .collect()
                })
                .unwrap_or_default();
            (
                names,
                a.endpoint_counts().unwrap_or_default(),
                a.endpoints().unwrap_or_default(),
            )
        })
        .await
        .unwrap_or_default();
    let view = agent.view();
    let stats = tokio::task::spawn_blocking(move || view.stats().unwrap_or_default())
        .await
        .unwrap_or_default();
    let mut drops = DropReport::new();
    for row in stats {
        if row.counter.is_drop() && row.packets > 0 {
            let network = names
                .get(&row.network)
                .cloned()
                .unwrap_or_else(|| format!("network {}", row.network));
            *drops
                .entry(network)
                .or_default()
                .entry(row.counter.name().to_owned())
                .or_default() += row.packets;
        }
    }
    // One line per address: a dual-stack container is found by either.
    let list = endpoints
        .into_iter()
        .flat_map(|e| {
            e.addresses().into_iter().map(move |a| ReportedEndpoint {
                ip: a.ip,
                network: e.network.clone(),
                container: e.attachment.clone(),
                interface: e.host_veth.clone(),
                mac: e.container_mac,
            })
        })
        .collect();
    (counts, list, drops)
}

/// One heartbeat with the full report.
pub async fn heartbeat(
    client: &MasterClient,
    my_ip: IpAddr,
    agent: &Handle,
) -> Result<AgentInfo, overlay_api::ClientError> {
    let (counts, list, drops) = report(agent).await;
    client
        .heartbeat_with_endpoints(my_ip, counts, list, drops)
        .await
}
