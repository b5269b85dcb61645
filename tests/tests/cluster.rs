//! The whole system in a lab: a real master, real agents following it, containers connected
//! through the agents' API, traffic through the eBPF datapath only.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use overlay_common::counters::Counter;
use overlay_datapath::OverlayMaps;
use overlay_lab::{
    Container,
    cluster::{Cluster, ClusterSpec},
};
use overlay_tests::fixtures::{assert_next_hop_cached, bin_dir, cluster, cluster_spec, eventually};
use overlay_tests::lab_pins;

fn ip(c: &Container) -> Ipv4Addr {
    c.node.ip.unwrap()
}

/// Pings every (from, to) pair concurrently; returns which got a reply.
fn ping_all(pairs: &[(&Container, Ipv4Addr)]) -> Vec<bool> {
    std::thread::scope(|s| {
        let handles: Vec<_> = pairs
            .iter()
            .map(|(c, to)| s.spawn(move || c.node.ping(*to)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn maps(cluster: &Cluster, agent: &str) -> OverlayMaps {
    OverlayMaps::open_pinned(&lab_pins(&cluster.lab, agent)).unwrap()
}

#[test]
fn three_agents_two_networks_connect_within_and_isolate_between() {
    let mut c = cluster(3);
    let mut by_net: Vec<(&str, Vec<Container>)> = vec![("dcos", vec![]), ("blue", vec![])];
    for agent in ["a1", "a2", "a3"] {
        for (net, list) in by_net.iter_mut() {
            for _ in 0..2 {
                list.push(c.add_container(agent, net).unwrap());
            }
        }
    }
    // Within a network: every container reaches every other, on its agent and across agents.
    for (net, list) in &by_net {
        let pairs: Vec<_> = list
            .iter()
            .flat_map(|a| {
                list.iter()
                    .filter(move |b| ip(a) != ip(b))
                    .map(move |b| (a, ip(b)))
            })
            .collect();
        let replies = ping_all(&pairs);
        for ((from, to), ok) in pairs.iter().zip(&replies) {
            assert!(ok, "{net}: {} ({}) cannot reach {to}", ip(from), from.agent);
        }
    }
    // Between networks: nothing gets through, same agent or not.
    let (dcos, blue) = (&by_net[0].1, &by_net[1].1);
    let pairs: Vec<_> = dcos
        .iter()
        .flat_map(|a| blue.iter().map(move |b| (a, ip(b))))
        .chain(
            blue.iter()
                .flat_map(|a| dcos.iter().map(move |b| (a, ip(b)))),
        )
        .collect();
    let replies = ping_all(&pairs);
    for ((from, to), ok) in pairs.iter().zip(&replies) {
        assert!(!ok, "isolation broken: {} reached {to}", ip(from));
    }
    // The counters say why, for both networks, and the metrics show them by name.
    let dcos_vni = 1024;
    assert!(
        maps(&c, "a1")
            .stat(dcos_vni, Counter::DropCrossNetwork)
            .unwrap()
            > 0
    );
    let metrics = c.agent("a1").metrics().unwrap();
    for needle in [
        "counter=\"drop_cross_network\"",
        "network=\"dcos\"",
        "network=\"blue\"",
        "counter=\"encapsulated\"",
        "counter=\"decapsulated\"",
        "overlay_agent_remote_routes 4",
        "overlay_agent_known_vteps 2",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack {needle}:\n{metrics}"
        );
    }

    // TCP and UDP within a network, on one agent and across agents.
    let (x, same_agent, other_agent) = (&dcos[0], &dcos[1], &dcos[2]);
    assert_eq!(x.agent, same_agent.agent);
    assert_ne!(x.agent, other_agent.agent);
    for to in [same_agent, other_agent] {
        let dir = tempfile::tempdir().unwrap();
        let got = dir.path().join("tcp");
        let mut server = to.node.command("sh");
        server.args(["-c", &format!("nc -l -p 7000 > {}", got.display())]);
        let mut server = server.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        x.node
            .exec(
                "sh",
                &["-c", &format!("echo tcp-hello | nc -N {} 7000", ip(to))],
            )
            .unwrap();
        server.wait().unwrap();
        assert_eq!(
            std::fs::read_to_string(&got).unwrap(),
            "tcp-hello\n",
            "TCP to {}",
            ip(to)
        );

        let got = dir.path().join("udp");
        let mut server = to.node.command("sh");
        server.args([
            "-c",
            &format!("timeout 3 nc -u -l -p 7001 > {}", got.display()),
        ]);
        let mut server = server.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        x.node
            .exec(
                "sh",
                &[
                    "-c",
                    &format!("echo udp-hello | nc -u -w 1 {} 7001", ip(to)),
                ],
            )
            .unwrap();
        server.wait().unwrap();
        assert_eq!(
            std::fs::read_to_string(&got).unwrap(),
            "udp-hello\n",
            "UDP to {}",
            ip(to)
        );
    }

    // The agent reports its endpoints, and removing one disconnects it.
    let eps = c.agent("a1").endpoints().unwrap();
    assert_eq!(eps.len(), 4, "{eps:?}");
    c.agent("a1").remove_endpoint(ip(same_agent)).unwrap();
    assert!(
        !x.node.ping(ip(same_agent)),
        "removed endpoint still reachable"
    );
}

#[test]
fn one_gigabyte_across_agents_arrives_intact() {
    let mut c = cluster(2);
    let a = c.add_container("a1", "dcos").unwrap();
    let b = c.add_container("a2", "dcos").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (sent, got) = (dir.path().join("sent.sha"), dir.path().join("got.sha"));
    let mut server = b.node.command("sh");
    server.args([
        "-c",
        &format!("nc -l -p 7002 | sha256sum > {}", got.display()),
    ]);
    let mut server = server.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    a.node
        .exec(
            "bash",
            &[
                "-c",
                &format!(
                    "head -c 1000000000 /dev/urandom | tee >(sha256sum > {}) | nc -N {} 7002",
                    sent.display(),
                    ip(&b)
                ),
            ],
        )
        .unwrap();
    server.wait().unwrap();
    let elapsed = started.elapsed();
    std::thread::sleep(Duration::from_millis(200)); // the tee'd checksum finishes writing
    let (sent, got) = (
        std::fs::read_to_string(sent).unwrap(),
        std::fs::read_to_string(got).unwrap(),
    );
    assert_eq!(sent, got, "1 GB across agents: checksums differ");
    eprintln!("1 GB across agents in {elapsed:?} (includes generating random data and hashing)");
    assert!(maps(&c, "a1").stat(1024, Counter::Encapsulated).unwrap() > 1000);
}

#[test]
fn a_joining_agent_is_reachable_within_a_second_and_a_deleted_one_is_forgotten() {
    let mut c = cluster(2);
    let x = c.add_container("a1", "dcos").unwrap();
    let node = c.lab.add_agent().unwrap();
    let new_ip = IpAddr::V4(node.ip.unwrap());
    c.spawn_agent(&node.role).unwrap();

    // Time from the master knowing the new agent to the other agents' maps routing to it.
    let state_has_new = |c: &Cluster| {
        c.master_request("GET", "/overlay-master/state", None)
            .map(|(_, body)| String::from_utf8_lossy(&body).contains(&format!("\"{new_ip}\"")))
            .unwrap_or(false)
    };
    let routes_to_new = |c: &Cluster, agent: &str| {
        maps(c, agent)
            .routes()
            .unwrap()
            .values()
            .any(|r| overlay_datapath::from_addr16(&r.underlay_ip) == new_ip)
    };
    let start = Instant::now();
    let mut registered = None;
    let mut converged = None;
    while start.elapsed() < Duration::from_secs(20) && converged.is_none() {
        if registered.is_none() && state_has_new(&c) {
            registered = Some(Instant::now());
        }
        if registered.is_some() && routes_to_new(&c, "a1") && routes_to_new(&c, "a2") {
            converged = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (registered, converged) = (
        registered.expect("new agent never registered"),
        converged.expect("never converged"),
    );
    let took = converged - registered;
    eprintln!("new agent routed by every other agent {took:?} after it registered");
    assert!(took < Duration::from_secs(1), "convergence took {took:?}");
    c.wait_agent_ready(&node.role).unwrap();
    let y = c.add_container(&node.role, "dcos").unwrap();
    assert!(
        x.node.ping(ip(&y)),
        "a1's container cannot reach the new agent's container"
    );

    // Delete it: its VTEP and routes disappear from every other agent's maps. (Forced: it
    // heartbeated less than the heartbeat timeout ago.)
    c.stop_agent(&node.role);
    let body = format!("{{\"agents\":[\"{new_ip}\"]}}");
    let (status, answer) = c
        .master_request(
            "POST",
            "/overlay-master/agents/delete?force=true",
            Some(body.as_bytes()),
        )
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    let start = Instant::now();
    let forgotten = |c: &Cluster, agent: &str| {
        let m = maps(c, agent);
        !m.vteps().unwrap().contains_key(&new_ip) && !routes_to_new(c, agent)
    };
    while !(forgotten(&c, "a1") && forgotten(&c, "a2")) {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "deleted agent still in maps after 1 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !x.node.ping(ip(&y)),
        "deleted agent's container still reachable"
    );
}

#[test]
fn agent_restart_keeps_traffic_flowing_and_entries_in_place() {
    let mut c = cluster(2);
    let a = c.add_container("a1", "dcos").unwrap();
    let b = c.add_container("a2", "dcos").unwrap();
    assert!(a.node.ping(ip(&b)));
    let before = maps(&c, "a1").endpoints().unwrap();
    // A steady stream across agents through the whole stop/start: not one packet may be lost
    // (programs and maps are pinned; the new agent swaps programs atomically in the links).
    let mut stream = a.node.command("ping");
    stream
        .args([
            "-q",
            "-i",
            "0.01",
            "-c",
            "400",
            "-W",
            "1",
            &ip(&b).to_string(),
        ])
        .stdout(std::process::Stdio::piped());
    let stream = stream.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    c.stop_agent("a1");
    // No agent process on a1: pinned programs and maps still carry the traffic.
    assert!(a.node.ping(ip(&b)), "traffic stopped with the agent");
    c.start_agent("a1").unwrap();
    let out = String::from_utf8(stream.wait_with_output().unwrap().stdout).unwrap();
    assert!(
        out.contains("400 packets transmitted, 400 received"),
        "packets lost across the restart: {out}"
    );
    assert_eq!(
        maps(&c, "a1").endpoints().unwrap(),
        before,
        "endpoints changed across restart"
    );
    assert!(a.node.ping(ip(&b)), "traffic broken after restart");
    let status = c.agent("a1").status().unwrap();
    assert_eq!(
        status.map_updates, 0,
        "a restart with unchanged state must not rewrite maps"
    );
}

/// The per-network `vni` option (for clusters without DC/OS kernel agents): `blue` on VNI 5000
/// of its own, `dcos` on the shared 1024. Each network's frames carry its VNI (the routes and the
/// accepted VNIs say so, and the receiving agent counts them under the right network), both
/// networks work across agents, and they stay isolated.
#[test]
fn a_network_with_a_vni_of_its_own_works_and_stays_isolated() {
    let mut spec = cluster_spec(2);
    spec.config = format!("{}    vni: 5000\n", overlay_lab::cluster::TWO_NETWORKS);
    let mut c = Cluster::up(spec).unwrap();
    let mut on = |agent: &str, net: &str| c.add_container(agent, net).unwrap();
    let (d1, b1, d2, b2) = (
        on("a1", "dcos"),
        on("a1", "blue"),
        on("a2", "dcos"),
        on("a2", "blue"),
    );
    let info = c.agent_info("a2").unwrap();
    let of = |name: &str| {
        let o = info.overlays.iter().find(|o| o.info.name == name).unwrap();
        (
            o.info.id.unwrap(),
            o.backend.vxlan.vni,
            o.backend.vxlan.vtep_name.clone(),
        )
    };
    let (dcos_id, dcos_vni, dcos_dev) = of("dcos");
    let (blue_id, blue_vni, blue_dev) = of("blue");
    assert_eq!((dcos_vni, dcos_dev.as_str()), (1024, "vtep1024"));
    assert_eq!((blue_vni, blue_dev.as_str()), (5000, "vtep5000"));

    let within = ping_all(&[
        (&d1, ip(&d2)),
        (&d2, ip(&d1)),
        (&b1, ip(&b2)),
        (&b2, ip(&b1)),
    ]);
    assert_eq!(within, [true; 4], "within each network, across agents");
    let between = ping_all(&[
        (&d1, ip(&b2)),
        (&b1, ip(&d2)),
        (&d2, ip(&b1)),
        (&b2, ip(&d1)),
    ]);
    assert_eq!(between, [false; 4], "isolation between the networks");

    let m = maps(&c, "a2");
    let vnis = m.vnis().unwrap();
    assert_eq!(
        vnis.iter()
            .map(|(v, w)| (*v, w.network))
            .collect::<Vec<_>>(),
        [(1024, dcos_id), (5000, blue_id)],
        "each VNI carries one network"
    );
    for (subnet, r) in m.routes().unwrap() {
        let want = if r.network == blue_id { 5000 } else { 1024 };
        assert_eq!(r.vni, want, "route {subnet} of network {}", r.network);
    }
    assert!(m.stat(blue_id, Counter::Decapsulated).unwrap() > 0);
    assert!(m.stat(dcos_id, Counter::Decapsulated).unwrap() > 0);
    assert!(m.stat(dcos_id, Counter::DropCrossNetwork).unwrap() > 0);
}

/// The agent spawns nothing (netlink, `setns`, bpf(2)): with a `PATH` holding no iproute2 or
/// util-linux, it starts, attaches containers through the plugin, carries their traffic across
/// agents and restarts onto its pinned datapath.
#[test]
fn the_agent_needs_no_ip_or_nsenter_on_its_path() {
    let empty = tempfile::tempdir().unwrap();
    let mut spec = cluster_spec(2);
    spec.agent_env = vec![("PATH".into(), empty.path().to_str().unwrap().into())];
    let mut c = Cluster::up(spec).unwrap();
    let a = c.add_container("a1", "dcos").unwrap();
    let b = c.add_container("a2", "dcos").unwrap();
    let other = c.add_container("a1", "dcos").unwrap();
    assert!(a.node.ping(ip(&b)), "across agents");
    assert!(a.node.ping(ip(&other)), "on one agent");
    c.stop_agent("a1");
    c.start_agent("a1").unwrap();
    let late = c.add_container("a1", "blue").unwrap();
    assert!(a.node.ping(ip(&b)), "after the restart");
    assert!(!late.node.ping(ip(&a)), "blue reached dcos");
}

/// The process of the agent serving `socket` (found by its `--api-socket`).
fn agent_pid(socket: &std::path::Path) -> i32 {
    let needle = socket.to_str().unwrap().as_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let is_agent = cmdline.split(|b| *b == 0).any(|a| a == needle)
                && cmdline
                    .split(|b| *b == 0)
                    .next()?
                    .ends_with(b"overlay-agent");
            is_agent.then_some(pid)
        })
        .expect("the agent's process")
}

/// Programs run (`execve`) and processes made (`fork`, `vfork`, `clone` without
/// `CLONE_THREAD`) in an `strace -f -e trace=process` log.
fn spawns(trace: &str) -> (Vec<String>, Vec<String>) {
    let (mut execs, mut forks) = (vec![], vec![]);
    for line in trace.lines().filter(|l| !l.contains("resumed>")) {
        let call = line.split_whitespace().nth(1).unwrap_or("");
        if call.starts_with("execve(") || call.starts_with("execveat(") {
            execs.push(line.to_owned());
        } else if call.starts_with("fork(")
            || call.starts_with("vfork(")
            || ((call.starts_with("clone(") || call.starts_with("clone3("))
                && !line.contains("CLONE_THREAD"))
        {
            forks.push(line.to_owned());
        }
    }
    (execs, forks)
}

/// A CNI ADD runs one program, the plugin: the plugin starts nothing (netlink and `setns`),
/// and the agent, traced through the whole ADD, neither runs a program nor forks.
#[test]
fn a_cni_add_spawns_nothing_but_the_plugin() {
    let real = bin_dir();
    let traces = tempfile::tempdir().unwrap();
    // A binary directory whose plugin runs under strace (master and agent as built).
    let bin_dir = traces.path().join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    for exe in ["overlay-master", "overlay-agent"] {
        std::os::unix::fs::symlink(real.join(exe), bin_dir.join(exe)).unwrap();
    }
    let wrapper = bin_dir.join("ebpf-overlay");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec strace -f -qq -e trace=process -o {dir}/plugin.$$ {plugin} \"$@\"\n",
            dir = traces.path().display(),
            plugin = real.join("ebpf-overlay").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut c = Cluster::up(ClusterSpec::new(1, &bin_dir)).unwrap();
    // Wait for the list, so that the ADD below is all the agent does meanwhile.
    let warm = c.add_container("a1", "dcos").unwrap();

    let pid = agent_pid(&c.socket("a1"));
    let agent_trace = traces.path().join("agent");
    struct Tracer(std::process::Child);
    impl Drop for Tracer {
        fn drop(&mut self) {
            // SIGTERM: strace detaches from the agent and exits.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
    let tracer = Tracer(
        std::process::Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=process", "-o"])
            .arg(&agent_trace)
            .args(["-p", &pid.to_string()])
            .spawn()
            .expect("strace (cargo xtask setup installs it)"),
    );
    // Traced once every thread of the agent has strace as its tracer.
    let deadline = Instant::now() + Duration::from_secs(10);
    let all_traced = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .all(|t| {
                std::fs::read_to_string(t.path().join("status"))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| {
                        l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0")
                    })
            })
    };
    while !all_traced() {
        assert!(
            Instant::now() < deadline,
            "strace did not attach to the agent"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before: Vec<_> = std::fs::read_dir(traces.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let added = c.add_container("a1", "dcos").unwrap();
    assert!(added.node.ping(ip(&warm)), "the traced ADD wired nothing");
    drop(tracer);

    let agent = std::fs::read_to_string(&agent_trace).unwrap();
    let (execs, forks) = spawns(&agent);
    assert!(execs.is_empty(), "the agent ran programs: {execs:#?}");
    assert!(forks.is_empty(), "the agent forked: {forks:#?}");
    let plugin_trace = std::fs::read_dir(traces.path())
        .unwrap()
        .flatten()
        .find(|e| {
            e.file_name().to_string_lossy().starts_with("plugin.")
                && !before.contains(&e.file_name())
        })
        .expect("the traced ADD's plugin log")
        .path();
    let (execs, forks) = spawns(&std::fs::read_to_string(plugin_trace).unwrap());
    assert_eq!(execs.len(), 1, "the plugin ran programs: {execs:#?}");
    assert!(
        execs[0].contains(&format!("\"{}\"", real.join("ebpf-overlay").display())),
        "{execs:?}"
    );
    assert!(forks.is_empty(), "the plugin forked: {forks:#?}");
}

/// `--spare-headroom on` (what `auto` picks on a bus-device underlay, which the netns lab's veth
/// is not): the agents write the flag, and packets of every size, the small ones the spare room
/// is for included, cross agents as without it.
#[test]
fn spare_headroom_on_is_written_and_packets_of_every_size_cross_agents() {
    use overlay_common::maps::AgentConfig;
    let mut spec = cluster_spec(2);
    spec.agent_args = vec!["--spare-headroom".into(), "on".into()];
    let mut c = Cluster::up(spec).unwrap();
    for agent in ["a1", "a2"] {
        let flags = maps(&c, agent).config().unwrap().unwrap().flags;
        assert_ne!(
            flags & AgentConfig::FLAG_SPARE_HEADROOM,
            0,
            "{agent}: spare headroom flag not written"
        );
    }
    let a = c.add_container("a1", "dcos").unwrap();
    let b = c.add_container("a2", "dcos").unwrap();
    let b_ip = ip(&b).to_string();
    // 0 bytes of ICMP payload up to the overlay MTU's (1420 - 28), not fragmented.
    for size in ["0", "18", "56", "1000", "1392"] {
        assert!(
            a.node
                .exec(
                    "ping",
                    &["-c", "2", "-W", "1", "-M", "do", "-s", size, &b_ip]
                )
                .is_ok(),
            "ICMP payload {size} across agents with spare headroom"
        );
    }
    let encapsulated = maps(&c, "a1").stat(1024, Counter::Encapsulated).unwrap();
    assert!(encapsulated >= 10, "encapsulated {encapsulated}");
}

/// The next-hop cache (`OVL_NEXT_HOPS`): each agent mirrors the kernel's neighbour entry of the
/// other's VTEP, made managed; encapsulated packets then take no kernel lookup. It follows the
/// kernel when the other agent's underlay MAC changes (traffic resumes with the new MAC), and an
/// agent that stops confirming it leaves the kernel's lookup in charge.
#[test]
fn next_hops_mirror_the_kernel_s_neighbours_follow_a_mac_change_and_expire_without_the_agent() {
    let mut c = cluster(2);
    let a = c.add_container("a1", "dcos").unwrap();
    let b = c.add_container("a2", "dcos").unwrap();
    assert!(a.node.ping(ip(&b)));
    let a2_underlay = c.lab.fabric_address("a2").unwrap();
    assert!(a2_underlay.is_ipv4(), "IPv4 fabric expected: {a2_underlay}");
    let a1 = c.lab.node("a1").unwrap().clone();
    let a2 = c.lab.node("a2").unwrap().clone();
    let cached_mac = |c: &Cluster| -> Result<[u8; 6], String> {
        let hops = maps(c, "a1").next_hops().map_err(|e| e.to_string())?;
        hops.get(&a2_underlay)
            .map(|h| h.dst_mac)
            .ok_or_else(|| format!("no next hop for {a2_underlay}: {hops:?}"))
    };
    // Until a1's cache holds `want` for a2.
    let caches = |c: &Cluster, want: [u8; 6], within: Duration| {
        eventually(within, || {
            cached_mac(c).and_then(|m| {
                (m == want)
                    .then_some(m)
                    .ok_or(format!("cached {m:02x?}, a2's eth0 is {want:02x?}"))
            })
        })
    };
    let got = caches(&c, a2.mac("eth0").unwrap(), Duration::from_secs(10));
    assert!(got.is_ok(), "{got:?}");
    let hop = maps(&c, "a1").next_hops().unwrap()[&a2_underlay];
    assert_eq!(hop.src_mac, a1.mac("eth0").unwrap(), "source MAC");
    assert_eq!(hop.ifindex, a1.ifindex("eth0").unwrap(), "device");
    // The kernel keeps the entry confirmed by itself (managed, marked as the agent's), and with
    // the cache in place encapsulated packets take no kernel lookup.
    assert_next_hop_cached(&c, "a1", a2_underlay, &a, ip(&b));
    let by_kernel = |c: &Cluster| maps(c, "a1").stat(1024, Counter::NextHopByKernel).unwrap();

    // a2's NIC gets another MAC. a1's kernel finds out as its neighbour code re-probes the entry
    // (timers shortened here: seconds, not the default half minute), and the cache follows.
    for (key, value) in [
        ("base_reachable_time_ms", "500"),
        ("delay_first_probe_time", "1"),
        ("retrans_time_ms", "200"),
        // How often the kernel kicks its managed entries.
        ("interval_probe_time_ms", "500"),
    ] {
        a1.exec(
            "sysctl",
            &["-qw", &format!("net.ipv4.neigh.eth0.{key}={value}")],
        )
        .unwrap();
    }
    let new_mac = [0x02, 0x5e, 0x00, 0x00, 0x0a, 0x02];
    a2.netlink().unwrap().set_mac("eth0", new_mac).unwrap();
    let followed = caches(&c, new_mac, Duration::from_secs(20));
    assert!(followed.is_ok(), "{followed:?}");
    assert!(a.node.ping(ip(&b)), "no traffic with a2's new MAC");

    // Without the agent nobody confirms the entries: within their 15 s the kernel's lookup
    // takes over, and traffic goes on.
    c.stop_agent("a1");
    let k1 = by_kernel(&c);
    let took_over = eventually(
        overlay_agent::next_hops::TTL + Duration::from_secs(5),
        || {
            a.node.ping(ip(&b));
            let k = by_kernel(&c);
            (k > k1)
                .then_some(k)
                .ok_or(format!("next_hop_by_kernel still {k}"))
        },
    );
    assert!(took_over.is_ok(), "{took_over:?}");
    assert!(a.node.ping(ip(&b)), "no traffic once the cache expired");
}
