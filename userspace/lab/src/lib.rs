//! A cluster on one machine, built from network namespaces: the test bed of the tests, the demo
//! and the benchmarks.
//!
//! ```text
//!              fabric netns: bridge "br0" (the physical switch stand-in)
//!        ┌──────────┬──────────┬──────────┬──────────┐
//!     master     agent 1    agent 2     ...     external host
//!   10.250.0.1  10.250.0.11 10.250.0.12         10.250.0.254
//!                  │ vc0
//!               container netns (eth0)
//! ```
//!
//! Every address lives inside the lab's namespaces; nothing is routed from the root namespace.
//! Namespace names start with a per-lab id (`eo<6 hex>-`), so labs run side by side. The lab is
//! torn down when dropped (panics included); `Lab::down_stale` removes what a crashed run left,
//! using the record each lab writes under [`STATE_DIR`].
//!
//! [`cluster`] builds on the lab: a real master and real agents in it, containers connected
//! through the agent's API.

pub mod cluster;
pub mod dcos;
pub mod vm;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// Where labs record themselves, so that `lab down` can clean up after a crashed run.
pub const STATE_DIR: &str = "/run/ebpf-overlay-lab";
/// Prefix of every lab's namespace names.
pub const NETNS_PREFIX: &str = "eo";
/// The underlay subnet inside every lab (labs are isolated from each other by namespaces).
pub const FABRIC_PREFIX_LEN: u8 = 24;
/// bpffs used for pins; the lab removes its agents' pins below it on teardown.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Address of a node on the fabric.
pub fn fabric_ip(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, 0, host)
}

/// Prefix length of the IPv6 fabric ([`Fabric::Ipv6`]).
pub const FABRIC6_PREFIX_LEN: u8 = 64;

/// Address of a node on an IPv6 fabric: `fd00:250::<host>` (hex), the IPv4 fabric's host
/// numbers.
pub fn fabric_ip6(host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, host as u16)
}

/// The address family of a lab's fabric (the underlay). Containers' overlay addresses do not
/// depend on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fabric {
    /// Every node has an IPv4 address on the fabric ([`fabric_ip`]); the default.
    #[default]
    Ipv4,
    /// IPv6 only: every node has an IPv6 address ([`fabric_ip6`]) and no IPv4 address on the
    /// fabric (agents then run an IPv6 underlay).
    Ipv6,
}

impl Fabric {
    /// The fabric address of host number `host` (1 the master, 10 + N agent N, 254 external).
    pub fn ip(self, host: u8) -> IpAddr {
        match self {
            Fabric::Ipv4 => IpAddr::V4(fabric_ip(host)),
            Fabric::Ipv6 => IpAddr::V6(fabric_ip6(host)),
        }
    }
}

/// Runs a command, failing with its stderr if it fails.
pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd} (is it installed? `cargo xtask setup`)"))?;
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A netlink socket inside the named namespace `netns`.
fn netlink(netns: &str) -> anyhow::Result<overlay_netlink::Handle> {
    let ns = overlay_netlink::Netns::named(netns)?;
    Ok(overlay_netlink::Handle::in_netns(&ns)?)
}

/// A node of the lab: one network namespace.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Node {
    /// Role within the lab: `master`, `a1`, `a2`, ..., `ext`, `c1`, ...
    pub role: String,
    /// Network namespace name (`ip netns`), also under /run/netns.
    pub netns: String,
    /// Address on the fabric (containers: their overlay address, if any).
    pub ip: Option<Ipv4Addr>,
}

impl Node {
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// Runs a command inside this node's namespace; fails with stderr on failure. Through
    /// `ip netns exec`, so that the command's /sys is the namespace's (its devices under
    /// /sys/class/net); [`Node::command`] keeps the host's /sys.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["netns", "exec", &self.netns, cmd];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a command inside this node's namespace and returns whether it succeeded.
    pub fn try_exec(&self, cmd: &str, args: &[&str]) -> bool {
        self.exec(cmd, args).is_ok()
    }

