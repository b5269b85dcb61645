//! Fixtures the test files share: free ports, the masters' YAML configs, lab clusters on this
//! build's binaries ([`cluster`], [`cluster_spec`]), and lab builders (`lab(2)`,
//! `lab.container("a1", "9.0.1.2/25")`, [`two_agents_over_vxlan`]) instead of the same setup
//! block in every datapath test.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::PathBuf;

use overlay_lab::cluster::{Cluster, ClusterSpec};
use overlay_lab::{Container, Lab, LabSpec};

use crate::{PeerAgent, install_datapath};

/// A free loopback port: bind port 0, read the port, release it for the process under test to
/// bind (the kernel hands out bind(0) ports from a random offset, so concurrent test binaries
/// do not race for the same one).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local addr").port()
}

/// Agent `n`'s underlay address (only used as data: nothing listens there).
pub fn agent_ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
}

/// Masters' configurations (DC/OS `dcos_overlay_network`, YAML).
pub mod config {
    /// DC/OS's default network alone: `dcos` on 9.0.0.0/8, a /24 per agent.
    pub const ONE_NETWORK: &str = "\
vtep_subnet: 44.128.0.0/20
vtep_mac_oui: 70:B3:D5:00:00:00
overlays:
  - name: dcos
    subnet: 9.0.0.0/8
    prefix: 24
";

    /// `dcos` and `blue` (10.1.0.0/16), a /24 per agent each: the lab cluster's default.
    pub const TWO_NETWORKS: &str = overlay_lab::cluster::TWO_NETWORKS;

    /// Room for thousands of agents, with an IPv6 network beside the IPv4 one.
    pub const DUAL_STACK: &str = "\
vtep_subnet: 44.128.0.0/16
vtep_subnet6: fd01:a::/64
overlays:
  - {name: dcos, subnet: 9.0.0.0/8, prefix: 24}
  - {name: dcos6, subnet6: 'fd01:b::/64', prefix6: 80}
";
}

/// The directory of the binaries this test was built with (`overlay-master`, `overlay-agent`,
/// the plugin `ebpf-overlay`, ...).
pub fn bin_dir() -> PathBuf {
    crate::bin_path("overlay-agent")
        .parent()
        .expect("binaries live in a directory")
        .to_owned()
}

/// A lab cluster of `agents` agents on this build's binaries, everything else as
/// [`ClusterSpec::new`] has it (to change something first, start from [`cluster_spec`]).
pub fn cluster(agents: usize) -> Cluster {
    Cluster::up(cluster_spec(agents)).expect("cluster up")
}

/// [`ClusterSpec::new`] on this build's binaries.
pub fn cluster_spec(agents: usize) -> ClusterSpec {
    ClusterSpec::new(agents, &bin_dir())
}

/// A lab of `agents` agents (plus master and external host).
pub fn lab(agents: usize) -> Lab {
    Lab::up(LabSpec { agents, id: None }).expect("lab up")
}

/// The MTU lab containers get (DC/OS's overlay MTU).
pub const CONTAINER_MTU: u32 = 1420;

/// Lab builders.
pub trait LabExt {
    /// A container on `agent` with address `cidr` (e.g. `9.0.1.2/25`), its default route via
    /// the subnet's first address, MTU [`CONTAINER_MTU`].
    fn container(&mut self, agent: &str, cidr: &str) -> Container;
}

impl LabExt for Lab {
    fn container(&mut self, agent: &str, cidr: &str) -> Container {
        let net: ipnetwork::Ipv4Network = cidr
            .parse()
            .unwrap_or_else(|e| panic!("container address {cidr}: {e}"));
        let gateway = Ipv4Addr::from(u32::from(net.network()) + 1);
        self.add_container(agent, net.ip(), net.prefix(), gateway, CONTAINER_MTU)
            .unwrap_or_else(|e| panic!("container {cidr} on {agent}: {e:#}"))
    }
}

/// How the two-agent datapath tests lay out agents `a1` and `a2`: each owns a /24 of
/// 9.0.0.0/8, with a VTEP MAC of its own.
pub struct AgentPlan {
    pub role: &'static str,
    pub subnet: &'static str,
    pub vtep_mac: [u8; 6],
}

pub const VXLAN_AGENTS: [AgentPlan; 2] = [
    AgentPlan {
        role: "a1",
        subnet: "9.0.1.0/24",
        vtep_mac: [0x70, 0xb3, 0xd5, 0x80, 0, 1],
    },
    AgentPlan {
        role: "a2",
        subnet: "9.0.2.0/24",
        vtep_mac: [0x70, 0xb3, 0xd5, 0x80, 0, 2],
    },
];

/// Installs the datapath by hand on `a1` and `a2` (network `vni` over 9.0.0.0/8), each with
/// its container `locals[i]` and the other agent as a peer owning its subnet, as the agents'
/// reconcilers would from the master's state.
pub fn two_agents_over_vxlan(lab: &Lab, vni: u32, locals: [&Container; 2]) {
    for (i, plan) in VXLAN_AGENTS.iter().enumerate() {
        let peer_plan = &VXLAN_AGENTS[1 - i];
        let peer = PeerAgent {
            underlay_ip: lab.node(peer_plan.role).unwrap().ip.unwrap(),
            vtep_mac: peer_plan.vtep_mac,
            subnet: peer_plan.subnet,
        };
        install_datapath(
            lab,
            plan.role,
            plan.vtep_mac,
            vni,
            Some("9.0.0.0/8"),
            &[locals[i]],
            &[peer],
        )
        .unwrap();
    }
}

/// The next-hop cache's two checks, over either underlay: `agent`'s kernel holds a managed
/// neighbour entry of `vtep` on its eth0, marked as the agent's own; and 20 pings from `from` to
/// `to` are encapsulated by that agent without one kernel next-hop lookup (`next_hop_by_kernel`
/// on network 1024 unchanged).
pub fn assert_next_hop_cached(
    c: &Cluster,
    agent: &str,
    vtep: IpAddr,
    from: &Container,
    to: Ipv4Addr,
) {
    use overlay_common::counters::Counter;
    let node = c.lab.node(agent).unwrap();
    let entry = node
        .netlink()
        .unwrap()
        .neighbours(Some(node.ifindex("eth0").unwrap()))
        .unwrap()
        .into_iter()
        .find(|n| n.ip == vtep)
        .unwrap_or_else(|| panic!("{agent}'s neighbour entry of {vtep}"));
    assert!(entry.managed, "not managed: {entry:?}");
    assert_eq!(entry.protocol, overlay_agent::next_hops::NEIGH_PROTOCOL);

    let maps =
        || overlay_datapath::OverlayMaps::open_pinned(&crate::lab_pins(&c.lab, agent)).unwrap();
    let by_kernel = || maps().stat(1024, Counter::NextHopByKernel).unwrap();
    let encapsulated = || maps().stat(1024, Counter::Encapsulated).unwrap();
    let (k0, e0) = (by_kernel(), encapsulated());
    assert!(
        from.node
            .exec(
                "ping",
                &["-c", "20", "-i", "0.01", "-W", "1", &to.to_string()]
            )
            .is_ok()
    );
    assert!(encapsulated() >= e0 + 20, "pings were not encapsulated");
    assert_eq!(
        by_kernel(),
        k0,
        "packets took the kernel's lookup with a fresh next hop"
    );
}

/// Waits up to `within` for `check` to hold; the last value it saw otherwise.
pub fn eventually<T>(
    within: std::time::Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = std::time::Instant::now() + within;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}
