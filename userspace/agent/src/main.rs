//! `overlay-agent`: loads the datapath on this host and keeps it configured.
//!
//! This first version takes its endpoints from the command line (`--endpoint`); following the
//! master's state and serving the endpoint API for the CNI plugin come next.

use std::{
    net::IpAddr,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use overlay_agent::datapath::{AgentSettings, Datapath, PinLayout};
use overlay_common::maps::{Endpoint, Network, programs};

#[derive(Parser, Debug)]
#[command(
    name = "overlay-agent",
    version,
    about = "ebpf-overlay agent: loads and configures the eBPF datapath"
)]
struct Args {
    /// Underlay NIC: VXLAN leaves and arrives here.
    #[arg(long, env = "OVERLAY_UNDERLAY_IFACE")]
    underlay_iface: String,
    /// Name of this agent's pin directory (several agents may share one bpffs in a lab).
    #[arg(long, default_value = "default")]
    instance: String,
    /// bpffs mount point.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// VXLAN UDP port (DC/OS: 64000).
    #[arg(long, default_value_t = 64000)]
    vxlan_port: u16,
    /// Container MTU: largest inner packet carried.
    #[arg(long, default_value_t = 1420)]
    mtu: u32,
    /// VTEP MAC (default: DC/OS OUI 70:b3:d5 + low 24 bits of the underlay address).
    #[arg(long)]
    vtep_mac: Option<String>,
    /// A local endpoint: HOST_VETH,IP,VNI,CONTAINER_MAC. Repeatable.
    #[arg(long = "endpoint")]
    endpoints: Vec<String>,
    /// Remove every pin (detaching the programs) on exit instead of leaving the datapath running
    /// for the next agent to take over.
    #[arg(long)]
    cleanup_on_exit: bool,
}

fn ip_json(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

struct Link {
    ifindex: u32,
    mac: [u8; 6],
    ipv4: Option<IpAddr>,
}

fn link(ifname: &str) -> anyhow::Result<Link> {
    let v = ip_json(&["-j", "addr", "show", "dev", ifname])
        .with_context(|| format!("interface {ifname} not found"))?;
    let l = &v[0];
    let ifindex = l["ifindex"]
        .as_u64()
        .with_context(|| format!("{ifname}: no ifindex"))? as u32;
    let mac = parse_mac(l["address"].as_str().unwrap_or_default())
        .with_context(|| format!("{ifname}: no MAC address"))?;
    let ipv4 = l["addr_info"].as_array().and_then(|a| {
        a.iter()
            .find(|i| i["family"] == "inet")
            .and_then(|i| i["local"].as_str())
            .and_then(|s| s.parse().ok())
    });
    Ok(Link { ifindex, mac, ipv4 })
}

fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<_> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("bad MAC address {s:?}");
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC address {s:?}"))?;
    }
    Ok(mac)
}

/// `HOST_VETH,IP,VNI,CONTAINER_MAC` -> (veth name, address, endpoint).
fn parse_endpoint(spec: &str) -> anyhow::Result<(String, IpAddr, Endpoint)> {
    let f: Vec<_> = spec.split(',').collect();
    let [veth, ip, vni, mac] = f[..] else {
        bail!("--endpoint {spec:?}: expected HOST_VETH,IP,VNI,CONTAINER_MAC");
    };
    let ip: IpAddr = ip
        .parse()
        .with_context(|| format!("--endpoint {spec:?}: bad IP {ip:?}"))?;
    let vni: u32 = vni
        .parse()
        .with_context(|| format!("--endpoint {spec:?}: bad VNI {vni:?}"))?;
    let mac = parse_mac(mac).with_context(|| format!("--endpoint {spec:?}"))?;
    let host = link(veth).with_context(|| format!("--endpoint {spec:?}"))?;
    Ok((
        veth.to_owned(),
        ip,
        Endpoint {
            ifindex: host.ifindex,
            vni,
            mac,
            gateway_mac: host.mac,
            ..Default::default()
        },
    ))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let underlay = link(&args.underlay_iface)?;
    let underlay_ip = underlay.ipv4.with_context(|| {
        format!(
            "underlay interface {} has no IPv4 address",
            args.underlay_iface
        )
    })?;
    let vtep_mac = match &args.vtep_mac {
        Some(m) => parse_mac(m).context("--vtep-mac")?,
        None => {
            let IpAddr::V4(v4) = underlay_ip else {
                unreachable!("ipv4 above")
            };
            let o = v4.octets();
            [0x70, 0xb3, 0xd5, o[1], o[2], o[3]]
        }
    };
    let endpoints = args
        .endpoints
        .iter()
        .map(|s| parse_endpoint(s))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let pins = PinLayout::new(&args.bpffs, &args.instance)?;
    let mut dp = Datapath::load(pins.clone())?;
    dp.attach(&args.underlay_iface, programs::FROM_UNDERLAY)?;
    dp.maps().set_config(&AgentSettings {
        underlay_ip,
        underlay_ifindex: underlay.ifindex,
        vtep_mac,
        vxlan_port: args.vxlan_port,
        overlay_mtu: args.mtu,
    })?;
    for (veth, ip, ep) in &endpoints {
        dp.attach(veth, programs::FROM_CONTAINER)?;
        dp.maps().put_network(ep.vni, Network::default())?;
        dp.maps().put_endpoint(*ip, *ep)?;
        tracing::info!(%ip, veth, vni = ep.vni, "endpoint ready");
    }
    tracing::info!(
        underlay = %args.underlay_iface, %underlay_ip, pins = %pins.dir().display(),
        "datapath loaded and attached"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    if args.cleanup_on_exit {
        drop(dp);
        pins.remove_all()?;
        tracing::info!("pins removed, programs detached");
    } else {
        tracing::info!("exiting; pinned maps and links keep the datapath running");
    }
    Ok(())
}
