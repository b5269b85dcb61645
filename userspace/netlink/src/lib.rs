//! Links, veth pairs, addresses, routes, sysctls and network-namespace entry over rtnetlink, with
//! no `ip` or `nsenter` on the PATH.
//!
//! The API is synchronous: the CNI plugin is a short-lived binary that enters a container's
//! namespace with `setns` on its one thread, and the agent calls these from blocking code. A
//! [`Handle`] is one `NETLINK_ROUTE` socket; it acts in the namespace it was opened in (a socket
//! stays bound to its namespace), so [`Handle::in_netns`] gives one for a container while the
//! thread stays where it was. Errors are typed ([`Error`]) where callers branch: no such device,
//! not found, exists, permission.

mod neigh;
mod netkit;
mod netns;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    path::Path,
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope},
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    route::{
        RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol,
        RouteScope, RouteType,
    },
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

pub use neigh::{Changes, Events, Neighbour, RouteLookup, groups};
pub use netkit::{ContainerDevice, NETKIT_HEADROOM};
pub use netlink_packet_route::neighbour::NeighbourState;
pub use netns::Netns;

/// What went wrong, by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// ENODEV: the interface named in the request does not exist.
    #[error("{op}: no such device")]
    NoSuchDevice { op: String },
    /// ESRCH / EADDRNOTAVAIL / ENOENT: the route, address or file to act on is not there.
    #[error("{op}: not found")]
    NotFound { op: String },
    /// EEXIST: an interface, address or route of that name or key is already there.
    #[error("{op}: already exists")]
    Exists { op: String },
    /// EPERM / EACCES: the caller lacks CAP_NET_ADMIN (or CAP_SYS_ADMIN for namespaces).
    #[error("{op}: permission denied (needs CAP_NET_ADMIN)")]
    Permission { op: String },
    /// EOPNOTSUPP for a device kind: the kernel is built without it (`what` names it).
    #[error("{op}: not supported by this kernel: {what}")]
    Unsupported { op: String, what: String },
    /// Any other failure of the kernel or the system call.
    #[error("{op}: {source}")]
    Os { op: String, source: io::Error },
    /// The kernel's answer did not parse.
    #[error("{op}: malformed netlink answer: {detail}")]
    Decode { op: String, detail: String },
}

impl Error {
    /// Classifies an OS error for operation `op`.
    pub fn from_io(op: impl Into<String>, e: io::Error) -> Error {
        let op = op.into();
        match e.raw_os_error() {
            Some(libc::ENODEV) => Error::NoSuchDevice { op },
            Some(libc::ESRCH | libc::EADDRNOTAVAIL | libc::ENOENT) => Error::NotFound { op },
            Some(libc::EEXIST) => Error::Exists { op },
            Some(libc::EPERM | libc::EACCES) => Error::Permission { op },
            _ if e.kind() == io::ErrorKind::NotFound => Error::NotFound { op },
            _ => Error::Os { op, source: e },
        }
    }
    /// The thing acted on is not there (a device, an address, a route).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NoSuchDevice { .. } | Error::NotFound { .. })
    }
    pub fn is_exists(&self) -> bool {
        matches!(self, Error::Exists { .. })
    }
    /// The kernel lacks the feature asked for (a device kind it is built without).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, Error::Unsupported { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An interface as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub ifindex: u32,
    /// All zero for devices without an Ethernet address.
    pub mac: [u8; 6],
    pub mtu: u32,
    pub up: bool,
    /// `veth`, `netkit`, `bridge`, ... (none for plain devices such as `lo`).
    pub kind: Option<String>,
}

/// An IPv4 address on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address {
    pub ifindex: u32,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
}

impl Address {
    /// The directed broadcast address of its network (none for /31 and /32).
    pub fn broadcast(&self) -> Option<Ipv4Addr> {
        (self.prefix_len < 31)
            .then(|| Ipv4Addr::from(u32::from(self.ip) | (u32::MAX >> self.prefix_len)))
    }
}

