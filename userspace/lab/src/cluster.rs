//! A running ebpf-overlay cluster in a lab: `overlay-master` in the master namespace,
//! `overlay-agent` in each agent namespace, containers connected through the agents' API.
//! The control plane runs with TLS: the cluster creates a CA (`overlay-master ca init`), the
//! master serves HTTPS from it, and each agent gets a certificate for its fabric address
//! (issued offline, or bought with a join token when `ClusterSpec::join_tokens` is set).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_api::{
    AgentInfo,
    agent::{LocalClient, http_exchange, http_exchange_with_headers},
};

use crate::{Container, Fabric, Lab, LabSpec, Node, fabric_ip, in_netns};

/// The interface the CNI plugin makes in each of the cluster's containers.
const CONTAINER_IFNAME: &str = "eth0";

/// Where the master listens, inside the lab.
pub const MASTER_PORT: u16 = 5050;

/// Two networks: DC/OS's default `dcos` and a second one, `blue` (both on VNI 1024, DC/OS's scheme).
pub const TWO_NETWORKS: &str = "\
vtep_subnet: 44.128.0.0/20
vtep_mac_oui: 70:B3:D5:00:00:00
overlays:
  - name: dcos
    subnet: 9.0.0.0/8
    prefix: 24
  - name: blue
    subnet: 10.1.0.0/16
    prefix: 24
";

/// The addresses the CNI plugin gave a container, one per family of its network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContainerAddrs {
    pub ip4: Option<Ipv4Addr>,
    pub ip6: Option<std::net::Ipv6Addr>,
}

pub struct ClusterSpec {
    pub agents: usize,
    /// The master's configuration (DC/OS `dcos_overlay_network`, YAML).
    pub config: String,
    /// Directory holding `overlay-master` and `overlay-agent`.
    pub bin_dir: PathBuf,
    /// Container MTU given to agents and containers.
    pub mtu: u32,
    /// Extra `overlay-agent` arguments (e.g. short NAT timeouts in tests); `{agent}` in them
    /// becomes the agent's role (`a1`, ...), for per-agent paths.
    pub agent_args: Vec<String>,
    /// Extra `overlay-master` arguments (e.g. a short allocation quarantine or `--cert-ttl`).
    pub master_args: Vec<String>,
    /// Masters on the master node, on ports `MASTER_PORT`, `MASTER_PORT + 1`, ...; agents get
    /// every address. More than one needs `etcd_members`.
    pub masters: usize,
    /// etcd members (Debian's `/usr/bin/etcd`) in the master namespace, client ports
    /// `ETCD_PORT`, `ETCD_PORT + 10`, ...; the masters then share them as their store.
    /// 0 (the default): one master on its embedded store.
    pub etcd_members: usize,
    /// Agents join with a single-use token and the CA's hash (and get, store and renew their
    /// certificate themselves) instead of being given a certificate.
    pub join_tokens: bool,
    /// Start every node's agent in `up` (the default). `false` leaves the nodes bare, e.g. to
    /// run DC/OS's kernel datapath on them and convert them later with `start_agent`.
    pub start_agents: bool,
    /// The fabric's family. [`Fabric::Ipv6`]: the master listens on its IPv6 fabric address and
    /// agents register with theirs (an IPv6 underlay; the master needs `--ipv6-underlay` in
    /// `master_args` to accept them). One master on its embedded store only.
    pub fabric: Fabric,
    /// Environment of the agent processes on top of the test's (e.g. a `PATH` without
    /// iproute2, to show the agent spawns nothing).
    pub agent_env: Vec<(String, String)>,
}

/// First etcd member's client port inside the lab (its peer port is the next one).
pub const ETCD_PORT: u16 = 12379;

impl ClusterSpec {
    pub fn new(agents: usize, bin_dir: &Path) -> ClusterSpec {
        ClusterSpec {
            agents,
            config: TWO_NETWORKS.into(),
            bin_dir: bin_dir.to_owned(),
            mtu: 1420,
            agent_args: vec![],
            master_args: vec![],
            masters: 1,
            etcd_members: 0,
            join_tokens: false,
            start_agents: true,
            fabric: Fabric::Ipv4,
            agent_env: vec![],
        }
    }
}

