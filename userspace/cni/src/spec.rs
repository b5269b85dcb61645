//! The CNI contract, as pure functions: the environment and config a runtime hands over, the
//! results and errors it gets back, shaped per spec version. No I/O here.
//!
//! Network configuration (`type: "ebpf-overlay"`):
//!
//! | field | meaning | default |
//! |---|---|---|
//! | `cniVersion` | `0.4.0`, `1.0.0` or `1.1.0` | required |
//! | `name` | CNI network name | required |
//! | `network` | overlay network on the agent (`dcos`, ...) | `name` |
//! | `agent_socket` | the agent's API socket (absolute path) | `/run/ebpf-overlay/agent.sock` |
//! | `mtu` | container interface MTU (552..=9000) | 1420 |
//! | `half` | `cni` (first half of the agent subnet) or `docker` (second) | `cni` |
//!
//! A static address may be requested with `CNI_ARGS` `IP=a.b.c.d`, `runtimeConfig.ips`
//! (capability `ips`) or `args.cni.ips`; it must be a usable address of this agent's subnet.

use std::{net::Ipv4Addr, path::PathBuf};

use serde_json::{Value, json};

pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];
pub const LATEST: &str = "1.1.0";
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
    /// Static addresses from `runtimeConfig.ips` and `args.cni.ips`.
    pub ips: Vec<Ipv4Addr>,
    pub prev_result: Option<Value>,
    /// GC: attachments to keep (`cni.dev/attachments`), as `<container id>/<ifname>`.
    pub valid_attachments: Option<Vec<String>>,
}

/// The version to answer errors with: the config's when it names one we speak.
pub fn answer_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST.to_owned())
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
    let cni_version =
        string("cniVersion")?.ok_or_else(|| invalid("cniVersion is missing".into()))?;
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
    let mut ips = vec![];
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
                continue; // IPv6: this plugin assigns IPv4 only
            }
            let ip = parse_ip(s).ok_or_else(|| invalid(format!("ips: {s:?} is not an address")))?;
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    if ips.len() > 1 {
        return Err(invalid(format!(
            "ips: one IPv4 address per attachment, got {ips:?}"
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
        ips,
        prev_result: obj.get("prevResult").cloned().filter(|v| !v.is_null()),
        valid_attachments,
    })
}

/// `CNI_ARGS` (`K=V;K2=V2`): the requested address (`IP`), if any. Unknown keys are ignored.
pub fn parse_cni_args(args: Option<&str>) -> Result<Option<Ipv4Addr>, CniError> {
    let Some(args) = args.filter(|a| !a.is_empty()) else {
        return Ok(None);
    };
    let mut ip = None;
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            CniError::new(
                code::BAD_ENV,
                format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
            )
        })?;
        if k == "IP" {
            ip = Some(parse_ip(v).ok_or_else(|| {
                CniError::new(
                    code::BAD_ENV,
                    format!("CNI_ARGS: IP={v:?} is not an IPv4 address"),
                )
            })?);
        }
    }
    Ok(ip)
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
        Command::Status | Command::Gc => {
            if conf.cni_version != "1.1.0" {
                return Err(CniError::new(
                    code::INCOMPATIBLE_VERSION,
                    format!(
                        "{cmd_s} needs CNI version 1.1.0, the config has {}",
                        conf.cni_version
                    ),
                ));
            }
        }
        Command::Version => {}
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
    let args_ip = parse_cni_args(env.args.as_deref())?;
    let ip = match (conf.ips.first().copied(), args_ip) {
        (Some(a), Some(b)) if a != b => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("requested addresses differ: {a} (config) and {b} (CNI_ARGS)"),
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
    })
}

/// VERSION's answer.
pub fn version_result(stdin: &[u8]) -> String {
    json!({"cniVersion": answer_version(stdin), "supportedVersions": SUPPORTED_VERSIONS})
        .to_string()
}

/// What ADD set up, for the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub host_veth: String,
    pub host_mac: String,
    pub ifname: String,
    pub container_mac: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

/// ADD's result, shaped for `version` (0.4.0 carries `ips[].version`).
pub fn add_result(version: &str, a: &Attached) -> String {
    let mut ip = json!({
        "address": format!("{}/{}", a.ip, a.prefix),
        "gateway": a.gateway.to_string(),
        "interface": 1,
    });
    if version.starts_with("0.") {
        ip["version"] = json!("4");
    }
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": a.host_veth, "mac": a.host_mac},
            {"name": a.ifname, "mac": a.container_mac, "sandbox": a.netns},
        ],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0", "gw": a.gateway.to_string()}],
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
    }

    #[test]
    fn config_errors_have_the_spec_codes() {
        let code_of = |s: &str| parse_config(s.as_bytes()).unwrap_err().code;
        assert_eq!(code_of("{"), 6);
        assert_eq!(code_of("[1]"), 6);
        assert_eq!(code_of(r#"{"name":"x"}"#), 7);
        assert_eq!(code_of(r#"{"cniVersion":"0.3.1","name":"x"}"#), 1);
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
            ip: "9.0.1.2".parse().unwrap(),
            prefix: 25,
            gateway: "9.0.1.1".parse().unwrap(),
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
        assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
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
