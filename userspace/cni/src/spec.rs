//! The CNI contract, as pure functions: the environment and config a runtime hands over, the
//! results and errors it gets back, shaped per spec version. No I/O here.
//!
//! Network configuration (`type: "ebpf-overlay"`):
//!
//! | field | meaning | default |
//! |---|---|---|
//! | `cniVersion` | `0.1.0`, `0.2.0`, `0.3.0`, `0.3.1`, `0.4.0`, `1.0.0` or `1.1.0` | `0.2.0` (DC/OS's Mesos configs carry none) |
//! | `name` | CNI network name | required |
//! | `network` | overlay network on the agent (`dcos`, ...) | `name` |
//! | `agent_socket` | the agent's API socket (absolute path) | `/run/ebpf-overlay/agent.sock` |
//! | `mtu` | container interface MTU (552..=9000) | 1420 |
//! | `half` | `cni` (first half of the agent subnet) or `docker` (second) | `cni` |
//! | `container_device` | the pair to create: `veth` or `netkit` (kernel 6.7+, `CONFIG_NETKIT`) | `veth` |
//!
//! A static address may be requested with `CNI_ARGS` `IP=a.b.c.d` (or `IP=a.b.c.d,fd01::5`,
//! one per family), `runtimeConfig.ips` (capability `ips`), `args.cni.ips` or, from Mesos'
//! `network/cni` isolator, the task's `NetworkInfo.ip_addresses`
//! (`args["org.apache.mesos"]["network_info"]`); it must be a usable address of this agent's
//! subnet of its family.
//!
//! A container gets one address per family its network has (IPv4, IPv6, or both). Results are
//! shaped per version: 0.1.0/0.2.0 (and configs without `cniVersion`) get the `ip4` and `ip6`
//! objects Mesos parses, 0.3.x/0.4.0 `interfaces`/`ips` with `ips[].version` (`"4"`, `"6"`),
//! 1.x without it. CHECK exists from 0.4.0 on, STATUS and GC from 1.1.0 on.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use serde_json::{Value, json};

pub const SUPPORTED_VERSIONS: &[&str] = &[
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];
pub const LATEST: &str = "1.1.0";
/// The version of a config that names none: libcni and Mesos read such results as 0.1/0.2.
pub const IMPLICIT_VERSION: &str = "0.2.0";

/// The three result layouts the spec has had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultShape {
    /// 0.1.0, 0.2.0: `ip4 {ip, gateway, routes}`, `ip6`, `dns`.
    Ip4,
    /// 0.3.0 .. 0.4.0: `interfaces`, `ips[] {version, address, gateway, interface}`, `routes`.
    IpsVersioned,
    /// 1.0.0 on: as 0.4.0 without `ips[].version`.
    Ips,
}

pub fn result_shape(version: &str) -> ResultShape {
    match version {
        "0.1.0" | "0.2.0" => ResultShape::Ip4,
        v if v.starts_with("0.") => ResultShape::IpsVersioned,
        _ => ResultShape::Ips,
    }
}

/// Whether `version` knows `command` (CHECK came with 0.4.0, STATUS and GC with 1.1.0).
fn version_has(version: &str, command: Command) -> bool {
    match command {
        Command::Check => !matches!(version, "0.1.0" | "0.2.0" | "0.3.0" | "0.3.1"),
        Command::Status | Command::Gc => version == "1.1.0",
        _ => true,
    }
}

/// What `ebpf-overlay` prints (to stderr) when run without `CNI_COMMAND`, as the reference
/// plugins do.
pub fn about(plugin_version: &str) -> String {
    format!(
        "ebpf-overlay CNI plugin v{plugin_version}: attaches containers to an ebpf-overlay network through the local overlay-agent\n\
         CNI protocol versions supported: {}\n",
        SUPPORTED_VERSIONS.join(", ")
    )
}
pub const DEFAULT_MTU: u32 = 1420;

/// CNI error codes (spec) and ours (100+).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const CONTAINER_UNKNOWN: u32 = 3;
    pub const BAD_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const UNDECODABLE_CONFIG: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS: the plugin cannot service ADD requests.
    pub const NOT_AVAILABLE: u32 = 50;
    /// No free address in the requested half of the agent's subnet.
    pub const EXHAUSTED: u32 = 100;
    /// The requested address is taken, or the attachment already has another.
    pub const ADDRESS_CONFLICT: u32 = 101;
    /// The agent has no such network (or no subnet on it), or rejected the request.
    pub const NETWORK_UNAVAILABLE: u32 = 102;
    /// The agent failed internally or answered something unexpected.
    pub const AGENT_FAILED: u32 = 103;
    /// CHECK found differences.
    pub const CHECK_FAILED: u32 = 104;
    /// Creating or configuring the interfaces failed.
    pub const INTERFACE: u32 = 105;
}

/// A CNI error object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    pub fn to_json(&self, version: &str) -> String {
        let mut v = json!({"cniVersion": version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v.to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return None,
        })
    }
}

