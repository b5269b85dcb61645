//! Docker Engine on the overlay: the agent serves Docker's remote network driver and IPAM
//! driver (libnetwork's legacy plugin protocol: `/Plugin.Activate`, `/NetworkDriver.*`,
//! `/IpamDriver.*`, JSON over HTTP on a Unix socket Docker finds as
//! `/run/docker/plugins/<name>.sock`), and keeps one Docker network per overlay network.
//!
//! - Pools are the **docker half** of this agent's subnet of each network (DC/OS gave Docker
//!   the second half), addresses come from the agent's IPAM (so Docker and CNI containers never
//!   collide), the gateway is the half's first host. A network with `subnet6` has an IPv6 pool
//!   too (`docker network create --ipv6`: the docker half of the agent's IPv6 subnet, pool id
//!   `<network>/ipv6`), and its containers get an IPv6 address and gateway beside the IPv4 ones.
//! - A Docker container's interface is wired exactly like a CNI container's: a veth pair whose
//!   host side gets the `from_container` program and an endpoint map entry
//!   ([`crate::agent::Agent::add_endpoint`] with the attachment `docker/<endpoint id>`).
//! - Docker never re-sends `CreateNetwork` (nor anything but Activate and the endpoints of
//!   `--restart=always` containers after its own restart), so networks and endpoints persist in
//!   `docker.json` in the state directory, written like the IPAM's state.
//! - With `--docker-host`, the agent creates (or adopts) the Docker network of every overlay
//!   network it has a subnet on, named like it, and removes the ones it created for networks
//!   that are gone.

use std::{
    collections::BTreeMap,
    fs::File,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use axum::{
    Router,
    body::Bytes,
    extract::{Path as UrlPath, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use ipnetwork::IpNetwork;
use overlay_api::{
    MacAddr,
    agent::{AddEndpoint, Family, Half},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{endpoints::EndpointError, ipam, runtime::Handle};

/// Name of the state file inside the state directory.
pub const STATE_FILE: &str = "docker.json";
/// Docker's option and label that mark what the agent made.
pub const NETWORK_OPTION: &str = "network";
pub const MARKER_LABEL: &str = "generated_by";
const GATEWAY_REQUEST: &str = "com.docker.network.gateway";
const MAC_OPTION: &str = "com.docker.network.endpoint.macaddress";
const GENERIC_OPTIONS: &str = "com.docker.network.generic";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerEndpoint {
    pub network_id: String,
    pub network: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address on an `--ipv6` network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    pub mac: MacAddr,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    version: u32,
    /// Docker network id -> overlay network.
    networks: BTreeMap<String, String>,
    /// Docker endpoint id -> what it is.
    endpoints: BTreeMap<String, DockerEndpoint>,
}

pub struct Driver {
    agent: Handle,
    path: PathBuf,
    stored: Mutex<Stored>,
    mtu: u32,
}

/// A driver call that failed: Docker shows `Err` to the user.
#[derive(Debug)]
struct DriverError(String);

impl<E: std::fmt::Display> From<E> for DriverError {
    fn from(e: E) -> DriverError {
        DriverError(e.to_string())
    }
}

type Answer = Result<Value, DriverError>;

fn bad(msg: impl Into<String>) -> DriverError {
    DriverError(msg.into())
}

/// The endpoint's attachment in the IPAM.
pub fn attachment_of(endpoint_id: &str) -> String {
    format!("docker/{endpoint_id}")
}

/// Host and (until Docker moves it) container side of an endpoint's veth pair.
pub fn veth_names(endpoint_id: &str) -> (String, String) {
    let short: String = endpoint_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(11)
        .collect();
    (format!("eod{short}"), format!("eoc{short}"))
}

/// A locally administered, unicast MAC derived from the address (as Docker's bridge does).
pub fn mac_for(ip: Ipv4Addr) -> MacAddr {
    let o = ip.octets();
    MacAddr([0x02, 0x42, o[0], o[1], o[2], o[3]])
}

/// `--mac-address` arrives as a Go `[]byte` in the endpoint options: base64 of the 6 bytes.
pub fn decode_mac_option(v: &Value) -> Result<Option<MacAddr>, String> {
    let Some(s) = v.as_str().filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    if let Ok(m) = s.parse::<MacAddr>() {
        return Ok(Some(m));
    }
    let bytes = base64_decode(s).ok_or_else(|| format!("{MAC_OPTION} {s:?} is not base64"))?;
    let mac: [u8; 6] = bytes
        .try_into()
        .map_err(|_| format!("{MAC_OPTION} {s:?} is not 6 bytes"))?;
    Ok(Some(MacAddr(mac)))
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = vec![];
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&bytes[1..3]),
            2 => out.push(bytes[1]),
            _ => return None,
        }
    }
    Some(out)
}

/// Removes a veth this driver made (with its peer); a missing one is fine.
fn del_veth(name: &str) {
    if let Err(e) = overlay_netlink::Handle::new().and_then(|mut nl| nl.del_link_if_exists(name)) {
        tracing::warn!(veth = name, "removing veth: {e}");
    }
}

fn str_field<'a>(v: &'a Value, k: &str) -> Result<&'a str, DriverError> {
    v.get(k)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad(format!("{k} is missing")))
}

