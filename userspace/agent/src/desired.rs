//! What the datapath should hold, derived from the master's state and this host's own facts:
//! a pure function, so the mapping from DC/OS state to map entries is tested on the host. The one
//! home of "what the maps should hold"; [`crate::reconcile`] applies the difference.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use ipnetwork::IpNetwork;
use overlay_api::{AgentInfo, State, Status};
use overlay_common::maps::{
    Endpoint, NatConfig, Network, OverlaySubnet, RemoteRoute, Vtep, WireVni,
};

use crate::{
    datapath::{AgentSettings, addr16},
    ipam,
};

/// What this host contributes besides the master's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalFacts {
    pub underlay_ip: IpAddr,
    pub underlay_ifindex: u32,
    /// Container MTU.
    pub mtu: u32,
    /// The underlay NIC reserves link-layer headroom ([`crate::netdev::reserves_headroom`]).
    pub underlay_spare_headroom: bool,
    /// The host's link into the overlay, once set up.
    pub host_link: Option<HostLinkFacts>,
    /// The masquerade settings (from the command line).
    pub nat: Option<NatConfig>,
}

/// The two ends of the host's link into the overlay, as the host endpoints name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostLinkFacts {
    /// ifindex of the datapath's end (`ovl-net`), where traffic to the host is delivered.
    pub peer_ifindex: u32,
    /// MAC of the host's end (`ovl-host`).
    pub host_mac: [u8; 6],
}

/// Everything the datapath should hold (local containers' endpoints are the runtimes' business:
/// only whether their network is enabled comes from here).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredDatapath {
    /// Every enabled network by network id.
    pub networks: BTreeMap<u32, Network>,
    /// Every VNI an enabled network's frames carry (one, 1024, when all share it), and what it
    /// carries.
    pub vnis: BTreeMap<u32, WireVni>,
    pub subnets: BTreeMap<IpNetwork, OverlaySubnet>,
    pub routes: BTreeMap<IpNetwork, RemoteRoute>,
    pub vteps: BTreeMap<IpAddr, Vtep>,
    /// Every configured network by network id, and whether it is enabled: local endpoints of a
    /// disabled network are parked, of a network missing here removed.
    pub configured: BTreeMap<u32, bool>,
    /// The host's endpoints: one per enabled network this agent has a subnet of, at its gateway.
    pub host_endpoints: BTreeMap<IpAddr, Endpoint>,
    /// The host's routes into the overlay: each network's IPv4 and IPv6 subnet -> this agent's
    /// gateway address in it (the source).
    pub host_routes: BTreeMap<IpNetwork, IpAddr>,
    /// `OVL_CONFIG`, once this agent has a VTEP.
    pub config: Option<AgentSettings>,
    pub nat_config: Option<NatConfig>,
}

