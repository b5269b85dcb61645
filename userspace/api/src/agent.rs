//! The agent's local API: served on a Unix socket (reachable from any network namespace on the
//! host, so the CNI plugin and tools can use it), spoken here with a small synchronous client
//! (short-lived callers such as the CNI plugin need no async runtime).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use ipnetwork::{IpNetwork, Ipv6Network};

use crate::{AgentInfo, ErrorBody, MacAddr};

/// Default socket of the agent's local API.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/ebpf-overlay/agent.sock";

/// Body of `POST /overlay-agent/endpoints`: connect a container's veth to a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddEndpoint {
    /// Network name (`dcos`, ...).
    pub network: String,
    /// The container's address; must lie in this agent's subnet of the network. Absent: the
    /// agent's IPAM allocates one from `half`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// The container's IPv6 address on a network with `subnet6` (same rules as `ip`; absent:
    /// allocated from `half` of the agent's IPv6 subnet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// Host-side veth of the container, in the agent's network namespace.
    pub host_veth: String,
    /// MAC of the container's interface: the only source MAC it may send with.
    pub container_mac: MacAddr,
    /// Half of the agent's subnet to allocate from (when `ip` is absent).
    #[serde(default)]
    pub half: Half,
    /// Who owns the endpoint (CNI: `<container id>/<ifname>`): adding the same attachment again
    /// returns (or re-wires) its endpoint with the same address; release and GC go by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<String>,
}

/// The two halves of an agent's subnet of a network (DC/OS: Mesos/CNI and Docker).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Half {
    #[default]
    Cni,
    Docker,
}

impl Half {
    pub fn name(self) -> &'static str {
        match self {
            Half::Cni => "cni",
            Half::Docker => "docker",
        }
    }
}

/// A local endpoint as the agent reports it: one container interface, with one address per
/// family its network has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub network: String,
    /// The network's id (its key in the datapath's maps; not its VNI, which networks share).
    pub network_id: u32,
    /// The container's IPv4 address; its IPv6 address on a network with IPv6 only.
    pub ip: IpAddr,
    pub host_veth: String,
    pub ifindex: u32,
    pub container_mac: MacAddr,
    pub gateway_mac: MacAddr,
    /// The half of the agent's subnet holding `ip` (the container's on-link prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<IpNetwork>,
    /// The container's default gateway: the first host of `subnet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Owner of the endpoint, when it was added with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<String>,
    /// A dual-stack endpoint's IPv6 address (`ip` is then its IPv4 one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// The half of the agent's IPv6 subnet holding `ip6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<Ipv6Network>,
    /// The IPv6 gateway: the first host of `subnet6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<Ipv6Addr>,
}

/// One address of an endpoint with its on-link prefix and gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointAddress {
    pub ip: IpAddr,
    pub subnet: Option<IpNetwork>,
    pub gateway: Option<IpAddr>,
}

impl EndpointInfo {
    /// Every address of the endpoint, IPv4 first.
    pub fn addresses(&self) -> Vec<EndpointAddress> {
        let mut out = vec![EndpointAddress {
            ip: self.ip,
            subnet: self.subnet,
            gateway: self.gateway,
        }];
        if let Some(ip6) = self.ip6 {
            out.push(EndpointAddress {
                ip: IpAddr::V6(ip6),
                subnet: self.subnet6.map(IpNetwork::V6),
                gateway: self.gateway6.map(IpAddr::V6),
            });
        }
        out
    }

    /// The IPv4 address, if the endpoint has one.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        match self.ip {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        }
    }

    /// The IPv6 address (dual-stack or IPv6 only), if the endpoint has one.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        match self.ip {
            IpAddr::V6(ip) => Some(ip),
            IpAddr::V4(_) => self.ip6,
        }
    }

    /// The address of `family` with its prefix and gateway.
    pub fn address(&self, family: Family) -> Option<EndpointAddress> {
        self.addresses()
            .into_iter()
            .find(|a| Family::of(a.ip) == family)
    }
}

/// An address family, as the IPAM and metrics name it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

