//! A real dockerd (Debian's docker.io 20.10) per lab agent, inside the agent's network
//! namespace and a private mount namespace with its own `/run` and `/etc/docker` (the global
//! `/run/docker/plugins` and `/etc/docker/key.json` stay untouched, and its containerd's
//! `/opt/containerd`): `/run/docker/plugins` there is the directory of the agent's
//! `--docker-plugin-socket`. Private `--data-root`, `--exec-root`, socket; no bridge, no
//! iptables. The agents create the Docker networks themselves (`--docker-host`): use
//! [`agent_args`] in the cluster spec.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use overlay_lab::cluster::Cluster;
use serde_json::Value;

pub const DOCKER: &str = "/usr/bin/docker";
/// The image `docker import` of [`super::busybox_tar`] is named.
pub const IMAGE: &str = "eo-busybox:latest";

/// The agent flags that make each agent serve the Docker driver for the dockerd of
/// [`Dockerd::start`] with the same `root`.
pub fn agent_args(root: &Path) -> Vec<String> {
    let tmpl = root.join("{agent}");
    vec![
        "--docker-plugin-socket".into(),
        tmpl.join("plugins/ebpf-overlay.sock").display().to_string(),
        "--docker-host".into(),
        tmpl.join("docker.sock").display().to_string(),
    ]
}

/// Where agent `agent`'s Docker things live under `root`.
pub fn docker_dir(root: &Path, agent: &str) -> PathBuf {
    root.join(agent)
}

pub struct Dockerd {
    pub dir: PathBuf,
    pub child: std::process::Child,
    /// Reaped already (stopped for a restart).
    pub stopped: bool,
}

impl Dockerd {
    pub fn start(c: &Cluster, agent: &str, root: &Path) -> Dockerd {
        let d = Dockerd::spawn(c, agent, root);
        d.wait_ready();
        d
    }

    /// Starts dockerd without waiting for it.
    pub fn spawn(c: &Cluster, agent: &str, root: &Path) -> Dockerd {
        let dir = docker_dir(root, agent);
        for d in ["data", "exec", "plugins"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let script = format!(
            "set -e; mount -t tmpfs eo-test /run; mkdir -p /run/docker/plugins; \
             mount --bind {plugins} /run/docker/plugins; \
             if [ -d /etc/docker ]; then mount -t tmpfs eo-test /etc/docker; fi; \
             mount -t tmpfs eo-test /opt; \
             exec dockerd --data-root {d}/data --exec-root {d}/exec --pidfile {d}/exec/docker.pid \
             -H unix://{d}/docker.sock --iptables=false --ip6tables=false --bridge=none \
             --storage-driver vfs --userland-proxy=false --shutdown-timeout 1 --log-level warn",
            plugins = dir.join("plugins").display(),
            d = dir.display(),
        );
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!(
                "--net={}",
                c.node(agent).unwrap().netns_path().display()
            ))
            .args([
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Dockerd {
            dir,
            child,
            stopped: false,
        }
    }

    pub fn wait_ready(&self) {
        let d = self;
        let start = Instant::now();
        while !d.cmd(&["version"]).output().unwrap().status.success() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "dockerd did not start: {}",
                std::fs::read_to_string(d.dir.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(DOCKER);
        c.arg("-H")
            .arg(format!("unix://{}", self.dir.join("docker.sock").display()))
            .args(args)
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cmd(args).output()?;
        if !out.status.success() {
            anyhow::bail!(
                "docker {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    pub fn container_ip(&self, name: &str) -> Ipv4Addr {
        let out = self
            .run(&[
                "exec", name, "ip", "-4", "-o", "addr", "show", "dev", "eth0",
            ])
            .unwrap();
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {out:?}"))
    }

    pub fn pings(&self, from: &str, to: Ipv4Addr) -> bool {
        self.run(&["exec", from, "ping", "-c", "1", "-W", "2", &to.to_string()])
            .is_ok()
    }

    /// Waits until the agent has created Docker network `name` with the ebpf-overlay driver.
    pub fn wait_network(&self, name: &str) {
        let start = Instant::now();
        loop {
            if let Ok(out) = self.run(&["network", "inspect", name])
                && let Ok(v) = serde_json::from_str::<Value>(&out)
                && v[0]["Driver"] == "ebpf-overlay"
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the agent did not create Docker network {name}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Dockerd {
    /// Stops dockerd as an init system does (SIGTERM); its state stays.
    pub fn terminate(&mut self) {
        if self.stopped {
            return;
        }
        // SIGTERM: dockerd stops its containerd and shims; its mounts go with its namespace.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stopped = true;
    }

    /// dockerd restarted on the same state.
    pub fn restart(mut self, c: &Cluster, agent: &str, root: &Path) -> Dockerd {
        self.terminate();
        std::mem::forget(self);
        Dockerd::start(c, agent, root)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if !self.stopped
            && let Ok(ids) = self.run(&["ps", "-aq"])
        {
            for id in ids.lines() {
                let _ = self.run(&["rm", "-f", id]);
            }
        }
        self.terminate();
        // The plugin directory is the agent's (it removes its socket itself).
        for d in ["data", "exec"] {
            let _ = std::fs::remove_dir_all(self.dir.join(d));
        }
    }
}

pub fn docker_half_used(c: &Cluster, agent: &str, network: &str) -> u32 {
    c.agent(agent)
        .ipam()
        .unwrap()
        .iter()
        .filter(|u| u.network == network && u.half == overlay_api::agent::Half::Docker)
        .map(|u| u.used)
        .sum()
}

pub fn docker_half(c: &Cluster, agent: &str, network: &str) -> ipnetwork::Ipv4Network {
    let range = c
        .agent(agent)
        .ipam()
        .unwrap()
        .into_iter()
        .find(|u| {
            u.network == network
                && u.half == overlay_api::agent::Half::Docker
                && u.family == overlay_api::agent::Family::Ipv4
        })
        .unwrap()
        .range;
    match range {
        ipnetwork::IpNetwork::V4(r) => r,
        other => panic!("IPv4 docker half of {network} is {other}"),
    }
}
