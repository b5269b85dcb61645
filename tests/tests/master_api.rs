//! The overlay master's HTTP API, tested against the real process.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use overlay_api::{AgentInfo, ClientError, OverlayInfo, State, Status};
use overlay_tests::fixtures::agent_ip;
use overlay_tests::master::Master;
use serde_json::{Value, json};

fn overlay<'a>(info: &'a AgentInfo, name: &str) -> &'a overlay_api::AgentOverlayInfo {
    info.overlays
        .iter()
        .find(|o| o.info.name == name)
        .unwrap_or_else(|| panic!("agent {} has no network {name}: {info:?}", info.ip))
}

fn network(name: &str, subnet: &str) -> OverlayInfo {
    OverlayInfo {
        name: name.into(),
        subnet: Some(subnet.parse().unwrap()),
        prefix: Some(24),
        subnet6: None,
        prefix6: None,
        enabled: None,
        id: None,
        vni: None,
        masquerade: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_is_idempotent_and_delete_quarantines() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), None).await;
    let client = master.client();

    let mut infos = Vec::new();
    for n in 1..=3 {
        infos.push(client.register(agent_ip(n)).await.unwrap());
    }
    let second = &infos[1];
    let dcos = overlay(second, "dcos");
    assert_eq!(dcos.subnet, Some("9.0.1.0/24".parse().unwrap()));
    assert_eq!(
        dcos.mesos_bridge.as_ref().unwrap().ip,
        Some("9.0.1.0/25".parse().unwrap())
    );
    assert_eq!(
        dcos.docker_bridge.as_ref().unwrap().ip,
        Some("9.0.1.128/25".parse().unwrap())
    );
    assert_eq!(
        dcos.backend.vxlan.vtep_ip,
        Some("44.128.0.2/20".parse().unwrap())
    );
    assert_eq!(
        dcos.backend.vxlan.vtep_ip6,
        Some("fd01:a::2/64".parse().unwrap())
    );
    assert_eq!(
        dcos.backend.vxlan.vtep_mac,
        Some("70:b3:d5:80:00:02".parse().unwrap())
    );
    assert_eq!(dcos.backend.vxlan.vni, 1024);
    let dcos6 = overlay(second, "dcos6");
    assert_eq!(dcos6.subnet6, Some("fd01:b::1:0:0:0/80".parse().unwrap()));
    // DC/OS's scheme: one VNI, 1024 on `vtep1024`, for every network (DC/OS's integration
    // tests assert it for dcos and dcos6); the networks keep ids of their own.
    assert_eq!(
        (
            dcos6.backend.vxlan.vni,
            dcos6.backend.vxlan.vtep_name.as_str()
        ),
        (1024, "vtep1024")
    );
    assert_ne!(dcos6.info.id, dcos.info.id);

    // Idempotent: same IP, same allocation, no new revision.
    let revision = client
        .watch(0, Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap()
        .revision;
    for (n, info) in (1..=3).zip(&infos) {
        assert_eq!(&client.register(agent_ip(n)).await.unwrap(), info);
    }
    let after = client
        .watch(0, Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap()
        .revision;
    assert_eq!(
        after, revision,
        "heartbeats of complete agents write nothing"
    );

    // Delete (forced: agent 2 just heartbeated) frees into the quarantine: the next agent
    // gets the next free VTEP and subnet, not the deleted agent's (master_safety.rs shows them
    // reused once the quarantine is over).
    let deleted = client
        .delete_agents_forced(&[agent_ip(2), agent_ip(99)], true)
        .await
        .unwrap();
    assert_eq!(deleted, vec![agent_ip(2)]);
    let state = client.state().await.unwrap();
    assert_eq!(state.agents.len(), 2);
    let newcomer = client.register(agent_ip(4)).await.unwrap();
    assert_eq!(
        overlay(&newcomer, "dcos").subnet,
        Some("9.0.3.0/24".parse().unwrap())
    );
    assert_eq!(
        overlay(&newcomer, "dcos").backend.vxlan.vtep_ip,
        Some("44.128.0.4/20".parse().unwrap())
    );
    assert_eq!(master.metric("overlay_master_agents", "").await, 3.0);
}

/// The DC/OS documentation's example agent entry: our second agent must match it value for
/// value (our extras are extra keys only), and the state must have DC/OS's top-level shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_has_dcos_shape_and_names() {
    let reference: Value = serde_json::from_str(
        r#"{"ip":"172.17.0.4","overlays":[{"backend":{"vxlan":{"vni":1024,"vtep_ip":"44.128.0.2/20",
 "vtep_ip6":"fd01:a::2/64","vtep_mac":"70:b3:d5:80:00:02","vtep_name":"vtep1024"}},
 "docker_bridge":{"ip":"9.0.1.128/25","name":"d-dcos"},
 "info":{"name":"dcos","prefix":24,"subnet":"9.0.0.0/8"},
 "mesos_bridge":{"ip":"9.0.1.0/25","name":"m-dcos"},
 "state":{"status":"STATUS_OK"},"subnet":"9.0.1.0/24"}]}"#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), None).await;
    let http = master.http();
    let url = |path: &str| format!("{}{path}", master.base_url());
    for ip in ["172.17.0.3", "172.17.0.4"] {
        let response = http
            .post(url("/overlay-master/agents"))
            .json(&json!({ "ip": ip }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let state: Value = http
        .get(url("/overlay-master/state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    let top: BTreeSet<&str> = state
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(top, BTreeSet::from(["agents", "network"]));
    let network = state["network"].as_object().unwrap();
    for key in ["vtep_subnet", "vtep_subnet6", "vtep_mac_oui", "overlays"] {
        assert!(network.contains_key(key), "network.{key} missing: {state}");
    }
    assert_eq!(state["network"]["vtep_subnet"], "44.128.0.0/20");
    assert_eq!(state["network"]["vtep_subnet6"], "fd01:a::/64");
    assert_eq!(
        state["network"]["vtep_mac_oui"]
            .as_str()
            .unwrap()
            .to_ascii_uppercase(),
        "70:B3:D5:00:00:00"
    );
    assert_eq!(state["network"]["overlays"][0]["name"], "dcos");
    assert_eq!(state["network"]["overlays"][0]["subnet"], "9.0.0.0/8");
    assert_eq!(state["network"]["overlays"][0]["prefix"], 24);
    assert_eq!(state["network"]["overlays"][1]["name"], "dcos6");
    assert_eq!(state["network"]["overlays"][1]["subnet6"], "fd01:b::/64");
    assert_eq!(state["network"]["overlays"][1]["prefix6"], 80);

    let agent = state["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["ip"] == "172.17.0.4")
        .expect("agent 172.17.0.4 in state");
    let ours = agent["overlays"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["info"]["name"] == "dcos")
        .unwrap();
    assert_subset(&reference["overlays"][0], ours, "overlays[0]");
    // Absent optional fields are omitted, not null.
    assert!(!state.to_string().contains("null"), "{state}");
}

/// Every key of `reference` exists in `actual` with the same value (recursively).
fn assert_subset(reference: &Value, actual: &Value, path: &str) {
    match reference {
        Value::Object(map) => {
            for (key, value) in map {
                let child = actual
                    .get(key)
                    .unwrap_or_else(|| panic!("{path}.{key} missing in {actual}"));
                assert_subset(value, child, &format!("{path}.{key}"));
            }
        }
        _ => assert_eq!(reference, actual, "{path}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_network_add_disable_remove() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), None).await;
    let client = master.client();
    for n in 1..=3 {
        client.register(agent_ip(n)).await.unwrap();
    }
    let start = client
        .watch(0, Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();

    // A watcher waiting on the current revision sees the addition.
    let watcher = {
        let client = client.clone();
        let after = start.revision;
        tokio::spawn(async move { client.watch(after, Duration::from_secs(10)).await })
    };
    let added = client
        .add_network(&network("dev", "10.20.0.0/16"))
        .await
        .unwrap();
    // An id of its own; on the wire the VNI every network shares (DC/OS's scheme).
    let id = added.id.expect("network id assigned");
    assert!(id != 1024);
    assert_eq!(added.vni, None);
    let seen = watcher.await.unwrap().unwrap().expect("watch woke");
    assert!(seen.revision > start.revision);
    let dev_subnets: BTreeSet<String> = seen
        .state
        .agents
        .iter()
        .map(|a| overlay(a, "dev").subnet.unwrap().to_string())
        .collect();
    assert_eq!(
        dev_subnets,
        BTreeSet::from([
            "10.20.0.0/24".into(),
            "10.20.1.0/24".into(),
            "10.20.2.0/24".into()
        ])
    );
    let backend = &overlay(&seen.state.agents[0], "dev").backend.vxlan;
    assert_eq!(
        (backend.vni, backend.vtep_name.as_str()),
        (1024, "vtep1024")
    );

    // Disable: still listed, enabled false, allocations kept.
    let disabled = client.disable_network("dev").await.unwrap();
    assert_eq!(disabled.enabled, Some(false));
    let state = client.state().await.unwrap();
    let dev = state
        .network
        .overlays
        .iter()
        .find(|o| o.name == "dev")
        .unwrap();
    assert_eq!(dev.enabled, Some(false));
    assert_eq!(overlay(&state.agents[0], "dev").info.enabled, Some(false));

    // Remove: gone everywhere; re-adding it starts from the lowest block again.
    client.remove_network("dev").await.unwrap();
    let state = client.state().await.unwrap();
    assert!(state.network.overlays.iter().all(|o| o.name != "dev"));
    assert!(
        state
            .agents
            .iter()
            .all(|a| a.overlays.iter().all(|o| o.info.name != "dev"))
    );
    assert_eq!(
        master
            .metric("overlay_master_subnets_allocated", "network=\"dev\"")
            .await,
        0.0
    );
    client
        .add_network(&network("dev2", "10.20.0.0/16"))
        .await
        .unwrap();
    let state = client.state().await.unwrap();
    let mut blocks: Vec<String> = state
        .agents
        .iter()
        .map(|a| overlay(a, "dev2").subnet.unwrap().to_string())
        .collect();
    blocks.sort();
    assert_eq!(blocks, ["10.20.0.0/24", "10.20.1.0/24", "10.20.2.0/24"]);

    // Unknown names and duplicates are refused.
    let err = client.remove_network("nope").await.unwrap_err();
    assert_eq!(err.rejected_status(), Some(404), "{err}");
    let err = client
        .add_network(&network("dev2", "10.30.0.0/16"))
        .await
        .unwrap_err();
    assert_eq!(err.rejected_status(), Some(409), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_wakes_within_100ms_of_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), None).await;
    let client = master.client();
    client.register(agent_ip(1)).await.unwrap();

    // Timeout without change: 204 -> None, after about the timeout.
    let current = client
        .watch(0, Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap()
        .revision;
    let began = Instant::now();
    assert!(
        client
            .watch(current, Duration::from_millis(200))
            .await
            .unwrap()
            .is_none()
    );
    assert!(began.elapsed() >= Duration::from_millis(190));

    let mut worst = Duration::ZERO;
    for round in 0..5u32 {
        let after = client
            .watch(0, Duration::from_secs(1))
            .await
            .unwrap()
            .unwrap()
            .revision;
        let watcher = {
            let client = client.clone();
            tokio::spawn(async move {
                let watched = client.watch(after, Duration::from_secs(10)).await;
                (Instant::now(), watched)
            })
        };
        // Make sure the watcher is parked before changing anything.
        let deadline = Instant::now() + Duration::from_secs(5);
        while master.metric("overlay_master_watchers", "").await < 1.0 {
            assert!(Instant::now() < deadline, "watcher never registered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let changed_at = Instant::now();
        client.register(agent_ip(100 + round)).await.unwrap();
        let (woke_at, watched) = watcher.await.unwrap();
        let watched = watched.unwrap().expect("watch woke");
        assert!(watched.revision > after);
        assert!(
            watched
                .state
                .agents
                .iter()
                .any(|a| a.ip == agent_ip(100 + round))
        );
        worst = worst.max(woke_at - changed_at);
    }
    assert!(
        worst < Duration::from_millis(100),
        "watch latency {worst:?} >= 100 ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_4xx_naming_the_field_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), None).await;
    let client = master.client();
    client.register(agent_ip(1)).await.unwrap();
    let http = master.http();
    let url = |path: &str| format!("{}{path}", master.base_url());
    let before = http
        .get(url("/overlay-master/state"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    let cases: Vec<(&str, &str, Value, &[&str])> = vec![
        (
            "POST",
            "/overlay-master/agents",
            json!({"ip": "10.0.0.300"}),
            &["ip"],
        ),
        ("POST", "/overlay-master/agents", json!({}), &["ip"]),
        (
            "POST",
            "/overlay-master/agents",
            json!({"ip": "0.0.0.0"}),
            &["ip", "0.0.0.0"],
        ),
        (
            "POST",
            "/overlay-master/agents",
            json!({"ip": "10.0.0.1", "x": 1}),
            &["x"],
        ),
        (
            "POST",
            "/overlay-master/agents/delete",
            json!({"agents": ["nope"]}),
            &["agents"],
        ),
        (
            "POST",
            "/overlay-master/networks",
            json!({"name": "host", "subnet": "10.0.0.0/8", "prefix": 24}),
            &["name", "host"],
        ),
        (
            "POST",
            "/overlay-master/networks",
            json!({"name": "fourteen-chars", "subnet": "10.0.0.0/8", "prefix": 24}),
            &["name", "fourteen-chars"],
        ),
        (
            "POST",
            "/overlay-master/networks",
            json!({"name": "ov", "subnet": "9.1.0.0/16", "prefix": 24}),
            &["subnet", "9.1.0.0/16"],
        ),
        (
            "POST",
            "/overlay-master/networks",
            json!({"name": "ov", "subnet": "10.0.0.0/8", "prefix": 31}),
            &["prefix", "31"],
        ),
        (
            "POST",
            "/overlay-master/networks",
            json!({"name": "ov", "subnet": "10.0.0.0/33", "prefix": 24}),
            &["subnet", "10.0.0.0/33"],
        ),
        (
            "POST",
            "/overlay-master/networks",
            json!({"name": "ov", "subnet": "10.0.0.0/8", "prefix": 24, "vni": 16777216}),
            &["vni", "16777216"],
        ),
        (
            "POST",
            "/overlay-master/networks",
            json!({"name": "ov", "subnet": "10.0.0.0/8", "prefix": 24, "vni": 0}),
            &["vni", "0"],
        ),
        (
            "POST",
            "/overlay-master/networks",
            json!({"subnet": "10.0.0.0/8", "prefix": 24}),
            &["name"],
        ),
        (
            "POST",
            "/overlay-master/networks/nope/disable",
            Value::Null,
            &["nope"],
        ),
        (
            "DELETE",
            "/overlay-master/networks/nope",
            Value::Null,
            &["nope"],
        ),
        (
            "GET",
            "/overlay-master/watch?after=abc",
            Value::Null,
            &["after"],
        ),
    ];
    for (method, path, body, words) in cases {
        let mut request = http.request(method.parse().unwrap(), url(path));
        if !body.is_null() {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(
            status.is_client_error(),
            "{method} {path} {body}: {status} {text}"
        );
        let error: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method} {path}: body is not JSON: {text}"));
        let message = error["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {text}"));
        for word in words {
            assert!(
                message.contains(word),
                "{method} {path} {body}: {message:?} lacks {word:?}"
            );
        }
    }
    // Not JSON at all.
    let response = http
        .post(url("/overlay-master/agents"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_client_error());

    let after = http
        .get(url("/overlay-master/state"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(before, after, "rejected requests changed the state");

    // The typed client reports a refusal with the master's message.
    let err = client
        .add_network(&network("bridge", "10.0.0.0/8"))
        .await
        .unwrap_err();
    match err {
        ClientError::Rejected { status, message } => {
            assert_eq!(status, 400);
            assert!(message.contains("bridge"), "{message}");
        }
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_drops_the_registration_or_the_network_entry_and_recovers_after_delete() {
    let dir = tempfile::tempdir().unwrap();
    // 6 VTEP addresses; 2 blocks of `small`.
    // (`small` must not contain the agents' underlay addresses, 10.0.0.x.) Without a
    // quarantine, freed allocations are reused at once.
    let config = "vtep_subnet: 44.128.0.0/29\noverlays:\n  - name: small\n    subnet: 10.20.0.0/23\n    prefix: 24\n  - name: big\n    subnet: 10.8.0.0/16\n    prefix: 24\n";
    let master = Master::start_with_args(
        dir.path(),
        Some(config),
        &["--allocation-quarantine-secs", "0"],
    )
    .await;
    let client = master.client();
    for n in 1..=2 {
        let info = client.register(agent_ip(n)).await.unwrap();
        assert_eq!(info.overlays.len(), 2);
        assert!(
            info.overlays
                .iter()
                .all(|o| o.state.as_ref().unwrap().status == Status::Ok)
        );
    }
    // As DC/OS's master: the exhausted network has no entry for this agent, the others do.
    let third = client.register(agent_ip(3)).await.unwrap();
    let names: Vec<&str> = third
        .overlays
        .iter()
        .map(|o| o.info.name.as_str())
        .collect();
    assert_eq!(names, ["big"], "{third:?}");
    assert_eq!(
        overlay(&third, "big").state.as_ref().unwrap().status,
        Status::Ok
    );
    assert_eq!(
        master
            .metric(
                "overlay_master_allocation_failures_total",
                "subnet_exhausted"
            )
            .await,
        1.0
    );

    for n in 4..=6 {
        client.register(agent_ip(n)).await.unwrap();
    }
    // No VTEP left: the registration is dropped whole (503, saying why), nothing is stored.
    let err = client.register(agent_ip(7)).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("503"), "{text}");
    assert!(
        text.contains("registration of agent 10.0.0.7 dropped")
            && text.contains("no free VTEP address left in vtep_subnet 44.128.0.0/29"),
        "{text}"
    );
    assert!(
        master
            .metric("overlay_master_allocation_failures_total", "vtep_exhausted")
            .await
            >= 1.0
    );
    let listed = client.state().await.unwrap();
    assert!(
        listed.agents.iter().all(|a| a.ip != agent_ip(7)),
        "a dropped registration is not in the state"
    );
    assert_eq!(listed.agents.len(), 6);

    // Freeing an agent lets the dropped one in on its next attempt.
    client
        .delete_agents_forced(&[agent_ip(1)], true)
        .await
        .unwrap();
    let seventh = client.register(agent_ip(7)).await.unwrap();
    assert_eq!(
        overlay(&seventh, "big").state.as_ref().unwrap().status,
        Status::Ok
    );
    assert_eq!(
        overlay(&seventh, "big").backend.vxlan.vtep_ip,
        Some("44.128.0.1/29".parse().unwrap())
    );
    // Agent 7 took agent 1's `small` block, so agent 3 still has none until another leaves.
    assert_eq!(
        overlay(&seventh, "small").subnet,
        Some("10.20.0.0/24".parse().unwrap())
    );
    let third = client.register(agent_ip(3)).await.unwrap();
    assert!(third.overlays.iter().all(|o| o.info.name != "small"));
    client
        .delete_agents_forced(&[agent_ip(2)], true)
        .await
        .unwrap();
    let third = client.register(agent_ip(3)).await.unwrap();
    assert_eq!(
        overlay(&third, "small").subnet,
        Some("10.20.1.0/24".parse().unwrap())
    );
    assert_eq!(
        overlay(&third, "small").state.as_ref().unwrap().status,
        Status::Ok
    );
}

const BASE_CONFIG: &str = r#"
dcos_overlay_network:
  vtep_subnet: 44.128.0.0/20
  vtep_mac_oui: 70:B3:D5:00:00:00
  vxlan_port: 64000
  overlays:
    - name: dcos
      subnet: 9.0.0.0/8
      prefix: 24
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_recovers_and_reconciles_with_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut master = Master::start(dir.path(), Some(BASE_CONFIG)).await;
    let client = master.client();
    for n in 1..=20 {
        client.register(agent_ip(n)).await.unwrap();
    }
    client
        .add_network(&network("api", "10.50.0.0/16"))
        .await
        .unwrap();
    let before: State = client.state().await.unwrap();

    master.restart().await;
    let client = master.client();
    assert_eq!(
        client.state().await.unwrap(),
        before,
        "state changed across a restart"
    );

    // A network added to the file is allocated for every existing agent at start.
    master.write_config(&format!(
        "{BASE_CONFIG}    - name: extra\n      subnet: 10.60.0.0/16\n      prefix: 24\n"
    ));
    master.restart().await;
    let state = client.state().await.unwrap();
    assert_eq!(state.agents.len(), 20);
    for agent in &state.agents {
        assert!(overlay(agent, "extra").subnet.is_some());
        assert!(
            overlay(agent, "api").subnet.is_some(),
            "API networks survive restarts"
        );
        let old = before.agents.iter().find(|a| a.ip == agent.ip).unwrap();
        assert_eq!(overlay(agent, "dcos"), overlay(old, "dcos"));
    }

    // Removed from the file: removed at start, logged, blocks freed.
    master.write_config(BASE_CONFIG);
    master.restart().await;
    let state = client.state().await.unwrap();
    assert!(state.network.overlays.iter().all(|o| o.name != "extra"));
    assert!(
        master.log().contains("extra"),
        "removal not logged:\n{}",
        master.log()
    );

    // An incompatible change of a stored network is refused with a clear error.
    master.write_config(&BASE_CONFIG.replace("prefix: 24", "prefix: 23"));
    let (status, log) = master.restart_expecting_exit();
    assert!(!status.success());
    assert!(log.contains("incompatible"), "{log}");
    assert!(
        log.contains("config.yaml"),
        "error does not name the file: {log}"
    );

    // Back to the good file: everything is still there.
    master.write_config(BASE_CONFIG);
    master.restart().await;
    let state = client.state().await.unwrap();
    for agent in &state.agents {
        let old = before.agents.iter().find(|a| a.ip == agent.ip).unwrap();
        assert_eq!(overlay(agent, "dcos"), overlay(old, "dcos"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_file_exits_nonzero_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut master = Master::start(dir.path(), Some(BASE_CONFIG)).await;
    for (text, words) in [
        (
            BASE_CONFIG.replace("name: dcos", "name: fourteen-chars"),
            vec!["overlays[0].name", "fourteen-chars"],
        ),
        (
            BASE_CONFIG.replace("9.0.0.0/8", "9.0.0.0/88"),
            vec!["overlays[0].subnet", "9.0.0.0/88"],
        ),
        (
            BASE_CONFIG.replace("70:B3:D5:00:00:00", "70:B3:D5:00:00:01"),
            vec!["vtep_mac_oui", "70:B3:D5:00:00:01"],
        ),
        (
            BASE_CONFIG.replace("44.128.0.0/20", "44.0.0.0/7"),
            vec!["vtep_subnet", "44.0.0.0/7"],
        ),
        ("overlays: [".to_owned(), vec!["config.yaml"]),
    ] {
        master.write_config(&text);
        let (status, log) = master.restart_expecting_exit();
        assert!(!status.success(), "started with a bad config:\n{text}");
        assert!(
            log.contains("config.yaml"),
            "error does not name the file: {log}"
        );
        for word in words {
            assert!(log.contains(word), "error lacks {word:?}: {log}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_good_config_and_rejects_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut master = Master::start(dir.path(), Some(BASE_CONFIG)).await;
    let client = master.client();
    for n in 1..=2 {
        client.register(agent_ip(n)).await.unwrap();
    }
    let start = client
        .watch(0, Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();

    master.write_config(&format!(
        "{BASE_CONFIG}    - name: added\n      subnet: 10.70.0.0/16\n      prefix: 24\n      vni: 4242\n"
    ));
    master.signal(libc::SIGHUP);
    let seen = client
        .watch(start.revision, Duration::from_secs(10))
        .await
        .unwrap()
        .expect("reload visible to watchers");
    let added = seen
        .state
        .network
        .overlays
        .iter()
        .find(|o| o.name == "added")
        .unwrap();
    assert_eq!(added.vni, Some(4242));
    for agent in &seen.state.agents {
        assert!(overlay(agent, "added").subnet.is_some());
    }

    // Bad files are rejected whole: overlapping subnet, then unparsable text.
    for bad in [
        format!("{BASE_CONFIG}    - name: clash\n      subnet: 9.9.0.0/16\n      prefix: 24\n"),
        "overlays: [".to_owned(),
    ] {
        let errors_before = master
            .metric("overlay_master_config_reload_errors_total", "")
            .await;
        master.write_config(&bad);
        master.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while master
            .metric("overlay_master_config_reload_errors_total", "")
            .await
            <= errors_before
        {
            assert!(
                Instant::now() < deadline,
                "bad reload not reported; log:\n{}",
                master.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let now = client
            .watch(0, Duration::from_secs(1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            now.revision, seen.revision,
            "a rejected reload changed the state"
        );
        assert_eq!(now.state, seen.state);
    }
    assert!(
        master.log().contains("9.9.0.0/16"),
        "rejection not explained:\n{}",
        master.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_watch_follows_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut master = Master::start(dir.path(), None).await;
    let client = master.client();
    for n in 1..=3 {
        client.register(agent_ip(n)).await.unwrap();
    }
    let first = client
        .watch_delta(0, Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    assert!(
        first.full,
        "revision 0 predates the master: full state expected"
    );
    let mut revision = first.revision;
    let mut copy = first.state.clone();

    // Follows a change with the delta, checks the copy against the master's state, and
    // returns whether the delta was a full state.
    async fn follow(
        client: &overlay_api::MasterClient,
        revision: &mut u64,
        copy: &mut State,
        expect_agents: Option<usize>,
    ) -> bool {
        let delta = client
            .watch_delta(*revision, Duration::from_secs(5))
            .await
            .unwrap()
            .expect("a change is visible");
        assert!(delta.revision > *revision);
        if let Some(count) = expect_agents {
            assert!(!delta.full);
            assert_eq!(delta.state.agents.len(), count, "{delta:?}");
        }
        let full = delta.full;
        *revision = delta.revision;
        delta.apply_to(copy);
        assert_eq!(copy, &client.state().await.unwrap());
        full
    }

    client.register(agent_ip(10)).await.unwrap();
    follow(&client, &mut revision, &mut copy, Some(1)).await;
    client
        .delete_agents_forced(&[agent_ip(2)], true)
        .await
        .unwrap();
    follow(&client, &mut revision, &mut copy, Some(0)).await;
    client
        .add_network(&network("dev", "10.20.0.0/16"))
        .await
        .unwrap();
    assert!(
        follow(&client, &mut revision, &mut copy, None).await,
        "network change resyncs"
    );
    client.register(agent_ip(11)).await.unwrap();
    follow(&client, &mut revision, &mut copy, Some(1)).await;

    // Nothing new: the long-poll times out.
    assert!(
        client
            .watch_delta(revision, Duration::from_millis(100))
            .await
            .unwrap()
            .is_none()
    );

    // Revisions are the store's: a watcher that is current resumes with deltas across a
    // restart.
    master.restart().await;
    client.register(agent_ip(12)).await.unwrap();
    follow(&client, &mut revision, &mut copy, Some(1)).await;

    // One that missed changes made before the restart cannot get a delta: full state.
    client.register(agent_ip(13)).await.unwrap();
    master.restart().await;
    assert!(follow(&client, &mut revision, &mut copy, None).await);
    client.register(agent_ip(14)).await.unwrap();
    follow(&client, &mut revision, &mut copy, Some(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_fails_over_to_the_next_master_url() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), None).await;
    let dead = format!("https://127.0.0.1:{}", overlay_tests::fixtures::free_port());
    let client =
        overlay_api::MasterClient::with_tls([dead.clone(), master.base_url()], &master.admin_tls())
            .unwrap();
    let info = client.register(agent_ip(1)).await.unwrap();
    assert_eq!(client.state().await.unwrap().agents, vec![info]);

    // A 4xx is an answer, not a reason to try the next master.
    let err = client.remove_network("nope").await.unwrap_err();
    assert_eq!(err.rejected_status(), Some(404));

    let only_dead = overlay_api::MasterClient::with_tls([dead], &master.admin_tls()).unwrap();
    assert!(only_dead.state().await.unwrap_err().is_unreachable());
}
