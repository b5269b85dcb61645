//! This agent's containers as the datapath sees them: add, remove, release, GC and restore,
//! given the datapath and this agent's allocation. The endpoint map is the source of truth
//! across restarts; the IPAM keeps the addresses (and the endpoints parked while their network
//! is disabled).
//!
//! A container interface is one host veth with one map entry per address: its IPv4 address, its
//! IPv6 address and IPv6 link-local address on a network with IPv6 (the link-local one so that
//! its neighbour discovery with the gateway passes anti-spoofing). The entries of one veth are
//! added and removed together.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
};

use anyhow::anyhow;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use overlay_api::{
    AgentInfo, AgentOverlayInfo, MacAddr,
    agent::{AddEndpoint, EndpointInfo, Family, GcRequest, Half, IpamUsage, Released},
};
use overlay_common::maps::{Endpoint, programs};

use crate::{
    datapath::Datapath,
    ipam::{self, Ipam, IpamError, ParkedEndpoint},
    netdev::{self, Link},
};

/// Why an endpoint request failed; the API maps these to HTTP status codes.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("agent not ready: {0}")]
    NotReady(String),
    /// No free address in the requested half (HTTP 507).
    #[error("{0}")]
    Exhausted(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<IpamError> for EndpointError {
    fn from(e: IpamError) -> EndpointError {
        match e {
            IpamError::Exhausted { .. } => EndpointError::Exhausted(e.to_string()),
            IpamError::Invalid(m) => EndpointError::Invalid(m),
            IpamError::Conflict(m) => EndpointError::Conflict(m),
            IpamError::Io(e) => EndpointError::Internal(e),
        }
    }
}

/// What the master gave this agent, as endpoint operations need it.
#[derive(Clone, Copy)]
pub struct Allocation<'a> {
    pub me: Option<&'a AgentInfo>,
    /// Network name per VNI, from the master's configuration.
    pub names: &'a BTreeMap<u32, String>,
}

impl Allocation<'_> {
    fn overlay(&self, network: &str) -> Option<&AgentOverlayInfo> {
        self.me?.overlays.iter().find(|o| o.info.name == network)
    }

    /// This agent's IPv4 subnet of `network`, if it has one.
    pub fn subnet_of(&self, network: &str) -> Option<Ipv4Network> {
        self.overlay(network)?.subnet
    }

    /// This agent's IPv6 subnet of `network`, if it has one.
    pub fn subnet6_of(&self, network: &str) -> Option<Ipv6Network> {
        self.overlay(network)?.subnet6
    }

    /// This agent's subnet of `network` in `family`.
    pub fn subnet_in(&self, network: &str, family: Family) -> Option<IpNetwork> {
        match family {
            Family::Ipv4 => self.subnet_of(network).map(IpNetwork::V4),
            Family::Ipv6 => self.subnet6_of(network).map(IpNetwork::V6),
        }
    }

    /// The half of this agent's subnet of `network` that holds `ip`.
    fn half_containing(&self, network: &str, ip: IpAddr) -> Option<IpNetwork> {
        ipam::halves(self.subnet_in(network, Family::of(ip))?)
            .into_iter()
            .find(|h| h.contains(ip))
    }
}

/// A container veth as resolved before the request reaches the datapath's owner (the lookup
/// may block, so it is done outside the owner). A failed lookup is reported only once the
/// request got that far, so that a bad network is named before a bad veth.
#[derive(Clone, Debug)]
pub struct Veth(Result<Link, String>);

impl Veth {
    /// Looks the veth up and makes it ignore router advertisements and redirects.
    pub fn resolve(name: &str) -> Veth {
        Veth(
            netdev::link(name)
                .and_then(|l| netdev::refuse_router_messages(&l.name).map(|()| l))
                .map_err(|e| format!("host_veth: {e:#}")),
        )
    }

    fn link(&self) -> Result<&Link, EndpointError> {
        self.0
            .as_ref()
            .map_err(|e| EndpointError::Invalid(e.clone()))
    }

    fn ifindex(&self) -> Option<u32> {
        self.0.as_ref().ok().map(|l| l.ifindex)
    }
}

fn link_key(ifindex: u32) -> String {
    format!("if{ifindex}")
}

