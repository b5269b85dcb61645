//! Property: whatever config bytes and environment a runtime hands over, the plugin answers with
//! a well-formed CNI error object (non-zero exit) or a success, and never panics.

use std::path::{Path, PathBuf};

use overlay_api::{
    AgentInfo,
    agent::{AddEndpoint, EndpointInfo, GcRequest, LocalError, Released},
};
use overlay_cni::{
    Host, Iface, Link, NetlinkError, Output, Route, Route6, Setup4, Setup6, run, spec::Env,
};
use proptest::prelude::*;
use serde_json::Value;

/// A host whose agent is down and whose netlink either fails with arbitrary text or reports
/// an interface of arbitrary name and MTU wherever asked.
struct Down {
    netlink: Result<(String, u32), String>,
}

impl Down {
    fn nl<T>(&self, ok: impl FnOnce(&(String, u32)) -> T) -> Result<T, NetlinkError> {
        match &self.netlink {
            Ok(v) => Ok(ok(v)),
            Err(text) => Err(NetlinkError::Os {
                op: text.clone(),
                source: std::io::Error::other(text.clone()),
            }),
        }
    }
}

fn down() -> LocalError {
    LocalError::Unreachable {
        path: PathBuf::from("/nonexistent"),
        source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
    }
}

impl Host for Down {
    fn overlay(&self, _: &Path) -> Result<AgentInfo, LocalError> {
        Err(down())
    }
    fn add_endpoint(&self, _: &Path, _: &AddEndpoint) -> Result<EndpointInfo, LocalError> {
        Err(down())
    }
    fn release(&self, _: &Path, _: &str) -> Result<Released, LocalError> {
        Err(LocalError::Malformed("x".into()))
    }
    fn endpoints(&self, _: &Path) -> Result<Vec<EndpointInfo>, LocalError> {
        Err(LocalError::Rejected {
            status: 500,
            message: "boom".into(),
        })
    }
    fn gc(&self, _: &Path, _: &GcRequest) -> Result<Vec<Released>, LocalError> {
        Err(down())
    }
    fn iface(&self, _: Option<&str>, _: &str) -> Result<Option<Iface>, NetlinkError> {
        self.nl(|(name, mtu)| {
            Some(Iface {
                link: Link {
                    name: name.clone(),
                    ifindex: *mtu,
                    mac: [2, 0, 0, 0, 0, 1],
                    mtu: *mtu,
                    up: true,
                    kind: None,
                },
                addrs: vec![],
                addrs6: vec![],
            })
        })
    }
    fn routes(&self, _: Option<&str>) -> Result<Vec<Route>, NetlinkError> {
        self.nl(|_| vec![])
    }
    fn routes6(&self, _: Option<&str>) -> Result<Vec<Route6>, NetlinkError> {
        self.nl(|_| vec![])
    }
    fn add_veth(
        &self,
        _: overlay_netlink::ContainerDevice,
        _: &str,
        _: &str,
        _: u32,
        _: &str,
    ) -> Result<(), NetlinkError> {
        self.nl(|_| ())
    }
    fn del_link(&self, _: &str) -> Result<bool, NetlinkError> {
        self.nl(|_| true)
    }
    fn configure(
        &self,
        _: &str,
        _: &str,
        _: Option<Setup4>,
        _: Option<Setup6>,
    ) -> Result<(), NetlinkError> {
        self.nl(|_| ())
    }
    fn path_exists(&self, _: &str) -> bool {
        true
    }
}

fn well_formed(out: &Output) -> Result<(), String> {
    if out.code == 0 {
        if out.stdout.is_empty() {
            return Ok(());
        }
        let v: Value = serde_json::from_str(&out.stdout).map_err(|e| e.to_string())?;
        if v.get("cniVersion").and_then(Value::as_str).is_none() {
            return Err(format!("success without cniVersion: {}", out.stdout));
        }
        return Ok(());
    }
    let v: Value = serde_json::from_str(&out.stdout)
        .map_err(|e| format!("error output is not JSON ({e}): {:?}", out.stdout))?;
    let code = v.get("code").and_then(Value::as_u64).unwrap_or(0);
    if code == 0 || v.get("msg").and_then(Value::as_str).is_none() {
        return Err(format!("malformed error object: {}", out.stdout));
    }
    if v.get("cniVersion").and_then(Value::as_str).is_none() {
        return Err(format!("error object without cniVersion: {}", out.stdout));
    }
    Ok(())
}

