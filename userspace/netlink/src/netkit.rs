//! netkit pairs (kernel 6.7+), the alternative to a veth pair for a container: a program
//! attached to the host side as the device's own policy runs in the sending device's transmit
//! path, with no TC hook and no backlog queue in between.
//!
//! Created in L2 mode, so the container sees an Ethernet device with a MAC (the datapath's
//! ARP/ND answers and MAC checks work as on veth). The host side forwards by default (host to
//! container traffic, the datapath's ARP replies, redirects into the pair); the container side
//! blackholes until the agent attaches its program, so a container whose program is not
//! attached yet (or whose agent failed half-way) sends nothing unchecked.

use std::{fmt, str::FromStr};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoData, InfoKind, InfoNetkit, LinkAttribute, LinkInfo, NetkitMode, NetkitPolicy},
};

use crate::{Error, Handle, Netns, Result, named_link, pair_peer};

/// Room a netkit pair reserves in front of every packet (`IFLA_NETKIT_HEADROOM`, kernel 6.14+;
/// older kernels ignore the attribute): the 70 bytes of an outer IPv6 + UDP + VXLAN + inner
/// Ethernet header, the encapsulation's spare 32 for an underlay NIC's own link-layer headroom
/// (`overlay-ebpf`'s `encap::SPARE_HEADROOM`) and 26 more, so encapsulating a container's packet
/// never reallocates its head.
pub const NETKIT_HEADROOM: u16 = 128;

/// The kind of device pair that connects a container to the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ContainerDevice {
    /// A veth pair: every kernel; the agent's program on the host side's TC ingress (TCX).
    #[default]
    Veth,
    /// A netkit pair (`CONFIG_NETKIT`, kernel 6.7+): the agent's program as the pair's policy.
    Netkit,
}

impl ContainerDevice {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerDevice::Veth => "veth",
            ContainerDevice::Netkit => "netkit",
        }
    }
}

impl fmt::Display for ContainerDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ContainerDevice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "veth" => Ok(ContainerDevice::Veth),
            "netkit" => Ok(ContainerDevice::Netkit),
            other => Err(format!(
                "unknown container device {other:?} (veth or netkit)"
            )),
        }
    }
}

/// Whether an error of creating a link says that the kernel has no such device kind (netkit
/// not built: the kernel answers EOPNOTSUPP, "Unknown device type").
fn is_unknown_kind(e: &Error) -> bool {
    matches!(e, Error::Os { source, .. } if source.raw_os_error() == Some(libc::EOPNOTSUPP))
}

impl Handle {
    /// Creates a netkit pair `name` <-> `peer` in L2 mode, both with `mtu` (and
    /// [`NETKIT_HEADROOM`] where the kernel knows it); the peer is created inside `peer_netns`
    /// when given. The peer's policy is blackhole until a program is attached (see the module
    /// comment). [`Error::Unsupported`] on a kernel without netkit; [`Error::Exists`] if a name
    /// is taken.
    pub fn add_netkit(
        &mut self,
        name: &str,
        peer: &str,
        mtu: u32,
        peer_netns: Option<&Netns>,
    ) -> Result<()> {
        let peer_msg = pair_peer(peer, mtu, peer_netns);
        let mut m = named_link(name, mtu);
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Netkit),
            LinkInfo::Data(InfoData::Netkit(vec![
                InfoNetkit::Mode(NetkitMode::L2),
                InfoNetkit::Policy(NetkitPolicy::Pass),
                InfoNetkit::PeerPolicy(NetkitPolicy::Drop),
                // An attribute past the kernel's netkit policy is skipped (the link attributes
                // are parsed leniently), so kernels before 6.14 create the pair without it.
                InfoNetkit::Headroom(NETKIT_HEADROOM),
                InfoNetkit::Peer(peer_msg),
            ])),
        ]));
        let op = || format!("adding netkit pair {name} / {peer}");
        match self.change(
            RouteNetlinkMessage::NewLink(m),
            NLM_F_CREATE | NLM_F_EXCL,
            &op,
        ) {
            Err(e) if is_unknown_kind(&e) => Err(Error::Unsupported {
                op: op(),
                what:
                    "netkit devices (the kernel is built without CONFIG_NETKIT, or older than 6.7)"
                        .to_owned(),
            }),
            other => other,
        }
    }

    /// Creates a container's pair of the given kind (see [`Handle::add_veth`],
    /// [`Handle::add_netkit`]).
    pub fn add_container_pair(
        &mut self,
        kind: ContainerDevice,
        name: &str,
        peer: &str,
        mtu: u32,
        peer_netns: Option<&Netns>,
    ) -> Result<()> {
        match kind {
            ContainerDevice::Veth => self.add_veth(name, peer, mtu, peer_netns),
            ContainerDevice::Netkit => self.add_netkit(name, peer, mtu, peer_netns),
        }
    }

    /// Whether this kernel creates netkit pairs: creates a throwaway pair named `probe` /
    /// `probe` + `p` in this namespace and deletes it. `Err` only for other failures (no
    /// permission, the name taken).
    pub fn netkit_supported(&mut self, probe: &str) -> Result<bool> {
        let peer = format!("{probe}p");
        // A probe a crashed earlier run left behind.
        self.del_link_if_exists(probe)?;
        match self.add_netkit(probe, &peer, 1500, None) {
            Ok(()) => {
                self.del_link(probe)?;
                Ok(true)
            }
            Err(Error::Unsupported { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_device_round_trips() {
        for d in [ContainerDevice::Veth, ContainerDevice::Netkit] {
            assert_eq!(d.to_string().parse::<ContainerDevice>(), Ok(d));
        }
        assert!(
            "tap"
                .parse::<ContainerDevice>()
                .unwrap_err()
                .contains("veth or netkit")
        );
        assert_eq!(ContainerDevice::default(), ContainerDevice::Veth);
    }
}
