//! The drop monitor against a real lab cluster: a real master and agent with its eBPF datapath,
//! containers attached through the real CNI plugin, `overlayctl monitor` following the agent's
//! stream from the agent's namespace. A container sends across networks (isolation drops it);
//! the monitor must name the drop (reason, network, addresses, ports, containers) within a
//! second, a flood must be rate-limited with every drop either reported or counted as skipped,
//! and the datapath's switch must be off whenever nobody follows.

use std::{
    io::BufRead as _,
    net::{Ipv4Addr, UdpSocket},
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use overlay_common::counters::Counter;
use overlay_datapath::{
    OverlayMaps, PinLayout,
    monitor::MonitorSwitch,
    stats::{RunTimeStats, attached_program_ids, program_stats},
};
use overlay_lab::{
    Container,
    cluster::{Cluster, ClusterSpec},
    in_netns,
};
use overlay_tests::fixtures::{bin_dir, cluster_spec};
use overlay_tests::{bin_path, lab_pins};
use serde_json::Value;

fn cluster(rate: u32, burst: u32) -> Cluster {
    let mut spec = cluster_spec(1);
    spec.agent_args = vec![
        "--monitor-rate".into(),
        rate.to_string(),
        "--monitor-burst".into(),
        burst.to_string(),
    ];
    Cluster::up(spec).unwrap()
}

/// `overlayctl ARGS` in a1's namespace, with the cluster's master, CA, token and a1's socket.
fn ctl(c: &Cluster, args: &[&str]) -> std::process::Command {
    let mut cmd = c.node("a1").unwrap().command(bin_path("overlayctl"));
    cmd.args(["--master", &c.master_url()])
        .args(["--ca", c.ca_cert().to_str().unwrap()])
        .args(["--admin-token-file", c.admin_token_file().to_str().unwrap()])
        .args(["--socket", c.socket("a1").to_str().unwrap()])
        .args(args);
    cmd
}

/// A running `overlayctl monitor`, its lines arriving on a channel with the time they arrived.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
}

impl Follower {
    fn start(c: &Cluster, args: &[&str]) -> Follower {
        let mut all = vec!["monitor"];
        all.extend_from_slice(args);
        let mut child = ctl(c, &all)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run overlayctl monitor");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        });
        Follower { child, lines }
    }

