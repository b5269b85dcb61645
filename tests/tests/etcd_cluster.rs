//! Several masters on etcd in a lab: three masters and three etcd members on the master node,
//! agents given every master. Killing the agents' first master and an etcd member keeps
//! container traffic flowing; a new agent still joins, and everyone learns of it.

use std::collections::BTreeSet;
use std::time::Duration;

use overlay_lab::cluster::Cluster;
use overlay_tests::fixtures::cluster_spec;

#[test]
fn agents_fail_over_between_masters_on_etcd_and_traffic_keeps_flowing() {
    let mut spec = cluster_spec(2);
    spec.masters = 3;
    spec.etcd_members = 3;
    let mut c = Cluster::up(spec).unwrap();
    assert_eq!(c.master_urls().len(), 3);

    let x1 = c.add_container("a1", "dcos").unwrap();
    let x2 = c.add_container("a2", "dcos").unwrap();
    let (ip1, ip2) = (x1.node.ip.unwrap(), x2.node.ip.unwrap());
    assert!(x1.node.ping(ip2), "no traffic before any failure");
    let before = (c.agent_info("a1").unwrap(), c.agent_info("a2").unwrap());

    // 60 pings over 6 s while the agents' first master and an etcd member die.
    let pinger = {
        let node = x1.node.clone();
        std::thread::spawn(move || {
            node.exec(
                "ping",
                &["-c", "60", "-i", "0.1", "-W", "1", "-q", &ip2.to_string()],
            )
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    c.kill_master(0);
    c.kill_etcd(0);

    // A new agent registers (through master 1 or 2) and reaches the others both ways, so the
    // old agents followed the change through the surviving masters' watch.
    let a3 = c.join_agent().unwrap();
    let x3 = c.add_container(&a3, "dcos").unwrap();
    let ip3 = x3.node.ip.unwrap();
    let mut reached = false;
    for _ in 0..50 {
        if x3.node.ping(ip1) && x1.node.ping(ip3) {
            reached = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        reached,
        "new agent {a3} not reachable after failover; a1 log:\n{}",
        std::fs::read_to_string(c.log_path("a1")).unwrap_or_default()
    );

    let summary = pinger.join().unwrap().expect("ping ran");
    assert!(
        summary.contains("60 packets transmitted, 60 received"),
        "traffic was interrupted during failover: {summary}"
    );
    // Allocations survived; nobody shares a VTEP.
    assert_eq!(c.agent_info("a1").unwrap(), before.0);
    assert_eq!(c.agent_info("a2").unwrap(), before.1);
    let vteps: BTreeSet<_> = ["a1", "a2", a3.as_str()]
        .iter()
        .map(|a| c.agent_info(a).unwrap().overlays[0].backend.vxlan.vtep_ip)
        .collect();
    assert_eq!(vteps.len(), 3, "{vteps:?}");
}
