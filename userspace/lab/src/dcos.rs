//! DC/OS's kernel datapath on a lab node, as DC/OS builds it: the `vtep1024` VXLAN device (VNI
//! 1024, UDP 64000, no learning) and, per peer agent, the permanent neighbour entry, FDB entry and
//! route that its routing daemon (dcos-net) writes, for IPv4 overlays and for IPv6 ones (`dcos6`:
//! `vtep_ip6` on the same device, a neighbour entry and route per peer, the IPv4 FDB entry shared);
//! the container bridges. Used by the interop tests and the benchmark's kernel baseline.

use crate::Node;

/// Creates `vtep1024` on `node`, sending from its fabric address, with VTEP address `vtep_cidr`
/// (e.g. `44.128.0.1/20`) and MAC `vtep_mac`.
pub fn add_vtep(node: &Node, vtep_cidr: &str, vtep_mac: &str) -> anyhow::Result<()> {
    let local = node
        .ip
        .ok_or_else(|| anyhow::anyhow!("{} has no fabric address", node.role))?;
    let local = local.to_string();
    #[rustfmt::skip]
    node.exec("ip", &["link", "add", "vtep1024", "address", vtep_mac, "type", "vxlan", "id", "1024",
        "dstport", "64000", "local", &local, "dev", "eth0", "nolearning"])?;
    node.exec("ip", &["addr", "add", vtep_cidr, "dev", "vtep1024"])?;
    node.exec("ip", &["link", "set", "vtep1024", "up"])?;
    Ok(())
}

/// What dcos-net writes on `node` for one peer agent: its VTEP address -> MAC (permanent
/// neighbour), its MAC -> underlay address (FDB), and its container subnet via its VTEP.
pub fn add_peer(
    node: &Node,
    peer_vtep_ip: &str,
    peer_vtep_mac: &str,
    peer_underlay_ip: &str,
    peer_subnet: &str,
) -> anyhow::Result<()> {
    #[rustfmt::skip]
    node.exec("ip", &["neigh", "replace", peer_vtep_ip, "lladdr", peer_vtep_mac, "dev", "vtep1024",
        "nud", "permanent"])?;
    #[rustfmt::skip]
    node.exec("bridge", &["fdb", "append", peer_vtep_mac, "dev", "vtep1024", "dst",
        peer_underlay_ip])?;
    #[rustfmt::skip]
    node.exec("ip", &["route", "replace", peer_subnet, "via", peer_vtep_ip, "dev", "vtep1024",
        "onlink"])?;
    Ok(())
}

/// The route dcos-net writes on `node` for a peer's subnet of one more network: every network's
/// subnets go via the peer's one VTEP (one VNI, 1024, for all), whose neighbour and FDB entries
/// [`add_peer`] wrote.
pub fn add_peer_route(node: &Node, peer_vtep_ip: &str, peer_subnet: &str) -> anyhow::Result<()> {
    #[rustfmt::skip]
    node.exec("ip", &["route", "replace", peer_subnet, "via", peer_vtep_ip, "dev", "vtep1024",
        "onlink"])?;
    Ok(())
}

/// Gives `vtep1024` on `node` its IPv6 VTEP address `vtep_cidr6` (`vtep_ip6`, e.g.
/// `fd01:a::1/64`), as the DC/OS agent does when its allocation has one: IPv6 turned on for the
/// device (`disable_ipv6=0`), then the address. Without duplicate-address detection here: DC/OS
/// waits the probe out, which on `vtep1024` goes nowhere (a multicast frame, and the device has
/// no default FDB entry), so skipping it only saves the second.
pub fn add_vtep_ip6(node: &Node, vtep_cidr6: &str) -> anyhow::Result<()> {
    node.exec("sysctl", &["-qw", "net.ipv6.conf.vtep1024.disable_ipv6=0"])?;
    #[rustfmt::skip]
    node.exec("ip", &["-6", "addr", "add", vtep_cidr6, "dev", "vtep1024", "nodad"])?;
    Ok(())
}

/// What dcos-net writes on `node` for a peer agent's `subnet6` of an IPv6 overlay (`dcos6`): the
/// peer's `vtep_ip6` -> its VTEP MAC (permanent neighbour; the same MAC as its IPv4 VTEP address),
/// and the subnet via that `vtep_ip6` (main table). No FDB entry of its own: dcos-net writes one
/// (VTEP MAC -> the peer's IPv4 agent address) for the IPv4 overlay only ([`add_peer`]), and
/// that one entry sends both families' frames, so it must be there too.
pub fn add_peer6(
    node: &Node,
    peer_vtep_ip6: &str,
    peer_vtep_mac: &str,
    peer_subnet6: &str,
) -> anyhow::Result<()> {
    #[rustfmt::skip]
    node.exec("ip", &["-6", "neigh", "replace", peer_vtep_ip6, "lladdr", peer_vtep_mac, "dev",
        "vtep1024", "nud", "permanent"])?;
    add_peer_route6(node, peer_vtep_ip6, peer_subnet6)
}

/// The route dcos-net writes on `node` for a peer's `subnet6` of one more IPv6 overlay: via the
/// peer's one `vtep_ip6`, whose neighbour entry [`add_peer6`] wrote.
pub fn add_peer_route6(node: &Node, peer_vtep_ip6: &str, peer_subnet6: &str) -> anyhow::Result<()> {
    #[rustfmt::skip]
    node.exec("ip", &["-6", "route", "replace", peer_subnet6, "via", peer_vtep_ip6, "dev",
        "vtep1024"])?;
    Ok(())
}

/// A container bridge as a DC/OS agent has one per overlay and runtime (`m-<name>` for Mesos,
/// `d-<name>` for Docker; `d-dcos6` carries `dcos6`'s Docker half), on `node`, with the gateway
/// addresses `cidrs` (either family), up. An IPv6 gateway turns IPv6 forwarding on, as Docker
/// does for an IPv6 network (the agent then routes between its bridges and `vtep1024`).
pub fn add_bridge(node: &Node, name: &str, cidrs: &[&str]) -> anyhow::Result<()> {
    node.exec("ip", &["link", "add", name, "type", "bridge"])?;
    for cidr in cidrs {
        if cidr.contains(':') {
            node.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
            // No duplicate-address detection: the gateway must answer at once.
            node.exec("ip", &["-6", "addr", "add", cidr, "dev", name, "nodad"])?;
        } else {
            node.exec("ip", &["addr", "add", cidr, "dev", name])?;
        }
    }
    node.exec("ip", &["link", "set", name, "up"])?;
    Ok(())
}
