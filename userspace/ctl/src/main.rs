//! `overlayctl`: look at an ebpf-overlay cluster — the master's state, and the datapath of an
//! agent on this host as its pinned maps hold it.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use overlay_api::MasterClient;
use overlay_datapath::{OverlayMaps, PinLayout, from_addr16};

#[derive(Parser)]
#[command(
    name = "overlayctl",
    version,
    about = "Inspect an ebpf-overlay cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// How to reach the master as an operator.
#[derive(clap::Args)]
struct MasterArgs {
    /// Master base URL(s); the first that answers is used.
    #[arg(long, env = "OVERLAY_MASTER", default_value = "https://127.0.0.1:5055")]
    master: Vec<String>,
    /// Cluster CA certificate (PEM) the master's certificate must chain to.
    #[arg(
        long,
        env = "OVERLAY_CA",
        default_value = "/etc/ebpf-overlay/tls/ca.crt"
    )]
    ca: PathBuf,
    /// File with the admin token (`admin.token` of the master's --tls-dir); needed for
    /// changes, and for reads unless the master runs with --anonymous-read.
    #[arg(long, env = "OVERLAY_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

impl MasterArgs {
    fn client(&self) -> anyhow::Result<MasterClient> {
        if self.master.iter().all(|m| m.starts_with("http://")) {
            return Ok(MasterClient::new(self.master.iter().map(String::as_str))?);
        }
        let tls =
            overlay_api::MasterTls::from_files(&self.ca, None, self.admin_token_file.as_deref())?;
        Ok(MasterClient::with_tls(
            self.master.iter().map(String::as_str),
            &tls,
        )?)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// The master's overlay state (DC/OS `/overlay-master/state` JSON).
    State {
        #[command(flatten)]
        master: MasterArgs,
    },
    /// A single-use join token for a new agent (`overlay-agent --join-token`).
    JoinToken {
        #[command(flatten)]
        master: MasterArgs,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
        /// Only the agent with this underlay address may use it.
        #[arg(long)]
        ip: Option<std::net::IpAddr>,
    },
    /// Forgets agents (frees their subnets) and revokes their certificates.
    DeleteAgents {
        #[command(flatten)]
        master: MasterArgs,
        agents: Vec<std::net::IpAddr>,
    },
    /// The datapath of an agent on this host: config, networks, endpoints, routes, VTEPs and
    /// counters, read from its pinned maps.
    Datapath {
        #[arg(long, default_value = "default")]
        instance: String,
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
    /// Remove what agents left on this host: pinned maps and links (detaching the programs),
    /// the host link, and the CNI configs the agent generated. Stop the agent first
    /// (`systemctl stop overlay-agent`); package removal runs this.
    Cleanup {
        /// Only this instance's pins (current layout version); default: every instance and
        /// layout version under <bpffs>/ebpf-overlay.
        #[arg(long)]
        instance: Option<String>,
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// Where the agent wrote its CNI configs; only files it marked as generated are removed.
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// Leave the host link (ovl-host) in place.
        #[arg(long)]
        keep_host_link: bool,
    },
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn show_datapath(instance: &str, bpffs: &std::path::Path) -> anyhow::Result<()> {
    let pins = PinLayout::new(bpffs, instance)?;
    let maps = OverlayMaps::open_pinned(&pins)?;
    println!("pins: {}", pins.dir().display());
    match maps.config()? {
        Some(c) => println!(
            "config: underlay ifindex {} vtep mac {} vxlan port {} mtu {}",
            c.underlay_ifindex,
            mac(&c.vtep_mac),
            c.vxlan_port,
            c.overlay_mtu
        ),
        None => println!(
            "config: not written yet (datapath passes host traffic, drops container traffic)"
        ),
    }
    println!("networks:");
    for (vni, n) in maps.networks()? {
        println!("  vni {vni:>8}  flags {:#x}", n.flags);
    }
    println!("endpoints:");
    for (ip, e) in maps.endpoints()? {
        println!(
            "  {ip:<18} vni {:>8}  ifindex {:>4}  mac {}  gateway {}",
            e.vni,
            e.ifindex,
            mac(&e.mac),
            mac(&e.gateway_mac)
        );
    }
    println!("remote subnets:");
    for (net, r) in maps.routes()? {
        let via = from_addr16(&r.underlay_ip);
        println!(
            "  {net:<18} vni {:>8}  via {via}  vtep mac {}",
            r.vni,
            mac(&r.vtep_mac)
        );
    }
    println!("overlay subnets:");
    for (net, s) in maps.subnets()? {
        println!("  {net:<18} vni {:>8}", s.vni);
    }
    println!("known agents (VTEPs):");
    for (ip, v) in maps.vteps()? {
        println!("  {ip:<18} vtep mac {}", mac(&v.vtep_mac));
    }
    let nat = maps.nat_config()?;
    let flows = maps.nat_entries()?;
    println!(
        "masquerade: ports {}-{}, {} tracked flows (timeouts tcp {}s/{}s closing/{}s before the \
         handshake, udp {}s, icmp {}s; at most {} flows per container and destination)",
        nat.port_min,
        nat.port_max,
        flows.len() / 2,
        nat.tcp_timeout_s,
        nat.tcp_closing_timeout_s,
        nat.tcp_handshake_timeout_s,
        nat.udp_timeout_s,
        nat.icmp_timeout_s,
        match nat.max_flows_per_destination {
            0 => "unlimited".to_owned(),
            n => n.to_string(),
        }
    );
    for (k, e) in flows
        .iter()
        .filter(|(k, _)| k.direction == overlay_common::maps::nat_direction::EGRESS)
        .take(20)
    {
        let (local, remote) = (from_addr16(&k.local), from_addr16(&k.remote));
        let via = from_addr16(&e.addr);
        println!(
            "  proto {:>2}  {local}:{} -> {remote}:{}  as {via}:{}",
            k.protocol, k.local_port, k.remote_port, e.port
        );
    }
    println!("closed to containers (control plane):");
    for d in maps.protected()? {
        let proto = if d.protocol == 17 { "udp" } else { "tcp" };
        match d.addr {
            Some(a) => println!("  {a}:{}/{proto}", d.port),
            None => println!("  every agent's address :{}/{proto}", d.port),
        }
    }
    println!("counters:");
    for r in maps.stats()? {
        println!(
            "  vni {:>8}  {:<22} {:>12} packets {:>14} bytes",
            r.vni,
            r.counter.name(),
            r.packets,
            r.bytes
        );
    }
    Ok(())
}

fn cleanup(
    instance: Option<String>,
    bpffs: PathBuf,
    cni_conf_dir: PathBuf,
    host_link: bool,
) -> anyhow::Result<()> {
    let removed = overlay_agent::cleanup::Cleanup {
        bpffs,
        instance,
        cni_conf_dir,
        host_link,
    }
    .run()?;
    for dir in &removed.pin_dirs {
        println!("removed pins {}", dir.display());
    }
    if removed.host_link {
        println!("removed host link {}", overlay_common::maps::HOST_LINK);
    }
    for conf in &removed.cni_confs {
        println!("removed CNI config {}", conf.display());
    }
    if removed.pin_dirs.is_empty() && !removed.host_link && removed.cni_confs.is_empty() {
        println!("nothing to remove");
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::JoinToken {
            master,
            ttl_seconds,
            ip,
        } => {
            let request = overlay_api::tls::wire::TokenRequest {
                ttl_seconds: Some(ttl_seconds),
                ip,
            };
            let token = master
                .client()?
                .create_join_token(&request)
                .await
                .context("creating a join token")?;
            println!("{}", token.token);
        }
        Cmd::DeleteAgents { master, agents } => {
            let deleted = master
                .client()?
                .delete_agents(&agents)
                .await
                .context("deleting agents")?;
            println!("{}", serde_json::to_string(&deleted)?);
        }
        Cmd::State { master } => {
            let client = master.client()?;
            let state = client
                .state()
                .await
                .context("fetching the master's state")?;
            println!("{}", serde_json::to_string_pretty(&state)?);
        }
        Cmd::Datapath { instance, bpffs } => show_datapath(&instance, &bpffs)?,
        Cmd::Cleanup {
            instance,
            bpffs,
            cni_conf_dir,
            keep_host_link,
        } => cleanup(instance, bpffs, cni_conf_dir, !keep_host_link)?,
    }
    Ok(())
}
