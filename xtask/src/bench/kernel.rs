//! DC/OS's kernel datapath, built in a lab the way DC/OS builds it:
//!
//! - per agent a Linux bridge `m-dcos`, containers attached by the reference CNI `bridge` plugin
//!   with `host-local` IPAM over the agent's Mesos half (`isGateway`, `ipMasq: false`, MTU 1420),
//!   invoked as a CNI runtime does (CNI_* environment, config on stdin, plugins in /usr/lib/cni);
//! - a VXLAN device `vtep1024` (VNI 1024, UDP 64000, `nolearning`) with the agent's VTEP IP/MAC;
//! - for every other agent what dcos-net writes: a permanent neighbour entry (VTEP IP -> VTEP MAC),
//!   an FDB entry (VTEP MAC -> agent IP) and a route (agent subnet via VTEP IP);
//! - iptables MASQUERADE for overlay traffic leaving the overlay (DC/OS matches an ipset of
//!   overlay subnets; with one overlay that is the same as `-s 9.0.0.0/8 ! -d 9.0.0.0/8`).

use std::{io::Write as _, net::Ipv4Addr, path::PathBuf, process::Stdio};

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

/// A lab whose agents run DC/OS's kernel datapath.
pub struct KernelCluster {
    pub lab: Lab,
    cni_data: PathBuf,
    containers: usize,
}

impl KernelCluster {
    pub fn up(agents: usize) -> anyhow::Result<KernelCluster> {
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
        for (jdx, peer) in all.iter().enumerate() {
            let j = jdx + 1;
            if j == i {
                continue;
            }
            let peer_ip = peer.ip.context("agent without fabric IP")?.to_string();
            dcos::add_peer(a, &vtep_ip(j), &vtep_mac(j), &peer_ip, &agent_subnet(j))?;
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
        let a = self.lab.node(&format!("a{agent}"))?.clone();
        self.containers += 1;
        let role = format!("k{}", self.containers);
        let netns = format!("{}-{role}", self.lab.id());
        overlay_lab::run("ip", &["netns", "add", &netns])?;
        overlay_lab::run("ip", &["-n", &netns, "link", "set", "lo", "up"])?;
        let data_dir = self.cni_data.join(format!("a{agent}"));
        std::fs::create_dir_all(&data_dir)?;
        let config = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "dcos",
            "type": "bridge",
            "bridge": "m-dcos",
            "isGateway": true,
            "ipMasq": false,
            "mtu": 1420,
            "ipam": {
                "type": "host-local",
                "subnet": format!("9.0.{agent}.0/25"),
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": data_dir,
            }
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
        let ip: Ipv4Addr = addr
            .split('/')
            .next()
            .unwrap()
            .parse()
            .with_context(|| format!("CNI address {addr}"))?;
        Ok(Node {
            role,
            netns,
            ip: Some(ip),
        })
    }
}

impl Drop for KernelCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.cni_data);
    }
}
