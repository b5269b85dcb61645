//! The agent's side of masquerade: the settings the BPF NAT runs with (validated against the
//! host, so our ports never collide with the host's own connections) and expiry of idle flows.

use std::{collections::BTreeMap, net::Ipv6Addr, ops::RangeInclusive};

use anyhow::{Context as _, bail};
use overlay_common::{
    maps::{NatConfig, NatEntry, NatKey, NatQuotaKey, ipv4_unmapped, nat_direction},
    nat::is_expired,
    packet::{VXLAN_SOURCE_PORT_MAX, VXLAN_SOURCE_PORT_MIN},
};

use crate::datapath::OverlayMaps;

/// Parses `MIN-MAX` (a masquerade port range).
pub fn parse_port_range(text: &str) -> anyhow::Result<RangeInclusive<u16>> {
    let (a, b) = text
        .split_once('-')
        .with_context(|| format!("{text:?}: expected MIN-MAX"))?;
    let (min, max): (u16, u16) = (
        a.trim()
            .parse()
            .with_context(|| format!("{text:?}: bad port {a:?}"))?,
        b.trim()
            .parse()
            .with_context(|| format!("{text:?}: bad port {b:?}"))?,
    );
    if min == 0 || min > max {
        bail!("{text:?}: need 1 <= MIN <= MAX");
    }
    Ok(min..=max)
}

/// The host's ephemeral port range (`net.ipv4.ip_local_port_range` of this namespace).
pub fn host_ephemeral_ports() -> anyhow::Result<RangeInclusive<u16>> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .context("reading net.ipv4.ip_local_port_range")?;
    let mut f = text.split_whitespace().map(str::parse::<u16>);
    match (f.next(), f.next()) {
        (Some(Ok(a)), Some(Ok(b))) => Ok(a..=b),
        _ => bail!("unexpected net.ipv4.ip_local_port_range {text:?}"),
    }
}

/// Checks a masquerade port range against the host: it must not overlap the host's ephemeral
/// ports (or the host's connections and ours could pick the same tuple) and must leave room
/// besides the VXLAN port.
pub fn check_port_range(
    ports: &RangeInclusive<u16>,
    host: &RangeInclusive<u16>,
    vxlan_port: u16,
) -> anyhow::Result<()> {
    if ports.start() <= host.end() && host.start() <= ports.end() {
        bail!(
            "--masquerade-ports {}-{} overlaps the host's ephemeral ports {}-{} \
             (net.ipv4.ip_local_port_range): choose a disjoint range",
            ports.start(),
            ports.end(),
            host.start(),
            host.end()
        );
    }
    let (vmin, vmax) = (VXLAN_SOURCE_PORT_MIN, VXLAN_SOURCE_PORT_MAX);
    if *ports.start() <= vmax && vmin <= *ports.end() {
        bail!(
            "--masquerade-ports {}-{} overlaps the VXLAN source ports {vmin}-{vmax}: agents refuse \
             VXLAN from masquerade ports (a container's datagram), so choose a disjoint range",
            ports.start(),
            ports.end()
        );
    }
    if ports.start() == ports.end() && *ports.start() == vxlan_port {
        bail!("--masquerade-ports holds only the VXLAN port {vxlan_port}");
    }
    Ok(())
}

/// Removes every idle flow (both directions) from the NAT table and recounts every container's
/// live flows per destination (the quota; the datapath counts up and down between sweeps, and a
/// count lost to a race or an LRU eviction is corrected here).
pub fn sweep(maps: &mut OverlayMaps) -> anyhow::Result<Swept> {
    let cfg = maps.nat_config()?;
    let now = monotonic_ns();
    let (expired, live): (Vec<_>, Vec<_>) = maps
        .nat_entries()?
        .into_iter()
        .partition(|(k, e)| is_expired(&cfg, k.protocol, e, now));
    for (k, _) in &expired {
        maps.remove_nat(k)?;
    }
    maps.set_nat_quotas(&live_flows(&live))?;
    Ok(Swept {
        expired: expired.len(),
        remaining: live.len(),
        flows: flows_by_family(&live),
    })
}