    /// A command that runs in this node's namespace without a new mount namespace (unlike
    /// `ip netns exec`), so that it sees the host's bpffs at /sys/fs/bpf.
    /// The child enters the namespace with `setns` between fork and exec (no `nsenter`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        match overlay_netlink::Netns::open(self.netns_path()) {
            Ok(ns) => ns.prepare_command(&mut c),
            Err(e) => {
                // Spawning fails with the reason rather than running in the wrong namespace.
                let msg = e.to_string();
                // SAFETY: the closure only builds an error value.
                unsafe {
                    std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
                        Err(std::io::Error::other(msg.clone()))
                    });
                }
            }
        }
        c
    }

    /// A netlink socket inside this node's namespace.
    pub fn netlink(&self) -> anyhow::Result<overlay_netlink::Handle> {
        netlink(&self.netns)
    }

    /// ifindex of a link in this namespace.
    pub fn ifindex(&self, ifname: &str) -> anyhow::Result<u32> {
        let l = self
            .netlink()?
            .link(ifname)
            .with_context(|| format!("no ifindex for {ifname} in {}", self.netns))?;
        Ok(l.ifindex)
    }

    /// MAC address of a link in this namespace.
    pub fn mac(&self, ifname: &str) -> anyhow::Result<[u8; 6]> {
        let l = self
            .netlink()?
            .link(ifname)
            .with_context(|| format!("no MAC for {ifname} in {}", self.netns))?;
        Ok(l.mac)
    }

    /// Pings `dst` from this node; true if a reply came back.
    pub fn ping(&self, dst: Ipv4Addr) -> bool {
        self.try_exec("ping", &["-c", "1", "-W", "1", "-q", &dst.to_string()])
    }

    /// Pings `dst` (either family) from this node; true if a reply came back.
    pub fn ping_ip(&self, dst: IpAddr) -> bool {
        self.try_exec("ping", &["-c", "1", "-W", "1", "-q", &dst.to_string()])
    }
}

/// A container namespace attached to an agent by a veth pair.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Container {
    pub node: Node,
    /// Role of the agent it is attached to.
    pub agent: String,
    /// Name of the host-side veth, inside the agent's namespace.
    pub host_veth: String,
    /// Name of the container-side interface.
    pub ifname: String,
}

/// What a lab has, as recorded in its state file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LabRecord {
    pub id: String,
    pub nodes: Vec<Node>,
    pub containers: Vec<Container>,
    /// Process ids the lab started.
    pub pids: Vec<u32>,
    /// bpffs pin instance names of the lab's agents (`<id>-a1`, ...).
    pub pin_instances: Vec<String>,
    /// The fabric's family (records of older labs have none: IPv4).
    #[serde(default)]
    pub fabric: Fabric,
    /// Fabric addresses of the nodes of an IPv6 fabric, by role (`Node::ip` holds IPv4 ones).
    #[serde(default)]
    pub fabric6: BTreeMap<String, Ipv6Addr>,
}

/// A running lab. Dropping it tears everything down.
pub struct Lab {
    record: LabRecord,
    children: Vec<Child>,
    keep: bool,
}

static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

fn new_lab_id() -> String {
    // Unique across processes (pid) and within one (sequence), short enough for netns names.
    let pid = std::process::id();
    let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mix = pid.wrapping_mul(2_654_435_761) ^ seq.wrapping_mul(40_503) ^ nanos;
    format!("{NETNS_PREFIX}{:06x}", mix & 0xff_ffff)
}

/// A fresh id no lab on this host (recorded, or with namespaces left) has: test binaries run
/// concurrently, each making labs.
fn unused_lab_id() -> String {
    loop {
        let id = new_lab_id();
        let recorded = Path::new(STATE_DIR).join(format!("{id}.json")).exists();
        if !recorded && lab_namespaces(&id).is_empty() {
            return id;
        }
    }
}

/// The shape of a lab.
#[derive(Clone, Debug)]
pub struct LabSpec {
    pub agents: usize,
    /// Use this id instead of a fresh one (`cargo xtask lab up --id`).
    pub id: Option<String>,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            agents: 2,
            id: None,
        }
    }
}

impl Lab {
    /// Builds the fabric, a master, `spec.agents` agents and the external host.
    pub fn up(spec: LabSpec) -> anyhow::Result<Lab> {
        Lab::up_on(spec, Fabric::Ipv4)
    }

    /// [`Lab::up`] on a fabric of the family `fabric`.
    pub fn up_on(spec: LabSpec, fabric: Fabric) -> anyhow::Result<Lab> {
        if spec.agents == 0 || spec.agents > 200 {
            bail!("a lab has 1 to 200 agents, not {}", spec.agents);
        }
        ensure_bpffs()?;
        let id = spec.id.unwrap_or_else(unused_lab_id);
        let mut lab = Lab {
            record: LabRecord {
                id: id.clone(),
                fabric,
                ..Default::default()
            },
            children: vec![],
            keep: false,
        };
        lab.build(spec.agents)
            .with_context(|| format!("building lab {id}"))?;
        Ok(lab)
    }

