//! Helpers shared by the integration tests: locating the project's binaries, and describing lab
//! nodes to the datapath as the agent will.

pub mod fixtures;
pub mod master;
pub mod micro_bench;
pub mod runtimes;
pub mod support_etcd;
pub mod support_packets;
pub mod support_peers;
pub mod test_run;
use std::path::PathBuf;

/// Path of one of the workspace's binaries (`overlay-master`, `overlay-agent`, ...), built into the
/// same target directory as the running test executable.
///
/// The test command (`cargo xtask test`) builds every binary before running the tests.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test-exe> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "binary {} not found: build it first (`cargo build --bins`, done by `cargo xtask test`)",
        path.display()
    );
    path
}

/// The map entry for a lab container attached to `agent`, on network `vni`.
pub fn endpoint_of(
    agent: &overlay_lab::Node,
    container: &overlay_lab::Container,
    vni: u32,
) -> (std::net::IpAddr, overlay_common::maps::Endpoint) {
    (
        std::net::IpAddr::V4(container.node.ip.expect("container has an address")),
        overlay_common::maps::Endpoint::container(
            agent.ifindex(&container.host_veth).unwrap(),
            vni,
            container.node.mac(&container.ifname).unwrap(),
            agent.mac(&container.host_veth).unwrap(),
        ),
    )
}

/// Datapath settings of a lab agent: its fabric address on eth0, DC/OS's port and MTU.
pub fn agent_settings(
    agent: &overlay_lab::Node,
    vtep_mac: [u8; 6],
) -> overlay_datapath::AgentSettings {
    overlay_datapath::AgentSettings {
        underlay_ip: std::net::IpAddr::V4(agent.ip.expect("agent has a fabric address")),
        underlay_ifindex: agent.ifindex("eth0").unwrap(),
        vtep_mac,
        vxlan_port: 64000,
        overlay_mtu: 1420,
        spare_headroom: false,
    }
}

/// The pin layout of a lab agent.
pub fn lab_pins(lab: &overlay_lab::Lab, agent_role: &str) -> overlay_datapath::PinLayout {
    overlay_datapath::PinLayout::new(
        std::path::Path::new(overlay_lab::BPFFS),
        &lab.pin_instance(agent_role),
    )
    .unwrap()
}

/// Another agent as a hand-installed datapath knows it: where its VTEP is and which subnet it owns.
pub struct PeerAgent<'a> {
    pub underlay_ip: std::net::Ipv4Addr,
    pub vtep_mac: [u8; 6],
    pub subnet: &'a str,
}

/// Installs the real datapath in lab agent `agent_role` by hand, as the agent's reconciler would:
/// programs on eth0 and on each container's veth, the agent config, network `vni` (its network
/// id, and the VNI its frames carry; over `overlay_subnet`, if given), the containers as endpoints, and `peers` as known agents owning
/// their subnets. The pinned programs and maps stay after this returns (removed with the lab).
pub fn install_datapath(
    lab: &overlay_lab::Lab,
    agent_role: &str,
    vtep_mac: [u8; 6],
    vni: u32,
    overlay_subnet: Option<&str>,
    containers: &[&overlay_lab::Container],
    peers: &[PeerAgent],
) -> anyhow::Result<()> {
    use overlay_common::maps::{Network, OverlaySubnet, RemoteRoute, Vtep, WireVni, programs};
    let agent = lab.node(agent_role)?.clone();
    let pins = lab_pins(lab, agent_role);
    let settings = agent_settings(&agent, vtep_mac);
    let endpoints: Vec<_> = containers
        .iter()
        .map(|c| (c.host_veth.clone(), endpoint_of(&agent, c, vni)))
        .collect();
    let subnet = overlay_subnet
        .map(str::parse::<ipnetwork::IpNetwork>)
        .transpose()?;
    let peers = peers
        .iter()
        .map(|p| {
            Ok((
                std::net::IpAddr::V4(p.underlay_ip),
                p.vtep_mac,
                p.subnet.parse::<ipnetwork::IpNetwork>()?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    overlay_lab::in_netns(&agent, move || {
        let mut dp = overlay_agent::datapath::Datapath::load(pins)?;
        dp.attach("eth0", programs::FROM_UNDERLAY)?;
        for (veth, _) in &endpoints {
            dp.attach(veth, programs::FROM_CONTAINER)?;
        }
        let m = dp.maps_mut();
        m.set_config(&settings)?;
        m.put_network(vni, Network::default())?;
        m.put_vni(vni, WireVni::carrying(&[vni]))?;
        if let Some(subnet) = subnet {
            m.put_subnet(subnet, OverlaySubnet::new(vni))?;
        }
        for (_, (ip, ep)) in endpoints {
            m.put_endpoint(ip, ep)?;
        }
        for (ip, mac, subnet) in peers {
            m.put_vtep(ip, Vtep::new(mac, [0; 4]))?;
            let underlay_ip = overlay_datapath::addr16(ip);
            m.put_route(subnet, RemoteRoute::new(underlay_ip, mac, vni, vni))?;
        }
        Ok(())
    })
}
