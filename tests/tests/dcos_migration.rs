//! In-place migration of a running DC/OS cluster, in a lab: three agents run DC/OS's kernel
//! datapath (bridges `m-dcos` and `m-blue`, `vtep1024` VNI 1024 port 64000, the neighbour/FDB
//! entries and the routes of every network's subnets that dcos-net writes for every peer) from a
//! DC/OS state with two IPv4 networks, their containers on the bridges carry traffic; the state
//! is imported into `overlay-master --import-dcos-state`; then the agents are converted one by
//! one to `overlay-agent` while a ping and a TCP stream run across them on both networks: each
//! converted agent gets exactly its DC/OS allocation (so the kernel agents' entries for it stay
//! valid, untouched), its running containers are adopted with their addresses, every network
//! keeps flowing between converted and kernel agents (one VNI, 1024, for all, as DC/OS), no
//! stream breaks, and on converted agents the networks are isolated from each other (a kernel
//! agent routes between its bridges, as DC/OS always did; a converted one drops and counts it).
//! (`dcos6` joins once the agent side of IPv6 lands.)

use std::net::Ipv4Addr;
use std::process::{Child, Stdio};
use std::time::Duration;

use overlay_api::agent::AddEndpoint;
use overlay_api::{AgentInfo, MacAddr};
use overlay_common::counters::Counter;
use overlay_datapath::OverlayMaps;
use overlay_lab::cluster::{Cluster, ClusterSpec, TWO_NETWORKS};
use overlay_lab::{Container, dcos, fabric_ip};
use overlay_tests::{bin_path, lab_pins};

/// The two networks: name and the first two octets of its subnet (`9.0.0.0/8`, `10.1.0.0/16`).
const NETS: [(&str, [u8; 2]); 2] = [("dcos", [9, 0]), ("blue", [10, 1])];
const DCOS: usize = 0;
const BLUE: usize = 1;

/// One agent as DC/OS allocated it (deliberately not what a fresh master would give).
struct DcosAgent {
    role: &'static str,
    underlay: Ipv4Addr,
    vtep: Ipv4Addr,
    /// Third octet of its /24 of each network.
    blocks: [u8; 2],
}

