//! `ebpf-overlay`, the CNI plugin of ebpf-overlay.
//!
//! ADD creates a veth pair (the container side named `CNI_IFNAME` in `CNI_NETNS`, the host side
//! `eo<12 hex>` in the agent's namespace), has the local agent allocate an address and wire the
//! host side to the eBPF datapath (program attached, endpoint map entry written) before it
//! answers, then gives the container its addresses (one per family the network has), MTU and
//! default routes (on a container's further networks, a route to that network's subnet instead:
//! one interface per network). On a network with IPv6 the container's interface gets its
//! link-local address from its MAC (the one the agent admits), makes none of its own and accepts
//! no router advertisements. DEL releases the addresses and the endpoint and removes the veth,
//! and is idempotent. CHECK compares interface, addresses, routes and the agent's endpoint with
//! what ADD set up. STATUS and GC (1.1.0) ask the agent. See [`spec`] for the config fields and
//! error codes.
//!
//! The work is split so that everything but the system calls is pure: [`run`] drives one
//! invocation against a [`Host`] (the agent API and rtnetlink), [`System`] is the real one. The
//! plugin spawns nothing: interfaces, addresses and routes go over netlink (`overlay-netlink`),
//! inside the container's namespace through a socket opened there with `setns`.

pub mod spec;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use overlay_api::{
    AgentInfo,
    agent::{AddEndpoint, EndpointInfo, GcRequest, LocalClient, LocalError, Released},
};
pub use overlay_netlink::{Address, Address6, Error as NetlinkError, Link, Route, Route6};
use overlay_netlink::{Handle, Netns};
use spec::{Attached, AttachedIp, CniError, Command, Env, Request, code};

/// An interface and its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    pub link: Link,
    pub addrs: Vec<Address>,
    pub addrs6: Vec<Address6>,
}

/// The container side's IPv4 configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setup4 {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    /// Routed via `gateway` (on-link).
    pub route: Ipv4Network,
    pub gateway: Ipv4Addr,
}

/// The container side's IPv6 configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setup6 {
    pub ip: Ipv6Addr,
    pub prefix: u8,
    pub route: Ipv6Network,
    pub gateway: Ipv6Addr,
    /// The interface's only link-local address (from its MAC, as the agent admits it).
    pub link_local: Ipv6Addr,
}

/// Per-interface IPv6 sysctls of a container's interface on an IPv6 network, set before it comes
/// up: IPv6 on; no router advertisements heeded, no addresses of its own from them nor a
/// link-local one from the kernel (`addr_gen_mode` 1), no duplicate-address detection (the
/// agent hands out each address once; DAD would only delay it).
pub const CONTAINER_IPV6_SYSCTLS: &[(&str, &str)] = &[
    ("disable_ipv6", "0"),
    ("addr_gen_mode", "1"),
    ("accept_ra", "0"),
    ("autoconf", "0"),
    ("accept_dad", "0"),
    ("accept_redirects", "0"),
];

/// What the plugin needs from the system. [`System`] is the real thing; tests substitute.
/// `netns` is the path of a network namespace (`CNI_NETNS`); `None` is the plugin's own.
pub trait Host {
    fn overlay(&self, socket: &Path) -> Result<AgentInfo, LocalError>;
    fn add_endpoint(&self, socket: &Path, req: &AddEndpoint) -> Result<EndpointInfo, LocalError>;
    fn release(&self, socket: &Path, attachment: &str) -> Result<Released, LocalError>;
    fn endpoints(&self, socket: &Path) -> Result<Vec<EndpointInfo>, LocalError>;
    fn gc(&self, socket: &Path, req: &GcRequest) -> Result<Vec<Released>, LocalError>;
    /// The interface `ifname` in `netns`, or `None` if there is none.
    fn iface(&self, netns: Option<&str>, ifname: &str) -> Result<Option<Iface>, NetlinkError>;
    /// The IPv4 routes of the main table in `netns`.
    fn routes(&self, netns: Option<&str>) -> Result<Vec<Route>, NetlinkError>;
    /// The IPv6 routes of the main table in `netns`.
    fn routes6(&self, netns: Option<&str>) -> Result<Vec<Route6>, NetlinkError>;
    /// Creates the pair (a veth, or a netkit pair with `device`): `host_veth` here (and up),
    /// `ifname` in the namespace `netns`.
    fn add_veth(
        &self,
        device: overlay_netlink::ContainerDevice,
        host_veth: &str,
        ifname: &str,
        mtu: u32,
        netns: &str,
    ) -> Result<(), NetlinkError>;
    /// Deletes an interface of the plugin's namespace; `false` if there was none.
    fn del_link(&self, name: &str) -> Result<bool, NetlinkError>;
    /// Gives `ifname` in `netns` its addresses (and, with IPv6, its link-local address and
    /// [`CONTAINER_IPV6_SYSCTLS`]), brings it up and routes each family's route via its gateway
    /// (on-link).
    fn configure(
        &self,
        netns: &str,
        ifname: &str,
        v4: Option<Setup4>,
        v6: Option<Setup6>,
    ) -> Result<(), NetlinkError>;
    fn path_exists(&self, path: &str) -> bool;
}

