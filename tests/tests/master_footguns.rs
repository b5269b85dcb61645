//! Operators' footguns of the master (and one of the agent), each tried on the real binaries:
//! health that follows the store, readiness, the listen address bound before the store is
//! touched, stale agents and leases, the access log, JSON logs without colour, `--version` and
//! `*_build_info`, refusals that name the config file and the network, the agent's `--mtu`
//! against the master's `vtep_mtu`.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use overlay_tests::bin_path;
use overlay_tests::fixtures::agent_ip;
use overlay_tests::master::Master;
use overlay_tests::support_etcd::{EtcdCluster, http};

const TWO_NETWORKS: &str = "overlays:\n  - name: dcos\n    subnet: 9.0.0.0/8\n    prefix: 24\n  - name: blue\n    subnet: 10.1.0.0/16\n    prefix: 24\n";

#[test]
fn health_follows_the_etcd_quorum_and_readiness_is_its_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = EtcdCluster::start(1);
    let master = Master::start_etcd(dir.path(), &etcd.store(), "/footguns/", None);
    let addr = format!("127.0.0.1:{}", master.port);
    let (status, body) = http(&addr, "GET", "/health", None).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""store":"ok""#), "{body}");
    let (status, body) = http(&addr, "GET", "/ready", None).unwrap();
    assert_eq!(status, 200, "{body}");

    etcd.kill(0);
    let (status, body) = http(&addr, "GET", "/health", None).unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("unhealthy") && body.contains("etcd"),
        "{body}"
    );
    let (status, body) = http(&addr, "GET", "/ready", None).unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""ready":false"#), "{body}");
}

