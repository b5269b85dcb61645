//! Facts about network interfaces in the agent's namespace (over rtnetlink, `overlay-netlink`).

use std::net::Ipv4Addr;

use anyhow::Context as _;

/// An interface's index, MAC and first IPv4 address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub ipv4: Option<Ipv4Addr>,
    /// The directed broadcast address of that IPv4 address's network (none for /31 and /32).
    pub ipv4_broadcast: Option<Ipv4Addr>,
}

/// Looks an interface up by name. A missing one is an `overlay_netlink::Error::NoSuchDevice`
/// underneath (callers that branch can downcast).
pub fn link(ifname: &str) -> anyhow::Result<Link> {
    let mut nl = overlay_netlink::Handle::new()?;
    let l = nl
        .link(ifname)
        .with_context(|| format!("interface {ifname:?} not found"))?;
    let addr = nl.addresses(Some(l.ifindex))?.into_iter().next();
    Ok(Link {
        name: l.name,
        ifindex: l.ifindex,
        mac: l.mac,
        ipv4: addr.map(|a| a.ip),
        ipv4_broadcast: addr.and_then(|a| a.broadcast()),
    })
}

/// Makes a host-side interface deaf to IPv6 router messages: no Router Advertisements (so no
/// default route or SLAAC address from a container), no Redirects, no autoconfiguration. Written
/// through /proc/sys of the agent's namespace; a kernel without IPv6 has nothing to set.
pub fn refuse_router_messages(ifname: &str) -> anyhow::Result<()> {
    if !std::path::Path::new("/proc/sys/net/ipv6/conf")
        .join(ifname)
        .exists()
    {
        return Ok(());
    }
    for knob in ["accept_ra", "accept_redirects", "autoconf"] {
        overlay_netlink::write_sysctl(&format!("net/ipv6/conf/{ifname}/{knob}"), "0")?;
    }
    Ok(())
}

/// The name of the interface with this index, if it still exists.
pub fn name_of(ifindex: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return None;
    }
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..len]).into_owned())
}
