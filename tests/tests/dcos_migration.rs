//! In-place migration of a running DC/OS cluster, in a lab: three agents run DC/OS's kernel
//! datapath (bridge `m-dcos`, `vtep1024` VNI 1024 port 64000, the neighbour/FDB/route entries
//! dcos-net writes for every peer) from a DC/OS state, their containers on the bridges carry
//! traffic; the state is imported into `overlay-master --import-dcos-state`; then the agents
//! are converted one by one to `overlay-agent` while a ping and a TCP stream run across them:
//! each converted agent gets exactly its DC/OS allocation (so the kernel agents' entries for it
//! stay valid, untouched), its running container is adopted with its address, and no stream
//! breaks.

use std::net::Ipv4Addr;
use std::process::{Child, Stdio};
use std::time::Duration;

use overlay_api::agent::AddEndpoint;
use overlay_api::{AgentInfo, MacAddr};
use overlay_lab::cluster::{Cluster, ClusterSpec};
use overlay_lab::{Container, dcos, fabric_ip};
use overlay_tests::bin_path;

const CONFIG: &str = "vtep_subnet: 44.128.0.0/20\nvtep_mac_oui: 70:B3:D5:00:00:00\noverlays:\n  - name: dcos\n    subnet: 9.0.0.0/8\n    prefix: 24\n";

/// One agent as DC/OS allocated it (deliberately not what a fresh master would give).
struct DcosAgent {
    role: &'static str,
    underlay: Ipv4Addr,
    vtep: Ipv4Addr,
    /// Third octet of its `9.0.N.0/24`.
    block: u8,
}

impl DcosAgent {
    fn vtep_mac(&self) -> String {
        let o = self.vtep.octets();
        format!("70:b3:d5:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3])
    }
    fn subnet(&self) -> String {
        format!("9.0.{}.0/24", self.block)
    }
    fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(9, 0, self.block, 1)
    }
    fn container_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(9, 0, self.block, 2)
    }
}

fn agents() -> Vec<DcosAgent> {
    vec![
        DcosAgent {
            role: "a1",
            underlay: fabric_ip(11),
            vtep: Ipv4Addr::new(44, 128, 0, 3),
            block: 7,
        },
        DcosAgent {
            role: "a2",
            underlay: fabric_ip(12),
            vtep: Ipv4Addr::new(44, 128, 0, 1),
            block: 2,
        },
        DcosAgent {
            role: "a3",
            underlay: fabric_ip(13),
            vtep: Ipv4Addr::new(44, 128, 0, 2),
            block: 5,
        },
    ]
}