#[test]
fn the_listen_address_is_bound_before_the_store_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let data = dir.path().join("data");
    let out = std::process::Command::new(bin_path("overlay-master"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(&data)
        .arg("--insecure-http")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("binding 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(
        !data.exists(),
        "the store was created before the bind failed"
    );
}

async fn liveness(master: &Master) -> Vec<overlay_api::AgentLiveness> {
    master
        .client()
        .get_json("/overlay-master/agents/liveness")
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_agents_are_marked_and_reclaimed_only_after_their_lease() {
    let leased_dir = tempfile::tempdir().unwrap();
    let kept_dir = tempfile::tempdir().unwrap();
    let common = [
        "--heartbeat-timeout-secs",
        "1",
        "--allocation-quarantine-secs",
        "30",
    ];
    let mut leased_args = common.to_vec();
    leased_args.extend(["--agent-lease-secs", "3"]);
    let leased = Master::start_with_args(leased_dir.path(), None, &leased_args).await;
    let kept = Master::start_with_args(kept_dir.path(), None, &common).await;
    // A lease not longer than the heartbeat timeout would reclaim live agents: refused.
    let out = std::process::Command::new(bin_path("overlay-master"))
        .args([
            "--insecure-http",
            "--data-dir",
            "/nonexistent/never-created",
        ])
        .args(["--heartbeat-timeout-secs", "90", "--agent-lease-secs", "60"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--agent-lease-secs 60"),
        "{stderr}"
    );

    for master in [&leased, &kept] {
        master.client().register(agent_ip(1)).await.unwrap();
        let live = liveness(master).await;
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].status, "live", "{live:?}");
        assert!(
            live[0].last_heartbeat_seconds_ago.unwrap() < 1.0,
            "{live:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for master in [&leased, &kept] {
        let live = liveness(master).await;
        assert_eq!(live[0].status, "stale", "{live:?}");
        assert_eq!(master.metric("overlay_master_agents_stale", "").await, 1.0);
        assert_eq!(master.client().state().await.unwrap().agents.len(), 1);
    }
    // The lease (3 s) expires: that master deletes the agent; the other keeps it, stale.
    let deadline = Instant::now() + Duration::from_secs(6);
    while !leased.client().state().await.unwrap().agents.is_empty() {
        assert!(
            Instant::now() < deadline,
            "not reclaimed; log:\n{}",
            leased.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        leased.log().contains("agent leases expired"),
        "{}",
        leased.log()
    );
    assert_eq!(kept.client().state().await.unwrap().agents.len(), 1);
    assert_eq!(liveness(&kept).await[0].status, "stale");
    // Reclaimed on request.
    let deleted = kept.client().delete_agents(&[agent_ip(1)]).await.unwrap();
    assert_eq!(deleted, [agent_ip(1)]);
    // Text logs off a terminal carry no colour codes; the deletion is in the access log.
    let log = kept.log();
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log file:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("access")
            && l.contains("/overlay-master/agents/delete")
            && l.contains("caller=admin")
            && l.contains("status=200")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_access_log_version_and_build_info() {
    let dir = tempfile::tempdir().unwrap();
    let master =
        Master::start_with_args(dir.path(), Some(TWO_NETWORKS), &["--log-format", "json"]).await;
    let client = master.client();
    let network = overlay_api::OverlayInfo {
        name: "green".into(),
        subnet: Some("10.2.0.0/16".parse().unwrap()),
        prefix: Some(24),
        subnet6: None,
        prefix6: None,
        enabled: None,
        id: None,
        vni: None,
        masquerade: None,
    };
    client.add_network(&network).await.unwrap();
    // An API error names the network, not its place in the list.
    let clash = overlay_api::OverlayInfo {
        name: "clash".into(),
        subnet: Some("10.2.128.0/17".parse().unwrap()),
        ..network.clone()
    };
    let error = client.add_network(&clash).await.unwrap_err().to_string();
    assert!(
        error.contains("clash") && error.contains("green"),
        "{error}"
    );
    // A network of the config file: 409 naming the file.
    let error = client.remove_network("dcos").await.unwrap_err();
    assert_eq!(error.rejected_status(), Some(409), "{error}");
    let config = dir.path().join("config.yaml");
    assert!(
        error.to_string().contains(config.to_str().unwrap()),
        "{error}"
    );

    let log = master.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let access: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["target"] == "access").collect();
    let added = access
        .iter()
        .find(|l| l["fields"]["path"] == "/overlay-master/networks")
        .unwrap_or_else(|| panic!("no access line for the add: {log}"));
    assert_eq!(added["fields"]["method"], "POST");
    assert_eq!(added["fields"]["status"], 201);
    assert_eq!(added["fields"]["caller"], "admin");
    assert!(
        access
            .iter()
            .any(|l| l["fields"]["method"] == "DELETE" && l["fields"]["status"] == 409),
        "{log}"
    );
    // GETs are not state-changing: not in the access log.
    assert!(
        !access.iter().any(|l| l["fields"]["method"] == "GET"),
        "{log}"
    );

    let version = std::process::Command::new(bin_path("overlay-master"))
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.contains("(git ") && version.contains("map layout v"),
        "{version}"
    );
    assert_eq!(
        master
            .metric("overlay_master_build_info", "git_revision=")
            .await,
        1.0
    );
    let agent_version = std::process::Command::new(bin_path("overlay-agent"))
        .arg("--version")
        .output()
        .unwrap();
    let agent_version = String::from_utf8_lossy(&agent_version.stdout);
    assert!(agent_version.contains("map layout v"), "{agent_version}");
}

#[test]
fn an_agent_mtu_conflicting_with_the_masters_vtep_mtu_is_refused_naming_both() {
    use overlay_lab::cluster::{Cluster, ClusterSpec};
    let bin_dir = bin_path("overlay-agent").parent().unwrap().to_owned();
    let mut spec = ClusterSpec::new(1, &bin_dir);
    spec.config = format!("vtep_mtu: 1400\n{TWO_NETWORKS}");
    spec.mtu = 1420;
    let error = format!(
        "{:#}",
        Cluster::up(spec).err().expect("the agent should refuse")
    );
    assert!(
        error.contains("--mtu 1420 conflicts with the master's vtep_mtu 1400"),
        "{error}"
    );
    // The same value on both sides: the agent runs.
    let mut spec = ClusterSpec::new(1, &bin_dir);
    spec.config = format!("vtep_mtu: 1400\n{TWO_NETWORKS}");
    spec.mtu = 1400;
    let c = Cluster::up(spec).unwrap();
    assert!(c.agent("a1").status().unwrap().agent.is_some());
    // The agent logs to standard error without colour codes off a terminal.
    let log = std::fs::read_to_string(c.log_path("a1")).unwrap();
    assert!(log.contains("registered with the master"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in the agent's log file:\n{log}"
    );
}
