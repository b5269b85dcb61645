//! The master's rules that protect a running cluster, tested against the real process: freed
//! allocations are quarantined, live agents are deleted only with force, networks may not
//! contain the underlay, and networks in use or from the file are removed or disabled only
//! with force.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use overlay_api::{AgentInfo, ClientError, OverlayInfo};
use overlay_tests::fixtures::agent_ip;
use overlay_tests::fixtures::config::ONE_NETWORK;
use overlay_tests::master::Master;

/// A short quarantine and heartbeat timeout, so the test can watch both run out.
const QUARANTINE_SECS: u64 = 3;
const SHORT: [&str; 4] = [
    "--allocation-quarantine-secs",
    "3",
    "--heartbeat-timeout-secs",
    "2",
];

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

/// (VTEP IP, VTEP MAC, VTEP IP6, every subnet) of an agent.
fn allocation(info: &AgentInfo) -> (String, String, String, BTreeSet<String>) {
    let vxlan = &info.overlays[0].backend.vxlan;
    let subnets = info
        .overlays
        .iter()
        .flat_map(|o| {
            [
                o.subnet.map(|s| s.to_string()),
                o.subnet6.map(|s| s.to_string()),
            ]
        })
        .flatten()
        .collect();
    (
        format!("{:?}", vxlan.vtep_ip),
        format!("{:?}", vxlan.vtep_mac),
        format!("{:?}", vxlan.vtep_ip6),
        subnets,
    )
}

fn assert_disjoint(a: &AgentInfo, b: &AgentInfo) {
    let (a_ip, a_mac, a_ip6, a_subnets) = allocation(a);
    let (b_ip, b_mac, b_ip6, b_subnets) = allocation(b);
    assert_ne!(a_ip, b_ip, "VTEP shared by {} and {}", a.ip, b.ip);
    assert_ne!(a_mac, b_mac, "VTEP MAC shared");
    assert_ne!(a_ip6, b_ip6, "VTEP6 shared");
    assert!(
        a_subnets.is_disjoint(&b_subnets),
        "subnets shared: {a_subnets:?} / {b_subnets:?}"
    );
}