/// The CNI_* environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl Env {
    /// From `(name, value)` pairs; values that are not UTF-8 are given as `None` (and make the
    /// variable count as invalid).
    pub fn from_vars<I: IntoIterator<Item = (String, Option<String>)>>(
        vars: I,
    ) -> Result<Env, CniError> {
        let mut env = Env::default();
        for (k, v) in vars {
            let slot = match k.as_str() {
                "CNI_COMMAND" => &mut env.command,
                "CNI_CONTAINERID" => &mut env.container_id,
                "CNI_NETNS" => &mut env.netns,
                "CNI_IFNAME" => &mut env.ifname,
                "CNI_ARGS" => &mut env.args,
                "CNI_PATH" => &mut env.path,
                _ => continue,
            };
            match v {
                Some(v) => *slot = Some(v),
                None => return Err(CniError::new(code::BAD_ENV, format!("{k} is not UTF-8"))),
            }
        }
        Ok(env)
    }
}

/// The validated network configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub network: String,
    pub agent_socket: PathBuf,
    pub mtu: u32,
    pub half: overlay_api::agent::Half,
    /// The device pair ADD creates.
    pub container_device: overlay_netlink::ContainerDevice,
    /// Static addresses from `runtimeConfig.ips` and `args.cni.ips` (and Mesos' IPv4 ones).
    pub ips: Vec<Ipv4Addr>,
    /// Static IPv6 addresses from `runtimeConfig.ips` and `args.cni.ips`.
    pub ips6: Vec<Ipv6Addr>,
    pub prev_result: Option<Value>,
    /// GC: attachments to keep (`cni.dev/attachments`), as `<container id>/<ifname>`.
    pub valid_attachments: Option<Vec<String>>,
    /// The task's `NetworkInfo`, when Mesos' `network/cni` isolator calls.
    pub mesos: Option<MesosNetworkInfo>,
}

/// The parts of Mesos' `NetworkInfo` (protobuf as JSON, snake_case) the plugin reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MesosNetworkInfo {
    pub name: Option<String>,
    /// `labels.labels[{key, value}]`, in order (a label without value has an empty one).
    pub labels: Vec<(String, String)>,
    /// Requested IPv4 addresses (`ip_addresses[].ip_address` with protocol IPv4 or none);
    /// entries without an address ask for any, IPv6 ones are not ours.
    pub ip_addresses: Vec<Ipv4Addr>,
}

/// Reads `args["org.apache.mesos"]["network_info"]` (absent: `None`).
fn parse_mesos(obj: &serde_json::Map<String, Value>) -> Result<Option<MesosNetworkInfo>, CniError> {
    let invalid = |m: String| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("args.org.apache.mesos.network_info: {m}"),
        )
    };
    let Some(ni) = obj
        .get("args")
        .and_then(|a| a.get("org.apache.mesos"))
        .and_then(|m| m.get("network_info"))
        .filter(|v| !v.is_null())
    else {
        return Ok(None);
    };
    let Some(ni) = ni.as_object() else {
        return Err(invalid(format!("must be an object, not {ni}")));
    };
    let mut out = MesosNetworkInfo::default();
    match ni.get("name") {
        None | Some(Value::Null) => {}
        Some(Value::String(n)) => out.name = Some(n.clone()),
        Some(other) => return Err(invalid(format!("name must be a string, not {other}"))),
    }
    if let Some(labels) = ni.get("labels").filter(|v| !v.is_null()) {
        let list = labels.get("labels").unwrap_or(&Value::Null);
        let items = match list {
            Value::Null => &vec![],
            Value::Array(items) => items,
            other => {
                return Err(invalid(format!(
                    "labels.labels must be a list, not {other}"
                )));
            }
        };
        for l in items {
            let key = l.get("key").and_then(Value::as_str);
            let value = match l.get("value") {
                None | Some(Value::Null) => Some(""),
                Some(v) => v.as_str(),
            };
            match (key, value) {
                (Some(k), Some(v)) => out.labels.push((k.to_owned(), v.to_owned())),
                _ => return Err(invalid(format!("label {l} needs a string key and value"))),
            }
        }
    }
    match ni.get("ip_addresses") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for a in items {
                let protocol = match a.get("protocol") {
                    None | Some(Value::Null) => "IPv4",
                    Some(p) => p.as_str().ok_or_else(|| {
                        invalid(format!("ip_addresses: protocol {p} is not a string"))
                    })?,
                };
                if protocol == "IPv6" {
                    continue;
                }
                if protocol != "IPv4" {
                    return Err(invalid(format!(
                        "ip_addresses: unknown protocol {protocol:?}"
                    )));
                }
                match a.get("ip_address") {
                    None | Some(Value::Null) => {}
                    Some(Value::String(s)) => {
                        let ip = parse_ip(s).ok_or_else(|| {
                            invalid(format!("ip_addresses: {s:?} is not an IPv4 address"))
                        })?;
                        if !out.ip_addresses.contains(&ip) {
                            out.ip_addresses.push(ip);
                        }
                    }
                    Some(other) => {
                        return Err(invalid(format!(
                            "ip_addresses: ip_address {other} is not a string"
                        )));
                    }
                }
            }
        }
        Some(other) => return Err(invalid(format!("ip_addresses must be a list, not {other}"))),
    }
    Ok(Some(out))
}

/// The version to answer errors with: the config's when it names one we speak, the implicit
/// 0.2.0 when a config object names none, else the latest.
pub fn answer_version(stdin: &[u8]) -> String {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(stdin) else {
        return LATEST.to_owned();
    };
    match obj.get("cniVersion") {
        None | Some(Value::Null) => IMPLICIT_VERSION.to_owned(),
        Some(v) => v
            .as_str()
            .filter(|v| SUPPORTED_VERSIONS.contains(v))
            .unwrap_or(LATEST)
            .to_owned(),
    }
}

