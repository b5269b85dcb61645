//! Neighbour entries, single route lookups and change notifications: what the agent needs to
//! mirror the kernel's next hop towards each remote VTEP (`OVL_NEXT_HOPS`).

use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd as _,
    time::Duration,
};

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAttribute, RouteMessage, RouteProtocol, RouteType},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

use crate::{Error, Handle, Result, RouteFamily};

/// A neighbour entry (ARP's or IPv6 neighbour discovery's) as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub ip: IpAddr,
    /// None while unresolved.
    pub mac: Option<[u8; 6]>,
    pub state: NeighbourState,
    /// The kernel keeps it resolved by itself (`NTF_EXT_MANAGED`, Linux 5.16+).
    pub managed: bool,
    /// Who made it (`NDA_PROTOCOL`; 0 for the kernel's own).
    pub protocol: u8,
}

impl Neighbour {
    /// Whether the kernel itself would send to `mac` now: resolved, or resolved and being
    /// re-confirmed (the kernel sends to a STALE, DELAY or PROBE entry's address while it checks).
    pub fn usable_mac(&self) -> Option<[u8; 6]> {
        match self.state {
            NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp => self.mac.filter(|m| *m != [0; 6]),
            _ => None,
        }
    }
}

/// Where the kernel sends a packet to an IPv4 destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteLookup {
    /// The device it leaves by.
    pub oif: u32,
    /// The neighbour it is handed to: the gateway, or the destination itself on the link.
    pub next_hop: IpAddr,
}

impl Handle {
    /// The neighbour entries, of both families, of interface `ifindex` (None: of every
    /// interface).
    pub fn neighbours(&mut self, ifindex: Option<u32>) -> Result<Vec<Neighbour>> {
        let mut m = NeighbourMessage::default();
        // Both families: ARP's entries and IPv6 neighbour discovery's.
        m.header.family = AddressFamily::Unspec;
        m.header.ifindex = ifindex.unwrap_or(0);
        let answers =
            self.request(
                RouteNetlinkMessage::GetNeighbour(m),
                NLM_F_DUMP,
                &|| match ifindex {
                    Some(i) => format!("listing the neighbours of interface #{i}"),
                    None => "listing the neighbours".to_owned(),
                },
            )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => parse_neighbour(n),
                _ => None,
            })
            .filter(|n| ifindex.is_none_or(|i| n.ifindex == i))
            .collect())
    }

    /// Makes the entry of `ip` on `ifindex` one the kernel keeps resolved by itself, probing it
    /// when it would go stale even while no packet of the kernel's own uses it (managed), and
    /// marks it as made by `protocol`. A resolved entry keeps its state and address; a missing
    /// one is created and resolved.
    pub fn ensure_managed_neighbour(
        &mut self,
        ifindex: u32,
        ip: IpAddr,
        protocol: u8,
    ) -> Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = family(ip);
        m.header.ifindex = ifindex;
        m.header.state = NeighbourState::None;
        m.attributes
            .push(NeighbourAttribute::Destination(neighbour_address(ip)));
        m.attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        m.attributes
            .push(NeighbourAttribute::Protocol(RouteProtocol::from(protocol)));
        self.change(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE,
            &|| format!("making neighbour {ip} on interface #{ifindex} a managed one"),
        )
    }

    /// Removes the neighbour entry of `ip` on `ifindex`; gone already is not an error.
    pub fn del_neighbour(&mut self, ifindex: u32, ip: IpAddr) -> Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = family(ip);
        m.header.ifindex = ifindex;
        m.attributes
            .push(NeighbourAttribute::Destination(neighbour_address(ip)));
        match self.change(RouteNetlinkMessage::DelNeighbour(m), 0, &|| {
            format!("removing neighbour {ip} on interface #{ifindex}")
        }) {
            Err(e) if e.is_not_found() => Ok(()),
            r => r,
        }
    }

    /// The kernel's route to `dst` leaving by `oif` (as `bpf_redirect_neigh` looks it up: the
    /// output device fixed, the FIB choosing the gateway). [`Error::NotFound`]-like errors when
    /// there is none.
    pub fn route_to(&mut self, dst: IpAddr, oif: u32) -> Result<RouteLookup> {
        match dst {
            IpAddr::V4(a) => self.route_to_of(a, 32, oif),
            IpAddr::V6(a) => self.route_to_of(a, 128, oif),
        }
    }

    fn route_to_of<A: RouteFamily + Into<IpAddr>>(
        &mut self,
        dst: A,
        prefix_len: u8,
        oif: u32,
    ) -> Result<RouteLookup> {
        let mut m = RouteMessage::default();
        m.header.address_family = A::FAMILY;
        m.header.destination_prefix_length = prefix_len;
        m.attributes
            .push(RouteAttribute::Destination(dst.to_route_address()));
        m.attributes.push(RouteAttribute::Oif(oif));
        let op = || format!("looking up the route to {dst} by interface #{oif}");
        let answers = self.request(RouteNetlinkMessage::GetRoute(m), NLM_F_ACK, &op)?;
        let route = answers
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            })
            .ok_or_else(|| Error::NotFound { op: op() })?;
        if route.header.kind != RouteType::Unicast {
            return Err(Error::NotFound { op: op() });
        }
        let mut found = RouteLookup {
            oif: 0,
            next_hop: dst.into(),
        };
        for a in &route.attributes {
            match a {
                RouteAttribute::Oif(i) => found.oif = *i,
                RouteAttribute::Gateway(g) => {
                    if let Some(g) = A::from_route_address(g) {
                        found.next_hop = g.into();
                    }
                }
                _ => {}
            }
        }
        Ok(found)
    }
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn neighbour_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

