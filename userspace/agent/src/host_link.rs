//! The host's link into the overlay (no VXLAN device): a veth pair in the agent's namespace.
//! `ovl-host` carries the routes to every overlay subnet and this agent's gateway address of each
//! network (so the host has a source address inside each overlay), for IPv4 and IPv6 alike;
//! the datapath's `from_host` program sits on the ingress of its peer `ovl-net`.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::Context as _;
use ipnetwork::IpNetwork;
use overlay_common::maps::{HOST_LINK, HOST_LINK_PEER, HOST_LINK_PEER_MAC};
use overlay_netlink::{Address, Address6, Handle, Route, Route6};

use crate::netdev::{self, Link};

/// Marks our routes (`rtm_protocol`) so that we only ever remove our own.
const ROUTE_PROTO: u8 = 77;

#[derive(Clone, Debug)]
pub struct HostLink {
    pub host: Link,
    pub peer: Link,
}

impl HostLink {
    /// Creates the pair if missing (an agent restart finds it in place), with the peer's fixed
    /// MAC and the container MTU (host packets are encapsulated like containers').
    pub fn ensure(mtu: u32) -> anyhow::Result<HostLink> {
        let mut nl = Handle::new()?;
        match nl.add_veth(HOST_LINK, HOST_LINK_PEER, mtu, None) {
            Ok(()) => {}
            Err(e) if e.is_exists() => {}
            Err(e) => return Err(e).context("creating the host link"),
        }
        // The host's end carries IPv6 (its gateway addresses of IPv6 networks) but makes no
        // link-local address of its own (`addr_gen_mode` 1: nothing to solicit routers or
        // report groups from, so the pair stays quiet); the datapath's end needs no IPv6 stack.
        // No router messages from the overlay side are ever heeded.
        for (dev, disable) in [(HOST_LINK, "0"), (HOST_LINK_PEER, "1")] {
            let knobs = [("addr_gen_mode", "1"), ("disable_ipv6", disable)];
            for (knob, value) in knobs {
                match overlay_netlink::write_sysctl(&format!("net/ipv6/conf/{dev}/{knob}"), value) {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {} // a kernel without IPv6
                    Err(e) => return Err(e.into()),
                }
            }
            netdev::refuse_router_messages(dev)?;
        }
        nl.set_mac(HOST_LINK_PEER, HOST_LINK_PEER_MAC)?;
        for dev in [HOST_LINK_PEER, HOST_LINK] {
            nl.set_mtu(dev, mtu)?;
            nl.set_up(dev)?;
        }
        Ok(HostLink {
            host: netdev::link(HOST_LINK)?,
            peer: netdev::link(HOST_LINK_PEER)?,
        })
    }

    /// Makes the host's addresses and routes into the overlay exactly `wanted`: overlay subnet ->
    /// this agent's gateway address in it (the source the host uses there), either family.
    pub fn sync(&self, wanted: &BTreeMap<IpNetwork, IpAddr>) -> anyhow::Result<()> {
        let mut nl = Handle::new()?;
        let ifindex = nl.link(HOST_LINK)?.ifindex;
        let have_addrs = nl.addresses(Some(ifindex))?;
        // A kernel without IPv6 lists none (and is never asked for any: no IPv6 network).
        let have_addrs6: Vec<Address6> = nl
            .addresses6(Some(ifindex))
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.global)
            .collect();
        for (subnet, gateway) in wanted {
            match (subnet, gateway) {
                (IpNetwork::V4(subnet), IpAddr::V4(gateway)) => {
                    let addr = Address {
                        ifindex,
                        ip: *gateway,
                        prefix_len: 32,
                    };
                    if !have_addrs.contains(&addr) {
                        match nl.add_address(addr) {
                            Ok(()) => {}
                            Err(e) if e.is_exists() => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    nl.replace_route(
                        Route::new(subnet.network(), subnet.prefix(), ifindex)
                            .src(*gateway)
                            .protocol(ROUTE_PROTO),
                    )?;
                }
                (IpNetwork::V6(subnet), IpAddr::V6(gateway)) => {
                    if !have_addrs6.iter().any(|a| a.ip == *gateway) {
                        // nodad: usable as the source at once (the datapath owns the link).
                        match nl.add_address6(Address6::new(ifindex, *gateway, 128)) {
                            Ok(()) => {}
                            Err(e) if e.is_exists() => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    nl.replace_route6(
                        Route6::new(subnet.network(), subnet.prefix(), ifindex)
                            .src(*gateway)
                            .protocol(ROUTE_PROTO),
                    )?;
                }
                (subnet, gateway) => {
                    anyhow::bail!(
                        "host route {subnet} with a gateway {gateway} of the other family"
                    )
                }
            }
        }
        for r in nl.routes()? {
            if r.oif != Some(ifindex) || r.protocol != ROUTE_PROTO {
                continue;
            }
            if !wanted
                .keys()
                .any(|s| s.network() == IpAddr::V4(r.dst) && s.prefix() == r.prefix_len)
            {
                nl.del_route(r)?;
            }
        }
        for r in nl.routes6().unwrap_or_default() {
            if r.oif != Some(ifindex) || r.protocol != ROUTE_PROTO {
                continue;
            }
            if !wanted
                .keys()
                .any(|s| s.network() == IpAddr::V6(r.dst) && s.prefix() == r.prefix_len)
            {
                nl.del_route6(r)?;
            }
        }
        for a in have_addrs {
            if !wanted.values().any(|g| *g == IpAddr::V4(a.ip)) {
                nl.del_address(a)?;
            }
        }
        for a in have_addrs6 {
            if !wanted.values().any(|g| *g == IpAddr::V6(a.ip)) {
                nl.del_address6(a)?;
            }
        }
        Ok(())
    }

    /// Removes the pair (and with it every route and address on it).
    pub fn remove() -> anyhow::Result<()> {
        Handle::new()?.del_link_if_exists(HOST_LINK)?;
        Ok(())
    }
}