/// One line of `GET /overlay-agent/ipam`: the addresses of one half of this agent's subnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamUsage {
    pub network: String,
    /// The family of `subnet` (absent from older agents: IPv4).
    #[serde(default)]
    pub family: Family,
    /// The agent's subnet of the network (its IPv4 or IPv6 one).
    pub subnet: IpNetwork,
    pub half: Half,
    /// The half itself.
    pub range: IpNetwork,
    pub used: u32,
    /// Addresses left (an IPv6 half has more than 2^32; saturating).
    pub free: u64,
    pub allocations: Vec<IpamAllocation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamAllocation {
    pub ip: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<String>,
    pub host_veth: String,
}

/// What a release (`DELETE /overlay-agent/attachments/{id}`) or GC freed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    pub attachment: String,
    /// The address freed (the IPv4 one of a dual-stack attachment).
    pub ip: Option<IpAddr>,
    /// A dual-stack attachment's IPv6 address, freed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// Host veth the endpoint used (the caller removes it).
    pub host_veth: Option<String>,
}

/// Body of `POST /overlay-agent/gc`: release every attachment of `network` not in `keep`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcRequest {
    pub network: String,
    pub keep: Vec<String>,
}

/// Body of `GET /overlay-agent/status`: what the agent is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// This agent's allocation, once registered with a master.
    pub agent: Option<AgentInfo>,
    /// Master state revision last applied to the datapath.
    pub applied_revision: u64,
    /// Map entries added, changed and removed by reconciliation since start.
    pub map_updates: u64,
    pub pin_dir: String,
    /// Endpoints of disabled networks, kept (address, IPAM record) but out of the datapath
    /// until their network is enabled again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parked_endpoints: Vec<IpAddr>,
    /// Times the master changed this agent's VTEP or subnets under it since start.
    #[serde(default)]
    pub allocation_changes: u64,
    /// The last such change, said plainly (what changed, which endpoints are now outside this
    /// agent's subnets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_changed: Option<String>,
    /// Whether the master answered the agent's last request.
    #[serde(default)]
    pub master_reachable: bool,
    /// Where the applied state comes from: `master`, `saved` (the state last applied before a
    /// restart, used while no master answers) or `none`.
    #[serde(default)]
    pub state_source: String,
}

/// Errors of the local client; `Unreachable` means the agent is not running (CNI: try later).
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("agent API at {path} is unreachable: {source}")]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent answered {status}: {message}")]
    Rejected { status: u16, message: String },
    #[error("agent sent a malformed answer: {0}")]
    Malformed(String),
}

/// A synchronous HTTP/1.1 client over the agent's Unix socket.
#[derive(Debug, Clone)]
pub struct LocalClient {
    socket: PathBuf,
    timeout: Duration,
}

