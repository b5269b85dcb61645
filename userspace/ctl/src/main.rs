//! `overlayctl`: the operator's tool for an ebpf-overlay cluster — health of this host's agent
//! and of the master, networks, agents, addresses, endpoints, and the datapath of an agent on
//! this host as its pinned maps hold it. Every command prints text, or `-o json|yaml`.

mod monitor;
mod output;
mod status;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand};
use overlay_api::agent::{DEFAULT_AGENT_SOCKET, LocalClient};
use overlay_api::{MasterClient, OverlayInfo};
use overlay_datapath::{OverlayMaps, PinLayout, from_addr16};
use serde::Serialize;

use output::{Format, or_dash, table};

/// Master and agent defaults, as the daemons' own defaults are.
const DEFAULT_MASTER: &str = "https://127.0.0.1:5055";

#[derive(Parser)]
#[command(
    name = "overlayctl",
    version = overlay_api::build::version(),
    about = "Operate an ebpf-overlay cluster: health, networks, agents, addresses, datapath"
)]
struct Cli {
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Text)]
    output: Format,
    #[command(flatten)]
    master: MasterArgs,
    /// This host's agent API socket (`overlay-agent --api-socket`).
    #[arg(long, global = true, env = "OVERLAY_AGENT_SOCKET", default_value = DEFAULT_AGENT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

/// How to reach the master as an operator.
#[derive(clap::Args)]
struct MasterArgs {
    /// Master base URL(s); the first that answers is used.
    #[arg(long, global = true, env = "OVERLAY_MASTER", default_value = DEFAULT_MASTER)]
    master: Vec<String>,
    /// Cluster CA certificate (PEM) the master's certificate must chain to.
    #[arg(
        long,
        global = true,
        env = "OVERLAY_CA",
        default_value = "/etc/ebpf-overlay/tls/ca.crt"
    )]
    ca: PathBuf,
    /// File with the admin token (`admin.token` of the master's --tls-dir); needed for
    /// changes, and for reads unless the master runs with --anonymous-read.
    #[arg(long, global = true, env = "OVERLAY_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

