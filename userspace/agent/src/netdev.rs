//! Facts about network interfaces in the agent's namespace (over rtnetlink, `overlay-netlink`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
    /// Its usable global IPv6 addresses (no link-local, none still in duplicate-address
    /// detection), in the kernel's order.
    pub ipv6: Vec<Ipv6Addr>,
    pub mtu: u32,
}

/// `--spare-headroom`: whether encapsulation leaves room for the underlay NIC's own link-layer
/// headroom ([`overlay_common::maps::AgentConfig::FLAG_SPARE_HEADROOM`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpareHeadroom {
    /// When the underlay is a bus device or stacked on one ([`reserves_headroom`]).
    Auto,
    On,
    Off,
}

impl std::str::FromStr for SpareHeadroom {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(SpareHeadroom::Auto),
            "on" => Ok(SpareHeadroom::On),
            "off" => Ok(SpareHeadroom::Off),
            _ => Err(format!("{s:?}: one of auto, on, off")),
        }
    }
}

impl SpareHeadroom {
    /// Whether to leave the room on underlay `ifname`.
    pub fn applies_to(self, ifname: &str) -> bool {
        match self {
            SpareHeadroom::Auto => reserves_headroom(ifname),
            SpareHeadroom::On => true,
            SpareHeadroom::Off => false,
        }
    }
}

/// Whether interface `ifname` is a bus device (PCI, virtio, VMBus: `/sys/class/net/<name>/device`
/// exists) or stacked on one (a VLAN, bond, team or macvlan whose lower devices, the
/// `lower_<name>` links, lead to one) rather than a software link alone (veth, bridge): such NICs'
/// drivers commonly reserve link-layer headroom in front of each frame (virtio_net its header,
/// hv_netvsc RNDIS), which the encapsulation then leaves room for
/// ([`overlay_common::maps::AgentConfig::FLAG_SPARE_HEADROOM`]).
pub fn reserves_headroom(ifname: &str) -> bool {
    reserves_headroom_in(std::path::Path::new("/sys/class/net"), ifname)
}

/// [`reserves_headroom`] in the sysfs class directory `class_net`.
pub fn reserves_headroom_in(class_net: &std::path::Path, ifname: &str) -> bool {
    // Stacks are shallow (a VLAN on a bond on NICs is three); the bound only guards the walk.
    const MAX_DEPTH: usize = 8;
    fn walk(class_net: &std::path::Path, ifname: &str, depth: usize) -> bool {
        let dir = class_net.join(ifname);
        if dir.join("device").exists() {
            return true;
        }
        if depth == 0 {
            return false;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return false;
        };
        entries.flatten().any(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("lower_"))
                .is_some_and(|lower| walk(class_net, lower, depth - 1))
        })
    }
    walk(class_net, ifname, MAX_DEPTH)
}

/// Looks an interface up by name. A missing one is an `overlay_netlink::Error::NoSuchDevice`
/// underneath (callers that branch can downcast).
pub fn link(ifname: &str) -> anyhow::Result<Link> {
    let mut nl = overlay_netlink::Handle::new()?;
    let l = nl
        .link(ifname)
        .with_context(|| format!("interface {ifname:?} not found"))?;
    let addr = nl.addresses(Some(l.ifindex))?.into_iter().next();
    let ipv6 = nl
        .addresses6(Some(l.ifindex))?
        .into_iter()
        .filter(|a| !a.tentative && !a.dad_failed && is_global_ipv6(&a.ip))
        .map(|a| a.ip)
        .collect();
    Ok(Link {
        name: l.name,
        ifindex: l.ifindex,
        mac: l.mac,
        ipv4: addr.map(|a| a.ip),
        ipv4_broadcast: addr.and_then(|a| a.broadcast()),
        ipv6,
        mtu: l.mtu,
    })
}

/// An IPv6 address an agent can be reached at across the fabric: not link-local (fe80::/10),
/// loopback, multicast or unspecified. Unique local addresses (fc00::/7) count: a fabric may
/// well use them.
fn is_global_ipv6(ip: &Ipv6Addr) -> bool {
    !(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || ip.is_unicast_link_local())
}

/// Which of the underlay interface's addresses identifies the agent (`--underlay-ip`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnderlayChoice {
    /// Its IPv4 address; its IPv6 one when it has no IPv4 address.
    Auto,
    Ipv4,
    Ipv6,
    /// This one, which it must have.
    Address(IpAddr),
}

impl std::str::FromStr for UnderlayChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<UnderlayChoice, String> {
        match s {
            "auto" => Ok(UnderlayChoice::Auto),
            "ipv4" => Ok(UnderlayChoice::Ipv4),
            "ipv6" => Ok(UnderlayChoice::Ipv6),
            other => other
                .parse()
                .map(UnderlayChoice::Address)
                .map_err(|_| format!("{other:?} is neither auto, ipv4, ipv6 nor an IP address")),
        }
    }
}