/// Network names as the master accepts them (at most 13 characters, letters, digits, `-`, `_`).
fn valid_network_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 13
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn parse_ip(s: &str) -> Option<Ipv4Addr> {
    s.split('/').next()?.parse().ok()
}

/// Decodes (code 6) and validates (codes 1, 7) the configuration on stdin.
pub fn parse_config(stdin: &[u8]) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::UNDECODABLE_CONFIG,
            "cannot decode the network configuration",
        )
        .details(e.to_string())
    })?;
    let Some(obj) = v.as_object() else {
        return Err(CniError::new(
            code::UNDECODABLE_CONFIG,
            "the network configuration is not a JSON object",
        ));
    };
    let invalid = |m: String| CniError::new(code::INVALID_CONFIG, m);
    let string = |k: &str| -> Result<Option<String>, CniError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(invalid(format!("{k} must be a string, not {other}"))),
        }
    };
    let cni_version = string("cniVersion")?.unwrap_or_else(|| IMPLICIT_VERSION.to_owned());
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CNI version {cni_version:?} is not supported (supported: {})",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let name = string("name")?.ok_or_else(|| invalid("name is missing".into()))?;
    if name.is_empty() {
        return Err(invalid("name is empty".into()));
    }
    let network = string("network")?.unwrap_or_else(|| name.clone());
    if !valid_network_name(&network) {
        return Err(invalid(format!(
            "network {network:?}: at most 13 letters, digits, '-' or '_'"
        )));
    }
    let agent_socket = PathBuf::from(
        string("agent_socket")?
            .unwrap_or_else(|| overlay_api::agent::DEFAULT_AGENT_SOCKET.to_owned()),
    );
    if !agent_socket.is_absolute() {
        return Err(invalid(format!(
            "agent_socket {} must be an absolute path",
            agent_socket.display()
        )));
    }
    let mtu = match obj.get("mtu") {
        None | Some(Value::Null) => DEFAULT_MTU,
        Some(m) => m
            .as_u64()
            .filter(|m| (552..=9000).contains(m))
            .ok_or_else(|| invalid(format!("mtu {m} must be an integer in 552..=9000")))?
            as u32,
    };
    let half = match string("half")?.as_deref() {
        None | Some("cni") => overlay_api::agent::Half::Cni,
        Some("docker") => overlay_api::agent::Half::Docker,
        Some(other) => {
            return Err(invalid(format!(
                "half {other:?} must be \"cni\" or \"docker\""
            )));
        }
    };
    let container_device = match string("container_device")? {
        None => overlay_netlink::ContainerDevice::Veth,
        Some(d) => d
            .parse()
            .map_err(|e: String| invalid(format!("container_device: {e}")))?,
    };
    let mut ips = vec![];
    let mut ips6: Vec<Ipv6Addr> = vec![];
    let ip_lists = [
        obj.get("runtimeConfig").and_then(|r| r.get("ips")),
        obj.get("args")
            .and_then(|a| a.get("cni"))
            .and_then(|c| c.get("ips")),
    ];
    for list in ip_lists.into_iter().flatten() {
        let Some(items) = list.as_array() else {
            return Err(invalid(format!("ips must be a list, not {list}")));
        };
        for item in items {
            let s = item
                .as_str()
                .ok_or_else(|| invalid(format!("ips: {item} is not a string")))?;
            if s.contains(':') {
                let ip6 = s
                    .split('/')
                    .next()
                    .and_then(|a| a.parse::<Ipv6Addr>().ok())
                    .ok_or_else(|| invalid(format!("ips: {s:?} is not an address")))?;
                if !ips6.contains(&ip6) {
                    ips6.push(ip6);
                }
                continue;
            }
            let ip = parse_ip(s).ok_or_else(|| invalid(format!("ips: {s:?} is not an address")))?;
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    let mesos = parse_mesos(obj)?;
    if let Some(m) = &mesos {
        if let Some(n) = m.name.as_deref().filter(|n| *n != name) {
            return Err(invalid(format!(
                "args.org.apache.mesos.network_info: name {n:?} is not this network ({name:?})"
            )));
        }
        for ip in &m.ip_addresses {
            if !ips.contains(ip) {
                ips.push(*ip);
            }
        }
    }
    if ips.len() > 1 {
        return Err(invalid(format!(
            "ips: one IPv4 address per attachment, got {ips:?}"
        )));
    }
    if ips6.len() > 1 {
        return Err(invalid(format!(
            "ips: one IPv6 address per attachment, got {ips6:?}"
        )));
    }
    let valid_attachments = match obj.get("cni.dev/attachments") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let mut out = vec![];
            for a in items {
                let id = a.get("containerID").and_then(Value::as_str);
                let ifname = a.get("ifname").and_then(Value::as_str);
                match (id, ifname) {
                    (Some(id), Some(ifname)) => out.push(attachment_id(id, ifname)),
                    _ => {
                        return Err(invalid(format!(
                            "cni.dev/attachments: {a} lacks containerID or ifname"
                        )));
                    }
                }
            }
            Some(out)
        }
        Some(other) => {
            return Err(invalid(format!(
                "cni.dev/attachments must be a list, not {other}"
            )));
        }
    };
    Ok(NetConf {
        cni_version,
        name,
        network,
        agent_socket,
        mtu,
        half,
        container_device,
        ips,
        ips6,
        prev_result: obj.get("prevResult").cloned().filter(|v| !v.is_null()),
        valid_attachments,
        mesos,
    })
}