fn container_endpoints(dp: &Datapath) -> anyhow::Result<BTreeMap<IpAddr, Endpoint>> {
    Ok(dp
        .maps()
        .endpoints()?
        .into_iter()
        .filter(|(_, e)| !e.is_host())
        .collect())
}

fn is_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// The container endpoints of one veth.
fn on_veth(eps: &BTreeMap<IpAddr, Endpoint>, ifindex: u32) -> Vec<IpAddr> {
    eps.iter()
        .filter(|(_, e)| !e.is_host() && e.ifindex == ifindex)
        .map(|(ip, _)| *ip)
        .collect()
}

/// This agent's containers: their addresses (the IPAM) and parked endpoints.
#[derive(Default)]
pub struct Endpoints {
    /// Container addresses (absent: callers must give every endpoint's address).
    ipam: Option<Ipam>,
    /// Parked endpoints (disabled networks) when there is no IPAM to keep them in.
    parked_in_memory: BTreeMap<IpAddr, ParkedEndpoint>,
}

impl Endpoints {
    pub fn new(ipam: Option<Ipam>) -> Endpoints {
        Endpoints {
            ipam,
            parked_in_memory: BTreeMap::new(),
        }
    }

    pub fn ipam(&self) -> Option<&Ipam> {
        self.ipam.as_ref()
    }

    /// Endpoints set aside while their network is disabled.
    pub fn parked(&self) -> BTreeMap<IpAddr, ParkedEndpoint> {
        match &self.ipam {
            Some(ipam) => ipam.parked().clone(),
            None => self.parked_in_memory.clone(),
        }
    }

    /// Recorded before the map entry goes: a crash in between leaves it both parked and in
    /// the map, and the next state parks it again.
    pub fn park(
        &mut self,
        dp: &mut Datapath,
        ip: IpAddr,
        endpoint: ParkedEndpoint,
    ) -> anyhow::Result<()> {
        match &mut self.ipam {
            Some(ipam) => ipam.park(ip, endpoint)?,
            None => {
                self.parked_in_memory.insert(ip, endpoint);
            }
        }
        dp.maps_mut().remove_endpoint(ip)
    }

    fn unpark(&mut self, ip: IpAddr) -> anyhow::Result<Option<ParkedEndpoint>> {
        match &mut self.ipam {
            Some(ipam) => ipam.unpark(ip),
            None => Ok(self.parked_in_memory.remove(&ip)),
        }
    }

    /// Puts a parked endpoint back into the datapath if its veth is still the one recorded;
    /// otherwise forgets it (its program detached).
    pub fn unpark_into(
        &mut self,
        dp: &mut Datapath,
        ip: IpAddr,
        p: ParkedEndpoint,
    ) -> anyhow::Result<()> {
        let key = link_key(p.ifindex);
        let expected = self
            .ipam
            .as_ref()
            .and_then(|i| i.get(ip))
            .map(|a| a.host_veth.clone());
        match netdev::name_of(p.ifindex) {
            Some(name) if expected.as_ref().is_none_or(|x| *x == name) => {
                dp.attach_keyed(&name, programs::FROM_CONTAINER, &key)?;
                dp.maps_mut().put_endpoint(
                    ip,
                    Endpoint::container(p.ifindex, p.vni, p.mac.0, p.gateway_mac.0),
                )?;
                tracing::info!(%ip, veth = %name, "network enabled again: endpoint back in the datapath");
            }
            _ => {
                tracing::info!(%ip, "veth of parked endpoint is gone: forgetting it");
                dp.detach(programs::FROM_CONTAINER, &key)?;
            }
        }
        self.unpark(ip)?;
        Ok(())
    }

    /// A parked endpoint whose network was removed: program detached, address released.
    pub fn forget_parked(
        &mut self,
        dp: &mut Datapath,
        ip: IpAddr,
        p: ParkedEndpoint,
    ) -> anyhow::Result<()> {
        tracing::info!(%ip, "network of parked endpoint removed: disconnecting it");
        dp.detach(programs::FROM_CONTAINER, &link_key(p.ifindex))?;
        self.unpark(ip)?;
        if let Some(ipam) = &mut self.ipam {
            ipam.release(ip)?;
        }
        Ok(())
    }

