//! `ebpf-overlay`, the CNI plugin of ebpf-overlay.
//!
//! ADD creates a veth pair (the container side named `CNI_IFNAME` in `CNI_NETNS`, the host side
//! `eo<12 hex>` in the agent's namespace), has the local agent allocate an address and wire the
//! host side to the eBPF datapath (program attached, endpoint map entry written) before it
//! answers, then gives the container its address, MTU and default route (on a container's
//! further networks, a route to that network's subnet instead: one interface per network). DEL releases the
//! address and the endpoint and removes the veth, and is idempotent. CHECK compares interface,
//! address, route and the agent's endpoint with what ADD set up. STATUS and GC (1.1.0) ask the
//! agent. See [`spec`] for the config fields and error codes.
//!
//! The work is split so that everything but the system calls is pure: [`run`] drives one
//! invocation against a [`Host`] (the agent API and `ip`), [`System`] is the real one.

pub mod spec;

use std::path::Path;

use overlay_api::{
    AgentInfo,
    agent::{AddEndpoint, EndpointInfo, GcRequest, LocalClient, LocalError, Released},
};
use spec::{Attached, CniError, Command, Env, Request, code};

/// What the plugin needs from the system. [`System`] is the real thing; tests substitute.
pub trait Host {
    fn overlay(&self, socket: &Path) -> Result<AgentInfo, LocalError>;
    fn add_endpoint(&self, socket: &Path, req: &AddEndpoint) -> Result<EndpointInfo, LocalError>;
    fn release(&self, socket: &Path, attachment: &str) -> Result<Released, LocalError>;
    fn endpoints(&self, socket: &Path) -> Result<Vec<EndpointInfo>, LocalError>;
    fn gc(&self, socket: &Path, req: &GcRequest) -> Result<Vec<Released>, LocalError>;
    /// Runs `ip` (iproute2) with `args`, inside the network namespace at `netns` when given, with
    /// `stdin` (for `-batch -`). Returns stdout, or stderr as the error.
    fn ip(&self, netns: Option<&str>, args: &[&str], stdin: Option<&str>)
    -> Result<String, String>;
    fn path_exists(&self, path: &str) -> bool;
}

