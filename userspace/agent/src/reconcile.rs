//! Reconciliation by difference: compare what the datapath should hold with what its maps hold
//! and touch only the entries that differ. Never flush-and-refill: traffic to unchanged
//! destinations is never interrupted.

use std::{collections::BTreeMap, net::IpAddr};

use ipnetwork::IpNetwork;
use overlay_api::MacAddr;
use overlay_common::maps::{
    AgentConfig, Endpoint, NatConfig, Network, OverlaySubnet, RemoteRoute, Vtep, WireVni,
};

use crate::{
    datapath::{AgentSettings, Datapath, OverlayMaps, from_addr16},
    desired::DesiredDatapath,
    endpoints::Endpoints,
    ipam::ParkedEndpoint,
};

/// One change to one map entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change<K, V> {
    Put(K, V),
    Remove(K),
}

/// The changes that take `current` to `desired` for one map.
pub fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    desired: &BTreeMap<K, V>,
    current: &BTreeMap<K, V>,
) -> Vec<Change<K, V>> {
    let puts = desired
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, v)| Change::Put(k.clone(), v.clone()));
    let removes = current
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .map(|k| Change::Remove(k.clone()));
    puts.chain(removes).collect()
}

/// What a container endpoint needs because of its network's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointChange {
    /// Its network is disabled: set aside (kept, out of the datapath).
    Park(IpAddr, ParkedEndpoint),
    /// Its network is enabled again: back into the datapath (or forgotten if its veth is gone).
    Unpark(IpAddr, ParkedEndpoint),
    /// Its network is gone: disconnected (its program on veth `ifindex`), address released.
    Remove(IpAddr, u32),
    /// Parked, and its network is gone: program detached, address released.
    ForgetParked(IpAddr, ParkedEndpoint),
}

/// What the maps hold now: each map read once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub networks: BTreeMap<u32, Network>,
    pub vnis: BTreeMap<u32, WireVni>,
    pub subnets: BTreeMap<IpNetwork, OverlaySubnet>,
    pub routes: BTreeMap<IpNetwork, RemoteRoute>,
    pub vteps: BTreeMap<IpAddr, Vtep>,
    /// Every endpoint, the host's and the containers'.
    pub endpoints: BTreeMap<IpAddr, Endpoint>,
    pub config: Option<AgentSettings>,
    pub nat_config: Option<NatConfig>,
}

/// Reads every map reconciliation touches, once.
pub fn read_maps(maps: &OverlayMaps) -> anyhow::Result<MapContents> {
    Ok(MapContents {
        networks: maps.networks()?,
        vnis: maps.vnis()?,
        subnets: maps.subnets()?,
        routes: maps.routes()?,
        vteps: maps.vteps()?,
        endpoints: maps.endpoints()?,
        config: maps.config()?.map(|c| AgentSettings {
            underlay_ip: from_addr16(&c.underlay_ip),
            underlay_ifindex: c.underlay_ifindex,
            vtep_mac: c.vtep_mac,
            vxlan_port: c.vxlan_port,
            overlay_mtu: c.overlay_mtu,
            spare_headroom: c.flags & AgentConfig::FLAG_SPARE_HEADROOM != 0,
        }),
        nat_config: Some(maps.nat_config()?),
    })
}

/// Every change the datapath needs, for every map and for the local endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// `OVL_CONFIG` to write (None: as it is).
    pub config: Option<AgentSettings>,
    pub nat_config: Option<NatConfig>,
    pub networks: Vec<Change<u32, Network>>,
    pub vnis: Vec<Change<u32, WireVni>>,
    pub subnets: Vec<Change<IpNetwork, OverlaySubnet>>,
    pub routes: Vec<Change<IpNetwork, RemoteRoute>>,
    pub vteps: Vec<Change<IpAddr, Vtep>>,
    pub host_endpoints: Vec<Change<IpAddr, Endpoint>>,
    pub endpoints: Vec<EndpointChange>,
}

