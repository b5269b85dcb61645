//! Which control-plane destinations containers may not reach (`OVL_PROTECTED`): the master's API
//! (it is reachable through masquerade like any outside address, and a container that can reach
//! it can try everything an agent can) unless the operator allows it, and agents' control ports
//! on every agent's addresses.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use anyhow::{Context as _, bail};
use overlay_common::packet::{IPPROTO_TCP, IPPROTO_UDP};

use crate::datapath::ProtectedDestination;

/// Host and port of a master URL (`http://host[:port][/path]`, `https://...`; IPv6 in brackets).
pub fn url_host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let (rest, default_port) = if let Some(r) = url.strip_prefix("http://") {
        (r, 80)
    } else if let Some(r) = url.strip_prefix("https://") {
        (r, 443)
    } else {
        bail!("master URL {url:?} must start with http:// or https://");
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit('@').next().unwrap_or_default();
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .with_context(|| format!("master URL {url:?}: unclosed '['"))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        bail!("master URL {url:?} has no host");
    }
    let port = match port {
        Some(p) => p
            .parse()
            .with_context(|| format!("master URL {url:?}: bad port {p:?}"))?,
        None => default_port,
    };
    Ok((host.to_owned(), port))
}

/// Every address the masters' URLs resolve to (names through the resolver, as the client does).
pub fn master_addresses(urls: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    let mut out = vec![];
    for url in urls {
        let (host, port) = url_host_port(url)?;
        let found: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => (host.as_str(), port)
                .to_socket_addrs()
                .with_context(|| format!("resolving the master {host:?} of {url:?}"))?
                .collect(),
        };
        out.extend(found);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// `PORT`, `PORT/tcp` or `PORT/udp`: an agent control port.
pub fn parse_agent_port(text: &str) -> anyhow::Result<(u16, u8)> {
    let (port, proto) = text.split_once('/').unwrap_or((text, "tcp"));
    let port: u16 = port
        .trim()
        .parse()
        .with_context(|| format!("{text:?}: expected PORT, PORT/tcp or PORT/udp"))?;
    if port == 0 {
        bail!("{text:?}: port 0");
    }
    let proto = match proto.trim() {
        "tcp" => IPPROTO_TCP,
        "udp" => IPPROTO_UDP,
        other => bail!("{text:?}: protocol {other:?} is neither tcp nor udp"),
    };
    Ok((port, proto))
}

/// What `OVL_PROTECTED` holds: the masters' API addresses (TCP) unless `allow_master`, and
/// every agent's `agent_ports`.
pub fn protected_destinations(
    masters: &[SocketAddr],
    allow_master: bool,
    agent_ports: &[(u16, u8)],
) -> Vec<ProtectedDestination> {
    let mut out: Vec<ProtectedDestination> = vec![];
    if !allow_master {
        out.extend(masters.iter().map(|m| ProtectedDestination {
            addr: Some(m.ip()),
            port: m.port(),
            protocol: IPPROTO_TCP,
        }));
    }
    out.extend(
        agent_ports
            .iter()
            .map(|&(port, protocol)| ProtectedDestination {
                addr: None,
                port,
                protocol,
            }),
    );
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_urls_give_their_host_and_port() {
        let hp = |u: &str| url_host_port(u).unwrap();
        assert_eq!(hp("http://10.0.0.1:5050"), ("10.0.0.1".into(), 5050));
        assert_eq!(hp("http://10.0.0.1"), ("10.0.0.1".into(), 80));
        assert_eq!(hp("https://master.mesos/x/y"), ("master.mesos".into(), 443));
        assert_eq!(hp("https://[fd00::1]:8443/"), ("fd00::1".into(), 8443));
        assert_eq!(hp("http://u:p@10.0.0.2:81"), ("10.0.0.2".into(), 81));
        assert!(url_host_port("ftp://x").is_err());
        assert!(url_host_port("http://:80").is_err());
        assert!(url_host_port("http://h:port").is_err());
        let addrs = master_addresses(&[
            "http://10.0.0.1:5050/".into(),
            "http://10.0.0.1:5050".into(),
        ])
        .unwrap();
        assert_eq!(addrs, vec!["10.0.0.1:5050".parse().unwrap()]);
    }

    #[test]
    fn agent_ports_and_the_master_make_the_protected_set() {
        assert_eq!(parse_agent_port("9101").unwrap(), (9101, IPPROTO_TCP));
        assert_eq!(parse_agent_port("53/udp").unwrap(), (53, IPPROTO_UDP));
        assert!(parse_agent_port("0").is_err());
        assert!(parse_agent_port("9101/sctp").is_err());
        let m: SocketAddr = "10.0.0.1:5050".parse().unwrap();
        let denied = protected_destinations(&[m], false, &[(9101, IPPROTO_TCP)]);
        assert_eq!(denied.len(), 2);
        assert!(
            denied
                .iter()
                .any(|d| d.addr == Some(m.ip()) && d.port == 5050)
        );
        assert!(denied.iter().any(|d| d.addr.is_none() && d.port == 9101));
        let allowed = protected_destinations(&[m], true, &[(9101, IPPROTO_TCP)]);
        assert_eq!(
            allowed.len(),
            1,
            "the master is allowed, the agent port is not"
        );
    }
}
