//! The host's link into the overlay (no VXLAN device): a veth pair in the agent's namespace.
//! `ovl-host` carries the routes to every overlay subnet and this agent's gateway address of each
//! network (so the host has a source address inside each overlay); the datapath's `from_host`
//! program sits on the ingress of its peer `ovl-net`.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::Context as _;
use ipnetwork::Ipv4Network;
use overlay_common::maps::{HOST_LINK, HOST_LINK_PEER, HOST_LINK_PEER_MAC};
use overlay_netlink::{Address, Handle, Route};

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
        // No IPv6 over the overlay yet: keep the pair quiet (no router solicitations counted as
        // drops). The IPv6 datapath turns this back on.
        for dev in [HOST_LINK, HOST_LINK_PEER] {
            match overlay_netlink::write_sysctl(&format!("net/ipv6/conf/{dev}/disable_ipv6"), "1") {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {} // a kernel without IPv6
                Err(e) => return Err(e.into()),
            }
            // And should IPv6 come back on, still no router messages from the overlay side.
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
    /// this agent's gateway address in it (the source the host uses there).
    pub fn sync(&self, wanted: &BTreeMap<Ipv4Network, Ipv4Addr>) -> anyhow::Result<()> {
        let mut nl = Handle::new()?;
        let ifindex = nl.link(HOST_LINK)?.ifindex;
        let have_addrs = nl.addresses(Some(ifindex))?;
        for (subnet, gateway) in wanted {
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
        for r in nl.routes()? {
            if r.oif != Some(ifindex) || r.protocol != ROUTE_PROTO {
                continue;
            }
            if !wanted
                .keys()
                .any(|s| s.network() == r.dst && s.prefix() == r.prefix_len)
            {
                nl.del_route(r)?;
            }
        }
        for a in have_addrs {
            if !wanted.values().any(|g| *g == a.ip) {
                nl.del_address(a)?;
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
