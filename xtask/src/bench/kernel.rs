//! DC/OS's kernel datapath, built in a lab the way DC/OS builds it:
//!
//! - per agent a Linux bridge `m-dcos`, containers attached by the reference CNI `bridge` plugin
//!   with `host-local` IPAM over the agent's Mesos half (`isGateway`, `ipMasq: false`, MTU 1420),
//!   invoked as a CNI runtime does (CNI_* environment, config on stdin, plugins in /usr/lib/cni);
//! - a VXLAN device `vtep1024` (VNI 1024, UDP 64000, `nolearning`) with the agent's VTEP IP/MAC;
//! - for every other agent what dcos-net writes: a permanent neighbour entry (VTEP IP -> VTEP MAC),
//!   an FDB entry (VTEP MAC -> agent IP) and a route (agent subnet via VTEP IP);
//! - iptables MASQUERADE for overlay traffic leaving the overlay (DC/OS matches an ipset of
//!   overlay subnets; with one overlay that is the same as `-s 9.0.0.0/8 ! -d 9.0.0.0/8`);
//! - with IPv6 ([`KernelCluster::up_with_ipv6`], the `dcos6` overlay: fd01:b::/64, prefix6 80):
//!   the agent's `vtep_ip6` on `vtep1024`, per other agent the neighbour entry of its `vtep_ip6`
//!   and a route of its `subnet6` via it (the IPv4 FDB entry carries both families), and
//!   containers on the Docker bridge `d-dcos6` over the agent's Docker half (/81), attached by
//!   the same CNI `bridge` plugin (standing in for Docker's bridge driver).

use std::{
    io::Write as _,
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    process::Stdio,
};

use anyhow::{Context as _, bail};
use overlay_lab::{Lab, Node, dcos};

pub const CNI_DIR: &str = "/usr/lib/cni";

/// Agent `i` (1-based): subnet 9.0.i.0/24, VTEP 44.128.0.i, MAC 70:b3:d5:80:00:0i.
fn vtep_ip(i: usize) -> String {
    format!("44.128.0.{i}")
}
fn vtep_mac(i: usize) -> String {
    format!("70:b3:d5:80:00:{i:02x}")
}
fn agent_subnet(i: usize) -> String {
    format!("9.0.{i}.0/24")
}
/// Agent `i`'s `vtep_ip6` fd01:a::i and `dcos6` block fd01:b::i:0:0:0/80 (its Docker half the
/// second /81, fd01:b::i:8000:0:0/81).
fn vtep_ip6(i: usize) -> String {
    format!("fd01:a::{i:x}")
}
fn agent_subnet6(i: usize) -> String {
    format!("fd01:b::{i:x}:0:0:0/80")
}
fn docker_half6(i: usize) -> String {
    format!("fd01:b::{i:x}:8000:0:0/81")
}

/// A lab whose agents run DC/OS's kernel datapath.
pub struct KernelCluster {
    pub lab: Lab,
    cni_data: PathBuf,
    containers: usize,
    ipv6: bool,
}

impl KernelCluster {
    pub fn up(agents: usize) -> anyhow::Result<KernelCluster> {
        KernelCluster::build(agents, false)
    }

    /// [`KernelCluster::up`] carrying `dcos6` too (see the module doc).
    pub fn up_with_ipv6(agents: usize) -> anyhow::Result<KernelCluster> {
        KernelCluster::build(agents, true)
    }

    fn build(agents: usize, ipv6: bool) -> anyhow::Result<KernelCluster> {
        if !std::path::Path::new(CNI_DIR).join("bridge").exists() {
            bail!(
                "{CNI_DIR}/bridge missing: `cargo xtask setup` installs containernetworking-plugins"
            );
        }
        let lab = Lab::up(overlay_lab::LabSpec { agents, id: None })?;
        let cni_data = std::env::temp_dir().join(format!("{}-cni", lab.id()));
        let k = KernelCluster {
            lab,
            cni_data,
            containers: 0,
            ipv6,
        };
        let nodes: Vec<Node> = k.lab.agents().into_iter().cloned().collect();
        for (idx, a) in nodes.iter().enumerate() {
            k.configure_agent(idx + 1, a, &nodes)
                .with_context(|| format!("kernel datapath on {}", a.role))?;
        }
        Ok(k)
    }