/// The real system: the agent's Unix socket and rtnetlink (a socket opened inside the
/// container's namespace for the container side).
pub struct System;

fn netlink_in(netns: Option<&str>) -> Result<Handle, NetlinkError> {
    match netns {
        Some(ns) => Handle::in_netns(&Netns::open(ns)?),
        None => Handle::new(),
    }
}

impl Host for System {
    fn overlay(&self, socket: &Path) -> Result<AgentInfo, LocalError> {
        LocalClient::new(socket).overlay()
    }
    fn add_endpoint(&self, socket: &Path, req: &AddEndpoint) -> Result<EndpointInfo, LocalError> {
        LocalClient::new(socket).add_endpoint(req)
    }
    fn release(&self, socket: &Path, attachment: &str) -> Result<Released, LocalError> {
        LocalClient::new(socket).release(attachment)
    }
    fn endpoints(&self, socket: &Path) -> Result<Vec<EndpointInfo>, LocalError> {
        LocalClient::new(socket).endpoints()
    }
    fn gc(&self, socket: &Path, req: &GcRequest) -> Result<Vec<Released>, LocalError> {
        LocalClient::new(socket).gc(req)
    }
    fn iface(&self, netns: Option<&str>, ifname: &str) -> Result<Option<Iface>, NetlinkError> {
        let mut nl = netlink_in(netns)?;
        let link = match nl.link(ifname) {
            Ok(l) => l,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let addrs = nl.addresses(Some(link.ifindex))?;
        // A kernel (or namespace) without IPv6 has none to list.
        let addrs6 = nl.addresses6(Some(link.ifindex)).unwrap_or_default();
        Ok(Some(Iface {
            link,
            addrs,
            addrs6,
        }))
    }
    fn routes(&self, netns: Option<&str>) -> Result<Vec<Route>, NetlinkError> {
        netlink_in(netns)?.routes()
    }
    fn routes6(&self, netns: Option<&str>) -> Result<Vec<Route6>, NetlinkError> {
        Ok(netlink_in(netns)?.routes6().unwrap_or_default())
    }
    fn add_veth(
        &self,
        device: overlay_netlink::ContainerDevice,
        host_veth: &str,
        ifname: &str,
        mtu: u32,
        netns: &str,
    ) -> Result<(), NetlinkError> {
        let ns = Netns::open(netns)?;
        let mut nl = Handle::new()?;
        nl.add_container_pair(device, host_veth, ifname, mtu, Some(&ns))?;
        nl.set_up(host_veth)
    }
    fn del_link(&self, name: &str) -> Result<bool, NetlinkError> {
        Handle::new()?.del_link_if_exists(name)
    }
    fn configure(
        &self,
        netns: &str,
        ifname: &str,
        v4: Option<Setup4>,
        v6: Option<Setup6>,
    ) -> Result<(), NetlinkError> {
        let ns = Netns::open(netns)?;
        let mut nl = Handle::in_netns(&ns)?;
        let ifindex = nl.link(ifname)?.ifindex;
        if v6.is_some() {
            // /proc/sys/net is the namespace of the thread that opens it.
            ns.run(|| {
                CONTAINER_IPV6_SYSCTLS.iter().try_for_each(|(knob, value)| {
                    overlay_netlink::write_sysctl(&format!("net/ipv6/conf/{ifname}/{knob}"), value)
                })
            })??;
        }
        if let Some(c) = v4 {
            nl.add_address(Address {
                ifindex,
                ip: c.ip,
                prefix_len: c.prefix,
            })?;
        }
        if let Some(c) = v6 {
            nl.add_address6(Address6::new(ifindex, c.link_local, 64))?;
            nl.add_address6(Address6::new(ifindex, c.ip, c.prefix))?;
        }
        nl.set_up(ifname)?;
        if let Some(c) = v4 {
            nl.add_route(
                Route::new(c.route.network(), c.route.prefix(), ifindex)
                    .gateway(c.gateway)
                    .onlink(),
            )?;
        }
        if let Some(c) = v6 {
            nl.add_route6(
                Route6::new(c.route.network(), c.route.prefix(), ifindex)
                    .gateway(c.gateway)
                    .onlink(),
            )?;
        }
        Ok(())
    }
    fn path_exists(&self, path: &str) -> bool {
        Path::new(path).exists()
    }
}

/// The outcome of one invocation: what goes to stdout and the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub code: i32,
}