/// The agent's underlay address on `link` as `choice` picks it; an error naming the interface
/// and what it has otherwise.
pub fn underlay_address(link: &Link, choice: UnderlayChoice) -> Result<IpAddr, String> {
    let v6 = link.ipv6.first().copied().map(IpAddr::V6);
    let v4 = link.ipv4.map(IpAddr::V4);
    let has = || {
        let all: Vec<String> = v4
            .into_iter()
            .chain(link.ipv6.iter().map(|a| IpAddr::V6(*a)))
            .map(|a| a.to_string())
            .collect();
        if all.is_empty() {
            "no usable address".to_owned()
        } else {
            all.join(", ")
        }
    };
    let picked = match choice {
        UnderlayChoice::Auto => v4.or(v6),
        UnderlayChoice::Ipv4 => v4,
        UnderlayChoice::Ipv6 => v6,
        UnderlayChoice::Address(ip) => {
            let on_link = match ip {
                IpAddr::V4(ip) => link.ipv4 == Some(ip),
                IpAddr::V6(ip) => link.ipv6.contains(&ip),
            };
            on_link.then_some(ip)
        }
    };
    picked.ok_or_else(|| {
        let wanted = match choice {
            UnderlayChoice::Auto => "an IPv4 or global IPv6 address".to_owned(),
            UnderlayChoice::Ipv4 => "an IPv4 address".to_owned(),
            UnderlayChoice::Ipv6 => "a global IPv6 address".to_owned(),
            UnderlayChoice::Address(ip) => format!("the address {ip}"),
        };
        format!(
            "--underlay-iface {}: has no {wanted} for --underlay-ip (it has {})",
            link.name,
            has()
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spare_headroom_follows_stacked_devices_down_to_a_bus_device() {
        let root = std::env::temp_dir().join(format!("eo-sysfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dev = |name: &str, bus: bool, lowers: &[&str]| {
            let d = root.join(name);
            std::fs::create_dir_all(&d).unwrap();
            if bus {
                std::fs::create_dir_all(d.join("device")).unwrap();
            }
            for l in lowers {
                std::os::unix::fs::symlink(format!("../{l}"), d.join(format!("lower_{l}")))
                    .unwrap();
            }
        };
        dev("ens3", true, &[]);
        dev("ens4", true, &[]);
        dev("bond0", false, &["ens3", "ens4"]);
        dev("bond0.100", false, &["bond0"]);
        dev("ens3.7", false, &["ens3"]);
        dev("veth0", false, &[]);
        dev("veth0.5", false, &["veth0"]);
        dev("br0", false, &[]);
        // A cycle (sysfs has none; the walk must end anyway).
        dev("loop_a", false, &["loop_b"]);
        dev("loop_b", false, &["loop_a"]);
        let found = |n: &str| reserves_headroom_in(&root, n);
        let got = [
            found("ens3"),
            found("bond0"),
            found("bond0.100"),
            found("ens3.7"),
            found("veth0"),
            found("veth0.5"),
            found("br0"),
            found("loop_a"),
            found("missing"),
        ];
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            got,
            [true, true, true, true, false, false, false, false, false]
        );
        assert!(SpareHeadroom::On.applies_to("missing"));
        assert!(!SpareHeadroom::Off.applies_to("lo"));
        assert_eq!("auto".parse(), Ok(SpareHeadroom::Auto));
        assert!(
            "yes"
                .parse::<SpareHeadroom>()
                .unwrap_err()
                .contains("auto, on, off")
        );
    }

    fn link(ipv4: Option<&str>, ipv6: &[&str]) -> Link {
        Link {
            name: "eth0".into(),
            ifindex: 2,
            mac: [0; 6],
            ipv4: ipv4.map(|a| a.parse().unwrap()),
            ipv4_broadcast: None,
            ipv6: ipv6.iter().map(|a| a.parse().unwrap()).collect(),
            mtu: 1500,
        }
    }

    #[test]
    fn underlay_address_follows_the_choice() {
        let dual = link(Some("10.0.0.5"), &["fd00::5"]);
        let v6only = link(None, &["fd00::5", "2001:db8::5"]);
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        assert_eq!(
            underlay_address(&dual, UnderlayChoice::Auto),
            Ok(ip("10.0.0.5"))
        );
        assert_eq!(
            underlay_address(&v6only, UnderlayChoice::Auto),
            Ok(ip("fd00::5"))
        );
        assert_eq!(
            underlay_address(&dual, UnderlayChoice::Ipv6),
            Ok(ip("fd00::5"))
        );
        let chosen = UnderlayChoice::Address(ip("2001:db8::5"));
        assert_eq!(underlay_address(&v6only, chosen), Ok(ip("2001:db8::5")));
        let err = underlay_address(&v6only, UnderlayChoice::Ipv4).unwrap_err();
        assert!(
            err.contains("eth0") && err.contains("IPv4") && err.contains("fd00::5"),
            "{err}"
        );
        let err = underlay_address(&dual, UnderlayChoice::Address(ip("fd00::6"))).unwrap_err();
        assert!(err.contains("fd00::6"), "{err}");
        let err = underlay_address(&link(None, &[]), UnderlayChoice::Auto).unwrap_err();
        assert!(err.contains("no usable address"), "{err}");
    }

    #[test]
    fn only_global_ipv6_addresses_identify_an_agent() {
        assert!(is_global_ipv6(&"fd00::1".parse().unwrap()));
        assert!(is_global_ipv6(&"2001:db8::1".parse().unwrap()));
        for a in ["fe80::1", "::1", "::", "ff02::1"] {
            assert!(!is_global_ipv6(&a.parse().unwrap()), "{a}");
        }
        assert_eq!("ipv6".parse(), Ok(UnderlayChoice::Ipv6));
        assert!("eth0".parse::<UnderlayChoice>().is_err());
    }
}
