//! Rules about an agent's subnet of a network that the master (which hands the subnets out and
//! reports their halves in DC/OS's `mesos_bridge`/`docker_bridge`) and the agent (whose IPAM,
//! gateways and Docker pools live in them) must agree on, defined once here.
//!
//! Each agent subnet is split in two halves, DC/OS's layout: the first for Mesos (CNI)
//! containers, the second for Docker. Each half's first host is the containers' gateway (the
//! host's own address on the network); its network and broadcast addresses are never handed out.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

use crate::agent::Half;

/// Longest IPv4 agent prefix the master accepts: each half (/30) then still holds a gateway and
/// one container besides its network and broadcast addresses.
pub const MAX_AGENT_PREFIX4: u8 = 29;
/// Longest IPv6 agent prefix, by the same rule (halves of /126).
pub const MAX_AGENT_PREFIX6: u8 = 125;

/// The (Mesos/CNI, Docker) halves of an IPv4 agent subnet. A /31 or /32 cannot be split: both
/// halves are the whole subnet (on master and agent alike, so neither panics on one that an
/// older or imported state holds).
pub fn halves4(subnet: Ipv4Network) -> (Ipv4Network, Ipv4Network) {
    if subnet.prefix() >= 31 {
        return (subnet, subnet);
    }
    let prefix = subnet.prefix() + 1;
    let first = Ipv4Network::new(subnet.network(), prefix).expect("prefix < 32");
    let size = 1u32 << (32 - u32::from(prefix));
    let second = Ipv4Network::new(Ipv4Addr::from(u32::from(subnet.network()) + size), prefix)
        .expect("prefix < 32");
    (first, second)
}

/// The (Mesos/CNI, Docker) halves of an IPv6 agent subnet; a /127 or /128 is both halves.
pub fn halves6(subnet: Ipv6Network) -> (Ipv6Network, Ipv6Network) {
    if subnet.prefix() >= 127 {
        return (subnet, subnet);
    }
    let prefix = subnet.prefix() + 1;
    let first = Ipv6Network::new(subnet.network(), prefix).expect("prefix < 128");
    let size = 1u128 << (128 - u32::from(prefix));
    let second = Ipv6Network::new(Ipv6Addr::from(u128::from(subnet.network()) + size), prefix)
        .expect("prefix < 128");
    (first, second)
}

/// The half `half` of an IPv4 agent subnet.
pub fn half_range4(subnet: Ipv4Network, half: Half) -> Ipv4Network {
    let (cni, docker) = halves4(subnet);
    match half {
        Half::Cni => cni,
        Half::Docker => docker,
    }
}

/// The half `half` of an IPv6 agent subnet.
pub fn half_range6(subnet: Ipv6Network, half: Half) -> Ipv6Network {
    let (cni, docker) = halves6(subnet);
    match half {
        Half::Cni => cni,
        Half::Docker => docker,
    }
}

/// The half `half` of an agent subnet of either family.
pub fn half_range(subnet: IpNetwork, half: Half) -> IpNetwork {
    match subnet {
        IpNetwork::V4(s) => IpNetwork::V4(half_range4(s, half)),
        IpNetwork::V6(s) => IpNetwork::V6(half_range6(s, half)),
    }
}

/// The containers' gateway in a half of either family: its first host.
pub fn gateway(range: IpNetwork) -> IpAddr {
    match range {
        IpNetwork::V4(r) => IpAddr::V4(gateway4(r)),
        IpNetwork::V6(r) => IpAddr::V6(gateway6(r)),
    }
}

/// The addresses of a half that may be handed out, as the first and last (inclusive) in
/// numeric form: all but the network address, the gateway (the first host) and the last
/// address (IPv4's broadcast; kept out of IPv6 halves too, so that both families follow one
/// rule and [`MAX_AGENT_PREFIX6`] mirrors [`MAX_AGENT_PREFIX4`]). None when nothing is left.
pub fn usable_span(range: IpNetwork) -> Option<(u128, u128)> {
    let (first, last) = match range {
        IpNetwork::V4(r) => (
            u128::from(u32::from(r.network())),
            u128::from(u32::from(r.broadcast())),
        ),
        IpNetwork::V6(r) => {
            let first = u128::from(r.network());
            let host_bits = 128 - u32::from(r.prefix());
            let last = if host_bits >= 128 {
                u128::MAX
            } else {
                first | ((1u128 << host_bits) - 1)
            };
            (first, last)
        }
    };
    let (lo, hi) = (first.checked_add(2)?, last.checked_sub(1)?);
    (lo <= hi).then_some((lo, hi))
}

/// How many addresses of a half may be handed out (saturating).
pub fn usable_count(range: IpNetwork) -> u64 {
    usable_span(range).map_or(0, |(lo, hi)| u64::try_from(hi - lo + 1).unwrap_or(u64::MAX))
}