/// The DC/OS master's `/overlay-master/state` for these agents.
fn dcos_state(agents: &[DcosAgent]) -> serde_json::Value {
    let info =
        serde_json::json!({"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24, "enabled": true});
    serde_json::json!({
        "network": {"vtep_subnet": "44.128.0.0/20", "vtep_mac_oui": "70:B3:D5:00:00:00",
                    "overlays": [info]},
        "agents": agents.iter().map(|a| serde_json::json!({
            "ip": a.underlay.to_string(),
            "overlays": [{
                "info": info,
                "subnet": a.subnet(),
                "mesos_bridge": {"name": "m-dcos", "ip": format!("9.0.{}.0/25", a.block)},
                "docker_bridge": {"name": "d-dcos", "ip": format!("9.0.{}.128/25", a.block)},
                "backend": {"vxlan": {"vni": 1024, "vtep_name": "vtep1024",
                    "vtep_ip": format!("{}/20", a.vtep), "vtep_mac": a.vtep_mac()}},
                "state": {"status": "STATUS_OK"}}]})).collect::<Vec<_>>()
    })
}

/// DC/OS's kernel datapath on `agent`, its container `c` on the bridge, entries for every
/// peer as dcos-net writes them.
fn kernel_agent(cluster: &Cluster, me: &DcosAgent, c: &Container, all: &[DcosAgent]) {
    let node = cluster.node(me.role).unwrap();
    let setup = || -> anyhow::Result<()> {
        node.exec("ip", &["link", "add", "m-dcos", "type", "bridge"])?;
        node.exec(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/25", me.gateway()),
                "dev",
                "m-dcos",
            ],
        )?;
        node.exec("ip", &["link", "set", "m-dcos", "up"])?;
        node.exec(
            "ip",
            &["link", "set", &c.host_veth, "master", "m-dcos", "up"],
        )?;
        dcos::add_vtep(node, &format!("{}/20", me.vtep), &me.vtep_mac())?;
        for peer in all.iter().filter(|p| p.role != me.role) {
            dcos::add_peer(
                node,
                &peer.vtep.to_string(),
                &peer.vtep_mac(),
                &peer.underlay.to_string(),
                &peer.subnet(),
            )?;
        }
        node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        Ok(())
    };
    setup().unwrap_or_else(|e| panic!("kernel datapath on {}: {e:#}", me.role));
}

/// What dcos-net wrote on a kernel agent (neighbours, FDB, routes via vtep1024).
fn kernel_entries(cluster: &Cluster, role: &str) -> String {
    let node = cluster.node(role).unwrap();
    [
        node.exec("ip", &["neigh", "show", "dev", "vtep1024"]),
        node.exec("bridge", &["fdb", "show", "dev", "vtep1024"]),
        node.exec("ip", &["route", "show", "dev", "vtep1024"]),
    ]
    .into_iter()
    .map(|r| r.unwrap())
    .collect::<Vec<_>>()
    .join("\n")
}

/// Converts `me` in place: the agent starts (and must get its DC/OS allocation), the running
/// container is handed over with its address and MAC, the kernel datapath goes.
fn convert(cluster: &mut Cluster, me: &DcosAgent, c: &Container) -> AgentInfo {
    cluster.start_agent(me.role).unwrap();
    let info = cluster.agent_info(me.role).unwrap();
    let node = cluster.node(me.role).unwrap().clone();
    node.exec("ip", &["link", "set", &c.host_veth, "nomaster"])
        .unwrap();
    let mac = MacAddr(c.node.mac(&c.ifname).unwrap());
    let ep = cluster
        .agent(me.role)
        .add_endpoint(&AddEndpoint {
            network: "dcos".into(),
            ip: Some(me.container_ip()),
            host_veth: c.host_veth.clone(),
            container_mac: mac,
            half: Default::default(),
            attachment: Some(format!("migrated-{}/eth0", me.role)),
        })
        .unwrap_or_else(|e| panic!("adopting {}'s container: {e:#}", me.role));
    assert_eq!(ep.ip, me.container_ip(), "the container keeps its address");
    assert_eq!(ep.gateway, Some(me.gateway()), "and its gateway");
    node.exec("ip", &["link", "del", "vtep1024"]).unwrap();
    node.exec("ip", &["link", "del", "m-dcos"]).unwrap();
    info
}

/// A TCP stream `from` -> `to`: about 20 s of 10 kB every 100 ms. Returns the listener and
/// the sender; `finish` checks every byte arrived and the connection never broke.
struct Stream {
    listener: Child,
    sender: Child,
    received: std::path::PathBuf,
    bytes: usize,
    _dir: tempfile::TempDir,
}

impl Stream {
    fn start(from: &Container, to: &Container, port: u16) -> Stream {
        let dir = tempfile::tempdir().unwrap();
        let received = dir.path().join("received");
        let listener = to
            .node
            .command("sh")
            .args([
                "-c",
                &format!("exec timeout 90 nc -l -p {port} > {}", received.display()),
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let chunks = 200;
        let sender = from
            .node
            .command("sh")
            .args([
                "-c",
                &format!(
                    "(for i in $(seq {chunks}); do head -c 10000 /dev/zero; sleep 0.1; done) | \
                     timeout 90 nc -N {} {port}",
                    to.node.ip.unwrap()
                ),
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Stream {
            listener,
            sender,
            received,
            bytes: chunks * 10000,
            _dir: dir,
        }
    }

    fn finish(mut self, what: &str) {
        let sent = self.sender.wait().unwrap();
        let heard = self.listener.wait().unwrap();
        let got = std::fs::metadata(&self.received).map_or(0, |m| m.len() as usize);
        assert!(
            sent.success() && heard.success(),
            "{what}: the TCP stream broke ({sent}, {heard}, {got} bytes)"
        );
        assert_eq!(got, self.bytes, "{what}: bytes lost");
    }
}

/// Ping `count` times at 5/s; returns the replies.
fn pinger(from: &Container, to: Ipv4Addr, count: u32) -> Child {
    from.node
        .command("ping")
        .args([
            "-q",
            "-i",
            "0.2",
            "-W",
            "1",
            "-c",
            &count.to_string(),
            &to.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn replies(ping: Child) -> u32 {
    let out = ping.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(',')
        .find_map(|part| part.trim().strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("ping output: {text}"))
}

#[test]
fn dcos_kernel_agents_are_converted_one_by_one_without_renumbering_or_breaking_streams() {
    let agents = agents();
    let work = tempfile::tempdir().unwrap();
    let state_file = work.path().join("dcos-state.json");
    std::fs::write(&state_file, dcos_state(&agents).to_string()).unwrap();
    let bin_dir = bin_path("overlay-agent").parent().unwrap().to_owned();
    let mut spec = ClusterSpec::new(3, &bin_dir);
    spec.config = CONFIG.into();
    spec.start_agents = false;
    spec.master_args = vec![
        "--import-dcos-state".into(),
        state_file.to_str().unwrap().into(),
    ];
    let mut cluster = Cluster::up(spec).unwrap();
    for a in &agents {
        assert_eq!(cluster.node(a.role).unwrap().ip, Some(a.underlay));
    }

    // The DC/OS cluster, running.
    let mut containers = Vec::new();
    for a in &agents {
        let c = cluster
            .lab
            .add_container(a.role, a.container_ip(), 25, a.gateway(), 1420)
            .unwrap();
        containers.push(c);
    }
    for (a, c) in agents.iter().zip(&containers) {
        kernel_agent(&cluster, a, c, &agents);
    }
    for (i, c) in containers.iter().enumerate() {
        for (j, d) in containers.iter().enumerate() {
            if i != j {
                assert!(
                    c.node.ping(d.node.ip.unwrap()),
                    "kernel datapath: {} cannot reach {}",
                    agents[i].role,
                    agents[j].role
                );
            }
        }
    }
    let entries_before = kernel_entries(&cluster, "a3");

    // Convert a2, then a1, then a3, each while a stream and a ping cross the one converted.
    for (step, index) in [1usize, 0, 2].into_iter().enumerate() {
        let me = &agents[index];
        let peer = (index + 1) % 3;
        let other = (index + 2) % 3;
        let stream = Stream::start(&containers[peer], &containers[index], 6000 + step as u16);
        let ping = pinger(&containers[other], me.container_ip(), 75);
        std::thread::sleep(Duration::from_secs(3));
        let info = convert(&mut cluster, me, &containers[index]);

        // Exactly its DC/OS allocation: nothing renumbered.
        let dcos = &info.overlays[0];
        assert_eq!(
            dcos.subnet,
            Some(me.subnet().parse().unwrap()),
            "{}",
            me.role
        );
        assert_eq!(
            dcos.backend.vxlan.vtep_ip,
            Some(format!("{}/20", me.vtep).parse().unwrap())
        );
        assert_eq!(
            dcos.backend.vxlan.vtep_mac,
            Some(me.vtep_mac().parse().unwrap())
        );

        stream.finish(&format!(
            "{} -> {} while {} converted",
            agents[peer].role, me.role, me.role
        ));
        let got = replies(ping);
        assert!(
            got >= 50,
            "ping {} -> {} across the conversion: {got} of 75 replies",
            agents[other].role,
            me.role
        );
        // Every pair, both ways, after this step.
        for (i, c) in containers.iter().enumerate() {
            for (j, d) in containers.iter().enumerate() {
                if i != j {
                    assert!(
                        c.node.ping(d.node.ip.unwrap()),
                        "after converting {}: {} cannot reach {}",
                        me.role,
                        agents[i].role,
                        agents[j].role
                    );
                }
            }
        }
        if index != 2 {
            // The kernel agent still running kept its entries as dcos-net wrote them.
            assert_eq!(kernel_entries(&cluster, "a3"), entries_before);
        }
    }
    // The master's state still lists DC/OS's allocations in DC/OS's order.
    let state = cluster.agent_info("a3").unwrap();
    assert_eq!(
        state.overlays[0].subnet,
        Some("9.0.5.0/24".parse().unwrap())
    );
}