impl DesiredDatapath {
    /// Every enabled network; every network's subnet (a disabled network's addresses stay
    /// overlay addresses: unreachable, never masqueraded out); every other agent's subnets of
    /// enabled networks (routes) and VTEP; this agent's config and host endpoints from `me`
    /// (its allocation). Both families alike: a network's `subnet6`, the agents' IPv6 blocks
    /// and this agent's IPv6 gateways are entries like the IPv4 ones (16-byte keys).
    pub fn from_state(
        state: &State,
        me: Option<&AgentInfo>,
        local: &LocalFacts,
    ) -> DesiredDatapath {
        let mut d = DesiredDatapath {
            config: me.and_then(|me| agent_settings(me, local, state.network.vxlan_port)),
            nat_config: local.nat,
            ..Default::default()
        };
        // Network id and wire VNI of every enabled network, by name. A master from before
        // network ids gave each network its own VNI and keyed on it: then the VNI is the id.
        let mut by_name: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
        let mut on_vni: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for net in &state.network.overlays {
            let Some(id) = net.network_id() else {
                continue;
            };
            d.configured.insert(id, net.is_enabled());
            for subnet in net
                .subnet
                .map(IpNetwork::V4)
                .into_iter()
                .chain(net.subnet6.map(IpNetwork::V6))
            {
                d.subnets.insert(subnet, OverlaySubnet::new(id));
            }
            if !net.is_enabled() {
                continue;
            }
            by_name.insert(net.name.as_str(), (id, net.wire_vni()));
            on_vni.entry(net.wire_vni()).or_default().push(id);
            d.networks.insert(id, Network::new(net.masquerades()));
        }
        d.vnis = on_vni
            .into_iter()
            .map(|(vni, ids)| (vni, WireVni::carrying(&ids)))
            .collect();
        for agent in state.agents.iter().filter(|a| a.ip != local.underlay_ip) {
            let Some((vtep_mac, vtep_ip)) = vtep_of(agent) else {
                continue;
            };
            d.vteps
                .insert(agent.ip, Vtep::new(vtep_mac, vtep_ip.octets()));
            for ov in &agent.overlays {
                let failed = ov
                    .state
                    .as_ref()
                    .is_some_and(|s| s.status == Status::Failed);
                let net = by_name.get(ov.info.name.as_str()).copied();
                let (Some((id, vni)), false) = (net, failed) else {
                    continue;
                };
                let blocks = ov
                    .subnet
                    .map(IpNetwork::V4)
                    .into_iter()
                    .chain(ov.subnet6.map(IpNetwork::V6));
                for block in blocks {
                    d.routes
                        .insert(block, RemoteRoute::new(addr16(agent.ip), vtep_mac, id, vni));
                }
            }
        }
        if let Some(link) = local.host_link {
            for ov in me.iter().flat_map(|me| &me.overlays) {
                let Some(id) = by_name.get(ov.info.name.as_str()).map(|&(id, _)| id) else {
                    continue;
                };
                let bridge = ov.mesos_bridge.as_ref();
                let families = [
                    (
                        ov.info.subnet.map(IpNetwork::V4),
                        bridge.and_then(|b| b.ip).map(IpNetwork::V4),
                    ),
                    (
                        ov.info.subnet6.map(IpNetwork::V6),
                        bridge.and_then(|b| b.ip6).map(IpNetwork::V6),
                    ),
                ];
                for (subnet, half) in families {
                    let (Some(subnet), Some(half)) = (subnet, half) else {
                        continue;
                    };
                    let gateway = ipam::gateway_of(half);
                    d.host_routes.insert(subnet, gateway);
                    d.host_endpoints.insert(
                        gateway,
                        Endpoint::host(link.peer_ifindex, id, link.host_mac),
                    );
                }
            }
        }
        d
    }
}

/// This agent's `OVL_CONFIG`: its underlay, VTEP MAC (none before it has one), port and MTU.
pub fn agent_settings(
    me: &AgentInfo,
    local: &LocalFacts,
    vxlan_port: u16,
) -> Option<AgentSettings> {
    let (vtep_mac, _) = vtep_of(me)?;
    Some(AgentSettings {
        underlay_ip: local.underlay_ip,
        underlay_ifindex: local.underlay_ifindex,
        vtep_mac,
        vxlan_port,
        overlay_mtu: local.mtu,
        spare_headroom: local.underlay_spare_headroom,
    })
}

