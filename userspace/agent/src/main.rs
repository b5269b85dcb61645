//! `overlay-agent`: started at agent boot. Loads (or takes over) the eBPF datapath, registers
//! with the master, follows its watch and keeps the maps in step, and serves the local API that
//! the CNI plugin and tools use.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use overlay_agent::{
    api,
    datapath::{Datapath, PinLayout},
    host_link, masquerade, netdev,
    runtime::{Core, follow_master},
};
use overlay_api::{MasterClient, agent::DEFAULT_AGENT_SOCKET};
use overlay_common::maps::{HOST_LINK_PEER, programs};

#[derive(Parser, Debug)]
#[command(
    name = "overlay-agent",
    version,
    about = "ebpf-overlay agent: the eBPF datapath of one host"
)]
struct Args {
    /// Master base URL; repeat for several masters (the first that answers is used).
    #[arg(long = "master", env = "OVERLAY_MASTER", required = true)]
    masters: Vec<String>,
    /// Underlay NIC: VXLAN leaves and arrives here; its IPv4 address identifies this agent.
    #[arg(long, env = "OVERLAY_UNDERLAY_IFACE")]
    underlay_iface: String,
    /// Name of this agent's pin directory (several agents may share one bpffs in a lab).
    #[arg(long, default_value = "default")]
    instance: String,
    /// bpffs mount point.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Unix socket of the local API (CNI plugin, overlayctl).
    #[arg(long, default_value = DEFAULT_AGENT_SOCKET)]
    api_socket: PathBuf,
    /// Also serve /metrics over TCP here (Prometheus), e.g. 0.0.0.0:9101.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Container MTU: the largest inner packet carried (underlay MTU minus 50).
    #[arg(long, default_value_t = 1420)]
    mtu: u32,
    /// Persistent agent state (the IPAM's allocations); default /var/lib/ebpf-overlay/<instance>.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Where to write one CNI config per network (`<network>.conf`), kept in step with the
    /// master's state.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Remove every pin (detaching the programs) on exit instead of leaving the datapath running
    /// for the next agent to take over.
    #[arg(long)]
    cleanup_on_exit: bool,
    /// Ports for masqueraded flows (MIN-MAX); must not overlap the host's ephemeral ports.
    #[arg(long, default_value = "61000-63999")]
    masquerade_ports: String,
    /// Idle timeouts of masqueraded flows, in seconds: TCP, TCP after FIN/RST, UDP, ICMP.
    #[arg(long, default_value_t = 7440)]
    nat_tcp_timeout: u32,
    #[arg(long, default_value_t = 10)]
    nat_tcp_closing_timeout: u32,
    #[arg(long, default_value_t = 120)]
    nat_udp_timeout: u32,
    #[arg(long, default_value_t = 60)]
    nat_icmp_timeout: u32,
    /// Ports tried for a new flow before it is refused (drop_nat_no_port).
    #[arg(long, default_value_t = 32)]
    nat_max_probes: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    if let Err(missing) = overlay_agent::preflight::check(&args.bpffs) {
        eprintln!("overlay-agent: {missing}");
        std::process::exit(overlay_agent::preflight::EXIT_PREFLIGHT);
    }
    if !(552..=9000).contains(&args.mtu) {
        bail!("--mtu {}: must be between 552 and 9000", args.mtu);
    }
    let underlay = netdev::link(&args.underlay_iface).context("--underlay-iface")?;
    if underlay.ipv4.is_none() {
        bail!(
            "underlay interface {} has no IPv4 address",
            args.underlay_iface
        );
    }
    let client = MasterClient::new(args.masters.iter().map(String::as_str)).context("--master")?;

    let pins = PinLayout::new(&args.bpffs, &args.instance)?;
    let mut dp = Datapath::load(pins.clone())?;
    dp.attach(&args.underlay_iface, programs::FROM_UNDERLAY)?;
    // The host's own way into the overlay (health checks, ...), without a VXLAN device.
    let host_link = host_link::HostLink::ensure(args.mtu).context("setting up the host link")?;
    dp.attach(HOST_LINK_PEER, programs::FROM_HOST)?;
    let nat_ports =
        masquerade::parse_port_range(&args.masquerade_ports).context("--masquerade-ports")?;
    masquerade::check_port_range(
        &nat_ports,
        &masquerade::host_ephemeral_ports()?,
        overlay_api::DEFAULT_VXLAN_PORT,
    )?;
    let timeouts = [
        args.nat_tcp_timeout,
        args.nat_tcp_closing_timeout,
        args.nat_udp_timeout,
        args.nat_icmp_timeout,
    ];
    dp.maps().set_nat_config(&masquerade::nat_config(
        &nat_ports,
        timeouts,
        args.nat_max_probes,
    ))?;
    let mut core = Core::new(dp, underlay, args.mtu);
    core.set_host_link(host_link);
    core.restore_endpoints()?;
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/lib/ebpf-overlay").join(&args.instance));
    core.set_ipam(overlay_agent::ipam::Ipam::open(&state_dir).context("--state-dir")?);
    core.set_cni_confs(overlay_agent::ipam::CniConfs {
        dir: args.cni_conf_dir.clone(),
        agent_socket: std::path::absolute(&args.api_socket).unwrap_or(args.api_socket.clone()),
        mtu: args.mtu,
    });
    let core = Arc::new(Mutex::new(core));
    tracing::info!(
        underlay = %args.underlay_iface, pins = %pins.dir().display(),
        "datapath loaded and attached; existing entries kept"
    );

    if let Some(dir) = args.api_socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&args.api_socket);
    let listener = tokio::net::UnixListener::bind(&args.api_socket)
        .with_context(|| format!("binding the API socket {}", args.api_socket.display()))?;
    tracing::info!(socket = %args.api_socket.display(), "local API listening");
    let api = tokio::spawn(axum::serve(listener, api::router(core.clone())).into_future());
    if let Some(addr) = args.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics-listen {addr}"))?;
        tokio::spawn(axum::serve(l, api::metrics_router(core.clone())).into_future());
    }
    let follower = tokio::spawn(follow_master(core.clone(), client));
    tokio::spawn(overlay_agent::service::notify_ready_when_applied(
        core.clone(),
    ));
    // Idle masqueraded flows leave the NAT table (the kernel's LRU only evicts when full).
    let sweeper = core.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Err(e) = sweeper.lock().unwrap().sweep_nat() {
                tracing::warn!("sweeping the NAT table: {e:#}");
            }
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        r = api => bail!("local API stopped: {r:?}"),
        r = follower => bail!("master follower stopped: {r:?}"),
    }
    let _ = std::fs::remove_file(&args.api_socket);
    if args.cleanup_on_exit {
        drop(core);
        pins.remove_all()?;
        host_link::HostLink::remove()?;
        tracing::info!("pins removed, programs detached");
    } else {
        tracing::info!("exiting; pinned maps and links keep the datapath running");
    }
    Ok(())
}
