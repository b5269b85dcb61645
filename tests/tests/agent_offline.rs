//! An agent restarted while the master is down (issue 19, finding 2): it serves container
//! ADD/DEL from the allocation and state it saved, traffic keeps flowing, and it reconciles
//! with the master once it is back.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use overlay_api::agent::AgentStatus;
use overlay_lab::{Container, cluster::Cluster};
use overlay_tests::fixtures::cluster;

fn ip(c: &Container) -> Ipv4Addr {
    c.node.ip.unwrap()
}

/// Waits (20 s at most) for a status of `agent` that `ok` accepts.
fn wait_status(
    c: &Cluster,
    agent: &str,
    what: &str,
    ok: impl Fn(&AgentStatus) -> bool,
) -> AgentStatus {
    let start = Instant::now();
    loop {
        if let Ok(s) = c.agent(agent).status()
            && ok(&s)
        {
            return s;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let log = std::fs::read_to_string(c.log_path(agent)).unwrap_or_default();
            panic!(
                "{agent}: no {what} within 20 s (last: {:?}); its log:\n{log}",
                c.agent(agent).status().ok()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn saved_state_file(c: &Cluster, agent: &str) -> std::path::PathBuf {
    c.work_dir()
        .join(format!("{agent}-state"))
        .join(overlay_agent::saved::SAVED_STATE_FILE)
}

#[test]
fn an_agent_restarted_while_the_master_is_down_attaches_containers_from_its_saved_state() {
    let mut c = cluster(2);
    let a = c.add_container("a1", "dcos").unwrap();
    let b = c.add_container("a2", "dcos").unwrap();
    assert!(a.node.ping(ip(&b)), "no traffic before the outage");
    let before = c.agent("a1").status().unwrap();
    assert_eq!(before.state_source, "master");
    assert!(before.master_reachable);
    let me = before.agent.clone().unwrap();
    assert!(
        saved_state_file(&c, "a1").exists(),
        "applied state not saved"
    );

    c.kill_master(0);
    c.stop_agent("a1");
    c.spawn_agent("a1").unwrap();
    let offline = wait_status(&c, "a1", "saved state", |s| s.state_source == "saved");
    assert!(!offline.master_reachable, "{offline:?}");
    assert_eq!(offline.agent.as_ref(), Some(&me), "allocation not restored");
    assert_eq!(offline.applied_revision, before.applied_revision);
    let log = std::fs::read_to_string(c.log_path("a1")).unwrap();
    assert!(
        log.contains("no master answers: running from the saved state"),
        "no log line says the agent runs from its saved state:\n{log}"
    );
    assert!(a.node.ping(ip(&b)), "traffic broken by the restart");

    // ADD while the master is down: an address of a1's subnet (CNI half), reachable across.
    let subnet = me
        .overlays
        .iter()
        .find(|o| o.info.name == "dcos")
        .and_then(|o| o.subnet)
        .unwrap();
    let n = c.add_container("a1", "dcos").unwrap();
    assert!(subnet.contains(ip(&n)), "{} outside {subnet}", ip(&n));
    assert_ne!(ip(&n), ip(&a), "address handed out twice");
    assert!(n.node.ping(ip(&b)), "new container cannot reach a2's");
    assert!(
        b.node.ping(ip(&n)),
        "a2's container cannot reach the new one"
    );
    assert!(
        n.node.ping(ip(&a)),
        "new container cannot reach its neighbour"
    );
    // DEL while the master is down: the endpoint and its address go.
    c.agent("a1").remove_endpoint(ip(&n)).unwrap();
    assert!(
        !c.agent("a1")
            .endpoints()
            .unwrap()
            .iter()
            .any(|e| e.ip == ip(&n)),
        "endpoint still there after DEL"
    );
    assert!(!b.node.ping(ip(&n)), "deleted container still reachable");
    let used: u32 = c
        .agent("a1")
        .ipam()
        .unwrap()
        .iter()
        .filter(|u| u.network == "dcos")
        .map(|u| u.used)
        .sum();
    assert_eq!(used, 1, "the deleted container's address was not released");

    // The master back: the agent follows it again, same allocation, nothing reported changed.
    c.start_master(0).unwrap();
    let online = wait_status(&c, "a1", "master state", |s| {
        s.state_source == "master" && s.master_reachable
    });
    assert_eq!(online.agent.as_ref(), Some(&me));
    assert_eq!(
        online.allocation_changes, 0,
        "{:?}",
        online.allocation_changed
    );
    let m = c.add_container("a1", "dcos").unwrap();
    assert!(
        m.node.ping(ip(&b)),
        "container added after the reconcile cannot reach a2's"
    );
    assert!(a.node.ping(ip(&b)), "traffic broken after the reconcile");
}

#[test]
fn without_saved_state_and_no_master_an_add_fails_clearly_and_leaves_nothing() {
    let mut c = cluster(1);
    assert!(saved_state_file(&c, "a1").exists());
    c.kill_master(0);
    c.stop_agent("a1");
    std::fs::remove_file(saved_state_file(&c, "a1")).unwrap();
    c.spawn_agent("a1").unwrap();
    let status = wait_status(&c, "a1", "failed registration", |_| {
        std::fs::read_to_string(c.log_path("a1"))
            .unwrap_or_default()
            .contains("no master answers and no saved state")
    });
    assert_eq!(status.state_source, "none");
    assert!(status.agent.is_none());
    let err = format!("{:#}", c.add_container("a1", "dcos").unwrap_err());
    assert!(
        err.contains("not registered with a master yet") && err.contains("no saved state"),
        "unclear error: {err}"
    );
    assert!(c.agent("a1").endpoints().unwrap().is_empty());
}
