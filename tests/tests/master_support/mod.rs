//! Running the real `overlay-master` binary in tests: free loopback port, temp data dir, a
//! cluster CA (`dir/tls`, so the master serves HTTPS), authenticated clients (admin, per
//! agent), readiness wait, signals, and a guard that kills the process even when a test panics.

#![allow(dead_code)] // each test file uses a different part of it

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use overlay_api::{Identity, MasterClient, MasterTls};

/// Runs `overlay-master` with these arguments (the CA commands) and expects success.
pub fn master_command(args: &[&str]) -> String {
    let output = Command::new(overlay_tests::bin_path("overlay-master"))
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

/// A free loopback port: bind port 0, read the port, release it for the master to bind.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local addr").port()
}

/// Agent `n`'s underlay address (only used as data: nothing listens there).
pub fn agent_ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
}

/// One master process; killed (SIGKILL) and reaped on drop.
pub struct MasterProcess {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    config: Option<PathBuf>,
    run: u32,
    /// More `overlay-master` arguments (kept across restarts).
    pub extra_args: Vec<String>,
}

impl MasterProcess {
    /// Starts a master with its data in `dir/data` and, if given, `config_text` written to
    /// `dir/config.yaml`; waits until `/health` answers.
    pub async fn start(dir: &Path, config_text: Option<&str>) -> MasterProcess {
        Self::start_with_args(dir, config_text, &[]).await
    }

    /// [`start`](Self::start) with more `overlay-master` arguments.
    pub async fn start_with_args(
        dir: &Path,
        config_text: Option<&str>,
        extra_args: &[&str],
    ) -> MasterProcess {
        let config = config_text.map(|text| {
            let path = dir.join("config.yaml");
            std::fs::write(&path, text).expect("write config");
            path
        });
        let mut master = MasterProcess {
            child: None,
            port: free_port(),
            dir: dir.to_owned(),
            config,
            run: 0,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        };
        ca_init(&master.tls_dir());
        master.spawn();
        master.wait_ready().await;
        master
    }

    fn command(&self) -> Command {
        let mut command = Command::new(overlay_tests::bin_path("overlay-master"));
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.dir.join("data"));
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        command.arg("--tls-dir").arg(self.tls_dir());
        command.args(&self.extra_args);
        command.env("RUST_LOG", "info");
        command
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("master-{}.log", self.run))
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

    pub fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The cluster CA directory of this master.
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    /// An operator's TLS material (CA + admin token).
    pub fn admin_tls(&self) -> MasterTls {
        admin_tls(&self.tls_dir())
    }

    /// An operator's client (admin token): may do everything, including registering any agent.
    pub fn client(&self) -> MasterClient {
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
        http_with(&self.admin_tls())
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub async fn wait_ready(&mut self) {
        let http = self.http();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
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

    /// SIGKILL, then start again on the same data dir, config and port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready().await;
    }

    /// Replaces the config file (the next start or SIGHUP reads it).
    pub fn write_config(&mut self, text: &str) {
        let path = self.dir.join("config.yaml");
        std::fs::write(&path, text).expect("write config");
        self.config = Some(path);
    }

    /// Starts again and expects the process to exit by itself; returns status and log.
    pub fn restart_expecting_exit(&mut self) -> (ExitStatus, String) {
        self.kill();
        self.spawn();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let child = self.child.as_mut().expect("spawned");
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

impl Drop for MasterProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