pub struct Cluster {
    // Dropped first: containers' veths and agent processes go with the lab.
    pub lab: Lab,
    bin_dir: PathBuf,
    work_dir: PathBuf,
    mtu: u32,
    agent_args: Vec<String>,
    agent_env: Vec<(String, String)>,
    keep: bool,
    agent_pids: BTreeMap<String, u32>,
    /// Process of each master (None once killed).
    master_pids: Vec<Option<u32>>,
    etcd_pids: Vec<Option<u32>>,
    join_tokens: bool,
    /// How the master was started, to start it again (`start_master`).
    master_config: PathBuf,
    master_args: Vec<String>,
    etcd_store: bool,
}

impl Cluster {
    pub fn up(spec: ClusterSpec) -> anyhow::Result<Cluster> {
        if spec.fabric == Fabric::Ipv6 && (spec.etcd_members > 0 || spec.masters > 1) {
            bail!("an IPv6 fabric runs one master on its embedded store");
        }
        let lab = Lab::up_on(
            LabSpec {
                agents: spec.agents,
                id: None,
            },
            spec.fabric,
        )?;
        let work_dir = std::env::temp_dir().join(format!("{}-cluster", lab.id()));
        std::fs::create_dir_all(&work_dir)?;
        let mut c = Cluster {
            lab,
            bin_dir: spec.bin_dir,
            work_dir,
            mtu: spec.mtu,
            agent_args: spec.agent_args.clone(),
            agent_env: spec.agent_env.clone(),
            keep: false,
            agent_pids: BTreeMap::new(),
            master_pids: vec![],
            etcd_pids: vec![],
            join_tokens: spec.join_tokens,
            master_config: PathBuf::new(),
            master_args: spec.master_args.clone(),
            etcd_store: spec.etcd_members > 0,
        };
        c.ca_command(&["ca", "init", "--dir", c.tls_dir().to_str().unwrap()])?;
        let config = c.work_dir.join("overlay.yaml");
        std::fs::write(&config, &spec.config)?;
        c.master_config = config.clone();
        if spec.etcd_members > 0 {
            c.start_etcd(spec.etcd_members)?;
            for i in 0..spec.masters.max(1) {
                c.start_shared_master(i, &config)?;
            }
            for i in (1..=spec.agents).filter(|_| spec.start_agents) {
                c.start_agent(&format!("a{i}"))?;
            }
            return Ok(c);
        }
        if spec.masters > 1 {
            bail!("several masters need a shared store: set etcd_members");
        }
        c.master_pids.push(None);
        c.start_master(0)?;
        for i in (1..=spec.agents).filter(|_| spec.start_agents) {
            c.start_agent(&format!("a{i}"))?;
        }
        Ok(c)
    }

    pub fn master_url(&self) -> String {
        format!("https://{}", SocketAddr::new(self.master_ip(), MASTER_PORT))
    }

    /// The master node's fabric address (of the fabric's family).
    pub fn master_ip(&self) -> IpAddr {
        self.lab.fabric().ip(1)
    }

    /// Every master's URL (what agents are given, in this order).
    pub fn master_urls(&self) -> Vec<String> {
        (0..self.master_pids.len().max(1))
            .map(|i| {
                let addr = SocketAddr::new(self.master_ip(), MASTER_PORT + i as u16);
                format!("https://{addr}")
            })
            .collect()
    }

    /// The cluster CA directory (`ca.crt`, `admin.token`, ...), shared by every master.
    pub fn tls_dir(&self) -> PathBuf {
        self.work_dir.join("tls")
    }

