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
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use ipnetwork::Ipv4Network;
use overlay_api::agent::{Half, IpamAllocation, IpamUsage};
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

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    version: u32,
    allocations: BTreeMap<Ipv4Addr, Allocation>,
    /// Last address handed out per `network/half`: allocation continues after it (round
    /// robin), so a freed address is not reused at once.
    #[serde(default)]
    last: BTreeMap<String, Ipv4Addr>,
    /// Endpoints of disabled networks, taken out of the datapath and put back when their
    /// network is enabled again (kept here so an agent restart does not lose them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    parked: BTreeMap<Ipv4Addr, ParkedEndpoint>,
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
        "network {network}: no free address in the {} half {range} of this agent's subnet {subnet} ({used} in use)",
        half.name()
    )]
    Exhausted {
        network: String,
        subnet: Ipv4Network,
        half: Half,
        range: Ipv4Network,
        used: u32,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Io(#[from] anyhow::Error),
}

/// The two halves of an agent subnet (the whole subnet twice if it cannot be split): the
/// master's rule, [`overlay_api::subnets::halves4`].
pub fn halves(subnet: Ipv4Network) -> [Ipv4Network; 2] {
    let (cni, docker) = overlay_api::subnets::halves4(subnet);
    [cni, docker]
}

pub fn half_range(subnet: Ipv4Network, half: Half) -> Ipv4Network {
    overlay_api::subnets::half_range4(subnet, half)
}

/// The gateway of a half: its first host ([`overlay_api::subnets::gateway4`]).
pub fn gateway_of(range: Ipv4Network) -> Ipv4Addr {
    overlay_api::subnets::gateway4(range)
}

/// Addresses of `range` that may be handed out (network, gateway and broadcast excluded).
fn usable(range: Ipv4Network) -> impl Iterator<Item = Ipv4Addr> {
    let start = u32::from(range.network());
    let end = u32::from(range.broadcast());
    (start.saturating_add(2)..end).map(Ipv4Addr::from)
}

fn usable_count(range: Ipv4Network) -> u32 {
    let size = 1u64 << (32 - range.prefix() as u32);
    size.saturating_sub(3) as u32
}

/// Which half of `subnet` holds `ip`, if `ip` may be handed out at all.
pub fn half_of(ip: Ipv4Addr, subnet: Ipv4Network) -> Result<Half, String> {
    if !subnet.contains(ip) {
        return Err(format!(
            "address {ip} is outside this agent's subnet {subnet}"
        ));
    }
    for half in [Half::Cni, Half::Docker] {
        let r = half_range(subnet, half);
        if r.contains(ip) {
            if ip == r.network() || ip == gateway_of(r) || ip == r.broadcast() {
                return Err(format!(
                    "address {ip} is reserved in {r} (network, gateway or broadcast)"
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
    /// Exhaustion events per network since start.
    exhausted: BTreeMap<String, u64>,
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

    pub fn allocations(&self) -> &BTreeMap<Ipv4Addr, Allocation> {
        &self.stored.allocations
    }

    pub fn get(&self, ip: Ipv4Addr) -> Option<&Allocation> {
        self.stored.allocations.get(&ip)
    }

    pub fn find_attachment(&self, attachment: &str) -> Option<(Ipv4Addr, &Allocation)> {
        self.stored
            .allocations
            .iter()
            .find(|(_, a)| a.attachment.as_deref() == Some(attachment))
            .map(|(ip, a)| (*ip, a))
    }

    /// Allocates an address of `network` for `host_veth`: `requested` when given (it must be a
    /// usable, free address of `subnet`), else the next free one of `half`. `taken` holds
    /// addresses in use outside the IPAM (endpoints the datapath already has). Persisted before
    /// it returns.
    pub fn allocate(
        &mut self,
        network: &str,
        subnet: Ipv4Network,
        half: Half,
        requested: Option<Ipv4Addr>,
        attachment: Option<&str>,
        host_veth: &str,
        taken: &BTreeSet<Ipv4Addr>,
    ) -> Result<Ipv4Addr, IpamError> {
        let (ip, half) = match requested {
            Some(ip) => {
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
                let key = format!("{network}/{}", half.name());
                let last = self.stored.last.get(&key).copied();
                let free = |ip: &Ipv4Addr| {
                    !self.stored.allocations.contains_key(ip) && !taken.contains(ip)
                };
                let after = usable(range)
                    .filter(|ip| last.is_some_and(|l| *ip > l))
                    .find(free);
                let ip = match after.or_else(|| usable(range).find(free)) {
                    Some(ip) => ip,
                    None => {
                        *self.exhausted.entry(network.to_owned()).or_default() += 1;
                        let used = usable(range).filter(|ip| !free(ip)).count() as u32;
                        return Err(IpamError::Exhausted {
                            network: network.to_owned(),
                            subnet,
                            half,
                            range,
                            used,
                        });
                    }
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

    /// Records the veth now serving an allocation (a re-ADD of the same attachment).
    pub fn set_host_veth(&mut self, ip: Ipv4Addr, host_veth: &str) -> anyhow::Result<()> {
        if let Some(a) = self.stored.allocations.get_mut(&ip)
            && a.host_veth != host_veth
        {
            a.host_veth = host_veth.to_owned();
            self.persist()?;
        }
        Ok(())
    }

    /// Endpoints set aside while their network is disabled.
    pub fn parked(&self) -> &BTreeMap<Ipv4Addr, ParkedEndpoint> {
        &self.stored.parked
    }

    /// Sets an endpoint aside (persisted before it returns).
    pub fn park(&mut self, ip: Ipv4Addr, endpoint: ParkedEndpoint) -> anyhow::Result<()> {
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
    pub fn set_attachment(&mut self, ip: Ipv4Addr, attachment: &str) -> anyhow::Result<()> {
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
    pub fn unpark(&mut self, ip: Ipv4Addr) -> anyhow::Result<Option<ParkedEndpoint>> {
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
    pub fn release(&mut self, ip: Ipv4Addr) -> anyhow::Result<Option<Allocation>> {
        let Some(a) = self.stored.allocations.remove(&ip) else {
            return Ok(None);
        };
        if let Err(e) = self.persist() {
            self.stored.allocations.insert(ip, a);
            return Err(e);
        }
        Ok(Some(a))
    }

    /// Usage of both halves of `subnet` for `network`.
    pub fn usage(&self, network: &str, subnet: Ipv4Network) -> Vec<IpamUsage> {
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
                    subnet,
                    half,
                    range,
                    used,
                    free: usable_count(range).saturating_sub(used),
                    allocations,
                }
            })
            .collect()
    }

    pub fn exhausted(&self, network: &str) -> u64 {
        self.exhausted.get(network).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
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
        let ip: Ipv4Addr = "9.0.1.2".parse().unwrap();
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
        assert_eq!(usable(net("9.0.1.0/29")).count(), 5);
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
        assert_eq!(ipam.exhausted("dcos"), 1);
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
        let ip: Ipv4Addr = "9.0.1.5".parse().unwrap();
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
}