    /// Local endpoints (container interfaces) per network name, parked ones included: what the
    /// master is told, so that it refuses to remove or disable a network still in use without
    /// force.
    pub fn counts(
        &self,
        dp: &Datapath,
        names: &BTreeMap<u32, String>,
    ) -> anyhow::Result<BTreeMap<String, u32>> {
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        let parked = self.parked();
        // One per veth: a dual-stack container has several entries.
        let veths: BTreeSet<(u32, u32)> = container_endpoints(dp)?
            .into_values()
            .map(|e| (e.ifindex, e.network))
            .chain(parked.values().map(|p| (p.ifindex, p.vni)))
            .collect();
        for (_, vni) in veths {
            let name = names
                .get(&vni)
                .cloned()
                .unwrap_or_else(|| format!("vni-{vni}"));
            *counts.entry(name).or_default() += 1;
        }
        Ok(counts)
    }

    /// Local endpoints, from the pinned map (the source of truth across restarts): one per
    /// container veth, with its IPv4 and IPv6 addresses.
    pub fn list(&self, dp: &Datapath, alloc: Allocation) -> anyhow::Result<Vec<EndpointInfo>> {
        let mut by_veth: BTreeMap<u32, Vec<(IpAddr, Endpoint)>> = BTreeMap::new();
        for (ip, e) in container_endpoints(dp)? {
            if !is_link_local(ip) {
                by_veth.entry(e.ifindex).or_default().push((ip, e));
            }
        }
        let mut out = vec![];
        for (ifindex, entries) in by_veth {
            let v4 = entries.iter().find(|(ip, _)| ip.is_ipv4()).copied();
            let v6 = entries.iter().find(|(ip, _)| ip.is_ipv6()).copied();
            let Some((ip, e)) = v4.or(v6) else { continue };
            let network = alloc.names.get(&e.network).cloned().unwrap_or_default();
            let range = alloc.half_containing(&network, ip);
            let ip6 = v4.and(v6).and_then(|(ip, _)| match ip {
                IpAddr::V6(v6) => Some(v6),
                IpAddr::V4(_) => None,
            });
            let subnet6 =
                ip6.and_then(
                    |ip6| match alloc.half_containing(&network, IpAddr::V6(ip6)) {
                        Some(IpNetwork::V6(r)) => Some(r),
                        _ => None,
                    },
                );
            out.push(EndpointInfo {
                network_id: e.network,
                ip,
                host_veth: netdev::name_of(ifindex).unwrap_or_default(),
                ifindex,
                container_mac: MacAddr(e.mac),
                gateway_mac: MacAddr(e.gateway_mac),
                subnet: range,
                gateway: range.map(ipam::gateway_of),
                attachment: self
                    .ipam
                    .as_ref()
                    .and_then(|i| i.get(ip))
                    .and_then(|a| a.attachment.clone()),
                ip6,
                subnet6,
                gateway6: subnet6.map(overlay_api::subnets::gateway6),
                network,
            });
        }
        Ok(out)
    }

    fn info(&self, dp: &Datapath, alloc: Allocation, ip: IpAddr) -> anyhow::Result<EndpointInfo> {
        self.list(dp, alloc)?
            .into_iter()
            .find(|e| e.ip == ip || e.ip6.map(IpAddr::V6) == Some(ip))
            .ok_or_else(|| anyhow!("endpoint {ip} vanished"))
    }

