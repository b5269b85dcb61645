//! Real etcd clusters for tests (masters on them: [`crate::master::Master::start_etcd`]):
//! members on loopback with free ports and temporary data directories, killed (SIGKILL) and
//! reaped on drop, so a panicking test leaves no process behind. A cluster is plain http or,
//! with [`Security::TlsAuth`], TLS between members and towards clients with client
//! certificates required (a CA made for the test) and etcd authentication on.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fixtures::free_port;

/// The Debian `etcd-server` binary.
pub const ETCD: &str = "/usr/bin/etcd";
/// Debian's `etcd-client`, for administration (users, alarms, compaction).
pub const ETCDCTL: &str = "/usr/bin/etcdctl";

/// How a test cluster is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    Plain,
    /// https for clients and peers, client certificates required on both, etcd
    /// authentication enabled (`root` and [`MASTER_USER`], who may read and write `/...`).
    TlsAuth,
}

/// The etcd user the masters log in as on a [`Security::TlsAuth`] cluster.
pub const MASTER_USER: &str = "overlay-master";
pub const MASTER_PASSWORD: &str = "master-secret";
const ROOT_PASSWORD: &str = "root-secret";

/// Certificates of a test cluster, as PEM files in `dir`: `ca.pem`; `member.pem`/`-key.pem`
/// (server and peer, for 127.0.0.1); `client.pem`/`-key.pem` (no CN: etcd's gateway refuses
/// client certificates with one while authentication is on); `cn-client.pem`/`-key.pem` (CN
/// [`MASTER_USER`]); and `rogue-ca.pem` with `rogue-client.pem`/`-key.pem`, a client
/// certificate from another CA.
pub struct TestPki {
    pub dir: PathBuf,
}

impl TestPki {
    pub fn create(dir: &Path) -> TestPki {
        use rcgen::{
            BasicConstraints, CertificateParams, DistinguishedName, DnType,
            ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
        };
        std::fs::create_dir_all(dir).unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
        let make_ca = |cn: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let cert = params.self_signed(&key).unwrap();
            (cert, key)
        };
        let leaf = |cn: Option<&str>, names: Vec<String>, ca: &(rcgen::Certificate, KeyPair)| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name = DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::OrganizationName, "ovl-test");
            if let Some(cn) = cn {
                params.distinguished_name.push(DnType::CommonName, cn);
            }
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            // Members use theirs as server and as client (peers, and the gateway's own
            // connection to the member's gRPC server).
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &ca.0, &ca.1).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let ca = make_ca("ovl-test-etcd-ca");
        write("ca.pem", ca.0.pem());
        let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
        let (cert, key) = leaf(Some("ovl-test-etcd-member"), names, &ca);
        write("member.pem", cert);
        write("member-key.pem", key);
        let (cert, key) = leaf(None, vec![], &ca);
        write("client.pem", cert);
        write("client-key.pem", key);
        let (cert, key) = leaf(Some(MASTER_USER), vec![], &ca);
        write("cn-client.pem", cert);
        write("cn-client-key.pem", key);
        let rogue = make_ca("ovl-test-rogue-ca");
        write("rogue-ca.pem", rogue.0.pem());
        let (cert, key) = leaf(None, vec![], &rogue);
        write("rogue-client.pem", cert);
        write("rogue-client-key.pem", key);
        TestPki {
            dir: dir.to_owned(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The master's flags to reach a test cluster: `--store` and, on a secured one, its
/// certificates and login.
#[derive(Debug, Clone)]
pub struct StoreFlags {
    pub url: String,
    pub extra: Vec<String>,
}

impl StoreFlags {
    /// A plain `--store` (no TLS, no login).
    pub fn plain(url: impl Into<String>) -> StoreFlags {
        StoreFlags {
            url: url.into(),
            extra: vec![],
        }
    }

    /// Replaces (or adds) the value of flag `name`.
    pub fn with(mut self, name: &str, value: impl Into<String>) -> StoreFlags {
        if let Some(at) = self.extra.iter().position(|f| f == name) {
            self.extra[at + 1] = value.into();
        } else {
            self.extra.push(name.to_owned());
            self.extra.push(value.into());
        }
        self
    }

    /// Drops flag `name` and its value.
    pub fn without(mut self, name: &str) -> StoreFlags {
        if let Some(at) = self.extra.iter().position(|f| f == name) {
            self.extra.drain(at..at + 2);
        }
        self
    }
}

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

pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    child: Option<Child>,
}

/// What to start: members, security, backend quota.
#[derive(Debug, Clone)]
pub struct EtcdSpec {
    pub members: usize,
    pub security: Security,
    /// `--quota-backend-bytes` (etcd raises its NOSPACE alarm beyond it).
    pub quota_backend_bytes: Option<u64>,
}

impl EtcdSpec {
    pub fn new(members: usize, security: Security) -> EtcdSpec {
        EtcdSpec {
            members,
            security,
            quota_backend_bytes: None,
        }
    }
}

/// A 3 (or n) member etcd cluster on 127.0.0.1.
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    pub spec: EtcdSpec,
    /// Certificates of a TLS cluster.
    pub pki: Option<TestPki>,
    /// etcd authentication is on (etcdctl then logs in as root).
    auth_enabled: bool,
    dir: PathBuf,
}

impl EtcdCluster {
    /// Starts `n` plain members and waits until the cluster accepts writes.
    pub fn start(n: usize) -> EtcdCluster {
        Self::start_with(EtcdSpec::new(n, Security::Plain))
    }

    /// Starts `n` members secured as `security`.
    pub fn start_secured(n: usize, security: Security) -> EtcdCluster {
        Self::start_with(EtcdSpec::new(n, security))
    }