impl MasterArgs {
    fn client(&self) -> anyhow::Result<MasterClient> {
        if self.master.iter().all(|m| m.starts_with("http://")) {
            return Ok(MasterClient::new(self.master.iter().map(String::as_str))?);
        }
        let tls =
            overlay_api::MasterTls::from_files(&self.ca, None, self.admin_token_file.as_deref())
                .with_context(|| {
                    format!("reading the TLS material (--ca {})", self.ca.display())
                })?;
        Ok(MasterClient::with_tls(
            self.master.iter().map(String::as_str),
            &tls,
        )?)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Health of this host's agent (registered, revision applied vs the master's, programs,
    /// map and NAT fill, address use, drops) and of the master (store, agents, networks).
    /// Exit status 0 when healthy, 1 when not.
    Status {
        /// Only the master (a host without an agent).
        #[arg(long, conflicts_with = "no_master")]
        no_agent: bool,
        /// Only the agent, from its local API and pins.
        #[arg(long)]
        no_master: bool,
    },
    /// The virtual networks.
    Network {
        #[command(subcommand)]
        command: NetworkCmd,
    },
    /// The agents the master knows.
    Agent {
        #[command(subcommand)]
        command: AgentCmd,
    },
    /// Container addresses of this host's agent.
    Ipam {
        #[command(subcommand)]
        command: IpamCmd,
    },
    /// This host's containers: address, network, container id, interface.
    Endpoints,
    /// Follows this host's dropped packets live (the agent's drop monitor): time, agent,
    /// network, reason, addresses and ports, protocol, the container it came from or was for.
    /// Events are rate-limited per CPU in the datapath; what was not reported is said as
    /// "skipped N". Text lines, or one JSON object per line with `-o json`.
    Monitor {
        /// Kind of event; only drops exist today.
        #[arg(long = "type", default_value = "drop", value_parser = ["drop"])]
        kind: String,
        /// Only drops counted under this network (name or id).
        #[arg(long)]
        network: Option<String>,
        /// Only drops of packets this container sent or that were for it.
        #[arg(long)]
        container: Option<String>,
        /// Stop after this many lines (drops and skip reports).
        #[arg(long)]
        count: Option<u64>,
    },
    /// The master's overlay state (DC/OS `/overlay-master/state` JSON).
    State,
    /// A single-use join token for a new agent (`overlay-agent --join-token`).
    JoinToken {
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
        /// Only the agent with this underlay address may use it.
        #[arg(long)]
        ip: Option<IpAddr>,
    },
    /// Same as `agent remove` (kept for scripts).
    #[command(hide = true)]
    DeleteAgents { agents: Vec<IpAddr> },
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
    /// Shell completion script for SHELL, on standard output.
    Completions { shell: clap_complete::Shell },
    /// Man pages: `overlayctl.1` and one per subcommand into DIR (or `overlayctl.1` on
    /// standard output).
    Man {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Every network: VNI, subnets, enabled, masquerade, agents holding a share.
    List,
    /// Adds a network; registered agents get their share at once.
    Add {
        name: String,
        /// IPv4 range of the network (CIDR).
        #[arg(long)]
        subnet: Option<String>,
        /// Prefix length of each agent's IPv4 share.
        #[arg(long)]
        prefix: Option<u8>,
        #[arg(long)]
        subnet6: Option<String>,
        #[arg(long)]
        prefix6: Option<u8>,
        /// A VXLAN network identifier of its own (default: the VNI 1024 every network shares,
        /// as DC/OS; only for clusters without DC/OS kernel agents, which use 1024 alone).
        #[arg(long)]
        vni: Option<u32>,
        /// Leave traffic to outside the overlay to the host's routing.
        #[arg(long)]
        no_masquerade: bool,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Removes a network and frees every agent's share of it.
    Remove {
        name: String,
        /// Even if containers are on it.
        #[arg(long)]
        force: bool,
    },
    Enable {
        name: String,
    },
    /// Disables a network (agents keep their share; containers are parked).
    Disable {
        name: String,
        /// Even if containers are on it.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Every agent: underlay address, VTEP, MAC, its share of each network.
    List,
    /// Forgets agents (frees their subnets) and revokes their certificates.
    Remove {
        agents: Vec<IpAddr>,
        /// Even agents heard from within the heartbeat timeout.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum IpamCmd {
    /// Address use per network and family, with every allocation.
    Show {
        #[arg(long)]
        network: Option<String>,
    },
}

/// An error and all its sources, one after the other ("...: connection refused").
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[derive(Serialize)]
struct NetworkRow {
    name: String,
    /// The network's id (what the datapath's maps and counters say).
    id: Option<u32>,
    /// The VNI its frames carry (1024, shared, unless it has its own).
    vni: u32,
    subnet: Option<String>,
    prefix: Option<u8>,
    subnet6: Option<String>,
    prefix6: Option<u8>,
    enabled: bool,
    masquerade: bool,
    /// Agents holding a share of it.
    agents: usize,
}

async fn network_list(client: &MasterClient, format: Format) -> anyhow::Result<()> {
    let state = client
        .state()
        .await
        .context("fetching the master's state")?;
    let rows: Vec<NetworkRow> = state
        .network
        .overlays
        .iter()
        .map(|o| NetworkRow {
            name: o.name.clone(),
            id: o.id,
            vni: o.wire_vni(),
            subnet: o.subnet.map(|s| s.to_string()),
            prefix: o.prefix,
            subnet6: o.subnet6.map(|s| s.to_string()),
            prefix6: o.prefix6,
            enabled: o.is_enabled(),
            masquerade: o.masquerades(),
            agents: state
                .agents
                .iter()
                .filter(|a| {
                    a.overlays.iter().any(|ao| {
                        ao.info.name == o.name && (ao.subnet.is_some() || ao.subnet6.is_some())
                    })
                })
                .count(),
        })
        .collect();
    format.emit(&rows, |rows| {
        table(
            &[
                "NAME",
                "ID",
                "VNI",
                "SUBNET",
                "PREFIX",
                "SUBNET6",
                "PREFIX6",
                "ENABLED",
                "MASQUERADE",
                "AGENTS",
            ],
            &rows
                .iter()
                .map(|r| {
                    vec![
                        r.name.clone(),
                        or_dash(r.id),
                        r.vni.to_string(),
                        or_dash(r.subnet.as_ref()),
                        or_dash(r.prefix),
                        or_dash(r.subnet6.as_ref()),
                        or_dash(r.prefix6),
                        yes_no(r.enabled),
                        yes_no(r.masquerade),
                        r.agents.to_string(),
                    ]
                })
                .collect::<Vec<_>>(),
        )
    })
}

/// A `--subnet`-like flag's value, naming the flag when it is not a CIDR of its family.
fn parse_cidr<T: std::str::FromStr>(field: &str, text: Option<String>) -> anyhow::Result<Option<T>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    text.map(|t| {
        t.parse()
            .with_context(|| format!("--{field} {t:?}: not a CIDR"))
    })
    .transpose()
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

fn network_text(n: &OverlayInfo) -> String {
    format!(
        "{} id {} vni {} subnet {} prefix {}{} {}",
        n.name,
        or_dash(n.id),
        n.wire_vni(),
        or_dash(n.subnet),
        or_dash(n.prefix),
        n.subnet6
            .map(|s| format!(" subnet6 {s} prefix6 {}", or_dash(n.prefix6)))
            .unwrap_or_default(),
        if n.is_enabled() {
            "enabled"
        } else {
            "disabled"
        }
    )
}

async fn network(client: &MasterClient, command: NetworkCmd, format: Format) -> anyhow::Result<()> {
    match command {
        NetworkCmd::List => network_list(client, format).await,
        NetworkCmd::Add {
            name,
            subnet,
            prefix,
            subnet6,
            prefix6,
            vni,
            no_masquerade,
            disabled,
        } => {
            let network = OverlayInfo {
                name: name.clone(),
                subnet: parse_cidr("subnet", subnet)?,
                prefix,
                subnet6: parse_cidr("subnet6", subnet6)?,
                prefix6,
                enabled: disabled.then_some(false),
                id: None,
                vni,
                masquerade: no_masquerade.then_some(false),
            };
            let added = client
                .add_network(&network)
                .await
                .with_context(|| format!("adding network {name}"))?;
            format.emit(&added, |n| format!("added {}", network_text(n)))
        }
        NetworkCmd::Remove { name, force } => {
            client
                .remove_network_forced(&name, force)
                .await
                .with_context(|| format!("removing network {name}"))?;
            format.emit(&serde_json::json!({ "removed": name }), |_| {
                format!("removed {name}")
            })
        }
        NetworkCmd::Enable { name } => {
            let n = client
                .enable_network(&name)
                .await
                .with_context(|| format!("enabling network {name}"))?;
            format.emit(&n, |n| network_text(n))
        }
        NetworkCmd::Disable { name, force } => {
            let n = client
                .disable_network_forced(&name, force)
                .await
                .with_context(|| format!("disabling network {name}"))?;
            format.emit(&n, |n| network_text(n))
        }
    }
}

#[derive(Serialize)]
struct AgentRow {
    ip: IpAddr,
    vtep_ip: Option<String>,
    vtep_mac: Option<String>,
    /// Network name -> this agent's subnet(s) in it.
    networks: Vec<AgentNetwork>,
    /// Seconds since the master last heard from it (None: not since the master started).
    #[serde(skip_serializing_if = "Option::is_none")]
    last_heartbeat_seconds_ago: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<String>,
}

#[derive(Serialize)]
struct AgentNetwork {
    network: String,
    subnet: Option<String>,
    subnet6: Option<String>,
}

async fn agent_list(client: &MasterClient, format: Format) -> anyhow::Result<()> {
    let state = client
        .state()
        .await
        .context("fetching the master's state")?;
    let liveness: Vec<overlay_api::AgentLiveness> = client
        .get_json("/overlay-master/agents/liveness")
        .await
        .unwrap_or_default();
    let rows: Vec<AgentRow> = state
        .agents
        .iter()
        .map(|a| {
            let (vtep_ip, vtep_mac) = a.vtep_text();
            let live = liveness.iter().find(|l| l.ip == a.ip);
            AgentRow {
                ip: a.ip,
                vtep_ip,
                vtep_mac,
                networks: a
                    .overlays
                    .iter()
                    .map(|o| AgentNetwork {
                        network: o.info.name.clone(),
                        subnet: o.subnet.map(|s| s.to_string()),
                        subnet6: o.subnet6.map(|s| s.to_string()),
                    })
                    .collect(),
                last_heartbeat_seconds_ago: live.and_then(|l| l.last_heartbeat_seconds_ago),
                status: live.map(|l| l.status.clone()),
            }
        })
        .collect();
    format.emit(&rows, |rows| {
        table(
            &[
                "AGENT",
                "STATUS",
                "LAST HEARTBEAT",
                "VTEP",
                "VTEP MAC",
                "SUBNETS",
            ],
            &rows
                .iter()
                .map(|r| {
                    vec![
                        r.ip.to_string(),
                        or_dash(r.status.as_ref()),
                        or_dash(r.last_heartbeat_seconds_ago.map(|s| format!("{s:.0}s ago"))),
                        or_dash(r.vtep_ip.as_ref()),
                        or_dash(r.vtep_mac.as_ref()),
                        r.networks
                            .iter()
                            .map(|n| {
                                let subnets: Vec<&str> =
                                    [n.subnet.as_deref(), n.subnet6.as_deref()]
                                        .into_iter()
                                        .flatten()
                                        .collect();
                                format!(
                                    "{}={}",
                                    n.network,
                                    if subnets.is_empty() {
                                        "-".to_owned()
                                    } else {
                                        subnets.join(",")
                                    }
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(" "),
                    ]
                })
                .collect::<Vec<_>>(),
        )
    })
}

async fn agent_remove(
    client: &MasterClient,
    agents: &[IpAddr],
    force: bool,
    format: Format,
) -> anyhow::Result<()> {
    if agents.is_empty() {
        anyhow::bail!("name the agents to remove (underlay addresses)");
    }
    let deleted = client
        .delete_agents_forced(agents, force)
        .await
        .context("removing agents")?;
    /// What `agent remove -o json` prints: the agents that existed and were removed.
    #[derive(Serialize)]
    struct Removed {
        deleted: Vec<IpAddr>,
    }
    format.emit(&Removed { deleted }, |d| {
        if d.deleted.is_empty() {
            "no such agents\n".to_owned()
        } else {
            d.deleted
                .iter()
                .map(|ip| format!("removed {ip}\n"))
                .collect()
        }
    })
}

fn ipam_show(socket: &Path, network: Option<&str>, format: Format) -> anyhow::Result<()> {
    let client = LocalClient::new(socket);
    let mut usage = client.ipam().map_err(|e| anyhow::anyhow!(chain(&e)))?;
    if let Some(network) = network {
        let known: Vec<String> = usage.iter().map(|u| u.network.clone()).collect();
        usage.retain(|u| u.network == network);
        if usage.is_empty() {
            anyhow::bail!(
                "--network {network}: this agent has no addresses in it (it has: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            );
        }
    }
    format.emit(&usage, |usage| {
        let mut out = table(
            &["NETWORK", "FAMILY", "HALF", "RANGE", "USED", "FREE"],
            &usage
                .iter()
                .map(|u| {
                    vec![
                        u.network.clone(),
                        u.family.name().into(),
                        u.half.name().to_owned(),
                        u.range.to_string(),
                        u.used.to_string(),
                        u.free.to_string(),
                    ]
                })
                .collect::<Vec<_>>(),
        );
        let allocations: Vec<Vec<String>> = usage
            .iter()
            .flat_map(|u| {
                u.allocations.iter().map(|a| {
                    vec![
                        a.ip.to_string(),
                        u.network.clone(),
                        or_dash(a.attachment.as_ref()),
                        a.host_veth.clone(),
                    ]
                })
            })
            .collect();
        if !allocations.is_empty() {
            out.push('\n');
            out.push_str(&table(
                &["ADDRESS", "NETWORK", "CONTAINER", "INTERFACE"],
                &allocations,
            ));
        }
        out
    })
}

fn endpoints(socket: &Path, format: Format) -> anyhow::Result<()> {
    let client = LocalClient::new(socket);
    let endpoints = client.endpoints().map_err(|e| anyhow::anyhow!(chain(&e)))?;
    format.emit(&endpoints, |eps| {
        table(
            &[
                "ADDRESS",
                "IPV6",
                "NETWORK",
                "CONTAINER",
                "INTERFACE",
                "MAC",
            ],
            &eps.iter()
                .map(|e| {
                    // A dual-stack endpoint shows both; an IPv6-only one its IPv6 address first.
                    vec![
                        e.ip.to_string(),
                        or_dash(e.ip6.as_ref()),
                        e.network.clone(),
                        or_dash(e.attachment.as_ref()),
                        e.host_veth.clone(),
                        e.container_mac.to_string(),
                    ]
                })
                .collect::<Vec<_>>(),
        )
    })
}

/// Network names by network id, as the local agent knows them (its API), for the datapath view
/// (not by VNI: networks share one).
fn local_network_names(socket: &Path) -> std::collections::BTreeMap<u32, String> {
    LocalClient::new(socket)
        .overlay()
        .map(|a| {
            a.overlays
                .iter()
                .filter_map(|o| Some((o.info.id?, o.info.name.clone())))
                .collect()
        })
        .unwrap_or_default()
}

fn man_pages(dir: Option<&Path>) -> anyhow::Result<()> {
    let command = Cli::command();
    let Some(dir) = dir else {
        clap_mangen::Man::new(command).render(&mut std::io::stdout())?;
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, cmd: clap::Command| -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        clap_mangen::Man::new(cmd).render(&mut file)?;
        Ok(())
    };
    write("overlayctl", command.clone())?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("overlayctl-{}", sub.get_name());
        // clap names are 'static; these few strings live as long as the process anyway.
        let leaked: &'static str = Box::leak(name.clone().into_boxed_str());
        write(&name, sub.clone().name(leaked))?;
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let format = cli.output;
    match cli.command {
        Cmd::Status {
            no_agent,
            no_master,
        } => {
            let client = if no_master {
                None
            } else {
                Some(cli.master.client()?)
            };
            let socket = (!no_agent).then_some(cli.socket.as_path());
            let status = status::collect(socket, client.as_ref()).await;
            format.emit(&status, status::render)?;
            return Ok(if status.healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        Cmd::Network { command } => network(&cli.master.client()?, command, format).await?,
        Cmd::Agent {
            command: AgentCmd::List,
        } => agent_list(&cli.master.client()?, format).await?,
        Cmd::Agent {
            command: AgentCmd::Remove { agents, force },
        } => agent_remove(&cli.master.client()?, &agents, force, format).await?,
        Cmd::DeleteAgents { agents } => {
            agent_remove(&cli.master.client()?, &agents, false, format).await?
        }
        Cmd::Ipam {
            command: IpamCmd::Show { network },
        } => ipam_show(&cli.socket, network.as_deref(), format)?,
        Cmd::Endpoints => endpoints(&cli.socket, format)?,
        Cmd::Monitor {
            kind,
            network,
            container,
            count,
        } => {
            let filter = overlay_api::monitor::MonitorFilter {
                kind: Some(kind),
                network,
                container,
            };
            monitor::follow(&cli.socket, &filter, count, format)?
        }
        Cmd::JoinToken { ttl_seconds, ip } => {
            let request = overlay_api::tls::wire::TokenRequest {
                ttl_seconds: Some(ttl_seconds),
                ip,
            };
            let token = cli
                .master
                .client()?
                .create_join_token(&request)
                .await
                .context("creating a join token")?;
            format.emit(&token, |t| t.token.clone())?;
        }
        Cmd::State => {
            let state = cli
                .master
                .client()?
                .state()
                .await
                .context("fetching the master's state")?;
            // The DC/OS shape is the point of this command: JSON unless YAML is asked for.
            match format {
                Format::Yaml => format.emit(&state, |_| String::new())?,
                _ => println!("{}", serde_json::to_string_pretty(&state)?),
            }
        }
        Cmd::Datapath { instance, bpffs } => {
            let names = local_network_names(&cli.socket);
            show_datapath(&instance, &bpffs, &names)?
        }
        Cmd::Cleanup {
            instance,
            bpffs,
            cni_conf_dir,
            keep_host_link,
        } => cleanup(instance, bpffs, cni_conf_dir, !keep_host_link)?,
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "overlayctl",
                &mut std::io::stdout(),
            );
        }
        Cmd::Man { dir } => man_pages(dir.as_deref())?,
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("overlayctl: starting the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            // `{:#}` walks the whole chain: the root cause ("connection refused") shows.
            eprintln!("overlayctl: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn show_datapath(
    instance: &str,
    bpffs: &std::path::Path,
    names: &std::collections::BTreeMap<u32, String>,
) -> anyhow::Result<()> {
    let net = |id: u32| format!("{} (id {id})", status::network_name(names, id));
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
    for (id, n) in maps.networks()? {
        println!("  {:<24} flags {:#x}", net(id), n.flags);
    }
    println!("VNIs accepted:");
    for (vni, v) in maps.vnis()? {
        let carries = match v.network {
            overlay_common::counters::NO_NETWORK => "several networks".to_owned(),
            id => net(id),
        };
        println!("  vni {vni:<8} carries {carries}");
    }
    println!("endpoints:");
    for (ip, e) in maps.endpoints()? {
        println!(
            "  {ip:<18} {:<24} ifindex {:>4}  mac {}  gateway {}",
            net(e.network),
            e.ifindex,
            mac(&e.mac),
            mac(&e.gateway_mac)
        );
    }
    println!("remote subnets:");
    for (subnet, r) in maps.routes()? {
        let via = from_addr16(&r.underlay_ip);
        println!(
            "  {subnet:<18} {:<24} via {via}  vtep mac {}  vni {}",
            net(r.network),
            mac(&r.vtep_mac),
            r.vni
        );
    }
    println!("overlay subnets:");
    for (subnet, s) in maps.subnets()? {
        println!("  {subnet:<18} {}", net(s.network));
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
    let source6 = if nat.has_ipv6_source() {
        std::net::Ipv6Addr::from(nat.underlay_ip6).to_string()
    } else {
        "none (the underlay NIC has no global IPv6 address: IPv6 to the outside is dropped)"
            .to_owned()
    };
    println!("  IPv6 source: {source6}");
    for (k, e) in flows
        .iter()
        .filter(|(k, _)| k.direction == overlay_common::maps::nat_direction::EGRESS)
        .take(20)
    {
        // Socket address notation: IPv6 flows print as [addr]:port.
        let at = |a: &[u8; 16], port: u16| std::net::SocketAddr::new(from_addr16(a), port);
        println!(
            "  proto {:>2}  {} -> {}  as {}",
            k.protocol,
            at(&k.local, k.local_port),
            at(&k.remote, k.remote_port),
            at(&e.addr, e.port)
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
            "  {:<24} {:<22} {:>12} packets {:>14} bytes",
            net(r.network),
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
    if removed.neighbours > 0 {
        println!(
            "removed {} managed neighbour entries of the next-hop cache",
            removed.neighbours
        );
    }
    for conf in &removed.cni_confs {
        println!("removed CNI config {}", conf.display());
    }
    if removed.pin_dirs.is_empty()
        && !removed.host_link
        && removed.neighbours == 0
        && removed.cni_confs.is_empty()
    {
        println!("nothing to remove");
    }
    Ok(())
}