/// `CNI_ARGS` (`K=V;K2=V2`): the requested addresses (`IP`, one per family, comma-separated),
/// if any. Unknown keys are ignored.
pub fn parse_cni_args(
    args: Option<&str>,
) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), CniError> {
    let Some(args) = args.filter(|a| !a.is_empty()) else {
        return Ok((None, None));
    };
    let mut ip = None;
    let mut ip6 = None;
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            CniError::new(
                code::BAD_ENV,
                format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
            )
        })?;
        if k == "IP" {
            for one in v.split(',') {
                let bad = || {
                    CniError::new(
                        code::BAD_ENV,
                        format!("CNI_ARGS: IP={v:?} is not an IPv4 or IPv6 address"),
                    )
                };
                match one.split('/').next().unwrap_or_default().parse::<IpAddr>() {
                    Ok(IpAddr::V4(a)) if ip.is_none() => ip = Some(a),
                    Ok(IpAddr::V6(a)) if ip6.is_none() => ip6 = Some(a),
                    _ => return Err(bad()),
                }
            }
        }
    }
    Ok((ip, ip6))
}

/// What the agent knows an attachment as.
pub fn attachment_id(container_id: &str, ifname: &str) -> String {
    format!("{container_id}/{ifname}")
}

/// The host-side veth: `eo` + 12 hex digits of a hash (FNV-1a 64) of container id and ifname.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id
        .bytes()
        .chain(std::iter::once(0))
        .chain(ifname.bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("eo{:012x}", h >> 16)
}

/// Interface names the kernel accepts.
pub fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 16
        && s != "."
        && s != ".."
        && !s
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

/// Container ids per the spec: non-empty, alphanumerics plus `-`, `_`, `.`.
pub fn valid_container_id(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A validated request: the command with what it needs from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub conf: NetConf,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    /// The requested static address (config or `CNI_ARGS`).
    pub ip: Option<Ipv4Addr>,
    /// The requested static IPv6 address.
    pub ip6: Option<Ipv6Addr>,
}

/// Checks the environment for `command` and parses the config (VERSION is handled before).
pub fn parse_request(env: &Env, stdin: &[u8]) -> Result<Request, CniError> {
    let cmd_s = env
        .command
        .as_deref()
        .ok_or_else(|| CniError::new(code::BAD_ENV, "CNI_COMMAND is not set"))?;
    let command = Command::parse(cmd_s)
        .ok_or_else(|| CniError::new(code::BAD_ENV, format!("unknown CNI_COMMAND {cmd_s:?}")))?;
    let conf = parse_config(stdin)?;
    if !version_has(&conf.cni_version, command) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{cmd_s} is not part of CNI version {} (config's cniVersion)",
                conf.cni_version
            ),
        ));
    }
    let needs = |v: &Option<String>, name: &str| -> Result<String, CniError> {
        v.clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| CniError::new(code::BAD_ENV, format!("{name} is not set")))
    };
    let (mut container_id, mut netns, mut ifname) = (None, None, None);
    match command {
        Command::Add | Command::Check => {
            container_id = Some(needs(&env.container_id, "CNI_CONTAINERID")?);
            netns = Some(needs(&env.netns, "CNI_NETNS")?);
            ifname = Some(needs(&env.ifname, "CNI_IFNAME")?);
        }
        Command::Del => {
            container_id = Some(needs(&env.container_id, "CNI_CONTAINERID")?);
            ifname = Some(needs(&env.ifname, "CNI_IFNAME")?);
            netns = env.netns.clone().filter(|s| !s.is_empty());
        }
        Command::Status | Command::Gc | Command::Version => {}
    }
    if let Some(id) = &container_id
        && !valid_container_id(id)
    {
        return Err(CniError::new(
            code::BAD_ENV,
            format!("CNI_CONTAINERID {id:?}: only letters, digits, '-', '_' and '.'"),
        ));
    }
    if let Some(i) = &ifname
        && !valid_ifname(i)
    {
        return Err(CniError::new(
            code::BAD_ENV,
            format!("CNI_IFNAME {i:?} is not a valid interface name"),
        ));
    }
    let (args_ip, args_ip6) = parse_cni_args(env.args.as_deref())?;
    let ip = match (conf.ips.first().copied(), args_ip) {
        (Some(a), Some(b)) if a != b => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("requested addresses differ: {a} (config) and {b} (CNI_ARGS)"),
            ));
        }
        (a, b) => a.or(b),
    };
    let ip6 = match (conf.ips6.first().copied(), args_ip6) {
        (Some(a), Some(b)) if a != b => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("requested IPv6 addresses differ: {a} (config) and {b} (CNI_ARGS)"),
            ));
        }
        (a, b) => a.or(b),
    };
    Ok(Request {
        command,
        conf,
        container_id,
        netns,
        ifname,
        ip,
        ip6,
    })
}

/// VERSION's answer.
pub fn version_result(stdin: &[u8]) -> String {
    json!({"cniVersion": answer_version(stdin), "supportedVersions": SUPPORTED_VERSIONS})
        .to_string()
}

/// One address ADD gave the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachedIp {
    pub ip: IpAddr,
    pub prefix: u8,
    pub gateway: IpAddr,
    /// The route via the gateway: the default route of its family for the container's first
    /// network, the overlay network's subnet for each further one (their default routes would
    /// collide).
    pub route: ipnetwork::IpNetwork,
}