    /// Lines until `pred` holds for one (returned with its arrival time), or `timeout`.
    fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Option<(Instant, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok((at, line)) if pred(&line) => return Some((at, line)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Every line that arrives within `quiet` of the previous one.
    fn drain(&self, quiet: Duration) -> Vec<String> {
        let mut out = vec![];
        while let Ok((_, line)) = self.lines.recv_timeout(quiet) {
            out.push(line);
        }
        out
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Sends `count` UDP datagrams from inside `from` to `to:port` (send errors, a full queue say,
/// are the kernel's business: the counters say what was dropped); returns the source port.
fn send_udp(from: &Container, to: Ipv4Addr, port: u16, count: usize) -> u16 {
    in_netns(&from.node, move || {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        for _ in 0..count {
            let _ = socket.send_to(b"across networks", (to, port));
        }
        Ok(socket.local_addr()?.port())
    })
    .unwrap()
}

fn container_id(c: &Cluster, container: &Container) -> String {
    format!("{}-{}", c.lab.id(), container.node.role)
}

/// Drops counted under `counter`, every network, and every drop (all reasons).
fn drop_counts(maps: &OverlayMaps, counter: Counter) -> (u64, u64) {
    let rows = maps.stats().unwrap();
    let this = rows
        .iter()
        .filter(|r| r.counter == counter)
        .map(|r| r.packets)
        .sum();
    let all = rows
        .iter()
        .filter(|r| r.counter.is_drop())
        .map(|r| r.packets)
        .sum();
    (this, all)
}

#[test]
fn monitor_names_a_cross_network_drop_within_a_second_and_status_counts_the_last_minute() {
    let mut c = cluster(1000, 200);
    let a = c.add_container("a1", "dcos").unwrap();
    let b = c.add_container("a1", "blue").unwrap();
    let (a_ip, b_ip) = (a.node.ip.unwrap(), b.node.ip.unwrap());
    let (a_id, b_id) = (container_id(&c, &a), container_id(&c, &b));
    let agent_ip = c.node("a1").unwrap().ip.unwrap();
    let switch = MonitorSwitch::open_pinned(&lab_pins(&c.lab, "a1")).unwrap();

    // Nobody follows: the datapath does not report (and the drop below is only counted).
    assert!(!switch.reports_drops().unwrap(), "on before anyone follows");
    send_udp(&a, b_ip, 4999, 1);
    assert!(!switch.reports_drops().unwrap());

    // JSON, filtered to the sender's network.
    let json = Follower::start(&c, &["-o", "json", "--network", "dcos"]);
    assert!(
        wait_until(Duration::from_secs(5), || switch.reports_drops().unwrap()),
        "a follower did not switch the datapath's reporting on"
    );
    // Blue's traffic is not dcos's: a drop counted under blue must not reach this follower.
    let sent = Instant::now();
    let src_port = send_udp(&a, b_ip, 5000, 1);
    let (at, line) = json
        .wait_for(Duration::from_secs(5), |l| {
            assert!(
                !l.contains(r#""dst_port":4999"#),
                "a drop nobody followed was reported: {l}"
            );
            l.contains("drop_cross_network") && l.contains(&b_ip.to_string())
        })
        .unwrap_or_else(|| {
            panic!(
                "no cross-network drop reported; the follower printed {:?}",
                json.drain(Duration::from_millis(200))
            )
        });
    let latency = at.duration_since(sent);
    let ev: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(ev["type"], "drop", "{ev}");
    assert_eq!(ev["reason"], "drop_cross_network", "{ev}");
    assert_eq!(ev["network"], "dcos", "{ev}");
    assert_eq!(ev["agent"], agent_ip.to_string(), "{ev}");
    assert_eq!(ev["protocol"], "udp", "{ev}");
    assert_eq!(ev["src"], a_ip.to_string(), "{ev}");
    assert_eq!(ev["dst"], b_ip.to_string(), "{ev}");
    assert_eq!(ev["src_port"], src_port, "{ev}");
    assert_eq!(ev["dst_port"], 5000, "{ev}");
    assert_eq!(ev["program"], "from_container", "{ev}");
    assert_eq!(ev["src_container"], a_id.as_str(), "{ev}");
    assert_eq!(ev["dst_container"], b_id.as_str(), "{ev}");
    assert_eq!(ev["interface"], a.host_veth.as_str(), "{ev}");
    assert_eq!(ev["inner"], false, "{ev}");
    assert!(ev["time"].as_str().unwrap().ends_with('Z'), "{ev}");
    assert!(
        latency < Duration::from_secs(1),
        "reported {latency:?} after it was sent"
    );
    eprintln!("cross-network drop reported {latency:?} after it was sent: {line}");

    // Text, filtered to the container it was for; the line says what and who. Sent until the
    // new follower, whose subscription nothing here observes, has one.
    let text = Follower::start(&c, &["--container", &b_id]);
    let mut ports = vec![];
    let line = loop {
        assert!(ports.len() < 25, "no text line for the drop");
        ports.push(send_udp(&a, b_ip, 5001, 1));
        if let Some((_, line)) = text.wait_for(Duration::from_millis(200), |l| l.contains(":5001"))
        {
            break line;
        }
    };
    let expected: Vec<String> = ports
        .iter()
        .map(|src_port| {
            format!(
                "{agent_ip} drop drop_cross_network network=dcos udp {a_ip}:{src_port} -> {b_ip}:5001 src_container={a_id} dst_container={b_id} iface={} program=from_container len=",
                a.host_veth
            )
        })
        .collect();
    assert!(
        expected.iter().any(|e| line.contains(e.as_str())),
        "{line}\nexpected one of: {expected:#?}"
    );
    eprintln!("text: {line}");
    // A container filter that matches neither end sees nothing of it.
    let other = Follower::start(&c, &["-o", "json", "--container", "nobody"]);
    std::thread::sleep(Duration::from_secs(1));
    send_udp(&a, b_ip, 5002, 1);
    assert!(
        other
            .wait_for(Duration::from_secs(2), |l| l.contains("5002"))
            .is_none(),
        "a drop of other containers passed the container filter"
    );

    // The last follower gone, the datapath stops reporting.
    drop(json);
    drop(text);
    assert!(switch.reports_drops().unwrap(), "off with a follower left");
    drop(other);
    assert!(
        wait_until(Duration::from_secs(10), || !switch.reports_drops().unwrap()),
        "still reporting with nobody following"
    );

    // `overlayctl status`: the last minute's drops by network and reason (counter deltas:
    // every drop above, the one nobody followed too).
    let out = ctl(&c, &["-o", "json", "status"]).output().unwrap();
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let recent = status["agent"]["drops_last_minute"].as_array().unwrap();
    let cross = recent
        .iter()
        .find(|d| d["network"] == "dcos" && d["reason"] == "drop_cross_network")
        .unwrap_or_else(|| panic!("no dcos drop_cross_network in {recent:?}"));
    assert!(cross["packets"].as_u64().unwrap() >= 4, "{cross}");
    assert!(
        status["agent"]["drops_window_seconds"].as_u64().unwrap() <= 60,
        "{status}"
    );
    let out = ctl(&c, &["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let section = text
        .split("drops in the last minute")
        .nth(1)
        .unwrap_or_else(|| panic!("no last-minute section: {text}"));
    let section = section.split("drops since").next().unwrap();
    eprintln!("status: {text}");
    assert!(
        section
            .lines()
            .any(|l| l.contains("dcos") && l.contains("drop_cross_network")),
        "{text}"
    );

    // An agent that exits while followed leaves its (pinned, still attached) programs with
    // reporting off: nobody would read their events.
    let follower = Follower::start(&c, &["-o", "json"]);
    assert!(wait_until(Duration::from_secs(5), || switch
        .reports_drops()
        .unwrap()));
    c.stop_agent("a1");
    assert!(
        !switch.reports_drops().unwrap(),
        "the agent exited with reporting on"
    );
    drop(follower);
}

/// `from_container`'s kernel-accounted run time per packet (ns) while `f` runs.
fn from_container_ns_per_run(pins: &PinLayout, f: impl FnOnce()) -> f64 {
    let ids = attached_program_ids(pins).unwrap();
    let sum = || {
        program_stats(&ids)
            .unwrap()
            .values()
            .filter(|p| p.name == "from_container")
            .fold((0u64, 0u64), |(n, t), p| {
                (n + p.run_count, t + p.run_time_ns)
            })
    };
    let before = sum();
    f();
    let after = sum();
    (after.1 - before.1) as f64 / (after.0 - before.0).max(1) as f64
}

#[test]
fn a_flood_of_drops_is_rate_limited_and_every_drop_is_reported_or_skipped() {
    const RATE: u32 = 100;
    const BURST: u32 = 50;
    const FLOOD: usize = 20_000;
    let mut c = cluster(RATE, BURST);
    let a = c.add_container("a1", "dcos").unwrap();
    let b = c.add_container("a1", "blue").unwrap();
    let b_ip = b.node.ip.unwrap();
    let pins = lab_pins(&c.lab, "a1");
    let switch = MonitorSwitch::open_pinned(&pins).unwrap();
    let maps = OverlayMaps::open_pinned(&pins).unwrap();
    // What a drop costs with nobody following and while followed (figures, not asserted).
    let _accounting = RunTimeStats::enable().unwrap();
    let off_ns = from_container_ns_per_run(&pins, || {
        send_udp(&a, b_ip, 6000, FLOOD);
    });
    assert!(!switch.reports_drops().unwrap());

    let json = Follower::start(&c, &["-o", "json"]);
    let text = Follower::start(&c, &[]);
    assert!(wait_until(Duration::from_secs(5), || {
        switch.reports_drops().unwrap()
    }));
    // What was dropped (and reported or skipped) before the window opens: drained until the
    // stream has been quiet for longer than a skip report takes (one second).
    let early = json.drain(Duration::from_millis(1500));
    text.drain(Duration::from_millis(100));
    eprintln!("before the flood: {} lines", early.len());
    let (cross_before, all_before) = drop_counts(&maps, Counter::DropCrossNetwork);
    let started = Instant::now();
    let on_ns = from_container_ns_per_run(&pins, || {
        send_udp(&a, b_ip, 6000, FLOOD);
    });
    let flood_time = started.elapsed();
    // Skip counts are reported once a second: wait for the stream to go quiet.
    let lines = json.drain(Duration::from_millis(2500));
    let (cross_after, all_after) = drop_counts(&maps, Counter::DropCrossNetwork);
    let text_lines = text.drain(Duration::from_millis(500));

    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let cross_events = events
        .iter()
        .filter(|e| e["type"] == "drop" && e["reason"] == "drop_cross_network")
        .count() as u64;
    let all_events = events.iter().filter(|e| e["type"] == "drop").count() as u64;
    let skipped: u64 = events
        .iter()
        .filter(|e| e["type"] == "skipped" && e["by"] == "datapath")
        .map(|e| e["count"].as_u64().unwrap())
        .sum();
    let behind: u64 = events
        .iter()
        .filter(|e| e["type"] == "skipped" && e["by"] == "agent")
        .map(|e| e["count"].as_u64().unwrap())
        .sum();
    let dropped = cross_after - cross_before;
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    eprintln!(
        "from_container run time per packet of a cross-network flood ({FLOOD} datagrams): monitor off {off_ns:.0} ns, followed (rate-limited) {on_ns:.0} ns, ratio {:.2}",
        on_ns / off_ns.max(1.0)
    );
    let allowed = cpus * (BURST as u64 + RATE as u64 * (flood_time.as_secs() + 4));
    eprintln!(
        "flood of {FLOOD} datagrams in {flood_time:?}: {dropped} dropped, {cross_events} reported, {skipped} skipped by the datapath, {behind} by the agent ({cpus} CPUs, budget {RATE}/s burst {BURST} each)"
    );
    assert!(
        dropped >= FLOOD as u64 / 2,
        "the flood was not dropped: {dropped}"
    );
    assert!(
        cross_events <= allowed,
        "{cross_events} events reported, more than the budget allows ({allowed})"
    );
    assert!(
        cross_events >= BURST as u64,
        "{cross_events} events reported"
    );
    assert!(skipped > 0, "no skip count reported");
    // Every drop while followed was either reported or counted as skipped.
    assert_eq!(
        all_events + skipped + behind,
        all_after - all_before,
        "reported {all_events} + skipped {skipped} + behind {behind} != dropped {}",
        all_after - all_before
    );
    assert!(cross_events + skipped + behind >= dropped);

    // The text follower says it skipped, and the same number.
    if let Some(l) = text_lines.iter().find(|l| l.starts_with("skipped ")) {
        eprintln!("text: {l}");
    }
    let text_skipped: u64 = text_lines
        .iter()
        .filter(|l| l.contains("over the datapath's per-CPU rate limit"))
        .filter_map(|l| l.strip_prefix("skipped "))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(
        text_skipped,
        skipped,
        "{:?}",
        &text_lines[text_lines.len().saturating_sub(5)..]
    );
    drop(json);
    drop(text);
    assert!(
        wait_until(Duration::from_secs(10), || !switch.reports_drops().unwrap()),
        "still reporting with nobody following"
    );
}

#[test]
fn a_drop_on_the_underlay_is_described_by_the_packet_inside_the_vxlan() {
    let bin_dir = bin_dir();
    let mut c = Cluster::up(ClusterSpec::new(2, &bin_dir)).unwrap();
    let a = c.add_container("a1", "dcos").unwrap();
    let a_ip = a.node.ip.unwrap();
    let a2_ip = c.node("a2").unwrap().ip.unwrap();
    // An address of a2's share of dcos that no container has: a1 carries it to a2, which has
    // no endpoint for it.
    let a2 = c.agent_info("a2").unwrap();
    let share = a2
        .overlays
        .iter()
        .find(|o| o.info.name == "dcos")
        .and_then(|o| o.subnet)
        .expect("a2 has a share of dcos");
    let nobody = Ipv4Addr::from(u32::from(share.network()) + 100);

    let mut cmd = c.node("a2").unwrap().command(bin_path("overlayctl"));
    cmd.args(["--socket", c.socket("a2").to_str().unwrap()])
        .args(["-o", "json", "monitor", "--network", "dcos"]);
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    let follower = Follower { child, lines };
    let switch = MonitorSwitch::open_pinned(&lab_pins(&c.lab, "a2")).unwrap();
    assert!(wait_until(Duration::from_secs(5), || switch
        .reports_drops()
        .unwrap()));
    let src_port = send_udp(&a, nobody, 7000, 1);
    let (_, line) = follower
        .wait_for(Duration::from_secs(5), |l| l.contains(&nobody.to_string()))
        .unwrap_or_else(|| {
            panic!(
                "a2 reported nothing for {nobody}: {:?}",
                follower.drain(Duration::from_millis(200))
            )
        });
    let ev: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ev["reason"], "drop_no_endpoint", "{ev}");
    assert_eq!(ev["network"], "dcos", "{ev}");
    assert_eq!(ev["program"], "from_underlay", "{ev}");
    assert_eq!(ev["inner"], true, "{ev}");
    assert_eq!(ev["src"], a_ip.to_string(), "{ev}");
    assert_eq!(ev["src_port"], src_port, "{ev}");
    assert_eq!(ev["dst_port"], 7000, "{ev}");
    assert_eq!(ev["protocol"], "udp", "{ev}");
    // Reported by a2, where neither end is a container.
    assert_eq!(ev["agent"], a2_ip.to_string(), "{ev}");
    assert_eq!(ev["src_container"], Value::Null, "{ev}");
    assert_eq!(ev["dst_container"], Value::Null, "{ev}");
}

#[test]
fn an_early_drop_in_xdp_is_reported_by_the_xdp_program() {
    use overlay_tests::support_packets::{VXLAN_PORT, send_udp as send_payloads, vxlan};
    let mut spec = cluster_spec(2);
    // Lab underlays are veths: generic XDP runs the program there.
    spec.agent_args = vec!["--xdp".into(), "generic".into()];
    let c = Cluster::up(spec).unwrap();
    let (a1, a2) = (c.node("a1").unwrap(), c.node("a2").unwrap());
    let mut cmd = a1.command(bin_path("overlayctl"));
    cmd.args(["--socket", c.socket("a1").to_str().unwrap()])
        .args(["-o", "json", "monitor"]);
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    let follower = Follower { child, lines };
    let switch = MonitorSwitch::open_pinned(&lab_pins(&c.lab, "a1")).unwrap();
    assert!(wait_until(Duration::from_secs(5), || switch
        .reports_drops()
        .unwrap()));
    // From a known agent (a2), a VNI that is no network: XDP drops it before TC.
    send_payloads(
        a2,
        a1.ip.unwrap(),
        VXLAN_PORT,
        &[vxlan(0x08, 4096, &[0u8; 34])],
    )
    .unwrap();
    let (_, line) = follower
        .wait_for(Duration::from_secs(5), |l| l.contains("drop_unknown_vni"))
        .unwrap_or_else(|| {
            panic!(
                "no unknown-VNI drop reported: {:?}",
                follower.drain(Duration::from_millis(200))
            )
        });
    let ev: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ev["program"], "xdp_underlay", "{ev}");
    assert_eq!(ev["network"], Value::Null, "{ev}");
    // Nothing IP inside: described by its outer headers, who sent it to our VXLAN port.
    assert_eq!(ev["inner"], false, "{ev}");
    assert_eq!(ev["protocol"], "udp", "{ev}");
    assert_eq!(ev["src"], a2.ip.unwrap().to_string(), "{ev}");
    assert_eq!(ev["dst"], a1.ip.unwrap().to_string(), "{ev}");
    assert_eq!(ev["dst_port"], VXLAN_PORT, "{ev}");
}
