//! Every runtime on the same overlay (issue 16's closing test): on two agents, a Mesos task
//! (the `network/cni` isolator, emulated), a podman container, a Docker container (real
//! dockerd, the agent's remote driver) and a containerd container (`ctr run --cni`), one of
//! each on network `dcos` and one on `blue`, on each agent: every runtime pair (and every
//! runtime with itself) is met on one agent and across agents.
//!
//! Every container pings and TCP-connects to every other: same network reaches, other network
//! is blocked and counted (`drop_cross_network`). Then each container is removed through its
//! runtime, and its agent frees the address and leaves no endpoint, veth or link pin.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Instant,
};

use overlay_lab::cluster::{Cluster, ClusterSpec};
use overlay_tests::fixtures::bin_dir;
use overlay_tests::{
    bin_path, lab_pins,
    runtimes::{
        BUSYBOX, TempDir, agent_veths, busybox_tar,
        containerd::{self, Containerd},
        cross_drops,
        docker::{self, Dockerd},
        mesos::{Isolator, Task},
        podman::{self, Podman},
        used,
    },
};
use serde_json::json;

const NETWORKS: [&str; 2] = ["dcos", "blue"];
/// Every container serves this port: `nc` answering `pong` to each connection.
const PORT: &str = "7000";
const SERVER: &[&str] = &["/bin/nc", "-ll", "-p", PORT, "-e", "/bin/echo", "pong"];

/// Where a container lives and how its runtime reaches it.
enum Handle {
    /// A Mesos task and the TCP server started in its netns.
    Mesos(Task, Killed),
    Docker(String),
    /// A containerd container and the `ctr run --rm --cni` holding it.
    Containerd(String, Killed),
    Podman(String),
}

/// A process of the test's, killed if the test ends before it is reaped.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Member {
    runtime: &'static str,
    agent: &'static str,
    network: &'static str,
    ip: Ipv4Addr,
    handle: Handle,
}

const AGENTS: [&str; 2] = ["a1", "a2"];

/// Index of `agent` in [`AGENTS`].
fn idx(agent: &str) -> usize {
    AGENTS.iter().position(|a| *a == agent).unwrap()
}

/// The runtimes, one of each per agent (indexed as [`AGENTS`]); containerd is one daemon, its
/// `ctr` run in each agent's namespace.
struct Runtimes<'a> {
    mesos: Vec<Isolator<'a>>,
    podman: Vec<Podman>,
    docker: Vec<Dockerd>,
    containerd: Containerd,
    /// Each agent's conflists, for `ctr` (which takes the first file of a directory): one
    /// directory per agent and network holding only that network's list.
    ctr_conf: Vec<(&'static str, &'static str, std::path::PathBuf)>,
    plugins: std::path::PathBuf,
    netns: Vec<std::path::PathBuf>,
}

impl Member {
    fn label(&self) -> String {
        format!(
            "{}@{}/{} ({})",
            self.runtime, self.agent, self.network, self.ip
        )
    }

    /// Runs `script` (busybox applets named explicitly) inside the container.
    fn sh(&self, rt: &Runtimes, script: &str) -> anyhow::Result<String> {
        match &self.handle {
            // The task's netns runs the host's busybox (the same binary as the images').
            Handle::Mesos(task, _) => task.sh(script),
            Handle::Docker(name) => {
                rt.docker[idx(self.agent)].run(&["exec", name, "/bin/sh", "-c", script])
            }
            Handle::Containerd(id, _) => rt.containerd.exec(id, script),
            Handle::Podman(name) => {
                rt.podman[idx(self.agent)].run(&["exec", name, "/bin/sh", "-c", script])
            }
        }
    }
}