/// An IPv6 address on an interface, with what the kernel says of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address6 {
    pub ifindex: u32,
    pub ip: Ipv6Addr,
    pub prefix_len: u8,
    /// Scope universe (global and unique-local addresses), not link or host.
    pub global: bool,
    /// Duplicate-address detection still running: not usable as a source yet.
    pub tentative: bool,
    /// Duplicate-address detection found the address in use elsewhere.
    pub dad_failed: bool,
    /// Its preferred lifetime is over (still valid, no longer chosen for new flows).
    pub deprecated: bool,
}

impl Address6 {
    /// A global address to add (see [`Handle::add_address6`]).
    pub fn new(ifindex: u32, ip: Ipv6Addr, prefix_len: u8) -> Address6 {
        Address6 {
            ifindex,
            ip,
            prefix_len,
            global: true,
            tentative: false,
            dad_failed: false,
            deprecated: false,
        }
    }
}

/// What an IPv4 route differs in from an IPv6 one: the address type and how rtnetlink
/// carries it. [`RouteOf`] and the route calls of [`Handle`] are written once over it.
pub trait RouteFamily: Copy + Eq + std::fmt::Debug + std::fmt::Display {
    const FAMILY: AddressFamily;
    /// The destination of the default route.
    const UNSPECIFIED: Self;
    /// For error context: "listing IPv6 routes".
    const ROUTES: &'static str;
    fn to_route_address(self) -> RouteAddress;
    fn from_route_address(a: &RouteAddress) -> Option<Self>;
    /// The scope a route is added with: IPv4 routes without a gateway are link-scoped; the
    /// kernel gives every IPv6 route universe scope whatever it is told.
    fn scope(has_gateway: bool) -> RouteScope;
}

impl RouteFamily for Ipv4Addr {
    const FAMILY: AddressFamily = AddressFamily::Inet;
    const UNSPECIFIED: Self = Ipv4Addr::UNSPECIFIED;
    const ROUTES: &'static str = "routes";
    fn to_route_address(self) -> RouteAddress {
        RouteAddress::Inet(self)
    }
    fn from_route_address(a: &RouteAddress) -> Option<Self> {
        match a {
            RouteAddress::Inet(ip) => Some(*ip),
            _ => None,
        }
    }
    fn scope(has_gateway: bool) -> RouteScope {
        if has_gateway {
            RouteScope::Universe
        } else {
            RouteScope::Link
        }
    }
}

impl RouteFamily for Ipv6Addr {
    const FAMILY: AddressFamily = AddressFamily::Inet6;
    const UNSPECIFIED: Self = Ipv6Addr::UNSPECIFIED;
    const ROUTES: &'static str = "IPv6 routes";
    fn to_route_address(self) -> RouteAddress {
        RouteAddress::Inet6(self)
    }
    fn from_route_address(a: &RouteAddress) -> Option<Self> {
        match a {
            RouteAddress::Inet6(ip) => Some(*ip),
            _ => None,
        }
    }
    fn scope(_: bool) -> RouteScope {
        RouteScope::Universe
    }
}

/// A unicast route of the main table, of either family ([`Route`], [`Route6`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteOf<A: RouteFamily> {
    /// Destination network (0.0.0.0/0 or `::/0` for the default route).
    pub dst: A,
    pub prefix_len: u8,
    pub oif: Option<u32>,
    pub gateway: Option<A>,
    /// Preferred source address.
    pub src: Option<A>,
    /// `rtm_protocol`: who installed it (see [`RouteOf::protocol`]).
    pub protocol: u8,
    /// The gateway is on the link even outside the interface's subnets.
    pub onlink: bool,
}

/// An IPv4 route of the main table.
pub type Route = RouteOf<Ipv4Addr>;
/// An IPv6 route of the main table.
pub type Route6 = RouteOf<Ipv6Addr>;