fn cidr_ip(s: &str) -> Result<Ipv4Addr, DriverError> {
    s.split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| bad(format!("{s:?} is not an IPv4 address")))
}

fn cidr_any(s: &str) -> Result<IpAddr, DriverError> {
    s.split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| bad(format!("{s:?} is not an IP address")))
}

/// The pool id of `network`'s pool of `family` (the IPv4 one is the network's name, as before
/// IPv6).
fn pool_id(network: &str, family: Family) -> String {
    match family {
        Family::Ipv4 => network.to_owned(),
        Family::Ipv6 => format!("{network}/ipv6"),
    }
}

/// The network and family of a pool id.
fn parse_pool_id(id: &str) -> (&str, Family) {
    match id.strip_suffix("/ipv6") {
        Some(network) => (network, Family::Ipv6),
        None => (id, Family::Ipv4),
    }
}

impl Driver {
    pub fn open(agent: Handle, state_dir: &Path, mtu: u32) -> anyhow::Result<Driver> {
        let path = state_dir.join(STATE_FILE);
        let stored = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("parsing the Docker driver state {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored {
                version: 1,
                ..Default::default()
            },
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Driver {
            agent,
            path,
            stored: Mutex::new(stored),
            mtu,
        })
    }

    fn persist(&self, s: &Stored) -> anyhow::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        {
            let mut f =
                File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(&serde_json::to_vec_pretty(s)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
        Ok(())
    }

    /// The docker half of this agent's subnet of `network` in `family`.
    fn pool_of(&self, network: &str, family: Family) -> Result<IpNetwork, DriverError> {
        let subnet = match family {
            Family::Ipv4 => self.agent.blocking_subnet_of(network)?.map(IpNetwork::V4),
            Family::Ipv6 => self.agent.blocking_subnet6_of(network)?.map(IpNetwork::V6),
        };
        let subnet = subnet.ok_or_else(|| {
            bad(format!(
                "network {network:?} is not configured on this agent (or has no {} subnet here)",
                match family {
                    Family::Ipv4 => "IPv4",
                    Family::Ipv6 => "IPv6",
                }
            ))
        })?;
        Ok(ipam::half_range(subnet, Half::Docker))
    }

    /// The overlay network a pool stands for: the `network` option, else the network whose
    /// docker half (of `family`) the pool is.
    fn network_of(
        &self,
        options: &Value,
        pool: Option<&str>,
        family: Family,
    ) -> Result<String, DriverError> {
        if let Some(n) = options.get(NETWORK_OPTION).and_then(Value::as_str) {
            return Ok(n.to_owned());
        }
        let pool: Option<IpNetwork> = pool.filter(|p| !p.is_empty()).map(str::parse).transpose()?;
        if let Some(pool) = pool {
            let me = self.agent.blocking_me()?;
            for o in me.iter().flat_map(|m| &m.overlays) {
                let subnet = match family {
                    Family::Ipv4 => o.subnet.map(IpNetwork::V4),
                    Family::Ipv6 => o.subnet6.map(IpNetwork::V6),
                };
                if subnet.is_some_and(|s| ipam::half_range(s, Half::Docker) == pool) {
                    return Ok(o.info.name.clone());
                }
            }
            return Err(bad(format!(
                "pool {pool} is no overlay network's docker half on this agent"
            )));
        }
        Err(bad(format!(
            "which overlay network? give -o {NETWORK_OPTION}=<name> (and --ipam-opt {NETWORK_OPTION}=<name>)"
        )))
    }

    fn handle(&self, call: &str, req: &Value) -> Answer {
        match call {
            "Plugin.Activate" => Ok(json!({"Implements": ["NetworkDriver", "IpamDriver"]})),
            "NetworkDriver.GetCapabilities" => {
                Ok(json!({"Scope": "local", "ConnectivityScope": "global"}))
            }
            "NetworkDriver.CreateNetwork" => self.create_network(req),
            "NetworkDriver.DeleteNetwork" => {
                let id = str_field(req, "NetworkID")?;
                let mut s = self.stored.lock().unwrap();
                if s.networks.remove(id).is_some() {
                    self.persist(&s)?;
                }
                Ok(json!({}))
            }
            "NetworkDriver.CreateEndpoint" => self.create_endpoint(req),
            "NetworkDriver.DeleteEndpoint" => self.delete_endpoint(req),
            "NetworkDriver.EndpointOperInfo" => Ok(json!({"Value": {}})),
            "NetworkDriver.Join" => self.join(req),
            "NetworkDriver.Leave" => {
                let id = str_field(req, "EndpointID")?;
                let ep = self.stored.lock().unwrap().endpoints.get(id).cloned();
                if let Some(ep) = ep {
                    self.agent.blocking_unwire_endpoint(IpAddr::V4(ep.ip))?;
                }
                Ok(json!({}))
            }
            "NetworkDriver.ProgramExternalConnectivity"
            | "NetworkDriver.RevokeExternalConnectivity"
            | "NetworkDriver.DiscoverNew"
            | "NetworkDriver.DiscoverDelete"
            | "NetworkDriver.AllocateNetwork"
            | "NetworkDriver.FreeNetwork" => Ok(json!({})),
            "IpamDriver.GetCapabilities" => {
                Ok(json!({"RequiresMACAddress": false, "RequiresRequestReplay": false}))
            }
            "IpamDriver.GetDefaultAddressSpaces" => Ok(json!({
                "LocalDefaultAddressSpace": "ebpf-overlay",
                "GlobalDefaultAddressSpace": "ebpf-overlay",
            })),
            "IpamDriver.RequestPool" => {
                let family = if req.get("V6").and_then(Value::as_bool) == Some(true) {
                    Family::Ipv6
                } else {
                    Family::Ipv4
                };
                let options = req.get("Options").cloned().unwrap_or(Value::Null);
                let asked = req.get("Pool").and_then(Value::as_str);
                let network = self.network_of(&options, asked, family)?;
                let pool = self.pool_of(&network, family)?;
                if let Some(a) = asked.filter(|a| !a.is_empty())
                    && a.parse::<IpNetwork>().ok() != Some(pool)
                {
                    return Err(bad(format!(
                        "pool {a} asked for network {network}, whose docker half here is {pool}"
                    )));
                }
                if let Some(sub) = req
                    .get("SubPool")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                {
                    return Err(bad(format!("sub-pools ({sub}) are not supported")));
                }
                Ok(
                    json!({"PoolID": pool_id(&network, family), "Pool": pool.to_string(), "Data": {}}),
                )
            }
            "IpamDriver.ReleasePool" => Ok(json!({})),
            "IpamDriver.RequestAddress" => self.request_address(req),
            "IpamDriver.ReleaseAddress" => {
                let (network, family) = parse_pool_id(str_field(req, "PoolID")?);
                let addr = cidr_any(str_field(req, "Address")?)?;
                let pool = self.pool_of(network, family)?;
                if addr == ipam::gateway_of(pool) {
                    return Ok(json!({}));
                }
                match self.agent.blocking_remove_endpoint(addr) {
                    Ok(()) | Err(EndpointError::NotFound(_)) => Ok(json!({})),
                    Err(e) => Err(e.into()),
                }
            }
            _ => Err(bad(format!("unknown call {call}"))),
        }
    }

    fn create_network(&self, req: &Value) -> Answer {
        let id = str_field(req, "NetworkID")?;
        let generic = req
            .get("Options")
            .and_then(|o| o.get(GENERIC_OPTIONS))
            .cloned()
            .unwrap_or(Value::Null);
        let pool_in = |data: &str| {
            req.get(data)
                .and_then(|d| d.get(0))
                .and_then(|d| d.get("Pool"))
                .and_then(Value::as_str)
        };
        let pool = pool_in("IPv4Data");
        let network = self.network_of(&generic, pool, Family::Ipv4)?;
        let docker_half = self.pool_of(&network, Family::Ipv4)?;
        if let Some(p) = pool
            && p.parse::<IpNetwork>().ok() != Some(docker_half)
        {
            return Err(bad(format!(
                "network {network}: use this agent's docker half {docker_half} as the subnet (got {p}; --ipam-driver ebpf-overlay does it)"
            )));
        }
        if let Some(p6) = pool_in("IPv6Data") {
            let docker_half6 = self.pool_of(&network, Family::Ipv6)?;
            if p6.parse::<IpNetwork>().ok() != Some(docker_half6) {
                return Err(bad(format!(
                    "network {network}: use this agent's IPv6 docker half {docker_half6} as the IPv6 subnet (got {p6})"
                )));
            }
        }
        let mut s = self.stored.lock().unwrap();
        s.networks.insert(id.to_owned(), network.clone());
        self.persist(&s)?;
        tracing::info!(docker_network = %id, %network, "Docker network created");
        Ok(json!({}))
    }

    fn request_address(&self, req: &Value) -> Answer {
        let (network, family) = parse_pool_id(str_field(req, "PoolID")?);
        let pool = self.pool_of(network, family)?;
        let options = req.get("Options").cloned().unwrap_or(Value::Null);
        let gateway = ipam::gateway_of(pool);
        if options.get("RequestAddressType").and_then(Value::as_str) == Some(GATEWAY_REQUEST) {
            return Ok(json!({"Address": format!("{gateway}/{}", pool.prefix()), "Data": {}}));
        }
        let requested = req
            .get("Address")
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
            .map(cidr_any)
            .transpose()?;
        if let Some(r) = requested
            && !pool.contains(r)
        {
            return Err(bad(format!(
                "--ip {r} is outside this agent's docker half {pool}"
            )));
        }
        let ip = self
            .agent
            .blocking_reserve_address(network, family, Half::Docker, requested)?;
        Ok(json!({"Address": format!("{ip}/{}", pool.prefix()), "Data": {}}))
    }

    fn create_endpoint(&self, req: &Value) -> Answer {
        let nid = str_field(req, "NetworkID")?;
        let eid = str_field(req, "EndpointID")?;
        let network = self
            .stored
            .lock()
            .unwrap()
            .networks
            .get(nid)
            .cloned()
            .ok_or_else(|| {
                bad(format!(
                    "Docker network {nid} is not an ebpf-overlay network"
                ))
            })?;
        let iface = req.get("Interface").cloned().unwrap_or(Value::Null);
        let ip = cidr_ip(
            iface
                .get("Address")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    bad("Interface.Address is missing (use --ipam-driver ebpf-overlay)")
                })?,
        )?;
        let given_mac = match iface
            .get("MacAddress")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
        {
            Some(m) => Some(
                m.parse::<MacAddr>()
                    .map_err(|e| bad(format!("Interface.MacAddress {m:?}: {e}")))?,
            ),
            None => decode_mac_option(
                req.get("Options")
                    .and_then(|o| o.get(MAC_OPTION))
                    .unwrap_or(&Value::Null),
            )
            .map_err(bad)?,
        };
        let ip6 = iface
            .get("AddressIPv6")
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
            .map(|a| match cidr_any(a)? {
                IpAddr::V6(v6) => Ok(v6),
                IpAddr::V4(_) => Err(bad(format!("Interface.AddressIPv6 {a:?} is IPv4"))),
            })
            .transpose()?;
        let mac = given_mac.unwrap_or_else(|| mac_for(ip));
        self.agent
            .blocking_set_attachment(IpAddr::V4(ip), &attachment_of(eid))?;
        if let Some(ip6) = ip6 {
            self.agent
                .blocking_set_attachment(IpAddr::V6(ip6), &attachment_of(eid))?;
        }
        let mut s = self.stored.lock().unwrap();
        s.endpoints.insert(
            eid.to_owned(),
            DockerEndpoint {
                network_id: nid.to_owned(),
                network,
                ip,
                ip6,
                mac,
            },
        );
        self.persist(&s)?;
        // Docker wants an empty Interface back when it supplied the values itself.
        let has_mac = iface
            .get("MacAddress")
            .and_then(Value::as_str)
            .is_some_and(|m| !m.is_empty());
        Ok(if has_mac {
            json!({"Interface": {}})
        } else {
            json!({"Interface": {"MacAddress": mac.to_string()}})
        })
    }

    fn join(&self, req: &Value) -> Answer {
        let eid = str_field(req, "EndpointID")?;
        let ep = self
            .stored
            .lock()
            .unwrap()
            .endpoints
            .get(eid)
            .cloned()
            .ok_or_else(|| bad(format!("unknown endpoint {eid}")))?;
        let (host, peer) = veth_names(eid);
        // What an interrupted Join (or the previous dockerd) left.
        del_veth(&host);
        let mut nl = overlay_netlink::Handle::new()?;
        nl.add_veth(&host, &peer, self.mtu, None)?;
        let wired = (|| -> Result<(IpNetwork, Option<IpNetwork>), DriverError> {
            nl.set_mac(&peer, ep.mac.0)?;
            nl.set_up(&host)?;
            let pool = self.pool_of(&ep.network, Family::Ipv4)?;
            let pool6 = ep
                .ip6
                .map(|_| self.pool_of(&ep.network, Family::Ipv6))
                .transpose()?;
            self.agent.blocking_add_endpoint(AddEndpoint {
                network: ep.network.clone(),
                ip: Some(ep.ip),
                ip6: ep.ip6,
                host_veth: host.clone(),
                container_mac: ep.mac,
                half: Half::Docker,
                attachment: Some(attachment_of(eid)),
            })?;
            Ok((pool, pool6))
        })();
        let (pool, pool6) = match wired {
            Ok(p) => p,
            Err(e) => {
                del_veth(&host);
                return Err(e);
            }
        };
        tracing::info!(endpoint = %eid, ip = %ep.ip, ip6 = ?ep.ip6, veth = %host, "Docker endpoint joined");
        let mut answer = json!({
            "InterfaceName": {"SrcName": peer, "DstPrefix": "eth"},
            "Gateway": ipam::gateway_of(pool).to_string(),
            "DisableGatewayService": true,
            "StaticRoutes": [],
        });
        if let Some(pool6) = pool6 {
            answer["GatewayIPv6"] = json!(ipam::gateway_of(pool6).to_string());
        }
        Ok(answer)
    }

    fn delete_endpoint(&self, req: &Value) -> Answer {
        let eid = str_field(req, "EndpointID")?;
        let ep = self.stored.lock().unwrap().endpoints.get(eid).cloned();
        if let Some(ep) = &ep {
            self.agent.blocking_unwire_endpoint(IpAddr::V4(ep.ip))?;
        }
        let (host, _) = veth_names(eid);
        del_veth(&host);
        let mut s = self.stored.lock().unwrap();
        if s.endpoints.remove(eid).is_some() {
            self.persist(&s)?;
        }
        Ok(json!({}))
    }
}

