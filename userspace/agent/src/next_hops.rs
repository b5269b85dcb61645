//! The underlay next hop towards each remote VTEP, mirrored from the kernel's route and neighbour
//! tables into `OVL_NEXT_HOPS`, so that encapsulation addresses the outer frame itself and
//! redirects it (`bpf_redirect`) instead of having the kernel look the route and the neighbour up
//! again for every packet after the program (`bpf_redirect_neigh`).
//!
//! The cache is never more sure than the kernel. For each VTEP it holds what the kernel itself
//! would send to: the route by the underlay NIC, its gateway (or the VTEP on the link), and that
//! neighbour's MAC while the kernel would use it (resolved, or resolved and being re-confirmed).
//! Packets that bypass the neighbour layer no longer confirm the entry, so the agent makes each
//! such neighbour a managed one (`NTF_EXT_MANAGED`): the kernel then re-probes it as it goes
//! stale, by itself. Invalidation:
//! - a neighbour, route or link change: the agent hears of it (rtnetlink groups) and writes the
//!   cache again at once; a neighbour that fails or goes away takes its VTEPs' entries out;
//! - lost notifications: every [`REFRESH`] the agent reads the tables again all the same;
//! - the agent stopped or stuck: each entry carries an expiry [`TTL`] ahead, which every write
//!   moves on; an entry not confirmed in time is not used by the programs, and the kernel's
//!   lookup takes over.
//!
//! The same holds over either underlay family (ARP's neighbours or IPv6 neighbour discovery's,
//! IPv4 or IPv6 routes). Where none of this can hold (a kernel without managed neighbours, the
//! route leaving by another device), no entry is written and the kernel's lookup addresses the
//! packets, as before. (A multipath route is cached as the one path the kernel picks for the
//! VTEP's address: the path its default, L3 multipath hash picks for every packet to it.)

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use overlay_common::maps::NextHop;
use overlay_netlink::{Events, Neighbour, RouteLookup, groups};

use crate::runtime::Handle;

/// How often the tables are read again without a notification.
pub const REFRESH: Duration = Duration::from_secs(5);
/// How long an entry is used after the agent last confirmed it: three refreshes.
pub const TTL: Duration = Duration::from_secs(15);
/// Marks the neighbour entries the agent made managed (`NDA_PROTOCOL`), the mark of its host
/// routes too, so that it releases and cleans up only its own.
pub const NEIGH_PROTOCOL: u8 = 77;
/// Changes rarely come alone (a link flap brings routes and neighbours; thousands of managed
/// entries go stale and are confirmed again all the time): after the first, the tables are read
/// once this much later, so at most a few times a second.
const SETTLE: Duration = Duration::from_millis(100);

/// `CLOCK_MONOTONIC_COARSE` in ns: the clock `bpf_ktime_get_coarse_ns` reads.
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec for the call's duration.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The underlay NIC as the cache needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Underlay {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub up: bool,
}

/// What one reading of the tables gives.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The cache as it should be.
    pub hops: BTreeMap<IpAddr, NextHop>,
    /// Next-hop neighbours to make managed (not managed yet, or missing).
    pub to_manage: BTreeSet<IpAddr>,
    /// Managed neighbours of ours no VTEP goes through any more.
    pub to_release: BTreeSet<IpAddr>,
    /// VTEPs without an entry, and why (for the log and the status).
    pub uncached: BTreeMap<IpAddr, &'static str>,
}

/// The cache for `vteps`, given each one's route (`None`: no route by the underlay NIC), the
/// underlay NIC's neighbours and the NIC itself; entries expire at `expires_ns`.
pub fn plan(
    vteps: &BTreeMap<IpAddr, Option<RouteLookup>>,
    neighbours: &[Neighbour],
    underlay: Underlay,
    expires_ns: u64,
) -> Plan {
    let mut out = Plan::default();
    let by_ip: BTreeMap<IpAddr, &Neighbour> = neighbours
        .iter()
        .filter(|n| n.ifindex == underlay.ifindex)
        .map(|n| (n.ip, n))
        .collect();
    let mut needed = BTreeSet::new();
    for (&vtep, route) in vteps {
        let why = match route {
            _ if !underlay.up => Some("the underlay NIC is down"),
            None => Some("no route to it by the underlay NIC"),
            Some(r) if r.oif != underlay.ifindex => Some("its route leaves by another device"),
            Some(r) => {
                needed.insert(r.next_hop);
                match by_ip.get(&r.next_hop) {
                    None => {
                        out.to_manage.insert(r.next_hop);
                        Some("its next hop has no neighbour entry yet")
                    }
                    // Only an entry the kernel keeps confirmed by itself is mirrored: packets
                    // that bypass the neighbour layer would let any other go stale unnoticed.
                    Some(n) if !n.managed => {
                        out.to_manage.insert(r.next_hop);
                        Some("its next hop is not a managed neighbour yet")
                    }
                    Some(n) => match n.usable_mac() {
                        Some(mac) => {
                            out.hops.insert(
                                vtep,
                                NextHop::new(underlay.ifindex, mac, underlay.mac, expires_ns),
                            );
                            None
                        }
                        None => Some("its next hop is unresolved"),
                    },
                }
            }
        };
        if let Some(why) = why {
            out.uncached.insert(vtep, why);
        }
    }
    out.to_release = by_ip
        .values()
        .filter(|n| n.managed && n.protocol == NEIGH_PROTOCOL && !needed.contains(&n.ip))
        .map(|n| n.ip)
        .collect();
    out
}