/// One plugin invocation: environment and stdin in, stdout and exit code out. Never panics on
/// any input; errors are CNI error objects with a non-zero exit code.
pub fn run(host: &dyn Host, env: &Env, stdin: &[u8]) -> Output {
    let version = spec::answer_version(stdin);
    if env.command.as_deref() == Some("VERSION") {
        return Output {
            stdout: spec::version_result(stdin),
            code: 0,
        };
    }
    let result = spec::parse_request(env, stdin).and_then(|req| match req.command {
        Command::Add => add(host, &req),
        Command::Del => del(host, &req).map(|()| String::new()),
        Command::Check => check(host, &req).map(|()| String::new()),
        Command::Status => status(host, &req).map(|()| String::new()),
        Command::Gc => gc(host, &req).map(|()| String::new()),
        Command::Version => Ok(spec::version_result(stdin)),
    });
    match result {
        Ok(stdout) => Output { stdout, code: 0 },
        Err(e) => Output {
            stdout: e.to_json(&version),
            code: 1,
        },
    }
}

/// Maps a failure of the agent API to a CNI error.
fn agent_error(e: LocalError) -> CniError {
    match e {
        LocalError::Unreachable { .. } => CniError::new(
            code::TRY_AGAIN,
            "the ebpf-overlay agent is not running or not answering: try again later",
        )
        .details(e.to_string()),
        LocalError::Rejected {
            status: 503,
            message,
        } => CniError::new(
            code::TRY_AGAIN,
            format!("the ebpf-overlay agent is not ready: {message}"),
        ),
        LocalError::Rejected {
            status: 507,
            message,
        } => CniError::new(code::EXHAUSTED, message),
        LocalError::Rejected {
            status: 409,
            message,
        } => CniError::new(code::ADDRESS_CONFLICT, message),
        LocalError::Rejected {
            status: 400,
            message,
        } => CniError::new(code::NETWORK_UNAVAILABLE, message),
        other => CniError::new(code::AGENT_FAILED, other.to_string()),
    }
}

fn iface_error(msg: String) -> CniError {
    CniError::new(code::INTERFACE, msg)
}

fn mac_string(link: &Link) -> String {
    overlay_api::MacAddr(link.mac).to_string()
}

