//! Mesos UCR: the plugin driven exactly as Mesos' `network/cni` isolator drives it (no Mesos
//! agent can run here, so the test is the isolator): every regular file of the agent's
//! `--mesos-cni-conf-dir` is one single-plugin config; the plugin gets exactly six environment
//! variables (no CNI_ARGS, nothing inherited); the task's `NetworkInfo` is injected on stdin
//! under `args["org.apache.mesos"]["network_info"]`; that JSON is checkpointed and replayed
//! verbatim on DEL, without CNI_NETNS once the netns is gone; the result is read with the CNI
//! 0.1/0.2 schema only (`ip4.ip`), as Mesos does.

use std::net::Ipv4Addr;

use overlay_lab::cluster::{Cluster, ClusterSpec};
use overlay_tests::fixtures::bin_dir;
use overlay_tests::runtimes::{agent_veths as plugin_veths, mesos::Isolator, used};
use serde_json::{Value, json};

#[test]
fn mesos_tasks_get_the_address_mesos_parses_and_reach_each_other_across_agents() {
    let bin_dir = bin_dir();
    let c = Cluster::up(ClusterSpec::new(2, &bin_dir)).unwrap();
    let m1 = Isolator::load(&c, "a1");
    let m2 = Isolator::load(&c, "a2");
    // One single-plugin file per network, without a cniVersion (as DC/OS generated them).
    for m in [&m1, &m2] {
        assert_eq!(m.configs.keys().collect::<Vec<_>>(), ["blue", "dcos"]);
        for conf in m.configs.values() {
            assert!(conf.get("cniVersion").is_none(), "{conf}");
        }
    }
    let ni = |name: &str, extra: Value| {
        let mut v = json!({
            "name": name,
            "labels": {"labels": [{"key": "DCOS_SPACE", "value": "/web"}, {"key": "bare"}]},
            "port_mappings": [{"host_port": 31000, "container_port": 80, "protocol": "tcp"}],
            "groups": [],
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    // A task on a1 with an address of its choosing, one on a2 with any.
    let a1_subnet = c
        .agent_info("a1")
        .unwrap()
        .overlays
        .iter()
        .find(|o| o.info.name == "dcos")
        .and_then(|o| o.subnet)
        .unwrap();
    let wanted = Ipv4Addr::from(u32::from(a1_subnet.network()) + 9);
    let t1 = m1.launch(ni(
        "dcos",
        json!({"ip_addresses": [{"protocol": "IPv4", "ip_address": wanted.to_string()}]}),
    ));
    assert_eq!(t1.ip, wanted, "the requested ip_addresses entry");
    let t2 = m2.launch(ni("dcos", json!({"ip_addresses": [{"protocol": "IPv4"}]})));
    let t3 = m1.launch(ni("dcos", json!({})));
    // What Mesos parsed is what the task has.
    for t in [&t1, &t2, &t3] {
        assert_eq!(t.addr(), Some(t.ip), "task {}", t.container_id);
    }
    assert!(t1.ping(t2.ip), "a1 -> a2");
    assert!(t2.ping(t1.ip), "a2 -> a1");
    assert!(t3.ping(t1.ip), "same agent");
    // Another network is cut off.
    let blue = m1.launch(ni("blue", json!({})));
    assert_eq!(blue.addr(), Some(blue.ip));
    assert!(!blue.ping(t1.ip) && !blue.ping(t2.ip), "blue reached dcos");
    // A task naming two networks: eth0 on dcos, eth1 on blue, each reaching its own.
    let both = m1.launch(ni("dcos", json!({})));
    let both_blue = m1.attach(&both, ni("blue", json!({})), "eth1");
    assert!(both.ping(t2.ip), "eth0 -> dcos across agents");
    assert!(both.ping(blue.ip), "eth1 -> blue");
    assert!(
        blue.ping(both_blue) && !blue.ping(both.ip),
        "blue reaches only eth1"
    );
    m1.detach(&both, "blue", "eth1");
    m1.destroy(&both, "dcos");
    drop(both);
    assert_eq!((used(&c, "a1"), used(&c, "a2")), (3, 1));
    // DEL replays the checkpoint: while the netns exists, and after it is gone.
    m1.destroy(&t3, "dcos");
    t1.lose_netns();
    m1.destroy(&t1, "dcos");
    blue.lose_netns();
    m1.destroy(&blue, "blue");
    t2.lose_netns();
    m2.destroy(&t2, "dcos");
    // Replayed again (Mesos retries a failed cleanup): still fine.
    let replay = m2.configs["dcos"].to_string();
    assert_eq!(
        m2.plugin("DEL", &t2.container_id, "eth0", None, replay.as_bytes())
            .0,
        0
    );
    for agent in ["a1", "a2"] {
        assert_eq!(used(&c, agent), 0, "{agent}: addresses left");
        assert!(
            c.agent(agent).endpoints().unwrap().is_empty(),
            "{agent}: endpoints left"
        );
        assert_eq!(plugin_veths(&c, agent), 0, "{agent}: veths left");
    }
}