/// Keeps `OVL_NEXT_HOPS` in step with the kernel's tables for as long as the agent runs, on a
/// thread of its own (netlink is blocking); the owner writes the map. `underlay_ifindex` is the
/// NIC VXLAN leaves by.
pub fn spawn_watcher(
    agent: Handle,
    underlay_ifindex: u32,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let mut nl = overlay_netlink::Handle::new()?;
    let mut events = Events::subscribe(&[
        groups::LINK,
        groups::NEIGH,
        groups::IPV4_ROUTE,
        groups::IPV6_ROUTE,
    ])?;
    Ok(std::thread::Builder::new()
        .name("next-hops".into())
        .spawn(move || {
            let mut watcher = Watcher {
                routes: BTreeMap::new(),
                reported: BTreeMap::new(),
                failing: false,
                unmanageable: BTreeSet::new(),
                written: None,
            };
            loop {
                match agent.call_blocking(|a| a.remote_vteps()) {
                    Ok(vteps) => watcher.cycle(&agent, &mut nl, underlay_ifindex, &vteps),
                    // The owner is gone: the agent is stopping.
                    Err(_) => return,
                }
                match events.wait(REFRESH) {
                    Ok(changes) if changes.any() => {
                        std::thread::sleep(SETTLE);
                        let more = events.wait(Duration::ZERO).unwrap_or_default();
                        // A neighbour's change leaves the routes as they were.
                        if changes.links_or_routes || more.links_or_routes {
                            watcher.routes.clear();
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!("hearing of route and neighbour changes: {e}");
                        std::thread::sleep(REFRESH);
                    }
                }
            }
        })?)
}

struct Watcher {
    /// Each VTEP's route, looked up once and again after any change.
    routes: BTreeMap<IpAddr, Option<RouteLookup>>,
    /// What was last logged per uncached VTEP (logged again only when it changes).
    reported: BTreeMap<IpAddr, &'static str>,
    failing: bool,
    /// Neighbours the kernel refused to make managed (logged once each).
    unmanageable: BTreeSet<IpAddr>,
    /// The cache as last written (expiries aside), and when: it is written again when it
    /// changes, and whole every [`REFRESH`] to move the expiries on, not on every neighbour
    /// confirmation the kernel reports.
    written: Option<(std::time::Instant, BTreeMap<IpAddr, NextHop>)>,
}

/// Whether two caches send every VTEP the same way (expiries aside).
fn same_hops(a: &BTreeMap<IpAddr, NextHop>, b: &BTreeMap<IpAddr, NextHop>) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((ka, va), (kb, vb))| {
            ka == kb
                && NextHop {
                    expires_ns: 0,
                    ..*va
                } == NextHop {
                    expires_ns: 0,
                    ..*vb
                }
        })
}