impl<A: RouteFamily> RouteOf<A> {
    /// A route to `dst/prefix_len` through interface `oif`, protocol `static`.
    pub fn new(dst: A, prefix_len: u8, oif: u32) -> Self {
        RouteOf {
            dst,
            prefix_len,
            oif: Some(oif),
            gateway: None,
            src: None,
            protocol: libc::RTPROT_STATIC,
            onlink: false,
        }
    }
    /// The default route via `gateway` on `oif`, on-link (the gateway needs no address of the
    /// interface's subnet).
    pub fn default_via(gateway: A, oif: u32) -> Self {
        Self::new(A::UNSPECIFIED, 0, oif).gateway(gateway).onlink()
    }
    pub fn gateway(mut self, gw: A) -> Self {
        self.gateway = Some(gw);
        self
    }
    pub fn src(mut self, src: A) -> Self {
        self.src = Some(src);
        self
    }
    pub fn protocol(mut self, proto: u8) -> Self {
        self.protocol = proto;
        self
    }
    pub fn onlink(mut self) -> Self {
        self.onlink = true;
        self
    }
    pub fn is_default(&self) -> bool {
        self.prefix_len == 0
    }
}

/// One rtnetlink socket, acting in the network namespace it was opened in.
pub struct Handle {
    socket: Socket,
    seq: u32,
}

impl Handle {
    /// A socket in the calling thread's network namespace.
    pub fn new() -> Result<Handle> {
        let op = "opening a NETLINK_ROUTE socket";
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| Error::from_io(op, e))?;
        socket.bind_auto().map_err(|e| Error::from_io(op, e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| Error::from_io(op, e))?;
        // Errors carry the failing attribute's name in the extended ACK; strict checking makes
        // dumps honour their filters. Both are best effort on old kernels.
        let _ = socket.set_ext_ack(true);
        Ok(Handle { socket, seq: 0 })
    }

    /// A socket in the network namespace `ns` (the thread enters it only while opening it).
    pub fn in_netns(ns: &Netns) -> Result<Handle> {
        ns.run(Handle::new)?
    }

