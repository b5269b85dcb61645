//! Real etcd clusters and etcd-backed masters for tests: members on loopback with free ports and
//! temporary data directories, killed (SIGKILL) and reaped on drop, so a panicking test leaves
//! no process behind.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Debian `etcd-server` binary.
pub const ETCD: &str = "/usr/bin/etcd";

/// One HTTP/1.1 request (`Connection: close`) to `addr` (host:port); status and body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let socket = addr
        .parse()
        .map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?;
    let mut stream = TcpStream::connect_timeout(&socket, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP answer: {answer:?}")))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local addr").port()
}

pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    child: Option<Child>,
}

/// A 3 (or n) member etcd cluster on 127.0.0.1.
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    dir: PathBuf,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster accepts writes.
    pub fn start(n: usize) -> EtcdCluster {
        assert!(
            Path::new(ETCD).exists(),
            "{ETCD} missing: install Debian's etcd-server (cargo xtask setup)"
        );
        let dir =
            std::env::temp_dir().join(format!("ovl-etcd-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let members = (1..=n)
            .map(|i| EtcdMember {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster { members, dir };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_writable(Duration::from_secs(20));
        cluster
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.log", self.members[i].name))
    }

    /// (Re)starts member `i` on its data directory.
    pub fn spawn(&mut self, i: usize) {
        let initial = self.initial_cluster();
        let member = &self.members[i];
        let data = self.dir.join(&member.name);
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .unwrap();
        let child = Command::new(ETCD)
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "ovl-test"])
            // Fast elections on loopback; large group commits fit one transaction.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--max-txn-ops", "4096", "--max-request-bytes", "16777216"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.members[i].child = Some(child);
    }

    /// SIGKILL member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `etcd://127.0.0.1:p1,127.0.0.1:p2,...`
    pub fn store_url(&self) -> String {
        let list: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect();
        format!("etcd://{}", list.join(","))
    }

    fn client_addrs(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// One etcd JSON-gateway call to any running member; its answer if one succeeded.
    pub fn call(&self, path: &str, body: &str) -> Option<String> {
        self.client_addrs().into_iter().find_map(|addr| {
            match http(&addr, "POST", path, Some(body)) {
                Ok((200, answer)) if !answer.contains("\"error\"") => Some(answer),
                _ => None,
            }
        })
    }

    /// Waits until a write through the gateway succeeds (a leader with quorum exists).
    pub fn wait_writable(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            // key "ovl-test-probe" = "1", base64
            let put = r#"{"key": "b3ZsLXRlc3QtcHJvYmU=", "value": "MQ=="}"#;
            if self.call("/v3/kv/put", put).is_some() {
                return;
            }
            if Instant::now() > deadline {
                let logs: String = (0..self.members.len())
                    .map(|i| std::fs::read_to_string(self.log_path(i)).unwrap_or_default())
                    .collect();
                panic!("etcd not writable within {limit:?}; logs:\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `overlay-master` on an etcd store; SIGKILLed and reaped on drop.
pub struct EtcdMaster {
    child: Option<Child>,
    pub port: u16,
    log: PathBuf,
}

impl EtcdMaster {
    /// Starts a master on `store` (`etcd://...`) with `prefix` and optional config text, and
    /// waits for `/health`.
    pub fn start(dir: &Path, store: &str, prefix: &str, config: Option<&str>) -> EtcdMaster {
        let mut master = Self::spawn(dir, store, prefix, config);
        master.wait_ready();
        master
    }

    pub fn spawn(dir: &Path, store: &str, prefix: &str, config: Option<&str>) -> EtcdMaster {
        let port = free_port();
        let log = dir.join(format!("master-{port}.log"));
        let mut command = Command::new(crate::bin_path("overlay-master"));
        command
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--store", store, "--etcd-prefix", prefix])
            // The store tests talk raw HTTP to compare masters' answers; TLS is covered by
            // master_api, control_plane_auth and the lab cluster (etcd_cluster).
            .arg("--insecure-http")
            .env("RUST_LOG", "info");
        if let Some(text) = config {
            let path = dir.join(format!("config-{port}.yaml"));
            std::fs::write(&path, text).unwrap();
            command.arg("--config").arg(path);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn overlay-master");
        EtcdMaster {
            child: Some(child),
            port,
            log,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit by itself; its status and log.
    pub fn wait_exit(&mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return (status, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "master kept running: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_ready(&mut self) {
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
            if let Ok((200, _)) = http(&format!("127.0.0.1:{}", self.port), "GET", "/health", None)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd master not ready in 20 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdMaster {
    fn drop(&mut self) {
        self.kill();
    }
}