fn add(host: &dyn Host, req: &Request) -> Result<String, CniError> {
    let (id, netns, ifname) = (
        req.container_id.as_deref().unwrap_or_default(),
        req.netns.as_deref().unwrap_or_default(),
        req.ifname.as_deref().unwrap_or_default(),
    );
    let conf = &req.conf;
    if !host.path_exists(netns) {
        return Err(CniError::new(
            code::CONTAINER_UNKNOWN,
            format!("network namespace {netns} does not exist"),
        ));
    }
    // The agent first: when it is down or lacks the network, nothing is created.
    let me = host.overlay(&conf.agent_socket).map_err(agent_error)?;
    let ov = me
        .overlays
        .iter()
        .find(|o| o.info.name == conf.network)
        .ok_or_else(|| {
            CniError::new(
                code::NETWORK_UNAVAILABLE,
                format!("network {} is not configured on this agent", conf.network),
            )
        })?;
    if ov.subnet.is_none() && ov.subnet6.is_none() {
        return Err(CniError::new(
            code::NETWORK_UNAVAILABLE,
            format!("this agent has no subnet on network {}", conf.network),
        ));
    }
    // A container on several networks: the first interface takes the default routes, the others
    // route their network's subnets.
    let has_default = host
        .routes(Some(netns))
        .map_err(|e| iface_error(e.to_string()))?
        .iter()
        .any(Route::is_default);
    let has_default6 = host
        .routes6(Some(netns))
        .map_err(|e| iface_error(e.to_string()))?
        .iter()
        .any(Route6::is_default);
    let route = match ov.subnet {
        Some(_) => Some(spec::route_for(has_default, ov.info.subnet)?),
        None => None,
    };
    let route6 = match ov.subnet6 {
        Some(_) => Some(spec::route_for6(has_default6, ov.info.subnet6)?),
        None => None,
    };
    if host
        .iface(Some(netns), ifname)
        .map_err(|e| iface_error(e.to_string()))?
        .is_some()
    {
        return Err(iface_error(format!(
            "interface {ifname} already exists in {netns}"
        )));
    }
    let host_veth = spec::host_veth_name(id, ifname);
    // A veth left by an earlier, interrupted ADD of this attachment.
    host.del_link(&host_veth)
        .map_err(|e| iface_error(e.to_string()))?;
    host.add_veth(conf.container_device, &host_veth, ifname, conf.mtu, netns)
        .map_err(|e| iface_error(e.to_string()))?;
    let attachment = spec::attachment_id(id, ifname);
    let cleanup = |release: bool| {
        if release {
            let _ = host.release(&conf.agent_socket, &attachment);
        }
        let _ = host.del_link(&host_veth);
    };
    let result = (|| {
        let lookup = |ns: Option<&str>, name: &str| {
            host.iface(ns, name)
                .map_err(|e| iface_error(e.to_string()))?
                .ok_or_else(|| {
                    iface_error(format!("{name} not found in {}", ns.unwrap_or("the host")))
                })
        };
        let host_link = lookup(None, &host_veth)?.link;
        let container_link = lookup(Some(netns), ifname)?.link;
        if host_link.mac == [0; 6] || container_link.mac == [0; 6] {
            return Err(iface_error("veth without a MAC address".into()));
        }
        let mac = overlay_api::MacAddr(container_link.mac);
        Ok((mac_string(&host_link), mac.to_string(), mac))
    })();
    let (host_mac, container_mac, mac) = match result {
        Ok(r) => r,
        Err(e) => {
            cleanup(false);
            return Err(e);
        }
    };
    let ep = match host.add_endpoint(
        &conf.agent_socket,
        &AddEndpoint {
            network: conf.network.clone(),
            ip: req.ip,
            ip6: req.ip6,
            host_veth: host_veth.clone(),
            container_mac: mac,
            half: conf.half,
            attachment: Some(attachment.clone()),
        },
    ) {
        Ok(ep) => ep,
        Err(e) => {
            // An unreachable agent may still have acted: release by attachment too.
            cleanup(true);
            return Err(agent_error(e));
        }
    };
    let setup = (|| -> Result<(Option<Setup4>, Option<Setup6>), CniError> {
        let missing = |ip: IpAddr| {
            CniError::new(
                code::AGENT_FAILED,
                format!("the agent reported no subnet for {ip}"),
            )
        };
        let mut v4 = None;
        let mut v6 = None;
        for a in ep.addresses() {
            match (a.ip, a.subnet, a.gateway) {
                (IpAddr::V4(ip), Some(IpNetwork::V4(range)), Some(IpAddr::V4(gateway))) => {
                    let route = route.ok_or_else(|| missing(a.ip))?;
                    v4 = Some(Setup4 {
                        ip,
                        prefix: range.prefix(),
                        route,
                        gateway,
                    });
                }
                (IpAddr::V6(ip), Some(IpNetwork::V6(range)), Some(IpAddr::V6(gateway))) => {
                    let route = route6.ok_or_else(|| missing(a.ip))?;
                    v6 = Some(Setup6 {
                        ip,
                        prefix: range.prefix(),
                        route,
                        gateway,
                        link_local: overlay_api::subnets::link_local(mac.0),
                    });
                }
                _ => return Err(missing(a.ip)),
            }
        }
        Ok((v4, v6))
    })();
    let (v4, v6) = match setup {
        Ok(s) => s,
        Err(e) => {
            cleanup(true);
            return Err(e);
        }
    };
    if let Err(e) = host.configure(netns, ifname, v4, v6) {
        cleanup(true);
        return Err(iface_error(format!("configuring {ifname} in {netns}: {e}")));
    }
    let ips = v4
        .map(|c| AttachedIp {
            ip: IpAddr::V4(c.ip),
            prefix: c.prefix,
            gateway: IpAddr::V4(c.gateway),
            route: IpNetwork::V4(c.route),
        })
        .into_iter()
        .chain(v6.map(|c| AttachedIp {
            ip: IpAddr::V6(c.ip),
            prefix: c.prefix,
            gateway: IpAddr::V6(c.gateway),
            route: IpNetwork::V6(c.route),
        }))
        .collect();
    Ok(spec::add_result(
        &conf.cni_version,
        &Attached {
            host_veth,
            host_mac,
            ifname: ifname.to_owned(),
            container_mac,
            netns: netns.to_owned(),
            ips,
        },
    ))
}

