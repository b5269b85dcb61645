//! The host's link into the overlay (no VXLAN device): a veth pair in the agent's namespace.
//! `ovl-host` carries the routes to every overlay subnet and this agent's gateway address of each
//! network (so the host has a source address inside each overlay); the datapath's `from_host`
//! program sits on the ingress of its peer `ovl-net`.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use ipnetwork::Ipv4Network;
use overlay_common::maps::{HOST_LINK, HOST_LINK_PEER, HOST_LINK_PEER_MAC};

use crate::netdev::{self, Link};

/// Marks our routes and addresses so that we only ever remove our own.
const ROUTE_PROTO: &str = "77";

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(Clone, Debug)]
pub struct HostLink {
    pub host: Link,
    pub peer: Link,
}

impl HostLink {
    /// Creates the pair if missing (an agent restart finds it in place), with the peer's fixed
    /// MAC and the container MTU (host packets are encapsulated like containers').
    pub fn ensure(mtu: u32) -> anyhow::Result<HostLink> {
        let mtu = mtu.to_string();
        if netdev::link(HOST_LINK).is_err() {
            ip(&[
                "link",
                "add",
                HOST_LINK,
                "mtu",
                &mtu,
                "type",
                "veth",
                "peer",
                "name",
                HOST_LINK_PEER,
                "mtu",
                &mtu,
            ])?;
        }
        // No IPv6 over the overlay yet: keep the pair quiet (no router solicitations counted as
        // drops). The IPv6 datapath turns this back on.
        for dev in [HOST_LINK, HOST_LINK_PEER] {
            let knob = format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6");
            if std::path::Path::new(&knob).exists() {
                std::fs::write(&knob, "1").with_context(|| format!("writing {knob}"))?;
            }
            // And should IPv6 come back on, still no router messages from the overlay side.
            netdev::refuse_router_messages(dev)?;
        }
        let mac = overlay_api::MacAddr(HOST_LINK_PEER_MAC).to_string();
        ip(&[
            "link",
            "set",
            HOST_LINK_PEER,
            "address",
            &mac,
            "mtu",
            &mtu,
            "up",
        ])?;
        ip(&["link", "set", HOST_LINK, "mtu", &mtu, "up"])?;
        Ok(HostLink {
            host: netdev::link(HOST_LINK)?,
            peer: netdev::link(HOST_LINK_PEER)?,
        })
    }

    /// Makes the host's addresses and routes into the overlay exactly `wanted`: overlay subnet ->
    /// this agent's gateway address in it (the source the host uses there).
    pub fn sync(&self, wanted: &BTreeMap<Ipv4Network, Ipv4Addr>) -> anyhow::Result<()> {
        for (subnet, gateway) in wanted {
            let cidr = format!("{gateway}/32");
            let _ = ip(&["addr", "add", &cidr, "dev", HOST_LINK]);
            ip(&[
                "route",
                "replace",
                &subnet.to_string(),
                "dev",
                HOST_LINK,
                "src",
                &gateway.to_string(),
                "proto",
                ROUTE_PROTO,
            ])?;
        }
        let routes: serde_json::Value = serde_json::from_str(&ip(&[
            "-j",
            "route",
            "show",
            "dev",
            HOST_LINK,
            "proto",
            ROUTE_PROTO,
        ])?)?;
        for r in routes.as_array().into_iter().flatten() {
            let Some(dst) = r["dst"].as_str() else {
                continue;
            };
            if !wanted.keys().any(|s| s.to_string() == dst) {
                ip(&["route", "del", dst, "dev", HOST_LINK, "proto", ROUTE_PROTO])?;
            }
        }
        let addrs: serde_json::Value =
            serde_json::from_str(&ip(&["-j", "addr", "show", "dev", HOST_LINK])?)?;
        for a in addrs[0]["addr_info"].as_array().into_iter().flatten() {
            if a["family"] != "inet" {
                continue;
            }
            let Some(local) = a["local"].as_str().and_then(|s| s.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            if !wanted.values().any(|g| *g == local) {
                ip(&["addr", "del", &format!("{local}/32"), "dev", HOST_LINK])?;
            }
        }
        Ok(())
    }

    /// Removes the pair (and with it every route and address on it).
    pub fn remove() -> anyhow::Result<()> {
        if netdev::link(HOST_LINK).is_ok() {
            ip(&["link", "del", HOST_LINK])?;
        }
        Ok(())
    }
}
