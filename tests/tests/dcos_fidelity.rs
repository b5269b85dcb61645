//! The master as DC/OS tools see it, against the real process: the state JSON field by field
//! as DC/OS's master prints it (stout's `JSON::protobuf` of proto2 messages), DC/OS's
//! semantics (disabled networks, bridge-less registrations, IPv4 agents, delete answering
//! the whole state, JSONP), DC/OS's own `master.json`, and `--import-dcos-state`.

use std::collections::BTreeSet;

use overlay_tests::fixtures::config::ONE_NETWORK;
use overlay_tests::master::Master;
use serde_json::{Value, json};

/// dcos (IPv4), blue (prefix written as a string, as stout accepts it), dcos6 (IPv6).
const CONFIG: &str = r#"{"vtep_subnet": "44.128.0.0/20", "vtep_subnet6": "fd01:a::/64",
  "vtep_mac_oui": "70:B3:D5:00:00:00",
  "overlays": [{"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24},
               {"name": "blue", "subnet": "10.1.0.0/16", "prefix": "24"},
               {"name": "dcos6", "subnet6": "fd01:b::/64", "prefix6": 80}]}"#;

fn keys(value: &Value) -> BTreeSet<&str> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect()
}

fn set<'a>(items: &[&'a str]) -> BTreeSet<&'a str> {
    items.iter().copied().collect()
}

