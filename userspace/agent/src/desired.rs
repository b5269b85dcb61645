//! What the datapath should hold, derived from the master's state: a pure function, so the
//! mapping from DC/OS state to map entries is tested on the host.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use ipnetwork::IpNetwork;
use overlay_api::{AgentInfo, State, Status};
use overlay_common::maps::{Network, OverlaySubnet, RemoteRoute, Vtep};

use crate::datapath::addr16;

/// The master-driven part of the datapath (local endpoints are managed separately).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredDatapath {
    pub networks: BTreeMap<u32, Network>,
    pub subnets: BTreeMap<IpNetwork, OverlaySubnet>,
    pub routes: BTreeMap<IpNetwork, RemoteRoute>,
    pub vteps: BTreeMap<IpAddr, Vtep>,
}

impl DesiredDatapath {
    /// Every enabled network; every network's subnet (a disabled network's addresses stay
    /// overlay addresses: unreachable, never masqueraded out); every other agent's subnets of
    /// enabled networks (routes) and VTEP. IPv4 only for now: the IPv6 datapath is a later
    /// addition (the maps already hold 16 bytes).
    pub fn from_state(state: &State, me: IpAddr) -> DesiredDatapath {
        let mut d = DesiredDatapath::default();
        let mut vni_by_name = BTreeMap::new();
        for net in &state.network.overlays {
            let Some(vni) = net.vni else { continue };
            if let Some(subnet) = net.subnet {
                d.subnets
                    .insert(IpNetwork::V4(subnet), OverlaySubnet { vni, flags: 0 });
            }
            if !net.is_enabled() {
                continue;
            }
            vni_by_name.insert(net.name.as_str(), vni);
            d.networks.insert(
                vni,
                Network {
                    flags: if net.masquerades() {
                        Network::FLAG_MASQUERADE
                    } else {
                        0
                    },
                    _pad: 0,
                },
            );
        }
        for agent in state.agents.iter().filter(|a| a.ip != me) {
            let Some((vtep_mac, vtep_ip)) = vtep_of(agent) else {
                continue;
            };
            d.vteps.insert(
                agent.ip,
                Vtep {
                    vtep_mac,
                    _pad: [0; 2],
                    vtep_ip: vtep_ip.octets(),
                },
            );
            for ov in &agent.overlays {
                let failed = ov
                    .state
                    .as_ref()
                    .is_some_and(|s| s.status == Status::Failed);
                let vni = vni_by_name.get(ov.info.name.as_str()).copied();
                let (Some(subnet), Some(vni), false) = (ov.subnet, vni, failed) else {
                    continue;
                };
                d.routes.insert(
                    IpNetwork::V4(subnet),
                    RemoteRoute {
                        underlay_ip: addr16(agent.ip),
                        vtep_mac,
                        _pad: [0; 2],
                        vni,
                        flags: 0,
                    },
                );
            }
        }
        d
    }
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
                    {"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24, "vni": 1024},
                    {"name": "blue", "subnet": "10.1.0.0/16", "prefix": 24, "vni": 1025},
                    {"name": "off", "subnet": "10.2.0.0/16", "prefix": 24, "vni": 1026, "enabled": false}
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
                     "backend": {"vxlan": {"vni": 1025, "vtep_name": "vtep1024", "vtep_ip": "44.128.0.2/20", "vtep_mac": "70:b3:d5:80:00:02"}}},
                    {"info": {"name": "gone", "subnet": "10.3.0.0/16", "prefix": 24}, "subnet": "10.3.1.0/24",
                     "backend": {"vxlan": {"vni": 1027, "vtep_name": "vtep1024", "vtep_ip": "44.128.0.2/20", "vtep_mac": "70:b3:d5:80:00:02"}}}
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

    #[test]
    fn enabled_networks_and_every_subnet() {
        let d = DesiredDatapath::from_state(&state(), "10.250.0.11".parse().unwrap());
        assert_eq!(d.networks.keys().copied().collect::<Vec<_>>(), [1024, 1025]);
        // The disabled network's subnet stays an overlay subnet (its addresses unreachable).
        assert_eq!(d.subnets.len(), 3);
        assert_eq!(d.subnets[&"10.2.0.0/16".parse().unwrap()].vni, 1026);
        assert_eq!(d.subnets[&"9.0.0.0/8".parse().unwrap()].vni, 1024);
    }

    #[test]
    fn routes_and_vteps_of_other_agents_only() {
        let me: IpAddr = "10.250.0.11".parse().unwrap();
        let d = DesiredDatapath::from_state(&state(), me);
        // Our own subnet is never a remote route; a failed agent (no VTEP) contributes nothing;
        // a network unknown to the configuration is ignored.
        assert_eq!(
            d.routes.keys().map(|k| k.to_string()).collect::<Vec<_>>(),
            ["9.0.1.0/24", "10.1.1.0/24"]
        );
        let r = d.routes[&"10.1.1.0/24".parse().unwrap()];
        assert_eq!((r.vni, r.vtep_mac), (1025, [0x70, 0xb3, 0xd5, 0x80, 0, 2]));
        assert_eq!(r.underlay_ip, addr16("10.250.0.12".parse().unwrap()));
        assert_eq!(
            d.vteps.keys().map(|k| k.to_string()).collect::<Vec<_>>(),
            ["10.250.0.12"]
        );
        assert_eq!(d.vteps.values().next().unwrap().vtep_ip, [44, 128, 0, 2]);
    }
}
