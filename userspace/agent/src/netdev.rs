//! Facts about network interfaces in the agent's namespace.

use std::{
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

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

/// Looks an interface up by name (iproute2's JSON output; netlink directly is a later change).
pub fn link(ifname: &str) -> anyhow::Result<Link> {
    let out = Command::new("ip")
        .args(["-j", "addr", "show", "dev", ifname])
        .stdin(Stdio::null())
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "interface {ifname:?} not found: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing `ip -j addr`")?;
    let l = &v[0];
    let ifindex = l["ifindex"]
        .as_u64()
        .with_context(|| format!("{ifname}: no ifindex"))? as u32;
    let mac: overlay_api::MacAddr = l["address"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("{ifname}: no Ethernet address"))?;
    let inet = l["addr_info"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["family"] == "inet"));
    let ipv4: Option<Ipv4Addr> = inet
        .and_then(|i| i["local"].as_str())
        .and_then(|s| s.parse().ok());
    let prefix = inet.and_then(|i| i["prefixlen"].as_u64());
    let ipv4_broadcast = match (ipv4, prefix) {
        (Some(ip), Some(len)) if len < 31 => {
            Some(Ipv4Addr::from(u32::from(ip) | (u32::MAX >> len)))
        }
        _ => None,
    };
    Ok(Link {
        name: ifname.to_owned(),
        ifindex,
        mac: mac.0,
        ipv4,
        ipv4_broadcast,
    })
}

/// Makes a host-side interface deaf to IPv6 router messages: no Router Advertisements (so no
/// default route or SLAAC address from a container), no Redirects, no autoconfiguration. Written
/// through /proc/sys of the agent's namespace; a kernel without IPv6 has nothing to set.
pub fn refuse_router_messages(ifname: &str) -> anyhow::Result<()> {
    let dir = std::path::Path::new("/proc/sys/net/ipv6/conf").join(ifname);
    if !dir.exists() {
        return Ok(());
    }
    for (knob, value) in [
        ("accept_ra", "0"),
        ("accept_redirects", "0"),
        ("autoconf", "0"),
    ] {
        let path = dir.join(knob);
        std::fs::write(&path, value).with_context(|| format!("writing {}", path.display()))?;
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
