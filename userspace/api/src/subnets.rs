//! Rules about an agent's subnet of a network that the master (which hands the subnets out and
//! reports their halves in DC/OS's `mesos_bridge`/`docker_bridge`) and the agent (whose IPAM,
//! gateways and Docker pools live in them) must agree on, defined once here.
//!
//! Each agent subnet is split in two halves, DC/OS's layout: the first for Mesos (CNI)
//! containers, the second for Docker. Each half's first host is the containers' gateway (the
//! host's own address on the network); its network and broadcast addresses are never handed out.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};

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
    }
}
