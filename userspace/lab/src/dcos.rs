//! DC/OS's kernel datapath on a lab node, as DC/OS builds it: the `vtep1024` VXLAN device (VNI
//! 1024, UDP 64000, no learning) and, per peer agent, the permanent neighbour entry, FDB entry and
//! route that its routing daemon (dcos-net) writes. Used by the interop test and the benchmark's
//! kernel baseline.

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