    /// Connects a container: validates the request against this agent's allocation, takes one
    /// address per family the agent has a subnet of the network in (the requested ones, or the
    /// next free ones of the requested half from the IPAM), attaches the container program to
    /// its veth, then publishes the endpoints. On failure nothing is left behind (every address
    /// allocated here is released: an IPv6 exhaustion gives the IPv4 address back). Adding an
    /// attachment that already has an endpoint returns it (re-wired if its veth changed).
    pub fn add(
        &mut self,
        dp: &mut Datapath,
        alloc: Allocation,
        req: &AddEndpoint,
        veth: &Veth,
    ) -> Result<EndpointInfo, EndpointError> {
        let me = alloc.me.ok_or_else(|| {
            EndpointError::NotReady(
                "not registered with a master yet (no master answers and no saved state)".into(),
            )
        })?;
        let ov = me
            .overlays
            .iter()
            .find(|o| o.info.name == req.network)
            .ok_or_else(|| {
                EndpointError::Invalid(format!(
                    "network {:?} is not configured on this agent",
                    req.network
                ))
            })?;
        if !ov.info.is_enabled() {
            return Err(EndpointError::Conflict(format!(
                "network {:?} is disabled: no new containers until it is enabled again",
                req.network
            )));
        }
        let vni = alloc
            .names
            .iter()
            .find(|(_, n)| **n == req.network)
            .map(|(v, _)| *v)
            .ok_or_else(|| {
                EndpointError::Invalid(format!("network {:?} has no VNI", req.network))
            })?;
        // One address per family this agent has a subnet of the network in.
        let subnets: Vec<IpNetwork> = [ov.subnet.map(IpNetwork::V4), ov.subnet6.map(IpNetwork::V6)]
            .into_iter()
            .flatten()
            .collect();
        if subnets.is_empty() {
            return Err(EndpointError::Invalid(format!(
                "network {:?}: this agent has no subnet (allocation failed)",
                req.network
            )));
        }
        let requested: Vec<IpAddr> = req
            .ip
            .map(IpAddr::V4)
            .into_iter()
            .chain(req.ip6.map(IpAddr::V6))
            .collect();
        for ip in &requested {
            let family = Family::of(*ip);
            let subnet = subnets
                .iter()
                .find(|s| ipam::family_of(**s) == family)
                .ok_or_else(|| {
                    EndpointError::Invalid(format!(
                        "network {:?}: this agent has no {} subnet for the requested address {ip}",
                        req.network,
                        match family {
                            Family::Ipv4 => "IPv4",
                            Family::Ipv6 => "IPv6",
                        }
                    ))
                })?;
            ipam::half_of(*ip, *subnet).map_err(EndpointError::Invalid)?;
        }
        let existing = dp.maps().endpoints()?;
        let wired_here = |ip: &IpAddr| {
            existing
                .get(ip)
                .is_some_and(|e| e.mac == req.container_mac.0 && Some(e.ifindex) == veth.ifindex())
        };
        // The same attachment again: its addresses, its endpoint if still wired the same way.
        let mut reused: Vec<IpAddr> = vec![];
        if let (Some(att), Some(ipam)) = (&req.attachment, &self.ipam) {
            let had = ipam.attachment_addresses(att);
            if let Some((ip, a)) = had.iter().find(|(ip, a)| {
                a.network != req.network
                    || requested
                        .iter()
                        .any(|r| Family::of(*r) == Family::of(*ip) && r != ip)
            }) {
                return Err(EndpointError::Conflict(format!(
                    "attachment {att} already has address {ip} on network {}",
                    a.network
                )));
            }
            reused = had.into_iter().map(|(ip, _)| ip).collect();
        }
        if !reused.is_empty() {
            let complete = subnets
                .iter()
                .all(|s| reused.iter().any(|ip| s.contains(*ip)));
            if complete && reused.iter().all(wired_here) {
                return Ok(self.info(dp, alloc, reused[0])?);
            }
            // Wired elsewhere (an earlier veth of the attachment): unwired there first.
            let old: BTreeSet<u32> = reused
                .iter()
                .filter_map(|ip| existing.get(ip).map(|e| e.ifindex))
                .collect();
            for ifindex in old {
                tracing::info!(ifindex, attachment = ?req.attachment, "re-wiring the endpoint of an attachment");
                disconnect_veth(dp, &existing, ifindex)?;
            }
        } else if !requested.is_empty() && requested.iter().all(wired_here) {
            // The requested addresses, wired to this very veth already: an ADD repeated.
            return Ok(self.info(dp, alloc, requested[0])?);
        }
        let taken: BTreeSet<IpAddr> = existing.keys().copied().collect();
        let mut addresses: Vec<IpAddr> = vec![];
        let mut allocated: Vec<IpAddr> = vec![];
        let outcome = (|| -> Result<(), EndpointError> {
            for subnet in &subnets {
                let family = ipam::family_of(*subnet);
                if let Some(ip) = reused.iter().find(|ip| subnet.contains(**ip)) {
                    addresses.push(*ip);
                    continue;
                }
                let wanted = requested.iter().copied().find(|r| Family::of(*r) == family);
                if let Some(ip) = wanted
                    && existing.contains_key(&ip)
                {
                    return Err(EndpointError::Conflict(format!(
                        "address {ip} is already used by another endpoint"
                    )));
                }
                match &mut self.ipam {
                    Some(ipam) => {
                        let ip = ipam.allocate(
                            &req.network,
                            *subnet,
                            req.half,
                            wanted,
                            req.attachment.as_deref(),
                            &req.host_veth,
                            &taken,
                        )?;
                        allocated.push(ip);
                        addresses.push(ip);
                    }
                    None => addresses.push(wanted.ok_or_else(|| {
                        EndpointError::Invalid(format!(
                            "this agent has no IPAM: give an {} address",
                            match family {
                                Family::Ipv4 => "ip",
                                Family::Ipv6 => "ip6",
                            }
                        ))
                    })?),
                }
            }
            connect(dp, &addresses, vni, req, veth)
        })();
        if let Err(e) = outcome {
            if let Some(ipam) = &mut self.ipam {
                for ip in &allocated {
                    let _ = ipam.release(*ip);
                }
            }
            return Err(e);
        }
        if let Some(ipam) = &mut self.ipam {
            for ip in &addresses {
                ipam.set_host_veth(*ip, &req.host_veth)?;
            }
        }
        tracing::info!(addresses = ?addresses, veth = %req.host_veth, network = %req.network, vni, "endpoint added");
        Ok(self.info(dp, alloc, addresses[0])?)
    }

