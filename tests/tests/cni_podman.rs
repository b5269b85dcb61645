//! A real container runtime: Debian's podman (CNI backend) runs containers on two lab agents
//! through the `ebpf-overlay` plugin; they reach each other across agents, and removing them
//! frees their addresses.
//!
//! podman runs inside each agent's network namespace (`nsenter --net`, so that the host side of
//! the veth lands there), with its own temporary storage, config and plugin directories. The
//! image is imported from a tar of busybox-static (nothing can be pulled).

use std::{path::Path, process::Command};

use overlay_lab::cluster::{Cluster, ClusterSpec};
use overlay_tests::{
    bin_path,
    runtimes::{
        BUSYBOX, TempDir, busybox_tar,
        podman::{IMAGE, Podman},
    },
};

#[test]
fn podman_containers_on_two_agents_reach_each_other_and_free_their_addresses() {
    assert!(
        Path::new(BUSYBOX).exists() && Command::new("podman").arg("--version").output().is_ok(),
        "needs podman and busybox-static (cargo xtask setup)"
    );
    let bin_dir = bin_path("overlay-agent").parent().unwrap().to_owned();
    let c = Cluster::up(ClusterSpec::new(2, &bin_dir)).unwrap();
    let tmp = TempDir(std::env::temp_dir().join(format!("{}-podman", c.lab.id())));
    std::fs::create_dir_all(&tmp.0).unwrap();
    let tar = busybox_tar(&tmp.0);
    let p1 = Podman::new(&c, "a1", &tmp.0);
    let p2 = Podman::new(&c, "a2", &tmp.0);
    p1.import(&tar);
    p2.import(&tar);
    let run = |p: &Podman, name: &str| {
        p.run(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "dcos",
            "--cap-add",
            "NET_RAW",
            // podman asks for more open files than this machine allows
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
            // this machine mixes cgroup v1 and v2, which crun refuses to manage
            "--cgroups",
            "disabled",
            IMAGE,
            "/bin/sleep",
            "600",
        ])
        .unwrap()
    };
    run(&p1, "one");
    run(&p2, "two");
    let (ip1, ip2) = (p1.container_ip("one"), p2.container_ip("two"));
    let used = |agent: &str| -> u32 {
        c.agent(agent)
            .ipam()
            .unwrap()
            .iter()
            .filter(|u| u.network == "dcos")
            .map(|u| u.used)
            .sum()
    };
    assert_eq!((used("a1"), used("a2")), (1, 1));
    // The agents' endpoints are the podman containers.
    assert!(
        c.agent("a1")
            .endpoints()
            .unwrap()
            .iter()
            .any(|e| e.ip == ip1)
    );
    assert!(
        c.agent("a2")
            .endpoints()
            .unwrap()
            .iter()
            .any(|e| e.ip == ip2)
    );
    for (p, from, to) in [(&p1, "one", ip2), (&p2, "two", ip1)] {
        let out = p.run(&["exec", from, "ping", "-c", "2", "-W", "2", &to.to_string()]);
        assert!(out.is_ok(), "{from} cannot reach {to}: {out:?}");
    }
    // Removing the containers frees their addresses and endpoints.
    p1.run(&["rm", "--force", "--time", "0", "one"]).unwrap();
    p2.run(&["rm", "--force", "--time", "0", "two"]).unwrap();
    assert_eq!((used("a1"), used("a2")), (0, 0));
    assert!(c.agent("a1").endpoints().unwrap().is_empty());
    assert!(c.agent("a2").endpoints().unwrap().is_empty());
}