async fn get_json(master: &Master, path: &str) -> Value {
    let response = master
        .http()
        .get(format!("{}{path}", master.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.unwrap()
}

async fn post(master: &Master, path: &str, body: Value) -> reqwest::Response {
    master
        .http()
        .post(format!("{}{path}", master.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn entry<'a>(agent: &'a Value, name: &str) -> Option<&'a Value> {
    agent["overlays"]
        .as_array()?
        .iter()
        .find(|o| o["info"]["name"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_json_is_shaped_as_dcos_prints_it() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), Some(CONFIG)).await;

    // No agents yet: stout leaves an empty repeated field out.
    let state = get_json(&master, "/overlay-master/state").await;
    assert_eq!(keys(&state), set(&["network"]), "{state}");
    let network = &state["network"];
    assert_eq!(
        keys(network),
        set(&[
            "vtep_subnet",
            "vtep_subnet6",
            "vtep_mac_oui",
            "overlays",
            "vxlan_port"
        ])
    );
    assert_eq!(
        network["vtep_mac_oui"], "70:B3:D5:00:00:00",
        "as configured"
    );
    for overlay in network["overlays"].as_array().unwrap() {
        // `enabled` has a default in overlay.proto: stout always prints it.
        assert_eq!(overlay["enabled"], true, "{overlay}");
    }
    assert_eq!(
        network["overlays"][1]["prefix"], 24,
        "a string prefix is a number"
    );

    // Registration order, not address order.
    let order = ["172.17.0.9", "172.17.0.3", "172.17.0.5"];
    for ip in order {
        assert_eq!(
            post(&master, "/overlay-master/agents", json!({ "ip": ip }))
                .await
                .status(),
            200
        );
    }
    let state = get_json(&master, "/overlay-master/state").await;
    let listed: Vec<&str> = state["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["ip"].as_str().unwrap())
        .collect();
    assert_eq!(listed, order);

    let agent = &state["agents"][1];
    assert_eq!(keys(agent), set(&["ip", "overlays"]), "{agent}");
    let dcos = entry(agent, "dcos").unwrap();
    assert_eq!(
        keys(dcos),
        set(&[
            "info",
            "subnet",
            "mesos_bridge",
            "docker_bridge",
            "backend",
            "state"
        ]),
        "{dcos}"
    );
    assert_eq!(dcos["subnet"], "9.0.1.0/24");
    assert_eq!(
        dcos["mesos_bridge"],
        json!({"name": "m-dcos", "ip": "9.0.1.0/25"})
    );
    assert_eq!(
        dcos["docker_bridge"],
        json!({"name": "d-dcos", "ip": "9.0.1.128/25"})
    );
    // The master's per-overlay state carries the status only.
    assert_eq!(dcos["state"], json!({"status": "STATUS_OK"}));
    assert_eq!(dcos["info"]["enabled"], true);
    let vxlan = &dcos["backend"]["vxlan"];
    assert_eq!(
        keys(&dcos["backend"]),
        set(&["vxlan"]),
        "one backend, vxlan"
    );
    assert_eq!(
        keys(vxlan),
        set(&["vni", "vtep_name", "vtep_ip", "vtep_mac", "vtep_ip6"])
    );
    assert_eq!(vxlan["vni"], 1024);
    assert_eq!(vxlan["vtep_name"], "vtep1024");
    assert_eq!(vxlan["vtep_ip"], "44.128.0.2/20");
    assert_eq!(vxlan["vtep_ip6"], "fd01:a::2/64");
    assert_eq!(
        vxlan["vtep_mac"], "70:b3:d5:80:00:02",
        "stout prints MACs lower case"
    );
    // DC/OS's master gives every network of an agent the same backend: VNI 1024 on `vtep1024`
    // (DC/OS's integration tests assert it for dcos and dcos6).
    for name in ["dcos", "blue", "dcos6"] {
        let vxlan = &entry(agent, name).unwrap()["backend"]["vxlan"];
        assert_eq!(vxlan["vni"], 1024, "{name}");
        assert_eq!(vxlan["vtep_name"], "vtep1024", "{name}");
    }
    for overlay in network["overlays"].as_array().unwrap() {
        assert!(overlay.get("vni").is_none(), "no VNI of its own: {overlay}");
    }
    let dcos6 = entry(agent, "dcos6").unwrap();
    assert_eq!(
        keys(dcos6),
        set(&[
            "info",
            "subnet6",
            "mesos_bridge",
            "docker_bridge",
            "backend",
            "state"
        ])
    );
    assert_eq!(dcos6["mesos_bridge"]["ip6"], "fd01:b:0:0:1::/81");
    assert!(!state.to_string().contains("null"), "{state}");

    // A DC/OS master node registers without bridges: a subnet, no bridge fields.
    let response = post(
        &master,
        "/overlay-master/agents",
        json!({"ip": "172.17.0.20",
               "network_config": {"mesos_bridge": false, "docker_bridge": false,
                                  "overlay_mtu": 1420, "enable_ipv6": true}}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let node: Value = response.json().await.unwrap();
    let dcos = entry(&node, "dcos").unwrap();
    assert_eq!(dcos["subnet"], "9.0.3.0/24");
    assert!(dcos.get("mesos_bridge").is_none() && dcos.get("docker_bridge").is_none());
    // `allocate_subnet: false` would leave VTEP-only entries: refused, naming it.
    let response = post(
        &master,
        "/overlay-master/agents",
        json!({"ip": "172.17.0.21", "network_config": {"allocate_subnet": false}}),
    )
    .await;
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("allocate_subnet"));

    // Agent addresses are IPv4 (as DC/OS parses them) unless --ipv6-underlay.
    let response = post(&master, "/overlay-master/agents", json!({"ip": "fd00::7"})).await;
    assert_eq!(response.status(), 400);
    let text = response.text().await.unwrap();
    assert!(
        text.contains("fd00::7") && text.contains("--ipv6-underlay"),
        "{text}"
    );

    // A disabled network is not given to agents that do not hold it yet; holders keep it.
    master
        .client()
        .disable_network_forced("blue", true)
        .await
        .unwrap();
    let newcomer: Value = post(
        &master,
        "/overlay-master/agents",
        json!({"ip": "172.17.0.30"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert!(entry(&newcomer, "blue").is_none(), "{newcomer}");
    assert!(entry(&newcomer, "dcos").is_some());
    let state = get_json(&master, "/overlay-master/state").await;
    let holder = &state["agents"][0];
    assert_eq!(entry(holder, "blue").unwrap()["info"]["enabled"], false);
    assert_eq!(entry(holder, "blue").unwrap()["subnet"], "10.1.0.0/24");

    // JSONP, as libprocess serves it; a callback that is not an identifier is refused.
    let response = master
        .http()
        .get(format!(
            "{}/overlay-master/state?jsonp=app.cb_1",
            master.base_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/javascript");
    let body = response.text().await.unwrap();
    let inner = body
        .strip_prefix("app.cb_1(")
        .and_then(|b| b.strip_suffix(");"))
        .unwrap_or_else(|| panic!("not JSONP: {body}"));
    assert_eq!(serde_json::from_str::<Value>(inner).unwrap(), state);
    for bad in ["alert(1)//", "a b", "1x", ""] {
        let response = master
            .http()
            .get(format!("{}/overlay-master/state", master.base_url()))
            .query(&[("jsonp", bad)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "jsonp={bad:?}");
    }

    // Delete answers 200 with the whole state; a non-IPv4 entry is a 400 naming it.
    for (bad, shown) in [
        (json!(["172.17.0.3", "fd00::1"]), "agents[1]"),
        (json!(["nope"]), "agents[0]"),
        (json!([7]), "agents[0]"),
    ] {
        let response = post(
            &master,
            "/overlay-master/agents/delete?force=true",
            json!({ "agents": bad }),
        )
        .await;
        assert_eq!(response.status(), 400, "{bad}");
        assert!(response.text().await.unwrap().contains(shown));
    }
    let response = post(
        &master,
        "/overlay-master/agents/delete?force=true",
        json!({"agents": ["172.17.0.3", "172.17.0.99"]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()[overlay_api::DELETED_AGENTS_HEADER],
        "172.17.0.3"
    );
    let after: Value = response.json().await.unwrap();
    assert_eq!(keys(&after), set(&["network", "agents"]));
    let listed: Vec<&str> = after["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["ip"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        ["172.17.0.9", "172.17.0.5", "172.17.0.20", "172.17.0.30"]
    );
    assert_eq!(after, get_json(&master, "/overlay-master/state").await);
}

/// DC/OS's overlay master module configuration, as DC/OS's templates write it (numbers and
/// booleans as strings), is a configuration file here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcos_master_json_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let master_json = r#"{"replicated_log_dir": "/var/lib/dcos/mesos/master",
      "replicated_log_timeout": "5mins",
      "network": {"vtep_subnet": "44.128.0.0/20", "vtep_mac_oui": "70:B3:D5:00:00:00",
                  "vtep_mtu": "1500",
                  "overlays": [{"name": "dcos", "subnet": "9.0.0.0/8", "prefix": "24"},
                               {"name": "dev", "subnet": "192.168.0.0/16", "prefix": 26,
                                "enabled": "false"}]}}"#;
    let master = Master::start(dir.path(), Some(master_json)).await;
    let state = get_json(&master, "/overlay-master/state").await;
    let network = &state["network"];
    assert_eq!(network["vtep_mtu"], 1500);
    assert_eq!(network["overlays"][0]["prefix"], 24);
    assert_eq!(network["overlays"][1]["prefix"], 26);
    assert_eq!(network["overlays"][1]["enabled"], false);
    assert!(network.get("vtep_subnet6").is_none());
    drop(master);

    // Unknown fields of MasterConfig are refused, naming them.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.json");
    std::fs::write(
        &path,
        r#"{"replicated_log_dirr": "/x", "network": {"vtep_subnet": "44.128.0.0/20",
            "overlays": [{"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24}]}}"#,
    )
    .unwrap();
    let output = std::process::Command::new(overlay_tests::bin_path("overlay-master"))
        .args(["--insecure-http", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("replicated_log_dirr"), "{stderr}");
}

/// A DC/OS master's state as `GET /overlay-master/state` printed it: agents registered in
/// the order .4, .2, .6 (VTEPs .1, .2, .3 in that order), agent .6 later given VTEP .9 by a
/// recovery, a master node without bridges, a second network with its own subnets.
const DCOS_STATE: &str = r#"{"network": {"vtep_subnet": "44.128.0.0/20",
  "vtep_mac_oui": "70:B3:D5:00:00:00",
  "overlays": [{"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24, "enabled": true},
               {"name": "blue", "subnet": "10.1.0.0/16", "prefix": 24, "enabled": true}]},
 "agents": [
  {"ip": "172.17.0.4", "overlays": [
    {"info": {"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24, "enabled": true},
     "subnet": "9.0.0.0/24", "mesos_bridge": {"name": "m-dcos", "ip": "9.0.0.0/25"},
     "docker_bridge": {"name": "d-dcos", "ip": "9.0.0.128/25"},
     "backend": {"vxlan": {"vni": 1024, "vtep_name": "vtep1024", "vtep_ip": "44.128.0.1/20",
                           "vtep_mac": "70:b3:d5:80:00:01"}},
     "state": {"status": "STATUS_OK"}},
    {"info": {"name": "blue", "subnet": "10.1.0.0/16", "prefix": 24, "enabled": true},
     "subnet": "10.1.5.0/24", "mesos_bridge": {"name": "m-blue", "ip": "10.1.5.0/25"},
     "docker_bridge": {"name": "d-blue", "ip": "10.1.5.128/25"},
     "backend": {"vxlan": {"vni": 1024, "vtep_name": "vtep1024", "vtep_ip": "44.128.0.1/20",
                           "vtep_mac": "70:b3:d5:80:00:01"}},
     "state": {"status": "STATUS_OK"}}]},
  {"ip": "172.17.0.2", "overlays": [
    {"info": {"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24, "enabled": true},
     "subnet": "9.0.7.0/24",
     "backend": {"vxlan": {"vni": 1024, "vtep_name": "vtep1024", "vtep_ip": "44.128.0.2/20",
                           "vtep_mac": "70:b3:d5:80:00:02"}},
     "state": {"status": "STATUS_OK"}}]},
  {"ip": "172.17.0.6", "overlays": [
    {"info": {"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24, "enabled": true},
     "subnet": "9.0.2.0/24", "mesos_bridge": {"name": "m-dcos", "ip": "9.0.2.0/25"},
     "docker_bridge": {"name": "d-dcos", "ip": "9.0.2.128/25"},
     "backend": {"vxlan": {"vni": 1024, "vtep_name": "vtep1024", "vtep_ip": "44.128.0.9/20",
                           "vtep_mac": "70:b3:d5:80:00:09"}},
     "state": {"status": "STATUS_OK"}}]}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_dcos_state_keeps_every_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dcos-state.json");
    std::fs::write(&file, DCOS_STATE).unwrap();
    let mut master = Master::start_with_args(
        dir.path(),
        Some(ONE_NETWORK),
        &["--import-dcos-state", file.to_str().unwrap()],
    )
    .await;
    let dcos: Value = serde_json::from_str(DCOS_STATE).unwrap();
    let state = get_json(&master, "/overlay-master/state").await;
    let listed: Vec<&str> = state["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["ip"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        ["172.17.0.4", "172.17.0.2", "172.17.0.6"],
        "DC/OS's order"
    );
    // Field for field what DC/OS had, per agent and network, VNI 1024 included.
    for (ours, theirs) in state["agents"]
        .as_array()
        .unwrap()
        .iter()
        .zip(dcos["agents"].as_array().unwrap())
    {
        for theirs in theirs["overlays"].as_array().unwrap() {
            let name = theirs["info"]["name"].as_str().unwrap();
            let ours = entry(ours, name).unwrap_or_else(|| panic!("{name} missing: {ours}"));
            for field in ["subnet", "mesos_bridge", "docker_bridge", "state"] {
                assert_eq!(ours.get(field), theirs.get(field), "{name}.{field}");
            }
            for field in ["vni", "vtep_ip", "vtep_mac", "vtep_name"] {
                assert_eq!(
                    ours["backend"]["vxlan"][field], theirs["backend"]["vxlan"][field],
                    "{name}.backend.vxlan.{field}"
                );
            }
        }
    }
    // The network DC/OS's agents carry on VNI 1024 keeps it.
    assert_eq!(
        entry(&state["agents"][0], "dcos").unwrap()["backend"]["vxlan"]["vni"],
        1024
    );
    // An imported agent registering (converted in place) gets exactly what it had.
    let info: Value = post(
        &master,
        "/overlay-master/agents",
        json!({"ip": "172.17.0.6"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(entry(&info, "dcos").unwrap()["subnet"], "9.0.2.0/24");
    assert_eq!(
        entry(&info, "dcos").unwrap()["backend"]["vxlan"]["vtep_ip"],
        "44.128.0.9/20"
    );
    // A newcomer gets the lowest free allocation, clashing with nothing imported.
    let newcomer: Value = post(
        &master,
        "/overlay-master/agents",
        json!({"ip": "172.17.0.8"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let dcos_entry = entry(&newcomer, "dcos").unwrap();
    assert_eq!(dcos_entry["backend"]["vxlan"]["vtep_ip"], "44.128.0.3/20");
    assert_eq!(dcos_entry["subnet"], "9.0.1.0/24");
    // (The imported agents without a `blue` share got theirs first, on start and register.)
    let blue = entry(&newcomer, "blue").unwrap()["subnet"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(blue, "10.1.5.0/24", "agent .4's imported blue block");

    // The same import again (a restart with the flag still given) changes nothing.
    let before = get_json(&master, "/overlay-master/state").await;
    master.restart().await;
    assert_eq!(get_json(&master, "/overlay-master/state").await, before);

    // A file that disagrees with the store is refused and the master does not start.
    let conflicting = DCOS_STATE
        .replace("\"9.0.2.0/24\"", "\"9.0.1.0/24\"")
        .replace("\"9.0.2.0/25\"", "\"9.0.1.0/25\"")
        .replace("\"9.0.2.128/25\"", "\"9.0.1.128/25\"");
    std::fs::write(&file, conflicting).unwrap();
    let (status, log) = master.restart_expecting_exit();
    assert!(!status.success());
    assert!(
        log.contains("conflicts with") && log.contains("agent 172.17.0.6"),
        "{log}"
    );
    // A file whose MAC is not the one its VTEP gives is refused even into an empty store.
    let dir2 = tempfile::tempdir().unwrap();
    let bad = dir2.path().join("bad.json");
    std::fs::write(
        &bad,
        DCOS_STATE.replace("70:b3:d5:80:00:09", "70:b3:d5:80:00:0a"),
    )
    .unwrap();
    let output = std::process::Command::new(overlay_tests::bin_path("overlay-master"))
        .args(["--insecure-http", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir2.path().join("data"))
        .arg("--import-dcos-state")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("agents[2] (172.17.0.6)") && stderr.contains("vtep_mac"),
        "{stderr}"
    );
}

/// Exhaustion as DC/OS's master shows it: a network whose pool is exhausted for an agent has no
/// entry in that agent's record (the others are whole); an agent for which no VTEP is left is
/// not in the state at all (its registration was dropped with a 503), never half-allocated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_in_the_state_json_as_dcos_prints_it() {
    let dir = tempfile::tempdir().unwrap();
    // 6 VTEP addresses (44.128.0.1-6); two blocks of `small`.
    let config = r#"{"vtep_subnet": "44.128.0.0/29", "vtep_mac_oui": "70:B3:D5:00:00:00",
      "overlays": [{"name": "small", "subnet": "10.20.0.0/23", "prefix": 24},
                   {"name": "big", "subnet": "10.8.0.0/16", "prefix": 24}]}"#;
    let master = Master::start(dir.path(), Some(config)).await;
    let registered: Vec<String> = (3..=8).map(|n| format!("172.17.0.{n}")).collect();
    for ip in &registered {
        let response = post(&master, "/overlay-master/agents", json!({ "ip": ip })).await;
        assert_eq!(response.status(), 200, "{ip}");
    }
    let response = post(
        &master,
        "/overlay-master/agents",
        json!({"ip": "172.17.0.9"}),
    )
    .await;
    assert_eq!(response.status(), 503, "no VTEP left");
    let state = get_json(&master, "/overlay-master/state").await;
    let agents = state["agents"].as_array().unwrap();
    assert_eq!(
        agents
            .iter()
            .map(|a| a["ip"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>(),
        registered,
        "the dropped registration left nothing: {state}"
    );
    // The first two agents hold both networks; the third only `big`, whose entry is whole.
    assert!(entry(&agents[1], "small").is_some());
    assert!(entry(&agents[2], "small").is_none(), "{}", agents[2]);
    let big = entry(&agents[2], "big").unwrap();
    assert_eq!(
        keys(big),
        set(&[
            "info",
            "subnet",
            "mesos_bridge",
            "docker_bridge",
            "backend",
            "state"
        ]),
        "{big}"
    );
    assert_eq!(big["state"], json!({"status": "STATUS_OK"}));
    assert_eq!(
        keys(&big["backend"]["vxlan"]),
        set(&["vni", "vtep_name", "vtep_ip", "vtep_mac"])
    );
    assert_eq!(big["backend"]["vxlan"]["vtep_ip"], "44.128.0.3/29");
    assert!(!state.to_string().contains("null"), "{state}");
}

/// A network may carry a VNI of its own (for clusters with no DC/OS kernel agents): the state
/// says it, in the network and in every agent's backend, with DC/OS's device name for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_of_its_own_vni_is_an_option_the_state_shows() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"{"vtep_subnet": "44.128.0.0/20", "vtep_mac_oui": "70:B3:D5:00:00:00",
      "overlays": [{"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24},
                   {"name": "blue", "subnet": "10.1.0.0/16", "prefix": 24, "vni": "5000"}]}"#;
    let master = Master::start(dir.path(), Some(config)).await;
    let info: Value = post(
        &master,
        "/overlay-master/agents",
        json!({"ip": "172.17.0.3"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let vxlan = |name: &str| entry(&info, name).unwrap()["backend"]["vxlan"].clone();
    assert_eq!(
        (
            vxlan("dcos")["vni"].clone(),
            vxlan("dcos")["vtep_name"].clone()
        ),
        (json!(1024), json!("vtep1024"))
    );
    assert_eq!(
        (
            vxlan("blue")["vni"].clone(),
            vxlan("blue")["vtep_name"].clone()
        ),
        (json!(5000), json!("vtep5000"))
    );
    let state = get_json(&master, "/overlay-master/state").await;
    let overlays = state["network"]["overlays"].as_array().unwrap();
    assert_eq!(overlays[1]["vni"], 5000);
    assert!(overlays[0].get("vni").is_none());
    // Each network has an id of its own either way (what the datapath keys on).
    assert_eq!(overlays[0]["id"], 1024);
    assert!(overlays[1]["id"].as_u64().is_some_and(|id| id != 1024));
}