/// What ADD set up, for the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub host_veth: String,
    pub host_mac: String,
    pub ifname: String,
    pub container_mac: String,
    pub netns: String,
    /// One per family of the network, IPv4 first.
    pub ips: Vec<AttachedIp>,
}

/// What a further interface of a container routes: the overlay network's whole subnet.
pub fn route_for(
    has_default_route: bool,
    overlay_subnet: Option<ipnetwork::Ipv4Network>,
) -> Result<ipnetwork::Ipv4Network, CniError> {
    if !has_default_route {
        return Ok(ipnetwork::Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("/0 is valid"));
    }
    overlay_subnet.ok_or_else(|| {
        CniError::new(
            code::NETWORK_UNAVAILABLE,
            "the container has a default route already and the network has no subnet to route instead",
        )
    })
}

/// [`route_for`] for IPv6: `::/0`, or the network's `subnet6` on a further interface.
pub fn route_for6(
    has_default_route: bool,
    overlay_subnet6: Option<ipnetwork::Ipv6Network>,
) -> Result<ipnetwork::Ipv6Network, CniError> {
    if !has_default_route {
        return Ok(ipnetwork::Ipv6Network::new(Ipv6Addr::UNSPECIFIED, 0).expect("/0 is valid"));
    }
    overlay_subnet6.ok_or_else(|| {
        CniError::new(
            code::NETWORK_UNAVAILABLE,
            "the container has an IPv6 default route already and the network has no subnet6 to route instead",
        )
    })
}