fn rejected(err: ClientError) -> (u16, String) {
    match err {
        ClientError::Rejected { status, message } => (status, message),
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_agents_allocation_is_quarantined_then_reusable() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start_with_args(dir.path(), None, &SHORT).await;
    let client = master.client();
    let first = client.register(agent_ip(1)).await.unwrap();
    let victim = client.register(agent_ip(2)).await.unwrap();

    // The victim heartbeated just now: an unforced delete is refused, naming it.
    let (status, message) = rejected(client.delete_agents(&[agent_ip(2)]).await.unwrap_err());
    assert_eq!(status, 409, "{message}");
    assert!(
        message.contains("agent 10.0.0.2 last heartbeated") && message.contains("s ago"),
        "{message}"
    );
    assert!(message.contains("force=true"), "{message}");
    assert_eq!(
        client.state().await.unwrap().agents.len(),
        2,
        "nothing deleted"
    );

    // Forced delete and a newcomer's registration at once (the attack of the issue).
    let other = master.client();
    let victims = [agent_ip(2)];
    let (deleted, newcomer) = tokio::join!(
        client.delete_agents_forced(&victims, true),
        other.register(agent_ip(66)),
    );
    assert_eq!(deleted.unwrap(), vec![agent_ip(2)]);
    let newcomer = newcomer.unwrap();
    assert_disjoint(&newcomer, &victim);
    assert_disjoint(&newcomer, &first);
    assert_eq!(
        master
            .metric("overlay_master_quarantined_allocations", "")
            .await,
        4.0,
        "VTEP, VTEP6 and the two networks' blocks are quarantined"
    );
    // More newcomers within the quarantine: still none of the victim's.
    let second = client.register(agent_ip(67)).await.unwrap();
    assert_disjoint(&second, &victim);
    let freed_at = Instant::now();

    // After the quarantine, the freed allocation is handed out again (lowest free first).
    tokio::time::sleep(
        Duration::from_secs(QUARANTINE_SECS).saturating_sub(freed_at.elapsed())
            + Duration::from_millis(300),
    )
    .await;
    let late = client.register(agent_ip(68)).await.unwrap();
    assert_eq!(
        allocation(&late),
        allocation(&victim),
        "the quarantined allocation is reusable after {QUARANTINE_SECS} s"
    );
    assert_eq!(
        master
            .metric("overlay_master_quarantined_allocations", "")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_agent_registering_again_gets_its_own_allocation_back() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start_with_args(dir.path(), None, &SHORT).await;
    let client = master.client();
    client.register(agent_ip(1)).await.unwrap();
    let victim = client.register(agent_ip(2)).await.unwrap();
    client
        .delete_agents_forced(&[agent_ip(2)], true)
        .await
        .unwrap();
    let newcomer = client.register(agent_ip(3)).await.unwrap();
    assert_disjoint(&newcomer, &victim);
    // The deleted agent, still running, heartbeats: it gets back what it had.
    let back = client.register(agent_ip(2)).await.unwrap();
    assert_eq!(back, victim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_is_deleted_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start_with_args(dir.path(), None, &SHORT).await;
    let client = master.client();
    client.register(agent_ip(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        client.delete_agents(&[agent_ip(1)]).await.unwrap(),
        vec![agent_ip(1)]
    );
    // An unknown agent is no reason to refuse.
    assert!(
        client
            .delete_agents(&[agent_ip(9)])
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_may_not_contain_agents_or_the_master() {
    let dir = tempfile::tempdir().unwrap();
    let master =
        Master::start_with_args(dir.path(), None, &["--advertise-address", "192.168.50.1"]).await;
    let client = master.client();
    client.register(agent_ip(1)).await.unwrap();
    let before = client.state().await.unwrap();

    for (subnet, words) in [
        ("10.0.0.0/16", "agent 10.0.0.1's underlay address 10.0.0.1"),
        ("192.168.0.0/16", "the master's address 192.168.50.1"),
        // The listen address (127.0.0.1 in these tests) is the master's too.
        ("127.0.0.0/8", "the master's address 127.0.0.1"),
    ] {
        let (status, message) = rejected(
            client
                .add_network(&network("under", subnet))
                .await
                .unwrap_err(),
        );
        assert_eq!(status, 400, "{message}");
        assert!(
            message.contains(&format!("overlays[2].subnet (under) = {subnet}")),
            "{message}"
        );
        assert!(message.contains(words), "{message}");
    }
    assert_eq!(client.state().await.unwrap(), before, "nothing changed");

    // A new agent whose underlay address is inside an overlay network cannot register.
    for (ip, field) in [
        ("9.0.3.4", "overlays[0].subnet (dcos) = 9.0.0.0/8"),
        ("44.128.0.9", "vtep_subnet = 44.128.0.0/20"),
    ] {
        let (status, message) = rejected(client.register(ip.parse().unwrap()).await.unwrap_err());
        assert_eq!(status, 400, "{message}");
        assert!(message.contains(&format!("ip = {ip}")), "{message}");
        assert!(message.contains(field), "{message}");
    }
    assert_eq!(client.state().await.unwrap(), before, "nothing changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_in_use_or_from_the_file_need_force() {
    let dir = tempfile::tempdir().unwrap();
    let mut master = Master::start(dir.path(), Some(ONE_NETWORK)).await;
    let client = master.client();
    client
        .add_network(&network("blue", "10.1.0.0/16"))
        .await
        .unwrap();
    client
        .add_network(&network("idle", "10.2.0.0/16"))
        .await
        .unwrap();
    client
        .heartbeat(
            agent_ip(1),
            BTreeMap::from([("blue".to_owned(), 2), ("dcos".to_owned(), 1)]),
        )
        .await
        .unwrap();
    client
        .heartbeat(agent_ip(2), BTreeMap::from([("blue".to_owned(), 1)]))
        .await
        .unwrap();
    let before = client.state().await.unwrap();

    let (status, message) = rejected(client.disable_network("blue").await.unwrap_err());
    assert_eq!(status, 409, "{message}");
    assert!(
        message.contains("network blue holds 3 endpoint(s) (agent 10.0.0.1: 2, agent 10.0.0.2: 1)"),
        "{message}"
    );
    let (status, message) = rejected(client.remove_network("blue").await.unwrap_err());
    assert_eq!(status, 409, "{message}");
    assert!(message.contains("force=true"), "{message}");
    // The file's network needs force too, whatever its endpoints.
    let (status, message) = rejected(client.remove_network("dcos").await.unwrap_err());
    assert_eq!(status, 409, "{message}");
    assert!(
        message.contains("network dcos holds 1 endpoint(s)"),
        "{message}"
    );
    client
        .heartbeat(agent_ip(1), BTreeMap::from([("blue".to_owned(), 2)]))
        .await
        .unwrap();
    let (status, message) = rejected(client.disable_network("dcos").await.unwrap_err());
    assert_eq!(status, 409, "{message}");
    assert!(
        message.contains("network dcos is defined by the configuration file"),
        "{message}"
    );
    assert_eq!(client.state().await.unwrap(), before, "nothing changed");
    // An unused API network goes without force.
    client.remove_network("idle").await.unwrap();

    // A reload that drops a network in use is refused whole; the running one stays.
    client
        .heartbeat(agent_ip(1), BTreeMap::from([("dcos".to_owned(), 4)]))
        .await
        .unwrap();
    let errors_before = master
        .metric("overlay_master_config_reload_errors_total", "")
        .await;
    master.write_config(
        "vtep_subnet: 44.128.0.0/20\nvtep_mac_oui: 70:B3:D5:00:00:00\noverlays:\n    - name: other\n      subnet: 10.9.0.0/16\n      prefix: 24\n",
    );
    master.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while master
        .metric("overlay_master_config_reload_errors_total", "")
        .await
        <= errors_before
    {
        assert!(
            Instant::now() < deadline,
            "reload not refused; log:\n{}",
            master.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = master.log();
    assert!(
        log.contains("the file removes network dcos which holds 4 endpoint(s)"),
        "{log}"
    );
    let names: Vec<String> = client
        .state()
        .await
        .unwrap()
        .network
        .overlays
        .into_iter()
        .map(|o| o.name)
        .collect();
    assert_eq!(names, ["dcos", "blue"]);

    // Forced: disable keeps the allocations, enable needs nothing, remove frees them.
    let disabled = client.disable_network_forced("blue", true).await.unwrap();
    assert_eq!(disabled.enabled, Some(false));
    let info = client.register(agent_ip(2)).await.unwrap();
    let blue = info
        .overlays
        .iter()
        .find(|o| o.info.name == "blue")
        .unwrap();
    assert!(
        blue.subnet.is_some(),
        "a disabled network keeps its allocations"
    );
    client.enable_network("blue").await.unwrap();
    client.remove_network_forced("blue", true).await.unwrap();
    // Force does not bypass validation: the last network cannot go.
    let (status, message) = rejected(
        client
            .remove_network_forced("dcos", true)
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 400, "{message}");
}
