//! The agent's IPAM: container addresses from this agent's subnet of each network (the CNI
//! config files are [`crate::cni_conf`]'s).
//!
//! Each network's agent subnet is split in two halves (DC/OS: the first for Mesos/CNI
//! containers, the second for Docker); the network address, the first host (the containers'
//! gateway) and the broadcast address of each half are never handed out.
//!
//! The allocations live in one JSON file (`ipam.json` in the state directory), rewritten on every
//! change by write-to-temporary, fsync, rename, fsync of the directory: a crash (even SIGKILL or
//! power loss) leaves either the old or the new file, so an address acknowledged to a caller is
//! never handed out twice. The datapath's one owner ([`crate::runtime`]) serialises all changes.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use ipnetwork::IpNetwork;
use overlay_api::agent::{Family, Half, IpamAllocation, IpamUsage};
use serde::{Deserialize, Serialize};

/// Name of the state file inside the state directory.
pub const STATE_FILE: &str = "ipam.json";

/// One allocated address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub network: String,
    pub half: Half,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<String>,
    pub host_veth: String,
}

/// The file's layout. Keys are addresses of either family as text, so the files of agents from
/// before IPv6 (IPv4 keys only) read as they are.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    version: u32,
    allocations: BTreeMap<IpAddr, Allocation>,
    /// Last address handed out per `network/half` (IPv6: `network/half/ipv6`): allocation
    /// continues after it (round robin), so a freed address is not reused at once.
    #[serde(default)]
    last: BTreeMap<String, IpAddr>,
    /// Endpoints of disabled networks (every address of theirs the datapath had, link-local
    /// ones too), taken out of the datapath and put back when their network is enabled again
    /// (kept here so an agent restart does not lose them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    parked: BTreeMap<IpAddr, ParkedEndpoint>,
}

/// A datapath endpoint set aside while its network is disabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedEndpoint {
    pub vni: u32,
    pub ifindex: u32,
    pub mac: overlay_api::MacAddr,
    pub gateway_mac: overlay_api::MacAddr,
}

/// Why an allocation failed.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(
        "network {network}: no free {} address in the {} half {range} of this agent's subnet {subnet} ({used} in use)",
        family_text(*family),
        half.name()
    )]
    Exhausted {
        network: String,
        family: Family,
        subnet: IpNetwork,
        half: Half,
        range: IpNetwork,
        used: u32,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Io(#[from] anyhow::Error),
}

fn family_text(f: Family) -> &'static str {
    match f {
        Family::Ipv4 => "IPv4",
        Family::Ipv6 => "IPv6",
    }
}

/// The family of a subnet.
pub fn family_of(subnet: IpNetwork) -> Family {
    match subnet {
        IpNetwork::V4(_) => Family::Ipv4,
        IpNetwork::V6(_) => Family::Ipv6,
    }
}

/// The two halves of an agent subnet (the whole subnet twice if it cannot be split): the
/// master's rule, [`overlay_api::subnets::halves4`] / [`overlay_api::subnets::halves6`].
pub fn halves(subnet: IpNetwork) -> [IpNetwork; 2] {
    [
        half_range(subnet, Half::Cni),
        half_range(subnet, Half::Docker),
    ]
}

pub fn half_range(subnet: IpNetwork, half: Half) -> IpNetwork {
    overlay_api::subnets::half_range(subnet, half)
}

/// The gateway of a half: its first host ([`overlay_api::subnets::gateway`]).
pub fn gateway_of(range: IpNetwork) -> IpAddr {
    overlay_api::subnets::gateway(range)
}

fn to_num(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(ip) => u128::from(u32::from(ip)),
        IpAddr::V6(ip) => u128::from(ip),
    }
}