    /// Disconnects the container that has address `ip` (every entry of its veth) and frees its
    /// addresses.
    pub fn remove(&mut self, dp: &mut Datapath, ip: IpAddr) -> Result<(), EndpointError> {
        let existing = dp.maps().endpoints()?;
        let allocated = self.ipam.as_ref().is_some_and(|i| i.get(ip).is_some());
        let parked = self.parked();
        let mut freed: Vec<IpAddr> = vec![ip];
        match (existing.get(&ip).filter(|e| !e.is_host()), parked.get(&ip)) {
            (Some(e), _) => {
                freed.extend(on_veth(&existing, e.ifindex));
                disconnect_veth(dp, &existing, e.ifindex)?;
                for (p, _) in parked.iter().filter(|(_, p)| p.ifindex == e.ifindex) {
                    self.unpark(*p)?;
                }
            }
            (None, Some(p)) => {
                dp.detach(programs::FROM_CONTAINER, &link_key(p.ifindex))?;
                let same: Vec<IpAddr> = parked
                    .iter()
                    .filter(|(_, q)| q.ifindex == p.ifindex)
                    .map(|(ip, _)| *ip)
                    .collect();
                for q in same {
                    self.unpark(q)?;
                    freed.push(q);
                }
            }
            (None, None) if allocated => {}
            (None, None) => {
                return Err(EndpointError::NotFound(format!(
                    "no endpoint with address {ip}"
                )));
            }
        }
        if let Some(ipam) = &mut self.ipam {
            for a in &freed {
                ipam.release(*a)?;
            }
        }
        tracing::info!(%ip, "endpoint removed");
        Ok(())
    }

    /// Disconnects an endpoint whose network is gone (as the plan found it: no second read of
    /// the map) and frees its address.
    pub fn remove_orphan(
        &mut self,
        dp: &mut Datapath,
        ip: IpAddr,
        ifindex: u32,
    ) -> anyhow::Result<()> {
        disconnect(dp, ip, ifindex)?;
        if self.parked().contains_key(&ip) {
            self.unpark(ip)?;
        }
        if let Some(ipam) = &mut self.ipam {
            ipam.release(ip)?;
        }
        tracing::info!(%ip, "endpoint removed");
        Ok(())
    }

