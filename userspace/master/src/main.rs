//! `overlay-master --config FILE --listen ADDR (--data-dir DIR | --store etcd://HOST:PORT,...)
//!  (--tls-dir DIR | --insecure-http)`, and `overlay-master ca init | cert issue | token create`
//! for the cluster CA.
//! etcd over TLS and with authentication: `--etcd-cafile`, `--etcd-certfile`, `--etcd-keyfile`,
//! `--etcd-username`, `--etcd-password[-file]`, named as flannel's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use overlay_api::NetworkConfig;
use overlay_master::config;
use overlay_master::master::Master;
use overlay_master::store::Store;
use overlay_master::store::etcd::{EtcdSecurity, EtcdStore};
use overlay_master::store::redb::RedbStore;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(
    version = overlay_api::build::version(),
    about = "Overlay network master: allocates VTEPs and agent subnets, serves DC/OS's /overlay-master API"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// `dcos_overlay_network` object (YAML or JSON, top level or under that key); without it
    /// DC/OS's defaults apply. Re-read on SIGHUP.
    #[arg(long, env = "OVERLAY_MASTER_CONFIG")]
    config: Option<PathBuf>,
    /// Address to serve the API on (HTTPS; agents and operators must reach it, containers
    /// should not: see the README).
    #[arg(long, env = "OVERLAY_MASTER_LISTEN", default_value = "0.0.0.0:5055")]
    listen: SocketAddr,
    /// Cluster CA directory (`ca.crt`, `ca.key`, `admin.token`, join tokens, revocations);
    /// created with a new CA if it holds none. The master serves HTTPS with a certificate it
    /// issues itself from this CA.
    #[arg(long, env = "OVERLAY_MASTER_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// Extra names (DNS or IP) of the master's certificate, besides localhost, 127.0.0.1, ::1
    /// and the --listen address; repeat for several.
    #[arg(
        long = "tls-san",
        env = "OVERLAY_MASTER_TLS_SAN",
        value_delimiter = ','
    )]
    tls_sans: Vec<String>,
    /// File holding the operators' admin token (default: `admin.token` of --tls-dir).
    #[arg(long, env = "OVERLAY_MASTER_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Let unauthenticated clients read the state, watch and metrics (/health always is).
    #[arg(long)]
    anonymous_read: bool,
    /// Lifetime of the agent certificates this master issues (join and renewal).
    #[arg(long, default_value = "24h", value_parser = overlay_master::pki::parse_duration)]
    cert_ttl: std::time::Duration,
    /// Serve plain HTTP without any authentication: anyone who reaches the port can change
    /// the cluster. Labs only.
    #[arg(long, conflicts_with = "tls_dir")]
    insecure_http: bool,
    /// Directory of the embedded state database (created if missing); the default store.
    #[arg(long, env = "OVERLAY_MASTER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Shared store instead of the embedded one: `etcd://host:port,host:port,...` (etcd 3.4+;
    /// a member may be written `https://host:port`; without a scheme it is https when an etcd
    /// CA or client certificate is given). Any number of masters may serve the same etcd
    /// cluster and prefix.
    #[arg(long, env = "OVERLAY_MASTER_STORE", conflicts_with = "data_dir")]
    store: Option<String>,
    /// Key prefix of this overlay cluster in etcd.
    #[arg(long, env = "OVERLAY_MASTER_ETCD_PREFIX", default_value = overlay_master::store::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// Seconds without a heartbeat after which an agent's lease expires and the master deletes
    /// it, freeing its VTEP and subnets (0: never; agents are then only removed on request).
    /// Must exceed --heartbeat-timeout-secs, after which agents are reported stale.
    #[arg(long, env = "OVERLAY_MASTER_AGENT_LEASE_SECS", default_value_t = 0)]
    agent_lease_secs: u64,
    /// Log format on standard error: `text` (coloured only on a terminal) or `json` (one
    /// object per line).
    #[arg(long, env = "OVERLAY_MASTER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Seconds after its last heartbeat an agent may still be running: deleting it sooner
    /// needs `force=true` (agents heartbeat every 30 s).
    #[arg(
        long,
        env = "OVERLAY_MASTER_HEARTBEAT_TIMEOUT_SECS",
        default_value_t = 90
    )]
    heartbeat_timeout_secs: u64,
    /// Seconds a freed VTEP, MAC or subnet is held back before anyone else gets it; keep it
    /// longer than the heartbeat timeout.
    #[arg(
        long,
        env = "OVERLAY_MASTER_ALLOCATION_QUARANTINE_SECS",
        default_value_t = 300
    )]
    allocation_quarantine_secs: u64,
    /// This master's address as agents reach it (repeatable); no network may contain it, nor
    /// the `--listen` address (all of the host's addresses when that is unspecified).
    #[arg(
        long = "advertise-address",
        env = "OVERLAY_MASTER_ADVERTISE_ADDRESS",
        value_delimiter = ','
    )]
    advertise_addresses: Vec<std::net::IpAddr>,
    /// Agents may register with IPv6 underlay addresses (DC/OS's master takes IPv4 only).
    #[arg(long, env = "OVERLAY_MASTER_IPV6_UNDERLAY")]
    ipv6_underlay: bool,
    /// Seeds the store from a DC/OS master's `/overlay-master/state` JSON before serving:
    /// every agent keeps its VTEP, MAC and subnets. Refused (the master does not start) when
    /// the store holds allocations that conflict with the file; a repeated import of the
    /// same file changes nothing.
    #[arg(long, value_name = "FILE")]
    import_dcos_state: Option<PathBuf>,
    /// PEM bundle of the CA that signed the etcd members' certificates (default for https
    /// members: the system's bundle).
    #[arg(long, env = "OVERLAY_MASTER_ETCD_CAFILE", requires = "store")]
    etcd_cafile: Option<PathBuf>,
    /// PEM client certificate for etcd members run with `--client-cert-auth`.
    #[arg(long, env = "OVERLAY_MASTER_ETCD_CERTFILE", requires_all = ["store", "etcd_keyfile"])]
    etcd_certfile: Option<PathBuf>,
    /// PEM private key of `--etcd-certfile`.
    #[arg(long, env = "OVERLAY_MASTER_ETCD_KEYFILE", requires_all = ["store", "etcd_certfile"])]
    etcd_keyfile: Option<PathBuf>,
    /// etcd user, when etcd authentication is enabled (with a password).
    #[arg(long, env = "OVERLAY_MASTER_ETCD_USERNAME", requires = "store")]
    etcd_username: Option<String>,
    /// Password of `--etcd-username`. Prefer the environment variable or
    /// `--etcd-password-file`: command lines are visible to every local user.
    #[arg(
        long,
        env = "OVERLAY_MASTER_ETCD_PASSWORD",
        hide_env_values = true,
        requires = "etcd_username",
        conflicts_with = "etcd_password_file"
    )]
    etcd_password: Option<String>,
    /// File holding the password of `--etcd-username` (one line).
    #[arg(
        long,
        env = "OVERLAY_MASTER_ETCD_PASSWORD_FILE",
        requires = "etcd_username"
    )]
    etcd_password_file: Option<PathBuf>,
}