fn del(host: &dyn Host, req: &Request) -> Result<(), CniError> {
    let (id, ifname) = (
        req.container_id.as_deref().unwrap_or_default(),
        req.ifname.as_deref().unwrap_or_default(),
    );
    let host_veth = spec::host_veth_name(id, ifname);
    let released = host.release(&req.conf.agent_socket, &spec::attachment_id(id, ifname));
    // The veth goes in any case (with it, the container side); a missing one is fine.
    let _ = host.del_link(&host_veth);
    let released = released.map_err(agent_error)?;
    if let Some(other) = released.host_veth.filter(|v| *v != host_veth) {
        let _ = host.del_link(&other);
    }
    Ok(())
}

fn check(host: &dyn Host, req: &Request) -> Result<(), CniError> {
    let (id, netns, ifname) = (
        req.container_id.as_deref().unwrap_or_default(),
        req.netns.as_deref().unwrap_or_default(),
        req.ifname.as_deref().unwrap_or_default(),
    );
    let conf = &req.conf;
    let attachment = spec::attachment_id(id, ifname);
    let host_veth = spec::host_veth_name(id, ifname);
    let eps = host.endpoints(&conf.agent_socket).map_err(agent_error)?;
    let mut diffs: Vec<String> = vec![];
    let Some(ep) = eps
        .iter()
        .find(|e| e.attachment.as_deref() == Some(attachment.as_str()))
    else {
        return Err(CniError::new(
            code::CHECK_FAILED,
            format!("the agent has no endpoint for {attachment}"),
        ));
    };
    if ep.network != conf.network {
        diffs.push(format!(
            "endpoint is on network {}, config says {}",
            ep.network, conf.network
        ));
    }
    if ep.host_veth != host_veth {
        diffs.push(format!(
            "endpoint uses host veth {:?}, expected {host_veth}",
            ep.host_veth
        ));
    }
    match host.iface(None, &host_veth) {
        Ok(None) => diffs.push(format!("host veth {host_veth} is missing")),
        Err(e) => diffs.push(format!("host veth {host_veth}: {e}")),
        Ok(Some(i)) => {
            if i.link.ifindex != ep.ifindex {
                diffs.push(format!(
                    "host veth {host_veth} is not the interface the endpoint is wired to"
                ));
            }
        }
    }
    // Every address of the endpoint, both families.
    let want_addrs: Vec<String> = ep
        .addresses()
        .iter()
        .filter_map(|a| a.subnet.map(|s| format!("{}/{}", a.ip, s.prefix())))
        .collect();
    if let Some(prev) = &conf.prev_result {
        let prev_addrs: Vec<&str> = prev["ips"]
            .as_array()
            .map(|l| l.iter().filter_map(|i| i["address"].as_str()).collect())
            .unwrap_or_default();
        for p in &prev_addrs {
            if !want_addrs.iter().any(|w| w == p) {
                diffs.push(format!(
                    "prevResult address {p} is not one of the agent's {want_addrs:?}"
                ));
            }
        }
        if !prev_addrs.is_empty() && prev_addrs.len() != want_addrs.len() {
            diffs.push(format!(
                "prevResult has {} addresses, the agent {} ({want_addrs:?})",
                prev_addrs.len(),
                want_addrs.len()
            ));
        }
    }
    if !host.path_exists(netns) {
        diffs.push(format!("network namespace {netns} is gone"));
    } else {
        let mut container_ifindex = None;
        match host.iface(Some(netns), ifname) {
            Ok(None) => diffs.push(format!("interface {ifname} is missing in {netns}")),
            Err(e) => diffs.push(format!("interface {ifname} in {netns}: {e}")),
            Ok(Some(i)) => {
                container_ifindex = Some(i.link.ifindex);
                if overlay_api::MacAddr(i.link.mac) != ep.container_mac {
                    diffs.push(format!(
                        "{ifname} has MAC {}, the endpoint {}",
                        mac_string(&i.link),
                        ep.container_mac
                    ));
                }
                if i.link.mtu != conf.mtu {
                    diffs.push(format!(
                        "{ifname} has MTU {}, config says {}",
                        i.link.mtu, conf.mtu
                    ));
                }
                let addrs: Vec<String> = i
                    .addrs
                    .iter()
                    .map(|a| format!("{}/{}", a.ip, a.prefix_len))
                    .chain(
                        i.addrs6
                            .iter()
                            .map(|a| format!("{}/{}", a.ip, a.prefix_len)),
                    )
                    .collect();
                for want in &want_addrs {
                    if !addrs.contains(want) {
                        diffs.push(format!("{ifname} lacks address {want} (has {addrs:?})"));
                    }
                }
                if let Some(v6) = ep.ipv6() {
                    let ll = overlay_api::subnets::link_local(ep.container_mac.0);
                    if !i.addrs6.iter().any(|a| a.ip == ll) {
                        diffs.push(format!(
                            "{ifname} lacks its link-local address {ll} (the agent admits {v6}'s neighbour discovery from it)"
                        ));
                    }
                }
            }
        }
        let routes = host.routes(Some(netns)).unwrap_or_default();
        let routes6 = host.routes6(Some(netns)).unwrap_or_default();
        // The default route of each family, or the network's subnet for a container's further
        // interface.
        for a in ep.addresses() {
            let ok = match a.gateway {
                Some(IpAddr::V4(gw)) => routes.iter().any(|r| {
                    r.gateway == Some(gw) && r.oif.is_some() && r.oif == container_ifindex
                }),
                Some(IpAddr::V6(gw)) => routes6.iter().any(|r| {
                    r.gateway == Some(gw) && r.oif.is_some() && r.oif == container_ifindex
                }),
                None => false,
            };
            if !ok {
                let gw = a.gateway.map(|g| g.to_string()).unwrap_or_default();
                diffs.push(format!(
                    "no default route (nor a subnet route) via {gw} dev {ifname}"
                ));
            }
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            code::CHECK_FAILED,
            format!("{attachment}: {}", diffs.join("; ")),
        ))
    }
}