    fn build(&mut self, agents: usize) -> anyhow::Result<()> {
        let fabric = self.add_netns("fabric", None)?;
        let mut nl = fabric.netlink()?;
        nl.add_bridge("br0")?;
        nl.set_up("br0")?;
        self.attach_to_fabric("master", 1)?;
        for i in 1..=agents {
            self.attach_to_fabric(&format!("a{i}"), 10 + i as u8)?;
            self.record
                .pin_instances
                .push(format!("{}-a{i}", self.record.id));
        }
        self.attach_to_fabric("ext", 254)?;
        self.save()
    }

    fn add_netns(&mut self, role: &str, ip_addr: Option<Ipv4Addr>) -> anyhow::Result<Node> {
        let node = Node {
            role: role.into(),
            netns: format!("{}-{role}", self.record.id),
            ip: ip_addr,
        };
        // Record before creating, so that a failure half-way is still cleaned up.
        self.record.nodes.push(node.clone());
        self.save()?;
        overlay_netlink::Netns::create_named(&node.netns)?;
        node.netlink()?.set_up("lo")?;
        Ok(node)
    }

    fn attach_to_fabric(&mut self, role: &str, host: u8) -> anyhow::Result<Node> {
        let addr = fabric_ip(host);
        let ipv6 = self.record.fabric == Fabric::Ipv6;
        let node = self.add_netns(role, (!ipv6).then_some(addr))?;
        let fabric = self.netns_of("fabric")?;
        let port = format!("p-{role}");
        let fabric_ns = overlay_netlink::Netns::named(&fabric)?;
        let mut nl = node.netlink()?;
        nl.add_veth("eth0", &port, 1500, Some(&fabric_ns))?;
        let mut fnl = overlay_netlink::Handle::in_netns(&fabric_ns)?;
        let br0 = fnl.link("br0")?.ifindex;
        fnl.set_master(&port, br0)?;
        fnl.set_up(&port)?;
        let ifindex = nl.link("eth0")?.ifindex;
        if ipv6 {
            let addr6 = fabric_ip6(host);
            // No duplicate-address detection: the address is usable at once (the lab hands
            // out unique ones), as a test expects when it starts an agent right after.
            node.exec(
                "ip",
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{addr6}/{FABRIC6_PREFIX_LEN}"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
            self.record.fabric6.insert(role.to_owned(), addr6);
            self.save()?;
        } else {
            nl.add_address(overlay_netlink::Address {
                ifindex,
                ip: addr,
                prefix_len: FABRIC_PREFIX_LEN,
            })?;
        }
        nl.set_up("eth0")?;
        Ok(node)
    }

    /// The lab's fabric family.
    pub fn fabric(&self) -> Fabric {
        self.record.fabric
    }

    /// The fabric address of node `role`, of the fabric's family.
    pub fn fabric_address(&self, role: &str) -> anyhow::Result<IpAddr> {
        match self.record.fabric {
            Fabric::Ipv6 => self.record.fabric6.get(role).copied().map(IpAddr::V6),
            Fabric::Ipv4 => self.node(role)?.ip.map(IpAddr::V4),
        }
        .with_context(|| format!("lab {} node {role} has no fabric address", self.record.id))
    }

    /// Adds one more agent node to the fabric (a new agent joining the cluster).
    pub fn add_agent(&mut self) -> anyhow::Result<Node> {
        let n = self.agents().len() + 1;
        let node = self.attach_to_fabric(&format!("a{n}"), 10 + n as u8)?;
        self.record
            .pin_instances
            .push(format!("{}-a{n}", self.record.id));
        self.save()?;
        Ok(node)
    }

    fn netns_of(&self, role: &str) -> anyhow::Result<String> {
        self.node(role).map(|n| n.netns.clone())
    }

    pub fn id(&self) -> &str {
        &self.record.id
    }

    pub fn record(&self) -> &LabRecord {
        &self.record
    }

    /// The node with this role (`master`, `a1`, `ext`, `fabric`, a container's role).
    pub fn node(&self, role: &str) -> anyhow::Result<&Node> {
        self.record
            .nodes
            .iter()
            .find(|n| n.role == role)
            .with_context(|| format!("lab {} has no node {role}", self.record.id))
    }

    pub fn agents(&self) -> Vec<&Node> {
        self.record
            .nodes
            .iter()
            .filter(|n| is_agent_role(&n.role))
            .collect()
    }

    pub fn master(&self) -> &Node {
        self.node("master").expect("every lab has a master")
    }

    pub fn external(&self) -> &Node {
        self.node("ext").expect("every lab has an external host")
    }

    /// The bpffs pin instance name for an agent role.
    pub fn pin_instance(&self, agent_role: &str) -> String {
        format!("{}-{agent_role}", self.record.id)
    }

    pub fn containers(&self) -> &[Container] {
        &self.record.containers
    }

    /// Adds a container namespace attached to `agent_role` through a veth pair: the host side
    /// (`vc<N>`) in the agent namespace, `eth0` in the container with `ip/prefix_len` and a
    /// default route via `gateway`, MTU `mtu`. No address on the host side: the datapath, not a
    /// bridge or routes, connects it.
    pub fn add_container(
        &mut self,
        agent_role: &str,
        ip_addr: Ipv4Addr,
        prefix_len: u8,
        gateway: Ipv4Addr,
        mtu: u32,
    ) -> anyhow::Result<Container> {
        let agent = self.node(agent_role)?.clone();
        let n = self.record.containers.len() + 1;
        let node = self.add_netns(&format!("c{n}"), Some(ip_addr))?;
        let host_veth = format!("vc{n}");
        let container_ns = overlay_netlink::Netns::named(&node.netns)?;
        let mut anl = agent.netlink()?;
        anl.add_veth(&host_veth, "eth0", mtu, Some(&container_ns))?;
        anl.set_up(&host_veth)?;
        let mut cnl = overlay_netlink::Handle::in_netns(&container_ns)?;
        let ifindex = cnl.link("eth0")?.ifindex;
        cnl.add_address(overlay_netlink::Address {
            ifindex,
            ip: ip_addr,
            prefix_len,
        })?;
        cnl.set_up("eth0")?;
        cnl.add_route(overlay_netlink::Route::default_via(gateway, ifindex))?;
        let c = Container {
            node,
            agent: agent_role.into(),
            host_veth,
            ifname: "eth0".into(),
        };
        self.record.containers.push(c.clone());
        self.save()?;
        Ok(c)
    }

    /// Adds an empty container namespace (`c<N>`, loopback up) for a runtime path to wire
    /// (the CNI plugin in [`cluster::Cluster::add_container`]); record it with
    /// [`Lab::record_container`] once wired.
    pub fn add_container_netns(&mut self) -> anyhow::Result<Node> {
        let n = self.record.containers.len() + 1;
        let mut role = format!("c{n}");
        let mut k = n;
        while self.record.nodes.iter().any(|x| x.role == role) {
            k += 1;
            role = format!("c{k}");
        }
        self.add_netns(&role, None)
    }

    /// Records a container wired by someone else (see [`Lab::add_container_netns`]).
    pub fn record_container(&mut self, c: Container) -> anyhow::Result<()> {
        if let Some(n) = self.record.nodes.iter_mut().find(|n| n.role == c.node.role) {
            n.ip = c.node.ip;
        }
        self.record.containers.push(c);
        self.save()
    }

    /// Starts a process in `role`'s namespace (see [`Node::command`]); it is killed on teardown.
    pub fn spawn(
        &mut self,
        role: &str,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
    ) -> anyhow::Result<u32> {
        let node = self.node(role)?.clone();
        let mut cmd = node.command(program);
        cmd.args(args).stdin(Stdio::null());
        self.spawn_command(cmd)
    }

    /// Starts a prepared command; it is killed on teardown.
    pub fn spawn_command(&mut self, mut cmd: Command) -> anyhow::Result<u32> {
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let pid = child.id();
        self.children.push(child);
        self.record.pids.push(pid);
        self.save()?;
        Ok(pid)
    }

    /// Stops a process the lab started (SIGTERM, then SIGKILL after `grace`).
    pub fn stop(&mut self, pid: u32, grace: std::time::Duration) {
        if let Some(pos) = self.children.iter().position(|c| c.id() == pid) {
            let mut child = self.children.remove(pos);
            stop_child(&mut child, grace);
        }
        self.record.pids.retain(|p| *p != pid);
        let _ = self.save();
    }

    /// A lab that owns nothing (dropping it does nothing): what is left in a kept cluster.
    pub(crate) fn placeholder() -> Lab {
        Lab {
            record: LabRecord::default(),
            children: vec![],
            keep: true,
        }
    }

    /// Leaves the lab running when dropped (`cargo xtask lab up`).
    pub fn keep(mut self) -> LabRecord {
        self.keep = true;
        self.record.clone()
    }

    fn state_file(id: &str) -> PathBuf {
        Path::new(STATE_DIR).join(format!("{id}.json"))
    }

    fn save(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
        let path = Self::state_file(&self.record.id);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.record)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Every lab recorded on this machine.
    pub fn recorded() -> anyhow::Result<Vec<LabRecord>> {
        let mut labs = vec![];
        let Ok(dir) = std::fs::read_dir(STATE_DIR) else {
            return Ok(labs);
        };
        for entry in dir {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let rec: LabRecord = serde_json::from_slice(&std::fs::read(&path)?)
                    .with_context(|| format!("reading lab record {}", path.display()))?;
                labs.push(rec);
            }
        }
        Ok(labs)
    }