/// The addresses no network may contain: the advertised ones, and the listen address (every
/// non-loopback address of the host when it listens on all).
fn master_addresses(args: &Args) -> anyhow::Result<Vec<std::net::IpAddr>> {
    let mut addresses = args.advertise_addresses.clone();
    let listen = args.listen.ip();
    if listen.is_unspecified() {
        addresses.extend(
            overlay_master::hostaddr::local_addresses()
                .context("listing the host's addresses (for --listen on all of them)")?
                .into_iter()
                .filter(|ip| !ip.is_loopback()),
        );
    } else {
        addresses.push(listen);
    }
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

impl Args {
    fn etcd_security(&self) -> anyhow::Result<EtcdSecurity> {
        let password = match (&self.etcd_password, &self.etcd_password_file) {
            (Some(password), _) => Some(password.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("--etcd-password-file {}", path.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            ),
            (None, None) => None,
        };
        if self.etcd_username.is_some() && password.is_none() {
            anyhow::bail!("--etcd-username needs --etcd-password or --etcd-password-file");
        }
        Ok(EtcdSecurity {
            ca_file: self.etcd_cafile.clone(),
            cert_file: self.etcd_certfile.clone(),
            key_file: self.etcd_keyfile.clone(),
            username: self.etcd_username.clone(),
            password,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The cluster CA.
    Ca {
        #[command(subcommand)]
        command: CaCmd,
    },
    /// Agent certificates, issued offline from the CA directory.
    Cert {
        #[command(subcommand)]
        command: CertCmd,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCmd,
    },
}

#[derive(Debug, Subcommand)]
enum CaCmd {
    /// Creates the CA and the admin token in DIR; prints the CA's hash for `--ca-cert-hash`.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum CertCmd {
    /// Issues an agent certificate for IP with a new key: `<out>.crt` and `<out>.key` (0600).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        ip: std::net::IpAddr,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "24h", value_parser = overlay_master::pki::parse_duration)]
        ttl: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Creates a single-use join token and prints it.
    Create {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "1h", value_parser = overlay_master::pki::parse_duration)]
        ttl: std::time::Duration,
        /// Only an agent with this underlay address may use it.
        #[arg(long)]
        ip: Option<std::net::IpAddr>,
    },
}

fn run_command(command: Cmd) -> anyhow::Result<()> {
    use overlay_master::pki::{self, ClusterCa};
    match command {
        Cmd::Ca {
            command: CaCmd::Init { dir },
        } => {
            let ca = ClusterCa::init(&dir)?;
            println!("CA created in {}", dir.display());
            println!("admin token: {}", dir.join(pki::ADMIN_TOKEN).display());
            println!("ca-cert-hash: {}", ca.cert_hash());
        }
        Cmd::Cert {
            command: CertCmd::Issue { dir, ip, out, ttl },
        } => {
            let ca = ClusterCa::load(&dir)?;
            let (cert, key, _) = ca.issue_agent_with_key(ip, ttl)?;
            let cert_path = out.with_extension("crt");
            let key_path = out.with_extension("key");
            pki::write_private(&key_path, key.as_bytes())?;
            std::fs::write(&cert_path, cert)
                .with_context(|| format!("writing {}", cert_path.display()))?;
            println!("{}\n{}", cert_path.display(), key_path.display());
        }
        Cmd::Token {
            command: TokenCmd::Create { dir, ttl, ip },
        } => {
            let ca = ClusterCa::load(&dir)?;
            let (token, _) = pki::create_join_token(&dir, ttl, ip)?;
            println!("{token}");
            eprintln!("ca-cert-hash: {}", ca.cert_hash());
        }
    }
    Ok(())
}

fn open_store(args: &Args) -> anyhow::Result<Arc<dyn Store>> {
    match (&args.store, &args.data_dir) {
        (Some(spec), _) => {
            if !["etcd://", "http://", "https://"]
                .iter()
                .any(|scheme| spec.starts_with(scheme))
            {
                anyhow::bail!("--store {spec:?}: only etcd://host:port,... is supported");
            }
            let security = args.etcd_security()?;
            let endpoints =
                overlay_master::store::etcd::parse_endpoints(spec, security.wants_tls())
                    .map_err(|e| anyhow::anyhow!("--store: {e}"))?;
            let store = EtcdStore::open_with(endpoints, &args.etcd_prefix, &security)
                .with_context(|| format!("opening the etcd store {spec}"))?;
            Ok(Arc::new(store))
        }
        (None, Some(dir)) => {
            Ok(Arc::new(RedbStore::open(dir).with_context(|| {
                format!("opening the store in {}", dir.display())
            })?))
        }
        (None, None) => anyhow::bail!("give --data-dir DIR (embedded store) or --store etcd://..."),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        // Colour only for a person at a terminal, never into journald or a file.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    init_logging(args.log_format);
    if let Some(command) = args.command.take() {
        return match run_command(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("overlay-master: {error:#}");
                ExitCode::from(2)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Plain stderr so the reason shows even with logging filtered out.
            eprintln!("overlay-master: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn read_config(path: Option<&PathBuf>) -> anyhow::Result<NetworkConfig> {
    match path {
        Some(path) => Ok(config::load_file(path)?),
        None => Ok(config::dcos_default()),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let file_config = read_config(args.config.as_ref())?;
    // Refuse a broken file before touching the data directory.
    let mut checked = file_config.clone();
    config::assign_network_ids(&mut checked.overlays);
    overlay_master::validate::validate(&checked).with_context(|| match &args.config {
        Some(path) => format!("config file {}", path.display()),
        None => "DC/OS's default configuration".to_owned(),
    })?;
    let heartbeat_timeout = std::time::Duration::from_secs(args.heartbeat_timeout_secs);
    let quarantine = std::time::Duration::from_secs(args.allocation_quarantine_secs);
    if quarantine <= heartbeat_timeout {
        tracing::warn!(
            ?quarantine,
            ?heartbeat_timeout,
            "--allocation-quarantine-secs is not longer than --heartbeat-timeout-secs: a freed \
             allocation may reach a newcomer while its deleted owner still runs"
        );
    }
    let safety = overlay_master::master::SafetySettings {
        heartbeat_timeout,
        quarantine,
        master_addresses: master_addresses(&args)?,
        ipv6_underlay: args.ipv6_underlay,
    };
    if args.tls_dir.is_none() && !args.insecure_http {
        anyhow::bail!(
            "give --tls-dir DIR (HTTPS with the cluster CA in DIR, created if missing) or, in a lab only, --insecure-http"
        );
    }
    let tls = match &args.tls_dir {
        Some(dir) => Some(tls_setup(&args, dir)?),
        None => {
            tracing::warn!(
                "--insecure-http: serving plain HTTP WITHOUT AUTHENTICATION; anyone who reaches {} (containers included) can register agents and change networks",
                args.listen
            );
            None
        }
    };
    let lease = match args.agent_lease_secs {
        0 => None,
        secs if secs <= args.heartbeat_timeout_secs => anyhow::bail!(
            "--agent-lease-secs {secs} must exceed --heartbeat-timeout-secs {}: a lease shorter \
             than the heartbeat timeout would reclaim agents that are alive",
            args.heartbeat_timeout_secs
        ),
        secs => Some(std::time::Duration::from_secs(secs)),
    };
    // Bind before touching the store: a taken port fails here, with the store untouched, and
    // probes get `starting` (503) while the store opens.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let bound = listener.local_addr()?;
    let live: Arc<std::sync::OnceLock<axum::Router>> = Arc::default();
    let front = front_router(Arc::clone(&live));
    let auth = match &tls {
        Some((_, auth)) => Arc::clone(auth),
        None => Arc::new(overlay_master::auth::Auth::insecure()),
    };
    let server = match tls {
        Some((config, _)) => tokio::spawn(async move {
            overlay_master::server::serve_tls(listener, config, front, shutdown_signal())
                .await
                .context("serving HTTPS")
        }),
        None => tokio::spawn(async move {
            axum::serve(listener, front)
                .with_graceful_shutdown(shutdown_signal())
                .await
                .context("serving HTTP")
        }),
    };
    let store = tokio::task::block_in_place(|| open_store(&args))?;
    if let Some(path) = &args.import_dcos_state {
        let report = tokio::task::block_in_place(|| {
            overlay_master::import::import_file(store.as_ref(), path, args.ipv6_underlay)
        })?;
        tracing::info!(
            file = %path.display(),
            imported = report.imported.len(),
            unchanged = report.unchanged.len(),
            skipped = ?report.skipped,
            networks = ?report.networks,
            "DC/OS state imported"
        );
    }
    let master = tokio::task::block_in_place(|| Master::start_with(store, file_config, safety))
        .with_context(|| match &args.config {
            Some(path) => format!("starting with config file {}", path.display()),
            None => "starting with DC/OS's default configuration".to_owned(),
        })?;
    if let Some(path) = &args.config {
        master.set_config_file(path);
    }
    let _ = live.set(overlay_master::api::router(
        Arc::clone(&master),
        Arc::clone(&auth),
    ));
    tracing::info!(listen = %bound, revision = master.revision(), version = overlay_api::build::version(), "overlay master serving");
    // systemd (Type=notify): the store is open and the API listens.
    let _ = overlay_api::sd_notify::notify("READY=1");

    tokio::spawn(reload_on_sighup(Arc::clone(&master), args.config.clone()));
    if let Some(lease) = lease {
        tokio::spawn(reclaim_expired_leases(Arc::clone(&master), auth, lease));
    }
    server.await.context("the server task")??;
    tracing::info!("overlay master stopped");
    Ok(())
}

/// Serves the real API once it is set, the `starting` answers before.
fn front_router(live: Arc<std::sync::OnceLock<axum::Router>>) -> axum::Router {
    use tower_service::Service as _;
    let starting = overlay_master::api::starting_router();
    axum::Router::new().fallback(move |request: axum::extract::Request| {
        let mut router = live.get().cloned().unwrap_or_else(|| starting.clone());
        async move {
            match router.call(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
    })
}

/// Deletes agents whose lease expired (no heartbeat for `lease`) and revokes their
/// certificates, checking a few times per lease.
async fn reclaim_expired_leases(
    master: Arc<Master>,
    auth: Arc<overlay_master::auth::Auth>,
    lease: std::time::Duration,
) {
    let period = (lease / 4).clamp(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(30),
    );
    loop {
        tokio::time::sleep(period).await;
        match master.reclaim_expired(lease).await {
            Ok(reclaimed) if reclaimed.is_empty() => {}
            Ok(reclaimed) => {
                tracing::warn!(agents = ?reclaimed, lease_secs = lease.as_secs(), "agent leases expired: deleted, subnets freed");
                if let Some(revocations) = &auth.revocations
                    && let Err(error) = revocations.revoke_agents(&reclaimed)
                {
                    tracing::error!(%error, "revoking the certificates of reclaimed agents");
                }
            }
            Err(error) => tracing::warn!(%error, "reclaiming expired agent leases"),
        }
    }
}

/// Loads (or creates) the CA, issues the master's certificate, reads the admin token.
fn tls_setup(
    args: &Args,
    dir: &std::path::Path,
) -> anyhow::Result<(rustls::ServerConfig, Arc<overlay_master::auth::Auth>)> {
    use overlay_master::pki::{self, ClusterCa, Revocations};
    let ca = if dir.join(pki::CA_CERT).exists() {
        ClusterCa::load(dir)?
    } else {
        let ca = ClusterCa::init(dir)?;
        tracing::info!(dir = %dir.display(), hash = %ca.cert_hash(), "created a new cluster CA");
        ca
    };
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if !args.listen.ip().is_unspecified() {
        names.push(args.listen.ip().to_string());
    }
    for name in &args.tls_sans {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    let config = overlay_master::server::server_config(&ca, &names)
        .with_context(|| format!("--tls-dir {}", dir.display()))?;
    let token_file = args
        .admin_token_file
        .clone()
        .unwrap_or_else(|| dir.join(pki::ADMIN_TOKEN));
    let admin_token = match overlay_api::tls::read_token_file(&token_file) {
        Ok(token) => Some(token),
        Err(error) if args.admin_token_file.is_some() => {
            anyhow::bail!("--admin-token-file: {error}")
        }
        Err(error) => {
            tracing::warn!(%error, "no admin token: nobody can change networks or delete agents");
            None
        }
    };
    tracing::info!(dir = %dir.display(), hash = %ca.cert_hash(), names = ?names, anonymous_read = args.anonymous_read, "serving HTTPS; agents need certificates of this CA, operators the admin token");
    let auth = overlay_master::auth::Auth {
        insecure: false,
        admin_token,
        anonymous_read: args.anonymous_read,
        revocations: Some(Revocations::new(dir)),
        ca: Some(ca),
        cert_lifetime: args.cert_ttl,
    };
    Ok((config, Arc::new(auth)))
}

/// Re-reads the config file on SIGHUP; a bad file is rejected whole and the running
/// configuration stays.
async fn reload_on_sighup(master: Arc<Master>, path: Option<PathBuf>) {
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP; config reload disabled");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        let Some(path) = path.as_ref() else {
            tracing::warn!("SIGHUP: no --config file to reload");
            continue;
        };
        tracing::info!(file = %path.display(), "SIGHUP: reloading configuration");
        let file_config = match config::load_file(path) {
            Ok(config) => config,
            Err(error) => {
                master
                    .metrics
                    .config_reload_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(%error, "config reload rejected; keeping the running configuration");
                continue;
            }
        };
        if let Err(error) = master.reload(file_config).await {
            tracing::error!(file = %path.display(), %error, "config reload rejected; keeping the running configuration");
        }
    }
}

async fn shutdown_signal() {
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
    // Long-poll watchers would hold the graceful shutdown for their whole timeout; every
    // acknowledged change is already durable, so leaving promptly loses nothing.
    tokio::spawn(async {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        std::process::exit(0);
    });
}