impl Watcher {
    fn cycle(
        &mut self,
        agent: &Handle,
        nl: &mut overlay_netlink::Handle,
        ifindex: u32,
        vteps: &BTreeSet<IpAddr>,
    ) {
        self.routes.retain(|ip, _| vteps.contains(ip));
        for &vtep in vteps {
            self.routes
                .entry(vtep)
                .or_insert_with(|| nl.route_to(vtep, ifindex).ok());
        }
        let read = nl.link_by_index(ifindex).and_then(|link| {
            let neighbours = nl.neighbours(Some(ifindex))?;
            Ok((link, neighbours))
        });
        let (link, neighbours) = match read {
            Ok(r) => {
                self.failing = false;
                r
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(
                        "reading the underlay's neighbours (next hops by the kernel until it works): {e}"
                    );
                }
                self.failing = true;
                self.written = None;
                let uncached = vteps.len();
                agent.tell(move |a| a.set_next_hops(BTreeMap::new(), uncached));
                return;
            }
        };
        let underlay = Underlay {
            ifindex,
            mac: link.mac,
            up: link.up,
        };
        let plan = plan(
            &self.routes,
            &neighbours,
            underlay,
            coarse_now_ns() + TTL.as_nanos() as u64,
        );
        for &ip in &plan.to_manage {
            match nl.ensure_managed_neighbour(ifindex, ip, NEIGH_PROTOCOL) {
                Ok(()) => {
                    self.unmanageable.remove(&ip);
                }
                Err(e) => {
                    if self.unmanageable.insert(ip) {
                        tracing::warn!("{e} (its VTEPs keep the kernel's next-hop lookup)");
                    }
                }
            }
        }
        for &ip in &plan.to_release {
            if let Err(e) = nl.del_neighbour(ifindex, ip) {
                tracing::warn!("{e}");
            }
        }
        for (vtep, why) in &plan.uncached {
            if self.reported.get(vtep) != Some(why) {
                tracing::info!(%vtep, "next hop by the kernel's lookup: {why}");
            }
        }
        let uncached = plan.uncached.len();
        self.reported = plan.uncached;
        let due = match &self.written {
            Some((at, hops)) => at.elapsed() >= REFRESH || !same_hops(hops, &plan.hops),
            None => true,
        };
        if due {
            self.written = Some((std::time::Instant::now(), plan.hops.clone()));
            let hops = plan.hops;
            agent.tell(move |a| a.set_next_hops(hops, uncached));
        }
    }
}

/// Removes the managed neighbour entries the agent made (its mark), on every interface: the
/// host's removal of ebpf-overlay (`overlayctl cleanup`). Returns how many went.
pub fn remove_managed_neighbours() -> anyhow::Result<usize> {
    let mut nl = overlay_netlink::Handle::new()?;
    let ours: Vec<Neighbour> = nl
        .neighbours(None)?
        .into_iter()
        .filter(|n| n.managed && n.protocol == NEIGH_PROTOCOL)
        .collect();
    for n in &ours {
        nl.del_neighbour(n.ifindex, n.ip)?;
    }
    Ok(ours.len())
}

#[cfg(test)]
mod tests {
    use overlay_netlink::NeighbourState;

    use super::*;

    const NIC: Underlay = Underlay {
        ifindex: 2,
        mac: [2, 0, 0, 0, 0, 1],
        up: true,
    };

    fn ip(last: u8) -> IpAddr {
        std::net::Ipv4Addr::new(10, 0, 0, last).into()
    }

    fn neighbour(last: u8, state: NeighbourState, managed: bool, protocol: u8) -> Neighbour {
        Neighbour {
            ifindex: NIC.ifindex,
            ip: ip(last),
            mac: Some([2, 0, 0, 0, 0, last]),
            state,
            managed,
            protocol,
        }
    }

    fn direct(last: u8) -> Option<RouteLookup> {
        Some(RouteLookup {
            oif: NIC.ifindex,
            next_hop: ip(last),
        })
    }

    #[test]
    fn a_vtep_gets_the_mac_the_kernel_would_send_to() {
        let vteps = BTreeMap::from([(ip(2), direct(2)), (ip(3), direct(3))]);
        let neighbours = [
            neighbour(2, NeighbourState::Reachable, true, NEIGH_PROTOCOL),
            // Being re-confirmed: the kernel still sends to it, and so does the cache.
            neighbour(3, NeighbourState::Delay, true, NEIGH_PROTOCOL),
        ];
        let p = plan(&vteps, &neighbours, NIC, 99);
        assert_eq!(
            p.hops[&ip(2)],
            NextHop::new(2, [2, 0, 0, 0, 0, 2], NIC.mac, 99)
        );
        assert_eq!(p.hops[&ip(3)].dst_mac, [2, 0, 0, 0, 0, 3]);
        assert!(p.uncached.is_empty() && p.to_release.is_empty() && p.to_manage.is_empty());
    }

    #[test]
    fn a_neighbour_the_kernel_does_not_keep_confirmed_is_made_managed_before_it_is_mirrored() {
        let vteps = BTreeMap::from([(ip(3), direct(3))]);
        let kernels_own = [neighbour(3, NeighbourState::Reachable, false, 0)];
        let p = plan(&vteps, &kernels_own, NIC, 99);
        assert!(p.hops.is_empty());
        assert_eq!(p.to_manage, BTreeSet::from([ip(3)]));
        assert_eq!(
            p.uncached[&ip(3)],
            "its next hop is not a managed neighbour yet"
        );
    }

