//! A disabled network keeps its containers: real master, real agents, real packets. While the
//! network is disabled its containers' endpoints are parked (addresses and IPAM records kept,
//! out of the datapath: their traffic is dropped and nobody reaches them, as a DC/OS overlay
//! that is not enabled carries nothing); enabled again, traffic flows with no runtime call.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use overlay_datapath::OverlayMaps;
use overlay_lab::{
    Container,
    cluster::{Cluster, ClusterSpec},
};
use overlay_tests::fixtures::bin_dir;
use overlay_tests::lab_pins;

fn ip(c: &Container) -> Ipv4Addr {
    c.node.ip.unwrap()
}

fn maps(cluster: &Cluster, agent: &str) -> OverlayMaps {
    OverlayMaps::open_pinned(&lab_pins(&cluster.lab, agent)).unwrap()
}

fn request(c: &Cluster, method: &str, path: &str) -> (u16, String) {
    let (status, body) = c.master_request(method, path, None).unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Waits until `done` holds (checked every 20 ms), or fails after `limit` saying `what`.
fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what} (after {limit:?})");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn in_datapath(c: &Cluster, agent: &str, addr: Ipv4Addr) -> bool {
    maps(c, agent)
        .endpoints()
        .unwrap()
        .contains_key(&std::net::IpAddr::V4(addr))
}

#[test]
fn a_disabled_network_keeps_its_containers_and_gets_them_back_when_enabled() {
    let bin_dir = bin_dir();
    let mut c = Cluster::up(ClusterSpec::new(2, &bin_dir)).unwrap();
    let x1 = c.add_container("a1", "blue").unwrap();
    let x2 = c.add_container("a1", "blue").unwrap();
    let y = c.add_container("a2", "blue").unwrap();
    let x3 = c.add_container("a1", "blue").unwrap();
    let d = c.add_container("a1", "dcos").unwrap();
    assert!(x1.node.ping(ip(&y)) && x1.node.ping(ip(&x2)), "blue works");

    // The agents report their endpoints: an unforced disable is refused, naming them.
    wait_for(
        Duration::from_secs(5),
        "the master never learnt blue's endpoints",
        || {
            let (status, body) = request(&c, "POST", "/overlay-master/networks/blue/disable");
            assert_eq!(status, 409, "{body}");
            body.contains("network blue holds 4 endpoint(s)")
        },
    );
    let (status, body) = request(&c, "DELETE", "/overlay-master/networks/blue");
    assert_eq!(status, 409, "{body}");

    let (status, body) = request(
        &c,
        "POST",
        "/overlay-master/networks/blue/disable?force=true",
    );
    assert_eq!(status, 200, "{body}");
    wait_for(
        Duration::from_secs(5),
        "blue's endpoints not parked",
        || {
            let parked = |agent: &str| c.agent(agent).status().unwrap().parked_endpoints;
            parked("a1") == vec![ip(&x1), ip(&x2), ip(&x3)] && parked("a2") == vec![ip(&y)]
        },
    );

    // Kept: the addresses stay allocated in the IPAM; out of the datapath meanwhile.
    for (agent, containers) in [("a1", vec![&x1, &x2]), ("a2", vec![&y])] {
        let usage = c.agent(agent).ipam().unwrap();
        let allocated: Vec<std::net::IpAddr> = usage
            .iter()
            .filter(|u| u.network == "blue")
            .flat_map(|u| u.allocations.iter().map(|a| a.ip))
            .collect();
        for container in containers {
            assert!(
                allocated.contains(&ip(container).into()),
                "{agent}: {} lost its address: {usage:?}",
                ip(container)
            );
            assert!(!in_datapath(&c, agent, ip(container)));
        }
    }
    // While disabled, blue carries nothing: within the agent, across agents, from dcos.
    assert!(
        !x1.node.ping(ip(&x2)),
        "disabled network delivered on one agent"
    );
    assert!(
        !x1.node.ping(ip(&y)),
        "disabled network delivered across agents"
    );
    assert!(
        !y.node.ping(ip(&x1)),
        "disabled network delivered across agents"
    );
    assert!(
        !d.node.ping(ip(&x1)),
        "dcos reached a disabled network's container"
    );
    // No new containers on it.
    let err = c.add_container("a1", "blue").unwrap_err();
    assert!(format!("{err:#}").contains("disabled"), "{err:#}");
    // A container deleted meanwhile (its runtime's DEL) leaves nothing: address, parked
    // endpoint, program.
    c.agent("a1").remove_endpoint(ip(&x3)).unwrap();
    let status = c.agent("a1").status().unwrap();
    assert_eq!(status.parked_endpoints, vec![ip(&x1), ip(&x2)]);
    let still_allocated = c
        .agent("a1")
        .ipam()
        .unwrap()
        .iter()
        .flat_map(|u| u.allocations.clone())
        .any(|a| a.ip == ip(&x3));
    assert!(!still_allocated, "x3's address leaked");
    // The master still knows the others are there: removing needs force.
    wait_for(Duration::from_secs(5), "endpoint count not updated", || {
        let (status, body) = request(&c, "DELETE", "/overlay-master/networks/blue");
        assert_eq!(status, 409, "{body}");
        body.contains("holds 3 endpoint(s)")
    });
    // An agent restarted while the network is disabled keeps what it parked.
    c.stop_agent("a1");
    c.start_agent("a1").unwrap();
    assert_eq!(
        c.agent("a1").status().unwrap().parked_endpoints,
        vec![ip(&x1), ip(&x2)]
    );

    // Enabled again: the same containers work, with nothing asked of their runtime.
    let (status, body) = request(&c, "POST", "/overlay-master/networks/blue/enable");
    assert_eq!(status, 200, "{body}");
    wait_for(Duration::from_secs(5), "blue's endpoints not back", || {
        in_datapath(&c, "a1", ip(&x1))
            && in_datapath(&c, "a1", ip(&x2))
            && in_datapath(&c, "a2", ip(&y))
    });
    assert!(c.agent("a1").status().unwrap().parked_endpoints.is_empty());
    wait_for(Duration::from_secs(5), "blue's traffic not back", || {
        x1.node.ping(ip(&y))
    });
    assert!(y.node.ping(ip(&x1)), "across agents, back");
    assert!(x1.node.ping(ip(&x2)), "on one agent, back");
    assert!(!d.node.ping(ip(&x1)), "isolation still holds");
    assert!(
        !in_datapath(&c, "a1", ip(&x3)),
        "a deleted container came back"
    );
    // And nothing is counted as an allocation change: the agents kept theirs.
    assert_eq!(c.agent("a1").status().unwrap().allocation_changes, 0);
}