/// Masqueraded flows (their egress entries) by family: IPv4, IPv6.
pub fn flows_by_family(entries: &[(NatKey, NatEntry)]) -> [usize; 2] {
    let mut flows = [0; 2];
    for (k, _) in entries.iter().filter(|(k, _)| k.is_egress()) {
        flows[usize::from(ipv4_unmapped(&k.local).is_none())] += 1;
    }
    flows
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Swept {
    /// Idle entries removed.
    pub expired: usize,
    /// Entries left.
    pub remaining: usize,
    /// Flows left, IPv4 and IPv6.
    pub flows: [usize; 2],
}

/// Live (not closing) flows per container and destination, from the egress entries.
pub fn live_flows(entries: &[(NatKey, NatEntry)]) -> BTreeMap<NatQuotaKey, u32> {
    let mut counts = BTreeMap::new();
    for (k, e) in entries {
        if k.direction == nat_direction::EGRESS && e.flags & NatEntry::FLAG_CLOSING == 0 {
            *counts.entry(NatQuotaKey::of_egress(k)).or_insert(0) += 1;
        }
    }
    counts
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Idle timeouts of masqueraded flows, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatTimeouts {
    /// Established TCP.
    pub tcp: u32,
    /// TCP after FIN or RST.
    pub tcp_closing: u32,
    /// TCP that never completed a handshake.
    pub tcp_handshake: u32,
    pub udp: u32,
    pub icmp: u32,
}

impl Default for NatTimeouts {
    /// Linux conntrack's: established 2 h 4 min, SYN_SENT 2 min, UDP stream 2 min.
    fn default() -> Self {
        NatTimeouts {
            tcp: 7440,
            tcp_closing: 10,
            tcp_handshake: 120,
            udp: 120,
            icmp: 60,
        }
    }
}

/// Builds the BPF-side settings. `max_flows_per_destination` (0: no limit) at or above the
/// range's size is no limit (the range runs out first, counted as `drop_nat_no_port`);
/// `underlay_broadcast` is the underlay's directed broadcast address, if known.
pub fn nat_config(
    ports: &RangeInclusive<u16>,
    timeouts: NatTimeouts,
    max_probes: u32,
    max_flows_per_destination: u32,
    underlay_broadcast: Option<std::net::Ipv4Addr>,
) -> NatConfig {
    let size = (*ports.end() - *ports.start()) as u32 + 1;
    NatConfig {
        port_min: *ports.start(),
        port_max: *ports.end(),
        max_probes: max_probes.clamp(1, 64),
        tcp_timeout_s: timeouts.tcp,
        tcp_closing_timeout_s: timeouts.tcp_closing,
        udp_timeout_s: timeouts.udp,
        icmp_timeout_s: timeouts.icmp,
        tcp_handshake_timeout_s: timeouts.tcp_handshake,
        max_flows_per_destination: if max_flows_per_destination >= size {
            0
        } else {
            max_flows_per_destination
        },
        underlay_broadcast: underlay_broadcast.map_or([0; 4], |b| b.octets()),
        // Filled from the underlay NIC once it has a global IPv6 address (`Ipv6Source`).
        underlay_ip6: [0; 16],
    }
}

/// The IPv6 source masquerade uses on the underlay NIC, picked from its addresses: a global one
/// (scope universe, ULAs included) that the kernel can send from (DAD finished and passed), not
/// deprecated if another one is not. None: IPv6 to the outside cannot be masqueraded.
pub fn pick_ipv6_source(addresses: &[overlay_netlink::Address6]) -> Option<Ipv6Addr> {
    let usable: Vec<&overlay_netlink::Address6> = addresses
        .iter()
        .filter(|a| a.global && !a.tentative && !a.dad_failed)
        .collect();
    usable
        .iter()
        .find(|a| !a.deprecated)
        .or(usable.first())
        .map(|a| a.ip)
}

/// Follows the underlay NIC's IPv6 address for masquerade (it may come after the agent starts:
/// duplicate-address detection, SLAAC, an operator adding it) and says once when there is none,
/// and again only when that changes.
#[derive(Debug, Default)]
pub struct Ipv6Source {
    current: Option<Ipv6Addr>,
    told: bool,
}

impl Ipv6Source {
    /// Takes the source the NIC has now; returns it when it is news (the first time, and each
    /// change).
    pub fn update(&mut self, ifname: &str, found: Option<Ipv6Addr>) -> Option<Option<Ipv6Addr>> {
        if found == self.current && self.told {
            return None;
        }
        match found {
            Some(ip) => tracing::info!(
                underlay = ifname, source = %ip,
                "IPv6 to the outside is masqueraded out of this address"
            ),
            None => tracing::warn!(
                underlay = ifname,
                "the underlay NIC has no global IPv6 address: IPv6 from containers to the outside \
                 is not masqueraded, it is dropped (counter drop_nat6_no_address)"
            ),
        }
        self.told = true;
        self.current = found;
        Some(found)
    }
}

/// `cfg` with `source` as its IPv6 masquerade address (zeros: none).
pub fn with_ipv6_source(mut cfg: NatConfig, source: Option<Ipv6Addr>) -> NatConfig {
    cfg.underlay_ip6 = source.map_or([0; 16], |ip| ip.octets());
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_are_parsed_and_checked_against_the_host() {
        assert_eq!(parse_port_range("61000-63999").unwrap(), 61000..=63999);
        assert!(parse_port_range("63999-61000").is_err());
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("61000").is_err());
        let host = 32768..=60999;
        assert!(check_port_range(&(61000..=63999), &host, 64000).is_ok());
        let err = check_port_range(&(60000..=62000), &host, 64000)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("overlaps") && err.contains("32768-60999"),
            "{err}"
        );
        assert!(check_port_range(&(64000..=64000), &host, 64000).is_err());
        // A host with a narrow ephemeral range still may not take the VXLAN source ports.
        let err = check_port_range(&(50000..=52000), &(30000..=32000), 64000)
            .unwrap_err()
            .to_string();
        assert!(err.contains("VXLAN source ports"), "{err}");
    }

    #[test]
    fn live_flows_count_open_egress_entries_per_container_and_destination() {
        let key = |local: u8, port: u16, direction| {
            let remote = overlay_common::maps::ipv4_mapped([10, 250, 0, 254]);
            let local = overlay_common::maps::ipv4_mapped([9, 0, 1, local]);
            if direction == nat_direction::EGRESS {
                NatKey::egress(17, local, port, remote, 8000)
            } else {
                NatKey::ingress(17, remote, 8000, local, port)
            }
        };
        let open = NatEntry::default();
        let closing = NatEntry {
            flags: NatEntry::FLAG_CLOSING,
            ..Default::default()
        };
        let entries = [
            (key(2, 1, nat_direction::EGRESS), open),
            (key(2, 2, nat_direction::EGRESS), open),
            (key(2, 3, nat_direction::EGRESS), closing),
            (key(2, 4, nat_direction::INGRESS), open),
            (key(3, 1, nat_direction::EGRESS), open),
        ];
        assert_eq!(flows_by_family(&entries), [4, 0]);
        let v6 = |n: u8| {
            let mut a = [0u8; 16];
            a[0] = 0xfd;
            a[15] = n;
            a
        };
        let six = [(NatKey::egress(58, v6(2), 7, v6(9), 0), open)];
        assert_eq!(flows_by_family(&six), [0, 1]);
        let counts = live_flows(&entries);
        assert_eq!(counts.len(), 2);
        assert_eq!(counts[&NatQuotaKey::of_egress(&entries[0].0)], 2);
        assert_eq!(counts[&NatQuotaKey::of_egress(&entries[4].0)], 1);
        let cfg = nat_config(&(61000..=61009), NatTimeouts::default(), 32, 1024, None);
        assert_eq!(
            cfg.max_flows_per_destination, 0,
            "no tighter than the range itself"
        );
        let cfg = nat_config(&(61000..=63999), NatTimeouts::default(), 32, 1024, None);
        assert_eq!(cfg.max_flows_per_destination, 1024);
    }

    #[test]
    fn the_ipv6_source_is_a_global_address_the_kernel_can_send_from() {
        let a = |ip: &str, f: fn(&mut overlay_netlink::Address6)| {
            let mut a = overlay_netlink::Address6::new(2, ip.parse().unwrap(), 64);
            f(&mut a);
            a
        };
        let link_local = a("fe80::1", |a| a.global = false);
        let tentative = a("fd00:fab::12", |a| a.tentative = true);
        let failed = a("fd00:fab::13", |a| a.dad_failed = true);
        let deprecated = a("fd00:fab::14", |a| a.deprecated = true);
        let good = a("fd00:fab::11", |_| {});
        assert_eq!(pick_ipv6_source(&[]), None);
        assert_eq!(
            pick_ipv6_source(&[link_local, tentative, failed]),
            None,
            "nothing usable"
        );
        assert_eq!(
            pick_ipv6_source(&[link_local, deprecated, good]),
            Some("fd00:fab::11".parse().unwrap()),
            "a preferred one first"
        );
        assert_eq!(
            pick_ipv6_source(&[deprecated]),
            Some("fd00:fab::14".parse().unwrap()),
            "deprecated is still better than none"
        );
        // News only the first time and on each change.
        let mut s = Ipv6Source::default();
        assert_eq!(s.update("eth0", None), Some(None));
        assert_eq!(s.update("eth0", None), None, "said once");
        let ip: Ipv6Addr = "fd00:fab::11".parse().unwrap();
        assert_eq!(s.update("eth0", Some(ip)), Some(Some(ip)));
        assert_eq!(s.update("eth0", Some(ip)), None);
        assert_eq!(s.update("eth0", None), Some(None), "lost again");
        let cfg = nat_config(&(61000..=63999), NatTimeouts::default(), 32, 0, None);
        assert!(!cfg.has_ipv6_source());
        let with = with_ipv6_source(cfg, Some(ip));
        assert!(with.has_ipv6_source());
        assert_eq!(with.underlay_ip6, ip.octets());
        assert_eq!(with_ipv6_source(with, None), cfg);
    }
}