    /// Sends one request and collects the answers (messages of a dump; none for an ACK).
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: &dyn Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket
            .send(&buf, 0)
            .map_err(|e| Error::from_io(op(), e))?;
        let mut out = vec![];
        loop {
            let (data, _) = self
                .socket
                .recv_from_full()
                .map_err(|e| Error::from_io(op(), e))?;
            let mut offset = 0;
            while offset < data.len() {
                let reply: NetlinkMessage<RouteNetlinkMessage> =
                    NetlinkMessage::deserialize(&data[offset..]).map_err(|e| Error::Decode {
                        op: op(),
                        detail: e.to_string(),
                    })?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += len;
                if reply.header.sequence_number != self.seq {
                    continue; // a late answer to an earlier request
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(out),
                        Some(_) => return Err(Error::from_io(op(), e.to_io())),
                    },
                    // A get answers once and then ACKs (NLM_F_ACK); a dump ends with Done.
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }

    /// Runs a change and waits for the kernel's ACK.
    fn change(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: &dyn Fn() -> String,
    ) -> Result<()> {
        self.request(msg, flags | NLM_F_ACK, op).map(drop)
    }

    // ----- links -----

    /// The interface named `name`.
    pub fn link(&mut self, name: &str) -> Result<Link> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_owned()));
        let op = || format!("looking up interface {name}");
        let answers = self.request(RouteNetlinkMessage::GetLink(m), NLM_F_ACK, &op)?;
        first_link(answers).ok_or_else(|| Error::NoSuchDevice { op: op() })
    }

    /// The interface with index `ifindex`.
    pub fn link_by_index(&mut self, ifindex: u32) -> Result<Link> {
        let mut m = LinkMessage::default();
        m.header.index = ifindex;
        let op = || format!("looking up interface #{ifindex}");
        let answers = self.request(RouteNetlinkMessage::GetLink(m), NLM_F_ACK, &op)?;
        first_link(answers).ok_or_else(|| Error::NoSuchDevice { op: op() })
    }

    /// Every interface of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let answers = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
            &|| "listing interfaces".to_owned(),
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(parse_link(l)),
                _ => None,
            })
            .collect())
    }

    /// Creates a veth pair `name` <-> `peer`, both with `mtu`; the peer is created inside
    /// `peer_netns` when given (it never appears in this namespace). Fails with
    /// [`Error::Exists`] if either name is taken.
    pub fn add_veth(
        &mut self,
        name: &str,
        peer: &str,
        mtu: u32,
        peer_netns: Option<&Netns>,
    ) -> Result<()> {
        let peer_msg = pair_peer(peer, mtu, peer_netns);
        let mut m = named_link(name, mtu);
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]));
        self.change(
            RouteNetlinkMessage::NewLink(m),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| format!("adding veth pair {name} / {peer}"),
        )
    }

    /// Creates a bridge `name` (the lab's stand-in for a physical switch).
    pub fn add_bridge(&mut self, name: &str) -> Result<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_owned()));
        m.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Bridge,
            )]));
        self.change(
            RouteNetlinkMessage::NewLink(m),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| format!("adding bridge {name}"),
        )
    }

    /// Deletes interface `name` (a veth takes its peer with it).
    pub fn del_link(&mut self, name: &str) -> Result<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_owned()));
        self.change(RouteNetlinkMessage::DelLink(m), 0, &|| {
            format!("deleting interface {name}")
        })
    }

    /// Deletes `name` if it exists; whether it did.
    pub fn del_link_if_exists(&mut self, name: &str) -> Result<bool> {
        match self.del_link(name) {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn set_link(
        &mut self,
        name: &str,
        what: &str,
        edit: impl FnOnce(&mut LinkMessage),
    ) -> Result<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_owned()));
        edit(&mut m);
        self.change(RouteNetlinkMessage::SetLink(m), 0, &|| {
            format!("setting {what} of {name}")
        })
    }

    /// Brings `name` up.
    pub fn set_up(&mut self, name: &str) -> Result<()> {
        self.set_link(name, "up", |m| {
            m.header.flags = LinkFlags::Up;
            m.header.change_mask = LinkFlags::Up;
        })
    }

    pub fn set_mtu(&mut self, name: &str, mtu: u32) -> Result<()> {
        self.set_link(name, "the MTU", |m| {
            m.attributes.push(LinkAttribute::Mtu(mtu))
        })
    }

    pub fn set_mac(&mut self, name: &str, mac: [u8; 6]) -> Result<()> {
        self.set_link(name, "the MAC address", |m| {
            m.attributes.push(LinkAttribute::Address(mac.to_vec()))
        })
    }

    /// Makes `name` a port of bridge `master` (by the bridge's index).
    pub fn set_master(&mut self, name: &str, master: u32) -> Result<()> {
        self.set_link(name, "the master", |m| {
            m.attributes.push(LinkAttribute::Controller(master))
        })
    }

    /// Moves `name` into the namespace `ns` (it disappears from this one).
    pub fn move_to_netns(&mut self, name: &str, ns: &Netns) -> Result<()> {
        let fd = ns.file().as_raw_fd();
        self.set_link(name, "the namespace", |m| {
            m.attributes.push(LinkAttribute::NetNsFd(fd))
        })
    }

    // ----- addresses -----

    /// The IPv4 addresses of interface `ifindex` (all interfaces' with `None`).
    pub fn addresses(&mut self, ifindex: Option<u32>) -> Result<Vec<Address>> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        let answers = self.request(RouteNetlinkMessage::GetAddress(m), NLM_F_DUMP, &|| {
            "listing addresses".to_owned()
        })?;
        let mut out = vec![];
        for a in answers {
            let RouteNetlinkMessage::NewAddress(a) = a else {
                continue;
            };
            if a.header.family != AddressFamily::Inet
                || ifindex.is_some_and(|i| i != a.header.index)
            {
                continue;
            }
            // IFA_LOCAL is the interface's own address (IFA_ADDRESS the peer's on a point-to-point
            // link); plain devices report both equal, some only IFA_ADDRESS.
            let local = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let addr = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = local.or(addr) {
                out.push(Address {
                    ifindex: a.header.index,
                    ip,
                    prefix_len: a.header.prefix_len,
                });
            }
        }
        Ok(out)
    }

    fn address_msg(addr: &Address) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = addr.prefix_len;
        m.header.index = addr.ifindex;
        m.header.scope = AddressScope::Universe;
        m.attributes
            .push(AddressAttribute::Local(IpAddr::V4(addr.ip)));
        m.attributes
            .push(AddressAttribute::Address(IpAddr::V4(addr.ip)));
        if let Some(b) = addr.broadcast() {
            m.attributes.push(AddressAttribute::Broadcast(b));
        }
        m
    }

    /// Adds an address; [`Error::Exists`] if the interface has it already.
    pub fn add_address(&mut self, addr: Address) -> Result<()> {
        self.change(
            RouteNetlinkMessage::NewAddress(Self::address_msg(&addr)),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| {
                format!(
                    "adding {}/{} to interface #{}",
                    addr.ip, addr.prefix_len, addr.ifindex
                )
            },
        )
    }

    pub fn del_address(&mut self, addr: Address) -> Result<()> {
        self.change(
            RouteNetlinkMessage::DelAddress(Self::address_msg(&addr)),
            0,
            &|| {
                format!(
                    "deleting {}/{} from interface #{}",
                    addr.ip, addr.prefix_len, addr.ifindex
                )
            },
        )
    }

    /// The IPv6 addresses of interface `ifindex` (all interfaces' with `None`).
    pub fn addresses6(&mut self, ifindex: Option<u32>) -> Result<Vec<Address6>> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet6;
        let answers = self.request(RouteNetlinkMessage::GetAddress(m), NLM_F_DUMP, &|| {
            "listing IPv6 addresses".to_owned()
        })?;
        let mut out = vec![];
        for a in answers {
            let RouteNetlinkMessage::NewAddress(a) = a else {
                continue;
            };
            if a.header.family != AddressFamily::Inet6
                || ifindex.is_some_and(|i| i != a.header.index)
            {
                continue;
            }
            // IFA_FLAGS holds all 32 flag bits; the header's byte only the first eight.
            let flags = a
                .attributes
                .iter()
                .find_map(|at| match at {
                    AddressAttribute::Flags(f) => Some(*f),
                    _ => None,
                })
                .unwrap_or_else(|| AddressFlags::from_bits_retain(a.header.flags.bits() as u32));
            let ip = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Local(IpAddr::V6(ip))
                | AddressAttribute::Address(IpAddr::V6(ip)) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = ip {
                out.push(Address6 {
                    ifindex: a.header.index,
                    ip,
                    prefix_len: a.header.prefix_len,
                    global: a.header.scope == AddressScope::Universe,
                    tentative: flags.contains(AddressFlags::Tentative),
                    dad_failed: flags.contains(AddressFlags::Dadfailed),
                    deprecated: flags.contains(AddressFlags::Deprecated),
                });
            }
        }
        Ok(out)
    }

    fn address6_msg(addr: &Address6) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet6;
        m.header.prefix_len = addr.prefix_len;
        m.header.index = addr.ifindex;
        m.header.scope = AddressScope::Universe;
        m.attributes
            .push(AddressAttribute::Address(IpAddr::V6(addr.ip)));
        m
    }

    /// Adds a global IPv6 address, usable at once (no duplicate-address detection: `nodad`);
    /// [`Error::Exists`] if the interface has it already.
    pub fn add_address6(&mut self, addr: Address6) -> Result<()> {
        let mut m = Self::address6_msg(&addr);
        m.header.flags = AddressHeaderFlags::Nodad;
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        self.change(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| {
                format!(
                    "adding {}/{} to interface #{}",
                    addr.ip, addr.prefix_len, addr.ifindex
                )
            },
        )
    }

    pub fn del_address6(&mut self, addr: Address6) -> Result<()> {
        self.change(
            RouteNetlinkMessage::DelAddress(Self::address6_msg(&addr)),
            0,
            &|| {
                format!(
                    "deleting {}/{} from interface #{}",
                    addr.ip, addr.prefix_len, addr.ifindex
                )
            },
        )
    }

    // ----- routes -----

    /// The IPv4 unicast routes of the main table.
    pub fn routes(&mut self) -> Result<Vec<Route>> {
        self.routes_of()
    }

    /// The IPv6 unicast routes of the main table (the kernel's own `fe80::/64` and local
    /// routes included as it lists them; multicast and other tables left out).
    pub fn routes6(&mut self) -> Result<Vec<Route6>> {
        self.routes_of()
    }

    fn routes_of<A: RouteFamily>(&mut self) -> Result<Vec<RouteOf<A>>> {
        let mut m = RouteMessage::default();
        m.header.address_family = A::FAMILY;
        let answers = self.request(RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP, &|| {
            format!("listing {}", A::ROUTES)
        })?;
        let mut out = vec![];
        for r in answers {
            let RouteNetlinkMessage::NewRoute(r) = r else {
                continue;
            };
            let table = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(r.header.table as u32);
            if r.header.address_family != A::FAMILY
                || table != RouteHeader::RT_TABLE_MAIN as u32
                || r.header.kind != RouteType::Unicast
            {
                continue;
            }
            let mut route = RouteOf {
                dst: A::UNSPECIFIED,
                prefix_len: r.header.destination_prefix_length,
                oif: None,
                gateway: None,
                src: None,
                protocol: u8::from(r.header.protocol),
                onlink: r.header.flags.contains(RouteFlags::Onlink),
            };
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(d) => {
                        route.dst = A::from_route_address(d).unwrap_or(route.dst)
                    }
                    RouteAttribute::Oif(i) => route.oif = Some(*i),
                    RouteAttribute::Gateway(g) => route.gateway = A::from_route_address(g),
                    RouteAttribute::PrefSource(s) => route.src = A::from_route_address(s),
                    _ => {}
                }
            }
            out.push(route);
        }
        Ok(out)
    }

    fn route_msg<A: RouteFamily>(r: &RouteOf<A>) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = A::FAMILY;
        m.header.destination_prefix_length = r.prefix_len;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::from(r.protocol);
        m.header.kind = RouteType::Unicast;
        m.header.scope = A::scope(r.gateway.is_some());
        if r.onlink {
            m.header.flags = RouteFlags::Onlink;
        }
        if r.prefix_len > 0 {
            m.attributes
                .push(RouteAttribute::Destination(r.dst.to_route_address()));
        }
        if let Some(oif) = r.oif {
            m.attributes.push(RouteAttribute::Oif(oif));
        }
        if let Some(gw) = r.gateway {
            m.attributes
                .push(RouteAttribute::Gateway(gw.to_route_address()));
        }
        if let Some(src) = r.src {
            m.attributes
                .push(RouteAttribute::PrefSource(src.to_route_address()));
        }
        m
    }

    fn route_op<A: RouteFamily>(verb: &str, r: &RouteOf<A>) -> String {
        let mut s = format!("{verb} route {}/{}", r.dst, r.prefix_len);
        if let Some(g) = r.gateway {
            s += &format!(" via {g}");
        }
        if let Some(o) = r.oif {
            s += &format!(" dev #{o}");
        }
        s
    }

    fn add_route_of<A: RouteFamily>(
        &mut self,
        r: RouteOf<A>,
        flags: u16,
        verb: &str,
    ) -> Result<()> {
        self.change(
            RouteNetlinkMessage::NewRoute(Self::route_msg(&r)),
            NLM_F_CREATE | flags,
            &|| Self::route_op(verb, &r),
        )
    }

    fn del_route_of<A: RouteFamily>(&mut self, r: RouteOf<A>) -> Result<()> {
        let mut m = Self::route_msg(&r);
        // Deletion matches on what is given; the scope of the original need not be guessed.
        m.header.scope = RouteScope::NoWhere;
        self.change(RouteNetlinkMessage::DelRoute(m), 0, &|| {
            Self::route_op("deleting", &r)
        })
    }

    /// Adds a route; [`Error::Exists`] if one to that destination is there.
    pub fn add_route(&mut self, r: Route) -> Result<()> {
        self.add_route_of(r, NLM_F_EXCL, "adding")
    }

    /// Adds a route or replaces the one to the same destination.
    pub fn replace_route(&mut self, r: Route) -> Result<()> {
        self.add_route_of(r, NLM_F_REPLACE, "replacing")
    }

    pub fn del_route(&mut self, r: Route) -> Result<()> {
        self.del_route_of(r)
    }

    /// Adds an IPv6 route; [`Error::Exists`] if one to that destination is there.
    pub fn add_route6(&mut self, r: Route6) -> Result<()> {
        self.add_route_of(r, NLM_F_EXCL, "adding")
    }

    /// Adds an IPv6 route or replaces the one to the same destination.
    pub fn replace_route6(&mut self, r: Route6) -> Result<()> {
        self.add_route_of(r, NLM_F_REPLACE, "replacing")
    }

    pub fn del_route6(&mut self, r: Route6) -> Result<()> {
        self.del_route_of(r)
    }
}