/// An agent whose allocation the master changed under it (here: the master lost its store and
/// came back with another subnet for `dcos`) says so loudly (error log,
/// `overlay_agent_allocation_changed_total`, status naming the containers now outside its
/// subnet) and keeps those containers' state as it is instead of silently renumbering or
/// dropping them.
#[test]
fn an_agent_whose_allocation_changed_under_it_says_so_and_keeps_its_containers() {
    let bin_dir = bin_dir();
    let mut c = Cluster::up(ClusterSpec::new(2, &bin_dir)).unwrap();
    let x = c.add_container("a1", "dcos").unwrap();
    let y = c.add_container("a2", "dcos").unwrap();
    assert!(x.node.ping(ip(&y)));
    assert_eq!(c.agent("a2").status().unwrap().allocation_changes, 0);

    // The master loses its store and comes back with another `dcos` subnet while a2 is away:
    // a2 restarts during the outage (from its saved state), and the master then hands it a
    // different block. (A deleted agent cannot come back with new blocks at all: deleting it
    // revokes its certificate, control_plane_auth.rs; a forced delete's allocation goes to
    // nobody else during the quarantine, master_safety.rs.)
    c.stop_agent("a2");
    c.kill_master(0);
    std::fs::remove_dir_all(c.work_dir().join("master-data")).unwrap();
    let config = c.work_dir().join("overlay.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("9.0.0.0/8"), "{text}");
    std::fs::write(&config, text.replace("9.0.0.0/8", "10.9.0.0/16")).unwrap();
    c.start_agent("a2").unwrap();
    c.start_master(0).unwrap();

    // a2 registers again, gets other blocks, and says so.
    wait_for(
        Duration::from_secs(20),
        "a2 never reported the change",
        || c.agent("a2").status().unwrap().allocation_changes >= 1,
    );
    let status = c.agent("a2").status().unwrap();
    let message = status.allocation_changed.unwrap();
    assert!(message.contains("network dcos: subnet"), "{message}");
    assert!(message.contains(&ip(&y).to_string()), "{message}");
    let metrics = c.agent("a2").metrics().unwrap();
    assert!(
        metrics.contains("overlay_agent_allocation_changed_total 1"),
        "{metrics}"
    );
    let log = std::fs::read_to_string(c.log_path("a2")).unwrap_or_default();
    assert!(
        log.contains("ERROR") && log.contains("changed this agent's allocation"),
        "{log}"
    );
    // Its container keeps its endpoint (nothing silently renumbered or dropped).
    assert!(in_datapath(&c, "a2", ip(&y)));
}