impl Plan {
    /// The plan that takes the maps from `current` (and the endpoints parked in `parked`) to
    /// `desired`.
    pub fn between(
        desired: &DesiredDatapath,
        current: &MapContents,
        parked: &BTreeMap<IpAddr, ParkedEndpoint>,
    ) -> Plan {
        let (host, containers): (BTreeMap<_, _>, BTreeMap<_, _>) = current
            .endpoints
            .iter()
            .map(|(k, v)| (*k, *v))
            .partition(|(_, e)| e.is_host());
        let mut endpoints = Vec::new();
        // Every entry of a container (IPv4, IPv6, link-local) follows its network alike.
        for (ip, e) in &containers {
            let ip = *ip;
            match desired.configured.get(&e.network) {
                Some(true) => {}
                Some(false) => endpoints.push(EndpointChange::Park(
                    ip,
                    ParkedEndpoint {
                        vni: e.network,
                        ifindex: e.ifindex,
                        mac: MacAddr(e.mac),
                        gateway_mac: MacAddr(e.gateway_mac),
                    },
                )),
                None => endpoints.push(EndpointChange::Remove(ip, e.ifindex)),
            }
        }
        for (ip, p) in parked {
            match desired.configured.get(&p.vni) {
                Some(false) => {}
                Some(true) => endpoints.push(EndpointChange::Unpark(*ip, *p)),
                // Already handled with its (stale) map entry.
                None if containers.contains_key(ip) => {}
                None => endpoints.push(EndpointChange::ForgetParked(*ip, *p)),
            }
        }
        Plan {
            config: desired.config.filter(|c| current.config != Some(*c)),
            nat_config: desired
                .nat_config
                .filter(|c| current.nat_config != Some(*c)),
            networks: diff(&desired.networks, &current.networks),
            vnis: diff(&desired.vnis, &current.vnis),
            subnets: diff(&desired.subnets, &current.subnets),
            routes: diff(&desired.routes, &current.routes),
            vteps: diff(&desired.vteps, &current.vteps),
            host_endpoints: diff(&desired.host_endpoints, &host),
            endpoints,
        }
    }