/// ADD's result, shaped for `version` ([`result_shape`]).
pub fn add_result(version: &str, a: &Attached) -> String {
    let route = |i: &AttachedIp| json!({"dst": i.route.to_string(), "gw": i.gateway.to_string()});
    if result_shape(version) == ResultShape::Ip4 {
        let mut v = json!({"cniVersion": version, "dns": {}});
        for i in &a.ips {
            let key = if i.ip.is_ipv4() { "ip4" } else { "ip6" };
            v[key] = json!({
                "ip": format!("{}/{}", i.ip, i.prefix),
                "gateway": i.gateway.to_string(),
                "routes": [route(i)],
            });
        }
        return v.to_string();
    }
    let ips: Vec<Value> = a
        .ips
        .iter()
        .map(|i| {
            let mut ip = json!({
                "address": format!("{}/{}", i.ip, i.prefix),
                "gateway": i.gateway.to_string(),
                "interface": 1,
            });
            if result_shape(version) == ResultShape::IpsVersioned {
                ip["version"] = json!(if i.ip.is_ipv4() { "4" } else { "6" });
            }
            ip
        })
        .collect();
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": a.host_veth, "mac": a.host_mac},
            {"name": a.ifname, "mac": a.container_mac, "sandbox": a.netns},
        ],
        "ips": ips,
        "routes": a.ips.iter().map(route).collect::<Vec<_>>(),
        "dns": {},
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cmd: &str) -> Env {
        Env {
            command: Some(cmd.into()),
            container_id: Some("abc123".into()),
            netns: Some("/proc/1/ns/net".into()),
            ifname: Some("eth0".into()),
            ..Default::default()
        }
    }

    const CONF: &str = r#"{"cniVersion":"1.0.0","name":"dcos","type":"ebpf-overlay","network":"dcos","agent_socket":"/run/x.sock","mtu":1400,"half":"docker"}"#;

    #[test]
    fn parses_the_documented_config() {
        let c = parse_config(CONF.as_bytes()).unwrap();
        assert_eq!(c.network, "dcos");
        assert_eq!(c.mtu, 1400);
        assert_eq!(c.half, overlay_api::agent::Half::Docker);
        assert_eq!(c.agent_socket, PathBuf::from("/run/x.sock"));
        let minimal =
            parse_config(br#"{"cniVersion":"0.4.0","name":"blue","type":"ebpf-overlay"}"#).unwrap();
        assert_eq!(
            (minimal.network.as_str(), minimal.mtu),
            ("blue", DEFAULT_MTU)
        );
        assert_eq!(minimal.half, overlay_api::agent::Half::Cni);
        assert_eq!(
            minimal.container_device,
            overlay_netlink::ContainerDevice::Veth
        );
        let netkit =
            parse_config(br#"{"cniVersion":"1.0.0","name":"dcos","container_device":"netkit"}"#)
                .unwrap();
        assert_eq!(
            netkit.container_device,
            overlay_netlink::ContainerDevice::Netkit
        );
        let bad = parse_config(br#"{"cniVersion":"1.0.0","name":"x","container_device":"tap"}"#)
            .unwrap_err();
        assert_eq!(bad.code, 7);
        assert!(bad.msg.contains("container_device"), "{}", bad.msg);
    }

    #[test]
    fn config_errors_have_the_spec_codes() {
        let code_of = |s: &str| parse_config(s.as_bytes()).unwrap_err().code;
        assert_eq!(code_of("{"), 6);
        assert_eq!(code_of("[1]"), 6);
        assert_eq!(code_of(r#"{"cniVersion":"0.4.0"}"#), 7);
        assert_eq!(code_of(r#"{"cniVersion":"0.5.0","name":"x"}"#), 1);
        assert_eq!(code_of(r#"{"cniVersion":2,"name":"x"}"#), 7);
        assert_eq!(code_of(r#"{"cniVersion":"1.0.0","name":"x","mtu":100}"#), 7);
        assert_eq!(
            code_of(r#"{"cniVersion":"1.0.0","name":"x","half":"left"}"#),
            7
        );
        assert_eq!(
            code_of(r#"{"cniVersion":"1.0.0","name":"x","network":"a-name-far-too-long"}"#),
            7
        );
        assert_eq!(
            code_of(r#"{"cniVersion":"1.0.0","name":"x","agent_socket":"rel.sock"}"#),
            7
        );
        assert_eq!(
            code_of(r#"{"cniVersion":"1.0.0","name":"x","runtimeConfig":{"ips":["nope"]}}"#),
            7
        );
    }

    #[test]
    fn requested_addresses_from_config_and_cni_args() {
        let conf = r#"{"cniVersion":"1.0.0","name":"dcos","runtimeConfig":{"ips":["9.0.1.9/25"]}}"#;
        let r = parse_request(&env("ADD"), conf.as_bytes()).unwrap();
        assert_eq!(r.ip, Some("9.0.1.9".parse().unwrap()));
        let mut e = env("ADD");
        e.args = Some("IgnoreUnknown=1;IP=9.0.1.10;K8S_POD_NAME=x".into());
        let r = parse_request(&e, CONF.as_bytes()).unwrap();
        assert_eq!(r.ip, Some("9.0.1.10".parse().unwrap()));
        assert_eq!(parse_request(&e, conf.as_bytes()).unwrap_err().code, 7);
        e.args = Some("garbage".into());
        assert_eq!(parse_request(&e, CONF.as_bytes()).unwrap_err().code, 4);
        e.args = Some("IP=999.1.1.1".into());
        assert_eq!(parse_request(&e, CONF.as_bytes()).unwrap_err().code, 4);
        // One address per family, comma-separated; two of one family are refused.
        e.args = Some("IP=9.0.1.10,fd01:b::5".into());
        let r = parse_request(&e, CONF.as_bytes()).unwrap();
        assert_eq!(r.ip, Some("9.0.1.10".parse().unwrap()));
        assert_eq!(r.ip6, Some("fd01:b::5".parse().unwrap()));
        e.args = Some("IP=fd01:b::5,fd01:b::6".into());
        assert_eq!(parse_request(&e, CONF.as_bytes()).unwrap_err().code, 4);
        let conf6 =
            r#"{"cniVersion":"1.0.0","name":"dcos6","runtimeConfig":{"ips":["fd01:b::9/81"]}}"#;
        let r = parse_request(&env("ADD"), conf6.as_bytes()).unwrap();
        assert_eq!((r.ip, r.ip6), (None, Some("fd01:b::9".parse().unwrap())));
        let two6 = r#"{"cniVersion":"1.0.0","name":"dcos6","runtimeConfig":{"ips":["fd01:b::9","fd01:b::a"]}}"#;
        assert_eq!(parse_config(two6.as_bytes()).unwrap_err().code, 7);
    }

    #[test]
    fn environment_is_checked_per_command() {
        let mut e = env("ADD");
        e.netns = None;
        assert_eq!(parse_request(&e, CONF.as_bytes()).unwrap_err().code, 4);
        e.command = Some("DEL".into());
        assert!(
            parse_request(&e, CONF.as_bytes()).is_ok(),
            "DEL works without a netns"
        );
        e.container_id = None;
        assert_eq!(parse_request(&e, CONF.as_bytes()).unwrap_err().code, 4);
        assert_eq!(
            parse_request(&env("FROB"), CONF.as_bytes())
                .unwrap_err()
                .code,
            4
        );
        assert_eq!(
            parse_request(&Env::default(), CONF.as_bytes())
                .unwrap_err()
                .code,
            4
        );
        let mut e = env("ADD");
        e.ifname = Some("a/b".into());
        assert_eq!(parse_request(&e, CONF.as_bytes()).unwrap_err().code, 4);
        e.ifname = Some("much-too-long-ifname".into());
        assert_eq!(parse_request(&e, CONF.as_bytes()).unwrap_err().code, 4);
        // STATUS and GC exist from 1.1.0 on.
        assert_eq!(
            parse_request(&env("STATUS"), CONF.as_bytes())
                .unwrap_err()
                .code,
            1
        );
        let v11 = CONF.replace("1.0.0", "1.1.0");
        assert!(
            parse_request(
                &Env {
                    command: Some("GC".into()),
                    ..Default::default()
                },
                v11.as_bytes()
            )
            .is_ok()
        );
    }

    #[test]
    fn gc_attachments_are_read() {
        let conf = r#"{"cniVersion":"1.1.0","name":"dcos","cni.dev/attachments":[{"containerID":"c1","ifname":"eth0"}]}"#;
        let c = parse_config(conf.as_bytes()).unwrap();
        assert_eq!(c.valid_attachments, Some(vec!["c1/eth0".to_owned()]));
    }

    #[test]
    fn results_are_shaped_per_version() {
        let a = Attached {
            host_veth: host_veth_name("c1", "eth0"),
            host_mac: "02:00:00:00:00:01".into(),
            ifname: "eth0".into(),
            container_mac: "02:00:00:00:00:02".into(),
            netns: "/run/netns/x".into(),
            ips: vec![AttachedIp {
                ip: "9.0.1.2".parse().unwrap(),
                prefix: 25,
                gateway: "9.0.1.1".parse().unwrap(),
                route: route_for(false, None).unwrap().into(),
            }],
        };
        let old: Value = serde_json::from_str(&add_result("0.4.0", &a)).unwrap();
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["ips"][0]["address"], "9.0.1.2/25");
        let new: Value = serde_json::from_str(&add_result("1.0.0", &a)).unwrap();
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["cniVersion"], "1.0.0");
        assert_eq!(new["interfaces"][1]["sandbox"], "/run/netns/x");
        assert_eq!(new["routes"][0]["gw"], "9.0.1.1");
        let v: Value = serde_json::from_str(&version_result(br#"{"cniVersion":"0.4.0"}"#)).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(
            v["supportedVersions"],
            json!([
                "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"
            ])
        );
        // 0.3.x: as 0.4.0.
        let v03: Value = serde_json::from_str(&add_result("0.3.1", &a)).unwrap();
        assert_eq!(v03["ips"][0]["version"], "4");
        assert_eq!(v03["interfaces"][1]["name"], "eth0");
        // 0.1/0.2: the ip4 object Mesos parses, nothing of the later shapes.
        for version in ["0.1.0", "0.2.0"] {
            let v: Value = serde_json::from_str(&add_result(version, &a)).unwrap();
            assert_eq!(v["cniVersion"], version);
            assert_eq!(v["ip4"]["ip"], "9.0.1.2/25");
            assert_eq!(v["ip4"]["gateway"], "9.0.1.1");
            assert_eq!(
                v["ip4"]["routes"][0],
                json!({"dst": "0.0.0.0/0", "gw": "9.0.1.1"})
            );
            assert!(
                v.get("ips").is_none() && v.get("interfaces").is_none(),
                "{v}"
            );
        }
    }

    #[test]
    fn dual_stack_results_per_version() {
        let v4 = AttachedIp {
            ip: "9.0.1.2".parse().unwrap(),
            prefix: 25,
            gateway: "9.0.1.1".parse().unwrap(),
            route: route_for(false, None).unwrap().into(),
        };
        let v6 = AttachedIp {
            ip: "fd01:b::2".parse().unwrap(),
            prefix: 81,
            gateway: "fd01:b::1".parse().unwrap(),
            route: route_for6(false, None).unwrap().into(),
        };
        let a = Attached {
            host_veth: "eo1".into(),
            host_mac: "02:00:00:00:00:01".into(),
            ifname: "eth0".into(),
            container_mac: "02:00:00:00:00:02".into(),
            netns: "/run/netns/x".into(),
            ips: vec![v4, v6],
        };
        for version in ["0.1.0", "0.2.0"] {
            let v: Value = serde_json::from_str(&add_result(version, &a)).unwrap();
            assert_eq!(v["ip4"]["ip"], "9.0.1.2/25");
            assert_eq!(v["ip6"]["ip"], "fd01:b::2/81");
            assert_eq!(v["ip6"]["gateway"], "fd01:b::1");
            assert_eq!(
                v["ip6"]["routes"][0],
                json!({"dst": "::/0", "gw": "fd01:b::1"})
            );
        }
        for version in ["0.3.0", "0.3.1", "0.4.0"] {
            let v: Value = serde_json::from_str(&add_result(version, &a)).unwrap();
            assert_eq!(v["ips"][0]["version"], "4");
            assert_eq!(v["ips"][1]["version"], "6");
            assert_eq!(v["ips"][1]["address"], "fd01:b::2/81");
            assert_eq!(v["ips"][1]["interface"], 1);
            assert_eq!(v["routes"][1], json!({"dst": "::/0", "gw": "fd01:b::1"}));
        }
        for version in ["1.0.0", "1.1.0"] {
            let v: Value = serde_json::from_str(&add_result(version, &a)).unwrap();
            assert!(v["ips"][1].get("version").is_none());
            assert_eq!(v["ips"][1]["gateway"], "fd01:b::1");
        }
        // IPv6 only (dcos6): no ip4 object, one ips entry.
        let only6 = Attached { ips: vec![v6], ..a };
        let v: Value = serde_json::from_str(&add_result("0.2.0", &only6)).unwrap();
        assert!(
            v.get("ip4").is_none() && v["ip6"]["ip"] == "fd01:b::2/81",
            "{v}"
        );
        let v: Value = serde_json::from_str(&add_result("1.0.0", &only6)).unwrap();
        assert_eq!(v["ips"].as_array().unwrap().len(), 1);
        assert_eq!(
            route_for6(true, "fd01:b::/64".parse().ok())
                .unwrap()
                .to_string(),
            "fd01:b::/64"
        );
    }

    #[test]
    fn a_second_network_routes_its_subnet_not_the_default() {
        assert_eq!(route_for(false, None).unwrap().to_string(), "0.0.0.0/0");
        let blue = "10.1.0.0/16".parse().unwrap();
        assert_eq!(route_for(true, Some(blue)).unwrap(), blue);
        assert_eq!(
            route_for(true, None).unwrap_err().code,
            code::NETWORK_UNAVAILABLE
        );
    }

    #[test]
    fn a_config_without_cni_version_is_0_2_0() {
        let mesos = br#"{"name":"dcos","type":"ebpf-overlay"}"#;
        let c = parse_config(mesos).unwrap();
        assert_eq!(c.cni_version, "0.2.0");
        assert_eq!(result_shape(&c.cni_version), ResultShape::Ip4);
        assert_eq!(answer_version(mesos), "0.2.0");
        assert_eq!(answer_version(br#"{"cniVersion":"0.3.0"}"#), "0.3.0");
        assert_eq!(answer_version(br#"{"cniVersion":"9.9.9"}"#), LATEST);
        assert_eq!(answer_version(b"not json"), LATEST);
        // ADD and DEL work on it; CHECK (0.4.0 on) and STATUS (1.1.0) do not exist there.
        assert!(parse_request(&env("ADD"), mesos).is_ok());
        assert!(parse_request(&env("DEL"), mesos).is_ok());
        for cmd in ["CHECK", "STATUS", "GC"] {
            assert_eq!(
                parse_request(&env(cmd), mesos).unwrap_err().code,
                1,
                "{cmd}"
            );
        }
        let v031 = br#"{"cniVersion":"0.3.1","name":"dcos"}"#;
        assert_eq!(parse_request(&env("CHECK"), v031).unwrap_err().code, 1);
        let v040 = br#"{"cniVersion":"0.4.0","name":"dcos"}"#;
        assert!(parse_request(&env("CHECK"), v040).is_ok());
    }

    /// What Mesos' isolator sends: the file's JSON plus the task's NetworkInfo.
    fn mesos_conf(network_info: Value) -> Vec<u8> {
        json!({
            "name": "dcos",
            "type": "ebpf-overlay",
            "args": {"org.apache.mesos": {"network_info": network_info}},
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn mesos_network_info_is_read() {
        let conf = mesos_conf(json!({
            "name": "dcos",
            "labels": {"labels": [{"key": "team", "value": "web"}, {"key": "bare"}]},
            "port_mappings": [{"host_port": 8080, "container_port": 80, "protocol": "tcp"}],
            "ip_addresses": [
                {"protocol": "IPv6"},
                {"ip_address": "9.0.1.9"},
                {"protocol": "IPv4", "ip_address": "9.0.1.9"},
                {"protocol": "IPv4"},
            ],
            "groups": ["g"],
        }));
        let c = parse_config(&conf).unwrap();
        let m = c.mesos.as_ref().unwrap();
        assert_eq!(m.name.as_deref(), Some("dcos"));
        assert_eq!(
            m.labels,
            vec![
                ("team".into(), "web".into()),
                ("bare".into(), String::new())
            ]
        );
        assert_eq!(m.ip_addresses, vec!["9.0.1.9".parse::<Ipv4Addr>().unwrap()]);
        let r = parse_request(&env("ADD"), &conf).unwrap();
        assert_eq!(r.ip, Some("9.0.1.9".parse().unwrap()));
        // Without a NetworkInfo (or with an empty one) nothing is requested.
        let plain = parse_config(br#"{"name":"dcos"}"#).unwrap();
        assert_eq!(plain.mesos, None);
        let empty = parse_config(&mesos_conf(json!({}))).unwrap();
        assert_eq!(empty.mesos, Some(MesosNetworkInfo::default()));
        assert_eq!(
            parse_request(&env("ADD"), &mesos_conf(json!({})))
                .unwrap()
                .ip,
            None
        );
        // A requested address that differs from CNI_ARGS' is refused.
        let mut e = env("ADD");
        e.args = Some("IP=9.0.1.10".into());
        assert_eq!(parse_request(&e, &conf).unwrap_err().code, 7);
    }

    #[test]
    fn malformed_mesos_network_info_names_the_field() {
        for (ni, field) in [
            (json!("dcos"), "must be an object"),
            (json!({"name": 3}), "name"),
            (json!({"name": "blue"}), "is not this network"),
            (json!({"labels": {"labels": {"key": "a"}}}), "labels.labels"),
            (json!({"labels": {"labels": [{"value": "v"}]}}), "label"),
            (
                json!({"ip_addresses": "9.0.1.9"}),
                "ip_addresses must be a list",
            ),
            (
                json!({"ip_addresses": [{"ip_address": "nope"}]}),
                "not an IPv4 address",
            ),
            (
                json!({"ip_addresses": [{"protocol": "IPX", "ip_address": "9.0.1.9"}]}),
                "protocol",
            ),
            (
                json!({"ip_addresses": [{"ip_address": "9.0.1.9"}, {"ip_address": "9.0.1.10"}]}),
                "one IPv4 address",
            ),
        ] {
            let e = parse_config(&mesos_conf(ni.clone())).unwrap_err();
            assert_eq!(e.code, 7, "{ni}");
            assert!(e.msg.contains(field), "{ni}: {}", e.msg);
        }
    }

    #[test]
    fn about_names_the_plugin_and_its_versions() {
        let a = about("1.2.3");
        assert!(a.starts_with("ebpf-overlay CNI plugin v1.2.3"), "{a}");
        assert!(
            a.contains("0.1.0, 0.2.0, 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"),
            "{a}"
        );
    }

    #[test]
    fn host_veth_names_are_short_stable_and_distinct() {
        let a = host_veth_name("c1", "eth0");
        assert_eq!(a, host_veth_name("c1", "eth0"));
        assert_ne!(a, host_veth_name("c1", "eth1"));
        assert_ne!(a, host_veth_name("c2", "eth0"));
        assert_eq!(a.len(), 14);
        assert!(valid_ifname(&a));
    }
}
