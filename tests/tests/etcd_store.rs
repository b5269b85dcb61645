//! Several `overlay-master` processes on one real 3-member etcd cluster (Debian's
//! `etcd-server`): no duplicate allocation under registration storms spread over the masters,
//! masters learning each other's allocations through etcd's watch, member and quorum loss,
//! start-up from empty/populated etcd, and the same API answers as the embedded store. Every
//! test runs twice: `plain::*` on a plain-http cluster, `tls::*` on one with TLS between
//! members and towards clients, client certificates required, and etcd authentication on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use overlay_api::{AgentInfo, MasterClient, OverlayInfo, State};
use overlay_tests::fixtures::config::ONE_NETWORK;
use overlay_tests::fixtures::free_port;
use overlay_tests::master::{Master, MasterSpec};
use overlay_tests::support_etcd::{EtcdCluster, Security, StoreFlags, http};

const PREFIX: &str = "/ebpf-overlay/";

fn agent_ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
}

fn client(masters: &[&Master]) -> MasterClient {
    MasterClient::new(masters.iter().map(|m| m.base_url())).unwrap()
}

/// Every VTEP address, VTEP MAC and (network, subnet) of the state is held by one agent only.
fn assert_no_duplicates(agents: &[AgentInfo]) {
    let mut vteps = BTreeMap::new();
    let mut macs = BTreeMap::new();
    let mut subnets = BTreeMap::new();
    for agent in agents {
        for overlay in &agent.overlays {
            let vxlan = &overlay.backend.vxlan;
            // An agent's VTEP is the same on every network; count it once per agent.
            if let Some(vtep) = vxlan.vtep_ip
                && let Some(other) = vteps.insert(vtep, agent.ip)
            {
                assert_eq!(
                    other, agent.ip,
                    "VTEP {vtep} held by {other} and {}",
                    agent.ip
                );
            }
            if let Some(mac) = vxlan.vtep_mac
                && let Some(other) = macs.insert(mac, agent.ip)
            {
                assert_eq!(
                    other, agent.ip,
                    "MAC {mac:?} held by {other} and {}",
                    agent.ip
                );
            }
            for subnet in [
                overlay.subnet.map(|s| s.to_string()),
                overlay.subnet6.map(|s| s.to_string()),
            ]
            .into_iter()
            .flatten()
            {
                let key = (overlay.info.name.clone(), subnet.clone());
                assert!(
                    subnets.insert(key, agent.ip).is_none(),
                    "subnet {subnet} of {} handed out twice",
                    overlay.info.name
                );
            }
        }
    }
}