fn opt_string() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some(String::new())),
        "[a-zA-Z0-9_./=;-]{0,20}".prop_map(Some),
        any::<String>().prop_map(Some),
    ]
}

fn command() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(Some("ADD".to_owned())),
        Just(Some("DEL".to_owned())),
        Just(Some("CHECK".to_owned())),
        Just(Some("VERSION".to_owned())),
        Just(Some("STATUS".to_owned())),
        Just(Some("GC".to_owned())),
        opt_string(),
    ]
}

/// Configs that are JSON and often close to valid, plus arbitrary bytes.
fn config() -> impl Strategy<Value = Vec<u8>> {
    let field = prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        Just(Value::from("1.0.0")),
        Just(Value::from("1.1.0")),
        Just(Value::from("0.4.0")),
        Just(Value::from("0.3.1")),
        Just(Value::from("0.2.0")),
        Just(serde_json::json!({"org.apache.mesos": {"network_info": {
            "name": "dcos",
            "labels": {"labels": [{"key": "k", "value": "v"}, {"key": 3}]},
            "ip_addresses": [{"protocol": "IPv4", "ip_address": "9.0.1.5"}, {"protocol": 7}],
        }}})),
        Just(serde_json::json!({"org.apache.mesos": {"network_info": "x"}})),
        Just(Value::from("/run/x.sock")),
        Just(serde_json::json!(["9.0.1.5/25", "zz"])),
        Just(serde_json::json!({"ips": ["9.0.1.5"]})),
        Just(serde_json::json!([{"containerID": "a", "ifname": "eth0"}, 3])),
    ];
    let key = prop_oneof![
        Just("cniVersion"),
        Just("name"),
        Just("type"),
        Just("network"),
        Just("agent_socket"),
        Just("mtu"),
        Just("half"),
        Just("runtimeConfig"),
        Just("args"),
        Just("prevResult"),
        Just("cni.dev/attachments"),
    ];
    let structured = prop::collection::vec((key, field), 0..8).prop_map(|kv| {
        let mut m = serde_json::Map::new();
        m.insert("cniVersion".into(), "1.1.0".into());
        m.insert("name".into(), "dcos".into());
        for (k, v) in kv {
            m.insert(k.to_owned(), v);
        }
        serde_json::to_vec(&Value::Object(m)).unwrap()
    });
    prop_oneof![structured, any::<Vec<u8>>()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_input_gives_a_cni_answer(
        cmd in command(),
        container_id in opt_string(),
        netns in opt_string(),
        ifname in opt_string(),
        args in opt_string(),
        stdin in config(),
        nl_ok in any::<bool>(),
        nl_text in any::<String>(),
        mtu in any::<u32>(),
    ) {
        let env = Env { command: cmd, container_id, netns, ifname, args, path: None };
        let host = Down { netlink: if nl_ok { Ok((nl_text, mtu)) } else { Err(nl_text) } };
        let out = run(&host, &env, &stdin);
        if let Err(e) = well_formed(&out) {
            prop_assert!(false, "{e}\nenv {env:?}\nstdin {:?}", String::from_utf8_lossy(&stdin));
        }
        // An agent that is down never lets ADD succeed.
        if env.command.as_deref() == Some("ADD") {
            prop_assert_ne!(out.code, 0);
        }
    }
}

#[test]
fn agent_down_is_try_again_later() {
    let env = Env {
        command: Some("ADD".into()),
        container_id: Some("c1".into()),
        netns: Some("/run/netns/x".into()),
        ifname: Some("eth0".into()),
        ..Default::default()
    };
    let host = Down {
        netlink: Err("no".into()),
    };
    let out = run(&host, &env, br#"{"cniVersion":"1.0.0","name":"dcos"}"#);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["code"], 11, "{}", out.stdout);
    assert_eq!(v["cniVersion"], "1.0.0");
}
