//! This agent's containers as the datapath sees them: add, remove, release, GC and restore,
//! given the datapath and this agent's allocation. The endpoint map is the source of truth
//! across restarts; the IPAM keeps the addresses (and the endpoints parked while their network
//! is disabled).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use anyhow::anyhow;
use ipnetwork::Ipv4Network;
use overlay_api::{
    AgentInfo, MacAddr,
    agent::{AddEndpoint, EndpointInfo, GcRequest, Half, IpamUsage, Released},
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
    /// This agent's subnet of `network`, if it has one.
    pub fn subnet_of(&self, network: &str) -> Option<Ipv4Network> {
        self.me?
            .overlays
            .iter()
            .find(|o| o.info.name == network)?
            .subnet
    }

    /// The half of this agent's subnet of `network` that holds `ip`.
    fn half_containing(&self, network: &str, ip: Ipv4Addr) -> Option<Ipv4Network> {
        ipam::halves(self.subnet_of(network)?)
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

fn v4_keys<V>(m: &BTreeMap<IpAddr, V>) -> BTreeSet<Ipv4Addr> {
    m.keys()
        .filter_map(|k| match k {
            IpAddr::V4(ip) => Some(*ip),
            IpAddr::V6(_) => None,
        })
        .collect()
}

/// This agent's containers: their addresses (the IPAM) and parked endpoints.
#[derive(Default)]
pub struct Endpoints {
    /// Container addresses (absent: callers must give every endpoint's address).
    ipam: Option<Ipam>,
    /// Parked endpoints (disabled networks) when there is no IPAM to keep them in.
    parked_in_memory: BTreeMap<Ipv4Addr, ParkedEndpoint>,
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
    pub fn parked(&self) -> BTreeMap<Ipv4Addr, ParkedEndpoint> {
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
        ip: Ipv4Addr,
        endpoint: ParkedEndpoint,
    ) -> anyhow::Result<()> {
        match &mut self.ipam {
            Some(ipam) => ipam.park(ip, endpoint)?,
            None => {
                self.parked_in_memory.insert(ip, endpoint);
            }
        }
        dp.maps_mut().remove_endpoint(IpAddr::V4(ip))
    }

    fn unpark(&mut self, ip: Ipv4Addr) -> anyhow::Result<Option<ParkedEndpoint>> {
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
        ip: Ipv4Addr,
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
                    IpAddr::V4(ip),
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
        ip: Ipv4Addr,
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

    /// Local endpoints per network name (parked ones included): what the master is told, so
    /// that it refuses to remove or disable a network still in use without force.
    pub fn counts(
        &self,
        dp: &Datapath,
        names: &BTreeMap<u32, String>,
    ) -> anyhow::Result<BTreeMap<String, u32>> {
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        let parked = self.parked();
        let vnis = container_endpoints(dp)?
            .into_values()
            .map(|e| e.network)
            .chain(parked.values().map(|p| p.vni));
        for vni in vnis {
            let name = names
                .get(&vni)
                .cloned()
                .unwrap_or_else(|| format!("vni-{vni}"));
            *counts.entry(name).or_default() += 1;
        }
        Ok(counts)
    }

    /// Local endpoints, from the pinned map (the source of truth across restarts).
    pub fn list(&self, dp: &Datapath, alloc: Allocation) -> anyhow::Result<Vec<EndpointInfo>> {
        let mut out = vec![];
        for (ip, e) in container_endpoints(dp)? {
            let IpAddr::V4(ip) = ip else { continue };
            let network = alloc.names.get(&e.network).cloned().unwrap_or_default();
            let range = alloc.half_containing(&network, ip);
            out.push(EndpointInfo {
                network_id: e.network,
                ip,
                host_veth: netdev::name_of(e.ifindex).unwrap_or_default(),
                ifindex: e.ifindex,
                container_mac: MacAddr(e.mac),
                gateway_mac: MacAddr(e.gateway_mac),
                subnet: range,
                gateway: range.map(ipam::gateway_of),
                attachment: self
                    .ipam
                    .as_ref()
                    .and_then(|i| i.get(ip))
                    .and_then(|a| a.attachment.clone()),
                network,
            });
        }
        Ok(out)
    }

    fn info(&self, dp: &Datapath, alloc: Allocation, ip: Ipv4Addr) -> anyhow::Result<EndpointInfo> {
        self.list(dp, alloc)?
            .into_iter()
            .find(|e| e.ip == ip)
            .ok_or_else(|| anyhow!("endpoint {ip} vanished"))
    }

    /// Connects a container: validates the request against this agent's allocation, takes its
    /// address (the requested one, or the next free one of the requested half from the IPAM),
    /// attaches the container program to its veth, then publishes the endpoint. On failure
    /// nothing is left behind (an address allocated here is released). Adding an attachment
    /// that already has an endpoint returns it (re-wired if its veth changed).
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
        let subnet = ov.subnet.ok_or_else(|| {
            EndpointError::Invalid(format!(
                "network {:?}: this agent has no subnet (allocation failed)",
                req.network
            ))
        })?;
        if let Some(ip) = req.ip {
            ipam::half_of(ip, subnet).map_err(EndpointError::Invalid)?;
        }
        let existing = dp.maps().endpoints()?;
        let same_endpoint = |ip: Ipv4Addr| {
            existing
                .get(&IpAddr::V4(ip))
                .is_some_and(|e| e.mac == req.container_mac.0 && Some(e.ifindex) == veth.ifindex())
        };
        // The same attachment again: its address, its endpoint if still wired the same way.
        let mut reused = None;
        if let (Some(att), Some(ipam)) = (&req.attachment, &self.ipam)
            && let Some((ip, a)) = ipam.find_attachment(att)
        {
            if a.network != req.network || req.ip.is_some_and(|r| r != ip) {
                return Err(EndpointError::Conflict(format!(
                    "attachment {att} already has address {ip} on network {}",
                    a.network
                )));
            }
            if same_endpoint(ip) {
                return Ok(self.info(dp, alloc, ip)?);
            }
            if let Some(e) = existing.get(&IpAddr::V4(ip)) {
                tracing::info!(%ip, attachment = %att, "re-wiring the endpoint of an attachment");
                disconnect(dp, ip, e.ifindex)?;
            }
            reused = Some(ip);
        }
        let (ip, allocated) = match reused {
            Some(ip) => (ip, false),
            None => {
                if let Some(ip) = req.ip
                    && existing.contains_key(&IpAddr::V4(ip))
                {
                    if same_endpoint(ip) {
                        return Ok(self.info(dp, alloc, ip)?);
                    }
                    return Err(EndpointError::Conflict(format!(
                        "address {ip} is already used by another endpoint"
                    )));
                }
                match &mut self.ipam {
                    Some(ipam) => {
                        let ip = ipam.allocate(
                            &req.network,
                            subnet,
                            req.half,
                            req.ip,
                            req.attachment.as_deref(),
                            &req.host_veth,
                            &v4_keys(&existing),
                        )?;
                        (ip, true)
                    }
                    None => (
                        req.ip.ok_or_else(|| {
                            EndpointError::Invalid("this agent has no IPAM: give an ip".into())
                        })?,
                        false,
                    ),
                }
            }
        };
        if let Err(e) = connect(dp, ip, vni, req, veth) {
            if allocated && let Some(ipam) = &mut self.ipam {
                let _ = ipam.release(ip);
            }
            return Err(e);
        }
        if let Some(ipam) = &mut self.ipam {
            ipam.set_host_veth(ip, &req.host_veth)?;
        }
        tracing::info!(%ip, veth = %req.host_veth, network = %req.network, vni, "endpoint added");
        Ok(self.info(dp, alloc, ip)?)
    }

    /// Disconnects a container and frees its address.
    pub fn remove(&mut self, dp: &mut Datapath, ip: Ipv4Addr) -> Result<(), EndpointError> {
        let existing = dp.maps().endpoints()?;
        let allocated = self.ipam.as_ref().is_some_and(|i| i.get(ip).is_some());
        let parked = self.parked().get(&ip).copied();
        match (existing.get(&IpAddr::V4(ip)), parked) {
            (Some(e), _) => {
                disconnect(dp, ip, e.ifindex)?;
                if parked.is_some() {
                    self.unpark(ip)?;
                }
            }
            (None, Some(p)) => {
                dp.detach(programs::FROM_CONTAINER, &link_key(p.ifindex))?;
                self.unpark(ip)?;
            }
            (None, None) if allocated => {}
            (None, None) => {
                return Err(EndpointError::NotFound(format!(
                    "no endpoint with address {ip}"
                )));
            }
        }
        if let Some(ipam) = &mut self.ipam {
            ipam.release(ip)?;
        }
        tracing::info!(%ip, "endpoint removed");
        Ok(())
    }

    /// Disconnects an endpoint whose network is gone (as the plan found it: no second read of
    /// the map) and frees its address.
    pub fn remove_orphan(
        &mut self,
        dp: &mut Datapath,
        ip: Ipv4Addr,
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
    /// or the next free one of `half`. Persisted before it returns.
    pub fn reserve_address(
        &mut self,
        dp: &Datapath,
        alloc: Allocation,
        network: &str,
        half: Half,
        requested: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, EndpointError> {
        let subnet = alloc.subnet_of(network).ok_or_else(|| {
            EndpointError::Invalid(format!("network {network:?} has no subnet on this agent"))
        })?;
        let taken = v4_keys(&dp.maps().endpoints()?);
        let ipam = self
            .ipam
            .as_mut()
            .ok_or_else(|| EndpointError::Invalid("this agent has no IPAM".into()))?;
        Ok(ipam.allocate(network, subnet, half, requested, None, "", &taken)?)
    }

    /// Names the attachment of a reserved address (Docker's CreateEndpoint).
    pub fn set_attachment(&mut self, ip: Ipv4Addr, attachment: &str) -> anyhow::Result<()> {
        match &mut self.ipam {
            Some(ipam) => ipam.set_attachment(ip, attachment),
            None => Ok(()),
        }
    }

    /// Disconnects an endpoint (map entry, program) but keeps its address (Docker's Leave).
    pub fn unwire(&mut self, dp: &mut Datapath, ip: Ipv4Addr) -> anyhow::Result<()> {
        if let Some(e) = dp.maps().endpoints()?.get(&IpAddr::V4(ip)) {
            disconnect(dp, ip, e.ifindex)?;
        }
        Ok(())
    }

    /// Releases an attachment: its endpoint and its address. Unknown attachments release
    /// nothing (DEL is idempotent).
    pub fn release(
        &mut self,
        dp: &mut Datapath,
        attachment: &str,
    ) -> Result<Released, EndpointError> {
        let found = self
            .ipam
            .as_ref()
            .and_then(|i| i.find_attachment(attachment))
            .map(|(ip, a)| (ip, a.host_veth.clone()));
        let Some((ip, host_veth)) = found else {
            return Ok(Released {
                attachment: attachment.to_owned(),
                ip: None,
                host_veth: None,
            });
        };
        self.remove(dp, ip)?;
        tracing::info!(%ip, %attachment, "attachment released");
        Ok(Released {
            attachment: attachment.to_owned(),
            ip: Some(ip),
            host_veth: Some(host_veth),
        })
    }

    /// Releases every attachment of a network that is not in `keep` (CNI GC).
    pub fn gc(
        &mut self,
        dp: &mut Datapath,
        req: &GcRequest,
    ) -> Result<Vec<Released>, EndpointError> {
        let stale: Vec<String> = self
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

    /// Address usage per network (that has a subnet here) and half.
    pub fn usage(&self, me: Option<&AgentInfo>) -> Vec<IpamUsage> {
        let (Some(ipam), Some(me)) = (&self.ipam, me) else {
            return vec![];
        };
        me.overlays
            .iter()
            .filter_map(|o| o.subnet.map(|s| (o.info.name.as_str(), s)))
            .flat_map(|(net, subnet)| ipam.usage(net, subnet))
            .collect()
    }

    /// After a restart: give every endpoint whose veth still exists this binary's program (the
    /// pinned link is reused, so the swap is atomic), and forget endpoints whose veth is gone.
    pub fn restore(&mut self, dp: &mut Datapath) -> anyhow::Result<()> {
        for (ip, e) in container_endpoints(dp)? {
            let key = link_key(e.ifindex);
            match netdev::name_of(e.ifindex) {
                Some(name) => {
                    netdev::refuse_router_messages(&name)?;
                    dp.attach_keyed(&name, programs::FROM_CONTAINER, &key)?;
                    tracing::info!(%ip, veth = %name, "endpoint kept across restart");
                }
                None => {
                    tracing::info!(%ip, "veth of endpoint is gone: removing it");
                    dp.maps_mut().remove_endpoint(ip)?;
                    dp.detach(programs::FROM_CONTAINER, &key)?;
                }
            }
        }
        Ok(())
    }
}

/// Attaches the container program to the veth and publishes the endpoint.
fn connect(
    dp: &mut Datapath,
    ip: Ipv4Addr,
    vni: u32,
    req: &AddEndpoint,
    veth: &Veth,
) -> Result<(), EndpointError> {
    let veth = veth.link()?;
    let key = link_key(veth.ifindex);
    dp.attach_keyed(&veth.name, programs::FROM_CONTAINER, &key)?;
    let ep = Endpoint::container(veth.ifindex, vni, req.container_mac.0, veth.mac);
    if let Err(e) = dp.maps_mut().put_endpoint(IpAddr::V4(ip), ep) {
        let _ = dp.detach(programs::FROM_CONTAINER, &key);
        return Err(e.into());
    }
    Ok(())
}

/// Map entry first (no more traffic to it), then its program.
pub fn disconnect(dp: &mut Datapath, ip: Ipv4Addr, ifindex: u32) -> anyhow::Result<()> {
    dp.maps_mut().remove_endpoint(IpAddr::V4(ip))?;
    dp.detach(programs::FROM_CONTAINER, &link_key(ifindex))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_addresses_must_be_usable_hosts_of_the_agent_subnet() {
        let subnet: Ipv4Network = "9.0.1.0/24".parse().unwrap();
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