    #[test]
    fn vteps_behind_a_gateway_share_its_entry() {
        let via_gateway = Some(RouteLookup {
            oif: NIC.ifindex,
            next_hop: ip(1),
        });
        let vteps = BTreeMap::from([
            (std::net::Ipv4Addr::new(192, 168, 7, 2).into(), via_gateway),
            (std::net::Ipv4Addr::new(192, 168, 8, 2).into(), via_gateway),
        ]);
        let neighbours = [neighbour(1, NeighbourState::Stale, true, NEIGH_PROTOCOL)];
        let p = plan(&vteps, &neighbours, NIC, 99);
        assert_eq!(p.hops.len(), 2);
        assert!(p.hops.values().all(|h| h.dst_mac == [2, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn ipv6_vteps_behind_a_link_local_router_get_its_mac() {
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let via_router = Some(RouteLookup {
            oif: NIC.ifindex,
            next_hop: v6("fe80::1"),
        });
        let on_link = Some(RouteLookup {
            oif: NIC.ifindex,
            next_hop: v6("fd00::5"),
        });
        let vteps = BTreeMap::from([
            (v6("fd00:1::2"), via_router),
            (v6("fd00:2::2"), via_router),
            (v6("fd00::5"), on_link),
        ]);
        let router = Neighbour {
            ifindex: NIC.ifindex,
            ip: v6("fe80::1"),
            mac: Some([2, 0, 0, 0, 0, 0xfe]),
            state: NeighbourState::Reachable,
            managed: true,
            protocol: NEIGH_PROTOCOL,
        };
        let p = plan(&vteps, &[router], NIC, 99);
        assert_eq!(p.hops.len(), 2, "{:?}", p.hops);
        assert!(p.hops.values().all(|h| h.dst_mac == [2, 0, 0, 0, 0, 0xfe]));
        assert_eq!(p.to_manage, BTreeSet::from([v6("fd00::5")]));
        assert_eq!(
            p.uncached[&v6("fd00::5")],
            "its next hop has no neighbour entry yet"
        );
    }

    #[test]
    fn no_entry_where_the_kernel_would_not_send_to_a_known_mac() {
        let vteps = BTreeMap::from([
            (ip(2), direct(2)),
            (ip(3), direct(3)),
            (ip(4), direct(4)),
            (ip(5), None),
            (
                ip(6),
                Some(RouteLookup {
                    oif: 9,
                    next_hop: ip(6),
                }),
            ),
        ]);
        let neighbours = [
            neighbour(2, NeighbourState::Failed, true, NEIGH_PROTOCOL),
            neighbour(3, NeighbourState::Incomplete, true, NEIGH_PROTOCOL),
        ];
        let p = plan(&vteps, &neighbours, NIC, 99);
        assert!(p.hops.is_empty(), "{:?}", p.hops);
        assert_eq!(p.uncached.len(), 5);
        assert_eq!(
            p.uncached[&ip(4)],
            "its next hop has no neighbour entry yet"
        );
        // The missing one is created (managed, so the kernel resolves it); failed ones are the
        // kernel's to retry.
        assert_eq!(p.to_manage, BTreeSet::from([ip(4)]));
        let down = Underlay { up: false, ..NIC };
        let reachable = [neighbour(
            2,
            NeighbourState::Reachable,
            true,
            NEIGH_PROTOCOL,
        )];
        assert!(plan(&vteps, &reachable, down, 99).hops.is_empty());
    }

    #[test]
    fn a_cache_is_the_same_whatever_its_expiries() {
        let hop = |mac_last, expires| NextHop::new(2, [2, 0, 0, 0, 0, mac_last], NIC.mac, expires);
        let a = BTreeMap::from([(ip(2), hop(2, 10))]);
        assert!(same_hops(&a, &BTreeMap::from([(ip(2), hop(2, 99))])));
        assert!(!same_hops(&a, &BTreeMap::from([(ip(2), hop(3, 10))])));
        assert!(!same_hops(&a, &BTreeMap::from([(ip(3), hop(2, 10))])));
        assert!(!same_hops(&a, &BTreeMap::new()));
    }

    #[test]
    fn only_our_own_managed_neighbours_are_released_when_no_vtep_needs_them() {
        let vteps = BTreeMap::from([(ip(2), direct(2))]);
        let neighbours = [
            neighbour(2, NeighbourState::Reachable, true, NEIGH_PROTOCOL),
            neighbour(3, NeighbourState::Reachable, true, NEIGH_PROTOCOL),
            // Someone else's managed entry, and the kernel's own: not ours to remove.
            neighbour(4, NeighbourState::Reachable, true, 4),
            neighbour(5, NeighbourState::Reachable, false, 0),
        ];
        let p = plan(&vteps, &neighbours, NIC, 99);
        assert_eq!(p.to_release, BTreeSet::from([ip(3)]));
    }
}