/// Waits until every master serves the same state with `agents` agents; returns it.
async fn converged(masters: &[&Master], agents: usize) -> State {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut states = Vec::new();
        for master in masters {
            if let Ok(state) = client(&[master]).state().await {
                states.push(state);
            }
        }
        if states.len() == masters.len()
            && states.iter().all(|s| s == &states[0])
            && states[0].agents.len() == agents
        {
            return states.pop().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "masters did not converge on {agents} agents: {:?}",
            states.iter().map(|s| s.agents.len()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn same_allocation(a: &AgentInfo, b: &AgentInfo) -> bool {
    a.ip == b.ip && a.overlays == b.overlays
}

async fn registration_storm_over_three_masters_gives_no_duplicate(security: Security) {
    let etcd = EtcdCluster::start_secured(3, security);
    let dir = tempfile::tempdir().unwrap();
    // Started together: their start-up commits race on the empty store too.
    let mut masters: Vec<Master> = (0..3)
        .map(|_| Master::spawn_etcd(dir.path(), &etcd.store(), PREFIX, None))
        .collect();
    for master in &mut masters {
        master.wait_ready();
    }
    let refs: Vec<&Master> = masters.iter().collect();

    // 3 x 100 agents, each sent to one master, all at once; then every agent registers again
    // at another master and must get the same allocation back.
    const AGENTS: u32 = 300;
    let mut tasks = Vec::new();
    for n in 1..=AGENTS {
        let first = client(&[refs[(n % 3) as usize]]);
        let second = client(&[refs[((n + 1) % 3) as usize]]);
        tasks.push(tokio::spawn(async move {
            let a = first.register(agent_ip(n)).await.expect("register");
            let b = second.register(agent_ip(n)).await.expect("register again");
            (a, b)
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        let (a, b) = task.await.unwrap();
        assert!(
            same_allocation(&a, &b),
            "two masters disagree:\n{a:?}\n{b:?}"
        );
        answers.push(a);
    }
    assert_no_duplicates(&answers);
    let state = converged(&refs, AGENTS as usize).await;
    assert_no_duplicates(&state.agents);
    for answer in &answers {
        let stored = state.agents.iter().find(|a| a.ip == answer.ip).unwrap();
        assert!(same_allocation(answer, stored), "answer differs from state");
    }
    // The pools stay dense (lowest free first, no hole left by a lost race): 300 agents
    // hold exactly 44.128.0.1 ..= 44.128.1.44.
    let vteps: BTreeSet<Ipv4Addr> = state
        .agents
        .iter()
        .filter_map(|a| a.overlays[0].backend.vxlan.vtep_ip.map(|v| v.ip()))
        .collect();
    assert_eq!(vteps.len(), AGENTS as usize);
    assert_eq!(
        (vteps.first().copied(), vteps.last().copied()),
        (
            Some("44.128.0.1".parse().unwrap()),
            Some("44.128.1.44".parse().unwrap())
        )
    );
}

async fn masters_follow_each_other_and_survive_a_member_and_a_master_loss(security: Security) {
    let mut etcd = EtcdCluster::start_secured(3, security);
    let dir = tempfile::tempdir().unwrap();
    let mut m1 = Master::start_etcd(dir.path(), &etcd.store(), PREFIX, None);
    let m2 = Master::start_etcd(dir.path(), &etcd.store(), PREFIX, None);
    let c1 = client(&[&m1]);
    let c2 = client(&[&m2]);

    // A long-poll on m2 wakes when m1 allocates (etcd watch -> m2's state -> m2's watchers).
    let current = c2.watch(u64::MAX, Duration::from_millis(1)).await.unwrap();
    let revision = current.expect("a revision differs from MAX").revision;
    let watcher = {
        let c2 = c2.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let watched = c2.watch(revision, Duration::from_secs(10)).await;
            (start.elapsed(), watched)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let first = c1.register(agent_ip(1)).await.unwrap();
    let (waited, watched) = watcher.await.unwrap();
    let watched = watched.unwrap().expect("m2's watch woke");
    assert!(
        waited < Duration::from_secs(3),
        "m2 learned after {waited:?}"
    );
    assert!(watched.revision > revision);
    let seen = watched.state.agents.iter().find(|a| a.ip == agent_ip(1));
    assert!(same_allocation(seen.expect("agent 1 on m2"), &first));
    // m2 hands out the next VTEP, not m1's.
    let second = c2.register(agent_ip(2)).await.unwrap();
    assert_no_duplicates(&[first.clone(), second.clone()]);

    // Kill an etcd member: both masters keep allocating.
    etcd.kill(0);
    for n in 3..=12 {
        let c = if n % 2 == 0 { &c1 } else { &c2 };
        c.register(agent_ip(n)).await.unwrap_or_else(|e| {
            panic!(
                "register {n} with a member down: {e}\nm1:\n{}\nm2:\n{}",
                m1.log(),
                m2.log()
            )
        });
    }
    let state = converged(&[&m1, &m2], 12).await;
    assert_no_duplicates(&state.agents);

    // Kill a master: a client with both addresses fails over; allocations are kept; new
    // agents still register.
    let both = client(&[&m1, &m2]);
    m1.kill();
    let again = both.register(agent_ip(1)).await.unwrap();
    assert!(same_allocation(&again, &first));
    both.register(agent_ip(13)).await.unwrap();
    let state = converged(&[&m2], 13).await;
    assert_no_duplicates(&state.agents);
}

async fn quorum_loss_refuses_writes_with_503_naming_etcd_and_recovers(security: Security) {
    let mut etcd = EtcdCluster::start_secured(3, security);
    let dir = tempfile::tempdir().unwrap();
    let m1 = Master::start_etcd(dir.path(), &etcd.store(), PREFIX, None);
    let m2 = Master::start_etcd(dir.path(), &etcd.store(), PREFIX, None);
    let c1 = client(&[&m1]);
    let mut before = Vec::new();
    for n in 1..=5 {
        before.push(c1.register(agent_ip(n)).await.unwrap());
    }
    converged(&[&m1, &m2], 5).await;

    etcd.kill(1);
    etcd.kill(2);
    let addr = format!("127.0.0.1:{}", m1.port);
    let register = |n: u32| {
        let addr = addr.clone();
        move || {
            http(
                &addr,
                "POST",
                "/overlay-master/agents",
                Some(&format!(r#"{{"ip":"{}"}}"#, agent_ip(n))),
            )
        }
    };
    let start = Instant::now();
    let (status, body) = tokio::task::spawn_blocking(register(6))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 503, "{body}\nlog:\n{}", m1.log());
    assert!(body.contains("etcd"), "the error names etcd: {body}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    // Reads and heartbeats of registered agents are served from memory meanwhile.
    let (status, _) = tokio::task::spawn_blocking(register(3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(client(&[&m2]).state().await.unwrap().agents.len(), 5);

    etcd.spawn(1);
    etcd.spawn(2);
    etcd.wait_writable(Duration::from_secs(20));
    // Writes work again (the masters were not restarted); nothing was lost.
    let deadline = Instant::now() + Duration::from_secs(15);
    let sixth = loop {
        match c1.register(agent_ip(6)).await {
            Ok(info) => break info,
            Err(e) => {
                assert!(Instant::now() < deadline, "no recovery: {e}\n{}", m1.log());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let seventh = client(&[&m2]).register(agent_ip(7)).await.unwrap();
    let state = converged(&[&m1, &m2], 7).await;
    assert_no_duplicates(&state.agents);
    for info in before.iter().chain([&sixth, &seventh]) {
        let stored = state.agents.iter().find(|a| a.ip == info.ip).unwrap();
        assert!(
            same_allocation(info, stored),
            "allocation of {} changed",
            info.ip
        );
    }
}

async fn start_initialises_recovers_and_refuses_a_conflicting_config(security: Security) {
    let etcd = EtcdCluster::start_secured(3, security);
    let dir = tempfile::tempdir().unwrap();
    let prefix = "/tenant-a/";
    let mut m1 = Master::start_etcd(dir.path(), &etcd.store(), prefix, Some(ONE_NETWORK));
    let first = client(&[&m1]).register(agent_ip(1)).await.unwrap();
    m1.kill();
    // A fresh master on the populated prefix recovers the allocations.
    let m2 = Master::start_etcd(dir.path(), &etcd.store(), prefix, Some(ONE_NETWORK));
    let again = client(&[&m2]).register(agent_ip(1)).await.unwrap();
    assert!(same_allocation(&again, &first));
    let second = client(&[&m2]).register(agent_ip(2)).await.unwrap();
    assert_no_duplicates(&[first, second]);

    // Another prefix is another, empty, cluster.
    let other = Master::start_etcd(dir.path(), &etcd.store(), "/tenant-b/", None);
    assert!(client(&[&other]).state().await.unwrap().agents.is_empty());

    // A config whose prefix length contradicts the stored allocations is refused.
    let conflicting = ONE_NETWORK.replace("prefix: 24", "prefix: 23");
    let mut m3 = Master::spawn_etcd(dir.path(), &etcd.store(), prefix, Some(&conflicting));
    let (status, log) = m3.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("does not match the stored state") && log.contains("dcos"),
        "{log}"
    );
    // ...and changed nothing.
    assert_eq!(client(&[&m2]).state().await.unwrap().agents.len(), 2);

    // Unreachable etcd: a clear error at start.
    let dead = StoreFlags {
        url: format!("etcd://127.0.0.1:{}", free_port()),
        ..etcd.store()
    };
    let mut m4 = Master::spawn_etcd(dir.path(), &dead, prefix, None);
    let (status, log) = m4.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("etcd"), "{log}");
}

fn network(name: &str, subnet: &str) -> OverlayInfo {
    serde_json::from_value(serde_json::json!({"name": name, "subnet": subnet, "prefix": 24}))
        .unwrap()
}

/// A redb master and an etcd master given the same requests give the same answers, byte for
/// byte, including the DC/OS state JSON and the watch.
async fn state_api_answers_like_the_embedded_store(security: Security) {
    let etcd = EtcdCluster::start_secured(3, security);
    let dir = tempfile::tempdir().unwrap();
    let etcd_master = Master::start_etcd(dir.path(), &etcd.store(), PREFIX, None);
    // The same process on its embedded store.
    let redb = MasterSpec::new(dir.path())
        .data_dir(&dir.path().join("redb"))
        .insecure_http()
        .start();

    let targets = [redb.addr(), format!("127.0.0.1:{}", etcd_master.port)];
    let blue = serde_json::to_string(&network("blue", "10.1.0.0/16")).unwrap();
    let overlap = serde_json::to_string(&network("dup", "10.1.5.0/24")).unwrap();
    let steps: Vec<(&str, String, Option<String>)> = vec![
        (
            "POST",
            "/overlay-master/agents".into(),
            Some(r#"{"ip":"172.17.0.3"}"#.into()),
        ),
        (
            "POST",
            "/overlay-master/agents".into(),
            Some(r#"{"ip":"172.17.0.4"}"#.into()),
        ),
        (
            "POST",
            "/overlay-master/agents".into(),
            Some(r#"{"ip":"172.17.0.3"}"#.into()),
        ),
        ("GET", "/overlay-master/state".into(), None),
        (
            "POST",
            "/overlay-master/networks".into(),
            Some(blue.clone()),
        ),
        ("POST", "/overlay-master/networks".into(), Some(blue)),
        ("POST", "/overlay-master/networks".into(), Some(overlap)),
        ("POST", "/overlay-master/networks/blue/disable".into(), None),
        (
            "POST",
            "/overlay-master/agents".into(),
            Some(r#"{"ip":"172.17.0.5"}"#.into()),
        ),
        (
            "POST",
            "/overlay-master/agents/delete?force=true".into(),
            Some(r#"{"agents":["172.17.0.4"]}"#.into()),
        ),
        (
            "POST",
            "/overlay-master/agents".into(),
            Some(r#"{"ip":"172.17.0.6"}"#.into()),
        ),
        ("POST", "/overlay-master/networks/blue/enable".into(), None),
        ("DELETE", "/overlay-master/networks/nope".into(), None),
        (
            "POST",
            "/overlay-master/agents".into(),
            Some(r#"{"ip":"not-an-ip"}"#.into()),
        ),
        ("GET", "/overlay-master/state".into(), None),
        ("DELETE", "/overlay-master/networks/blue".into(), None),
        ("GET", "/overlay-master/state".into(), None),
    ];
    let revisions = |addr: &str| -> u64 {
        let (_, body) = http(addr, "GET", "/health", None).unwrap();
        let health: serde_json::Value = serde_json::from_str(&body).unwrap();
        health["revision"].as_u64().unwrap()
    };
    let base: Vec<u64> = targets.iter().map(|t| revisions(t)).collect();
    for (method, path, body) in &steps {
        let answers: Vec<(u16, String)> = targets
            .iter()
            .map(|addr| http(addr, method, path, body.as_deref()).unwrap())
            .collect();
        assert_eq!(
            answers[0], answers[1],
            "{method} {path}: redb (left) and etcd (right) differ"
        );
        assert!(answers[0].0 < 500, "{method} {path}: {:?}", answers[0]);
    }
    // The same number of commits, and the watch answers the same relative to the start.
    let now: Vec<u64> = targets.iter().map(|t| revisions(t)).collect();
    assert_eq!(now[0] - base[0], now[1] - base[1]);
    let watch: Vec<String> = targets
        .iter()
        .zip(&base)
        .map(|(addr, base)| {
            let path = format!("/overlay-master/watch?after={base}&timeout_ms=10");
            let (status, body) = http(addr, "GET", &path, None).unwrap();
            assert_eq!(status, 200);
            let value: serde_json::Value = serde_json::from_str(&body).unwrap();
            value["state"].to_string()
        })
        .collect();
    assert_eq!(watch[0], watch[1]);
}

/// Each test above as `plain::NAME` and `tls::NAME`.
macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod plain {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Security::Plain).await
                }
            )*
        }
        mod tls {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Security::TlsAuth).await
                }
            )*
        }
    };
}

in_both_modes!(
    registration_storm_over_three_masters_gives_no_duplicate,
    masters_follow_each_other_and_survive_a_member_and_a_master_loss,
    quorum_loss_refuses_writes_with_503_naming_etcd_and_recovers,
    start_initialises_recovers_and_refuses_a_conflicting_config,
    state_api_answers_like_the_embedded_store,
);