    /// The cluster CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.tls_dir().join("ca.crt")
    }

    /// The operators' admin token file.
    pub fn admin_token_file(&self) -> PathBuf {
        self.tls_dir().join("admin.token")
    }

    /// Runs `overlay-master` (CA commands, in the root namespace: files only); its stdout.
    pub fn ca_command(&self, args: &[&str]) -> anyhow::Result<String> {
        let bin = self.bin_dir.join("overlay-master");
        let out = std::process::Command::new(&bin)
            .args(args)
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "overlay-master {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `sha256:...` of the CA certificate (for `--ca-cert-hash`).
    pub fn ca_cert_hash(&self) -> anyhow::Result<String> {
        let pem = std::fs::read(self.ca_cert())?;
        let der = overlay_api::tls::parse_certs(&pem, "CA certificate")?;
        Ok(overlay_api::tls::cert_hash(
            der.first().context("empty CA file")?,
        ))
    }

    fn etcd_endpoints(&self) -> String {
        (0..self.etcd_pids.len())
            .map(|i| format!("{}:{}", fabric_ip(1), ETCD_PORT + 10 * i as u16))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts the etcd members in the master namespace and waits until they accept writes.
    fn start_etcd(&mut self, members: usize) -> anyhow::Result<()> {
        let host = fabric_ip(1);
        let peers: Vec<String> = (0..members)
            .map(|i| format!("e{i}=http://{host}:{}", ETCD_PORT + 10 * i as u16 + 1))
            .collect();
        for i in 0..members {
            let client = format!("http://{host}:{}", ETCD_PORT + 10 * i as u16);
            let peer = format!("http://{host}:{}", ETCD_PORT + 10 * i as u16 + 1);
            let data = self.work_dir.join(format!("etcd-{i}"));
            let log = std::fs::File::create(self.log_path(&format!("etcd-{i}")))?;
            let mut cmd = self.lab.master().command("/usr/bin/etcd");
            cmd.args([
                "--name",
                &format!("e{i}"),
                "--data-dir",
                data.to_str().unwrap(),
            ])
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &peers.join(",")])
            .args(["--initial-cluster-token", self.lab.id()])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args([
                "--max-txn-ops",
                "4096",
                "--log-level",
                "warn",
                "--logger",
                "zap",
            ])
            .stdout(log.try_clone()?)
            .stderr(log);
            let pid = self.lab.spawn_command(cmd)?;
            self.etcd_pids.push(Some(pid));
        }
        let start = Instant::now();
        loop {
            let put = br#"{"key":"bGFiLXByb2Jl","value":"MQ=="}"#;
            let ok = in_netns(self.lab.master(), move || {
                let mut s = TcpStream::connect((host, ETCD_PORT))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                Ok(http_exchange(&mut s, "POST", "/v3/kv/put", Some(put))?)
            });
            if let Ok((200, body)) = ok
                && !String::from_utf8_lossy(&body).contains("\"error\"")
            {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(20) {
                let log = std::fs::read_to_string(self.log_path("etcd-0")).unwrap_or_default();
                bail!("etcd did not accept writes within 20 s; member 0's log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts master `index` on the etcd store and waits for its `/health`.
    fn start_shared_master(&mut self, index: usize, config: &Path) -> anyhow::Result<()> {
        let port = MASTER_PORT + index as u16;
        let name = format!("master-{index}");
        let log = std::fs::File::create(self.log_path(&name))?;
        let mut cmd = self
            .lab
            .master()
            .command(self.bin_dir.join("overlay-master"));
        cmd.args(["--config", config.to_str().unwrap()])
            .args(["--listen", &format!("{}:{port}", fabric_ip(1))])
            .args(["--tls-dir", self.tls_dir().to_str().unwrap()])
            .args(["--store", &format!("etcd://{}", self.etcd_endpoints())])
            .stdout(log.try_clone()?)
            .stderr(log);
        let pid = self.lab.spawn_command(cmd)?;
        if self.master_pids.len() <= index {
            self.master_pids.resize(index + 1, None);
        }
        self.master_pids[index] = Some(pid);
        let start = Instant::now();
        loop {
            let health = self.request_port(port, "GET", "/health", None);
            if let Ok((200, _)) = health {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(20) {
                let log = std::fs::read_to_string(self.log_path(&name)).unwrap_or_default();
                bail!("{name} did not become healthy within 20 s; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts master `index` (again, after `kill_master`) on the cluster's store and waits for
    /// its `/health`.
    pub fn start_master(&mut self, index: usize) -> anyhow::Result<()> {
        if self.master_pids.get(index).is_some_and(Option::is_some) {
            bail!("master {index} is running");
        }
        let config = self.master_config.clone();
        if self.etcd_store {
            return self.start_shared_master(index, &config);
        }
        if index != 0 {
            bail!("several masters need a shared store: set etcd_members");
        }
        let listen = SocketAddr::new(self.master_ip(), MASTER_PORT).to_string();
        let data = self.work_dir.join("master-data");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work_dir.join("master.log"))?;
        let mut cmd = self
            .lab
            .master()
            .command(self.bin_dir.join("overlay-master"));
        cmd.args([
            "--config",
            config.to_str().unwrap(),
            "--listen",
            &listen,
            "--data-dir",
            data.to_str().unwrap(),
            "--tls-dir",
            self.tls_dir().to_str().unwrap(),
        ])
        .args(&self.master_args)
        .stdout(log.try_clone()?)
        .stderr(log);
        let pid = self.lab.spawn_command(cmd)?;
        self.master_pids[0] = Some(pid);
        self.wait_master()
    }

    /// Kills master `index` (SIGKILL): agents fail over to the others.
    pub fn kill_master(&mut self, index: usize) {
        if let Some(pid) = self.master_pids.get_mut(index).and_then(Option::take) {
            self.lab.stop(pid, Duration::ZERO);
        }
    }

    /// Kills etcd member `index` (SIGKILL).
    pub fn kill_etcd(&mut self, index: usize) {
        if let Some(pid) = self.etcd_pids.get_mut(index).and_then(Option::take) {
            self.lab.stop(pid, Duration::ZERO);
        }
    }

    pub fn socket(&self, agent: &str) -> PathBuf {
        self.work_dir.join(format!("{agent}.sock"))
    }

    /// Where the agent of `agent` writes its CNI config lists (`NN-<network>.conflist`).
    pub fn cni_conf_dir(&self, agent: &str) -> PathBuf {
        self.work_dir.join(format!("{agent}-cni"))
    }

    /// Where the agent of `agent` writes Mesos' single-plugin configs (`<network>.conf`).
    pub fn mesos_cni_conf_dir(&self, agent: &str) -> PathBuf {
        self.work_dir.join(format!("{agent}-mesos-cni"))
    }

    /// A per-cluster scratch directory (removed with the cluster).
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    pub fn agent(&self, agent: &str) -> LocalClient {
        LocalClient::new(self.socket(agent))
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.work_dir.join(format!("{name}.log"))
    }

    /// One HTTPS request to the master as an operator (admin token), made from inside the
    /// master's namespace.
    pub fn master_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        self.request_port(MASTER_PORT, method, path, body)
    }

    fn request_port(
        &self,
        port: u16,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let tls = overlay_api::MasterTls::from_files(
            &self.ca_cert(),
            None,
            Some(&self.admin_token_file()),
        )?;
        let config = std::sync::Arc::new(tls.client_config()?);
        let bearer = format!("Bearer {}", tls.admin_token.unwrap_or_default());
        let (method, path, body) = (method.to_owned(), path.to_owned(), body.map(<[u8]>::to_vec));
        let master_ip = self.master_ip();
        in_netns(self.lab.master(), move || {
            let tcp = TcpStream::connect((master_ip, port)).context("connecting to the master")?;
            tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
            let name = rustls::pki_types::ServerName::IpAddress(master_ip.into());
            let connection = rustls::ClientConnection::new(config, name)?;
            let mut stream = rustls::StreamOwned::new(connection, tcp);
            Ok(http_exchange_with_headers(
                &mut stream,
                &method,
                &path,
                body.as_deref(),
                &[("Authorization", &bearer)],
            )?)
        })
    }

    fn wait_master(&self) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = self.master_request("GET", "/health", None) {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(20) {
                let log = std::fs::read_to_string(self.log_path("master")).unwrap_or_default();
                bail!("the master did not become healthy within 20 s; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts (or restarts) the agent of node `agent` and waits until it has applied the
    /// master's state.
    pub fn start_agent(&mut self, agent: &str) -> anyhow::Result<()> {
        self.spawn_agent(agent)?;
        self.wait_agent_ready(agent)
    }

    /// Starts the agent of node `agent` without waiting for it.
    pub fn spawn_agent(&mut self, agent: &str) -> anyhow::Result<()> {
        let node = self.lab.node(agent)?.clone();
        let bin = self.bin_dir.join("overlay-agent");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(agent))?;
        let mut cmd = node.command(&bin);
        for url in self.master_urls() {
            cmd.args(["--master", &url]);
        }
        let state_dir = self.work_dir.join(format!("{agent}-state"));
        let has_cert = state_dir.join("agent.crt").exists();
        if self.join_tokens {
            if !has_cert {
                let ip = self.lab.fabric_address(agent)?;
                let token = self.ca_command(&[
                    "token",
                    "create",
                    "--dir",
                    self.tls_dir().to_str().unwrap(),
                    "--ttl",
                    "10m",
                    "--ip",
                    &ip.to_string(),
                ])?;
                cmd.args(["--join-token", token.trim()])
                    .args(["--ca-cert-hash", &self.ca_cert_hash()?]);
            }
        } else {
            let ip = self.lab.fabric_address(agent)?;
            let out = self.tls_dir().join(agent);
            if !out.with_extension("crt").exists() {
                self.ca_command(&[
                    "cert",
                    "issue",
                    "--dir",
                    self.tls_dir().to_str().unwrap(),
                    "--ip",
                    &ip.to_string(),
                    "--out",
                    out.to_str().unwrap(),
                ])?;
            }
            cmd.args(["--ca", self.ca_cert().to_str().unwrap()])
                .args(["--cert", out.with_extension("crt").to_str().unwrap()])
                .args(["--key", out.with_extension("key").to_str().unwrap()]);
        }
        cmd.args([
            "--underlay-iface",
            "eth0",
            "--instance",
            &self.lab.pin_instance(agent),
            "--api-socket",
            self.socket(agent).to_str().unwrap(),
            "--mtu",
            &self.mtu.to_string(),
            "--state-dir",
            self.work_dir
                .join(format!("{agent}-state"))
                .to_str()
                .unwrap(),
            "--cni-conf-dir",
            self.cni_conf_dir(agent).to_str().unwrap(),
            "--mesos-cni-conf-dir",
            self.mesos_cni_conf_dir(agent).to_str().unwrap(),
        ])
        .args(self.agent_args.iter().map(|a| a.replace("{agent}", agent)))
        .envs(self.agent_env.iter().map(|(k, v)| (k, v)))
        .stdout(log.try_clone()?)
        .stderr(log);
        let pid = self.lab.spawn_command(cmd)?;
        self.agent_pids.insert(agent.to_owned(), pid);
        Ok(())
    }

    /// Waits until the agent of `agent` is registered and has applied the master's state.
    pub fn wait_agent_ready(&self, agent: &str) -> anyhow::Result<()> {
        let client = self.agent(agent);
        let start = Instant::now();
        loop {
            if let Ok(s) = client.status()
                && s.agent.is_some()
                && s.applied_revision > 0
            {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(20) {
                let log = std::fs::read_to_string(self.log_path(agent)).unwrap_or_default();
                bail!("agent {agent} was not ready within 20 s; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the agent process of `agent` (SIGTERM); its pinned datapath stays in the kernel.
    pub fn stop_agent(&mut self, agent: &str) {
        if let Some(pid) = self.agent_pids.remove(agent) {
            self.lab.stop(pid, Duration::from_secs(5));
        }
    }

    /// Adds an agent node and starts its agent: a new agent joining the cluster.
    pub fn join_agent(&mut self) -> anyhow::Result<String> {
        let node = self.lab.add_agent()?;
        self.start_agent(&node.role)?;
        Ok(node.role)
    }

    /// This agent's allocation, as its API reports it (DC/OS `AgentInfo`).
    pub fn agent_info(&self, agent: &str) -> anyhow::Result<AgentInfo> {
        Ok(self.agent(agent).overlay()?)
    }

    /// Creates a container on `agent` attached to `network` the way a runtime does: a fresh
    /// namespace, then the real CNI plugin (`ebpf-overlay` from the binary directory) run with
    /// `CNI_COMMAND=ADD` in the agent's namespace on the config list the agent wrote for
    /// `network`. The plugin makes the veth pair, the agent allocates the address from the CNI
    /// half of its subnet and wires the endpoint, the plugin sets address and default route.
    pub fn add_container(&mut self, agent: &str, network: &str) -> anyhow::Result<Container> {
        let (c, addrs) = self.add_container_addrs(agent, network)?;
        if addrs.ip4.is_none() && addrs.ip6.is_none() {
            bail!("the plugin gave the container on {network} no address");
        }
        Ok(c)
    }

    /// [`Cluster::add_container`], with every address the plugin's result gave the container:
    /// on an IPv6 or dual-stack network its IPv6 address too (`Container::node.ip` is its IPv4
    /// address, none on an IPv6-only network).
    pub fn add_container_addrs(
        &mut self,
        agent: &str,
        network: &str,
    ) -> anyhow::Result<(Container, ContainerAddrs)> {
        let conf = self
            .plugin_conf(agent, network)
            .with_context(|| format!("the CNI config of {network} on {agent}"))?;
        let mut node = self.lab.add_container_netns()?;
        let container_id = format!("{}-{}", self.lab.id(), node.role);
        let result = self
            .cni_add(agent, &container_id, &node, &conf)
            .with_context(|| format!("connecting a container to {network} on {agent}"))?;
        let mut addrs = ContainerAddrs::default();
        for ip in result["ips"].as_array().into_iter().flatten() {
            let addr: Option<IpAddr> = ip["address"]
                .as_str()
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse().ok());
            match addr {
                Some(IpAddr::V4(a)) => addrs.ip4 = Some(a),
                Some(IpAddr::V6(a)) => addrs.ip6 = Some(a),
                None => bail!("an address of the plugin's result does not parse: {result}"),
            }
        }
        let host_veth = result["interfaces"][0]["name"]
            .as_str()
            .with_context(|| format!("no host interface in the plugin's result {result}"))?
            .to_owned();
        node.ip = addrs.ip4;
        let c = Container {
            node,
            agent: agent.into(),
            host_veth,
            ifname: CONTAINER_IFNAME.into(),
        };
        self.lab.record_container(c.clone())?;
        Ok((c, addrs))
    }

    /// The plugin config a runtime hands the plugin for `network` on `agent`: the list's one
    /// plugin with the list's name and version (the agent writes the list once it has the
    /// network; waits a moment for it). Without a list (a disabled network has none), the same
    /// fields by hand, so that the agent's own refusal reaches the caller.
    fn plugin_conf(&self, agent: &str, network: &str) -> anyhow::Result<serde_json::Value> {
        let dir = self.cni_conf_dir(agent);
        let suffix = format!("-{network}.conflist");
        let deadline = Instant::now() + Duration::from_secs(2);
        let file = loop {
            let found = std::fs::read_dir(&dir).ok().and_then(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.ends_with(&suffix))
                })
            });
            match found {
                Some(f) => break f,
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                None => {
                    return Ok(serde_json::json!({
                        "cniVersion": "1.0.0",
                        "name": network,
                        "type": "ebpf-overlay",
                        "network": network,
                        "agent_socket": self.socket(agent),
                        "mtu": self.mtu,
                        "half": "cni",
                    }));
                }
            }
        };
        let list: serde_json::Value = serde_json::from_slice(&std::fs::read(&file)?)
            .with_context(|| format!("parsing {}", file.display()))?;
        let mut conf = list["plugins"][0].clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        Ok(conf)
    }

    /// Runs the CNI plugin's ADD in `agent`'s namespace; its JSON result.
    fn cni_add(
        &self,
        agent: &str,
        container_id: &str,
        container: &Node,
        conf: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        use std::{io::Write as _, process::Stdio};
        let plugin = self.bin_dir.join("ebpf-overlay");
        let mut cmd = self.lab.node(agent)?.command(&plugin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CNI_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", container.netns_path())
            .env("CNI_IFNAME", CONTAINER_IFNAME)
            .env("CNI_PATH", &self.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running the CNI plugin {}", plugin.display()))?;
        child
            .stdin
            .take()
            .context("plugin stdin")?
            .write_all(&serde_json::to_vec(conf)?)?;
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "CNI ADD failed ({}): {} {}",
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_str(&stdout)
            .with_context(|| format!("the plugin's result is not JSON: {stdout:?}"))
    }

    pub fn node(&self, role: &str) -> anyhow::Result<&Node> {
        self.lab.node(role)
    }
}

impl Cluster {
    /// Leaves the cluster running when dropped (processes, namespaces, work directory).
    pub fn keep(mut self) -> crate::LabRecord {
        self.keep = true;
        let lab = std::mem::replace(&mut self.lab, Lab::placeholder());
        lab.keep()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        }
    }
}