fn status(host: &dyn Host, req: &Request) -> Result<(), CniError> {
    let net = &req.conf.network;
    let me = host.overlay(&req.conf.agent_socket).map_err(|e| {
        CniError::new(
            code::NOT_AVAILABLE,
            format!("the ebpf-overlay agent is not available: {e}"),
        )
    })?;
    match me.overlays.iter().find(|o| o.info.name == *net) {
        Some(o) if o.subnet.is_some() || o.subnet6.is_some() => Ok(()),
        Some(_) => Err(CniError::new(
            code::NOT_AVAILABLE,
            format!("this agent has no subnet on network {net}"),
        )),
        None => Err(CniError::new(
            code::NOT_AVAILABLE,
            format!("network {net} is not configured on this agent"),
        )),
    }
}

fn gc(host: &dyn Host, req: &Request) -> Result<(), CniError> {
    let keep = req.conf.valid_attachments.clone().unwrap_or_default();
    let released = host
        .gc(
            &req.conf.agent_socket,
            &GcRequest {
                network: req.conf.network.clone(),
                keep,
            },
        )
        .map_err(agent_error)?;
    for r in released {
        if let Some(v) = r.host_veth {
            let _ = host.del_link(&v);
        }
        if let Some((id, ifname)) = r.attachment.split_once('/') {
            let _ = host.del_link(&spec::host_veth_name(id, ifname));
        }
    }
    Ok(())
}