/// One script probing every target in parallel: a ping and a TCP exchange each, printing
/// `P <ip> ok|no` and `T <ip> ok|no`.
fn probe_script(targets: &[Ipv4Addr], wait: u32) -> String {
    let mut s = String::new();
    for ip in targets {
        s.push_str(&format!(
            "(busybox ping -c 1 -W {wait} {ip} >/dev/null 2>&1 && echo 'P {ip} ok' || echo 'P {ip} no') & \
             (busybox nc -w {wait} {ip} {PORT} </dev/null 2>/dev/null | busybox grep -q pong && echo 'T {ip} ok' || echo 'T {ip} no') & "
        ));
    }
    s.push_str("wait");
    s
}

fn endpoint_ips(c: &Cluster, agent: &str) -> Vec<std::net::IpAddr> {
    c.agent(agent)
        .endpoints()
        .unwrap()
        .into_iter()
        .map(|e| e.ip.into())
        .collect()
}

/// The agent's pinned TCX links on container veths.
fn container_link_pins(c: &Cluster, agent: &str) -> usize {
    let dir = lab_pins(&c.lab, agent).links_dir();
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| !e.file_name().to_string_lossy().contains("@eth0"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn mesos_docker_containerd_and_podman_containers_share_two_networks_across_agents() {
    assert!(
        Path::new(BUSYBOX).exists()
            && Path::new(docker::DOCKER).exists()
            && Command::new("ctr").arg("--version").output().is_ok()
            && Command::new("podman").arg("--version").output().is_ok(),
        "needs docker.io, containerd, podman and busybox-static (cargo xtask setup)"
    );
    let started = Instant::now();
    let bin_dir = bin_dir();
    let root = TempDir(std::env::temp_dir().join(format!(
        "eo-matrix-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )));
    std::fs::create_dir_all(&root.0).unwrap();
    let mut spec = ClusterSpec::new(2, &bin_dir);
    spec.agent_args = docker::agent_args(&root.0.join("docker"));
    let c = Cluster::up(spec).unwrap();

    // The runtimes: dockerd started first (the slowest), images imported meanwhile.
    let dockerds: Vec<Dockerd> = AGENTS
        .iter()
        .map(|a| Dockerd::spawn(&c, a, &root.0.join("docker")))
        .collect();
    let tar = busybox_tar(&root.0);
    let oci_dir = root.0.join("oci-image");
    std::fs::create_dir_all(&oci_dir).unwrap();
    let oci_tar = containerd::busybox_oci_tar(&oci_dir);
    let podmans: Vec<Podman> = AGENTS.iter().map(|a| Podman::new(&c, a, &root.0)).collect();
    for p in &podmans {
        p.import(&tar);
    }
    let ctrd = Containerd::start(&root.0.join("containerd"));
    ctrd.ctr(&[
        "image",
        "import",
        "--snapshotter",
        "native",
        oci_tar.to_str().unwrap(),
    ]);
    let plugins = root.0.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(bin_path("ebpf-overlay"), plugins.join("ebpf-overlay")).unwrap();
    let ctr_conf = AGENTS
        .iter()
        .flat_map(|a| NETWORKS.map(|net| (*a, net)))
        .map(|(agent, net)| {
            let dir = root.0.join(format!("ctr-net.d-{agent}-{net}"));
            std::fs::create_dir_all(&dir).unwrap();
            let list = std::fs::read_dir(c.cni_conf_dir(agent))
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.to_string_lossy().ends_with(&format!("-{net}.conflist")))
                .unwrap_or_else(|| panic!("{agent} has no list for {net}"));
            std::fs::copy(&list, dir.join(list.file_name().unwrap())).unwrap();
            (agent, net, dir)
        })
        .collect();
    for d in &dockerds {
        d.wait_ready();
        d.run(&["import", tar.to_str().unwrap(), docker::IMAGE])
            .unwrap();
        for net in NETWORKS {
            d.wait_network(net);
        }
    }
    let rt = Runtimes {
        mesos: AGENTS.iter().map(|a| Isolator::load(&c, a)).collect(),
        podman: podmans,
        docker: dockerds,
        containerd: ctrd,
        ctr_conf,
        plugins,
        netns: AGENTS
            .iter()
            .map(|a| c.node(a).unwrap().netns_path())
            .collect(),
    };
    let base = (used(&c, "a1"), used(&c, "a2"));
    let base_veths = (agent_veths(&c, "a1"), agent_veths(&c, "a2"));
    let base_pins = (container_link_pins(&c, "a1"), container_link_pins(&c, "a2"));

    // One container of each runtime on each network.
    let mut members = Vec::new();
    for (agent, net) in AGENTS.iter().flat_map(|a| NETWORKS.map(|net| (*a, net))) {
        let i = idx(agent);
        let task = rt.mesos[i].launch(json!({"name": net, "labels": {"labels": []}}));
        assert_eq!(task.addr(), Some(task.ip), "Mesos parsed another address");
        let mut server = Command::new("ip");
        server
            .args(["netns", "exec", &task.netns_name, BUSYBOX, "nc"])
            .args(&SERVER[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let server = server.spawn().unwrap();
        members.push(Member {
            runtime: "mesos",
            agent,
            network: net,
            ip: task.ip,
            handle: Handle::Mesos(task, Killed(server)),
        });

        let name = format!("pod-{net}-{agent}");
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            net,
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
            podman::IMAGE,
        ];
        args.extend_from_slice(SERVER);
        rt.podman[i].run(&args).unwrap();
        members.push(Member {
            runtime: "podman",
            agent,
            network: net,
            ip: rt.podman[i].container_ip(&name),
            handle: Handle::Podman(name),
        });

        let name = format!("dock-{net}-{agent}");
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            net,
            docker::IMAGE,
        ];
        args.extend_from_slice(SERVER);
        rt.docker[i].run(&args).unwrap();
        members.push(Member {
            runtime: "docker",
            agent,
            network: net,
            ip: rt.docker[i].container_ip(&name),
            handle: Handle::Docker(name),
        });

        let id = format!("ctr-{net}-{agent}-{}", c.lab.id());
        let conf = &rt
            .ctr_conf
            .iter()
            .find(|(a, n, _)| *a == agent && *n == net)
            .unwrap()
            .2;
        let log = std::fs::File::create(root.0.join(format!("{id}.log"))).unwrap();
        let child = rt
            .containerd
            .cni_command(&rt.netns[i], conf, &rt.plugins, &id, &SERVER.join(" "))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let ip = rt.containerd.wait_ip(&id);
        members.push(Member {
            runtime: "containerd",
            agent,
            network: net,
            ip,
            handle: Handle::Containerd(id, Killed(child)),
        });
    }
    // Each address from its agent's subnet of its network, distinct, and an endpoint there.
    for m in &members {
        let subnet = c
            .agent_info(m.agent)
            .unwrap()
            .overlays
            .into_iter()
            .find(|o| o.info.name == m.network)
            .and_then(|o| o.subnet)
            .unwrap();
        assert!(subnet.contains(m.ip), "{}: not in {subnet}", m.label());
        assert!(
            endpoint_ips(&c, m.agent).contains(&m.ip.into()),
            "{}: no endpoint",
            m.label()
        );
        assert_eq!(
            members.iter().filter(|o| o.ip == m.ip).count(),
            1,
            "{}: address given twice",
            m.label()
        );
    }
    assert_eq!(
        (used(&c, "a1"), used(&c, "a2")),
        (base.0 + 8, base.1 + 8),
        "each container holds one address"
    );
    eprintln!("matrix: 16 containers up after {:?}", started.elapsed());

    // Reachability: every container probes every other, in parallel per source.
    let drops_before: u64 = ["a1", "a2"]
        .iter()
        .flat_map(|a| NETWORKS.map(|n| cross_drops(&c, a, n)))
        .sum();
    let mut failures = Vec::new();
    let mut cross_pairs = 0u64;
    for src in &members {
        let targets: Vec<Ipv4Addr> = members
            .iter()
            .filter(|t| t.ip != src.ip)
            .map(|t| t.ip)
            .collect();
        let out = src
            .sh(&rt, &probe_script(&targets, 2))
            .unwrap_or_else(|e| panic!("{}: probe failed: {e}", src.label()));
        for dst in members.iter().filter(|t| t.ip != src.ip) {
            let same = dst.network == src.network;
            cross_pairs += u64::from(!same);
            for (kind, what) in [("P", "ping"), ("T", "TCP")] {
                let ok = out.contains(&format!("{kind} {} ok", dst.ip));
                let no = out.contains(&format!("{kind} {} no", dst.ip));
                assert!(
                    ok != no,
                    "{}: no {what} result for {}: {out}",
                    src.label(),
                    dst.ip
                );
                if ok != same {
                    failures.push(format!(
                        "{what} {} -> {}: {}",
                        src.label(),
                        dst.label(),
                        if same { "unreachable" } else { "NOT BLOCKED" }
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "reachability:\n{}",
        failures.join("\n")
    );
    assert_eq!(cross_pairs, 16 * 8);
    let drops_after: u64 = ["a1", "a2"]
        .iter()
        .flat_map(|a| NETWORKS.map(|n| cross_drops(&c, a, n)))
        .sum();
    // Each cross-network pair sent at least one echo request and one SYN, each dropped.
    assert!(
        drops_after - drops_before >= 2 * cross_pairs,
        "drop_cross_network rose by {} for {cross_pairs} blocked pairs",
        drops_after - drops_before
    );
    eprintln!(
        "matrix: 240 probes each of ping and TCP after {:?}, {} cross-network drops",
        started.elapsed(),
        drops_after - drops_before
    );

    // Removal through each runtime: the address, endpoint, veth and link pin go with it.
    let Runtimes {
        mesos,
        podman,
        docker,
        containerd,
        ..
    } = rt;
    for m in members {
        let agent = m.agent;
        let before = (
            used(&c, agent),
            agent_veths(&c, agent),
            container_link_pins(&c, agent),
        );
        let label = m.label();
        match m.handle {
            Handle::Mesos(task, server) => {
                drop(server);
                mesos[idx(agent)].destroy(&task, m.network);
                drop(task);
            }
            Handle::Podman(name) => {
                podman[idx(agent)]
                    .run(&["rm", "--force", "--time", "0", &name])
                    .unwrap();
            }
            Handle::Docker(name) => {
                docker[idx(agent)].run(&["rm", "--force", &name]).unwrap();
            }
            Handle::Containerd(id, mut ctr_run) => {
                containerd.ctr(&["task", "kill", "-s", "KILL", &id]);
                // ctr, seeing its task end, runs DEL and removes the container (--rm).
                let status = ctr_run.0.wait().unwrap();
                assert!(
                    !containerd.ctr(&["container", "ls", "-q"]).contains(&id),
                    "{label}: container left (ctr exited {status})"
                );
            }
        }
        assert_eq!(
            (
                used(&c, agent),
                agent_veths(&c, agent),
                container_link_pins(&c, agent)
            ),
            (before.0 - 1, before.1 - 1, before.2 - 1),
            "{label}: (addresses, veths, link pins) after removal"
        );
        assert!(
            !endpoint_ips(&c, agent).contains(&m.ip.into()),
            "{label}: endpoint left"
        );
    }
    assert_eq!((used(&c, "a1"), used(&c, "a2")), base);
    assert_eq!((agent_veths(&c, "a1"), agent_veths(&c, "a2")), base_veths);
    assert_eq!(
        (container_link_pins(&c, "a1"), container_link_pins(&c, "a2")),
        base_pins
    );
    drop((podman, docker, containerd));
    eprintln!("matrix: done after {:?}", started.elapsed());
}
