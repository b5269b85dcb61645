//! `overlay-master --config FILE --listen ADDR (--data-dir DIR | --store etcd://HOST:PORT,...)`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use overlay_api::NetworkConfig;
use overlay_master::config;
use overlay_master::master::Master;
use overlay_master::store::Store;
use overlay_master::store::etcd::EtcdStore;
use overlay_master::store::redb::RedbStore;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Overlay network master: allocates VTEPs and agent subnets, serves DC/OS's /overlay-master API"
)]
struct Args {
    /// `dcos_overlay_network` object (YAML or JSON, top level or under that key); without it
    /// DC/OS's defaults apply. Re-read on SIGHUP.
    #[arg(long, env = "OVERLAY_MASTER_CONFIG")]
    config: Option<PathBuf>,
    /// Address to serve the HTTP API on.
    #[arg(long, env = "OVERLAY_MASTER_LISTEN", default_value = "0.0.0.0:5055")]
    listen: SocketAddr,
    /// Directory of the embedded state database (created if missing); the default store.
    #[arg(long, env = "OVERLAY_MASTER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Shared store instead of the embedded one: `etcd://host:port,host:port,...` (etcd 3.4+,
    /// plain HTTP). Any number of masters may serve the same etcd cluster and prefix.
    #[arg(long, env = "OVERLAY_MASTER_STORE", conflicts_with = "data_dir")]
    store: Option<String>,
    /// Key prefix of this overlay cluster in etcd.
    #[arg(long, env = "OVERLAY_MASTER_ETCD_PREFIX", default_value = overlay_master::store::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
}

fn open_store(args: &Args) -> anyhow::Result<Arc<dyn Store>> {
    match (&args.store, &args.data_dir) {
        (Some(spec), _) => {
            if !spec.starts_with("etcd://") {
                anyhow::bail!("--store {spec:?}: only etcd://host:port,... is supported");
            }
            let endpoints = overlay_master::store::etcd::parse_endpoints(spec)
                .map_err(|e| anyhow::anyhow!("--store: {e}"))?;
            let store = EtcdStore::open(endpoints, &args.etcd_prefix)
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
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
    config::assign_default_vnis(&mut checked.overlays);
    overlay_master::validate::validate(&checked).with_context(|| match &args.config {
        Some(path) => format!("config file {}", path.display()),
        None => "DC/OS's default configuration".to_owned(),
    })?;
    let store = tokio::task::block_in_place(|| open_store(&args))?;
    let master =
        tokio::task::block_in_place(|| Master::start(store, file_config)).with_context(|| {
            match &args.config {
                Some(path) => format!("starting with config file {}", path.display()),
                None => "starting with DC/OS's default configuration".to_owned(),
            }
        })?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let bound = listener.local_addr()?;
    tracing::info!(listen = %bound, revision = master.revision(), "overlay master serving");
    // systemd (Type=notify): the store is open and the API listens.
    let _ = overlay_api::sd_notify::notify("READY=1");

    tokio::spawn(reload_on_sighup(Arc::clone(&master), args.config.clone()));
    let router = overlay_master::api::router(Arc::clone(&master));
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving HTTP")?;
    tracing::info!("overlay master stopped");
    Ok(())
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