/// The real system: the agent's Unix socket and iproute2 (`nsenter --net` for the container).
pub struct System;

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
    fn ip(
        &self,
        netns: Option<&str>,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, String> {
        use std::{io::Write as _, process::Stdio};
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = std::process::Command::new("nsenter");
                c.arg(format!("--net={ns}")).arg("ip");
                c
            }
            None => std::process::Command::new("ip"),
        };
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("running ip: {e}"))?;
        if let Some(input) = stdin
            && let Some(mut pipe) = child.stdin.take()
        {
            pipe.write_all(input.as_bytes())
                .map_err(|e| format!("writing to ip: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("running ip: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "`ip {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
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

fn link_json(host: &dyn Host, netns: Option<&str>, ifname: &str) -> Option<serde_json::Value> {
    let out = host
        .ip(netns, &["-j", "addr", "show", "dev", ifname], None)
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v.get(0).cloned()
}

fn mac_of(link: &serde_json::Value) -> Option<String> {
    link.get("address")?.as_str().map(str::to_owned)
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
    if ov.subnet.is_none() {
        return Err(CniError::new(
            code::NETWORK_UNAVAILABLE,
            format!("this agent has no subnet on network {}", conf.network),
        ));
    }
    // A container on several networks: the first interface takes the default route, the others
    // route their network's subnet.
    let has_default = host
        .ip(Some(netns), &["-j", "route", "show", "default"], None)
        .ok()
        .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
        .and_then(|v| v.as_array().map(|a| !a.is_empty()))
        .unwrap_or(false);
    let route = spec::route_for(has_default, ov.info.subnet)?;
    if link_json(host, Some(netns), ifname).is_some() {
        return Err(iface_error(format!(
            "interface {ifname} already exists in {netns}"
        )));
    }
    let host_veth = spec::host_veth_name(id, ifname);
    // A veth left by an earlier, interrupted ADD of this attachment.
    let _ = host.ip(None, &["link", "del", &host_veth], None);
    let mtu = conf.mtu.to_string();
    host.ip(
        None,
        &[
            "link", "add", &host_veth, "mtu", &mtu, "type", "veth", "peer", "name", ifname, "mtu",
            &mtu, "netns", netns,
        ],
        None,
    )
    .map_err(iface_error)?;
    let attachment = spec::attachment_id(id, ifname);
    let cleanup = |release: bool| {
        if release {
            let _ = host.release(&conf.agent_socket, &attachment);
        }
        let _ = host.ip(None, &["link", "del", &host_veth], None);
    };
    let result = (|| {
        host.ip(None, &["link", "set", &host_veth, "up"], None)
            .map_err(iface_error)?;
        let host_link = link_json(host, None, &host_veth)
            .ok_or_else(|| iface_error(format!("{host_veth} vanished")))?;
        let container_link = link_json(host, Some(netns), ifname)
            .ok_or_else(|| iface_error(format!("{ifname} not found in {netns}")))?;
        let (Some(host_mac), Some(container_mac)) = (mac_of(&host_link), mac_of(&container_link))
        else {
            return Err(iface_error("veth without a MAC address".into()));
        };
        let mac: overlay_api::MacAddr = container_mac
            .parse()
            .map_err(|e| iface_error(format!("container MAC {container_mac}: {e}")))?;
        Ok((host_mac, container_mac, mac))
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
    let (Some(range), Some(gateway)) = (ep.subnet, ep.gateway) else {
        cleanup(true);
        return Err(CniError::new(
            code::AGENT_FAILED,
            format!("the agent reported no subnet for {}", ep.ip),
        ));
    };
    let batch = format!(
        "addr add {ip}/{prefix} dev {ifname}\nlink set {ifname} up\nroute add {route} via {gateway} dev {ifname} onlink\n",
        ip = ep.ip,
        prefix = range.prefix()
    );
    if let Err(e) = host.ip(Some(netns), &["-batch", "-"], Some(&batch)) {
        cleanup(true);
        return Err(iface_error(e));
    }
    Ok(spec::add_result(
        &conf.cni_version,
        &Attached {
            host_veth,
            host_mac,
            ifname: ifname.to_owned(),
            container_mac,
            netns: netns.to_owned(),
            ip: ep.ip,
            prefix: range.prefix(),
            gateway,
            route,
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
    let _ = host.ip(None, &["link", "del", &host_veth], None);
    let released = released.map_err(agent_error)?;
    if let Some(other) = released.host_veth.filter(|v| *v != host_veth) {
        let _ = host.ip(None, &["link", "del", &other], None);
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
    match link_json(host, None, &host_veth) {
        None => diffs.push(format!("host veth {host_veth} is missing")),
        Some(l) => {
            if l.get("ifindex").and_then(|i| i.as_u64()) != Some(ep.ifindex as u64) {
                diffs.push(format!(
                    "host veth {host_veth} is not the interface the endpoint is wired to"
                ));
            }
        }
    }
    let want_addr = ep.subnet.map(|s| format!("{}/{}", ep.ip, s.prefix()));
    if let Some(prev) = &conf.prev_result {
        let prev_addr = prev["ips"][0]["address"].as_str();
        if prev_addr.is_some() && prev_addr != want_addr.as_deref() {
            diffs.push(format!(
                "prevResult address {} differs from the agent's {}",
                prev_addr.unwrap_or_default(),
                want_addr.as_deref().unwrap_or("?")
            ));
        }
    }
    if !host.path_exists(netns) {
        diffs.push(format!("network namespace {netns} is gone"));
    } else {
        match link_json(host, Some(netns), ifname) {
            None => diffs.push(format!("interface {ifname} is missing in {netns}")),
            Some(l) => {
                let mac = mac_of(&l).unwrap_or_default();
                if mac.parse::<overlay_api::MacAddr>().ok() != Some(ep.container_mac) {
                    diffs.push(format!(
                        "{ifname} has MAC {mac}, the endpoint {}",
                        ep.container_mac
                    ));
                }
                if l.get("mtu").and_then(|m| m.as_u64()) != Some(conf.mtu as u64) {
                    diffs.push(format!(
                        "{ifname} has MTU {}, config says {}",
                        l["mtu"], conf.mtu
                    ));
                }
                let addrs: Vec<String> = l["addr_info"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter(|i| i["family"] == "inet")
                            .map(|i| {
                                format!("{}/{}", i["local"].as_str().unwrap_or(""), i["prefixlen"])
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                if let Some(want) = &want_addr
                    && !addrs.contains(want)
                {
                    diffs.push(format!("{ifname} lacks address {want} (has {addrs:?})"));
                }
            }
        }
        let routes = host
            .ip(Some(netns), &["-j", "route", "show", "dev", ifname], None)
            .ok()
            .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
            .unwrap_or_default();
        let gw = ep.gateway.map(|g| g.to_string()).unwrap_or_default();
        // The default route, or the network's subnet for a container's further interface.
        let ok = routes.as_array().is_some_and(|rs| {
            rs.iter()
                .any(|r| r["gateway"].as_str() == Some(gw.as_str()))
        });
        if !ok {
            diffs.push(format!(
                "no default route (nor a subnet route) via {gw} dev {ifname}"
            ));
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
        Some(o) if o.subnet.is_some() => Ok(()),
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
            let _ = host.ip(None, &["link", "del", &v], None);
        }
        if let Some((id, ifname)) = r.attachment.split_once('/') {
            let _ = host.ip(
                None,
                &["link", "del", &spec::host_veth_name(id, ifname)],
                None,
            );
        }
    }
    Ok(())
}