/// The IPv6 link-local address a container's interface gets from its MAC (modified EUI-64,
/// RFC 4291): the plugin configures exactly this one and the agent writes it as one of the
/// container's endpoints (neighbour discovery with the gateway comes from it).
pub fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ])
}

/// The containers' gateway in a half: its first host.
pub fn gateway4(range: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(range.network()).wrapping_add(1))
}

/// The containers' gateway in an IPv6 half: its first host.
pub fn gateway6(range: Ipv6Network) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(range.network()).wrapping_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn v6(s: &str) -> Ipv6Network {
        s.parse().unwrap()
    }

    #[test]
    fn subnets_split_into_mesos_then_docker_halves() {
        assert_eq!(
            halves4(v4("9.0.1.0/24")),
            (v4("9.0.1.0/25"), v4("9.0.1.128/25"))
        );
        assert_eq!(
            halves4(v4("9.0.1.0/29")),
            (v4("9.0.1.0/30"), v4("9.0.1.4/30"))
        );
        assert_eq!(
            half_range4(v4("9.0.1.0/24"), Half::Docker),
            v4("9.0.1.128/25")
        );
        assert_eq!(
            gateway4(v4("9.0.1.128/25")),
            "9.0.1.129".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(
            halves6(v6("fd01:b::1:0:0:0/80")),
            (v6("fd01:b::1:0:0:0/81"), v6("fd01:b::1:8000:0:0/81"))
        );
        assert_eq!(
            gateway6(v6("fd01:b::/81")),
            "fd01:b::1".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn unsplittable_subnets_are_both_halves() {
        for s in ["9.0.1.2/31", "9.0.1.3/32", "255.255.255.255/32"] {
            assert_eq!(halves4(v4(s)), (v4(s), v4(s)), "{s}");
            assert_eq!(half_range4(v4(s), Half::Cni), v4(s));
            assert_eq!(half_range4(v4(s), Half::Docker), v4(s));
        }
        for s in [
            "fd01:b::2/127",
            "fd01:b::3/128",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",
        ] {
            assert_eq!(halves6(v6(s)), (v6(s), v6(s)), "{s}");
        }
        // The gateway of the very last address wraps instead of panicking.
        assert_eq!(gateway4(v4("255.255.255.255/32")), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn the_longest_agent_prefix_leaves_a_container_per_half() {
        let (first, second) = halves4(v4(&format!("9.0.1.0/{MAX_AGENT_PREFIX4}")));
        for half in [first, second] {
            // Network, gateway, broadcast, and at least one more.
            assert!(half.size() >= 4, "{half}");
        }
        let (first, _) = halves6(v6(&format!("fd01:b::/{MAX_AGENT_PREFIX6}")));
        assert!(first.size() >= 4);
        assert_eq!(usable_count(IpNetwork::V6(first)), 1);
        assert_eq!(
            usable_count(IpNetwork::V4(
                halves4(v4(&format!("9.0.1.0/{MAX_AGENT_PREFIX4}"))).0
            )),
            1
        );
    }

    #[test]
    fn both_families_hand_out_all_but_network_gateway_and_last() {
        let r: IpNetwork = "9.0.1.0/25".parse().unwrap();
        assert_eq!(
            usable_span(r),
            Some((
                u128::from(u32::from(Ipv4Addr::new(9, 0, 1, 2))),
                u128::from(u32::from(Ipv4Addr::new(9, 0, 1, 126)))
            ))
        );
        assert_eq!(usable_count(r), 125);
        let r6: IpNetwork = "fd01:b::1:0:0:0/81".parse().unwrap();
        let (lo, hi) = usable_span(r6).unwrap();
        assert_eq!(
            Ipv6Addr::from(lo),
            "fd01:b::1:0:0:2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            Ipv6Addr::from(hi),
            "fd01:b::1:7fff:ffff:fffe".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(usable_count(r6), (1u64 << 47) - 3);
        assert_eq!(
            gateway(half_range(
                "fd01:b::1:0:0:0/80".parse().unwrap(),
                Half::Docker
            )),
            "fd01:b::1:8000:0:1".parse::<IpAddr>().unwrap()
        );
        for tiny in [
            "9.0.1.2/31",
            "9.0.1.3/32",
            "fd01:b::2/127",
            "fd01:b::3/128",
            "::/0",
        ] {
            let t: IpNetwork = tiny.parse().unwrap();
            if t.prefix() > 0 {
                assert_eq!(usable_count(t), 0, "{tiny}");
            }
        }
        assert_eq!(usable_count("::/0".parse().unwrap()), u64::MAX);
    }

    #[test]
    fn link_local_is_modified_eui64() {
        assert_eq!(
            link_local([0x02, 0x42, 0xac, 0x11, 0x00, 0x02]),
            "fe80::42:acff:fe11:2".parse::<Ipv6Addr>().unwrap()
        );
    }
}