    /// Takes an address before its endpoint exists (Docker's IPAM RequestAddress): `requested`
    /// or the next free one of `half` of this agent's subnet of `network` in `family`.
    /// Persisted before it returns.
    pub fn reserve_address(
        &mut self,
        dp: &Datapath,
        alloc: Allocation,
        network: &str,
        family: Family,
        half: Half,
        requested: Option<IpAddr>,
    ) -> Result<IpAddr, EndpointError> {
        let subnet = alloc.subnet_in(network, family).ok_or_else(|| {
            EndpointError::Invalid(format!(
                "network {network:?} has no {} subnet on this agent",
                match family {
                    Family::Ipv4 => "IPv4",
                    Family::Ipv6 => "IPv6",
                }
            ))
        })?;
        let taken: BTreeSet<IpAddr> = dp.maps().endpoints()?.into_keys().collect();
        let ipam = self
            .ipam
            .as_mut()
            .ok_or_else(|| EndpointError::Invalid("this agent has no IPAM".into()))?;
        Ok(ipam.allocate(network, subnet, half, requested, None, "", &taken)?)
    }

    /// Names the attachment of a reserved address (Docker's CreateEndpoint).
    pub fn set_attachment(&mut self, ip: IpAddr, attachment: &str) -> anyhow::Result<()> {
        match &mut self.ipam {
            Some(ipam) => ipam.set_attachment(ip, attachment),
            None => Ok(()),
        }
    }

    /// Disconnects the endpoint of `ip` (map entries of its veth, program) but keeps its
    /// addresses (Docker's Leave).
    pub fn unwire(&mut self, dp: &mut Datapath, ip: IpAddr) -> anyhow::Result<()> {
        let existing = dp.maps().endpoints()?;
        if let Some(e) = existing.get(&ip).filter(|e| !e.is_host()) {
            disconnect_veth(dp, &existing, e.ifindex)?;
        }
        Ok(())
    }

