//! The agent host and the overlay, with no VXLAN device: the host reaches local and remote
//! containers on every network (a scheduler's health checks), and containers reach their host.

use std::net::Ipv4Addr;

use overlay_lab::{Container, cluster::Cluster};

fn cluster() -> Cluster {
    overlay_tests::fixtures::cluster(2)
}

fn ip(c: &Container) -> Ipv4Addr {
    c.node.ip.unwrap()
}

/// This agent's gateway address on `network`: the host's address inside that overlay.
fn gateway(c: &Cluster, agent: &str, network: &str) -> Ipv4Addr {
    let info = c.agent_info(agent).unwrap();
    let ov = info
        .overlays
        .iter()
        .find(|o| o.info.name == network)
        .unwrap();
    let half = ov.mesos_bridge.as_ref().unwrap().ip.unwrap();
    Ipv4Addr::from(u32::from(half.network()) + 1)
}

#[test]
fn the_host_reaches_local_and_remote_containers_on_two_networks_and_back() {
    let mut c = cluster();
    let x1 = c.add_container("a1", "dcos").unwrap();
    let y1 = c.add_container("a1", "blue").unwrap();
    let x2 = c.add_container("a2", "dcos").unwrap();
    let y2 = c.add_container("a2", "blue").unwrap();
    let host = c.lab.node("a1").unwrap().clone();

    for (what, target) in [
        ("local dcos", &x1),
        ("local blue", &y1),
        ("remote dcos", &x2),
        ("remote blue", &y2),
    ] {
        assert!(
            host.ping(ip(target)),
            "host a1 cannot reach the {what} container {}",
            ip(target)
        );
    }
    // TCP from the host to a remote container, payload intact.
    let dir = tempfile::tempdir().unwrap();
    let got = dir.path().join("tcp");
    let mut server = x2.node.command("sh");
    server.args(["-c", &format!("nc -l -p 7100 > {}", got.display())]);
    let mut server = server.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    host.exec(
        "sh",
        &[
            "-c",
            &format!("echo from-the-host | nc -N {} 7100", ip(&x2)),
        ],
    )
    .unwrap();
    server.wait().unwrap();
    assert_eq!(std::fs::read_to_string(&got).unwrap(), "from-the-host\n");

    // Containers reach their host: at its gateway address on their network, and at its
    // underlay address; a remote container reaches this host's gateway too.
    let (gw_dcos, gw_blue) = (gateway(&c, "a1", "dcos"), gateway(&c, "a1", "blue"));
    assert!(
        x1.node.ping(gw_dcos),
        "container cannot reach its host's gateway address"
    );
    assert!(
        y1.node.ping(gw_blue),
        "blue container cannot reach its host's blue gateway"
    );
    assert!(
        x1.node.ping(host.ip.unwrap()),
        "container cannot reach its host's underlay address"
    );
    assert!(
        x2.node.ping(gw_dcos),
        "remote container cannot reach agent a1's host"
    );
    // The host's address on another network is still another network.
    assert!(
        !x1.node.ping(gw_blue),
        "dcos container reached the host through blue's gateway"
    );
}