async fn call(
    State(driver): State<Arc<Driver>>,
    UrlPath(call): UrlPath<String>,
    body: Bytes,
) -> Response {
    const KNOWN: &[&str] = &["Plugin.", "NetworkDriver.", "IpamDriver."];
    if !KNOWN.iter().any(|p| call.starts_with(p)) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let req: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return answer(Err(bad(format!("{call}: the body is not JSON: {e}")))),
        }
    };
    let d = driver.clone();
    let c = call.clone();
    let result = tokio::task::spawn_blocking(move || d.handle(&c, &req))
        .await
        .unwrap_or_else(|e| Err(bad(format!("{call}: {e}"))));
    if let Err(e) = &result {
        tracing::warn!(%call, "Docker driver call failed: {}", e.0);
    }
    answer(result)
}

fn answer(r: Answer) -> Response {
    let (status, body) = match r {
        Ok(v) => (StatusCode::OK, v),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, json!({"Err": e.0})),
    };
    (
        status,
        [(
            header::CONTENT_TYPE,
            "application/vnd.docker.plugins.v1.2+json",
        )],
        body.to_string(),
    )
        .into_response()
}

pub fn router(driver: Arc<Driver>) -> Router {
    Router::new()
        .route("/{call}", post(call))
        .with_state(driver)
}

