//! The one way tests run the real `overlay-master` binary: on its embedded store (redb) or on
//! etcd, over HTTPS with a cluster CA made for it (`dir/tls`) or plain HTTP, waited for from a
//! plain test or from an async one; killed (SIGKILL) and reaped on drop, even when a test
//! panics. Also the CA commands and authenticated clients (admin, per agent).
//!
//! ```text
//! let m = Master::start(dir, Some(config)).await;                  // redb, HTTPS, async
//! let m = MasterSpec::new(dir).insecure_http().start();            // redb, HTTP, sync
//! let m = Master::start_etcd(dir, &etcd.store(), "/p", None);      // etcd, HTTP, sync
//! ```

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use overlay_api::{Identity, MasterClient, MasterTls};

use crate::fixtures::free_port;
use crate::support_etcd::{StoreFlags, http};

/// Runs `overlay-master` with these arguments (the CA commands) and expects success.
pub fn master_command(args: &[&str]) -> String {
    let output = Command::new(crate::bin_path("overlay-master"))
        .args(args)
        .output()
        .expect("run overlay-master");
    assert!(
        output.status.success(),
        "overlay-master {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Creates the cluster CA (and admin token) in `dir` with `overlay-master ca init`.
pub fn ca_init(dir: &Path) {
    master_command(&["ca", "init", "--dir", dir.to_str().unwrap()]);
}

/// TLS material of an operator of the CA in `tls_dir`.
pub fn admin_tls(tls_dir: &Path) -> MasterTls {
    MasterTls::from_files(
        &tls_dir.join("ca.crt"),
        None,
        Some(&tls_dir.join("admin.token")),
    )
    .expect("admin TLS material")
}

/// Issues a certificate for agent `ip` with `overlay-master cert issue` (lifetime `ttl`,
/// e.g. "24h") and returns the agent's TLS material.
pub fn agent_tls_with_ttl(tls_dir: &Path, ip: IpAddr, ttl: &str) -> MasterTls {
    let out = tls_dir.join(format!("agent-{ip}-{}", free_port()));
    master_command(&[
        "cert",
        "issue",
        "--dir",
        tls_dir.to_str().unwrap(),
        "--ip",
        &ip.to_string(),
        "--out",
        out.to_str().unwrap(),
        "--ttl",
        ttl,
    ]);
    MasterTls {
        ca_pem: std::fs::read(tls_dir.join("ca.crt")).unwrap(),
        identity: Some(Identity {
            cert_pem: std::fs::read(out.with_extension("crt")).unwrap(),
            key_pem: std::fs::read(out.with_extension("key")).unwrap(),
        }),
        ..Default::default()
    }
}

/// A raw HTTP client with this TLS material (for requests `MasterClient` does not make).
pub fn http_with(tls: &MasterTls) -> reqwest::Client {
    let mut builder =
        reqwest::Client::builder().use_preconfigured_tls(tls.client_config().unwrap());
    if let Some(token) = &tls.admin_token {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        builder = builder.default_headers(headers);
    }
    builder.build().unwrap()
}

/// Where the master keeps its state.
#[derive(Clone, Debug)]
enum Store {
    /// The embedded store in this directory.
    Redb(PathBuf),
    /// etcd, under `prefix`.
    Etcd { flags: StoreFlags, prefix: String },
}

/// How to run a master. [`MasterSpec::new`]: embedded store in `dir/data`, HTTPS with a CA in
/// `dir/tls`, no config file.
#[derive(Clone, Debug)]
pub struct MasterSpec {
    dir: PathBuf,
    config: Option<String>,
    store: Store,
    tls: bool,
    args: Vec<String>,
}

impl MasterSpec {
    pub fn new(dir: &Path) -> MasterSpec {
        MasterSpec {
            dir: dir.to_owned(),
            config: None,
            store: Store::Redb(dir.join("data")),
            tls: true,
            args: vec![],
        }
    }

    /// The master's configuration (`--config`, written to a file in `dir`).
    pub fn config(mut self, text: Option<&str>) -> MasterSpec {
        self.config = text.map(str::to_owned);
        self
    }

    /// More `overlay-master` arguments (kept across restarts).
    pub fn args(mut self, args: &[&str]) -> MasterSpec {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// The embedded store in `data_dir` instead of `dir/data`.
    pub fn data_dir(mut self, data_dir: &Path) -> MasterSpec {
        self.store = Store::Redb(data_dir.to_owned());
        self
    }

    /// etcd as the store (`--store`, its flags, `--etcd-prefix`).
    pub fn etcd(mut self, store: &StoreFlags, prefix: &str) -> MasterSpec {
        self.store = Store::Etcd {
            flags: store.clone(),
            prefix: prefix.to_owned(),
        };
        self
    }

    /// Plain HTTP (`--insecure-http`), no CA: for tests of the store's behaviour, which talk
    /// raw HTTP; TLS is covered by master_api, control_plane_auth and the lab.
    pub fn insecure_http(mut self) -> MasterSpec {
        self.tls = false;
        self
    }

    /// Starts the process without waiting for it.
    pub fn spawn(self) -> Master {
        let port = free_port();
        let config_path = config_path(&self.dir, &self.store, port);
        let config = self.config.as_deref().map(|text| {
            let path = config_path;
            std::fs::write(&path, text).expect("write config");
            path
        });
        let mut master = Master {
            child: None,
            port,
            dir: self.dir,
            config,
            run: 0,
            store: self.store,
            tls: self.tls,
            extra_args: self.args,
        };
        if master.tls && !master.tls_dir().join("ca.crt").exists() {
            ca_init(&master.tls_dir());
        }
        master.spawn();
        master
    }

    /// Starts the process and waits (blocking) until `/health` answers.
    pub fn start(self) -> Master {
        let mut master = self.spawn();
        master.wait_ready();
        master
    }

    /// [`start`](Self::start) for async tests.
    pub async fn start_async(self) -> Master {
        let mut master = self.spawn();
        master.wait_ready_async().await;
        master
    }
}

/// The config file of a master: `dir/config.yaml`, or one per master where several share
/// `dir` (etcd stores).
fn config_path(dir: &Path, store: &Store, port: u16) -> PathBuf {
    match store {
        Store::Redb(_) => dir.join("config.yaml"),
        Store::Etcd { .. } => dir.join(format!("config-{port}.yaml")),
    }
}

/// One master process; killed (SIGKILL) and reaped on drop.
pub struct Master {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    config: Option<PathBuf>,
    run: u32,
    store: Store,
    tls: bool,
    /// More `overlay-master` arguments (kept across restarts).
    pub extra_args: Vec<String>,
}

impl Master {
    /// A master on its embedded store in `dir/data`, HTTPS, with `config_text` if given;
    /// waits until `/health` answers.
    pub async fn start(dir: &Path, config_text: Option<&str>) -> Master {
        Self::start_with_args(dir, config_text, &[]).await
    }

    /// [`start`](Self::start) with more `overlay-master` arguments.
    pub async fn start_with_args(
        dir: &Path,
        config_text: Option<&str>,
        extra_args: &[&str],
    ) -> Master {
        MasterSpec::new(dir)
            .config(config_text)
            .args(extra_args)
            .start_async()
            .await
    }

    /// A master on `store` (`etcd://...`) under `prefix`, plain HTTP, with optional config
    /// text; waits (blocking) for `/health`.
    pub fn start_etcd(
        dir: &Path,
        store: &StoreFlags,
        prefix: &str,
        config: Option<&str>,
    ) -> Master {
        MasterSpec::new(dir)
            .etcd(store, prefix)
            .insecure_http()
            .config(config)
            .start()
    }

    /// [`start_etcd`](Self::start_etcd) without waiting.
    pub fn spawn_etcd(
        dir: &Path,
        store: &StoreFlags,
        prefix: &str,
        config: Option<&str>,
    ) -> Master {
        MasterSpec::new(dir)
            .etcd(store, prefix)
            .insecure_http()
            .config(config)
            .spawn()
    }

    fn command(&self) -> Command {
        let mut command = Command::new(crate::bin_path("overlay-master"));
        command.args(["--listen", &format!("127.0.0.1:{}", self.port)]);
        match &self.store {
            Store::Redb(data) => {
                command.arg("--data-dir").arg(data);
            }
            Store::Etcd { flags, prefix } => {
                command
                    .args(["--store", &flags.url, "--etcd-prefix", prefix])
                    .args(&flags.extra);
            }
        }
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        if self.tls {
            command.arg("--tls-dir").arg(self.tls_dir());
        } else {
            command.arg("--insecure-http");
        }
        command.args(&self.extra_args);
        command.env("RUST_LOG", "info");
        command
    }

    fn log_path(&self) -> PathBuf {
        self.dir
            .join(format!("master-{}-{}.log", self.port, self.run))
    }

    fn spawn(&mut self) {
        self.run += 1;
        let log = std::fs::File::create(self.log_path()).expect("create log file");
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn overlay-master");
        self.child = Some(child);
    }

    /// The log of the current run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `127.0.0.1:<port>`, for [`http`].
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The cluster CA directory of this master.
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    /// An operator's TLS material (CA + admin token).
    pub fn admin_tls(&self) -> MasterTls {
        admin_tls(&self.tls_dir())
    }

    /// An operator's client (admin token; none on plain HTTP): may do everything, including
    /// registering any agent.
    pub fn client(&self) -> MasterClient {
        if !self.tls {
            return MasterClient::new([self.base_url()]).expect("valid URL");
        }
        MasterClient::with_tls([self.base_url()], &self.admin_tls()).expect("valid URL")
    }

    /// Agent `ip`'s TLS material: a fresh certificate of the cluster CA for that address.
    pub fn agent_tls(&self, ip: IpAddr) -> MasterTls {
        agent_tls_with_ttl(&self.tls_dir(), ip, "24h")
    }

    /// A client presenting agent `ip`'s certificate.
    pub fn agent_client(&self, ip: IpAddr) -> MasterClient {
        MasterClient::with_tls([self.base_url()], &self.agent_tls(ip)).expect("valid URL")
    }

    /// A client that trusts the CA but has no credential at all.
    pub fn anonymous_client(&self) -> MasterClient {
        let tls = MasterTls {
            ca_pem: std::fs::read(self.tls_dir().join("ca.crt")).unwrap(),
            ..Default::default()
        };
        MasterClient::with_tls([self.base_url()], &tls).expect("valid URL")
    }

    /// A raw HTTP client with the admin token.
    pub fn http(&self) -> reqwest::Client {
        if !self.tls {
            return reqwest::Client::new();
        }
        http_with(&self.admin_tls())
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Panics with the log if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            panic!(
                "overlay-master exited early ({status}); log:\n{}",
                self.log()
            );
        }
    }

    /// Waits (blocking) until `/health` answers. On HTTPS this runs a small runtime of its
    /// own: call it from plain tests, [`wait_ready_async`](Self::wait_ready_async) from async.
    pub fn wait_ready(&mut self) {
        if self.tls {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime to wait in")
                .block_on(self.wait_ready_async());
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.assert_running();
            if let Ok((200, _)) = http(&self.addr(), "GET", "/health", None) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "overlay-master not ready within 20 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    pub async fn wait_ready_async(&mut self) {
        let http = self.http();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.assert_running();
            if let Ok(response) = http.get(format!("{}/health", self.base_url())).send().await
                && response.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "overlay-master not ready within 20 s; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL, then start again on the same store, config and port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready_async().await;
    }

    /// Replaces the config file (the next start or SIGHUP reads it).
    pub fn write_config(&mut self, text: &str) {
        let path = config_path(&self.dir, &self.store, self.port);
        std::fs::write(&path, text).expect("write config");
        self.config = Some(path);
    }

    /// Waits for the process to exit by itself; its status and log.
    pub fn wait_exit(&mut self, limit: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return (status, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "overlay-master kept running; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts again and expects the process to exit by itself; returns status and log.
    pub fn restart_expecting_exit(&mut self) -> (ExitStatus, String) {
        self.kill();
        self.spawn();
        self.wait_exit(Duration::from_secs(20))
    }

    /// Value of an unlabelled metric, or the sum of a labelled one's series matching `filter`.
    pub async fn metric(&self, name: &str, filter: &str) -> f64 {
        let text = self
            .http()
            .get(format!("{}/metrics", self.base_url()))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body");
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| {
                let series = line.split_whitespace().next().unwrap_or("");
                (series == name || series.starts_with(&format!("{name}{{")))
                    && series.contains(filter)
            })
            .filter_map(|line| line.split_whitespace().nth(1)?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        self.kill();
    }
}