fn parse_neighbour(n: NeighbourMessage) -> Option<Neighbour> {
    if !matches!(n.header.family, AddressFamily::Inet | AddressFamily::Inet6) {
        return None;
    }
    let mut out = Neighbour {
        ifindex: n.header.ifindex,
        ip: Ipv4Addr::UNSPECIFIED.into(),
        mac: None,
        state: n.header.state,
        managed: false,
        protocol: 0,
    };
    let mut has_ip = false;
    for a in n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                out.ip = ip.into();
                has_ip = true;
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                out.ip = ip.into();
                has_ip = true;
            }
            NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                out.mac = Some(l[..6].try_into().ok()?)
            }
            NeighbourAttribute::ExtFlags(f) => out.managed = f.contains(NeighbourExtFlags::Managed),
            NeighbourAttribute::Protocol(p) => out.protocol = u8::from(p),
            _ => {}
        }
    }
    has_ip.then_some(out)
}

/// rtnetlink multicast groups (`RTNLGRP_*`).
pub mod groups {
    pub const LINK: u32 = 1;
    pub const NEIGH: u32 = 3;
    pub const IPV4_ROUTE: u32 = 7;
    pub const IPV6_ROUTE: u32 = 11;
}

/// A socket that hears of changes in the groups it joined (in the namespace it was opened in).
pub struct Events {
    socket: Socket,
}

impl Events {
    /// Joins `groups` ([`groups`]).
    pub fn subscribe(groups: &[u32]) -> Result<Events> {
        let op = "opening a NETLINK_ROUTE socket for change notifications";
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| Error::from_io(op, e))?;
        socket.bind_auto().map_err(|e| Error::from_io(op, e))?;
        for &g in groups {
            socket
                .add_membership(g)
                .map_err(|e| Error::from_io(format!("joining rtnetlink group {g}"), e))?;
        }
        socket
            .set_non_blocking(true)
            .map_err(|e| Error::from_io(op, e))?;
        Ok(Events { socket })
    }

    /// Waits up to `timeout` for changes and reads all that queued. A queue overflow (ENOBUFS:
    /// changes were lost) counts as a change of every kind: the caller reads everything again.
    pub fn wait(&mut self, timeout: Duration) -> Result<Changes> {
        let mut pfd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the call's duration.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(Changes::default());
            }
            return Err(Error::from_io("waiting for rtnetlink changes", e));
        }
        let mut changes = Changes::default();
        if n == 0 {
            return Ok(changes);
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.socket.recv(&mut &mut buf[..], 0) {
                Ok(0) => return Ok(changes),
                Ok(len) => changes.add(&buf[..len.min(buf.len())]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(changes),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    changes.neighbours = true;
                    changes.links_or_routes = true;
                }
                Err(e) => return Err(Error::from_io("reading rtnetlink changes", e)),
            }
        }
    }
}

/// What kinds of change [`Events::wait`] heard of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub neighbours: bool,
    /// A link or a route: what a route lookup depends on.
    pub links_or_routes: bool,
}

impl Changes {
    pub fn any(&self) -> bool {
        self.neighbours || self.links_or_routes
    }

    /// Notes the messages of one datagram (netlink headers: length, then type).
    fn add(&mut self, mut data: &[u8]) {
        while data.len() >= 16 {
            let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
            let kind = u16::from_ne_bytes([data[4], data[5]]);
            match kind {
                libc::RTM_NEWNEIGH | libc::RTM_DELNEIGH => self.neighbours = true,
                libc::RTM_NEWLINK | libc::RTM_DELLINK | libc::RTM_NEWROUTE | libc::RTM_DELROUTE => {
                    self.links_or_routes = true
                }
                _ => {}
            }
            // Messages are 4-byte aligned; a malformed length ends the walk.
            let step = (len + 3) & !3;
            if len < 16 || step > data.len() {
                break;
            }
            data = &data[step..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u32, kind: u16) -> Vec<u8> {
        let mut h = len.to_ne_bytes().to_vec();
        h.extend(kind.to_ne_bytes());
        h.resize(len as usize, 0);
        h
    }

    #[test]
    fn changes_are_told_apart_by_message_type_and_a_bad_length_ends_the_walk() {
        let mut c = Changes::default();
        c.add(&header(20, libc::RTM_NEWNEIGH));
        assert_eq!(
            c,
            Changes {
                neighbours: true,
                links_or_routes: false
            }
        );
        let mut c = Changes::default();
        let mut two = header(18, libc::RTM_NEWNEIGH);
        two.resize(20, 0); // padded to 4 bytes
        two.extend(header(16, libc::RTM_DELROUTE));
        c.add(&two);
        assert!(c.neighbours && c.links_or_routes);
        let mut c = Changes::default();
        let mut broken = header(16, 99);
        broken[0..4].copy_from_slice(&4u32.to_ne_bytes());
        broken.extend(header(16, libc::RTM_NEWLINK));
        c.add(&broken);
        assert!(!c.any(), "read past a malformed header");
    }
}
