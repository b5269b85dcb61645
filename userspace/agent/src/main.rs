//! `overlay-agent`: started at agent boot. Loads (or takes over) the eBPF datapath and its three
//! programs (from the underlay, from containers, from the host), registers with the master,
//! follows its watch and keeps the maps in step, and serves the local API that the CNI plugin
//! and tools use.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context as _, bail};
use clap::Parser;
use overlay_agent::{
    agent::Agent,
    api,
    cni_conf::CniConfs,
    control_plane,
    datapath::{Datapath, PinLayout},
    desired::{HostLinkFacts, LocalFacts},
    endpoints::Endpoints,
    host_link, identity, masquerade, netdev,
    runtime::{Handle, follow_master, spawn_ipv6_source_watcher, spawn_nat_sweeper},
};
use overlay_api::{MasterClient, agent::DEFAULT_AGENT_SOCKET};
use overlay_common::maps::{HOST_LINK_PEER, programs};

#[derive(Parser, Debug)]
#[command(
    name = "overlay-agent",
    version = overlay_api::build::version(),
    about = "ebpf-overlay agent: the eBPF datapath of one host"
)]
struct Args {
    /// Master base URL (`https://HOST:5055`); repeat for several masters (the first that
    /// answers is used). `http://` only towards a master run with --insecure-http.
    #[arg(long = "master", env = "OVERLAY_MASTER", required = true)]
    masters: Vec<String>,
    /// Cluster CA certificate (PEM) to verify the master with.
    #[arg(long, env = "OVERLAY_CA")]
    ca: Option<PathBuf>,
    /// This agent's client certificate (PEM, IP SAN = its underlay address) and key; without
    /// them the agent uses the ones in its state directory or joins with --join-token.
    #[arg(long, env = "OVERLAY_CERT", requires = "key")]
    cert: Option<PathBuf>,
    #[arg(long, env = "OVERLAY_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Single-use join token (`overlay-master token create`): buys this agent a certificate,
    /// kept in its state directory and renewed before it expires.
    #[arg(long, env = "OVERLAY_JOIN_TOKEN", conflicts_with = "cert")]
    join_token: Option<String>,
    /// `sha256:<hex>` of the cluster CA certificate (what `overlay-master ca init` prints):
    /// the CA the master must present when joining without --ca.
    #[arg(long, env = "OVERLAY_CA_CERT_HASH")]
    ca_cert_hash: Option<String>,
    /// Underlay NIC: VXLAN leaves and arrives here; its address (see --underlay-ip) identifies
    /// this agent.
    #[arg(long, env = "OVERLAY_UNDERLAY_IFACE")]
    underlay_iface: String,
    /// Which address of the underlay NIC identifies this agent and carries VXLAN: `auto` (its
    /// IPv4 address, its global IPv6 address when it has no IPv4), `ipv4`, `ipv6`, or one of
    /// its addresses. An IPv6 underlay sends VXLAN in outer IPv6 (70 bytes of headers instead
    /// of 50) and needs a master run with --ipv6-underlay.
    #[arg(long, env = "OVERLAY_UNDERLAY_IP", default_value = "auto")]
    underlay_ip: netdev::UnderlayChoice,
    /// Name of this agent's pin directory (several agents may share one bpffs in a lab).
    #[arg(long, default_value = "default")]
    instance: String,
    /// bpffs mount point.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Unix socket of the local API (CNI plugin, overlayctl).
    #[arg(long, default_value = DEFAULT_AGENT_SOCKET)]
    api_socket: PathBuf,
    /// Also serve /metrics over TCP here (Prometheus), e.g. 10.0.0.5:9101; nothing listens
    /// on TCP without it. Containers reach the host's addresses: prefer an address they are
    /// not routed to, or filter the port.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Log format on standard error: `text` or `json` (one object per line).
    #[arg(long, env = "OVERLAY_AGENT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Container MTU: the largest inner packet carried (at most the underlay MTU minus 50, or
    /// minus 70 over an IPv6 underlay).
    #[arg(long, default_value_t = 1420)]
    mtu: u32,
    /// Persistent agent state (the IPAM's allocations); default /var/lib/ebpf-overlay/<instance>.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Where to write one CNI config list per network (`NN-<network>.conflist`, for podman,
    /// containerd, CRI), kept in step with the master's state.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Where to write Mesos' single-plugin configs (`<network>.conf`, no cniVersion), for the
    /// Mesos agent's `--network_cni_config_dir`; none when not given.
    #[arg(long)]
    mesos_cni_conf_dir: Option<PathBuf>,
    /// Serve Docker's remote network and IPAM driver on this socket; Docker finds it as
    /// `/run/docker/plugins/<name>.sock` (the driver's name is the file's stem).
    #[arg(long)]
    docker_plugin_socket: Option<PathBuf>,
    /// dockerd's API socket: the agent then creates (or adopts) one Docker network per overlay
    /// network, named like it, and removes them with their network.
    #[arg(long, requires = "docker_plugin_socket")]
    docker_host: Option<PathBuf>,
    /// Remove every pin (detaching the programs) on exit instead of leaving the datapath running
    /// for the next agent to take over.
    #[arg(long)]
    cleanup_on_exit: bool,
    /// Ports for masqueraded flows (MIN-MAX); must not overlap the host's ephemeral ports.
    #[arg(long, default_value = "61000-63999")]
    masquerade_ports: String,
    /// Idle timeouts of masqueraded flows, in seconds: established TCP, TCP after FIN/RST, TCP
    /// that never completed a handshake (a bare ACK, an unanswered SYN), UDP, ICMP.
    #[arg(long, default_value_t = 7440)]
    nat_tcp_timeout: u32,
    #[arg(long, default_value_t = 10)]
    nat_tcp_closing_timeout: u32,
    #[arg(long, default_value_t = 120)]
    nat_tcp_handshake_timeout: u32,
    #[arg(long, default_value_t = 120)]
    nat_udp_timeout: u32,
    #[arg(long, default_value_t = 60)]
    nat_icmp_timeout: u32,
    /// Ports tried for a new flow before it is refused (drop_nat_no_port).
    #[arg(long, default_value_t = 32)]
    nat_max_probes: u32,
    /// Live masqueraded flows one container may have towards one destination (address, port,
    /// protocol), so that it cannot take every port towards one server (drop_nat_quota); 0: no
    /// limit.
    #[arg(long, default_value_t = 1024)]
    nat_max_flows_per_destination: u32,
    /// Let containers reach the master's API. By default they cannot (drop_control_plane): the
    /// master is reachable through masquerade like any outside address.
    #[arg(long)]
    allow_containers_to_master: bool,
    /// An agent control port containers may not reach on any agent's address (PORT, PORT/tcp or
    /// PORT/udp; repeatable). The --metrics-listen port is always one.
    #[arg(long = "protect-agent-port")]
    protect_agent_ports: Vec<String>,
    /// XDP on the underlay NIC, which drops VXLAN the TC program would drop anyway (unknown
    /// VTEP or VNI, malformed, fragments) before the kernel builds an skb: auto (native, except
    /// on veth; none where the driver has no native XDP), native, generic (skb mode), off.
    #[arg(long, default_value = "auto")]
    xdp: overlay_agent::datapath::XdpMode,
    /// Drop monitor (`overlayctl monitor`): events per second each CPU may report while someone
    /// follows; the rest are counted as skipped. Off while nobody follows.
    #[arg(long, default_value_t = 1000)]
    monitor_rate: u32,
    /// Drop monitor: events each CPU may report back to back before the rate applies.
    #[arg(long, default_value_t = 200)]
    monitor_burst: u32,
    /// The device pair new CNI containers get: veth (every kernel) or netkit (kernel 6.7+ with
    /// CONFIG_NETKIT: the program runs as the device's policy, no TC hook or backlog queue). On a
    /// kernel without netkit the agent warns and uses veth (metric overlay_agent_container_device).
    #[arg(long, env = "OVERLAY_CONTAINER_DEVICE", default_value = "veth")]
    container_device: overlay_agent::container_device::ContainerDevice,
    /// Room for the underlay NIC's own link-layer headroom when encapsulating a packet that has
    /// too little (one skb head reallocation instead of two): auto (when the underlay is a bus
    /// device such as virtio_net or a PCI NIC, or a VLAN, bond or team stacked on one), on, off.
    #[arg(long, env = "OVERLAY_SPARE_HEADROOM", default_value = "auto")]
    spare_headroom: netdev::SpareHeadroom,
    /// Mirror each remote VTEP's next hop (route and neighbour, kept resolved as managed
    /// neighbours) into the datapath, so that encapsulated packets skip the kernel's route and
    /// neighbour lookup (IPv4 underlay): true or false (the kernel looks up every packet).
    #[arg(long, env = "OVERLAY_NEXT_HOP_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    next_hop_cache: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Standard error like the master's; colour only for a person at a terminal.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    if let Err(missing) = overlay_agent::preflight::check(&args.bpffs) {
        eprintln!("overlay-agent: {missing}");
        std::process::exit(overlay_agent::preflight::EXIT_PREFLIGHT);
    }
    if !(552..=9000).contains(&args.mtu) {
        bail!("--mtu {}: must be between 552 and 9000", args.mtu);
    }
    if args.mesos_cni_conf_dir.as_ref() == Some(&args.cni_conf_dir) {
        bail!(
            "--mesos-cni-conf-dir must differ from --cni-conf-dir: Mesos reads every file of its directory as one single-plugin config"
        );
    }
    let underlay = netdev::link(&args.underlay_iface).context("--underlay-iface")?;
    let my_ip =
        netdev::underlay_address(&underlay, args.underlay_ip).map_err(anyhow::Error::msg)?;
    overlay_agent::vtep_mtu::check_underlay(args.mtu, underlay.mtu, my_ip.is_ipv6())
        .map_err(anyhow::Error::msg)?;
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/lib/ebpf-overlay").join(&args.instance));
    let tls_options = identity::TlsOptions {
        ca: args.ca.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
        join_token: args.join_token.clone(),
        ca_cert_hash: args.ca_cert_hash.clone(),
    };
    let established = identity::establish(&args.masters, my_ip, &tls_options, &state_dir)
        .await
        .context("--master")?;
    let client: MasterClient = established.client;
    if let Some(renewal) = established.renewal {
        tokio::spawn(renewal.run(client.clone()));
    }

    let pins = PinLayout::new(&args.bpffs, &args.instance)?;
    let mut dp = Datapath::load(pins.clone())?;
    dp.attach(&args.underlay_iface, programs::FROM_UNDERLAY)?;
    match dp.attach_xdp(&args.underlay_iface, args.xdp)? {
        overlay_agent::datapath::XdpAttached::Off(why)
            if args.xdp == overlay_agent::datapath::XdpMode::Auto =>
        {
            tracing::info!(underlay = %args.underlay_iface, "no XDP: {why}; TC makes the early drops")
        }
        attached => {
            tracing::info!(underlay = %args.underlay_iface, ?attached, "XDP on the underlay NIC")
        }
    }
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
    let timeouts = masquerade::NatTimeouts {
        tcp: args.nat_tcp_timeout,
        tcp_closing: args.nat_tcp_closing_timeout,
        tcp_handshake: args.nat_tcp_handshake_timeout,
        udp: args.nat_udp_timeout,
        icmp: args.nat_icmp_timeout,
    };
    let nat = masquerade::nat_config(
        &nat_ports,
        timeouts,
        args.nat_max_probes,
        args.nat_max_flows_per_destination,
        underlay.ipv4_broadcast,
    );
    let masters = control_plane::master_addresses(&args.masters).context("--master")?;
    let mut agent_ports = args
        .protect_agent_ports
        .iter()
        .map(|p| control_plane::parse_agent_port(p).context("--protect-agent-port"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(m) = args.metrics_listen {
        agent_ports.push((m.port(), overlay_common::packet::IPPROTO_TCP));
    }
    let protected = control_plane::protected_destinations(
        &masters,
        args.allow_containers_to_master,
        &agent_ports,
    );
    dp.maps_mut()
        .set_protected(&protected)
        .context("writing the control-plane policy")?;
    tracing::info!(
        ?protected,
        "containers may not reach these control-plane destinations"
    );
    let spare_headroom = args.spare_headroom.applies_to(&underlay.name);
    tracing::info!(
        underlay = %underlay.name,
        mode = ?args.spare_headroom,
        spare_headroom,
        "encapsulation grows packets without headroom by enough for the underlay NIC's own \
         (a bus device) or only for the outer headers (a software link)"
    );
    let local = LocalFacts {
        underlay_ip: my_ip,
        underlay_ifindex: underlay.ifindex,
        mtu: args.mtu,
        underlay_spare_headroom: spare_headroom,
        host_link: Some(HostLinkFacts {
            peer_ifindex: host_link.peer.ifindex,
            host_mac: host_link.host.mac,
        }),
        nat: Some(nat),
    };
    let ipam = overlay_agent::ipam::Ipam::open(&state_dir).context("--state-dir")?;
    let container_device = overlay_agent::container_device::choose(args.container_device)?;
    let cni_confs = CniConfs {
        dir: args.cni_conf_dir.clone(),
        mesos_dir: args.mesos_cni_conf_dir.clone(),
        agent_socket: std::path::absolute(&args.api_socket).unwrap_or(args.api_socket.clone()),
        mtu: args.mtu,
        container_device,
    };
    let agent = Agent::start(
        dp,
        local,
        Endpoints::new(Some(ipam)),
        Some(state_dir.clone()),
        Some(cni_confs),
    )?;
    // From here on one thread owns the datapath; everything else holds a handle.
    let agent = Handle::spawn(agent)?;
    // Docker's driver is served before anything waits on the master: dockerd retries a missing
    // plugin for 15 s a call.
    let docker = match &args.docker_plugin_socket {
        Some(sock) => {
            let driver = Arc::new(overlay_agent::docker::Driver::open(
                agent.clone(),
                &state_dir,
                args.mtu,
            )?);
            overlay_agent::docker::serve(driver.clone(), sock).await?;
            if let Some(host) = &args.docker_host {
                let plugin = sock
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .context("--docker-plugin-socket: no file name")?
                    .to_owned();
                overlay_agent::docker::follow_docker(
                    agent.clone(),
                    driver,
                    host.clone(),
                    plugin,
                    std::time::Duration::from_secs(1),
                );
            }
            Some(sock.clone())
        }
        None => None,
    };
    tracing::info!(
        underlay = %args.underlay_iface, pins = %pins.dir().display(),
        "datapath loaded and attached; existing entries kept"
    );

    if let Some(dir) = args.api_socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&args.api_socket);
    // Root only: created 0600 (umask) so there is no window where others may connect.
    // SAFETY: umask(2) cannot fail; restored right after the bind.
    let umask = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(&args.api_socket);
    unsafe { libc::umask(umask) };
    let listener =
        bound.with_context(|| format!("binding the API socket {}", args.api_socket.display()))?;
    // Root only: the socket adds and removes endpoints on this host's datapath.
    std::fs::set_permissions(
        &args.api_socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .with_context(|| format!("restricting {}", args.api_socket.display()))?;
    tracing::info!(socket = %args.api_socket.display(), "local API listening");
    // The drop monitor and the last minute's drops, off the owner's thread.
    let monitor = overlay_agent::monitor::Monitor::start(
        &pins,
        agent.clone(),
        args.monitor_rate,
        args.monitor_burst,
    )
    .context("starting the drop monitor")?;
    let operator = overlay_agent::monitor::OperatorApi {
        monitor: monitor.clone(),
        recent: overlay_agent::recent_drops::RecentDropsWindow::start(agent.clone()),
    };
    let routes = api::router(agent.clone()).merge(overlay_agent::monitor::router(operator));
    let api = tokio::spawn(axum::serve(listener, routes).into_future());
    if let Some(addr) = args.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics-listen {addr}"))?;
        tokio::spawn(axum::serve(l, api::metrics_router(agent.clone())).into_future());
    }
    let follower = tokio::spawn(follow_master(
        agent.clone(),
        client,
        Some(host_link.clone()),
    ));
    tokio::spawn(overlay_agent::service::notify_ready_when_applied(
        agent.clone(),
    ));
    // Idle masqueraded flows leave the NAT table (the kernel's LRU only evicts when full).
    spawn_nat_sweeper(agent.clone(), &pins, std::time::Duration::from_secs(1))
        .context("starting the NAT sweeper")?;
    // IPv6 masquerade leaves from the underlay NIC's IPv6 address, whenever it has one.
    spawn_ipv6_source_watcher(
        agent.clone(),
        args.underlay_iface.clone(),
        underlay.ifindex,
        std::time::Duration::from_secs(1),
    )
    .context("starting the IPv6 source watcher")?;

    // Encapsulated packets skip the kernel's next-hop lookup where the agent mirrors it.
    if args.next_hop_cache {
        overlay_agent::next_hops::spawn_watcher(agent.clone(), underlay.ifindex)
            .context("starting the next-hop watcher")?;
    } else {
        // An earlier run's entries would be used until they expire.
        agent.tell(|a| a.set_next_hops(Default::default(), 0));
        tracing::info!(
            "--next-hop-cache false: the kernel looks up every encapsulated packet's next hop"
        );
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        r = api => bail!("local API stopped: {r:?}"),
        r = follower => bail!("master follower stopped: {r:?}"),
    }
    // The programs outlive us: nobody will read their drop events.
    monitor.stop();
    let _ = std::fs::remove_file(&args.api_socket);
    if let Some(sock) = &docker {
        let _ = std::fs::remove_file(sock);
    }
    if args.cleanup_on_exit {
        drop(agent);
        pins.remove_all()?;
        host_link::HostLink::remove()?;
        tracing::info!("pins removed, programs detached");
    } else {
        tracing::info!("exiting; pinned maps and links keep the datapath running");
    }
    Ok(())
}