/// A link message naming `name` with `mtu`: the device half of a pair request.
pub(crate) fn named_link(name: &str, mtu: u32) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_owned()));
    m.attributes.push(LinkAttribute::Mtu(mtu));
    m
}

/// The peer half of a pair request (veth or netkit): `peer` with `mtu`, created inside
/// `peer_netns` when given.
pub(crate) fn pair_peer(peer: &str, mtu: u32, peer_netns: Option<&Netns>) -> LinkMessage {
    let mut m = named_link(peer, mtu);
    if let Some(ns) = peer_netns {
        m.attributes
            .push(LinkAttribute::NetNsFd(ns.file().as_raw_fd()));
    }
    m
}

fn first_link(answers: Vec<RouteNetlinkMessage>) -> Option<Link> {
    answers.into_iter().find_map(|m| match m {
        RouteNetlinkMessage::NewLink(l) => Some(parse_link(l)),
        _ => None,
    })
}

fn parse_link(l: LinkMessage) -> Link {
    let mut link = Link {
        name: String::new(),
        ifindex: l.header.index,
        mac: [0; 6],
        mtu: 0,
        up: l.header.flags.contains(LinkFlags::Up),
        kind: None,
    };
    for a in l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(mac) if mac.len() == 6 => link.mac.copy_from_slice(&mac),
            LinkAttribute::Mtu(m) => link.mtu = m,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        link.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

/// Writes a sysctl under /proc/sys (`net/ipv4/ip_forward` style path), in the calling thread's
/// network namespace (run it inside [`Netns::run`] for another one). A missing knob (a kernel
/// without IPv6, a device that is gone) is [`Error::NotFound`].
pub fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    std::fs::write(&path, value)
        .map_err(|e| Error::from_io(format!("writing {value} to {}", path.display()), e))
}

/// Reads a sysctl (see [`write_sysctl`]).
pub fn read_sysctl(key: &str) -> Result<String> {
    let path = Path::new("/proc/sys").join(key);
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| Error::from_io(format!("reading {}", path.display()), e))
}