    pub fn len(&self) -> usize {
        self.config.is_some() as usize
            + self.nat_config.is_some() as usize
            + self.networks.len()
            + self.vnis.len()
            + self.subnets.len()
            + self.routes.len()
            + self.vteps.len()
            + self.host_endpoints.len()
            + self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies the plan. Additions go in dependency order (config, a VTEP and network before the
    /// routes and endpoints that use them), removals in the reverse order, so no packet meets a
    /// half-built path.
    pub fn apply(&self, dp: &mut Datapath, local: &mut Endpoints) -> anyhow::Result<usize> {
        let maps = dp.maps_mut();
        if let Some(c) = &self.config {
            maps.set_config(c)?;
        }
        if let Some(c) = &self.nat_config {
            maps.set_nat_config(c)?;
        }
        for c in &self.vteps {
            if let Change::Put(k, v) = c {
                maps.put_vtep(*k, *v)?;
            }
        }
        for c in &self.networks {
            if let Change::Put(k, v) = c {
                maps.put_network(*k, *v)?;
            }
        }
        for c in &self.vnis {
            if let Change::Put(k, v) = c {
                maps.put_vni(*k, *v)?;
            }
        }
        for c in &self.subnets {
            if let Change::Put(k, v) = c {
                maps.put_subnet(*k, *v)?;
            }
        }
        for c in &self.routes {
            match c {
                Change::Put(k, v) => maps.put_route(*k, *v)?,
                Change::Remove(k) => maps.remove_route(*k)?,
            }
        }
        for c in &self.host_endpoints {
            match c {
                Change::Put(k, v) => maps.put_endpoint(*k, *v)?,
                Change::Remove(k) => maps.remove_endpoint(*k)?,
            }
        }
        for c in &self.endpoints {
            match c {
                EndpointChange::Park(ip, p) => {
                    local.park(dp, *ip, *p)?;
                    tracing::warn!(%ip, network_id = p.vni, "network disabled: endpoint parked (kept, out of the datapath until the network is enabled)");
                }
                EndpointChange::Unpark(ip, p) => local.unpark_into(dp, *ip, *p)?,
                EndpointChange::Remove(ip, ifindex) => {
                    tracing::info!(%ip, "network of endpoint removed: disconnecting it");
                    local.remove_orphan(dp, *ip, *ifindex)?;
                }
                EndpointChange::ForgetParked(ip, p) => local.forget_parked(dp, *ip, *p)?,
            }
        }
        let maps = dp.maps_mut();
        for c in &self.subnets {
            if let Change::Remove(k) = c {
                maps.remove_subnet(*k)?;
            }
        }
        for c in &self.vnis {
            if let Change::Remove(k) = c {
                maps.remove_vni(*k)?;
            }
        }
        for c in &self.networks {
            if let Change::Remove(k) = c {
                maps.remove_network(*k)?;
            }
        }
        for c in &self.vteps {
            if let Change::Remove(k) = c {
                maps.remove_vtep(*k)?;
            }
        }
        Ok(self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_touches_only_what_differs() {
        let current = BTreeMap::from([(1, "a"), (2, "b"), (3, "c")]);
        let desired = BTreeMap::from([(1, "a"), (2, "B"), (4, "d")]);
        let changes = diff(&desired, &current);
        assert_eq!(
            changes,
            vec![Change::Put(2, "B"), Change::Put(4, "d"), Change::Remove(3)]
        );
        assert!(diff(&desired, &desired).is_empty());
    }

    fn held(d: &DesiredDatapath) -> MapContents {
        MapContents {
            networks: d.networks.clone(),
            vnis: d.vnis.clone(),
            subnets: d.subnets.clone(),
            routes: d.routes.clone(),
            vteps: d.vteps.clone(),
            endpoints: d.host_endpoints.clone(),
            config: d.config,
            nat_config: d.nat_config,
        }
    }

    #[test]
    fn plan_of_identical_state_is_empty() {
        let mut d = DesiredDatapath::default();
        d.networks.insert(1024, Network::default());
        d.vnis.insert(1024, WireVni::carrying(&[1024]));
        d.vteps.insert("10.0.0.2".parse().unwrap(), Vtep::default());
        let host = Endpoint::host(7, 1024, [2, 0, 0, 0, 0, 1]);
        d.host_endpoints.insert("9.0.1.1".parse().unwrap(), host);
        let none = BTreeMap::new();
        assert!(Plan::between(&d, &held(&d), &none).is_empty());
        let empty = DesiredDatapath::default();
        assert_eq!(Plan::between(&d, &held(&empty), &none).len(), 4);
        assert_eq!(Plan::between(&empty, &held(&d), &none).len(), 4);
    }

    #[test]
    fn container_endpoints_follow_their_networks_state() {
        let mut d = DesiredDatapath::default();
        d.configured = BTreeMap::from([(1024, true), (1025, false)]);
        let ep = |vni| Endpoint::container(9, vni, [0; 6], [0; 6]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut now = MapContents::default();
        // A dual-stack container of the disabled network: all three entries are parked.
        for (a, vni) in [
            ("9.0.1.2", 1024),
            ("10.1.1.2", 1025),
            ("fd01:c::2", 1025),
            ("fe80::2", 1025),
            ("10.3.1.2", 1027),
        ] {
            now.endpoints.insert(ip(a), ep(vni));
        }
        let parked_ep = |vni| ParkedEndpoint {
            vni,
            ifindex: 9,
            mac: MacAddr([0; 6]),
            gateway_mac: MacAddr([0; 6]),
        };
        let parked = BTreeMap::from([
            (ip("9.0.1.3"), parked_ep(1024)),
            (ip("10.1.1.3"), parked_ep(1025)),
            (ip("10.3.1.3"), parked_ep(1027)),
        ]);
        let plan = Plan::between(&d, &now, &parked);
        for wanted in [
            EndpointChange::Park(ip("10.1.1.2"), parked_ep(1025)),
            EndpointChange::Park(ip("fd01:c::2"), parked_ep(1025)),
            EndpointChange::Park(ip("fe80::2"), parked_ep(1025)),
            EndpointChange::Remove(ip("10.3.1.2"), 9),
            EndpointChange::ForgetParked(ip("10.3.1.3"), parked_ep(1027)),
            EndpointChange::Unpark(ip("9.0.1.3"), parked_ep(1024)),
        ] {
            assert!(
                plan.endpoints.contains(&wanted),
                "{wanted:?} missing: {plan:?}"
            );
        }
        assert_eq!(plan.endpoints.len(), 6, "{plan:?}");
        // The host's endpoints are never container endpoints.
        assert!(
            plan.host_endpoints
                .iter()
                .all(|c| matches!(c, Change::Remove(_)))
        );
    }
}