    /// Starts the members of `spec`, waits until the cluster accepts writes and, on a secured
    /// cluster, creates the users and turns authentication on.
    pub fn start_with(spec: EtcdSpec) -> EtcdCluster {
        assert!(
            Path::new(ETCD).exists(),
            "{ETCD} missing: install Debian's etcd-server (cargo xtask setup)"
        );
        let dir =
            std::env::temp_dir().join(format!("ovl-etcd-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let members = (1..=spec.members)
            .map(|i| EtcdMember {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let pki = (spec.security == Security::TlsAuth).then(|| TestPki::create(&dir.join("pki")));
        let mut cluster = EtcdCluster {
            members,
            spec,
            pki,
            auth_enabled: false,
            dir,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i);
        }
        cluster.wait_writable(Duration::from_secs(20));
        if cluster.spec.security == Security::TlsAuth {
            cluster.enable_auth();
            cluster.auth_enabled = true;
        }
        cluster
    }

    fn scheme(&self) -> &'static str {
        match self.spec.security {
            Security::Plain => "http",
            Security::TlsAuth => "https",
        }
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}://127.0.0.1:{}", m.name, self.scheme(), m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Users `root` and [`MASTER_USER`] (read-write on every key under `/`), then `auth enable`.
    fn enable_auth(&self) {
        let steps: [&[&str]; 6] = [
            &["user", "add", &format!("root:{ROOT_PASSWORD}")],
            &["user", "add", &format!("{MASTER_USER}:{MASTER_PASSWORD}")],
            &["role", "add", "overlay"],
            &[
                "role",
                "grant-permission",
                "overlay",
                "--prefix=true",
                "readwrite",
                "/",
            ],
            &["user", "grant-role", MASTER_USER, "overlay"],
            &["auth", "enable"],
        ];
        for step in steps {
            self.etcdctl_as(None, step)
                .unwrap_or_else(|e| panic!("etcdctl {step:?}: {e}"));
        }
    }

    /// Runs `etcdctl` against the running members (as `root` on a secured cluster); its
    /// standard output, or its error output.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String, String> {
        let user = self.auth_enabled.then(|| format!("root:{ROOT_PASSWORD}"));
        self.etcdctl_as(user.as_deref(), args)
    }

    fn etcdctl_as(&self, user: Option<&str>, args: &[&str]) -> Result<String, String> {
        let endpoints = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut command = Command::new(ETCDCTL);
        command
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .args(["--dial-timeout=2s", "--command-timeout=5s"]);
        if let Some(pki) = &self.pki {
            command
                .arg(format!("--cacert={}", pki.path("ca.pem").display()))
                .arg(format!("--cert={}", pki.path("client.pem").display()))
                .arg(format!("--key={}", pki.path("client-key.pem").display()));
        }
        if let Some(user) = user {
            command.arg(format!("--user={user}"));
        }
        let output = command
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{ETCDCTL}: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.log", self.members[i].name))
    }

    /// (Re)starts member `i` on its data directory.
    pub fn spawn(&mut self, i: usize) {
        let initial = self.initial_cluster();
        let member = &self.members[i];
        let data = self.dir.join(&member.name);
        let client = format!("{}://127.0.0.1:{}", self.scheme(), member.client_port);
        let peer = format!("{}://127.0.0.1:{}", self.scheme(), member.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .unwrap();
        let mut command = Command::new(ETCD);
        if let Some(pki) = &self.pki {
            let file = |name| pki.path(name).display().to_string();
            command
                .args(["--cert-file", &file("member.pem")])
                .args(["--key-file", &file("member-key.pem")])
                .args(["--trusted-ca-file", &file("ca.pem")])
                .arg("--client-cert-auth")
                .args(["--peer-cert-file", &file("member.pem")])
                .args(["--peer-key-file", &file("member-key.pem")])
                .args(["--peer-trusted-ca-file", &file("ca.pem")])
                .arg("--peer-client-cert-auth");
        }
        if let Some(bytes) = self.spec.quota_backend_bytes {
            command.args(["--quota-backend-bytes", &bytes.to_string()]);
        }
        let child = command
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

    /// `etcd://127.0.0.1:p1,127.0.0.1:p2,...` (the members are https on a secured cluster:
    /// the master infers it from the CA file).
    pub fn store_url(&self) -> String {
        let list: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect();
        format!("etcd://{}", list.join(","))
    }

    /// The master's flags for this cluster: the members, and on a secured cluster the CA, the
    /// client certificate and [`MASTER_USER`]'s login.
    pub fn store(&self) -> StoreFlags {
        let mut flags = StoreFlags::plain(self.store_url());
        if let Some(pki) = &self.pki {
            let file = |name| pki.path(name).display().to_string();
            flags = flags
                .with("--etcd-cafile", file("ca.pem"))
                .with("--etcd-certfile", file("client.pem"))
                .with("--etcd-keyfile", file("client-key.pem"))
                .with("--etcd-username", MASTER_USER)
                .with("--etcd-password", MASTER_PASSWORD);
        }
        flags
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

    /// Waits until a write succeeds (a leader with quorum exists): through the gateway on a
    /// plain cluster, with etcdctl on a secured one.
    pub fn wait_writable(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let written = match self.spec.security {
                // key "ovl-test-probe" = "1", base64
                Security::Plain => self
                    .call(
                        "/v3/kv/put",
                        r#"{"key": "b3ZsLXRlc3QtcHJvYmU=", "value": "MQ=="}"#,
                    )
                    .is_some(),
                Security::TlsAuth => self.etcdctl(&["put", "ovl-test-probe", "1"]).is_ok(),
            };
            if written {
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