    fn configure_agent(&self, i: usize, a: &Node, all: &[Node]) -> anyhow::Result<()> {
        let (vip, vmac) = (vtep_ip(i), vtep_mac(i));
        a.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        dcos::add_vtep(a, &format!("{vip}/20"), &vmac)?;
        if self.ipv6 {
            dcos::add_vtep_ip6(a, &format!("{}/64", vtep_ip6(i)))?;
            // Docker turns this on for an IPv6 network; the bridge plugin would too.
            a.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
        }
        for (jdx, peer) in all.iter().enumerate() {
            let j = jdx + 1;
            if j == i {
                continue;
            }
            let peer_ip = peer.ip.context("agent without fabric IP")?.to_string();
            dcos::add_peer(a, &vtep_ip(j), &vtep_mac(j), &peer_ip, &agent_subnet(j))?;
            if self.ipv6 {
                dcos::add_peer6(a, &vtep_ip6(j), &vtep_mac(j), &agent_subnet6(j))?;
            }
        }
        a.exec(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                "9.0.0.0/8",
                "!",
                "-d",
                "9.0.0.0/8",
                "-j",
                "MASQUERADE",
            ],
        )?;
        Ok(())
    }

    /// A container on agent `agent` (1-based index), attached by the CNI bridge plugin; returns
    /// its node (namespace `<lab>-k<n>`, removed with the lab) with the address IPAM gave it.
    pub fn add_container(&mut self, agent: usize) -> anyhow::Result<Node> {
        let ipam = serde_json::json!({
            "type": "host-local",
            "subnet": format!("9.0.{agent}.0/25"),
            "routes": [{"dst": "0.0.0.0/0"}],
        });
        let (node, addr) = self.cni_add(agent, "dcos", "m-dcos", ipam)?;
        let IpAddr::V4(ip) = addr else {
            bail!("CNI gave an IPv4 network the address {addr}")
        };
        Ok(Node {
            ip: Some(ip),
            ..node
        })
    }

    /// A Docker container on `dcos6` on agent `agent` (1-based; a cluster from
    /// [`KernelCluster::up_with_ipv6`]): on bridge `d-dcos6`, its address from the agent's Docker
    /// half, default route via the bridge. Returns its node and IPv6 address.
    pub fn add_container6(&mut self, agent: usize) -> anyhow::Result<(Node, Ipv6Addr)> {
        if !self.ipv6 {
            bail!("add_container6 on a kernel cluster without IPv6 (up_with_ipv6)");
        }
        let ipam = serde_json::json!({
            "type": "host-local",
            "subnet": docker_half6(agent),
            "routes": [{"dst": "::/0"}],
        });
        let (node, addr) = self.cni_add(agent, "dcos6", "d-dcos6", ipam)?;
        let IpAddr::V6(ip) = addr else {
            bail!("CNI gave dcos6 the address {addr}")
        };
        Ok((node, ip))
    }

    /// CNI ADD of the bridge plugin for network `name` on `bridge` with `ipam` (its `dataDir`
    /// filled in) in a fresh namespace: the node (without an IPv4 address) and the address.
    fn cni_add(
        &mut self,
        agent: usize,
        name: &str,
        bridge: &str,
        mut ipam: serde_json::Value,
    ) -> anyhow::Result<(Node, IpAddr)> {
        let a = self.lab.node(&format!("a{agent}"))?.clone();
        self.containers += 1;
        let role = format!("k{}", self.containers);
        let netns = format!("{}-{role}", self.lab.id());
        overlay_lab::run("ip", &["netns", "add", &netns])?;
        overlay_lab::run("ip", &["-n", &netns, "link", "set", "lo", "up"])?;
        let data_dir = self.cni_data.join(format!("a{agent}"));
        std::fs::create_dir_all(&data_dir)?;
        ipam["dataDir"] = serde_json::json!(data_dir);
        let config = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": name,
            "type": "bridge",
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": false,
            "mtu": 1420,
            "ipam": ipam,
        });
        let mut cmd = a.command(std::path::Path::new(CNI_DIR).join("bridge"));
        cmd.env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &netns)
            .env("CNI_NETNS", format!("/run/netns/{netns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_DIR)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("running the CNI bridge plugin")?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(config.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "CNI bridge ADD failed ({}): {stdout} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let result: serde_json::Value = serde_json::from_str(&stdout).context("CNI result JSON")?;
        let addr = result["ips"][0]["address"]
            .as_str()
            .context("CNI result without an address")?;
        let ip: IpAddr = addr
            .split('/')
            .next()
            .unwrap()
            .parse()
            .with_context(|| format!("CNI address {addr}"))?;
        Ok((
            Node {
                role,
                netns,
                ip: None,
            },
            ip,
        ))
    }
}

impl Drop for KernelCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.cni_data);
    }
}