fn from_num(family: Family, n: u128) -> IpAddr {
    match family {
        Family::Ipv4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// How many addresses of `range` may be handed out (network, gateway and last excluded).
fn usable_count(range: IpNetwork) -> u64 {
    overlay_api::subnets::usable_count(range)
}

/// Which half of `subnet` holds `ip`, if `ip` may be handed out at all.
pub fn half_of(ip: IpAddr, subnet: IpNetwork) -> Result<Half, String> {
    if !subnet.contains(ip) {
        return Err(format!(
            "address {ip} is outside this agent's subnet {subnet}"
        ));
    }
    for half in [Half::Cni, Half::Docker] {
        let r = half_range(subnet, half);
        if r.contains(ip) {
            let usable = overlay_api::subnets::usable_span(r)
                .is_some_and(|(lo, hi)| (lo..=hi).contains(&to_num(ip)));
            if !usable {
                return Err(format!(
                    "address {ip} is reserved in {r} (network, gateway or last address)"
                ));
            }
            return Ok(half);
        }
    }
    Err(format!("address {ip} is in no half of {subnet}"))
}

pub struct Ipam {
    path: PathBuf,
    stored: Stored,
    /// Exhaustion events per network and family since start.
    exhausted: BTreeMap<(String, Family), u64>,
}

impl Ipam {
    /// Opens (or creates) the state in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Ipam> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(STATE_FILE);
        let stored = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing the IPAM state {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored {
                version: 1,
                ..Default::default()
            },
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let _ = std::fs::remove_file(dir.join(format!("{STATE_FILE}.tmp")));
        Ok(Ipam {
            path,
            stored,
            exhausted: BTreeMap::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn persist(&self) -> anyhow::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.stored)?;
        {
            let mut f =
                File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    pub fn allocations(&self) -> &BTreeMap<IpAddr, Allocation> {
        &self.stored.allocations
    }

    pub fn get(&self, ip: IpAddr) -> Option<&Allocation> {
        self.stored.allocations.get(&ip)
    }

    /// The first address of an attachment (its IPv4 one when it has both).
    pub fn find_attachment(&self, attachment: &str) -> Option<(IpAddr, &Allocation)> {
        self.attachment_addresses(attachment).into_iter().next()
    }

    /// Every address of an attachment, IPv4 first.
    pub fn attachment_addresses(&self, attachment: &str) -> Vec<(IpAddr, &Allocation)> {
        self.stored
            .allocations
            .iter()
            .filter(|(_, a)| a.attachment.as_deref() == Some(attachment))
            .map(|(ip, a)| (*ip, a))
            .collect()
    }

    /// Allocates an address of `network` for `host_veth` from `subnet` (this agent's IPv4 or
    /// IPv6 subnet of it): `requested` when given (it must be a usable, free address of
    /// `subnet`), else the next free one of `half`. `taken` holds addresses in use outside the
    /// IPAM (endpoints the datapath already has). Persisted before it returns.
    #[allow(clippy::too_many_arguments)]
    pub fn allocate(
        &mut self,
        network: &str,
        subnet: IpNetwork,
        half: Half,
        requested: Option<IpAddr>,
        attachment: Option<&str>,
        host_veth: &str,
        taken: &BTreeSet<IpAddr>,
    ) -> Result<IpAddr, IpamError> {
        let family = family_of(subnet);
        let (ip, half) = match requested {
            Some(ip) => {
                if Family::of(ip) != family {
                    return Err(IpamError::Invalid(format!(
                        "address {ip} is not of the family of this agent's subnet {subnet}"
                    )));
                }
                let half = half_of(ip, subnet).map_err(IpamError::Invalid)?;
                if let Some(a) = self.stored.allocations.get(&ip) {
                    return Err(IpamError::Conflict(format!(
                        "address {ip} is already allocated{}",
                        a.attachment
                            .as_deref()
                            .map(|a| format!(" to {a}"))
                            .unwrap_or_default()
                    )));
                }
                if taken.contains(&ip) {
                    return Err(IpamError::Conflict(format!(
                        "address {ip} is already used by another endpoint"
                    )));
                }
                (ip, half)
            }
            None => {
                let range = half_range(subnet, half);
                let key = match family {
                    Family::Ipv4 => format!("{network}/{}", half.name()),
                    Family::Ipv6 => format!("{network}/{}/ipv6", half.name()),
                };
                let last = self.stored.last.get(&key).copied();
                let Some(ip) = self.next_free(range, last, taken) else {
                    *self
                        .exhausted
                        .entry((network.to_owned(), family))
                        .or_default() += 1;
                    let used = self.used_in(range, taken);
                    return Err(IpamError::Exhausted {
                        network: network.to_owned(),
                        family,
                        subnet,
                        half,
                        range,
                        used,
                    });
                };
                self.stored.last.insert(key, ip);
                (ip, half)
            }
        };
        self.stored.allocations.insert(
            ip,
            Allocation {
                network: network.to_owned(),
                half,
                attachment: attachment.map(str::to_owned),
                host_veth: host_veth.to_owned(),
            },
        );
        if let Err(e) = self.persist() {
            self.stored.allocations.remove(&ip);
            return Err(IpamError::Io(e));
        }
        Ok(ip)
    }

    /// The first free usable address of `range` after `last`, wrapping around once. Only
    /// allocated or taken addresses are skipped, so this walks at most that many steps (an
    /// IPv6 half holds 2^47 addresses: it is never scanned).
    fn next_free(
        &self,
        range: IpNetwork,
        last: Option<IpAddr>,
        taken: &BTreeSet<IpAddr>,
    ) -> Option<IpAddr> {
        let (lo, hi) = overlay_api::subnets::usable_span(range)?;
        let family = family_of(range);
        let busy = |n: u128| {
            let ip = from_num(family, n);
            self.stored.allocations.contains_key(&ip) || taken.contains(&ip)
        };
        let start = last
            .map(to_num)
            .filter(|l| (lo..hi).contains(l))
            .map_or(lo, |l| l + 1);
        let mut n = start;
        // One more step than there are busy addresses finds a free one, if any is left.
        let limit = self.stored.allocations.len() as u128 + taken.len() as u128 + 1;
        for _ in 0..=limit {
            if !busy(n) {
                return Some(from_num(family, n));
            }
            n = if n >= hi { lo } else { n + 1 };
            if n == start {
                return None;
            }
        }
        None
    }

    /// Addresses of `range` allocated or taken.
    fn used_in(&self, range: IpNetwork, taken: &BTreeSet<IpAddr>) -> u32 {
        let (lo, hi) = (range.network(), range.broadcast());
        let allocated = self.stored.allocations.range(lo..=hi).count();
        let outside = taken
            .range(lo..=hi)
            .filter(|ip| !self.stored.allocations.contains_key(ip))
            .count();
        (allocated + outside) as u32
    }

    /// Records the veth now serving an allocation (a re-ADD of the same attachment).
    pub fn set_host_veth(&mut self, ip: IpAddr, host_veth: &str) -> anyhow::Result<()> {
        if let Some(a) = self.stored.allocations.get_mut(&ip)
            && a.host_veth != host_veth
        {
            a.host_veth = host_veth.to_owned();
            self.persist()?;
        }
        Ok(())
    }

    /// Endpoints set aside while their network is disabled.
    pub fn parked(&self) -> &BTreeMap<IpAddr, ParkedEndpoint> {
        &self.stored.parked
    }

    /// Sets an endpoint aside (persisted before it returns).
    pub fn park(&mut self, ip: IpAddr, endpoint: ParkedEndpoint) -> anyhow::Result<()> {
        let previous = self.stored.parked.insert(ip, endpoint);
        if let Err(e) = self.persist() {
            match previous {
                Some(p) => self.stored.parked.insert(ip, p),
                None => self.stored.parked.remove(&ip),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Names the attachment of an address allocated without one (Docker: the address comes
    /// before its endpoint).
    pub fn set_attachment(&mut self, ip: IpAddr, attachment: &str) -> anyhow::Result<()> {
        if let Some(a) = self.stored.allocations.get_mut(&ip)
            && a.attachment.as_deref() != Some(attachment)
        {
            let before = a.attachment.replace(attachment.to_owned());
            if let Err(e) = self.persist() {
                if let Some(a) = self.stored.allocations.get_mut(&ip) {
                    a.attachment = before;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Forgets a set-aside endpoint (put back, or its container is gone).
    pub fn unpark(&mut self, ip: IpAddr) -> anyhow::Result<Option<ParkedEndpoint>> {
        let Some(p) = self.stored.parked.remove(&ip) else {
            return Ok(None);
        };
        if let Err(e) = self.persist() {
            self.stored.parked.insert(ip, p);
            return Err(e);
        }
        Ok(Some(p))
    }

    /// Frees an address; returns what it was allocated to.
    pub fn release(&mut self, ip: IpAddr) -> anyhow::Result<Option<Allocation>> {
        let Some(a) = self.stored.allocations.remove(&ip) else {
            return Ok(None);
        };
        if let Err(e) = self.persist() {
            self.stored.allocations.insert(ip, a);
            return Err(e);
        }
        Ok(Some(a))
    }

    /// Usage of both halves of `subnet` (either family) for `network`.
    pub fn usage(&self, network: &str, subnet: IpNetwork) -> Vec<IpamUsage> {
        [Half::Cni, Half::Docker]
            .into_iter()
            .map(|half| {
                let range = half_range(subnet, half);
                let allocations: Vec<IpamAllocation> = self
                    .stored
                    .allocations
                    .range(range.network()..=range.broadcast())
                    .filter(|(_, a)| a.network == network)
                    .map(|(ip, a)| IpamAllocation {
                        ip: *ip,
                        attachment: a.attachment.clone(),
                        host_veth: a.host_veth.clone(),
                    })
                    .collect();
                let used = allocations.len() as u32;
                IpamUsage {
                    network: network.to_owned(),
                    family: family_of(subnet),
                    subnet,
                    half,
                    range,
                    used,
                    free: usable_count(range).saturating_sub(u64::from(used)),
                    allocations,
                }
            })
            .collect()
    }

    /// Exhaustion events of `network` in `family` since start.
    pub fn exhausted(&self, network: &str, family: Family) -> u64 {
        self.exhausted
            .get(&(network.to_owned(), family))
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn tmp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ipam-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn parked_endpoints_survive_a_reopen_and_leave_no_trace_when_unparked() {
        let dir = tmp_dir("parked");
        let mut ipam = Ipam::open(&dir).unwrap();
        let ip: IpAddr = "9.0.1.2".parse().unwrap();
        let parked = ParkedEndpoint {
            vni: 1025,
            ifindex: 42,
            mac: overlay_api::MacAddr([2, 0, 0, 0, 0, 1]),
            gateway_mac: overlay_api::MacAddr([2, 0, 0, 0, 0, 2]),
        };
        ipam.park(ip, parked).unwrap();
        drop(ipam);
        // An agent restarted while the network is disabled still knows what to put back.
        let mut ipam = Ipam::open(&dir).unwrap();
        assert_eq!(ipam.parked().get(&ip), Some(&parked));
        assert_eq!(ipam.unpark(ip).unwrap(), Some(parked));
        assert_eq!(ipam.unpark(ip).unwrap(), None);
        drop(ipam);
        let text = std::fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        assert!(!text.contains("parked"), "{text}");
        assert!(Ipam::open(&dir).unwrap().parked().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn halves_gateways_and_reserved_addresses() {
        let s = net("9.0.1.0/24");
        assert_eq!(halves(s), [net("9.0.1.0/25"), net("9.0.1.128/25")]);
        assert_eq!(
            gateway_of(half_range(s, Half::Docker)),
            "9.0.1.129".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(half_of("9.0.1.2".parse().unwrap(), s), Ok(Half::Cni));
        assert_eq!(half_of("9.0.1.130".parse().unwrap(), s), Ok(Half::Docker));
        for bad in [
            "9.0.1.0",
            "9.0.1.1",
            "9.0.1.127",
            "9.0.1.128",
            "9.0.1.129",
            "9.0.1.255",
            "9.0.2.2",
        ] {
            assert!(half_of(bad.parse().unwrap(), s).is_err(), "{bad}");
        }
        assert_eq!(usable_count(net("9.0.1.0/29")), 5);
    }

    #[test]
    fn allocates_distinct_addresses_until_exhausted_and_persists_them() {
        let dir = tmp_dir("alloc");
        let s = net("9.0.1.0/28");
        let none = BTreeSet::new();
        let mut ipam = Ipam::open(&dir).unwrap();
        let mut got = BTreeSet::new();
        for i in 0..5 {
            let ip = ipam
                .allocate(
                    "dcos",
                    s,
                    Half::Cni,
                    None,
                    Some(&format!("c{i}")),
                    "v",
                    &none,
                )
                .unwrap();
            assert!(got.insert(ip));
            assert_eq!(half_of(ip, s), Ok(Half::Cni));
        }
        let err = ipam
            .allocate("dcos", s, Half::Cni, None, Some("c9"), "v", &none)
            .unwrap_err();
        assert!(matches!(err, IpamError::Exhausted { .. }), "{err}");
        assert!(err.to_string().contains("dcos") && err.to_string().contains("9.0.1.0/28"));
        assert_eq!(ipam.exhausted("dcos", Family::Ipv4), 1);
        assert_eq!(ipam.exhausted("dcos", Family::Ipv6), 0);
        // The Docker half is separate.
        let d = ipam
            .allocate("dcos", s, Half::Docker, None, None, "v", &none)
            .unwrap();
        assert_eq!(half_of(d, s), Ok(Half::Docker));
        // Reopened (a restart): the same allocations, nothing handed out twice.
        drop(ipam);
        let mut ipam = Ipam::open(&dir).unwrap();
        assert_eq!(ipam.allocations().len(), 6);
        assert_eq!(ipam.find_attachment("c3").map(|(ip, _)| ip).is_some(), true);
        let (ip3, _) = ipam.find_attachment("c3").unwrap();
        assert_eq!(
            ipam.release(ip3).unwrap().unwrap().attachment.as_deref(),
            Some("c3")
        );
        assert_eq!(ipam.release(ip3).unwrap(), None);
        let again = ipam
            .allocate("dcos", s, Half::Cni, None, None, "v", &none)
            .unwrap();
        assert_eq!(again, ip3);
        let u = ipam.usage("dcos", s);
        assert_eq!((u[0].used, u[0].free), (5, 0));
        assert_eq!((u[1].used, u[1].free), (1, 4));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn requested_addresses_are_checked() {
        let dir = tmp_dir("req");
        let s = net("9.0.1.0/24");
        let mut taken = BTreeSet::new();
        taken.insert("9.0.1.7".parse().unwrap());
        let mut ipam = Ipam::open(&dir).unwrap();
        let ip: IpAddr = "9.0.1.5".parse().unwrap();
        assert_eq!(
            ipam.allocate("dcos", s, Half::Cni, Some(ip), None, "v", &taken)
                .unwrap(),
            ip
        );
        assert!(matches!(
            ipam.allocate("dcos", s, Half::Cni, Some(ip), None, "v", &taken),
            Err(IpamError::Conflict(_))
        ));
        assert!(matches!(
            ipam.allocate(
                "dcos",
                s,
                Half::Cni,
                Some("9.0.1.7".parse().unwrap()),
                None,
                "v",
                &taken
            ),
            Err(IpamError::Conflict(_))
        ));
        assert!(matches!(
            ipam.allocate(
                "dcos",
                s,
                Half::Cni,
                Some("9.0.1.1".parse().unwrap()),
                None,
                "v",
                &taken
            ),
            Err(IpamError::Invalid(_))
        ));
        // Round robin skips what the datapath already has.
        let next = ipam
            .allocate("dcos", s, Half::Cni, None, None, "v", &taken)
            .unwrap();
        assert_eq!(next, "9.0.1.2".parse::<Ipv4Addr>().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unsplittable_subnets_are_both_halves_and_hand_out_nothing() {
        // The master's rule (overlay_api::subnets): a /31 or /32 is both halves. Neither has
        // room for a container besides network, gateway and broadcast, so IPAM refuses cleanly.
        let dir = tmp_dir("tiny");
        let mut ipam = Ipam::open(&dir).unwrap();
        for s in ["9.0.1.2/31", "9.0.1.3/32"] {
            let s = net(s);
            assert_eq!(halves(s), [s, s]);
            assert_eq!(half_range(s, Half::Docker), s);
            for half in [Half::Cni, Half::Docker] {
                let err = ipam
                    .allocate("dcos", s, half, None, None, "v", &BTreeSet::new())
                    .unwrap_err();
                assert!(matches!(err, IpamError::Exhausted { .. }), "{s}: {err}");
            }
            for ip in s.iter() {
                assert!(half_of(ip, s).is_err(), "{ip} in {s}");
            }
        }
        assert!(ipam.allocations().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
    #[test]
    fn ipv6_halves_gateways_and_reserved_addresses() {
        // dcos6's shape: an agent's /80 of fd01:b::/64, split like IPv4 into /81 halves.
        let s = net("fd01:b::1:0:0:0/80");
        assert_eq!(
            halves(s),
            [net("fd01:b::1:0:0:0/81"), net("fd01:b::1:8000:0:0/81")]
        );
        assert_eq!(
            gateway_of(half_range(s, Half::Cni)),
            "fd01:b::1:0:0:1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            gateway_of(half_range(s, Half::Docker)),
            "fd01:b::1:8000:0:1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            half_of("fd01:b::1:0:0:2".parse().unwrap(), s),
            Ok(Half::Cni)
        );
        assert_eq!(
            half_of("fd01:b::1:8000:0:2".parse().unwrap(), s),
            Ok(Half::Docker)
        );
        for bad in [
            "fd01:b::1:0:0:0",
            "fd01:b::1:0:0:1",
            "fd01:b::1:7fff:ffff:ffff",
            "fd01:b::1:8000:0:0",
            "fd01:b::1:8000:0:1",
            "fd01:b::1:ffff:ffff:ffff",
            "fd01:b::2:0:0:2",
        ] {
            assert!(half_of(bad.parse().unwrap(), s).is_err(), "{bad}");
        }
        assert_eq!(usable_count(half_range(s, Half::Cni)), (1 << 47) - 3);
    }

    #[test]
    fn ipv6_allocates_from_its_half_round_robin_and_runs_out_per_family() {
        let dir = tmp_dir("alloc6");
        let none = BTreeSet::new();
        let mut ipam = Ipam::open(&dir).unwrap();
        // A huge half is never scanned: the next address comes at once.
        let big = net("fd01:b::1:0:0:0/80");
        let a = ipam
            .allocate("dcos6", big, Half::Cni, None, Some("c1"), "v", &none)
            .unwrap();
        let b = ipam
            .allocate("dcos6", big, Half::Cni, None, Some("c2"), "v", &none)
            .unwrap();
        assert_eq!(a, "fd01:b::1:0:0:2".parse::<IpAddr>().unwrap());
        assert_eq!(b, "fd01:b::1:0:0:3".parse::<IpAddr>().unwrap());
        let d = ipam
            .allocate("dcos6", big, Half::Docker, None, None, "v", &none)
            .unwrap();
        assert_eq!(d, "fd01:b::1:8000:0:2".parse::<IpAddr>().unwrap());
        // A freed address is not handed out again at once.
        ipam.release(a).unwrap();
        let c = ipam
            .allocate("dcos6", big, Half::Cni, None, Some("c3"), "v", &none)
            .unwrap();
        assert_eq!(c, "fd01:b::1:0:0:4".parse::<IpAddr>().unwrap());
        // A /124 per agent: /125 halves with 5 usable addresses each.
        let small = net("fd01:c::10/124");
        let v4 = net("9.0.1.0/24");
        for i in 0..5 {
            ipam.allocate(
                "dual",
                small,
                Half::Cni,
                None,
                Some(&format!("d{i}")),
                "v",
                &none,
            )
            .unwrap();
        }
        let err = ipam
            .allocate("dual", small, Half::Cni, None, Some("d9"), "v", &none)
            .unwrap_err();
        assert!(
            matches!(
                err,
                IpamError::Exhausted {
                    family: Family::Ipv6,
                    ..
                }
            ),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("network dual")
                && text.contains("IPv6")
                && text.contains("fd01:c::10/125"),
            "{text}"
        );
        assert_eq!(ipam.exhausted("dual", Family::Ipv6), 1);
        assert_eq!(ipam.exhausted("dual", Family::Ipv4), 0);
        // The IPv4 side of the same network is unaffected.
        ipam.allocate("dual", v4, Half::Cni, None, Some("d9"), "v", &none)
            .unwrap();
        let u = ipam.usage("dual", small);
        assert_eq!((u[0].family, u[0].used, u[0].free), (Family::Ipv6, 5, 0));
        assert_eq!((u[1].used, u[1].free), (0, 5));
        // Addresses of the other family are refused, not misfiled.
        assert!(matches!(
            ipam.allocate(
                "dual",
                small,
                Half::Cni,
                Some("9.0.1.9".parse().unwrap()),
                None,
                "v",
                &none
            ),
            Err(IpamError::Invalid(_))
        ));
        // Both families of an attachment are found by it; a restart keeps them.
        drop(ipam);
        let ipam = Ipam::open(&dir).unwrap();
        let att: Vec<IpAddr> = ipam
            .attachment_addresses("d9")
            .into_iter()
            .map(|(ip, _)| ip)
            .collect();
        assert_eq!(att.len(), 1);
        assert_eq!(ipam.attachment_addresses("d0").len(), 1);
        assert_eq!(ipam.allocations().len(), 3 + 5 + 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_older_agents_ipv4_only_file_loads_and_gains_ipv6_alongside() {
        let dir = tmp_dir("compat");
        std::fs::create_dir_all(&dir).unwrap();
        // What an agent from before IPv6 wrote (its Stored with Ipv4Addr keys).
        let old = r#"{
  "version": 1,
  "allocations": {
    "9.0.1.2": {"network": "dcos", "half": "cni", "attachment": "c1/eth0", "host_veth": "eo1"},
    "9.0.1.130": {"network": "dcos", "half": "docker", "host_veth": ""}
  },
  "last": {"dcos/cni": "9.0.1.2"},
  "parked": {"9.0.1.2": {"vni": 1024, "ifindex": 7, "mac": "02:00:00:00:00:01", "gateway_mac": "02:00:00:00:00:02"}}
}"#;
        std::fs::write(dir.join(STATE_FILE), old).unwrap();
        let mut ipam = Ipam::open(&dir).unwrap();
        let ip: IpAddr = "9.0.1.2".parse().unwrap();
        assert_eq!(ipam.get(ip).unwrap().attachment.as_deref(), Some("c1/eth0"));
        assert!(ipam.parked().contains_key(&ip));
        let none = BTreeSet::new();
        // Round robin goes on after the recorded last address.
        let next = ipam
            .allocate("dcos", net("9.0.1.0/24"), Half::Cni, None, None, "v", &none)
            .unwrap();
        assert_eq!(next, "9.0.1.3".parse::<IpAddr>().unwrap());
        let v6 = ipam
            .allocate(
                "dcos",
                net("fd01:b::/80"),
                Half::Cni,
                None,
                Some("c1/eth0"),
                "eo1",
                &none,
            )
            .unwrap();
        drop(ipam);
        let ipam = Ipam::open(&dir).unwrap();
        assert_eq!(ipam.allocations().len(), 4);
        assert_eq!(
            ipam.attachment_addresses("c1/eth0")
                .into_iter()
                .map(|(ip, _)| ip)
                .collect::<Vec<_>>(),
            [ip, v6]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