/// Binds the plugin socket (replacing a stale one) and serves it.
pub async fn serve(
    driver: Arc<Driver>,
    socket: &Path,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("binding the Docker plugin socket {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "Docker network and IPAM driver listening");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(driver)).await {
            tracing::error!("Docker plugin socket: {e}");
        }
    }))
}

/// One request to dockerd's API.
fn docker_api(
    host: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut s = std::os::unix::net::UnixStream::connect(host)
        .with_context(|| format!("connecting to dockerd at {}", host.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(|b| b.to_string());
    let (status, out) = overlay_api::agent::http_exchange(
        &mut s,
        method,
        path,
        body.as_deref().map(str::as_bytes),
    )?;
    let v = serde_json::from_slice(&out).unwrap_or(Value::Null);
    Ok((status, v))
}

/// Creates or adopts the Docker network of every network this agent has a subnet on, and
/// removes those the agent created for networks that are gone. Returns the changes.
pub fn sync_docker_networks(
    agent: &Handle,
    driver: &Driver,
    host: &Path,
    plugin: &str,
) -> anyhow::Result<usize> {
    // Docker's networks always have an IPv4 pool: a network without IPv4 has no Docker network
    // (Docker 20.10 has no IPv6-only networks); a dual-stack one is created `--ipv6`.
    type Pools = (String, IpNetwork, Option<IpNetwork>);
    let wanted: Vec<Pools> = {
        agent
            .blocking_me()?
            .iter()
            .flat_map(|m| &m.overlays)
            .filter(|o| o.info.is_enabled())
            .filter_map(|o| {
                let half = |s| ipam::half_range(s, Half::Docker);
                o.subnet.map(|s| {
                    (
                        o.info.name.clone(),
                        half(IpNetwork::V4(s)),
                        o.subnet6.map(|s6| half(IpNetwork::V6(s6))),
                    )
                })
            })
            .collect()
    };
    let (status, list) = docker_api(host, "GET", "/networks", None)?;
    if status != 200 {
        bail!("listing Docker networks: HTTP {status}: {list}");
    }
    let existing: Vec<&Value> = list
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let mut changed = 0;
    for (name, pool, pool6) in &wanted {
        match existing.iter().find(|n| n["Name"] == name.as_str()) {
            Some(n) if n["Driver"] == plugin => {
                // Adopt: Docker never re-sends CreateNetwork, so learn its id.
                let id = n["Id"].as_str().unwrap_or_default().to_owned();
                let mut s = driver.stored.lock().unwrap();
                if !id.is_empty() && s.networks.get(&id) != Some(name) {
                    s.networks.insert(id, name.clone());
                    driver.persist(&s)?;
                    changed += 1;
                }
            }
            Some(n) => {
                tracing::warn!(network = %name, driver = %n["Driver"], "a Docker network of another driver has this name: left alone");
            }
            None => {
                let mut config = vec![
                    json!({"Subnet": pool.to_string(), "Gateway": ipam::gateway_of(*pool).to_string()}),
                ];
                if let Some(p6) = pool6 {
                    config.push(json!({"Subnet": p6.to_string(), "Gateway": ipam::gateway_of(*p6).to_string()}));
                }
                let body = json!({
                    "Name": name,
                    "Driver": plugin,
                    "CheckDuplicate": true,
                    "EnableIPv6": pool6.is_some(),
                    "Options": {NETWORK_OPTION: name},
                    "Labels": {MARKER_LABEL: crate::cni_conf::CNI_CONF_MARKER},
                    "IPAM": {
                        "Driver": plugin,
                        "Options": {NETWORK_OPTION: name},
                        "Config": config,
                    },
                });
                let (status, out) = docker_api(host, "POST", "/networks/create", Some(&body))?;
                if status != 201 && status != 200 {
                    bail!("creating Docker network {name}: HTTP {status}: {out}");
                }
                tracing::info!(network = %name, %pool, "Docker network created");
                changed += 1;
            }
        }
    }
    for n in &existing {
        let name = n["Name"].as_str().unwrap_or_default();
        let ours =
            n["Driver"] == plugin && n["Labels"][MARKER_LABEL] == crate::cni_conf::CNI_CONF_MARKER;
        if ours && !wanted.iter().any(|(w, _, _)| w == name) {
            let id = n["Id"].as_str().unwrap_or_default();
            let (status, out) = docker_api(host, "DELETE", &format!("/networks/{id}"), None)?;
            if status == 204 || status == 200 || status == 404 {
                tracing::info!(network = %name, "Docker network of a removed network deleted");
                changed += 1;
            } else {
                tracing::warn!(network = %name, "deleting Docker network: HTTP {status}: {out}");
            }
        }
    }
    Ok(changed)
}

/// Keeps Docker's networks in step, every `period` (dockerd may start after the agent).
pub fn follow_docker(
    agent: Handle,
    driver: Arc<Driver>,
    host: PathBuf,
    plugin: String,
    period: Duration,
) {
    std::thread::spawn(move || {
        let mut last_err = String::new();
        loop {
            if agent.blocking_me().is_ok_and(|me| me.is_some()) {
                match sync_docker_networks(&agent, &driver, &host, &plugin) {
                    Ok(_) => last_err.clear(),
                    Err(e) => {
                        let msg = format!("{e:#}");
                        if msg != last_err {
                            tracing::warn!("keeping Docker networks in step: {msg}");
                            last_err = msg;
                        }
                    }
                }
            }
            std::thread::sleep(period);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_options_are_base64_or_text() {
        // Go's json encoding of []byte{0x02,0x42,0x0a,0x00,0x00,0x05}
        let m = decode_mac_option(&json!("AkIKAAAF")).unwrap().unwrap();
        assert_eq!(m, MacAddr([0x02, 0x42, 0x0a, 0x00, 0x00, 0x05]));
        assert_eq!(
            decode_mac_option(&json!("02:42:0a:00:00:06")).unwrap(),
            Some(MacAddr([0x02, 0x42, 0x0a, 0x00, 0x00, 0x06]))
        );
        assert_eq!(decode_mac_option(&Value::Null).unwrap(), None);
        assert!(decode_mac_option(&json!("AkI=")).is_err(), "not 6 bytes");
        assert!(decode_mac_option(&json!("!!!!")).is_err());
    }

    #[test]
    fn names_fit_the_kernel_and_macs_are_local_unicast() {
        let (h, p) = veth_names("0123456789abcdef0123456789abcdef");
        assert_eq!(
            (h.as_str(), p.as_str()),
            ("eod0123456789a", "eoc0123456789a")
        );
        assert!(h.len() < 16);
        let m = mac_for("9.0.1.130".parse().unwrap());
        assert_eq!(m.0[0] & 0x03, 0x02);
        assert_eq!(attachment_of("abc"), "docker/abc");
    }
}