impl LocalClient {
    pub fn new(socket: impl AsRef<Path>) -> LocalClient {
        LocalClient {
            socket: socket.as_ref().to_owned(),
            timeout: Duration::from_secs(10),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// One request; returns status and body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), LocalError> {
        let unreachable = |source| LocalError::Unreachable {
            path: self.socket.clone(),
            source,
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(unreachable)?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(unreachable)?;
        http_exchange(&mut stream, method, path, body).map_err(|e| match e {
            ExchangeError::Io(source) => unreachable(source),
            ExchangeError::Malformed(m) => LocalError::Malformed(m),
        })
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, LocalError> {
        let (status, body) = self.request(method, path, body.as_deref())?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(LocalError::Rejected { status, message });
        }
        serde_json::from_slice(&body).map_err(|e| LocalError::Malformed(e.to_string()))
    }

    pub fn status(&self) -> Result<AgentStatus, LocalError> {
        self.call("GET", "/overlay-agent/status", None)
    }

    /// This agent's allocation in DC/OS `AgentInfo` shape.
    pub fn overlay(&self) -> Result<AgentInfo, LocalError> {
        self.call("GET", "/overlay-agent/overlay", None)
    }

    pub fn endpoints(&self) -> Result<Vec<EndpointInfo>, LocalError> {
        self.call("GET", "/overlay-agent/endpoints", None)
    }

    pub fn add_endpoint(&self, req: &AddEndpoint) -> Result<EndpointInfo, LocalError> {
        let body = serde_json::to_vec(req).map_err(|e| LocalError::Malformed(e.to_string()))?;
        self.call("POST", "/overlay-agent/endpoints", Some(body))
    }

    pub fn remove_endpoint(&self, ip: impl Into<IpAddr>) -> Result<(), LocalError> {
        let ip: IpAddr = ip.into();
        let (status, body) =
            self.request("DELETE", &format!("/overlay-agent/endpoints/{ip}"), None)?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(LocalError::Rejected {
                status,
                message: String::from_utf8_lossy(&body).into_owned(),
            })
        }
    }

    /// This agent's address usage by network and half.
    pub fn ipam(&self) -> Result<Vec<IpamUsage>, LocalError> {
        self.call("GET", "/overlay-agent/ipam", None)
    }

    /// Releases an attachment: removes its endpoint and frees its address. Releasing an unknown
    /// attachment succeeds with nothing released.
    pub fn release(&self, attachment: &str) -> Result<Released, LocalError> {
        self.call(
            "DELETE",
            &format!("/overlay-agent/attachments/{}", percent_encode(attachment)),
            None,
        )
    }

    /// Releases every attachment of `network` not in `keep`.
    pub fn gc(&self, req: &GcRequest) -> Result<Vec<Released>, LocalError> {
        let body = serde_json::to_vec(req).map_err(|e| LocalError::Malformed(e.to_string()))?;
        self.call("POST", "/overlay-agent/gc", Some(body))
    }

    /// Sets the timeout of each request (default 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> LocalClient {
        self.timeout = timeout;
        self
    }

    /// Drops counted in the last minute, by network and reason.
    pub fn recent_drops(&self) -> Result<crate::monitor::RecentDrops, LocalError> {
        self.call("GET", "/overlay-agent/drops", None)
    }

    /// Follows the drop monitor (a long-lived stream; see [`crate::monitor`]).
    pub fn monitor(
        &self,
        filter: &crate::monitor::MonitorFilter,
    ) -> Result<crate::monitor::MonitorStream, LocalError> {
        crate::monitor::MonitorStream::open(&self.socket, filter)
    }

    pub fn metrics(&self) -> Result<String, LocalError> {
        let (status, body) = self.request("GET", "/metrics", None)?;
        if status != 200 {
            return Err(LocalError::Rejected {
                status,
                message: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters (one path segment).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Failure of one [`http_exchange`].
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("malformed HTTP answer: {0}")]
    Malformed(String),
}

/// One HTTP/1.1 request with `Connection: close` over any byte stream (a Unix socket to the
/// agent, a TCP connection opened inside a lab namespace, ...): returns status and body.
pub fn http_exchange<S: std::io::Read + std::io::Write>(
    stream: &mut S,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), ExchangeError> {
    http_exchange_with_headers(stream, method, path, body, &[])
}

/// [`http_exchange`] with extra request headers (e.g. `("Authorization", "Bearer ...")`).
/// A stream that ends without a TLS close_notify after a complete answer is accepted.
pub fn http_exchange_with_headers<S: std::io::Read + std::io::Write>(
    stream: &mut S,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> Result<(u16, Vec<u8>), ExchangeError> {
    let body = body.unwrap_or_default();
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: ebpf-overlay\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e.into()),
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), ExchangeError> {
    let malformed = |what: &str| ExchangeError::Malformed(what.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| malformed("no header end"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| malformed("header not UTF-8"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| malformed("no status code"))?;
    let mut body = raw[split + 4..].to_vec();
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body).ok_or_else(|| malformed("bad chunked body"))?;
    }
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(
            std::str::from_utf8(&data[..line_end])
                .ok()?
                .split(';')
                .next()?
                .trim(),
            16,
        )
        .ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_answers() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (200, b"{}".to_vec()));
        let chunked = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (404, b"abcde".to_vec()));
        assert!(parse_response(b"garbage").is_err());
    }
}