    /// Releases an attachment: its endpoint and its addresses. Unknown attachments release
    /// nothing (DEL is idempotent).
    pub fn release(
        &mut self,
        dp: &mut Datapath,
        attachment: &str,
    ) -> Result<Released, EndpointError> {
        let found: Vec<(IpAddr, String)> = self
            .ipam
            .as_ref()
            .map(|i| {
                i.attachment_addresses(attachment)
                    .into_iter()
                    .map(|(ip, a)| (ip, a.host_veth.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let Some((ip, host_veth)) = found.first().cloned() else {
            return Ok(Released {
                attachment: attachment.to_owned(),
                ip: None,
                ip6: None,
                host_veth: None,
            });
        };
        for (a, _) in &found {
            // The first removal takes the whole veth; the rest only free what is left.
            if self.ipam.as_ref().is_some_and(|i| i.get(*a).is_some()) {
                self.remove(dp, *a)?;
            }
        }
        let ip6 = found.iter().skip(1).find_map(|(a, _)| match a {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        });
        tracing::info!(%ip, ?ip6, %attachment, "attachment released");
        Ok(Released {
            attachment: attachment.to_owned(),
            ip: Some(ip),
            ip6,
            host_veth: Some(host_veth),
        })
    }

    /// Releases every attachment of a network that is not in `keep` (CNI GC).
    pub fn gc(
        &mut self,
        dp: &mut Datapath,
        req: &GcRequest,
    ) -> Result<Vec<Released>, EndpointError> {
        let stale: BTreeSet<String> = self
            .ipam
            .as_ref()
            .map(|i| {
                i.allocations()
                    .values()
                    .filter(|a| a.network == req.network)
                    .filter_map(|a| a.attachment.clone())
                    .filter(|a| !req.keep.contains(a))
                    .collect()
            })
            .unwrap_or_default();
        stale.iter().map(|a| self.release(dp, a)).collect()
    }

    /// Address usage per network, family (that has a subnet here) and half.
    pub fn usage(&self, me: Option<&AgentInfo>) -> Vec<IpamUsage> {
        let (Some(ipam), Some(me)) = (&self.ipam, me) else {
            return vec![];
        };
        me.overlays
            .iter()
            .flat_map(|o| {
                let net = o.info.name.as_str();
                o.subnet
                    .map(IpNetwork::V4)
                    .into_iter()
                    .chain(o.subnet6.map(IpNetwork::V6))
                    .map(move |s| (net, s))
            })
            .flat_map(|(net, subnet)| ipam.usage(net, subnet))
            .collect()
    }

    /// After a restart: give every endpoint whose veth still exists this binary's program (the
    /// pinned link is reused, so the swap is atomic), and forget endpoints whose veth is gone.
    pub fn restore(&mut self, dp: &mut Datapath) -> anyhow::Result<()> {
        let mut seen: BTreeMap<u32, bool> = BTreeMap::new();
        for (ip, e) in container_endpoints(dp)? {
            let key = link_key(e.ifindex);
            let alive = match seen.get(&e.ifindex) {
                Some(alive) => *alive,
                None => {
                    let alive = match netdev::name_of(e.ifindex) {
                        Some(name) => {
                            netdev::refuse_router_messages(&name)?;
                            dp.attach_keyed(&name, programs::FROM_CONTAINER, &key)?;
                            true
                        }
                        None => false,
                    };
                    seen.insert(e.ifindex, alive);
                    alive
                }
            };
            if alive {
                tracing::info!(%ip, "endpoint kept across restart");
            } else {
                tracing::info!(%ip, "veth of endpoint is gone: removing it");
                dp.maps_mut().remove_endpoint(ip)?;
                dp.detach(programs::FROM_CONTAINER, &key)?;
            }
        }
        Ok(())
    }
}

/// The entries a container with `addresses` gets: those, and its link-local address when one of
/// them is IPv6.
fn entry_addresses(addresses: &[IpAddr], mac: [u8; 6]) -> Vec<IpAddr> {
    let mut all = addresses.to_vec();
    if addresses.iter().any(IpAddr::is_ipv6) {
        let ll: Ipv6Addr = overlay_api::subnets::link_local(mac);
        all.push(IpAddr::V6(ll));
    }
    all
}

/// Attaches the container program to the veth and publishes the endpoints (all or none).
fn connect(
    dp: &mut Datapath,
    addresses: &[IpAddr],
    vni: u32,
    req: &AddEndpoint,
    veth: &Veth,
) -> Result<(), EndpointError> {
    let veth = veth.link()?;
    let key = link_key(veth.ifindex);
    dp.attach_keyed(&veth.name, programs::FROM_CONTAINER, &key)?;
    let ep = Endpoint::container(veth.ifindex, vni, req.container_mac.0, veth.mac);
    let mut put = vec![];
    for ip in entry_addresses(addresses, req.container_mac.0) {
        if let Err(e) = dp.maps_mut().put_endpoint(ip, ep) {
            for p in put {
                let _ = dp.maps_mut().remove_endpoint(p);
            }
            let _ = dp.detach(programs::FROM_CONTAINER, &key);
            return Err(e.into());
        }
        put.push(ip);
    }
    Ok(())
}

/// Map entry first (no more traffic to it), then its program.
pub fn disconnect(dp: &mut Datapath, ip: IpAddr, ifindex: u32) -> anyhow::Result<()> {
    dp.maps_mut().remove_endpoint(ip)?;
    dp.detach(programs::FROM_CONTAINER, &link_key(ifindex))?;
    Ok(())
}

/// Every entry of veth `ifindex` (as `existing` holds them), then its program.
fn disconnect_veth(
    dp: &mut Datapath,
    existing: &BTreeMap<IpAddr, Endpoint>,
    ifindex: u32,
) -> anyhow::Result<()> {
    for ip in on_veth(existing, ifindex) {
        dp.maps_mut().remove_endpoint(ip)?;
    }
    dp.detach(programs::FROM_CONTAINER, &link_key(ifindex))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_addresses_must_be_usable_hosts_of_the_agent_subnet() {
        let subnet: IpNetwork = "9.0.1.0/24".parse().unwrap();
        assert!(ipam::half_of("9.0.1.2".parse().unwrap(), subnet).is_ok());
        assert!(ipam::half_of("9.0.1.130".parse().unwrap(), subnet).is_ok());
        for bad in [
            "9.0.2.2",
            "9.0.1.0",
            "9.0.1.1",
            "9.0.1.127",
            "9.0.1.128",
            "9.0.1.129",
            "9.0.1.255",
        ] {
            assert!(
                ipam::half_of(bad.parse().unwrap(), subnet).is_err(),
                "{bad} accepted"
            );
        }
    }
}