/// An agent's VTEP MAC and IPv4 address (the same in every network's backend).
pub fn vtep_of(agent: &AgentInfo) -> Option<([u8; 6], Ipv4Addr)> {
    agent.overlays.iter().find_map(|ov| {
        let v = &ov.backend.vxlan;
        Some((v.vtep_mac?.0, v.vtep_ip?.ip()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        serde_json::from_value(serde_json::json!({
            "network": {
                "vtep_subnet": "44.128.0.0/20", "vtep_mac_oui": "70:B3:D5:00:00:00",
                "overlays": [
                    {"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24, "id": 1024},
                    {"name": "blue", "subnet": "10.1.0.0/16", "prefix": 24, "id": 1025},
                    {"name": "off", "subnet": "10.2.0.0/16", "prefix": 24, "id": 1026, "enabled": false}
                ]
            },
            "agents": [
                {"ip": "10.250.0.11", "overlays": [
                    {"info": {"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24}, "subnet": "9.0.0.0/24",
                     "backend": {"vxlan": {"vni": 1024, "vtep_name": "vtep1024", "vtep_ip": "44.128.0.1/20", "vtep_mac": "70:b3:d5:80:00:01"}}}
                ]},
                {"ip": "10.250.0.12", "overlays": [
                    {"info": {"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24}, "subnet": "9.0.1.0/24",
                     "backend": {"vxlan": {"vni": 1024, "vtep_name": "vtep1024", "vtep_ip": "44.128.0.2/20", "vtep_mac": "70:b3:d5:80:00:02"}}},
                    {"info": {"name": "blue", "subnet": "10.1.0.0/16", "prefix": 24}, "subnet": "10.1.1.0/24",
                     "backend": {"vxlan": {"vni": 1024, "vtep_name": "vtep1024", "vtep_ip": "44.128.0.2/20", "vtep_mac": "70:b3:d5:80:00:02"}}},
                    {"info": {"name": "gone", "subnet": "10.3.0.0/16", "prefix": 24}, "subnet": "10.3.1.0/24",
                     "backend": {"vxlan": {"vni": 1024, "vtep_name": "vtep1024", "vtep_ip": "44.128.0.2/20", "vtep_mac": "70:b3:d5:80:00:02"}}}
                ]},
                {"ip": "10.250.0.13", "overlays": [
                    {"info": {"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24},
                     "backend": {"vxlan": {"vni": 1024, "vtep_name": "vtep1024"}},
                     "state": {"status": "STATUS_FAILED", "error": "no free VTEP address"}}
                ]}
            ]
        }))
        .unwrap()
    }

    fn local(ip: &str) -> LocalFacts {
        LocalFacts {
            underlay_ip: ip.parse().unwrap(),
            underlay_ifindex: 2,
            mtu: 1420,
            underlay_spare_headroom: false,
            host_link: Some(HostLinkFacts {
                peer_ifindex: 7,
                host_mac: [2, 0, 0, 0, 0, 1],
            }),
            nat: None,
        }
    }

    #[test]
    fn enabled_networks_and_every_subnet() {
        let d = DesiredDatapath::from_state(&state(), None, &local("10.250.0.11"));
        assert_eq!(d.networks.keys().copied().collect::<Vec<_>>(), [1024, 1025]);
        // The disabled network's subnet stays an overlay subnet (its addresses unreachable).
        assert_eq!(d.subnets.len(), 3);
        assert_eq!(d.subnets[&"10.2.0.0/16".parse().unwrap()].network, 1026);
        assert_eq!(d.subnets[&"9.0.0.0/8".parse().unwrap()].network, 1024);
        // DC/OS's scheme: both enabled networks on VNI 1024, which then names neither.
        assert_eq!(
            d.vnis,
            BTreeMap::from([(1024, WireVni::carrying(&[1024, 1025]))])
        );
        assert_eq!(d.vnis[&1024].network, overlay_common::counters::NO_NETWORK);
    }

    #[test]
    fn a_network_of_its_own_vni_and_a_master_without_network_ids() {
        let mut s = state();
        s.network.overlays[1].vni = Some(7000);
        let d = DesiredDatapath::from_state(&s, None, &local("10.250.0.11"));
        let r = d.routes[&"10.1.1.0/24".parse().unwrap()];
        assert_eq!((r.network, r.vni), (1025, 7000));
        let r = d.routes[&"9.0.1.0/24".parse().unwrap()];
        assert_eq!((r.network, r.vni), (1024, 1024));
        assert_eq!(
            d.vnis,
            BTreeMap::from([
                (1024, WireVni::carrying(&[1024])),
                (7000, WireVni::carrying(&[1025]))
            ])
        );
        // An older master gave every network its own VNI and no id: the VNI is the id.
        for o in &mut s.network.overlays {
            o.vni = o.id.take().map(|id| id + 1);
        }
        let d = DesiredDatapath::from_state(&s, None, &local("10.250.0.11"));
        assert_eq!(d.networks.keys().copied().collect::<Vec<_>>(), [1025, 1026]);
        let r = d.routes[&"10.1.1.0/24".parse().unwrap()];
        assert_eq!((r.network, r.vni), (1026, 1026));
    }

    #[test]
    fn routes_and_vteps_of_other_agents_only() {
        let d = DesiredDatapath::from_state(&state(), None, &local("10.250.0.11"));
        // Our own subnet is never a remote route; a failed agent (no VTEP) contributes nothing;
        // a network unknown to the configuration is ignored.
        assert_eq!(
            d.routes.keys().map(|k| k.to_string()).collect::<Vec<_>>(),
            ["9.0.1.0/24", "10.1.1.0/24"]
        );
        let r = d.routes[&"10.1.1.0/24".parse().unwrap()];
        assert_eq!(
            (r.network, r.vni, r.vtep_mac),
            (1025, 1024, [0x70, 0xb3, 0xd5, 0x80, 0, 2])
        );
        assert_eq!(r.underlay_ip, addr16("10.250.0.12".parse().unwrap()));
        assert_eq!(
            d.vteps.keys().map(|k| k.to_string()).collect::<Vec<_>>(),
            ["10.250.0.12"]
        );
        assert_eq!(d.vteps.values().next().unwrap().vtep_ip, [44, 128, 0, 2]);
        assert!(
            d.config.is_none() && d.host_endpoints.is_empty(),
            "no allocation given"
        );
    }

    #[test]
    fn config_and_host_endpoints_from_this_agents_allocation() {
        let s = state();
        let mut me = s.agents[1].clone();
        // The DC/OS shape gives the mesos half on `mesos_bridge`.
        me.overlays[0].mesos_bridge =
            serde_json::from_value(serde_json::json!({"name": "m-dcos", "ip": "9.0.1.0/25"}))
                .unwrap();
        me.overlays[1].mesos_bridge =
            serde_json::from_value(serde_json::json!({"name": "m-blue", "ip": "10.1.1.0/25"}))
                .unwrap();
        let d = DesiredDatapath::from_state(&s, Some(&me), &local("10.250.0.12"));
        let cfg = d.config.unwrap();
        assert_eq!(
            (cfg.vtep_mac, cfg.vxlan_port),
            ([0x70, 0xb3, 0xd5, 0x80, 0, 2], 64000)
        );
        // One host endpoint per enabled network with a half here, at its gateway (.1).
        let gw: IpAddr = "9.0.1.1".parse().unwrap();
        assert_eq!(d.host_endpoints.len(), 2, "{:?}", d.host_endpoints);
        let e = d.host_endpoints[&gw];
        assert_eq!(e, Endpoint::host(7, 1024, [2, 0, 0, 0, 0, 1]));
        assert_eq!(
            d.host_routes[&"9.0.0.0/8".parse().unwrap()],
            "9.0.1.1".parse::<IpAddr>().unwrap()
        );
        // Without the host link: neither.
        let mut l = local("10.250.0.12");
        l.host_link = None;
        let d = DesiredDatapath::from_state(&s, Some(&me), &l);
        assert!(d.host_endpoints.is_empty() && d.host_routes.is_empty());
    }
    #[test]
    fn ipv6_subnets_routes_and_host_endpoints() {
        let s: State = serde_json::from_value(serde_json::json!({
            "network": {
                "vtep_subnet": "44.128.0.0/20", "vtep_mac_oui": "70:B3:D5:00:00:00",
                "overlays": [
                    {"name": "dcos6", "subnet6": "fd01:b::/64", "prefix6": 80, "id": 1024},
                    {"name": "dual", "subnet": "10.5.0.0/16", "prefix": 24,
                     "subnet6": "fd01:c::/48", "prefix6": 64, "id": 1025}
                ]
            },
            "agents": [
                {"ip": "10.250.0.11", "overlays": [
                    {"info": {"name": "dcos6", "subnet6": "fd01:b::/64", "prefix6": 80},
                     "subnet6": "fd01:b::/80",
                     "mesos_bridge": {"name": "m-dcos6", "ip6": "fd01:b::/81"},
                     "backend": {"vxlan": {"vni": 1024, "vtep_name": "vtep1024", "vtep_ip": "44.128.0.1/20", "vtep_mac": "70:b3:d5:80:00:01"}}},
                    {"info": {"name": "dual", "subnet": "10.5.0.0/16", "prefix": 24, "subnet6": "fd01:c::/48", "prefix6": 64},
                     "subnet": "10.5.0.0/24", "subnet6": "fd01:c::/64",
                     "mesos_bridge": {"name": "m-dual", "ip": "10.5.0.0/25", "ip6": "fd01:c::/65"},
                     "backend": {"vxlan": {"vni": 1024, "vtep_name": "vtep1024", "vtep_ip": "44.128.0.1/20", "vtep_mac": "70:b3:d5:80:00:01"}}}
                ]},
                {"ip": "10.250.0.12", "overlays": [
                    {"info": {"name": "dcos6", "subnet6": "fd01:b::/64", "prefix6": 80},
                     "subnet6": "fd01:b::1:0:0:0/80",
                     "backend": {"vxlan": {"vni": 1024, "vtep_name": "vtep1024", "vtep_ip": "44.128.0.2/20", "vtep_mac": "70:b3:d5:80:00:02"}}},
                    {"info": {"name": "dual", "subnet": "10.5.0.0/16", "prefix": 24, "subnet6": "fd01:c::/48", "prefix6": 64},
                     "subnet": "10.5.1.0/24", "subnet6": "fd01:c:0:1::/64",
                     "backend": {"vxlan": {"vni": 1024, "vtep_name": "vtep1024", "vtep_ip": "44.128.0.2/20", "vtep_mac": "70:b3:d5:80:00:02"}}}
                ]}
            ]
        }))
        .unwrap();
        let me = s.agents[0].clone();
        let d = DesiredDatapath::from_state(&s, Some(&me), &local("10.250.0.11"));
        let net = |t: &str| t.parse::<IpNetwork>().unwrap();
        assert_eq!(d.subnets[&net("fd01:b::/64")].network, 1024);
        assert_eq!(d.subnets[&net("fd01:c::/48")].network, 1025);
        assert_eq!(d.subnets[&net("10.5.0.0/16")].network, 1025);
        // The other agent's blocks of both families, through its VTEP.
        let routes: Vec<String> = d.routes.keys().map(|k| k.to_string()).collect();
        assert_eq!(
            routes,
            ["10.5.1.0/24", "fd01:b:0:0:1::/80", "fd01:c:0:1::/64"]
        );
        let r = d.routes[&net("fd01:b::1:0:0:0/80")];
        assert_eq!((r.network, r.vni), (1024, 1024));
        assert_eq!(r.underlay_ip, addr16("10.250.0.12".parse().unwrap()));
        // The host at its gateway of each family, routed to each whole subnet.
        let ip = |t: &str| t.parse::<IpAddr>().unwrap();
        for (gw, id) in [("fd01:b::1", 1024), ("fd01:c::1", 1025), ("10.5.0.1", 1025)] {
            assert_eq!(
                d.host_endpoints[&ip(gw)],
                Endpoint::host(7, id, [2, 0, 0, 0, 0, 1]),
                "{gw}"
            );
        }
        assert_eq!(d.host_endpoints.len(), 3);
        assert_eq!(d.host_routes[&net("fd01:b::/64")], ip("fd01:b::1"));
        assert_eq!(d.host_routes[&net("fd01:c::/48")], ip("fd01:c::1"));
        assert_eq!(d.host_routes[&net("10.5.0.0/16")], ip("10.5.0.1"));
    }
}