impl DcosAgent {
    fn vtep_mac(&self) -> String {
        let o = self.vtep.octets();
        format!("70:b3:d5:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3])
    }
    fn addr(&self, net: usize, host: u8) -> Ipv4Addr {
        let [a, b] = NETS[net].1;
        Ipv4Addr::new(a, b, self.blocks[net], host)
    }
    fn subnet(&self, net: usize) -> String {
        format!("{}/24", self.addr(net, 0))
    }
    fn gateway(&self, net: usize) -> Ipv4Addr {
        self.addr(net, 1)
    }
    fn container_ip(&self, net: usize) -> Ipv4Addr {
        self.addr(net, 2)
    }
}

fn agents() -> Vec<DcosAgent> {
    vec![
        DcosAgent {
            role: "a1",
            underlay: fabric_ip(11),
            vtep: Ipv4Addr::new(44, 128, 0, 3),
            blocks: [7, 1],
        },
        DcosAgent {
            role: "a2",
            underlay: fabric_ip(12),
            vtep: Ipv4Addr::new(44, 128, 0, 1),
            blocks: [2, 4],
        },
        DcosAgent {
            role: "a3",
            underlay: fabric_ip(13),
            vtep: Ipv4Addr::new(44, 128, 0, 2),
            blocks: [5, 0],
        },
    ]
}

/// The DC/OS master's `/overlay-master/state` for these agents: every network on VNI 1024.
fn dcos_state(agents: &[DcosAgent]) -> serde_json::Value {
    let infos = [
        serde_json::json!({"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24, "enabled": true}),
        serde_json::json!({"name": "blue", "subnet": "10.1.0.0/16", "prefix": 24, "enabled": true}),
    ];
    serde_json::json!({
        "network": {"vtep_subnet": "44.128.0.0/20", "vtep_mac_oui": "70:B3:D5:00:00:00",
                    "overlays": infos},
        "agents": agents.iter().map(|a| serde_json::json!({
            "ip": a.underlay.to_string(),
            "overlays": (0..NETS.len()).map(|n| serde_json::json!({
                "info": infos[n],
                "subnet": a.subnet(n),
                "mesos_bridge": {"name": format!("m-{}", NETS[n].0),
                                 "ip": format!("{}/25", a.addr(n, 0))},
                "docker_bridge": {"name": format!("d-{}", NETS[n].0),
                                  "ip": format!("{}/25", a.addr(n, 128))},
                "backend": {"vxlan": {"vni": 1024, "vtep_name": "vtep1024",
                    "vtep_ip": format!("{}/20", a.vtep), "vtep_mac": a.vtep_mac()}},
                "state": {"status": "STATUS_OK"}})).collect::<Vec<_>>()})).collect::<Vec<_>>()
    })
}

/// DC/OS's kernel datapath on `agent`, its containers `cs` (one per network) on the bridges,
/// entries for every peer as dcos-net writes them (neighbour and FDB once, a route per network).
fn kernel_agent(cluster: &Cluster, me: &DcosAgent, cs: &[Container], all: &[DcosAgent]) {
    let node = cluster.node(me.role).unwrap();
    let setup = || -> anyhow::Result<()> {
        for (n, c) in cs.iter().enumerate() {
            let bridge = format!("m-{}", NETS[n].0);
            node.exec("ip", &["link", "add", &bridge, "type", "bridge"])?;
            let gateway = format!("{}/25", me.gateway(n));
            node.exec("ip", &["addr", "add", &gateway, "dev", &bridge])?;
            node.exec("ip", &["link", "set", &bridge, "up"])?;
            node.exec(
                "ip",
                &["link", "set", &c.host_veth, "master", &bridge, "up"],
            )?;
        }
        dcos::add_vtep(node, &format!("{}/20", me.vtep), &me.vtep_mac())?;
        for peer in all.iter().filter(|p| p.role != me.role) {
            let vtep = peer.vtep.to_string();
            dcos::add_peer(
                node,
                &vtep,
                &peer.vtep_mac(),
                &peer.underlay.to_string(),
                &peer.subnet(DCOS),
            )?;
            dcos::add_peer_route(node, &vtep, &peer.subnet(BLUE))?;
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
    .map(|r| {
        // Each listing sorted: the kernel dumps neighbours in its hash table's order, which
        // changes when the table grows, with the same entries.
        let mut lines: Vec<String> = r.unwrap().lines().map(str::to_owned).collect();
        lines.sort();
        lines.join("\n")
    })
    .collect::<Vec<_>>()
    .join("\n")
}

/// Converts `me` in place: the agent starts (and must get its DC/OS allocation), the running
/// containers are handed over with their addresses and MACs, the kernel datapath goes.
fn convert(cluster: &mut Cluster, me: &DcosAgent, cs: &[Container]) -> AgentInfo {
    cluster.start_agent(me.role).unwrap();
    let info = cluster.agent_info(me.role).unwrap();
    let node = cluster.node(me.role).unwrap().clone();
    for (n, c) in cs.iter().enumerate() {
        node.exec("ip", &["link", "set", &c.host_veth, "nomaster"])
            .unwrap();
        let mac = MacAddr(c.node.mac(&c.ifname).unwrap());
        let ep = cluster
            .agent(me.role)
            .add_endpoint(&AddEndpoint {
                network: NETS[n].0.into(),
                ip: Some(me.container_ip(n)),
                ip6: None,
                host_veth: c.host_veth.clone(),
                container_mac: mac,
                half: Default::default(),
                attachment: Some(format!("migrated-{}-{}/eth0", me.role, NETS[n].0)),
            })
            .unwrap_or_else(|e| panic!("adopting {}'s {} container: {e:#}", me.role, NETS[n].0));
        assert_eq!(ep.ip, me.container_ip(n), "the container keeps its address");
        assert_eq!(ep.gateway, Some(me.gateway(n).into()), "and its gateway");
    }
    node.exec("ip", &["link", "del", "vtep1024"]).unwrap();
    for (name, _) in NETS {
        node.exec("ip", &["link", "del", &format!("m-{name}")])
            .unwrap();
    }
    info
}

/// `counter` of network (id) `network` in `role`'s pinned maps.
fn stat(cluster: &Cluster, role: &str, network: u32, counter: Counter) -> u64 {
    OverlayMaps::open_pinned(&lab_pins(&cluster.lab, role))
        .unwrap()
        .stat(network, counter)
        .unwrap()
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
    spec.config = TWO_NETWORKS.into();
    spec.start_agents = false;
    spec.master_args = vec![
        "--import-dcos-state".into(),
        state_file.to_str().unwrap().into(),
    ];
    let mut cluster = Cluster::up(spec).unwrap();
    for a in &agents {
        assert_eq!(cluster.node(a.role).unwrap().ip, Some(a.underlay));
    }

    // The DC/OS cluster, running: per agent one container on each network.
    let mut containers: Vec<Vec<Container>> = Vec::new();
    for a in &agents {
        let cs = (0..NETS.len())
            .map(|n| {
                cluster
                    .lab
                    .add_container(a.role, a.container_ip(n), 25, a.gateway(n), 1420)
                    .unwrap()
            })
            .collect();
        containers.push(cs);
    }
    for (a, cs) in agents.iter().zip(&containers) {
        kernel_agent(&cluster, a, cs, &agents);
    }
    // Every pair on each network; and DC/OS's one VNI isolates nothing: a kernel agent routes
    // from one network to the other.
    let every_pair_reaches = |cluster: &Cluster, after: &str| {
        for n in [DCOS, BLUE] {
            for i in 0..3 {
                for j in (0..3).filter(|&j| j != i) {
                    assert!(
                        containers[i][n].node.ping(agents[j].container_ip(n)),
                        "{after}: {} cannot reach {} on {}",
                        agents[i].role,
                        agents[j].role,
                        NETS[n].0
                    );
                }
            }
        }
        let _ = cluster;
    };
    every_pair_reaches(&cluster, "kernel datapath");
    assert!(
        containers[0][DCOS].node.ping(agents[1].container_ip(BLUE)),
        "kernel agents route between networks (DC/OS has no isolation)"
    );
    let entries_before = kernel_entries(&cluster, "a3");

    // Convert a2, then a1, then a3, each while a stream and a ping on each network cross the
    // one converted.
    let mut converted: Vec<usize> = Vec::new();
    for (step, index) in [1usize, 0, 2].into_iter().enumerate() {
        let me = &agents[index];
        let peer = (index + 1) % 3;
        let other = (index + 2) % 3;
        let streams: Vec<Stream> = [DCOS, BLUE]
            .into_iter()
            .map(|n| {
                Stream::start(
                    &containers[peer][n],
                    &containers[index][n],
                    6000 + (step * 2 + n) as u16,
                )
            })
            .collect();
        let pings: Vec<Child> = [DCOS, BLUE]
            .into_iter()
            .map(|n| pinger(&containers[other][n], me.container_ip(n), 75))
            .collect();
        std::thread::sleep(Duration::from_secs(3));
        let info = convert(&mut cluster, me, &containers[index]);
        converted.push(index);

        // Exactly its DC/OS allocation on both networks, VNI 1024 for both: nothing renumbered.
        for n in [DCOS, BLUE] {
            let ov = info
                .overlays
                .iter()
                .find(|o| o.info.name == NETS[n].0)
                .unwrap_or_else(|| panic!("{}: no {}: {info:?}", me.role, NETS[n].0));
            assert_eq!(
                ov.subnet,
                Some(me.subnet(n).parse().unwrap()),
                "{} {}",
                me.role,
                NETS[n].0
            );
            let vxlan = &ov.backend.vxlan;
            assert_eq!(
                vxlan.vtep_ip,
                Some(format!("{}/20", me.vtep).parse().unwrap())
            );
            assert_eq!(vxlan.vtep_mac, Some(me.vtep_mac().parse().unwrap()));
            assert_eq!((vxlan.vni, vxlan.vtep_name.as_str()), (1024, "vtep1024"));
        }

        for (n, stream) in streams.into_iter().enumerate() {
            stream.finish(&format!(
                "{} -> {} on {} while {} converted",
                agents[peer].role, me.role, NETS[n].0, me.role
            ));
        }
        for (n, ping) in pings.into_iter().enumerate() {
            let got = replies(ping);
            assert!(
                got >= 50,
                "ping {} -> {} on {} across the conversion: {got} of 75 replies",
                agents[other].role,
                me.role,
                NETS[n].0
            );
        }
        every_pair_reaches(&cluster, &format!("after converting {}", me.role));

        // Isolation on the converted agent: from its dcos container to blue (its own and the
        // others'), refused where it is sent; from every other agent's dcos container (a kernel
        // agent forwards it in VNI 1024) to its blue container, refused where it arrives.
        let dcos_id = info
            .overlays
            .iter()
            .find(|o| o.info.name == "dcos")
            .and_then(|o| o.info.id)
            .expect("the master's network id");
        let before = stat(&cluster, me.role, dcos_id, Counter::DropCrossNetwork);
        for j in 0..3 {
            assert!(
                !containers[index][DCOS]
                    .node
                    .ping(agents[j].container_ip(BLUE)),
                "{}'s dcos container reached {}'s blue one",
                me.role,
                agents[j].role
            );
            if j != index {
                assert!(
                    !containers[j][DCOS].node.ping(me.container_ip(BLUE)),
                    "{}'s dcos container reached {}'s blue one",
                    agents[j].role,
                    me.role
                );
            }
        }
        // Three sent from here, one from each peer still on the kernel datapath.
        let want = 3 + (3 - converted.len() as u64);
        let after = stat(&cluster, me.role, dcos_id, Counter::DropCrossNetwork);
        assert!(
            after >= before + want,
            "{}: drop_cross_network of dcos {before} -> {after}, want +{want}",
            me.role
        );

        if index != 2 {
            // The kernel agent still running kept its entries as dcos-net wrote them.
            assert_eq!(kernel_entries(&cluster, "a3"), entries_before);
        }
    }
    // The master's state still lists DC/OS's allocations.
    let state = cluster.agent_info("a3").unwrap();
    let subnets: Vec<String> = state
        .overlays
        .iter()
        .map(|o| o.subnet.unwrap().to_string())
        .collect();
    assert_eq!(subnets, ["9.0.5.0/24", "10.1.0.0/24"]);
}
