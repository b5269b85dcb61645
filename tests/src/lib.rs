//! Helpers shared by the integration tests: locating the project's binaries, and describing lab
//! nodes to the datapath as the agent will.

pub mod support_etcd;
pub mod support_packets;
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
        overlay_common::maps::Endpoint {
            ifindex: agent.ifindex(&container.host_veth).unwrap(),
            vni,
            mac: container.node.mac(&container.ifname).unwrap(),
            gateway_mac: agent.mac(&container.host_veth).unwrap(),
            ..Default::default()
        },
    )
}

/// Datapath settings of a lab agent: its fabric address on eth0, DC/OS's port and MTU.
pub fn agent_settings(
    agent: &overlay_lab::Node,
    vtep_mac: [u8; 6],
) -> overlay_agent::datapath::AgentSettings {
    overlay_agent::datapath::AgentSettings {
        underlay_ip: std::net::IpAddr::V4(agent.ip.expect("agent has a fabric address")),
        underlay_ifindex: agent.ifindex("eth0").unwrap(),
        vtep_mac,
        vxlan_port: 64000,
        overlay_mtu: 1420,
    }
}

/// The pin layout of a lab agent.
pub fn lab_pins(lab: &overlay_lab::Lab, agent_role: &str) -> overlay_agent::datapath::PinLayout {
    overlay_agent::datapath::PinLayout::new(
        std::path::Path::new(overlay_lab::BPFFS),
        &lab.pin_instance(agent_role),
    )
    .unwrap()
}