    /// Tears down a lab from its record: processes, pins, namespaces, record. Also removes any
    /// namespace with the lab's prefix that the record missed. Errors are collected, not fatal:
    /// as much as possible is removed.
    pub fn down_record(rec: &LabRecord) -> anyhow::Result<()> {
        let mut errors = vec![];
        for pid in &rec.pids {
            signal(*pid, libc::SIGKILL);
        }
        for inst in &rec.pin_instances {
            if let Err(e) = remove_pins(inst) {
                errors.push(e.to_string());
            }
        }
        for ns in lab_namespaces(&rec.id) {
            if let Err(e) = overlay_netlink::Netns::delete_named(&ns) {
                errors.push(e.to_string());
            }
        }
        let _ = std::fs::remove_file(Self::state_file(&rec.id));
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("tearing down lab {}: {}", rec.id, errors.join("; "))
        }
    }

    /// Removes every lab recorded on this machine (left by crashed runs, or kept on purpose).
    pub fn down_all() -> anyhow::Result<usize> {
        let labs = Self::recorded()?;
        for rec in &labs {
            Self::down_record(rec)?;
        }
        Ok(labs.len())
    }
}

fn is_agent_role(role: &str) -> bool {
    role.strip_prefix('a')
        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// Namespaces on this machine that belong to lab `id`.
pub fn lab_namespaces(id: &str) -> Vec<String> {
    let prefix = format!("{id}-");
    overlay_netlink::Netns::list_named()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// Removes the pins of one agent instance (all layout versions).
pub fn remove_pins(instance: &str) -> anyhow::Result<()> {
    let root = Path::new(BPFFS).join(overlay_datapath::PIN_ROOT);
    let Ok(versions) = std::fs::read_dir(&root) else {
        return Ok(());
    };
    for v in versions {
        let vdir = v?.path();
        let dir = vdir.join(instance);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing pins {}", dir.display()))?;
        }
        let _ = std::fs::remove_dir(&vdir); // only if empty
    }
    let _ = std::fs::remove_dir(&root); // only if empty
    Ok(())
}

/// Makes sure a bpffs is mounted at /sys/fs/bpf.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    if mounts.lines().any(|l| {
        let f: Vec<_> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == BPFFS && f[2] == "bpf"
    }) {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS)?;
    run("mount", &["-t", "bpf", "bpf", BPFFS]).context("mounting bpffs at /sys/fs/bpf")?;
    Ok(())
}

fn stop_child(child: &mut Child, grace: std::time::Duration) {
    signal(child.id(), libc::SIGTERM);
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends `signal` to `pid`; a process that is already gone is fine.
fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for child in &mut self.children {
            stop_child(child, std::time::Duration::from_millis(500));
        }
        self.record.pids.clear();
        if let Err(e) = Lab::down_record(&self.record) {
            eprintln!("lab teardown: {e:#}");
        }
    }
}

/// Status of the labs on this machine, for `cargo xtask lab status`.
pub fn status() -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut out = BTreeMap::new();
    for rec in Lab::recorded()? {
        out.insert(rec.id.clone(), lab_namespaces(&rec.id));
    }
    Ok(out)
}

/// Runs `f` on a thread that has entered `node`'s network namespace, so that in-process code
/// (loading and attaching BPF programs by interface name, say) acts inside the lab.
pub fn in_netns<T: Send + 'static>(
    node: &Node,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    use std::os::fd::AsRawFd as _;
    let path = node.netns_path();
    std::thread::spawn(move || {
        let ns =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: setns on this thread only; the fd is valid for the call.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("entering network namespace {}", path.display()));
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in network namespace panicked"))?
}
